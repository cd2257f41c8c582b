"""What must hold after any input, however hostile: the process serves on, its memory stays
bounded, no handler of ours failed, and the stores hold only whole things."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from imagebridge.dicom.part10 import read_header

_TRACEBACK = "Traceback (most recent call last):"
_OURS = re.compile(r'File "[^"]*/imagebridge/')


def proc_status_kb(pid: int, key: str) -> int:
    """A figure of /proc/<pid>/status in kB: VmRSS (now), VmHWM (peak), Threads (a count)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmHWM") / 1024


def our_tracebacks(log: Path) -> list[str]:
    """Tracebacks through ImageBridge's code in a process's log.

    pynetdicom logs a traceback of its own when it cannot decode a PDU, before aborting
    the association: that is a refusal, not a failure. A traceback through our code is a
    handler that failed (pynetdicom then answers with a generic failure, uvicorn with 500).
    """
    text = log.read_text("utf-8", "replace")
    blocks = text.split(_TRACEBACK)[1:]
    return [b[:2000] for b in blocks if _OURS.search(b.split("\n\n")[0])]


def stored_blobs(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp"]


def assert_blob_store_whole(root: Path) -> None:
    """Every blob is complete (it hashes to its name) and nothing is left half-written.
    Instances (not reports) are readable DICOM with a zero preamble."""
    assert not [p for p in (root / "tmp").iterdir()], "staged files left behind"
    for path in stored_blobs(root):
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == path.name, f"{path} is not whole"
        if data[128:132] == b"DICM":
            assert not any(data[:128]), f"{path} keeps a preamble"
            read_header(data)

"""A dataset as the acceptor receives it: in memory while small, then in a file on the spool's
disk; the same bytes either way, and nothing left behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imagebridge.dicom.received import Received


def whole(received: Received, folder: Path) -> bytes:
    out = folder / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        received.write_to(fd)
    finally:
        os.close(fd)
    return out.read_bytes()


def test_past_its_limit_a_dataset_goes_to_a_file_with_the_same_bytes(tmp_path: Path) -> None:
    spill = tmp_path / "tmp"
    spill.mkdir()
    pieces = [os.urandom(700) for _ in range(10)]
    received = Received(spill, spill_bytes=2000)
    for n, piece in enumerate(pieces):
        received.append(memoryview(piece))
        assert isinstance(received.data, Path) == (n >= 2)
    data = b"".join(pieces)
    assert received.size == len(data)
    assert Path(received.data).read_bytes() == data
    digest = hashlib.sha256()
    received.update(digest)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert whole(received, tmp_path) == data
    received.discard()
    assert list(spill.iterdir()) == []


def test_a_small_dataset_stays_in_memory(tmp_path: Path) -> None:
    received = Received(tmp_path, spill_bytes=2000)
    received.append(b"x" * 2000)
    assert received.data == b"x" * 2000
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_that_cannot_be_written_says_why_and_keeps_nothing(tmp_path: Path) -> None:
    received = Received(tmp_path / "gone", spill_bytes=10)
    received.append(b"a" * 8)
    received.append(b"b" * 8)  # the folder does not exist: the file cannot be made
    received.append(b"c" * 8)
    assert received.error.startswith("could not keep the dataset")
    assert received.size == 24
    assert received.data == b""


def test_a_full_disk_while_spilling_says_why_and_leaves_no_file(tmp_path: Path) -> None:
    """The spool's reserve of free space is asked before each write to the file."""
    asked: list[int] = []

    def reserve(n: int) -> None:
        asked.append(n)
        if sum(asked) > 5000:
            raise OSError(28, "No space left on device")

    received = Received(tmp_path, spill_bytes=2000, reserve=reserve)
    for _ in range(10):
        received.append(b"d" * 1000)
    assert received.error == "could not keep the dataset: No space left on device"
    assert not received.kept() and received.size == 10000
    assert list(tmp_path.iterdir()) == []
    assert asked[0] == 3000  # the first write to the file: what was in memory, and the piece

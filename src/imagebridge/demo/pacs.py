"""A small DICOM archive for the demo: a hospital's "PACS" on loopback.

It accepts C-ECHO and C-STORE of any storage SOP class and keeps each instance exactly as
received (no decoding, no transcoding), so the demo and the tests can check byte for byte
what arrived at the far end of the network.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from types import FrameType, TracebackType
from typing import cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from imagebridge.dicom.net import NODELAY_HANDLERS, storage_scp_ae
from imagebridge.dicom.part10 import file_meta

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


class MiniPacs:
    """Storage SCP writing ``store_dir/<SOPInstanceUID>.dcm`` for each instance received.

    ``port`` 0 lets the system choose; :attr:`port` then tells which one it chose.
    """

    def __init__(self, ae_title: str, port: int, store_dir: Path, host: str = "127.0.0.1") -> None:
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.store_dir = store_dir
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def start(self) -> None:
        """Listen in background threads; returns once the socket is bound."""
        if self._server is not None:
            raise RuntimeError("MiniPacs already started")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ae = storage_scp_ae(self.ae_title)
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
            *NODELAY_HANDLERS,
        ]
        self._server = ae.start_server((self.host, self._port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        """Stop listening and end open associations; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> MiniPacs:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def received(self) -> list[Path]:
        """The stored instances, sorted by file name (in-progress temporary files excluded)."""
        return sorted(self.store_dir.glob("*.dcm"))

    def count(self) -> int:
        return len(self.received())

    def _on_c_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_c_store(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        # The UID becomes a file name: only a well-formed UID may (no '/', no '..').
        if not _is_uid(sop_instance_uid):
            log.warning("refused C-STORE with invalid SOP Instance UID %r", sop_instance_uid)
            return CANNOT_UNDERSTAND
        meta = file_meta(
            str(request.AffectedSOPClassUID),
            sop_instance_uid,
            str(event.context.transfer_syntax),
        )
        # The dataset exactly as the peer encoded it.
        body: bytes = event.encoded_dataset(include_meta=False)
        try:
            _write_durably(self.store_dir / f"{sop_instance_uid}.dcm", meta + body)
        except OSError:
            log.exception("could not store %s", sop_instance_uid)
            return OUT_OF_RESOURCES
        return SUCCESS


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def _write_durably(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync, then rename, so the store never holds a partial file.

    A PACS acknowledges a C-STORE only once the instance is on disk.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the directory is synced.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """``python -m imagebridge.demo.pacs --ae X --port N --dir D``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m imagebridge.demo.pacs", description=__doc__)
    parser.add_argument("--ae", required=True, help="AE title of the archive")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--dir", type=Path, required=True, help="directory to store into")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pacs = MiniPacs(args.ae, args.port, args.dir, args.host)
    pacs.start()
    # One line on stdout, so that a script starting the archive knows when it can connect.
    print(f"MiniPacs {args.ae} listening on {args.host}:{pacs.port}", flush=True)
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        pacs.stop()
    print(f"MiniPacs {args.ae} stopped, {pacs.count()} instances stored", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A dataset as it arrives over an association: in memory while small, in a file beyond.

An instance is acknowledged only once it is whole, so everything received of it must be kept
until then. A multi-gigabyte one (breast tomosynthesis, whole-slide imaging) would take that
much memory; past ``spill_bytes`` the rest goes to a file in ``spill_dir`` instead, and the
dataset is handed on as that file's path.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO

# Past this, received bytes go to disk; below, a file would cost more than it saves.
SPILL_BYTES = 32 * 1024 * 1024
COPY_CHUNK = 1024 * 1024


class Received:
    def __init__(self, spill_dir: Path | None, spill_bytes: int = SPILL_BYTES) -> None:
        """``spill_dir`` None: kept in memory whatever its size."""
        self._dir = spill_dir
        self._spill = spill_bytes
        self._memory: bytes | bytearray = bytearray()
        self._file: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0
        # Why the bytes could not be kept (a full disk); what follows is only counted.
        self.error = ""

    @classmethod
    def whole(cls, data: bytes | bytearray) -> Received:
        """A dataset received whole by other means (pynetdicom), kept as it is."""
        received = cls(None)
        received._memory, received.size = data, len(data)
        return received

    def append(self, data: memoryview | bytes) -> None:
        self.size += len(data)
        if self.error:
            return
        small = self._dir is None or len(self._memory) + len(data) <= self._spill
        if self._file is None and small:
            if not isinstance(self._memory, bytearray):
                self._memory = bytearray(self._memory)
            self._memory += data
            return
        try:
            if self._file is None:
                assert self._dir is not None
                self.path = self._dir / f"{uuid.uuid4().hex}.received"
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self._file = os.fdopen(fd, "wb")
                self._file.write(self._memory)
                self._memory = bytearray()
            self._file.write(data)
        except OSError as exc:
            self.error = f"could not keep the dataset: {exc.strerror or type(exc).__name__}"
            self.discard()

    @property
    def data(self) -> bytes | bytearray | Path:
        """The whole dataset: its bytes, or the file holding them."""
        if self._file is not None:
            self._file.flush()
        return self.path if self.path is not None else self._memory

    def update(self, digest: hashlib._Hash) -> None:
        """Feed the dataset to a hash."""
        if self.path is None:
            digest.update(self._memory)
            return
        with open(self.path, "rb") as fh:
            while chunk := fh.read(COPY_CHUNK):
                digest.update(chunk)

    def write_to(self, fd: int) -> None:
        """Write the dataset to an open file descriptor, at its position."""
        if self.path is None:
            view = memoryview(self._memory)
            while view:
                view = view[os.write(fd, view) :]
            return
        assert self._file is not None
        self._file.flush()
        with open(self.path, "rb") as fh:
            while chunk := fh.read(COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]

    def discard(self) -> None:
        """Let go of what was received (the file, if any)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        self._memory = bytearray()

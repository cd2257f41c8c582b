"""A dataset as it arrives over an association: in memory while small, in a file beyond.

An instance is acknowledged only once it is whole, so everything received of it must be kept
until then. A multi-gigabyte one (breast tomosynthesis, whole-slide imaging) would take that
much memory; past ``spill_bytes`` the rest goes to a file in ``spill_dir`` instead, and the
dataset is handed on as that file's path.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

# Past this, received bytes go to disk; below, a file would cost more than it saves.
SPILL_BYTES = 32 * 1024 * 1024
COPY_CHUNK = 1024 * 1024


class Digest(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


class Received:
    def __init__(
        self,
        spill_dir: Path | None,
        spill_bytes: int = SPILL_BYTES,
        reserve: Callable[[int], None] | None = None,
    ) -> None:
        """``spill_dir`` None: kept in memory whatever its size. ``reserve(n)``: asked before
        n more bytes go to the file; it raises OSError when the disk cannot take them."""
        self._dir = spill_dir
        self._spill = spill_bytes
        self._reserve = reserve
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
            if self._reserve is not None:
                self._reserve(len(data) + (len(self._memory) if self._file is None else 0))
            if self._file is None:
                assert self._dir is not None
                self.path = self._dir / f"{uuid.uuid4().hex}.received"
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self._file = os.fdopen(fd, "wb")
                self._file.write(self._memory)
                self._memory = bytearray()
            self._file.write(data)
        except OSError as exc:
            self._failed(exc)

    def kept(self) -> bool:
        """Whether the whole dataset is kept, the buffered rest written out (if not, ``error``
        says why: a disk that filled)."""
        self._flush()
        return not self.error

    @property
    def data(self) -> bytes | bytearray | Path:
        """The whole dataset: its bytes, or the file holding them (empty if ``error``)."""
        self._flush()
        return self.path if self.path is not None else self._memory

    def update(self, digest: Digest) -> None:
        """Feed the dataset to a hash."""
        self._flush()
        if self.path is None:
            digest.update(self._memory)
            return
        with open(self.path, "rb") as fh:
            while chunk := fh.read(COPY_CHUNK):
                digest.update(chunk)

    def write_to(self, fd: int) -> None:
        """Write the dataset to an open file descriptor, at its position."""
        self._flush()
        if self.path is None:
            _write_all(fd, memoryview(self._memory))
            return
        with open(self.path, "rb") as fh:
            while chunk := fh.read(COPY_CHUNK):
                _write_all(fd, memoryview(chunk))

    def discard(self) -> None:
        """Let go of what was received (the file, if any); never fails."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # its last bytes may not fit: no matter
                self._file.close()
            self._file = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            self.path = None
        self._memory = bytearray()

    def _flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.error = f"could not keep the dataset: {exc.strerror or exc}"
        self.discard()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]

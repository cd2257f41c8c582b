"""The blob stream between gateways and the hub: one HTTP body carries a batch of blobs.

Each frame is the 32-byte SHA-256 of the blob, its length as an 8-byte big-endian integer,
then the bytes. A frame of length 0 names a blob the hub already holds (no bytes follow).
Digest-first framing lets each side hash while streaming and check every blob on arrival.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MEDIA_TYPE = "application/vnd.imagebridge.blobs"
_HEAD = struct.Struct(">32sQ")
FRAME_HEADER_SIZE = _HEAD.size
CHUNK = 1 << 20


class FramingError(ValueError):
    pass


@dataclass(frozen=True)
class FrameStart:
    sha256: str
    length: int


@dataclass(frozen=True)
class FrameData:
    data: bytes | memoryview


@dataclass(frozen=True)
class FrameEnd:
    sha256: str


Event = FrameStart | FrameData | FrameEnd


def frame_header(sha256: str, length: int) -> bytes:
    return _HEAD.pack(bytes.fromhex(sha256), length)


def encode_files(items: Iterable[tuple[str, Path | None]]) -> Iterator[bytes]:
    """Frames for (digest, path) pairs; a path of None sends a reference frame."""
    for sha256, path in items:
        if path is None:
            yield frame_header(sha256, 0)
            continue
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            yield frame_header(sha256, size)
            while chunk := fh.read(CHUNK):
                yield chunk


class FrameDecoder:
    """Incremental decoder: feed it chunks as they arrive, get events back.

    Blob bytes are passed on as views of the chunks fed in, never copied here: the stream
    may carry hundreds of megabytes.
    """

    def __init__(self, max_blob_bytes: int) -> None:
        self._max = max_blob_bytes
        self._head = bytearray()
        self._remaining = 0
        self._current: str | None = None

    def feed(self, chunk: bytes | memoryview) -> Iterator[Event]:
        view = memoryview(chunk)
        while view:
            if self._current is not None:
                take = min(self._remaining, len(view))
                yield FrameData(view[:take])
                view = view[take:]
                self._remaining -= take
                if self._remaining == 0:
                    sha, self._current = self._current, None
                    yield FrameEnd(sha)
                continue
            need = _HEAD.size - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < _HEAD.size:
                return
            raw, length = _HEAD.unpack(self._head)
            self._head.clear()
            if length > self._max:
                # Refuse before reading: a declared length must never make us allocate it.
                raise FramingError(f"blob of {length} bytes exceeds the {self._max} limit")
            sha = raw.hex()
            yield FrameStart(sha, length)
            if length == 0:
                yield FrameEnd(sha)
            else:
                self._current, self._remaining = sha, length

    def close(self) -> None:
        if self._current is not None or self._head:
            raise FramingError("stream ended inside a frame")

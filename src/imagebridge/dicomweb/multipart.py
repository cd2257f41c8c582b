"""multipart/related bodies (RFC 2387) as DICOMweb sends and receives them, streamed.

Answers are written part by part from generators, so a study never sits whole in memory;
requests are parsed as their bytes arrive, each part handed on in pieces.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass

from imagebridge.dicomweb.media import MULTIPART

MAX_HEADER_BYTES = 16 * 1024


def new_boundary() -> str:
    return "ib-" + secrets.token_hex(16)


def content_type(part_type: str, boundary: str) -> str:
    return f'{MULTIPART}; type="{part_type}"; boundary={boundary}'


def write_parts(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """The body of a multipart answer: each part's header goes out with its first chunk
    (one write instead of two), and the closing delimiter last."""
    opening = f"--{boundary}\r\n".encode()
    for content_type_of_part, chunks in parts:
        head = opening + f"Content-Type: {content_type_of_part}\r\n\r\n".encode()
        for chunk in chunks:
            if head:
                chunk, head = head + chunk, b""
            yield chunk
        if head:
            yield head
        opening = f"\r\n--{boundary}\r\n".encode()
    yield f"\r\n--{boundary}--\r\n".encode()


class MultipartError(ValueError):
    """A body that is not well-formed multipart."""


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


class MultipartReader:
    """Parses a multipart body fed in chunks of any size into part events."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 70:
            raise MultipartError("the boundary parameter is missing or too long")
        self._first = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._first
        self._buffer = b""
        self._state = "preamble"
        self.parts = 0

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buffer += chunk
        while True:
            progressed = yield from self._step()
            if not progressed:
                return

    def _step(self) -> Generator[Event, None, bool]:
        """Advance by what the buffer holds; False when it needs more bytes."""
        buf = self._buffer
        if self._state == "preamble":
            # The first boundary may open the body, or follow a preamble after a line break.
            if buf.startswith(self._first):
                at = 0
            else:
                at = buf.find(self._delimiter)
                if at < 0:
                    self._buffer = buf[-len(self._delimiter) :]
                    return False
                at += 2
            self._buffer = buf[at + len(self._first) :]
            self._state = "after-boundary"
            return True
        if self._state == "after-boundary":
            if len(buf) < 2:
                return False
            if buf.startswith(b"--"):
                self._state = "epilogue"
                self._buffer = b""
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 256:
                    raise MultipartError("a boundary line is followed by something else")
                return False
            if buf[:end].strip(b" \t"):
                raise MultipartError("a boundary line is followed by something else")
            self._buffer = buf[end + 2 :]
            self._state = "headers"
            return True
        if self._state == "headers":
            end = buf.find(b"\r\n\r\n")
            if buf.startswith(b"\r\n"):
                end = -2  # no headers at all
            elif end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MultipartError("a part's headers are too long")
                return False
            headers = _headers(buf[: max(end, 0)])
            self._buffer = buf[end + 4 :]
            self._state = "body"
            self.parts += 1
            yield PartStart(headers)
            return True
        if self._state == "body":
            at = buf.find(self._delimiter)
            if at < 0:
                # Keep what could be the start of a delimiter split across chunks.
                keep = len(self._delimiter) - 1
                if len(buf) > keep:
                    yield PartData(buf[:-keep])
                    self._buffer = buf[-keep:]
                return False
            if at:
                yield PartData(buf[:at])
            yield PartEnd()
            self._buffer = buf[at + len(self._delimiter) :]
            self._state = "after-boundary"
            return True
        self._buffer = b""  # the epilogue is ignored
        return False

    def close(self) -> None:
        if self._state != "epilogue":
            raise MultipartError("the body ended before its closing boundary")


def _headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError("a part header line has no colon")
        out[name.strip().lower()] = value.strip()
    return out

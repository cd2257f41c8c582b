"""DICOM Part 10 files as ImageBridge stores them.

A received dataset is wrapped in a file meta group that depends only on the dataset, its
SOP class/instance and transfer syntax: no sender AE, no timestamps. The same instance
received twice therefore has the same bytes and the same SHA-256, and is stored once.
The 128-byte preamble is always zeros, whatever a sender put there.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1428.1"
IMPLEMENTATION_VERSION_NAME = "IMAGEBRIDGE1"
PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _cs(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    body = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0002, 0x0010, b"UI", _ui(transfer_syntax_uid)),
            _element(0x0002, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element(0x0002, 0x0013, b"SH", _cs(IMPLEMENTATION_VERSION_NAME)),
        )
    )
    return PREAMBLE + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


@dataclass(frozen=True)
class Header:
    """The attributes ImageBridge routes and indexes by, read from a dataset's header."""

    dataset: Dataset
    transfer_syntax_uid: str

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.get("SOPClassUID", ""))

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.get("SOPInstanceUID", ""))

    @property
    def study_instance_uid(self) -> str:
        return str(self.dataset.get("StudyInstanceUID", ""))

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.get("SeriesInstanceUID", ""))

    def text(self, keyword: str) -> str:
        value = self.dataset.get(keyword, "")
        return "" if value is None else str(value)


class BadDataset(ValueError):
    """A dataset ImageBridge refuses to store, with the reason in plain words."""


REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_UID = re.compile(r"[0-9.]{1,64}")
HEADER_LAST_TAG = 0x0020FFFF


def read_header(source: bytes | Path | BinaryIO, transfer_syntax_uid: str | None = None) -> Header:
    """Parse the identifying header (groups up to 0020), check its UIDs, walk the rest.

    ``source`` is a Part 10 file, or a bare dataset if ``transfer_syntax_uid`` is given.
    """
    fp: BinaryIO
    if isinstance(source, bytes):
        fp = io.BytesIO(source)
    elif isinstance(source, Path):
        fp = open(source, "rb")  # noqa: SIM115 - closed below
    else:
        fp = source
    try:
        ds: Dataset
        if transfer_syntax_uid is None:
            start = fp.tell()
            try:
                # Our own meta group, read by hand: pydicom's costs more than the dataset.
                transfer_syntax_uid = read_meta(fp).transfer_syntax_uid
            except BadDataset:
                fp.seek(start)
                ds = dcmread(fp, stop_before_pixels=True)
                transfer_syntax_uid = str(ds.file_meta.TransferSyntaxUID)
            else:
                ds = _read_bare(fp, transfer_syntax_uid)
        else:
            ds = _read_bare(fp, transfer_syntax_uid)
        for keyword in REQUIRED_UIDS:
            value = str(ds.get(keyword, "") or "").strip()
            if not value:
                raise BadDataset(f"missing {keyword}")
            if not _UID.fullmatch(value):
                raise BadDataset(f"invalid {keyword}")
        # Values stay raw (converting them all costs more than the rest of the path): the
        # structure was walked to the end, which is what storing the bytes depends on.
        if not UID(transfer_syntax_uid).is_deflated:
            _check_tail(fp, UID(transfer_syntax_uid))
    except BadDataset:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise BadDataset(f"unreadable dataset: {type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage; none may escape
        raise BadDataset(f"unreadable dataset: {type(exc).__name__}") from exc
    finally:
        if isinstance(source, Path):
            fp.close()
    return Header(ds, transfer_syntax_uid)


_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)


def _check_tail(fp: BinaryIO, syntax: UID) -> None:
    """Walk the elements after the header to the end without reading their values.

    A dataset cut short, or with a length pointing past its end, is refused here, so that
    no partial instance is ever acknowledged or stored.
    """
    start = fp.tell()
    end = fp.seek(0, io.SEEK_END)
    fp.seek(start)
    order = "<" if syntax.is_little_endian else ">"
    _skip_elements(fp, start, end, order, syntax.is_implicit_VR, in_item=False)


def _read_exact(fp: BinaryIO, n: int) -> bytes:
    data = fp.read(n)
    if len(data) < n:
        raise BadDataset("dataset truncated")
    return data


def _skip_elements(
    fp: BinaryIO, pos: int, end: int, order: str, implicit: bool, *, in_item: bool
) -> int:
    """Skip elements up to the end, or past the delimiter of the item they are in."""
    while in_item or pos < end:
        head = _read_exact(fp, 8)
        group, elem = struct.unpack(order + "HH", head[:4])
        if in_item and (group, elem) == _ITEM_END:
            return pos + 8
        vr = head[4:6]
        # Like pydicom, tolerate an implicit-VR element inside an explicit-VR dataset.
        if implicit or not (vr.isalpha() and vr.isupper()):
            (length,) = struct.unpack(order + "I", head[4:])
            pos += 8
            vr = b""
        elif vr in _LONG_VRS:
            (length,) = struct.unpack(order + "I", _read_exact(fp, 4))
            pos += 12
        else:
            (length,) = struct.unpack(order + "H", head[6:])
            pos += 8
        if length == _UNDEFINED:
            # A sequence, or encapsulated pixel data; UN of undefined length is implicit VR.
            pos = _skip_items(fp, pos, end, order, implicit or vr == b"UN")
        else:
            pos += length
            if pos > end:
                raise BadDataset("dataset truncated")
            fp.seek(pos)
    return pos


def _skip_items(fp: BinaryIO, pos: int, end: int, order: str, implicit: bool) -> int:
    """Skip the items of an undefined-length value, up to its sequence delimiter."""
    while True:
        group, elem, length = struct.unpack(order + "HHI", _read_exact(fp, 8))
        pos += 8
        if (group, elem) == _SEQUENCE_END:
            return pos
        if (group, elem) != _ITEM:
            raise BadDataset("malformed item")
        if length == _UNDEFINED:
            pos = _skip_elements(fp, pos, end, order, implicit, in_item=True)
        else:
            pos += length
            if pos > end:
                raise BadDataset("dataset truncated")
            fp.seek(pos)


def _read_bare(fp: BinaryIO, transfer_syntax_uid: str) -> Dataset:
    from pydicom.filereader import read_dataset

    uid = UID(transfer_syntax_uid)
    if uid.is_deflated:
        import zlib

        fp = io.BytesIO(zlib.decompress(fp.read(), -zlib.MAX_WBITS))
    ds: Dataset = read_dataset(
        fp,
        is_implicit_VR=uid.is_implicit_VR,
        is_little_endian=uid.is_little_endian,
        # What ImageBridge routes and indexes by is all in groups 0008-0020; the rest of
        # the dataset is only walked, not parsed.
        stop_when=lambda tag, vr, length: tag > HEADER_LAST_TAG,
    )
    return ds


@dataclass(frozen=True)
class Meta:
    dataset_offset: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def read_meta(fh: BinaryIO) -> Meta:
    """The file meta group of a Part 10 file that has a group length, read by hand (fast)."""
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise BadDataset("not a Part 10 file with a meta group length")
    group_length: int = struct.unpack_from("<I", head, 140)[0]
    body = fh.read(group_length)
    if len(body) < group_length:
        raise BadDataset("file meta group truncated")
    values: dict[int, str] = {}
    pos = 0
    while pos + 8 <= len(body):
        elem, vr = struct.unpack_from("<2xH2s", body, pos)
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", body, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", body, pos + 6)
            pos += 8
        if vr == b"UI":
            values[elem] = body[pos : pos + length].rstrip(b"\x00 ").decode("ascii")
        pos += length
    try:
        return Meta(144 + group_length, values[0x0002], values[0x0003], values[0x0010])
    except KeyError as exc:
        raise BadDataset("file meta group lacks a required UID") from exc

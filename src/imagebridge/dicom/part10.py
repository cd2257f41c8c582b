"""DICOM Part 10 files as ImageBridge stores them.

A received dataset is wrapped in a file meta group that depends only on the dataset, its
SOP class/instance and transfer syntax: no sender AE, no timestamps. The same instance
received twice therefore has the same bytes and the same SHA-256, and is stored once.
The 128-byte preamble is always zeros, whatever a sender put there.
"""

from __future__ import annotations

import io
import mmap
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from imagebridge.dicom.encode import element, padded

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1428.1"
IMPLEMENTATION_VERSION_NAME = "IMAGEBRIDGE1"
PREAMBLE = b"\x00" * 128 + b"DICM"
# The most a deflated dataset may inflate to while its header is read.
MAX_INFLATED_BYTES = 256 * 1024**2


def _meta(tag: int, vr: str, value: bytes) -> bytes:
    return element(tag, vr, padded(value, vr), implicit=False)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    body = b"".join(
        (
            _meta(0x00020001, "OB", b"\x00\x01"),
            _meta(0x00020002, "UI", sop_class_uid.encode("ascii")),
            _meta(0x00020003, "UI", sop_instance_uid.encode("ascii")),
            _meta(0x00020010, "UI", transfer_syntax_uid.encode("ascii")),
            _meta(0x00020012, "UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _meta(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        )
    )
    return PREAMBLE + _meta(0x00020000, "UL", struct.pack("<I", len(body))) + body


class BadDataset(ValueError):
    """A dataset ImageBridge refuses to store, with the reason in plain words."""


REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# What ImageBridge routes and indexes by: read once when the header is, so that a value that
# cannot be read refuses the dataset then, not when it is being indexed.
INDEXED = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
)
OTHER_IDS = "OtherPatientIDsSequence"
_UID = re.compile(r"[0-9.]{1,64}")
HEADER_END_TAG = 0x00210000  # what ImageBridge routes and indexes by is in groups 0008-0020
SPECIFIC_CHARACTER_SET = 0x00080005
Buffer = bytes | bytearray | memoryview | mmap.mmap
# (tag, start, value start, end) of a data element in its buffer
Element = tuple[int, int, int, int]


class Elements:
    """The data elements of one dataset (or sequence item), found in its encoded bytes.

    Values are converted by pydicom one at a time, when asked for: a header has dozens of
    elements and ImageBridge reads about ten of them.
    """

    def __init__(
        self,
        buf: bytes,
        elements: dict[int, Element],
        syntax: UID,
        encodings: list[str] | None = None,
    ) -> None:
        self._buf = buf
        self._elements = elements
        self._syntax = syntax
        # (pydicom works these out anew on each call.)
        self._implicit = syntax.is_implicit_VR
        self._little = syntax.is_little_endian
        self._encodings = encodings or [default_encoding]
        self._texts: dict[str, str] = {}
        self._items: dict[str, list[Elements]] = {}
        if terms := self.value(SPECIFIC_CHARACTER_SET):
            self._encodings = convert_encodings(terms)

    def value(self, tag: int) -> Any:
        """The element's value as pydicom gives it; None if absent or a sequence."""
        found = self._elements.get(tag)
        if found is None:
            return None
        _, start, value_start, end = found
        vr = None  # implicit VR: pydicom looks it up in its dictionary
        if not self._implicit and (explicit := self._buf[start + 4 : start + 6]):
            vr = explicit.decode("ascii") if explicit in EXPLICIT_VRS else None
        if vr == "SQ" or (
            vr is None and self._buf[value_start - 4 : value_start] == _UNDEFINED_FIELD
        ):
            return None
        raw = RawDataElement(
            BaseTag(tag),
            vr,
            end - value_start,
            self._buf[value_start:end],
            value_start,
            self._implicit,
            self._little,
        )
        try:
            return convert_raw_data_element(raw, encoding=self._encodings).value
        except Exception as exc:  # pydicom raises many kinds on garbage; none may escape
            raise BadDataset(f"unreadable value of {BaseTag(tag)}") from exc

    def text(self, keyword: str) -> str:
        """The element's value as text, as ``str()`` of pydicom's value gives it."""
        text = self._texts.get(keyword)
        if text is None:
            tag = _tag(keyword)
            text = self._plain_text(tag)
            if text is None:
                value = self.value(tag)
                text = "" if value is None else str(value)
            self._texts[keyword] = text
        return text

    def _plain_text(self, tag: int) -> str | None:
        """A single ASCII value of a string VR, decoded as pydicom would (a third of the
        cost); None for anything else, which pydicom then converts."""
        found = self._elements.get(tag)
        if found is None:
            return None
        _, start, value_start, end = found
        vr = _dictionary_vr(tag)
        if not self._implicit and value_start - start != 8 + 4 * (vr in _LONG):
            return None  # not the dictionary's VR: leave it to pydicom
        if not self._implicit and self._buf[start + 4 : start + 6] != vr.encode():
            return None
        raw = self._buf[value_start:end]
        if not raw.isascii() or b"\\" in raw or b"\x1b" in raw:
            return None
        strip = _STRIP.get(vr)
        if strip is None or (vr == "IS" and not _INTEGER.fullmatch(raw.rstrip(b" \x00"))):
            return None
        return strip(raw.decode("ascii"))

    def items(self, keyword: str) -> list[Elements]:
        """The items of a sequence element; [] if it is absent or empty."""
        items = self._items.get(keyword)
        if items is None:
            items = self._items[keyword] = self._parse_items(keyword)
        return items

    def _parse_items(self, keyword: str) -> list[Elements]:
        found = self._elements.get(_tag(keyword))
        if found is None:
            return []
        order = "<" if self._little else ">"
        return [
            Elements(
                self._buf, {t: (t, *b) for t, b in item.items()}, self._syntax, self._encodings
            )
            for item in sequence_items(self._buf, *found[1:], order, self._implicit)
        ]


_UNDEFINED_FIELD = b"\xff\xff\xff\xff"
_LONG = {"UC", "UR", "UT"}  # string VRs with a 4-byte length in explicit VR


def _rstrip(value: str) -> str:
    return value.rstrip("\x00 ")


# How pydicom's converters (pydicom.values) pad-strip a single value of each string VR.
_STRIP: dict[str, Callable[[str], str]] = {
    **dict.fromkeys(("CS", "AS", "DT", "LO", "SH", "UC", "LT", "ST", "UT", "PN", "UI"), _rstrip),
    "AE": str.strip,
    "IS": _rstrip,  # integers only, below
}
if not config.datetime_conversion:  # else DA and TM values are not plain strings
    _STRIP |= {"DA": _rstrip, "TM": _rstrip}
_INTEGER = re.compile(rb" *[+-]?[0-9]{1,12}")


@lru_cache(maxsize=256)
def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


@lru_cache(maxsize=256)
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword} is not a DICOM keyword")
    return int(tag)


@dataclass(frozen=True)
class Header:
    """The attributes ImageBridge routes and indexes by, read from a dataset's header."""

    transfer_syntax_uid: str
    elements: Elements
    raw: bytes  # the header's elements as encoded

    @property
    def sop_class_uid(self) -> str:
        return self.text("SOPClassUID")

    @property
    def sop_instance_uid(self) -> str:
        return self.text("SOPInstanceUID")

    @property
    def study_instance_uid(self) -> str:
        return self.text("StudyInstanceUID")

    @property
    def series_instance_uid(self) -> str:
        return self.text("SeriesInstanceUID")

    def text(self, keyword: str) -> str:
        return self.elements.text(keyword)

    def items(self, keyword: str) -> list[Elements]:
        return self.elements.items(keyword)

    @cached_property
    def dataset(self) -> Dataset:
        """The header as a pydicom Dataset, parsed on first use."""
        syntax = UID(self.transfer_syntax_uid)
        ds: Dataset = read_dataset(
            io.BytesIO(self.raw),
            is_implicit_VR=syntax.is_implicit_VR,
            is_little_endian=syntax.is_little_endian,
        )
        return ds


def read_header(
    source: bytes | bytearray | memoryview | Path | BinaryIO,
    transfer_syntax_uid: str | None = None,
) -> Header:
    """Find the identifying header (groups up to 0020), check its UIDs, walk the rest.

    ``source`` is a Part 10 file, or a bare dataset if ``transfer_syntax_uid`` is given. The
    whole dataset is walked element by element, pixel data stepped over rather than read,
    so a dataset cut short, or with a length pointing past its end, is refused here: no
    partial instance is ever acknowledged or stored.
    """
    try:
        with _opened(source) as buf:
            start = 0
            if transfer_syntax_uid is None:
                start, transfer_syntax_uid = _meta_in(buf)
            syntax = UID(transfer_syntax_uid)
            if not syntax.is_transfer_syntax:
                raise BadDataset(f"unsupported transfer syntax {syntax}")
            if syntax.is_deflated:
                return _header_of(_inflate(buf[start:]), 0, syntax)
            return _header_of(buf, start, syntax)
    except BadDataset:
        raise
    except Exception as exc:  # a damaged file may fail in many ways; none may escape
        raise BadDataset(f"unreadable dataset: {type(exc).__name__}") from exc


def _header_of(buf: Buffer, start: int, syntax: UID) -> Header:
    order = "<" if syntax.is_little_endian else ">"
    implicit = syntax.is_implicit_VR
    try:
        head = walk(buf, start, order, implicit, stop=HEADER_END_TAG)
    except BadDataset as exc:
        raise BadDataset(f"unreadable dataset header ({exc})") from exc
    end = head[-1][3] if head else start
    # Only the header is kept, not the dataset (positions made relative to it).
    raw = bytes(buf[start:end])
    elements = {tag: (tag, s - start, v - start, e - start) for tag, s, v, e in head}
    header = Header(str(syntax), Elements(raw, elements, syntax), raw)
    for keyword in REQUIRED_UIDS:
        value = header.text(keyword).strip()
        if not value:
            raise BadDataset(f"missing {keyword}")
        if not _UID.fullmatch(value):
            raise BadDataset(f"invalid {keyword}")
    for keyword in INDEXED:
        header.text(keyword)
    for item in header.items(OTHER_IDS):
        item.text("PatientID")
        item.text("IssuerOfPatientID")
    walk(buf, end, order, implicit)  # the rest, so that it is whole
    return header


@contextmanager
def _opened(source: bytes | bytearray | memoryview | Path | BinaryIO) -> Iterator[Buffer]:
    """The source's bytes, not copied: a file is mapped, not read."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield source
    elif isinstance(source, io.BytesIO):
        # getvalue() shares the bytes a BytesIO was made from; getbuffer() would copy them.
        with memoryview(source.getvalue()) as view:
            yield view[source.tell() :]
    elif isinstance(source, Path):
        with open(source, "rb") as fh:
            if fh.seek(0, io.SEEK_END) == 0:
                raise BadDataset("empty file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                yield mapped
    else:
        yield source.read()


def _inflate(data: Buffer) -> bytes:
    # Measured before it is kept: a few hundred kilobytes of deflate can inflate to
    # gigabytes, which no header is worth holding in memory.
    _check_inflated_size(data)
    body: bytes = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
    return body


def _check_inflated_size(data: Buffer) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    step = 1 << 16
    try:
        for start in range(0, len(data), step):
            pending = data[start : start + step]
            while pending and not inflater.eof:
                size += len(inflater.decompress(pending, 1 << 22))
                if size > MAX_INFLATED_BYTES:
                    raise BadDataset(
                        f"a deflated dataset inflates to more than {MAX_INFLATED_BYTES} bytes"
                    )
                pending = inflater.unconsumed_tail
            if inflater.eof:
                return
    except zlib.error as exc:
        raise BadDataset("unreadable deflated dataset") from exc
    raise BadDataset("dataset truncated")


def preamble_is_clean(path: Path) -> bool:
    """Whether a Part 10 file's 128-byte preamble is zeros, as every file ImageBridge writes.
    Anything else there (an executable, in a polyglot file) must never be passed on."""
    with open(path, "rb") as fh:
        return not any(fh.read(len(PREAMBLE) - 4))


def _meta_in(buf: Buffer) -> tuple[int, str]:
    """Where the dataset starts, and its transfer syntax, from the file meta group."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise BadDataset("not a DICOM Part 10 file")
    pos, syntax = 132, ""
    try:
        # The meta group is explicit VR little endian, whatever the dataset's syntax.
        while pos + 8 <= len(buf) and buf[pos : pos + 2] == b"\x02\x00":
            tag, value_start, end = element_bounds(buf, pos, "<", implicit=False)
            if tag == 0x00020010:
                syntax = bytes(buf[value_start:end]).rstrip(b"\x00 ").decode("ascii")
            pos = end
    except (struct.error, UnicodeDecodeError) as exc:
        raise BadDataset("unreadable file meta group") from exc
    if not syntax:
        raise BadDataset("the file meta group names no transfer syntax")
    return pos, syntax


# Data element framing (PS3.5 7.1 and 7.5): enough to find each element's bytes without
# decoding its value.

UNDEFINED_LENGTH = 0xFFFFFFFF
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# Two upper-case letters; anything else is an implicit-VR element in an explicit-VR dataset,
# which pydicom accepts too.
EXPLICIT_VRS = frozenset(bytes((a, b)) for a in range(65, 91) for b in range(65, 91))
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def walk(
    buf: Buffer, pos: int, order: str, implicit: bool, stop: int = 1 << 32
) -> list[tuple[int, int, int, int]]:
    """(tag, start, value start, end) of each top-level element from ``pos`` on, up to the
    first one whose tag is ``stop`` or more.

    Pixel data is walked over too, without being read: a truncated dataset is refused here
    rather than stored or delivered. For encapsulated pixel data that means one item
    header a frame. Elements out of order are refused too: a second PatientID further on
    would otherwise escape reconciliation.
    """
    # The hot loop of every header read: _header inlined, which makes it a third faster.
    explicit_header, implicit_header, length_field = _HEADERS[order]
    elements: list[tuple[int, int, int, int]] = []
    previous = -1
    size = len(buf)
    try:
        while pos < size:
            vr = b""
            if implicit:
                group, elem, length = implicit_header.unpack_from(buf, pos)
                value_start = pos + 8
            else:
                group, elem, vr, length = explicit_header.unpack_from(buf, pos)
                value_start = pos + 8
                if vr in LONG_VRS:
                    (length,) = length_field.unpack_from(buf, pos + 8)
                    value_start = pos + 12
                elif vr not in EXPLICIT_VRS:
                    group, elem, length = implicit_header.unpack_from(buf, pos)
                    vr = b""
            tag = group << 16 | elem
            if tag <= previous:
                raise BadDataset(f"data element ({group:04X},{elem:04X}) out of order")
            if tag >= stop:
                break
            if length == UNDEFINED_LENGTH or value_start + length > size:
                end = _end(buf, value_start, length, vr, order, implicit)
            else:
                end = value_start + length
            elements.append((tag, pos, value_start, end))
            previous, pos = tag, end
    except struct.error as exc:
        raise BadDataset("dataset truncated") from exc
    return elements


_HEADERS = {
    order: (
        struct.Struct(order + "HH2sH"),
        struct.Struct(order + "HHI"),
        struct.Struct(order + "I"),
    )
    for order in "<>"
}


def _header(buf: Buffer, pos: int, order: str, implicit: bool) -> tuple[int, int, int, bytes]:
    """The tag, value start, value length and VR (b"" if implicit) of the element at ``pos``."""
    explicit_header, implicit_header, length_field = _HEADERS[order]
    if not implicit:
        group, elem, vr, length = explicit_header.unpack_from(buf, pos)
        if vr in LONG_VRS:
            return group << 16 | elem, pos + 12, length_field.unpack_from(buf, pos + 8)[0], vr
        if vr in EXPLICIT_VRS:
            return group << 16 | elem, pos + 8, length, vr
    group, elem, length = implicit_header.unpack_from(buf, pos)
    return group << 16 | elem, pos + 8, length, b""


def _end(buf: Buffer, value_start: int, length: int, vr: bytes, order: str, implicit: bool) -> int:
    if length == UNDEFINED_LENGTH:
        # Items of a UN (a sequence its sender could not name) are in implicit VR (PS3.5 6.2.2).
        end = _items_end(buf, value_start, order, implicit or vr == b"UN")
    else:
        end = value_start + length
    if end > len(buf):
        raise BadDataset("dataset truncated")
    return end


def element_bounds(buf: Buffer, pos: int, order: str, implicit: bool) -> tuple[int, int, int]:
    """The tag, value start and end of the element at ``pos``."""
    tag, value_start, length, vr = _header(buf, pos, order, implicit)
    return tag, value_start, _end(buf, value_start, length, vr, order, implicit)


def _items_end(buf: Buffer, pos: int, order: str, implicit: bool) -> int:
    """Where an undefined-length value (items, then a sequence delimiter) ends."""
    while True:
        group, elem, length = struct.unpack_from(order + "HHI", buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise BadDataset("malformed sequence")
        if length != UNDEFINED_LENGTH:
            pos += length
            continue
        while struct.unpack_from(order + "HH", buf, pos) != (0xFFFE, 0xE00D):
            pos = element_bounds(buf, pos, order, implicit)[2]
        pos += 8  # the item delimiter


def sequence_items(
    buf: Buffer, start: int, value_start: int, end: int, order: str, implicit: bool
) -> list[dict[int, tuple[int, int, int]]]:
    """For each item of the sequence element at ``start``: its elements' (start, value start,
    end) by tag."""
    implicit = implicit or buf[start + 4 : start + 6] == b"UN"
    items: list[dict[int, tuple[int, int, int]]] = []
    pos = value_start
    try:
        while pos < end:
            group, elem, length = struct.unpack_from(order + "HHI", buf, pos)
            pos += 8
            if group << 16 | elem == _SEQUENCE_END:
                break
            if group << 16 | elem != _ITEM:
                raise BadDataset("malformed sequence")
            item_end = end if length == UNDEFINED_LENGTH else pos + length
            elements: dict[int, tuple[int, int, int]] = {}
            while pos < item_end:
                if struct.unpack_from(order + "HH", buf, pos) == (0xFFFE, 0xE00D):
                    pos += 8
                    break
                tag, elem_value, elem_end = element_bounds(buf, pos, order, implicit)
                elements[tag] = (pos, elem_value, elem_end)
                pos = elem_end
            items.append(elements)
    except struct.error as exc:
        raise BadDataset("malformed sequence") from exc
    return items


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
    try:
        while pos + 8 <= len(body):
            elem, vr = struct.unpack_from("<2xH2s", body, pos)
            if vr in LONG_VRS:
                (length,) = struct.unpack_from("<I", body, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from("<H", body, pos + 6)
                pos += 8
            if vr == b"UI":
                values[elem] = body[pos : pos + length].rstrip(b"\x00 ").decode("ascii")
            pos += length
    except (struct.error, UnicodeDecodeError) as exc:
        raise BadDataset("unreadable file meta group") from exc
    try:
        return Meta(144 + group_length, values[0x0002], values[0x0003], values[0x0010])
    except KeyError as exc:
        raise BadDataset("file meta group lacks a required UID") from exc

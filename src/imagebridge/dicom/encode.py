"""Data elements encoded without pydicom, little endian: the file meta, and the flat
datasets of text values that answer a C-FIND (hundreds per query, where pydicom's writer
costs about a millisecond each).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from functools import lru_cache

from pydicom.datadict import dictionary_VR, tag_for_keyword

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
LONG_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))
TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())  # noqa: SIM905
_NUMBERS = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i", "FL": "<f", "FD": "<d"}
# Text whose values are never anything but ASCII (PS3.5 6.1.2.3: the default repertoire).
_ASCII_ONLY = frozenset(("AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"))


def element(tag: int, vr: str, value: bytes, *, implicit: bool) -> bytes:
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, number, len(value)) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def padded(raw: bytes, vr: str) -> bytes:
    """Values are an even number of bytes: UIDs padded with NUL, other text with a space."""
    if len(raw) % 2 == 0:
        return raw
    return raw + (b"\x00" if vr == "UI" else b" ")


@lru_cache(maxsize=1024)
def keyword_entry(keyword: str) -> tuple[int, str] | None:
    """The tag and VR of a DICOM keyword; None when it is no keyword. An ambiguous VR
    ("US or SS") is taken as its first."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    return int(tag), str(dictionary_VR(tag)).split(" ")[0]


def value_bytes(vr: str, text: str, encoding: str) -> bytes:
    """A value given as text (several joined by backslashes), as ``vr`` stores it; b"" when
    it cannot be (a number that does not parse, a binary VR)."""
    if not text:
        return b""
    if vr in TEXT_VRS:
        if vr in _ASCII_ONLY:
            raw = text.encode("ascii", "replace")
        else:
            raw = text.encode(encoding, "replace")
        return padded(raw, vr)
    fmt = _NUMBERS.get(vr)
    if fmt is None:
        return b""  # binary and sequence values are returned empty
    try:
        parsed = [float(v) if fmt in ("<f", "<d") else int(v) for v in text.split("\\")]
        return b"".join(struct.pack(fmt, v) for v in parsed)
    except (ValueError, struct.error):
        return b""


def flat_dataset(values: Iterable[tuple[int, str, bytes]], *, implicit: bool) -> bytes:
    """A dataset of top-level elements (tag, VR, encoded value), in ascending tag order.
    An SQ element is written as an empty sequence."""
    return b"".join(
        element(tag, vr, b"" if vr == "SQ" else value, implicit=implicit)
        for tag, vr, value in sorted(values, key=lambda v: v[0])
    )

"""Data elements encoded without pydicom, little endian: the file meta, and the flat
datasets of text values that answer a C-FIND (hundreds per query, where pydicom's writer
costs about a millisecond each).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
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


def text_dataset(
    keywords: tuple[str, ...], texts: Sequence[str], *, implicit: bool, encoding: str
) -> bytes:
    """A dataset of top-level elements, the keywords' values given as text (``texts[i]`` for
    ``keywords[i]``), in ascending tag order. A keyword that names no element is left out;
    an SQ element is written as an empty sequence. The many answers of one C-FIND share
    their keywords: each element's header is worked out once for all of them."""
    parts = []
    for position, vr, head, long in _layout(keywords, implicit):
        raw = b"" if vr == "SQ" else value_bytes(vr, texts[position], encoding)
        parts.append(head + (_LONG.pack(len(raw)) if long else _SHORT.pack(len(raw))) + raw)
    return b"".join(parts)


_LONG, _SHORT = struct.Struct("<I"), struct.Struct("<H")


@lru_cache(maxsize=256)
def _layout(keywords: tuple[str, ...], implicit: bool) -> tuple[tuple[int, str, bytes, bool], ...]:
    """For each keyword naming an element, in tag order: its position among the keywords,
    its VR, the element's bytes before the value length, and whether that length has 4 bytes."""
    found = []
    for position, keyword in enumerate(keywords):
        entry = keyword_entry(keyword)
        if entry is None:
            continue
        tag, vr = entry
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            found.append((tag, position, vr, head, True))
        elif vr in LONG_VRS:
            found.append((tag, position, vr, head + vr.encode() + b"\x00\x00", True))
        else:
            found.append((tag, position, vr, head + vr.encode(), False))
    return tuple(entry[1:] for entry in sorted(found))

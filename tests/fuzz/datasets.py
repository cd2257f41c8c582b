"""Damaged datasets: a sound CT instance with its element framing broken in the ways a
faulty or hostile sender breaks it (lengths, order, truncation, noise, the wrong syntax)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from hypothesis import strategies as st

from fuzz.dimse import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from imagebridge.dicom.part10 import walk

# Values a length field is set to: empty, odd, just past the end, undefined, enormous.
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 3, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)


@dataclass(frozen=True)
class Instance:
    """A dataset (no meta group) as sent in a C-STORE, and the UIDs its request names."""

    dataset: bytes
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str = EXPLICIT_LE


def elements(dataset: bytes) -> list[tuple[int, int, int, int]]:
    """(tag, start, value start, end) of each top-level element, explicit VR little endian."""
    return walk(dataset, 0, "<", implicit=False)


def _length_field(dataset: bytes, start: int) -> tuple[int, str]:
    """Where an explicit-VR element's length field is, and its struct format."""
    vr = dataset[start + 4 : start + 6]
    if vr in (b"OB", b"OD", b"OF", b"OL", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"OV"):
        return start + 8, "<I"
    return start + 6, "<H"


@st.composite
def damaged(draw: st.DrawFn, base: Instance) -> Instance:
    """``base`` with one to three kinds of damage."""
    data = bytearray(base.dataset)
    syntax = base.transfer_syntax_uid
    found = elements(base.dataset)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["length", "truncate", "flip", "insert", "swap", "uid", "syntax", "append"]
            )
        )
        if kind == "length" and found:
            _, start, _, _ = draw(st.sampled_from(found))
            at, fmt = _length_field(bytes(data), start)
            value = draw(LENGTHS) & (0xFFFF if fmt == "<H" else 0xFFFFFFFF)
            if at + struct.calcsize(fmt) <= len(data):
                struct.pack_into(fmt, data, at, value)
        elif kind == "truncate":
            del data[draw(st.integers(0, max(len(data) - 1, 0))) :]
        elif kind == "flip" and data:
            # Mostly in the header, where the identifying elements are.
            at = draw(st.integers(0, min(len(data), 2048) - 1))
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "swap" and len(found) > 2:
            # Two neighbouring elements in the wrong order.
            i = draw(st.integers(0, len(found) - 2))
            (_, a, _, b_start), (_, _, _, b_end) = found[i], found[i + 1]
            if b_end <= len(data):
                first, second = bytes(data[a:b_start]), bytes(data[b_start:b_end])
                data[a:b_end] = second + first
        elif kind == "uid":
            for tag, _, value_start, end in found:
                if tag in (0x00080018, 0x0020000D, 0x00100020) and end <= len(data):
                    noise = draw(st.binary(min_size=end - value_start, max_size=end - value_start))
                    data[value_start:end] = noise
                    break
        elif kind == "syntax":
            # The same bytes announced in another syntax's presentation context.
            syntax = draw(st.sampled_from(list(SYNTAX_CONTEXTS)))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=64))
    dataset = bytes(data)
    if syntax == DEFLATED_LE and draw(st.booleans()):
        dataset = deflate(dataset)
    return Instance(dataset, base.sop_class_uid, base.sop_instance_uid, syntax)


# The presentation contexts tests.fuzz.dimse.association_request proposes for CT storage.
SYNTAX_CONTEXTS = {EXPLICIT_LE: 3, IMPLICIT_LE: 5, EXPLICIT_BE: 7, DEFLATED_LE: 9}


def deflate(data: bytes) -> bytes:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return squeeze.compress(data) + squeeze.flush()


def deflate_bomb(header: bytes, pixel_bytes: int) -> bytes:
    """A deflated dataset: ``header``, then pixel data of ``pixel_bytes`` zeros, compressed
    as it is made (the zeros never exist whole, here)."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [squeeze.compress(header)]
    parts.append(squeeze.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)))
    zeros = bytes(1 << 20)
    for chunk in _sizes(pixel_bytes, len(zeros)):
        parts.append(squeeze.compress(zeros[:chunk]))
    parts.append(squeeze.flush())
    return b"".join(parts)


def _sizes(total: int, step: int) -> Iterator[int]:
    while total > 0:
        yield min(step, total)
        total -= step

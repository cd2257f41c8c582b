"""Patient identity reconciliation: a receiving PACS files a foreign instance under a local
identity, never under the sender's patient ID.

The hub keeps the instance as it was sent. The receiving gateway rewrites a copy just before
delivering it: PatientID, IssuerOfPatientID, AccessionNumber and OtherPatientIDsSequence change
(and SpecificCharacterSet, only if a new value cannot be written without it); every other data
element keeps its exact bytes, so UIDs, private tags and pixel data reach the PACS as sent.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import secrets
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from imagebridge.dicom.part10 import BadDataset, file_meta
from imagebridge.nhs import normalise_nhs_number
from imagebridge.settings import Reconciliation

SPECIFIC_CHARACTER_SET = 0x00080005
ACCESSION_NUMBER = 0x00080050
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
OTHER_PATIENT_IDS_SEQUENCE = 0x00101002
RECONCILED_TAGS = frozenset(
    {ACCESSION_NUMBER, PATIENT_ID, ISSUER_OF_PATIENT_ID, OTHER_PATIENT_IDS_SEQUENCE}
)

_LO_MAX = 64  # PatientID, IssuerOfPatientID
_SH_MAX = 16  # AccessionNumber
_ASCII_CHARSETS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
# The identity lives in groups 0008 and 0010; everything after them is copied as it is.
_LAST_REWRITTEN_GROUP = 0x0010


@dataclass(frozen=True)
class Reconciled:
    """The identity an instance gets at the receiving institution, and where it came from."""

    patient_id: str
    issuer_of_patient_id: str
    accession_number: str
    matched: bool  # True if the NHS number mapped to a local MRN
    nhs_number: str | None
    original_patient_id: str
    # The sender's issuer, or the sender's code if the instance named none: the original ID
    # is only meaningful together with who issued it.
    original_issuer: str


def find_nhs_number(ds: Dataset, policy: Reconciliation) -> str | None:
    """The patient's NHS number, if the dataset carries a valid one.

    Looked for, in order: the tag ``policy.nhs_number_tag`` names (if any), then an
    OtherPatientIDsSequence item issued by ``policy.nhs_number_issuer``, then PatientID if
    that issuer issued it. The policy is the receiver's but the senders vary, so a configured
    tag that is empty here does not hide the standard places.
    """
    candidates: list[str] = []
    if policy.nhs_number_tag:
        candidates += _values(ds, _parse_tag(policy.nhs_number_tag))
    issuer = policy.nhs_number_issuer.strip()
    # Without an issuer to match, any 10-digit ID with a lucky check digit would pass.
    if issuer:
        for item in ds.get("OtherPatientIDsSequence") or ():
            if _text(item, "IssuerOfPatientID") == issuer:
                candidates.append(_text(item, "PatientID"))
        if _text(ds, "IssuerOfPatientID") == issuer:
            candidates.append(_text(ds, "PatientID"))
    for candidate in candidates:
        if (nhs_number := normalise_nhs_number(candidate)) is not None:
            return nhs_number
    return None


def plan(
    ds: Dataset,
    *,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: Callable[[str], str | None],
) -> Reconciled:
    """Decide the local identity of ``ds`` without changing it."""
    original_id = _text(ds, "PatientID")
    nhs_number = find_nhs_number(ds, policy)
    mrn = mrn_lookup(nhs_number) if nhs_number else None
    if mrn:
        patient_id = mrn
    else:
        # Unmatched IDs stay recognisably foreign, so the PACS cannot merge them into one of
        # its own patients; the cut to 64 characters is the LO limit.
        patient_id = policy.unmatched_format.format(sender=sender_code, patient_id=original_id)
        patient_id = patient_id[:_LO_MAX]
    prefix = policy.accession_prefix.format(sender=sender_code)
    return Reconciled(
        patient_id=patient_id,
        issuer_of_patient_id=policy.issuer_of_patient_id or receiver_code,
        accession_number=_prefixed_accession(_text(ds, "AccessionNumber"), prefix),
        matched=bool(mrn),
        nhs_number=nhs_number,
        original_patient_id=original_id,
        original_issuer=_text(ds, "IssuerOfPatientID") or sender_code,
    )


def _prefixed_accession(original: str, prefix: str) -> str:
    """``prefix + original`` within the 16 characters of SH.

    When too long, the prefix (where the study came from) and the *last* characters of the
    original are kept: accession numbers usually end in their most specific part, a running
    count, while their start is a constant site or year code. A prefix of 16 characters or
    more leaves only the prefix, cut to 16.
    """
    if not original:
        return ""  # no accession to disambiguate; an invented one would match nothing
    room = _SH_MAX - len(prefix)
    if room <= 0:
        return prefix[:_SH_MAX]
    return prefix + original[-room:]


def apply(ds: Dataset, r: Reconciled) -> None:
    """Give ``ds`` the identity ``r``, keeping the original in OtherPatientIDsSequence."""
    _ensure_character_set(ds, r)
    ds.PatientID = r.patient_id
    ds.IssuerOfPatientID = r.issuer_of_patient_id
    if r.accession_number or "AccessionNumber" in ds:
        ds.AccessionNumber = r.accession_number
    original = (r.original_patient_id, r.original_issuer)
    if not r.original_patient_id or original == (r.patient_id, r.issuer_of_patient_id):
        return
    if "OtherPatientIDsSequence" not in ds:
        ds.OtherPatientIDsSequence = Sequence()
    items: Sequence = ds.OtherPatientIDsSequence
    if any((_text(i, "PatientID"), _text(i, "IssuerOfPatientID")) == original for i in items):
        return
    item = Dataset()
    item.PatientID = r.original_patient_id
    item.IssuerOfPatientID = r.original_issuer
    item.TypeOfPatientID = "TEXT"
    items.append(item)


def reconcile_file(
    src: Path,
    dst: Path,
    *,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: Callable[[str], str | None],
) -> Reconciled:
    """Write to ``dst`` a copy of the Part 10 file ``src`` with the patient identity reconciled.

    Only the start of the dataset (groups 0008 and 0010, plus the NHS number tag if one is
    configured) is parsed and re-encoded; the rest of the file, pixel data included, is
    copied from ``src`` without being decoded. A deflated dataset is inflated, rewritten the
    same way and deflated again. ``dst`` appears complete or not at all.

    Raises BadDataset if ``src`` is not a readable Part 10 file, including one whose data
    elements are not in ascending tag order: a second PatientID further on could otherwise
    reach the PACS unreconciled.
    """
    with open(src, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise BadDataset("not a DICOM Part 10 file") from exc
        with buf:
            meta, start = _read_meta(buf)
            syntax = UID(meta.get(0x00020010, ""))
            if not syntax.is_transfer_syntax:
                raise BadDataset(f"unsupported transfer syntax {syntax!r}")
            meta_bytes = file_meta(meta.get(0x00020002, ""), meta.get(0x00020003, ""), syntax)
            if syntax.is_deflated:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                try:
                    body = inflater.decompress(buf[start:])
                except zlib.error as exc:
                    raise BadDataset("unreadable deflated dataset") from exc
                if not inflater.eof:
                    raise BadDataset("dataset truncated")
                head, rest, result = _rewrite(
                    body, 0, syntax, sender_code, receiver_code, policy, mrn_lookup
                )
                deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
                deflated = deflater.compress(head) + deflater.compress(body[rest:])
                deflated += deflater.flush()
                # PS3.5 A.5: the deflated stream is padded to an even length.
                _write_atomically(dst, meta_bytes + deflated + b"\x00" * (len(deflated) % 2))
            else:
                head, rest, result = _rewrite(
                    buf, start, syntax, sender_code, receiver_code, policy, mrn_lookup
                )
                _write_atomically(dst, meta_bytes + head, buf, fh.fileno(), rest)
    return result


def _rewrite(
    buf: bytes | mmap.mmap,
    start: int,
    syntax: UID,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: Callable[[str], str | None],
) -> tuple[bytes, int, Reconciled]:
    """The reconciled bytes replacing ``buf[start:rest]``, ``rest``, and the plan applied."""
    order = "<" if syntax.is_little_endian else ">"
    implicit = syntax.is_implicit_VR
    elements = _walk(buf, start, order, implicit)
    rest = next((s for tag, s, _ in elements if tag >> 16 > _LAST_REWRITTEN_GROUP), None)
    if rest is None:
        rest = elements[-1][2] if elements else start

    # Parse only what the plan reads; pydicom parsing the whole header costs more than the
    # entire rest of the rewrite.
    wanted = {SPECIFIC_CHARACTER_SET, *RECONCILED_TAGS}
    if policy.nhs_number_tag:
        wanted.add(int(_parse_tag(policy.nhs_number_tag)))
    subset = b"".join(buf[s:e] for tag, s, e in elements if tag in wanted)
    ds = read_dataset(io.BytesIO(subset), implicit, syntax.is_little_endian)
    charset_before = _character_set(ds)
    result = plan(
        ds,
        sender_code=sender_code,
        receiver_code=receiver_code,
        policy=policy,
        mrn_lookup=mrn_lookup,
    )
    apply(ds, result)

    parts = {tag: buf[s:e] for tag, s, e in elements if s < rest and tag not in RECONCILED_TAGS}
    new_tags = set(RECONCILED_TAGS)
    if _character_set(ds) != charset_before:
        new_tags.add(SPECIFIC_CHARACTER_SET)
    for tag in new_tags:
        if tag in ds:
            parts[tag] = _encode(ds.get_item(tag), implicit, order, _character_set(ds))
    # Retired group lengths are kept where a sender wrote them, but must count the new values.
    for group in {tag >> 16 for tag in new_tags}:
        if (length_tag := group << 16) in parts:
            length = sum(len(v) for t, v in parts.items() if t >> 16 == group and t != length_tag)
            parts[length_tag] = _encode(DataElement(length_tag, "UL", length), implicit, order)
    return b"".join(parts[tag] for tag in sorted(parts)), rest, result


def _encode(
    elem: DataElement | RawDataElement, implicit: bool, order: str, charset: Iterable[str] = ()
) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = order == "<"
    write_data_element(fp, elem, list(charset) or None)
    return fp.getvalue()


# Data element framing (PS3.5 7.1), enough to find each element's bytes without decoding.

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double, integer
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _walk(
    buf: bytes | mmap.mmap, pos: int, order: str, implicit: bool
) -> list[tuple[int, int, int]]:
    """(tag, start, end) of each top-level element from ``pos`` to the pixel data."""
    elements: list[tuple[int, int, int]] = []
    previous = -1
    size = len(buf)
    try:
        while pos < size:
            group, elem = struct.unpack_from(order + "HH", buf, pos)
            tag = group << 16 | elem
            if tag in _PIXEL_DATA:
                break
            if tag <= previous:
                raise BadDataset(f"data element ({group:04X},{elem:04X}) out of order")
            end = _element_end(buf, pos, order, implicit)
            elements.append((tag, pos, end))
            previous, pos = tag, end
    except struct.error as exc:
        raise BadDataset("dataset truncated") from exc
    return elements


def _element_end(buf: bytes | mmap.mmap, pos: int, order: str, implicit: bool) -> int:
    vr = buf[pos + 4 : pos + 6]
    # Like pydicom, accept an implicit-VR element inside an explicit-VR dataset.
    if implicit or not (vr.isalpha() and vr.isupper()):
        (length,) = struct.unpack_from(order + "I", buf, pos + 4)
        pos += 8
    elif vr in _LONG_VRS:
        (length,) = struct.unpack_from(order + "I", buf, pos + 8)
        pos += 12
    else:
        (length,) = struct.unpack_from(order + "H", buf, pos + 6)
        pos += 8
    end = _items_end(buf, pos, order, implicit) if length == _UNDEFINED else pos + length
    if end > len(buf):
        raise BadDataset("dataset truncated")
    return end


def _items_end(buf: bytes | mmap.mmap, pos: int, order: str, implicit: bool) -> int:
    """Where an undefined-length value (items, then a sequence delimiter) ends."""
    while True:
        group, elem, length = struct.unpack_from(order + "HHI", buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise BadDataset("malformed sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        while struct.unpack_from(order + "HH", buf, pos) != (0xFFFE, 0xE00D):
            pos = _element_end(buf, pos, order, implicit)
        pos += 8  # the item delimiter


def _read_meta(buf: mmap.mmap) -> tuple[dict[int, str], int]:
    """The file meta UIDs by tag, and where the dataset starts."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise BadDataset("not a DICOM Part 10 file")
    meta: dict[int, str] = {}
    pos = 132
    try:
        while pos < len(buf):
            group, elem = struct.unpack_from("<HH", buf, pos)
            if group != 0x0002:
                break
            end = _element_end(buf, pos, "<", False)
            if elem in (0x0002, 0x0003, 0x0010):
                raw = buf[pos + 8 : end]  # UI: an 8-byte explicit VR header
                meta[0x00020000 | elem] = raw.rstrip(b"\x00 ").decode("ascii", "replace")
            pos = end
    except struct.error as exc:
        raise BadDataset("file meta truncated") from exc
    for elem, name in ((0x0002, "SOP class"), (0x0003, "SOP instance"), (0x0010, "syntax")):
        if not meta.get(0x00020000 | elem):
            raise BadDataset(f"file meta lacks the {name} UID")
    return meta, pos


def _write_atomically(
    dst: Path, head: bytes, src: mmap.mmap | None = None, src_fd: int = -1, offset: int = 0
) -> None:
    """``head`` then ``src[offset:]`` into ``dst``, through a temporary file and a rename."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_all(fd, head)
            if src is not None:
                _copy(src, src_fd, fd, offset)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy(src: mmap.mmap, src_fd: int, fd: int, offset: int) -> None:
    """The bytes from ``offset`` on, in the kernel where it can (no copy through Python)."""
    count = len(src) - offset
    if hasattr(os, "sendfile"):
        try:
            while count > 0:
                sent = os.sendfile(fd, src_fd, offset, count)
                if sent == 0:
                    raise BadDataset("source file shrank while being copied")
                offset += sent
                count -= sent
        except OSError as exc:  # file-to-file sendfile is Linux only
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP):
                raise
    if count > 0:
        _write_all(fd, src[offset:])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# Reading values.


@lru_cache(maxsize=16)
def _parse_tag(text: str) -> BaseTag:
    """A tag written as "0010,1000", "(0010,1000)", "00101000" or a keyword."""
    value = text.strip().strip("()").replace(" ", "")
    try:
        if "," in value:
            group, elem = value.split(",")
            return Tag(int(group, 16), int(elem, 16))
        return Tag(value)
    except ValueError as exc:
        raise ValueError(f"nhs_number_tag {text!r} is not a DICOM tag or keyword") from exc


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _values(ds: Dataset, tag: BaseTag) -> list[str]:
    """The string values of an element, without converting it in place (keeping it raw)."""
    elem = ds.get_item(tag)
    if elem is None:
        return []
    if isinstance(elem, RawDataElement):
        elem = convert_raw_data_element(elem, ds=ds)
    value: Any = elem.value
    if isinstance(value, bytes):  # e.g. a private tag read in implicit VR: UN
        value = value.decode("latin-1").split("\\")
    if not isinstance(value, list | MultiValue):
        value = [value]
    return [str(v).strip(" \x00") for v in value if isinstance(v, str | int)]


def _character_set(ds: Dataset) -> list[str]:
    """The dataset's SpecificCharacterSet defined terms ([] if absent), read without
    converting the element, so that an unchanged one keeps its bytes."""
    elem = ds.get_item(SPECIFIC_CHARACTER_SET)
    if elem is None or elem.value is None:
        return []
    value: Any = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, str):
        value = [value]
    return [str(term).strip(" \x00") for term in value]


def _ensure_character_set(ds: Dataset, r: Reconciled) -> None:
    """Make sure the dataset's character set can encode the new values.

    IDs are nearly always ASCII, which every character set encodes: then nothing changes.
    """
    values = (
        r.patient_id,
        r.issuer_of_patient_id,
        r.accession_number,
        r.original_patient_id,
        r.original_issuer,
    )
    if all(v.isascii() for v in values):
        return
    terms = _character_set(ds)
    if all(term in _ASCII_CHARSETS for term in terms):
        # UTF-8 leaves ASCII unchanged, so the other values (written in ASCII) still read
        # the same while the new ones become representable.
        ds.SpecificCharacterSet = "ISO_IR 192"
        return
    codecs = convert_encodings(terms)
    if not all(_encodable(ch, codecs) for v in values for ch in v):
        raise ValueError(f"a reconciled value cannot be written in character set {terms}")


def _encodable(ch: str, codecs: Iterable[str]) -> bool:
    for codec in codecs:
        try:
            ch.encode(codec)
        except (UnicodeError, LookupError):
            continue
        return True
    return False

"""Patient identity reconciliation: a receiving PACS files a foreign instance under a local
identity, never under the sender's patient ID.

The hub keeps the instance as it was sent. The receiving gateway rewrites a copy just before
delivering it: PatientID, IssuerOfPatientID, AccessionNumber and OtherPatientIDsSequence change
(and SpecificCharacterSet, only if a new value cannot be written without it); every other data
element keeps its exact bytes, so UIDs, private tags and pixel data reach the PACS as sent.

``plan`` and ``apply`` work on a pydicom Dataset. ``reconcile_file`` makes the same decisions
and the same changes directly on the file's bytes: pydicom takes longer to parse a CT header
than the whole rewrite may take, and re-encoding parsed elements would risk their bytes.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import secrets
import struct
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import TEXT_VR_DELIMS

from imagebridge.dicom.part10 import (
    LONG_VRS,
    SPECIFIC_CHARACTER_SET,
    UNDEFINED_LENGTH,
    BadDataset,
    Meta,
    file_meta,
    read_meta,
    sequence_items,
    walk,
)
from imagebridge.nhs import normalise_nhs_number
from imagebridge.settings import Reconciliation

ACCESSION_NUMBER = 0x00080050
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
TYPE_OF_PATIENT_ID = 0x00100022
OTHER_PATIENT_IDS_SEQUENCE = 0x00101002
RECONCILED_TAGS = frozenset(
    {ACCESSION_NUMBER, PATIENT_ID, ISSUER_OF_PATIENT_ID, OTHER_PATIENT_IDS_SEQUENCE}
)

_LO_MAX = 64  # PatientID, IssuerOfPatientID
_SH_MAX = 16  # AccessionNumber
_ASCII_CHARSETS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_UTF8 = "ISO_IR 192"
_Buffer = bytes | mmap.mmap


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
    # means nothing without who issued it.
    original_issuer: str
    # Why the local MRN of the NHS number was not used ("" if it was, or there is none): the
    # receiving institution's records give the patient another birth date or sex.
    identity_mismatch: str = ""


@dataclass(frozen=True)
class LocalPatient:
    """A local MRN with what the receiving institution's records say of its patient."""

    patient_id: str
    issuer: str = ""  # the MRN's issuer, if known
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""


# NHS number -> local MRN: a bare MRN (a static map) or one with its demographics (the
# patient index), checked against the instance's before it is used.
MrnLookup = Callable[[str], "str | LocalPatient | None"]
PATIENT_BIRTH_DATE = 0x00100030
PATIENT_SEX = 0x00100040


# The decisions, shared by the Dataset functions and the byte-level rewrite.


def _pick_nhs_number(
    tagged: Iterable[str],
    others: Iterable[tuple[str, str]],
    primary: tuple[str, str],
    policy: Reconciliation,
) -> str | None:
    """The first valid NHS number among the configured tag's values, the Other Patient IDs
    (ID, issuer) issued by the NHS issuer, and the primary (ID, issuer) if the NHS issued it."""
    candidates = list(tagged)
    issuer = policy.nhs_number_issuer.strip()
    # Without an issuer to match, any 10-digit ID with a lucky check digit would pass.
    if issuer:
        candidates += [patient_id for patient_id, by in others if by == issuer]
        if primary[1] == issuer:
            candidates.append(primary[0])
    for candidate in candidates:
        if (nhs_number := normalise_nhs_number(candidate)) is not None:
            return nhs_number
    return None


def _decide(
    original_id: str,
    original_issuer: str,
    accession: str,
    nhs_number: str | None,
    *,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: MrnLookup,
    birth_date: str = "",
    sex: str = "",
) -> Reconciled:
    found = mrn_lookup(nhs_number) if nhs_number else None
    local = LocalPatient(found) if isinstance(found, str) else found
    mismatch = _mismatch(local, birth_date, sex) if local else ""
    mrn = local.patient_id if local and not mismatch else ""
    if mrn:
        patient_id = mrn
    else:
        # Unmatched IDs stay recognisably foreign, so the PACS cannot merge them into one of
        # its own patients; cut to the 64 characters of LO.
        patient_id = policy.unmatched_format.format(sender=sender_code, patient_id=original_id)
        patient_id = patient_id[:_LO_MAX]
    prefix = policy.accession_prefix.format(sender=sender_code)
    return Reconciled(
        patient_id=patient_id,
        issuer_of_patient_id=policy.issuer_of_patient_id
        or (local.issuer if local and mrn else "")
        or receiver_code,
        accession_number=_prefixed_accession(accession, prefix),
        matched=bool(mrn),
        nhs_number=nhs_number,
        original_patient_id=original_id,
        original_issuer=original_issuer or sender_code,
        identity_mismatch=mismatch,
    )


def _mismatch(local: LocalPatient, birth_date: str, sex: str) -> str:
    """Why the instance's patient may not be the local MRN's ("" if nothing says so)."""
    if local.birth_date and birth_date and local.birth_date != birth_date:
        return "birth date differs"
    if local.sex and sex and local.sex.upper() != sex.upper():
        return "sex differs"
    return ""


def _prefixed_accession(original: str, prefix: str) -> str:
    """``prefix + original`` within the 16 characters of SH.

    When too long, the prefix (where the study came from) and the *last* characters of the
    original are kept: accession numbers usually end in their most specific part, a running
    count, and start with a constant site or year code. A prefix of 16 characters or more
    leaves only the prefix, cut to 16.
    """
    if not original:
        return ""  # nothing to tell apart; an invented accession would match no order
    room = _SH_MAX - len(prefix)
    return prefix[:_SH_MAX] if room <= 0 else prefix + original[-room:]


def _original_item_needed(r: Reconciled, others: Iterable[tuple[str, str]]) -> bool:
    """Whether OtherPatientIDsSequence still lacks the original (ID, issuer)."""
    original = (r.original_patient_id, r.original_issuer)
    return (
        bool(r.original_patient_id)
        and original != (r.patient_id, r.issuer_of_patient_id)
        and original not in others
    )


def _character_set_for(r: Reconciled, terms: list[str]) -> list[str]:
    """The SpecificCharacterSet terms to write the new values in: ``terms`` if they can.

    IDs are nearly always ASCII, which every character set encodes; then nothing changes.
    """
    values = (
        r.patient_id,
        r.issuer_of_patient_id,
        r.accession_number,
        r.original_patient_id,
        r.original_issuer,
    )
    if all(value.isascii() for value in values):
        return terms
    if all(term in _ASCII_CHARSETS for term in terms):
        # UTF-8 leaves ASCII unchanged: the other values still read the same.
        return [_UTF8]
    codecs = convert_encodings(terms)
    if not all(_encodable(ch, codecs) for value in values for ch in value):
        raise ValueError(f"a reconciled value cannot be written in character set {terms}")
    return terms


def _encodable(ch: str, codecs: Iterable[str]) -> bool:
    for codec in codecs:
        try:
            ch.encode(codec)
        except (UnicodeError, LookupError):
            continue
        return True
    return False


# The Dataset functions.


def find_nhs_number(ds: Dataset, policy: Reconciliation) -> str | None:
    """The patient's NHS number, if the dataset carries a valid one.

    Looked for, in order: the tag ``policy.nhs_number_tag`` names (if any), then an
    OtherPatientIDsSequence item issued by ``policy.nhs_number_issuer``, then PatientID if
    that issuer issued it. The policy is the receiver's but senders differ, so a configured
    tag that is empty in this instance does not hide the standard places.
    """
    tag = policy.nhs_number_tag
    return _pick_nhs_number(
        _values(ds, _parse_tag(tag)) if tag else (),
        _other_ids(ds),
        (_text(ds, "PatientID"), _text(ds, "IssuerOfPatientID")),
        policy,
    )


def plan(
    ds: Dataset,
    *,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: MrnLookup,
) -> Reconciled:
    """Decide the local identity of ``ds`` without changing it."""
    return _decide(
        _text(ds, "PatientID"),
        _text(ds, "IssuerOfPatientID"),
        _text(ds, "AccessionNumber"),
        find_nhs_number(ds, policy),
        sender_code=sender_code,
        receiver_code=receiver_code,
        policy=policy,
        mrn_lookup=mrn_lookup,
        birth_date=_text(ds, "PatientBirthDate"),
        sex=_text(ds, "PatientSex"),
    )


def plan_values(
    patient_id: str,
    issuer: str,
    accession: str,
    nhs_number: str,
    *,
    birth_date: str,
    sex: str,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: MrnLookup,
) -> Reconciled:
    """``plan`` for an identity already held as values, as a query's match is: the same
    decision, without a dataset built for it (a C-FIND may answer a thousand matches).
    ``nhs_number`` is one the sender's records hold (or ""), as if in OtherPatientIDsSequence."""
    others = [(nhs_number, policy.nhs_number_issuer)] if nhs_number else []
    return _decide(
        patient_id.strip(),
        issuer.strip(),
        accession.strip(),
        _pick_nhs_number((), others, (patient_id.strip(), issuer.strip()), policy),
        sender_code=sender_code,
        receiver_code=receiver_code,
        policy=policy,
        mrn_lookup=mrn_lookup,
        birth_date=birth_date.strip(),
        sex=sex.strip(),
    )


def apply(ds: Dataset, r: Reconciled) -> None:
    """Give ``ds`` the identity ``r``, keeping the original in OtherPatientIDsSequence."""
    terms = _character_set(ds)
    if (new_terms := _character_set_for(r, terms)) != terms:
        ds.SpecificCharacterSet = new_terms[0] if len(new_terms) == 1 else new_terms
    ds.PatientID = r.patient_id
    ds.IssuerOfPatientID = r.issuer_of_patient_id
    if r.accession_number or "AccessionNumber" in ds:
        ds.AccessionNumber = r.accession_number
    if not _original_item_needed(r, _other_ids(ds)):
        return
    item = Dataset()
    item.PatientID = r.original_patient_id
    item.IssuerOfPatientID = r.original_issuer
    item.TypeOfPatientID = "TEXT"
    if "OtherPatientIDsSequence" in ds:
        ds.OtherPatientIDsSequence.append(item)
    else:
        ds.OtherPatientIDsSequence = Sequence([item])


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _other_ids(ds: Dataset) -> list[tuple[str, str]]:
    items = ds.get("OtherPatientIDsSequence") or ()
    return [(_text(item, "PatientID"), _text(item, "IssuerOfPatientID")) for item in items]


def _values(ds: Dataset, tag: BaseTag) -> list[str]:
    """The values of an element as text, leaving the element itself unconverted."""
    elem = ds.get_item(tag)
    if elem is None:
        return []
    if isinstance(elem, RawDataElement):
        elem = convert_raw_data_element(elem, ds=ds)
    value: Any = elem.value
    if isinstance(value, bytes):  # a private tag read in implicit VR is UN
        value = value.decode("latin-1").split("\\")
    if not isinstance(value, list | MultiValue):
        value = [value]
    return [str(v).strip(" \x00") for v in value if isinstance(v, str | int)]


def _character_set(ds: Dataset) -> list[str]:
    """The SpecificCharacterSet terms ([] if absent), leaving the element unconverted."""
    elem = ds.get_item(SPECIFIC_CHARACTER_SET)
    if elem is None or elem.value is None:
        return []
    value: Any = elem.value
    if isinstance(value, bytes):
        return _terms(value)
    return [value] if isinstance(value, str) else [str(term) for term in value]


def _terms(value: bytes) -> list[str]:
    return [term.strip(" \x00") for term in value.decode("ascii", "replace").split("\\")]


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


# The file rewrite.


@dataclass(frozen=True)
class Rewritten:
    """A reconciled dataset: ``head``, then the source file's bytes from ``offset`` on.

    Only the start of a dataset changes, so a deliverer sends these bytes followed by the
    rest of the file as it is, rather than writing a reconciled copy first.
    """

    result: Reconciled
    meta: Meta  # the source's file meta
    head: bytes
    offset: int


def reconcile_dataset(
    src: Path,
    *,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: MrnLookup,
) -> Rewritten:
    """The Part 10 file ``src``'s dataset with the patient identity reconciled.

    In the dataset only groups 0008 and 0010 are rebuilt, from their original element bytes
    and the new values; the rest, pixel data included, is walked but not read. A deflated
    dataset is inflated, rewritten the same way and deflated again, wholly into ``head``.

    Raises BadDataset if ``src`` is not a readable Part 10 file, including one whose data
    elements are out of order or repeated: a second PatientID further on would otherwise
    reach the PACS unreconciled.
    """
    with open(src, "rb") as fh:
        meta = read_meta(fh)
        start = meta.dataset_offset
        syntax = UID(meta.transfer_syntax_uid)
        if not syntax.is_transfer_syntax:
            raise BadDataset(f"unsupported transfer syntax {syntax}")
        size = fh.seek(0, io.SEEK_END)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reconcile = _Rewrite(syntax, sender_code, receiver_code, policy, mrn_lookup)
            if not syntax.is_deflated:
                head, rest = reconcile(buf, start)
                return Rewritten(reconcile.result, meta, head, rest)
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                body = inflater.decompress(buf[start:])
            except zlib.error as exc:
                raise BadDataset("unreadable deflated dataset") from exc
            if not inflater.eof:
                raise BadDataset("dataset truncated")
    head, rest = reconcile(body, 0)
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = deflater.compress(head) + deflater.compress(body[rest:]) + deflater.flush()
    # PS3.5 A.5: an odd-length deflated stream gets one padding byte.
    return Rewritten(reconcile.result, meta, deflated + b"\x00" * (len(deflated) % 2), size)


def reconcile_file(
    src: Path,
    dst: Path,
    *,
    sender_code: str,
    receiver_code: str,
    policy: Reconciliation,
    mrn_lookup: MrnLookup,
) -> Reconciled:
    """Write to ``dst`` a copy of the Part 10 file ``src`` with the patient identity reconciled.

    The file meta is ImageBridge's own (``file_meta``) for the same SOP instance and transfer
    syntax; the dataset is ``reconcile_dataset``'s, its unchanged part copied by the kernel
    without being read into Python. ``dst`` appears complete or not at all.
    """
    rewritten = reconcile_dataset(
        src,
        sender_code=sender_code,
        receiver_code=receiver_code,
        policy=policy,
        mrn_lookup=mrn_lookup,
    )
    meta = rewritten.meta
    meta_bytes = file_meta(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax_uid)
    with open(src, "rb") as fh:
        _write_atomically(dst, meta_bytes + rewritten.head, fh.fileno(), rewritten.offset)
    return rewritten.result


class _Rewrite:
    """Rebuilds the start of one encoded dataset with the reconciled identity."""

    def __init__(
        self,
        syntax: UID,
        sender_code: str,
        receiver_code: str,
        policy: Reconciliation,
        mrn_lookup: MrnLookup,
    ) -> None:
        self.order = "<" if syntax.is_little_endian else ">"
        self.implicit = syntax.is_implicit_VR
        self.sender_code = sender_code
        self.receiver_code = receiver_code
        self.policy = policy
        self.mrn_lookup = mrn_lookup
        self.nhs_tag = int(_parse_tag(policy.nhs_number_tag)) if policy.nhs_number_tag else None
        self.result: Reconciled

    def __call__(self, buf: _Buffer, start: int) -> tuple[bytes, int]:
        """The new bytes for ``buf[start:rest]``, and ``rest``: where the copy resumes."""
        elements = walk(buf, start, self.order, self.implicit)
        # Groups 0008 and 0010 are rebuilt; the copy resumes at the first element after them.
        after = bisect_left(elements, 0x00110000, key=itemgetter(0))
        head = elements[:after]
        rest = elements[after][1] if after < len(elements) else len(buf)
        found = {tag: (s, v, e) for tag, s, v, e in head}
        if self.nhs_tag is not None and self.nhs_tag not in found:
            at = bisect_left(elements, self.nhs_tag, key=itemgetter(0))
            if at < len(elements) and elements[at][0] == self.nhs_tag:
                found[self.nhs_tag] = elements[at][1:]
        charset = found.get(SPECIFIC_CHARACTER_SET)
        terms = _terms(buf[charset[1] : charset[2]]) if charset else []
        codecs = convert_encodings(terms or None)

        def text(tag: int | None, where: dict[int, tuple[int, int, int]] = found) -> str:
            bounds = where.get(tag) if tag is not None else None
            return _decode(buf[bounds[1] : bounds[2]], codecs) if bounds else ""

        sequence = found.get(OTHER_PATIENT_IDS_SEQUENCE)
        items = sequence_items(buf, *sequence, self.order, self.implicit) if sequence else []
        others = [(text(PATIENT_ID, item), text(ISSUER_OF_PATIENT_ID, item)) for item in items]
        primary = (text(PATIENT_ID), text(ISSUER_OF_PATIENT_ID))
        tagged = text(self.nhs_tag).split("\\") if self.nhs_tag is not None else []
        r = self.result = _decide(
            *primary,
            text(ACCESSION_NUMBER),
            _pick_nhs_number(tagged, others, primary, self.policy),
            sender_code=self.sender_code,
            receiver_code=self.receiver_code,
            policy=self.policy,
            mrn_lookup=self.mrn_lookup,
            birth_date=text(PATIENT_BIRTH_DATE),
            sex=text(PATIENT_SEX),
        )

        parts = {tag: buf[s:e] for tag, s, _, e in head}
        new_terms = _character_set_for(r, terms)
        if new_terms != terms:
            parts[SPECIFIC_CHARACTER_SET] = self._text(
                SPECIFIC_CHARACTER_SET, b"CS", "\\".join(new_terms), codecs
            )
            codecs = convert_encodings(new_terms)
        parts[PATIENT_ID] = self._text(PATIENT_ID, b"LO", r.patient_id, codecs)
        parts[ISSUER_OF_PATIENT_ID] = self._text(
            ISSUER_OF_PATIENT_ID, b"LO", r.issuer_of_patient_id, codecs
        )
        if r.accession_number or ACCESSION_NUMBER in found:
            parts[ACCESSION_NUMBER] = self._text(
                ACCESSION_NUMBER, b"SH", r.accession_number, codecs
            )
        if _original_item_needed(r, others):
            parts[OTHER_PATIENT_IDS_SEQUENCE] = self._with_original(buf, sequence, r, codecs)
        # Retired group lengths stay where a sender wrote them, but must count the new values.
        for group in (0x0008, 0x0010):
            if (length_tag := group << 16) in parts:
                counted = sum(len(v) for t, v in parts.items() if t >> 16 == group)
                counted -= len(parts[length_tag])
                packed = struct.pack(self.order + "I", counted)
                parts[length_tag] = self._element(length_tag, b"UL", packed)
        return b"".join(parts[tag] for tag in sorted(parts)), rest

    def _with_original(
        self,
        buf: _Buffer,
        sequence: tuple[int, int, int] | None,
        r: Reconciled,
        codecs: list[str],
    ) -> bytes:
        """OtherPatientIDsSequence with an item for the original ID after the existing
        items, which keep their bytes."""
        if sequence is None:
            item = self._item(r, codecs, self.implicit)
            return self._element(OTHER_PATIENT_IDS_SEQUENCE, b"SQ", item)
        start, value_start, end = sequence
        # A sequence its sender could not name the VR of is UN, its items in implicit VR.
        item = self._item(r, codecs, self.implicit or buf[start + 4 : start + 6] == b"UN")
        (length,) = struct.unpack_from(self.order + "I", buf, value_start - 4)
        if length == UNDEFINED_LENGTH:  # before the sequence delimiter
            return buf[start : end - 8] + item + buf[end - 8 : end]
        header = buf[start : value_start - 4] + struct.pack(self.order + "I", length + len(item))
        return header + buf[value_start:end] + item

    def _item(self, r: Reconciled, codecs: list[str], implicit: bool) -> bytes:
        value = (
            self._text(PATIENT_ID, b"LO", r.original_patient_id, codecs, implicit)
            + self._text(ISSUER_OF_PATIENT_ID, b"LO", r.original_issuer, codecs, implicit)
            + self._text(TYPE_OF_PATIENT_ID, b"CS", "TEXT", codecs, implicit)
        )
        return struct.pack(self.order + "HHI", 0xFFFE, 0xE000, len(value)) + value

    def _text(
        self, tag: int, vr: bytes, value: str, codecs: list[str], implicit: bool | None = None
    ) -> bytes:
        raw = value.encode("ascii") if value.isascii() else encode_string(value, codecs)
        return self._element(tag, vr, raw + b" " * (len(raw) % 2), implicit)

    def _element(self, tag: int, vr: bytes, value: bytes, implicit: bool | None = None) -> bytes:
        order = self.order
        head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
        if self.implicit if implicit is None else implicit:
            return head + struct.pack(order + "I", len(value)) + value
        if vr in LONG_VRS:
            return head + vr + struct.pack(order + "HI", 0, len(value)) + value
        return head + vr + struct.pack(order + "H", len(value)) + value


def _decode(value: bytes, codecs: list[str]) -> str:
    """Text as pydicom reads it (each value without trailing padding), VM joined by ``\\``."""
    text = value.decode("ascii") if value.isascii() else decode_bytes(value, codecs, TEXT_VR_DELIMS)
    return "\\".join(v.rstrip("\x00 ") for v in text.split("\\")).strip()


def _write_atomically(dst: Path, head: bytes, src_fd: int, offset: int) -> None:
    """``head`` then the file ``src_fd`` from ``offset`` into ``dst``, through a temporary
    file and a rename."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_all(fd, head)
            _copy(src_fd, fd, offset)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy(src_fd: int, fd: int, offset: int) -> None:
    """The file ``src_fd`` from ``offset`` into ``fd``, in the kernel where it can."""
    count = os.fstat(src_fd).st_size - offset
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
    while count > 0:
        chunk = os.pread(src_fd, min(count, 1 << 20), offset)
        if not chunk:
            raise BadDataset("source file shrank while being copied")
        _write_all(fd, chunk)
        offset += len(chunk)
        count -= len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]

"""The zip an external user downloads: the shared DICOM files, a DICOMDIR and a README.

The layout is that of DICOM media (PS3.10 file IDs, PS3.11 general purpose profile): a
DICOMDIR at the root and every file under ``DICOM/`` in folders and names of at most eight
characters from A-Z, 0-9 and _, so any DICOM viewer can open the unzipped folder as it
would a CD. The files go into the zip one at a time from disk; only their headers are
parsed, and only the directory is built in memory.

The directory records are made by pydicom's File-set record makers. The records are linked
here rather than by ``FileSet.add``, whose cost grows with the square of the number of
instances (49 s for 1,200 instances on this machine, where a share may hold thousands).
"""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset

# The record type per SOP class (PS3.3 F.5) is pydicom's choice: a long table kept up to
# date with the standard there, so its two private helpers are used rather than copied.
from pydicom.fileset import (
    DIRECTORY_RECORDERS,
    _four_level_record_type,
    _single_level_record_type,
)
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

ROOT_FOLDER = "DICOM"
FILE_SET_ID = "IMAGEBRIDGE"
README_NAME = "README.txt"
CHUNK_BYTES = 1 << 20
PREAMBLE_BYTES = 128
MAGIC = b"DICM"
# Deflate at level 1 halves an uncompressed CT as well as level 6 does, five times faster.
COMPRESS_LEVEL = 1

# Bulk values play no part in the directory records; they are emptied in the parsed header
# (never in the file) so that a large Encapsulated PDF is not held in memory to be listed.
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW"})
_BULK_BYTES = 64 * 1024
# Type 1 keys of the directory records (PS3.3 F.5) that images may lack: invented for the
# record only, as DCMTK's dcmmkdir +I does. Dates fall back to the instance's other dates.
_DATE_FALLBACKS = {
    "StudyDate": ("SeriesDate", "AcquisitionDate", "ContentDate"),
    "StudyTime": ("SeriesTime", "AcquisitionTime", "ContentTime"),
}
# The levels above an instance, the attribute that tells them apart, their folder prefix.
_LEVELS = (
    ("PATIENT", "PatientID", "PT"),
    ("STUDY", "StudyInstanceUID", "ST"),
    ("SERIES", "SeriesInstanceUID", "SE"),
)


class PackageError(ValueError):
    """An input file that cannot go into a package; the message names it by its label."""


@dataclass
class _Node:
    """A directory record and the records below it, in the order they were met."""

    record: Dataset
    name: str
    children: dict[str, _Node] = field(default_factory=dict)
    offset: int = 0


@dataclass(frozen=True)
class _Entry:
    label: str
    path: Path
    name: str  # its path in the zip


def write_package(
    files: Iterable[tuple[str, Path]],
    out: BinaryIO,
    *,
    readme: str | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> None:
    """Write a zip of ``files`` (label, Part 10 file) with a DICOMDIR to ``out``.

    Every file is checked and listed before the first byte is written, so a bad input
    raises PackageError with nothing sent. ``out`` may be a non-seekable stream. Each
    file's preamble is written as zeros, so nothing a sender hid there (an executable, in
    a "polyglot" file) reaches the user. The same SOP instance given twice is packed once.
    With ``readme``, README.txt holds that text and the list of files with their labels.
    """
    patients: dict[str, _Node] = {}
    entries: list[_Entry] = []
    seen: set[str] = set()
    for label, path in files:
        header = _directory_header(label, path, len(entries) + 1)
        if str(header.SOPInstanceUID) in seen:
            continue
        seen.add(str(header.SOPInstanceUID))
        file_id = _place(patients, header, label)
        entries.append(_Entry(label, path, "/".join(file_id)))
    if not entries:
        raise PackageError("there is nothing to package")
    directory = _dicomdir(patients)

    with zipfile.ZipFile(
        out, "w", compression=compression, compresslevel=COMPRESS_LEVEL, allowZip64=True
    ) as archive:
        archive.writestr("DICOMDIR", directory)
        if readme is not None:
            listing = "\n".join(f"{e.name}  {e.label}" for e in entries)
            archive.writestr(README_NAME, f"{readme.rstrip()}\n\nFiles:\n{listing}\n")
        for entry in entries:
            _add_file(archive, entry)


def _directory_header(label: str, path: Path, number: int) -> Dataset:
    """The header of one input, as the directory records need it."""
    try:
        with path.open("rb") as f:
            head = f.read(PREAMBLE_BYTES + len(MAGIC))
        if head[PREAMBLE_BYTES:] != MAGIC:
            raise PackageError(f"{label}: not a DICOM Part 10 file")
        header = dcmread(path, stop_before_pixels=True, defer_size=_BULK_BYTES)
        transfer_syntax = header.file_meta.get("TransferSyntaxUID")
    except PackageError:
        raise
    except Exception as exc:  # pydicom raises many kinds of error on a damaged file
        raise PackageError(f"{label}: not a readable DICOM file ({type(exc).__name__})") from exc
    if not transfer_syntax or not str(header.get("SOPInstanceUID", "") or ""):
        raise PackageError(f"{label}: the file has no transfer syntax or SOP Instance UID")
    for tag in list(header.keys()):
        raw = header.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement):
            vr = raw.VR or dictionary_VR(tag)
            if vr in _BULK_VRS and raw.length > _BULK_BYTES and raw.length != 0xFFFFFFFF:
                header[tag] = DataElement(tag, "OB" if vr == "OB or OW" else vr, b"")
    _invent_missing_keys(header, number)
    return header


def _invent_missing_keys(header: Dataset, number: int) -> None:
    for keyword, fallbacks in _DATE_FALLBACKS.items():
        if not _has_value(header, keyword):
            for other in fallbacks:
                if _has_value(header, other):
                    setattr(header, keyword, header[other].value)
                    break
    if not _has_value(header, "StudyID"):
        header.StudyID = "IB" + str(header.get("StudyInstanceUID", ""))[-14:]
    if not _has_value(header, "SeriesNumber"):
        header.SeriesNumber = 1
    if not _has_value(header, "InstanceNumber"):
        header.InstanceNumber = number


def _has_value(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and ds[keyword].VM > 0


def _place(patients: dict[str, _Node], header: Dataset, label: str) -> list[str]:
    """Add the records of one instance under ``patients``; its file ID."""
    if _single_level_record_type(header) != "PATIENT":
        raise PackageError(f"{label}: not an instance of a patient's study")
    file_id = [ROOT_FOLDER]
    level = patients
    try:
        for record_type, keyword, prefix in _LEVELS:
            key = str(header[keyword].value) if keyword in header else ""
            node = level.get(key)
            if node is None:
                record = _record(record_type, header)
                node = level[key] = _Node(record, f"{prefix}{len(level):06d}")
            file_id.append(node.name)
            level = node.children
        leaf_type = _four_level_record_type(header)
        leaf = _record(leaf_type, header)
    except (ValueError, KeyError, AttributeError) as exc:
        # pydicom wraps the reason ("The instance's ... element is missing") in advice
        # for programmers; the user needs the reason only.
        reason = str(exc).split(". See DICOM", 1)[0].rsplit(": ", 1)[-1]
        raise PackageError(f"{label}: cannot be listed in a DICOMDIR: {reason}") from exc
    name = f"{leaf_type.replace(' ', '')[:2]}{len(level):06d}"
    file_id.append(name)
    leaf.ReferencedFileID = file_id
    leaf.ReferencedSOPClassUIDInFile = header.SOPClassUID
    leaf.ReferencedSOPInstanceUIDInFile = header.SOPInstanceUID
    leaf.ReferencedTransferSyntaxUIDInFile = header.file_meta.TransferSyntaxUID
    level[str(header.SOPInstanceUID)] = _Node(leaf, name)
    return file_id


def _record(record_type: str, header: Dataset) -> Dataset:
    record = DIRECTORY_RECORDERS[record_type](header)
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = record_type
    if "SpecificCharacterSet" in header:
        record.SpecificCharacterSet = header.SpecificCharacterSet
    return record


def _dicomdir(patients: dict[str, _Node]) -> bytes:
    """The DICOMDIR file of the records under ``patients``."""
    order = list(_depth_first(patients))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = FILE_SET_ID
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = [node.record for node in order]
    # Offsets are UL, 4 bytes whatever their value: one encoding, read back, tells where
    # each record starts; the second one carries the offsets.
    first = dcmread(io.BytesIO(_encode(ds)))
    for node, item in zip(order, first.DirectoryRecordSequence, strict=True):
        node.offset = item.seq_item_tell
    _link(patients)
    roots = list(patients.values())
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = roots[0].offset
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = roots[-1].offset
    return _encode(ds)


def _depth_first(level: dict[str, _Node]) -> Iterator[_Node]:
    for node in level.values():
        yield node
        yield from _depth_first(node.children)


def _link(level: dict[str, _Node]) -> None:
    """Point each record to its next sibling and its first child, by their offsets."""
    nodes = list(level.values())
    for node, following in zip_longest(nodes, nodes[1:]):
        node.record.OffsetOfTheNextDirectoryRecord = following.offset if following else 0
        children = list(node.children.values())
        node.record.OffsetOfReferencedLowerLevelDirectoryEntity = (
            children[0].offset if children else 0
        )
        _link(node.children)


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _add_file(archive: zipfile.ZipFile, entry: _Entry) -> None:
    """Copy the entry's file into ``archive``, its preamble replaced by zeros."""
    with entry.path.open("rb") as src:
        head = src.read(PREAMBLE_BYTES + len(MAGIC))
        if head[PREAMBLE_BYTES:] != MAGIC:
            raise PackageError(f"{entry.label}: the file changed while it was being packaged")
        # ZIP64 must be chosen before the data for a file that may pass 4 GiB once stored.
        large = entry.path.stat().st_size > zipfile.ZIP64_LIMIT // 2
        with archive.open(entry.name, "w", force_zip64=large) as dst:
            dst.write(bytes(PREAMBLE_BYTES) + MAGIC)
            shutil.copyfileobj(src, dst, CHUNK_BYTES)

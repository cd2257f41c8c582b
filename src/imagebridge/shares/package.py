"""The zip an external user downloads: the shared DICOM files, a DICOMDIR and a README.

The layout is that of DICOM media (PS3.10 file IDs, PS3.11 general purpose profile): a
DICOMDIR at the root and every file under ``DICOM/`` in folders and names of at most eight
characters from A-Z, 0-9 and _, so any DICOM viewer can open the unzipped folder as it
would a CD. The files go into the zip one at a time from disk; only their headers are
parsed, and only the directory is built in memory.
"""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileInstance, FileSet

ROOT_FOLDER = "DICOM"
FILE_SET_ID = "IMAGEBRIDGE"
README_NAME = "README.txt"
CHUNK_BYTES = 1 << 20
PREAMBLE_BYTES = 128
MAGIC = b"DICM"

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


class PackageError(ValueError):
    """An input file that cannot go into a package; the message names it by its label."""


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
    file_set = FileSet()
    file_set.ID = FILE_SET_ID
    entries: list[tuple[str, Path, FileInstance]] = []
    seen: set[str] = set()
    for label, path in files:
        header = _directory_header(label, path, len(entries) + 1)
        if str(header.SOPInstanceUID) in seen:
            continue
        seen.add(str(header.SOPInstanceUID))
        try:
            instance = file_set.add(header)
        except (ValueError, KeyError, AttributeError) as exc:
            # pydicom wraps the reason ("The instance's ... element is missing") in advice
            # for programmers; the user needs the reason only.
            reason = str(exc).split(". See DICOM", 1)[0].rsplit(": ", 1)[-1]
            raise PackageError(f"{label}: cannot be listed in a DICOMDIR: {reason}") from exc
        entries.append((label, path, instance))
    if not entries:
        raise PackageError("there is nothing to package")

    names: list[str] = []
    for _, _, instance in entries:
        file_id = [ROOT_FOLDER, *Path(instance.FileID).parts]
        instance["ReferencedFileID"].value = file_id
        names.append("/".join(file_id))
    directory = _dicomdir(file_set)

    made = time.localtime()[:6]
    with zipfile.ZipFile(out, "w", compression=compression, allowZip64=True) as archive:
        archive.writestr(zipfile.ZipInfo("DICOMDIR", made), directory, compression)
        if readme is not None:
            listing = "\n".join(
                f"{name}  {label}" for name, (label, _, _) in zip(names, entries, strict=True)
            )
            text = f"{readme.rstrip()}\n\nFiles:\n{listing}\n"
            archive.writestr(zipfile.ZipInfo(README_NAME, made), text, compression)
        for name, (label, path, _) in zip(names, entries, strict=True):
            info = zipfile.ZipInfo(name, made)
            info.compress_type = compression
            _add_file(archive, info, label, path)


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


def _dicomdir(file_set: FileSet) -> bytes:
    """The DICOMDIR of ``file_set``, whose records already name the files' places."""
    buffer = io.BytesIO()
    # FileSet.write() would also copy the files under names of its own choosing; only the
    # directory is wanted here, written as FileSet.copy() writes it (records left as set).
    file_set._write_dicomdir(DicomFileLike(buffer), copy_safe=True)
    return buffer.getvalue()


def _add_file(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, path: Path) -> None:
    """Copy ``path`` into ``archive`` under ``info``, its preamble replaced by zeros."""
    with path.open("rb") as src:
        head = src.read(PREAMBLE_BYTES + len(MAGIC))
        if head[PREAMBLE_BYTES:] != MAGIC:
            raise PackageError(f"{label}: the file changed while it was being packaged")
        # A known size lets zipfile choose ZIP64 up front for a file over 4 GiB.
        info.file_size = path.stat().st_size
        with archive.open(info, "w") as dst:
            dst.write(bytes(PREAMBLE_BYTES) + MAGIC)
            shutil.copyfileobj(src, dst, CHUNK_BYTES)

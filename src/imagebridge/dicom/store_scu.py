"""Sending stored files to a DICOM node by C-STORE, as they are, over one association.

Files go as stored (no decode) when the peer accepts their transfer syntax; only when it
accepts nothing but uncompressed syntaxes for that SOP class is the file decompressed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from imagebridge.dicom.net import UNCOMPRESSED, requested_contexts
from imagebridge.dicom.part10 import BadDataset, file_meta, read_meta
from imagebridge.dicom.ul import Association, AssociationError, FileRange

log = logging.getLogger(__name__)

WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Node:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class FileToSend:
    """A stored Part 10 file's dataset; or, given ``head``, a dataset rewritten at its start:
    ``head``, then the file's bytes from ``offset`` on (see ``reconcile_dataset``)."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    head: bytes | None = None
    offset: int = 0
    sop_instance_uid: str = ""  # with ``head``: the file's meta is not read


@dataclass(frozen=True)
class StoreResult:
    outcome: str  # delivered | failed | retry
    detail: str = ""


class NodeUnavailable(ConnectionError):
    """The node could not be reached or did not accept an association: try again later."""


def _status_text(status: int, comment: str) -> str:
    return f"C-STORE status 0x{status:04X}" + (f": {comment}" if comment else "")


def store_files(
    node: Node,
    calling_ae_title: str,
    files: list[FileToSend],
    timeout: float = 60.0,
    on_result: Callable[[int, StoreResult], None] | None = None,
) -> list[StoreResult]:
    """C-STORE each file; raises NodeUnavailable if no association could be made."""
    pairs = [(f.sop_class_uid, f.transfer_syntax_uid) for f in files]
    contexts = [
        (str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
        for cx in requested_contexts(pairs)
    ]
    try:
        assoc = Association.open(
            node.host, node.port, node.ae_title, calling_ae_title, contexts, timeout
        )
    except AssociationError as exc:
        raise NodeUnavailable(str(exc)) from exc
    results: list[StoreResult] = []
    try:
        for index, f in enumerate(files):
            result = _store_one(assoc, f)
            results.append(result)
            if on_result:
                on_result(index, result)
            if not assoc.established:
                break
    finally:
        assoc.release()
    # Whatever was not attempted because the association dropped is retried later.
    results += [StoreResult("retry", "association ended")] * (len(files) - len(results))
    return results


def _store_one(assoc: Association, f: FileToSend) -> StoreResult:
    context = assoc.context_for(f.sop_class_uid, f.transfer_syntax_uid)
    try:
        if context is not None:
            with open(f.path, "rb") as fh:
                head, offset, sop_instance = f.head, f.offset, f.sop_instance_uid
                if head is None:
                    meta = read_meta(fh)
                    head, offset, sop_instance = b"", meta.dataset_offset, meta.sop_instance_uid
                rest = FileRange(fh, offset, fh.seek(0, io.SEEK_END) - offset)
                rsp = assoc.c_store(context, f.sop_class_uid, sop_instance, [head, rest])
        else:
            converted = _convert_for(assoc, f)
            if isinstance(converted, StoreResult):
                return converted
            context, sop_instance, data = converted
            rsp = assoc.c_store(context, f.sop_class_uid, sop_instance, [data])
    except AssociationError as exc:
        return StoreResult("retry", f"C-STORE not completed: {exc}")
    except (OSError, BadDataset) as exc:
        return StoreResult("failed", f"cannot read the stored file: {exc}")
    status, comment = rsp.status, rsp.error_comment
    if status == 0x0000 or status in WARNING_STATUSES:
        return StoreResult("delivered", "" if status == 0 else _status_text(status, comment))
    if (status & 0xFF00) == 0xA700:
        # Out of resources: the PACS may recover, so the instance stays queued.
        return StoreResult("retry", _status_text(status, comment))
    return StoreResult("failed", _status_text(status, comment))


def _convert_for(assoc: Association, f: FileToSend) -> tuple[int, str, bytes] | StoreResult:
    """The peer cannot take the stored syntax: re-encode this one file uncompressed."""
    for syntax in UNCOMPRESSED:
        context = assoc.context_for(f.sop_class_uid, syntax)
        if context is None:
            continue
        try:
            ds = dcmread(_part10(f))
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                # The same instance in another syntax: keep its SOP Instance UID.
                ds.decompress(generate_instance_uid=False)
            buffer = DicomBytesIO()
            buffer.is_little_endian = True
            buffer.is_implicit_VR = syntax == UNCOMPRESSED[1]
            write_dataset(buffer, ds)
        except Exception as exc:
            return StoreResult("failed", f"cannot decompress for the peer: {type(exc).__name__}")
        return context, str(ds.SOPInstanceUID), buffer.getvalue()
    return StoreResult("failed", "the peer accepts neither the SOP class nor its syntax")


def _part10(f: FileToSend) -> Path | io.BytesIO:
    """The file to read as a whole: as stored, or rebuilt in memory with its new start."""
    if f.head is None:
        return f.path
    with open(f.path, "rb") as fh:
        fh.seek(f.offset)
        rest = fh.read()
    meta = file_meta(f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax_uid)
    return io.BytesIO(meta + f.head + rest)

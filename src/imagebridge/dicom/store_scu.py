"""Sending stored files to a DICOM node by C-STORE, as they are, over one association.

Files go as stored (no decode) when the peer accepts their transfer syntax; only when it
accepts nothing but uncompressed syntaxes for that SOP class is the file decompressed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, _config

from imagebridge.dicom.net import NODELAY_HANDLERS, UNCOMPRESSED, requested_contexts

log = logging.getLogger(__name__)

# Send files without decoding them, in PDU-sized chunks (pynetdicom 2+).
_config.STORE_SEND_CHUNKED_DATASET = True

WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Node:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class FileToSend:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


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
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = requested_contexts((f.sop_class_uid, f.transfer_syntax_uid) for f in files)
    assoc = ae.associate(
        node.host,
        node.port,
        contexts=contexts,
        ae_title=node.ae_title,
        evt_handlers=NODELAY_HANDLERS,
    )
    if not assoc.is_established:
        raise NodeUnavailable("association rejected" if assoc.is_rejected else "node unreachable")
    results: list[StoreResult] = []
    try:
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        for index, f in enumerate(files):
            result = _store_one(assoc, f, accepted)
            results.append(result)
            if on_result:
                on_result(index, result)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    # Whatever was not attempted because the association dropped is retried later.
    results += [StoreResult("retry", "association ended")] * (len(files) - len(results))
    return results


def _store_one(assoc: object, f: FileToSend, accepted: set[tuple[str, str]]) -> StoreResult:
    if (f.sop_class_uid, f.transfer_syntax_uid) in accepted:
        dataset: object = f.path
    elif any((f.sop_class_uid, ts) in accepted for ts in UNCOMPRESSED):
        # The peer cannot take the stored syntax: convert this one file for it
        # (pynetdicom re-encodes between the uncompressed syntaxes itself).
        try:
            ds = dcmread(f.path)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
        except Exception as exc:
            return StoreResult("failed", f"cannot decompress for the peer: {type(exc).__name__}")
        dataset = ds
    else:
        return StoreResult("failed", "the peer accepts neither the SOP class nor its syntax")
    try:
        rsp = assoc.send_c_store(dataset)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError, AttributeError) as exc:
        return StoreResult("retry", f"C-STORE not sent: {exc}")
    status = getattr(rsp, "Status", None)
    if status is None:
        return StoreResult("retry", "no C-STORE response (timeout or abort)")
    comment = str(getattr(rsp, "ErrorComment", "") or "")
    if status == 0x0000 or status in WARNING_STATUSES:
        return StoreResult("delivered", "" if status == 0 else _status_text(status, comment))
    if (status & 0xFF00) == 0xA700:
        # Out of resources: the PACS may recover, so the instance stays queued.
        return StoreResult("retry", _status_text(status, comment))
    return StoreResult("failed", _status_text(status, comment))

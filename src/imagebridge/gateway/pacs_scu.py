"""The gateway as query/retrieve user of its own PACS: C-FIND, and C-GET or C-MOVE to the
gateway's own AE title, for the tasks the hub gives it.

Retrieved instances are written as they arrive, in the syntax the PACS sent, with the
gateway's own file meta: nothing is decoded.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association

from imagebridge.dicom.acceptor import StoreRequest
from imagebridge.dicom.net import (
    ACCEPTED_TRANSFER_SYNTAXES,
    NODELAY_HANDLERS,
    UNCOMPRESSED,
    c_store_of,
)
from imagebridge.dicom.part10 import file_meta
from imagebridge.dicom.received import Received
from imagebridge.settings import PacsQueryRetrieve

log = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
WARNING = (0x0001, 0xB000, 0xB006, 0xB007)
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# pynetdicom proposes at most 128 presentation contexts: the query/retrieve model, and the
# storage SOP classes a PACS most often holds.
STORAGE_FOR_GET = [str(cx.abstract_syntax) for cx in StoragePresentationContexts][:127]

# Query/retrieve information models (PS3.4 C.6)
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
_MODELS = {
    ("find", "PATIENT"): PATIENT_ROOT_FIND,
    ("find", "STUDY"): STUDY_ROOT_FIND,
    ("get", "PATIENT"): PATIENT_ROOT_GET,
    ("get", "STUDY"): STUDY_ROOT_GET,
    ("move", "PATIENT"): PATIENT_ROOT_MOVE,
    ("move", "STUDY"): STUDY_ROOT_MOVE,
}


class PacsError(RuntimeError):
    """The PACS could not be reached, or failed the request; the reason says which."""


@dataclass
class Fetched:
    files: list[Path]
    failed: int = 0
    warning: int = 0


def model(service: str, level: str) -> str:
    """Patient Root for patient-level requests, Study Root for the rest."""
    return _MODELS[(service, "PATIENT" if level == "PATIENT" else "STUDY")]


def _ae(calling_ae_title: str, node: PacsQueryRetrieve) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.timeout_seconds
    return ae


@contextmanager
def _association(ae: AE, node: PacsQueryRetrieve, **kwargs: Any) -> Iterator[Association]:
    handlers = [*NODELAY_HANDLERS, *kwargs.pop("evt_handlers", [])]
    assoc = ae.associate(
        node.host, node.port, ae_title=node.ae_title, evt_handlers=handlers, **kwargs
    )
    if not assoc.is_established:
        raise PacsError(f"the PACS {node.ae_title} did not accept an association")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _check(status: Dataset | None, service: str) -> int:
    if status is None or "Status" not in status:
        raise PacsError(f"{service}: no response from the PACS (timeout or abort)")
    code = int(status.Status)
    if code not in (*PENDING, SUCCESS, CANCEL, *WARNING):
        comment = str(status.get("ErrorComment", ""))
        raise PacsError(f"{service} status 0x{code:04X}" + (f": {comment}" if comment else ""))
    return code


def find(
    node: PacsQueryRetrieve, calling_ae_title: str, identifier: Dataset, limit: int
) -> list[Dataset]:
    """C-FIND; at most ``limit`` matches (the rest are read and dropped: not every PACS
    understands C-CANCEL)."""
    ae = _ae(calling_ae_title, node)
    sop_class = model("find", str(identifier.QueryRetrieveLevel))
    ae.add_requested_context(sop_class, UNCOMPRESSED)
    matches: list[Dataset] = []
    with _association(ae, node) as assoc:
        for status, found in assoc.send_c_find(identifier, sop_class):
            code = _check(status, "C-FIND")
            if code in PENDING and found is not None:
                if len(matches) < limit:
                    matches.append(found)
            elif code not in PENDING:
                break
    return matches


def fetch_by_get(
    node: PacsQueryRetrieve, calling_ae_title: str, identifier: Dataset, folder: Path
) -> Fetched:
    """C-GET: the PACS sends the instances back on the same association."""
    ae = _ae(calling_ae_title, node)
    sop_class = model("get", str(identifier.QueryRetrieveLevel))
    ae.add_requested_context(sop_class, UNCOMPRESSED)
    for storage in STORAGE_FOR_GET:
        ae.add_requested_context(storage, ACCEPTED_TRANSFER_SYNTAXES)
    roles = [build_role(storage, scp_role=True) for storage in STORAGE_FOR_GET]
    inbox = _Folder(folder)
    handlers = [(evt.EVT_C_STORE, lambda event: inbox.on_store(*c_store_of(event)))]
    with _association(ae, node, ext_neg=roles, evt_handlers=handlers) as assoc:
        result = _outcome(assoc.send_c_get(identifier, sop_class), "C-GET")
    result.files = inbox.files
    return result


def fetch_by_move(
    node: PacsQueryRetrieve,
    calling_ae_title: str,
    identifier: Dataset,
    folder: Path,
    inbox: MoveInbox,
) -> Fetched:
    """C-MOVE to the gateway's own AE title: the PACS sends the instances to the gateway's
    SCP, which hands them to ``inbox`` while the move lasts."""
    ae = _ae(calling_ae_title, node)
    sop_class = model("move", str(identifier.QueryRetrieveLevel))
    ae.add_requested_context(sop_class, UNCOMPRESSED)
    with inbox.expect(node.ae_title, folder) as received, _association(ae, node) as assoc:
        result = _outcome(assoc.send_c_move(identifier, calling_ae_title, sop_class), "C-MOVE")
    result.files = received.files
    return result


def _outcome(responses: Iterator[tuple[Dataset, Dataset | None]], service: str) -> Fetched:
    """Reads a retrieve's responses to the final one, and its counts."""
    result = Fetched([])
    for status, _ in responses:
        if _check(status, service) not in PENDING:
            result.failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            result.warning = int(status.get("NumberOfWarningSuboperations", 0) or 0)
            break
    return result


class _Folder:
    """Writes each instance the PACS sends into one folder, as received."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self._lock = threading.Lock()

    def on_store(self, request: StoreRequest, dataset: Received) -> int:
        sop_instance = request.sop_instance_uid
        if not _is_uid(sop_instance):
            return CANNOT_UNDERSTAND
        if not dataset.kept():
            log.error("a fetched instance could not be kept: %s", dataset.error)
            return OUT_OF_RESOURCES
        meta = file_meta(request.sop_class_uid, sop_instance, request.transfer_syntax_uid)
        path = self.folder / f"{sop_instance}.dcm"
        tmp = self.folder / f".{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(meta)
                fh.flush()
                dataset.write_to(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            log.exception("could not write a fetched instance")
            return OUT_OF_RESOURCES
        with self._lock:
            if path not in self.files:
                self.files.append(path)
        return SUCCESS


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


class MoveInbox:
    """C-STOREs addressed to the gateway's own AE title that answer a C-MOVE it started.

    Only the PACS asked, and only while its move lasts, is heard here; anything else sent
    to the gateway's own AE title is refused as before.
    """

    def __init__(self) -> None:
        self._expected: dict[str, _Folder] = {}
        self._lock = threading.Lock()

    @contextmanager
    def expect(self, ae_title: str, folder: Path) -> Iterator[_Folder]:
        target = _Folder(folder)
        with self._lock:
            if ae_title in self._expected:
                raise PacsError(f"a move from {ae_title} is already in progress")
            self._expected[ae_title] = target
        try:
            yield target
        finally:
            with self._lock:
                self._expected.pop(ae_title, None)

    def expects(self, calling_ae_title: str) -> bool:
        with self._lock:
            return calling_ae_title in self._expected

    def c_store(self, calling_ae_title: str, request: StoreRequest, dataset: Received) -> int:
        with self._lock:
            target = self._expected.get(calling_ae_title)
        if target is None:
            return CANNOT_UNDERSTAND
        return target.on_store(request, dataset)

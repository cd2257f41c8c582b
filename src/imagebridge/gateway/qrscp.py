"""The gateway's query/retrieve SCP for its hospital: C-FIND, C-MOVE and C-GET (Patient Root
and Study Root) over what the network holds that the institution may see.

Handlers are thin: they read the identifier, ask the hub, and answer in DICOM's terms. A
patient of another institution is shown, and retrieved, under the identity inbound delivery
gives it here (``gateway/reconcile.py``): the local MRN, or the unmatched format.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext

from imagebridge.dicom.encode import text_dataset
from imagebridge.dicom.net import (
    ACCEPTED_TRANSFER_SYNTAXES,
    NODELAY_HANDLERS,
    STORAGE_SOP_CLASSES,
    UNCOMPRESSED,
    VERIFICATION,
    requested_contexts,
)
from imagebridge.gateway.hubclient import HubClient, HubError, HubUnavailable
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.pacs_scu import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from imagebridge.gateway.reconcile import plan_values, reconcile_file
from imagebridge.gateway.routing import RoutingTable
from imagebridge.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4; PS3.7 C.4.2)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
NOT_AUTHORIZED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_COUNT = 0xA701  # Refused: out of resources, unable to calculate number of matches
CANNOT_SEND = 0xA702  # Refused: out of resources, unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000

ROOTS = {
    PATIENT_ROOT_FIND: "PATIENT",
    STUDY_ROOT_FIND: "STUDY",
    PATIENT_ROOT_MOVE: "PATIENT",
    STUDY_ROOT_MOVE: "STUDY",
    PATIENT_ROOT_GET: "PATIENT",
    STUDY_ROOT_GET: "STUDY",
}
FIND_CLASSES = frozenset((PATIENT_ROOT_FIND, STUDY_ROOT_FIND))
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
NHS = "NHS"  # how the hub names the NHS number's issuer
MAX_MATCHES = 1000
HUB_TIMEOUT = 120.0
DOWNLOAD_BATCH = 16
CANCEL_POLL_SECONDS = 0.1
CANCEL_CHECK_EVERY = 32  # matches answered between two looks for a C-CANCEL
# What a match must hold, asked or not, to be shown under this institution's identity.
RECONCILED = ("PatientID", "IssuerOfPatientID", "AccessionNumber", "PatientBirthDate", "PatientSex")
Answer = tuple[int | Dataset | None, Dataset | str | None]


class PatientLookup(Protocol):
    """The local identity of an NHS number (reconcile's ``mrn_lookup``), and ways to learn
    many at once: the hub's answer to a query carries those of its matches, and one hub
    request asks for any still missing (not one request per patient)."""

    def __call__(self, nhs_number: str) -> Any: ...

    def learn(self, answers: Mapping[str, dict[str, Any]]) -> None: ...

    def prefetch(self, nhs_numbers: Iterable[str]) -> None: ...


class Caller(Protocol):
    """The calling node of an accepted association, as the storage SCP recorded it."""

    calling_ae_title: str
    address: str
    permissions: frozenset[str]


class IdentifierError(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Cancelled(Exception):
    """The caller sent C-CANCEL."""


class _Failed(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def read_identifier(identifier: Dataset, root: str) -> tuple[str, dict[str, str], list[str]]:
    """The level, the keys as text, and every keyword asked for, in order."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    allowed = LEVELS if root == "PATIENT" else LEVELS[1:]
    if level not in allowed:
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH, f"query level {level or 'missing'} not in {root} root"
        )
    keys: dict[str, str] = {}
    requested: list[str] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue  # private and unknown elements are not matched on
        requested.append(keyword)
        if element.VR == "SQ":
            continue  # returned empty; sequences are not matched on
        value = element.value
        if value is None:
            keys[keyword] = ""
        elif isinstance(value, MultiValue | list):
            keys[keyword] = "\\".join(str(v) for v in value)
        else:
            keys[keyword] = str(value)
    return level, keys, requested


@dataclass(frozen=True)
class Match:
    """One pending C-FIND answer: its level, and the values asked for as text, in the order
    asked (the keywords shared by all the answers of a query)."""

    level: str
    keywords: tuple[str, ...]
    texts: list[str]

    @property
    def unicode(self) -> bool:
        """Some value is not ASCII: sent as UTF-8 (ISO_IR 192)."""
        return not "".join(self.texts).isascii()

    def dataset(self) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        for keyword, text in zip(self.keywords, self.texts, strict=True):
            _put(ds, keyword, text)
        if self.unicode:
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    def encoded(self, implicit: bool) -> bytes:
        """The same dataset as ``dataset`` gives, encoded here (little endian)."""
        if self.unicode:
            keywords = ("QueryRetrieveLevel", "SpecificCharacterSet", *self.keywords)
            texts = [self.level, "ISO_IR 192", *self.texts]
            return text_dataset(keywords, texts, implicit=implicit, encoding="utf-8")
        keywords = ("QueryRetrieveLevel", *self.keywords)
        texts = [self.level, *self.texts]
        return text_dataset(keywords, texts, implicit=implicit, encoding="ascii")


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _put(ds: Dataset, keyword: str, value: Any) -> None:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return
    vr = dictionary_VR(tag)
    if vr == "SQ":
        ds.add_new(tag, vr, Sequence())
        return
    text = _text(value)
    try:
        ds.add_new(tag, vr, text.split("\\") if "\\" in text else (text or None))
    except (ValueError, TypeError, OverflowError):
        ds.add_new(tag, vr, None)  # a value the PACS sent that DICOM cannot carry here


class QueryRetrieveSCP:
    def __init__(
        self,
        settings: GatewaySettings,
        hub: Callable[[], HubClient],
        routing: RoutingTable,
        journal: Journal,
        caller: Callable[[Association], Caller | None],
        mrn_lookup: PatientLookup,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.routing = routing
        self.journal = journal
        self.caller = caller
        self.mrn_lookup = mrn_lookup
        self.destinations = {d.ae_title: d for d in settings.move_destinations}
        self.find_classes = FIND_CLASSES
        self.work = settings.data_dir / "retrieve"
        # Local MRN -> NHS number: a workstation asks by its own patient ID.
        self._nhs_of = {mrn: nhs for nhs, mrn in settings.reconciliation.mrn_map.items()}
        # Hub calls run here, so that a C-CANCEL is heard while they wait.
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="qr-hub")
        self._clients = threading.local()

    def attach(self, ae: AE) -> list[evt.EventHandlerType]:
        """Add the query/retrieve contexts to the gateway's AE; returns the handlers."""
        for sop_class in ROOTS:
            ae.add_supported_context(sop_class, UNCOMPRESSED)
        # A C-GET sends on the caller's own association, which proposes to act as storage
        # SCP: accept whichever roles a storage context proposes.
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(
                sop_class, ACCEPTED_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        return [
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- C-FIND -----------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[Answer]:
        """pynetdicom's C-FIND (an association that also asks for C-MOVE or C-GET)."""
        answers = self.find(
            self.caller(event.assoc),
            str(event.request.AffectedSOPClassUID),
            lambda: event.identifier,
            lambda: bool(event.is_cancelled),
        )
        for code, comment, match in answers:
            if match is not None:
                yield PENDING, match.dataset()
            else:
                yield (status(code, comment) if comment else code), None

    def find_encoded(
        self,
        caller: Caller,
        sop_class: str,
        identifier: bytes,
        transfer_syntax: str,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, str, bytes | None]]:
        """Our acceptor's C-FIND: the identifier as received, the answers encoded."""
        implicit = transfer_syntax == ImplicitVRLittleEndian
        if transfer_syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            raise ValueError(f"{transfer_syntax} is not little endian")

        def decoded() -> Dataset:
            return decode(BytesIO(identifier), implicit, True)

        for code, comment, match in self.find(caller, sop_class, decoded, cancelled):
            yield code, comment, None if match is None else match.encoded(implicit)

    def find(
        self,
        caller: Caller | None,
        sop_class: str,
        identifier: Callable[[], Dataset],
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, str, Match | None]]:
        """A C-FIND's answers, whichever acceptor took it: a match for each pending answer,
        then (status, comment, None) once."""
        refusal = self._permission(caller, "find", "dicom:query:refused", sop_class)
        if refusal is not None or caller is None:
            code, reason = refusal or (NOT_AUTHORIZED, "")
            yield code, reason, None
            return
        if sop_class not in FIND_CLASSES:
            reason = "not a C-FIND SOP class"
            yield self._query_refused(caller, SOP_CLASS_NOT_SUPPORTED, reason, sop_class)
            return
        try:
            level, keys, requested = read_identifier(identifier(), ROOTS[sop_class])
        except IdentifierError as exc:
            yield self._query_refused(caller, exc.status, str(exc), sop_class)
            return
        except Exception as exc:  # an identifier that cannot be decoded
            reason = f"unreadable identifier: {type(exc).__name__}"
            yield self._query_refused(caller, UNABLE_TO_PROCESS, reason, sop_class)
            return
        keywords = self._returned(level, requested)
        query = {
            "level": level,
            "keys": self._network_keys(keys),
            "limit": MAX_MATCHES,
            "sop_class_uid": sop_class,
            "calling_ae_title": caller.calling_ae_title,
            "fields": sorted({*keywords, *RECONCILED}),
        }
        try:
            answer = self._ask(cancelled, lambda hub: hub.find(query, HUB_TIMEOUT))
        except _Cancelled:
            self._audit_query(caller, sop_class, level, keys, [], cancelled=True)
            yield CANCEL, "", None
            return
        except (HubError, HubUnavailable) as exc:
            code, reason = _failure(exc, unavailable=OUT_OF_RESOURCES)
            yield self._query_refused(caller, code, reason, sop_class)
            return
        me = self._me()
        foreign = {
            str(m["_nhs_number"])
            for m in answer["matches"]
            if m.get("_nhs_number") and str(m.get("_institution", "")) != me
        }
        if foreign:
            self.mrn_lookup.learn(answer.get("local_ids") or {})
            self.mrn_lookup.prefetch(foreign)
        sent: list[dict[str, Any]] = []
        patients: set[tuple[str, str]] = set()
        was_cancelled = False
        try:
            for n, match in enumerate(answer["matches"]):
                if n % CANCEL_CHECK_EVERY == 0 and cancelled():
                    was_cancelled = True
                    break
                local = self._local_identity(match, me)
                if local is None:
                    continue
                if level == "PATIENT":
                    # Institutions holding studies of one patient: one patient here.
                    patient = (local["PatientID"], local.get("IssuerOfPatientID", ""))
                    if patient in patients:
                        continue
                    patients.add(patient)
                sent.append(local)
                yield PENDING, "", self._response(local, level, keywords)
        finally:
            self._audit_query(caller, sop_class, level, keys, sent, cancelled=was_cancelled)
        yield (CANCEL if was_cancelled else SUCCESS), "", None

    @staticmethod
    def _returned(level: str, requested: list[str]) -> tuple[str, ...]:
        """The keywords each answer holds: those asked for, and the unique keys of this level
        and those above, which come back even when not asked."""
        unique = [UNIQUE_KEYS[n] for n in LEVELS[1 : LEVELS.index(level) + 1]]
        return tuple(dict.fromkeys([*requested, *unique]))

    def _response(self, match: dict[str, Any], level: str, keywords: tuple[str, ...]) -> Match:
        texts = []
        for keyword in keywords:
            if keyword == "RetrieveAETitle":
                texts.append(self.settings.ae_title)
            elif keyword == "InstanceAvailability":
                texts.append("ONLINE" if match.get("_source") == "hub" else "NEARLINE")
            else:
                texts.append(_text(match.get(keyword)))
        return Match(level, keywords, texts)

    # -- C-MOVE and C-GET -------------------------------------------------------------------

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        sop_class = str(event.request.AffectedSOPClassUID)
        caller = self.caller(event.assoc)
        name = str(event.move_destination or "").strip()
        destination = self.destinations.get(name)
        if destination is None:
            reason = f"unknown move destination {name}"
            self._refuse(
                caller, "dicom:retrieve:refused", MOVE_DESTINATION_UNKNOWN, reason, sop_class
            )
            yield None, None
            return
        # pynetdicom takes the destination first and reads these association arguments
        # only after the number of sub-operations: the contexts are added below.
        arguments: dict[str, Any] = {"evt_handlers": NODELAY_HANDLERS}
        yield destination.host, destination.port, arguments
        yield from self._retrieve(event, caller, sop_class, "move", name, arguments)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        sop_class = str(event.request.AffectedSOPClassUID)
        caller = self.caller(event.assoc)
        calling = caller.calling_ae_title if caller else ""
        yield from self._retrieve(event, caller, sop_class, "get", calling, None)

    def _retrieve(
        self,
        event: evt.Event,
        caller: Caller | None,
        sop_class: str,
        service: str,
        destination: str,
        arguments: dict[str, Any] | None,
    ) -> Iterator[Any]:
        """Yields the number of sub-operations, then a dataset per instance. pynetdicom
        answers a status only after a first sub-operation is counted, so a refusal counts
        one and fails it."""
        if arguments is not None:
            # A refusal is answered after pynetdicom associates with the destination, which
            # needs a context: verification, unless there are instances to send.
            arguments["contexts"] = _contexts([])
        refusal = self._permission(caller, service, "dicom:retrieve:refused", sop_class)
        if refusal is not None or caller is None:
            yield 1
            yield status(*(refusal or (NOT_AUTHORIZED, ""))), None
            return
        try:
            level, keys, _ = read_identifier(event.identifier, ROOTS[sop_class])
            instances = self._plan(event, caller, level, self._network_keys(keys), destination)
        except _Cancelled:
            yield 1
            yield CANCEL, None
            return
        except Exception as exc:
            code, reason = _failure(exc)
            yield 1
            yield (
                status(*self._refuse(caller, "dicom:retrieve:refused", code, reason, sop_class)),
                None,
            )
            return
        if arguments is not None and instances:
            arguments["contexts"] = _contexts(instances)
        yield len(instances)
        yield from self._send(event, caller, sop_class, instances, destination)

    def _plan(
        self,
        event: evt.Event,
        caller: Caller,
        level: str,
        keys: dict[str, str],
        destination: str,
    ) -> list[dict[str, Any]]:
        """The instances to send: the hub's, after it had them fetched from the source PACS
        if it held none."""
        request = {
            "level": level,
            "keys": keys,
            "priority": "urgent" if getattr(event.request, "Priority", 2) == 1 else "routine",
            "calling_ae_title": caller.calling_ae_title,
            "destination": destination,
        }
        answer = self._ask(
            lambda: bool(event.is_cancelled), lambda hub: hub.retrieve(request, HUB_TIMEOUT)
        )
        task = answer.get("fetch")
        if answer["instances"] or not task:
            instances: list[dict[str, Any]] = answer["instances"]
            return instances
        deadline = time.monotonic() + self.settings.retrieve_wait_seconds

        def follow(hub: HubClient) -> dict[str, Any]:
            return hub.fetch_state(task, max(0.0, min(20.0, deadline - time.monotonic())))

        while True:
            state = self._ask(lambda: bool(event.is_cancelled), follow)
            if state["status"] == "done":
                break
            if state["status"] in ("failed", "expired"):
                raise _Failed(UNABLE_TO_PROCESS, f"the source PACS did not send: {state['error']}")
            if time.monotonic() >= deadline:
                raise _Failed(CANNOT_COUNT, "the source PACS did not send in time")
        answer = self._ask(
            lambda: bool(event.is_cancelled), lambda hub: hub.retrieve(request, HUB_TIMEOUT)
        )
        fetched: list[dict[str, Any]] = answer["instances"]
        return fetched

    def _send(
        self,
        event: evt.Event,
        caller: Caller,
        sop_class: str,
        instances: list[dict[str, Any]],
        destination: str,
    ) -> Iterator[Answer]:
        folder = self.work / uuid.uuid4().hex
        folder.mkdir(parents=True)
        sent: Counter[tuple[str, str]] = Counter()
        ended = "completed"
        hub = self.hub()
        try:
            for start in range(0, len(instances), DOWNLOAD_BATCH):
                batch = instances[start : start + DOWNLOAD_BATCH]
                try:
                    paths = hub.download(
                        [i["sha256"] for i in batch], folder, "/api/v1/gateway/retrieve/blobs"
                    )
                except (HubError, HubUnavailable) as exc:
                    ended = "failed"
                    yield status(CANNOT_SEND, f"hub: {exc}"), None
                    return
                for item in batch:
                    if event.is_cancelled:
                        ended = "cancelled"
                        yield CANCEL, None
                        return
                    dataset = self._instance(item, paths.get(item["sha256"]), folder)
                    sent[(item["patient_id"], item["study_instance_uid"])] += 1
                    # A string in place of a dataset is counted as a failed sub-operation.
                    yield PENDING, dataset if dataset is not None else item["sop_instance_uid"]
        finally:
            hub.close()
            shutil.rmtree(folder, ignore_errors=True)
            for (patient, study), count in sent.items():
                self.journal.write(
                    "dicom:instances:retrieved",
                    "failure" if ended == "failed" else "success",
                    patient_ref=patient,
                    study_ref=study,
                    source_address=caller.address,
                    calling_ae_title=caller.calling_ae_title,
                    destination=destination,
                    sop_class_uid=sop_class,
                    instances=count,
                    ended=ended,
                )

    def _instance(self, item: dict[str, Any], path: Path | None, folder: Path) -> Dataset | None:
        """The instance as it goes to the caller: reconciled when another institution's."""
        if path is None:
            return None
        me = self._me()
        try:
            if item["institution"] != me:
                local = folder / f"local-{item['sha256']}.dcm"
                reconcile_file(
                    path,
                    local,
                    sender_code=item["institution"],
                    receiver_code=me,
                    policy=self.settings.reconciliation,
                    mrn_lookup=self.mrn_lookup,
                )
                path.unlink(missing_ok=True)
                path = local
            dataset = dcmread(path)
        except Exception as exc:
            log.error("a retrieved instance could not be prepared: %s", type(exc).__name__)
            return None
        finally:
            path.unlink(missing_ok=True)
        return dataset

    # -- identity -----------------------------------------------------------------------------

    def _me(self) -> str:
        return self.routing.institution or self.settings.ae_title

    def _network_keys(self, keys: dict[str, str]) -> dict[str, str]:
        """The workstation's keys as the network understands them: a local MRN, or an NHS
        number under this PACS's issuer, become the NHS number under the hub's."""
        keys = dict(keys)
        pid = keys.get("PatientID", "").strip()
        issuer = keys.get("IssuerOfPatientID", "").strip()
        policy = self.settings.reconciliation
        own = policy.issuer_of_patient_id or self._me()
        if pid and issuer == policy.nhs_number_issuer:
            keys["IssuerOfPatientID"] = NHS
        elif pid and issuer in ("", own) and pid in self._nhs_of:
            keys["PatientID"] = self._nhs_of[pid]
            keys["IssuerOfPatientID"] = NHS
        return keys

    def _local_identity(self, match: dict[str, Any], me: str) -> dict[str, Any] | None:
        """The match (changed in place) with the identity delivery would give it here, ``me``
        being this institution; None if that cannot be decided (a foreign patient ID is
        never shown as a local one)."""
        code = str(match.get("_institution", ""))
        if code == me or "PatientID" not in match:
            return match
        try:
            decided = plan_values(
                str(match.get("PatientID") or ""),
                str(match.get("IssuerOfPatientID") or ""),
                str(match.get("AccessionNumber") or ""),
                str(match.get("_nhs_number") or ""),
                birth_date=str(match.get("PatientBirthDate") or ""),
                sex=str(match.get("PatientSex") or ""),
                sender_code=code,
                receiver_code=me,
                policy=self.settings.reconciliation,
                mrn_lookup=self.mrn_lookup,
            )
        except Exception as exc:
            log.error("a match could not be reconciled: %s", type(exc).__name__)
            return None
        match["PatientID"] = decided.patient_id
        match["IssuerOfPatientID"] = decided.issuer_of_patient_id
        if "AccessionNumber" in match:
            match["AccessionNumber"] = decided.accession_number
        return match

    # -- plumbing -----------------------------------------------------------------------------

    def _ask(self, cancelled: Callable[[], bool], call: Callable[[HubClient], T]) -> T:
        """Call the hub, listening for the caller's C-CANCEL meanwhile."""

        def run() -> T:
            # One client per pool thread, kept: a query then costs one request on an open
            # connection, not a new client and a new connection (tens of milliseconds).
            hub: HubClient | None = getattr(self._clients, "hub", None)
            if hub is None:
                hub = self._clients.hub = self.hub()
            return call(hub)

        future = self._pool.submit(run)
        while True:
            try:
                return future.result(timeout=CANCEL_POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                if cancelled():
                    future.cancel()
                    raise _Cancelled() from None

    def _permission(
        self, caller: Caller | None, permission: str, action: str, sop_class: str
    ) -> tuple[int, str] | None:
        if caller is None:
            return NOT_AUTHORIZED, "association not accepted"
        if permission not in caller.permissions:
            reason = f"C-{permission.upper()} not permitted"
            return self._refuse(caller, action, NOT_AUTHORIZED, reason, sop_class)
        return None

    def _query_refused(
        self, caller: Caller, code: int, reason: str, sop_class: str
    ) -> tuple[int, str, None]:
        return *self._refuse(caller, "dicom:query:refused", code, reason, sop_class), None

    def _refuse(
        self, caller: Caller | None, action: str, code: int, reason: str, sop_class: str
    ) -> tuple[int, str]:
        log.warning("query/retrieve refused (0x%04X): %s", code, reason)
        self.journal.write(
            action,
            "refused" if code == NOT_AUTHORIZED else "failure",
            source_address=caller.address if caller else "",
            calling_ae_title=caller.calling_ae_title if caller else "",
            sop_class_uid=sop_class,
            status=f"0x{code:04X}",
            reason=reason,
        )
        return code, reason

    def _audit_query(
        self,
        caller: Caller,
        sop_class: str,
        level: str,
        keys: dict[str, str],
        sent: list[dict[str, Any]],
        *,
        cancelled: bool,
    ) -> None:
        studies = sorted({str(m.get("StudyInstanceUID", "")) for m in sent} - {""})
        self.journal.write(
            "dicom:query:answered",
            patient_ref=keys.get("PatientID", ""),
            study_ref=studies[0] if len(studies) == 1 else "",
            source_address=caller.address,
            calling_ae_title=caller.calling_ae_title,
            sop_class_uid=sop_class,
            level=level,
            query=keys,
            matches=len(sent),
            studies=studies[:100],
            cancelled=cancelled,
        )


def _failure(exc: Exception, unavailable: int = CANNOT_COUNT) -> tuple[int, str]:
    """The status and reason for what stopped a query, or a retrieve before its first
    sub-operation."""
    if isinstance(exc, IdentifierError | _Failed):
        return exc.status, str(exc)
    if isinstance(exc, HubError):
        # 400: the hub's matching refused the keys, as the standard would.
        code = IDENTIFIER_DOES_NOT_MATCH if exc.status == 400 else UNABLE_TO_PROCESS
        return code, str(exc).removeprefix("hub answered 400: ")
    if isinstance(exc, HubUnavailable):
        return unavailable, str(exc)
    log.exception("retrieve failed")
    return UNABLE_TO_PROCESS, f"unreadable identifier or request: {type(exc).__name__}"


def _contexts(instances: list[dict[str, Any]]) -> list[PresentationContext]:
    """Contexts for the move destination: each stored syntax, and uncompressed as fallback."""
    pairs = [(i["sop_class_uid"], i["transfer_syntax_uid"]) for i in instances]
    if not pairs:
        return requested_contexts([(VERIFICATION, UNCOMPRESSED[0])])
    try:
        return requested_contexts(pairs)
    except ValueError:  # more than 128: uncompressed only
        return requested_contexts((sop, UNCOMPRESSED[0]) for sop, _ in pairs)

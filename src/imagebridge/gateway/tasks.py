"""The gateway's worker for the hub's tasks: query the local PACS (C-FIND) for a network or
local query, or fetch studies from it and send them to another institution as a transfer.

Queries and fetches have a thread each, so that a long fetch never keeps a query waiting.
A task the gateway took but did not finish (it stopped) is handed out again by the hub.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from imagebridge.dicom.part10 import BadDataset, read_header
from imagebridge.gateway import pacs_scu
from imagebridge.gateway.hubclient import HubClient, HubError, HubUnavailable
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.pacs_scu import MoveInbox, PacsError
from imagebridge.gateway.uploader import Backoff
from imagebridge.nhs import normalise_nhs_number
from imagebridge.settings import GatewaySettings

log = logging.getLogger(__name__)
LONG_POLL_SECONDS = 20.0
NHS = "NHS"  # how the hub names the NHS number's issuer
# What a query asks the PACS to return, per level, besides its own keys.
RETURN_KEYS = {
    "PATIENT": ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex"),
    "STUDY": (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class TaskFailed(Exception):
    """The task cannot be done; the reason goes back to the hub."""


def identifier(level: str, keys: dict[str, str], *, returned: bool = True) -> Dataset:
    """A query identifier: the keys, and the return keys of the level and above; or, for a
    retrieve, the unique keys alone."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    wanted: dict[str, str] = {}
    for name in LEVELS[: LEVELS.index(level) + 1] if returned else ():
        wanted.update(dict.fromkeys(RETURN_KEYS[name], ""))
    wanted.update(keys)
    for keyword, value in wanted.items():
        setattr(ds, keyword, value.split("\\") if "\\" in value else value)
    return ds


def as_match(ds: Dataset) -> dict[str, Any]:
    """A PACS's match as text by keyword (ModalitiesInStudy as a list)."""
    out: dict[str, Any] = {}
    for element in ds:
        if not element.keyword or element.VR == "SQ" or element.keyword == "QueryRetrieveLevel":
            continue
        value = element.value
        if isinstance(value, MultiValue | list):
            values = [str(v) for v in value]
            out[element.keyword] = (
                values if element.keyword == "ModalitiesInStudy" else ("\\".join(values))
            )
        else:
            out[element.keyword] = "" if value is None else str(value)
    return out


def _each_study(level: str, keys: dict[str, str]) -> list[dict[str, str]]:
    uids = [u for u in keys.get("StudyInstanceUID", "").split("\\") if u.strip()]
    if level != "STUDY" or len(uids) < 2:
        return [keys]
    return [{**keys, "StudyInstanceUID": uid.strip()} for uid in uids]


class TaskWorker:
    def __init__(
        self,
        settings: GatewaySettings,
        hub: Callable[[], HubClient],
        journal: Journal,
        inbox: MoveInbox,
        mrn_lookup: Callable[[str], Any],
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.journal = journal
        self.inbox = inbox
        self.mrn_lookup = mrn_lookup
        self.folder = settings.data_dir / "fetch"
        self._nhs_of = {mrn: nhs for nhs, mrn in settings.reconciliation.mrn_map.items()}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(kind,), name=f"tasks-{kind}", daemon=True)
            for kind in ("find", "fetch")
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        # A thread blocked in the hub's long poll is not worth waiting for: a task it took
        # but did not finish comes back after its lease.
        for t in self._threads:
            t.join(timeout=1.0)

    def _run(self, kind: str) -> None:
        backoff = Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        hub = self.hub()
        try:
            while not self._stop.is_set():
                try:
                    task = hub.next_task(kind, LONG_POLL_SECONDS)
                    backoff.succeeded()
                except (HubUnavailable, HubError) as exc:
                    delay = backoff.failed()
                    log.warning("cannot take tasks from the hub (%s); again in %.1f s", exc, delay)
                    self._stop.wait(delay)
                    continue
                if task is not None:
                    self._answer(hub, task)
        finally:
            hub.close()

    def _answer(self, hub: HubClient, task: dict[str, Any]) -> None:
        try:
            if self.settings.pacs_qr is None:
                raise TaskFailed("this gateway has no PACS configured for query/retrieve")
            answer = self.find(task) if task["kind"] == "find" else self.fetch(hub, task)
        except (TaskFailed, PacsError, HubError) as exc:
            log.warning("task %s failed: %s", task["kind"], exc)
            answer = {"status": "failed", "error": str(exc)[:500]}
        except Exception as exc:
            log.exception("task %s failed", task["kind"])
            answer = {"status": "failed", "error": f"gateway error: {type(exc).__name__}"}
        while not self._stop.is_set():
            try:
                hub.task_result(task["id"], answer)
                return
            except HubUnavailable as exc:
                log.warning("cannot answer a task yet (%s)", exc)
                self._stop.wait(1.0)
            except HubError as exc:  # expired meanwhile: the answer is no longer wanted
                log.warning("task answer refused: %s", exc)
                return

    # -- keys -------------------------------------------------------------------------------

    def pacs_keys(self, task: dict[str, Any]) -> tuple[dict[str, str] | None, str]:
        """The keys as this PACS knows them, and the NHS number asked for if any. A query
        by NHS number asks for the local MRN; None when this institution does not know the
        patient (no other identifier of it may be guessed at)."""
        keys = dict(task["request"]["keys"])
        if task.get("requester") == task.get("institution"):
            return keys, ""  # one's own users, in the PACS's own terms
        pid = keys.get("PatientID", "").strip()
        issuer = keys.pop("IssuerOfPatientID", "").strip()
        if not pid or pid == "*":
            return keys, ""
        nhs = normalise_nhs_number(pid) if issuer == NHS else None
        if nhs is None:
            return None, ""
        local = self.mrn_lookup(nhs)
        local_id = local if isinstance(local, str) else getattr(local, "patient_id", None)
        if not local_id:
            return None, nhs
        keys["PatientID"] = local_id
        return keys, nhs

    # -- find -------------------------------------------------------------------------------

    def find(self, task: dict[str, Any]) -> dict[str, Any]:
        node = self.settings.pacs_qr
        assert node is not None
        request = task["request"]
        level, limit = request["level"], int(request.get("limit", 100))
        keys, nhs = self.pacs_keys(task)
        matches: list[dict[str, Any]] = []
        if keys is not None:
            found = pacs_scu.find(node, self.settings.ae_title, identifier(level, keys), limit)
            for ds in found:
                match = as_match(ds)
                match["_nhs_number"] = nhs or self._nhs_of.get(match.get("PatientID", ""), "")
                matches.append(match)
        studies = sorted({m.get("StudyInstanceUID", "") for m in matches} - {""})
        self.journal.write(
            "pacs:query:answered",
            patient_ref=(keys or {}).get("PatientID", ""),
            study_ref=studies[0] if len(studies) == 1 else "",
            requester=task.get("requester", ""),
            task=task["id"],
            level=level,
            query=keys if keys is not None else request["keys"],
            matches=len(matches),
            studies=studies[:100],
            unknown_patient=keys is None,
        )
        return {"status": "done", "matches": matches}

    # -- fetch ------------------------------------------------------------------------------

    def fetch(self, hub: HubClient, task: dict[str, Any]) -> dict[str, Any]:
        node = self.settings.pacs_qr
        assert node is not None
        request = task["request"]
        keys, _ = self.pacs_keys(task)
        if keys is None:
            raise TaskFailed("the patient is not known at this institution")
        folder = self.folder / task["id"]
        shutil.rmtree(folder, ignore_errors=True)
        files: list[Path] = []
        try:
            # One study at a time: not every PACS retrieves a list of UIDs.
            for keys_one in _each_study(request["level"], keys):
                query = identifier(request["level"], keys_one, returned=False)
                if node.retrieve == "move":
                    fetched = pacs_scu.fetch_by_move(
                        node, self.settings.ae_title, query, folder, self.inbox
                    )
                else:
                    fetched = pacs_scu.fetch_by_get(node, self.settings.ae_title, query, folder)
                files += [f for f in fetched.files if f not in files]
            if not files:
                raise TaskFailed("the PACS sent nothing for this request")
            transfer_id, count = self._upload(hub, task, files)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"status": "done", "transfer_id": transfer_id, "instances": count}

    def _upload(self, hub: HubClient, task: dict[str, Any], files: list[Path]) -> tuple[str, int]:
        """Send the fetched instances to the hub as a transfer to the fetch's receiver, through
        the same routes as the uploader (blobs the hub holds go as references)."""
        request = task["request"]
        node = self.settings.pacs_qr
        assert node is not None
        transfer = hub.create_transfer(
            receiver=request["receiver"],
            priority=request.get("priority", "routine"),
            origin="dicom",
            calling_ae_title=node.ae_title,
            # A fetch run again after a restart continues the same transfer.
            idempotency_key=f"fetch-{task['id']}",
            reason=request.get("reason", ""),
        )
        studies: Counter[tuple[str, str]] = Counter()
        items: list[tuple[str, Path]] = []
        for path in files:
            try:
                header = read_header(path)
            except BadDataset:
                log.warning("a fetched instance is unreadable; not sent")
                continue
            studies[(header.text("PatientID"), header.study_instance_uid)] += 1
            items.append((hashlib.sha256(path.read_bytes()).hexdigest(), path))
        accepted = 0
        if transfer["status"] == "receiving":
            size = self.settings.upload_batch_instances
            for start in range(0, len(items), size):
                batch = items[start : start + size]
                missing = hub.missing([sha for sha, _ in batch])
                result = hub.upload(
                    transfer["id"], [(sha, p if sha in missing else None) for sha, p in batch]
                )
                accepted += len(result["accepted"])
            hub.close_transfer(transfer["id"])
        for (patient, study), count in studies.items():
            self.journal.write(
                "pacs:study:fetched",
                patient_ref=patient,
                study_ref=study,
                task=task["id"],
                receiver=request["receiver"],
                transfer=transfer["id"],
                instances=count,
            )
        return str(transfer["id"]), accepted

"""STOW-RS (PS3.18 10.5): storing instances into the caller's institution's area.

Each part is one Part 10 file. It is written to the blob store as it arrives, with the
hub's own meta group in place of the sender's (so the same instance always has the same
bytes, as from a gateway), then checked, committed and indexed like an upload. A part that
fails is refused on its own, with its reason, and nothing of it is kept.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.agreements.services import exchange_refusal
from imagebridge.audit.services import record
from imagebridge.dicom.part10 import BadDataset, Header, file_meta, read_header, read_meta
from imagebridge.dicomweb import dicomjson
from imagebridge.dicomweb.media import DICOM
from imagebridge.hub.state import Hub
from imagebridge.index.services import NotIndexed, index_instances
from imagebridge.storage.blobs import BlobMismatch, BlobWriter
from imagebridge.storage.services import ensure_blob_rows

log = logging.getLogger(__name__)

MAX_INSTANCE_BYTES = 4 * 1024**3
MAX_PARTS = 10000
# A request streams to disk; beyond this its declared length alone is refused.
MAX_REQUEST_BYTES = 64 * 1024**3
# FailureReason (0008,1197) values, as C-STORE statuses (PS3.4 Annex B).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
_META_HEAD = 144  # preamble, "DICM" and the meta group length element
MAX_META_BYTES = 64 * 1024


@dataclass
class Failure:
    code: int
    reason: str


@dataclass
class StagedPart:
    """One part as received: its bytes in a blob writer, or why it was refused early."""

    writer: BlobWriter | None
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    failure: Failure | None = None


class PartWriter:
    """Writes one part into a blob writer, swapping its meta group for the hub's own."""

    def __init__(self, hub: Hub, headers: dict[str, str], default_type: str) -> None:
        self._hub = hub
        self._head = b""
        self._size = 0
        self.part = StagedPart(None)
        media_type = headers.get("content-type", default_type).split(";")[0].strip().lower()
        if media_type != DICOM:
            self._fail(CANNOT_UNDERSTAND, f"a part is {media_type or 'untyped'}, not {DICOM}")

    def _fail(self, code: int, reason: str) -> None:
        if self.part.writer is not None:
            self.part.writer.abort()
            self.part.writer = None
        if self.part.failure is None:
            self.part.failure = Failure(code, reason)

    def write(self, data: bytes) -> None:
        if self.part.failure is not None:
            return
        self._size += len(data)
        if self._size > MAX_INSTANCE_BYTES:
            self._fail(OUT_OF_RESOURCES, f"an instance is at most {MAX_INSTANCE_BYTES} bytes")
            return
        if self.part.writer is not None:
            self.part.writer.write(data)
            return
        self._head += data
        if len(self._head) >= _META_HEAD:
            self._start()

    def _start(self) -> None:
        head = self._head
        if head[128:132] != b"DICM":
            self._fail(CANNOT_UNDERSTAND, "a part is not a DICOM Part 10 file")
            return
        needed = _META_HEAD + int.from_bytes(head[140:144], "little")
        if needed > MAX_META_BYTES:
            self._fail(CANNOT_UNDERSTAND, "a part's meta group is implausibly long")
            return
        if len(head) < needed:
            return
        try:
            meta = read_meta(io.BytesIO(head))
        except BadDataset as exc:
            self._fail(CANNOT_UNDERSTAND, str(exc))
            return
        self.part.sop_class_uid = meta.sop_class_uid
        self.part.sop_instance_uid = meta.sop_instance_uid
        writer = self._hub.blobs.writer()
        writer.write(file_meta(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax_uid))
        writer.write(head[meta.dataset_offset :])
        self.part.writer = writer
        self._head = b""

    def finish(self) -> StagedPart:
        if self.part.failure is None and self.part.writer is None:
            self._fail(CANNOT_UNDERSTAND, "a part is not a complete DICOM Part 10 file")
        if self.part.writer is not None:
            self.part.writer.finish()
        return self.part


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def institution_refusal(hub: Hub, actor: Actor) -> str | None:
    """Why this caller may not store now, or None."""
    if actor.institution_id is None:
        return "STOW-RS stores into the caller's institution, and this credential has none"
    with hub.sessions() as session:
        return exchange_refusal(session, actor.institution_id)


def store(
    hub: Hub, actor: Actor, study: str | None, parts: list[StagedPart], base_url: str
) -> Outcome:
    """Check, commit and index the parts; the standard's response dataset and status."""
    assert actor.institution_id is not None
    failed: list[tuple[StagedPart, Failure]] = []
    checked: list[tuple[StagedPart, Header]] = []
    for part in parts:
        if part.failure is not None or part.writer is None:
            failed.append((part, part.failure or Failure(CANNOT_UNDERSTAND, "empty part")))
            continue
        failure, header = _check(part, study)
        if failure is not None:
            part.writer.abort()
            failed.append((part, failure))
        else:
            assert header is not None
            checked.append((part, header))
    ready: list[tuple[StagedPart, Header, str, int]] = []
    try:
        committed = hub.blobs.commit_batch([(p.writer, None) for p, _ in checked if p.writer])
    except OSError:
        log.exception("STOW-RS: blob store commit failed")
        committed = [BlobMismatch("the blob store could not store the instance")] * len(checked)
    for (part, header), result in zip(checked, committed, strict=True):
        if isinstance(result, BlobMismatch):
            failed.append((part, Failure(OUT_OF_RESOURCES, str(result))))
        else:
            ready.append((part, header, result[0], result[1]))
    stored: list[tuple[StagedPart, Header]] = []
    with hub.sessions() as session, session.begin():
        ensure_blob_rows(session, {sha: size for _, _, sha, size in ready})
        results = index_instances(
            session, actor.institution_id, [(h, sha, size) for _, h, sha, size in ready]
        )
        for (part, header, _, _), indexed in zip(ready, results, strict=True):
            if isinstance(indexed, NotIndexed):
                failed.append((part, Failure(PROCESSING_FAILURE, str(indexed))))
            else:
                stored.append((part, header))
        _audit(session, actor, stored, failed)
    return _outcome(study, stored, failed, base_url)


def _check(part: StagedPart, study: str | None) -> tuple[Failure | None, Header | None]:
    assert part.writer is not None
    try:
        header = read_header(part.writer.staged_path())
    except BadDataset as exc:
        return Failure(CANNOT_UNDERSTAND, str(exc)), None
    if (header.sop_class_uid, header.sop_instance_uid) != (
        part.sop_class_uid,
        part.sop_instance_uid,
    ):
        return Failure(DOES_NOT_MATCH, "the meta group and the dataset name other SOP UIDs"), None
    if study is not None and header.study_instance_uid != study:
        return Failure(DOES_NOT_MATCH, "the instance belongs to another study than the URL's"), None
    return None, header


def _audit(
    session: Session,
    actor: Actor,
    stored: list[tuple[StagedPart, Header]],
    failed: list[tuple[StagedPart, Failure]],
) -> None:
    by_study: dict[tuple[str, str], int] = {}
    for _, header in stored:
        key = (header.text("PatientID"), header.study_instance_uid)
        by_study[key] = by_study.get(key, 0) + 1
    for (patient, study), count in by_study.items():
        record(
            session,
            "dicomweb:instances:stored",
            institution_id=actor.institution_id,
            patient_ref=patient,
            study_ref=study,
            detail={"instances": count},
            **actor.audit(),
        )
    if failed:
        record(
            session,
            "dicomweb:instances:refused",
            "failure",
            institution_id=actor.institution_id,
            detail={
                "refused": [
                    {
                        "sop_instance_uid": p.sop_instance_uid,
                        "failure_reason": f"0x{f.code:04X}",
                        "reason": f.reason,
                    }
                    for p, f in failed[:50]
                ]
            },
            **actor.audit(),
        )


def _outcome(
    study: str | None,
    stored: list[tuple[StagedPart, Header]],
    failed: list[tuple[StagedPart, Failure]],
    base_url: str,
) -> Outcome:
    body: dict[str, Any] = {}
    studies = {h.study_instance_uid for _, h in stored}
    if study is not None or len(studies) == 1:
        body["00081190"] = dicomjson.value_element(
            "UR", f"{base_url}/studies/{study or next(iter(studies))}"
        )
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                dicomjson.attributes(
                    {
                        "ReferencedSOPClassUID": p.sop_class_uid,
                        "ReferencedSOPInstanceUID": p.sop_instance_uid,
                        "FailureReason": f.code,
                    }
                )
                for p, f in failed
            ],
        }
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                dicomjson.attributes(
                    {
                        "ReferencedSOPClassUID": h.sop_class_uid,
                        "ReferencedSOPInstanceUID": h.sop_instance_uid,
                        "RetrieveURL": f"{base_url}/studies/{h.study_instance_uid}"
                        f"/series/{h.series_instance_uid}/instances/{h.sop_instance_uid}",
                    }
                )
                for _, h in stored
            ],
        }
    if not failed:
        status = 200
    elif stored:
        status = 202
    elif all(f.code == CANNOT_UNDERSTAND for _, f in failed):
        status = 400  # PS3.18 Table 10.5.3-1: nothing stored, for bad syntax
    else:
        status = 409  # nothing stored, for a conflict (another study, another patient)
    reasons = list(dict.fromkeys(f.reason for _, f in failed))[:20]
    return Outcome(status, dict(sorted(body.items())), reasons)

"""HTTP API of transfers: create, follow, upload into (gateways), report delivery."""

from __future__ import annotations

import io
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from imagebridge.actors import Actor
from imagebridge.agreements.services import exchange_refusal
from imagebridge.audit import services as audit
from imagebridge.audit.services import record
from imagebridge.dicom.part10 import BadDataset, Header, preamble_is_clean, read_header
from imagebridge.hub.auth import GatewayActor, Sender, Tracker, get_hub
from imagebridge.hub.state import Hub
from imagebridge.institutions.models import Institution
from imagebridge.institutions.services import get_institution
from imagebridge.retention.models import BlobRemoval, RemovalState
from imagebridge.storage.blobs import BlobMismatch, BlobStore, BlobWriter
from imagebridge.storage.services import ensure_blob_rows, held_blobs, missing_blobs
from imagebridge.transfers import services
from imagebridge.transfers.framing import (
    MEDIA_TYPE,
    FrameData,
    FrameDecoder,
    FrameEnd,
    FrameStart,
    FramingError,
)
from imagebridge.transfers.models import Transfer, TransferInstance, TransferStatus
from imagebridge.transfers.services import Outcome, TransferError

# A blob this large is checked and made ready to store as soon as it has arrived, while
# the rest of its batch arrives; smaller ones cost less to check with the batch than to
# hand to another thread.
INTAKE_BYTES = 256 * 1024
# A blob of an uploaded batch: its digest as announced, its staged bytes (none: sent by
# reference) and their checks, under way.
Staged = tuple[str, BlobWriter | None, Future[Header] | None]

router = APIRouter(prefix="/api/v1", tags=["transfers"])
HubDep = Annotated[Hub, Depends(get_hub)]
MAX_INSTANCE_BYTES = 4 * 1024**3
MAX_REPORT_BYTES = 64 * 1024**2
MAX_BATCH_INSTANCES = 10000
# A batch streams to disk; beyond this its declared length alone is refused.
MAX_BATCH_BYTES = 64 * 1024**3
NOT_YOURS = "no such transfer, or not one your institution may act on"
RETAINED_AWAY = "the study's images are no longer held: removed under the retention policy"


class TransferIn(BaseModel):
    receiver: str = Field(description="Receiving institution's code")
    sender: str | None = Field(None, description="Sending institution (administrator only)")
    priority: Literal["urgent", "routine"] = "routine"
    reason: str = Field("", max_length=2000)
    study_instance_uids: list[str] = Field(
        default_factory=list, description="Studies the hub holds for the sender"
    )
    origin: Literal["api", "dicom"] = "api"
    calling_ae_title: str = Field("", max_length=16)
    idempotency_key: str | None = Field(None, max_length=64)
    sha256: list[Annotated[str, Field(pattern="^[0-9a-f]{64}$")]] = Field(
        default_factory=list,
        max_length=10000,
        description="A gateway's first instances to upload, by digest: the answer's "
        "'missing' names those the hub lacks (as POST /gateway/blobs/missing would)",
    )


class OutcomeIn(BaseModel):
    id: int
    outcome: Literal["delivered", "failed", "retry"]
    detail: str = Field("", max_length=500)
    sop_instance_uid: str = Field("", max_length=64)


class DeliveriesIn(BaseModel):
    instances: list[OutcomeIn] = Field(default_factory=list, max_length=10000)
    reports: list[OutcomeIn] = Field(default_factory=list, max_length=1000)


_PARTY = {"sender": Transfer.sender_institution_id, "receiver": Transfer.receiver_institution_id}


def _load(
    session: Session, transfer_id: str, actor: Actor, *roles: str, hold: bool = False
) -> Transfer:
    """The transfer, if this caller may act on it as one of the given roles; with ``hold``,
    its row held for a change (services._take_turn), and only if the caller may."""
    if hold:
        mine = None
        if not actor.network_wide:
            mine = or_(*(_PARTY[r] == actor.institution_id for r in roles))
        # Selected as the caller's only, so nothing is left to check.
        held = services.hold(session, transfer_id, mine)
        if held is None:
            raise HTTPException(403, NOT_YOURS)
        return held
    transfer = session.get(Transfer, transfer_id)
    if transfer is None:
        raise HTTPException(403, NOT_YOURS)
    if actor.network_wide:
        return transfer
    allowed = {
        "sender": transfer.sender_institution_id,
        "receiver": transfer.receiver_institution_id,
    }
    if actor.institution_id not in {allowed[r] for r in roles}:
        # The same answer as for a transfer that does not exist: confirm nothing.
        raise HTTPException(403, NOT_YOURS)
    return transfer


@router.post("/transfers", status_code=201)
def create(body: TransferIn, actor: Sender, hub: HubDep) -> dict[str, Any]:
    if body.sha256 and actor.kind != "gateway":
        raise HTTPException(422, "only a gateway uploads instances: sha256 is for gateways")
    held: set[str] = set()
    with hub.sessions() as session, session.begin():
        if not actor.network_wide:
            sender = session.get(Institution, actor.institution_id)
            if body.sender is not None and sender is not None and body.sender != sender.code:
                raise HTTPException(403, "one sends for one's own institution only")
        elif body.sender is None:
            raise HTTPException(422, "sender is required")
        else:
            sender = get_institution(session, body.sender)
        receiver = get_institution(session, body.receiver)
        if sender is None or receiver is None:
            raise HTTPException(404, "unknown sender or receiver institution")
        refusal = exchange_refusal(session, sender.id, receiver.id)
        if refusal:
            raise HTTPException(403, refusal)
        try:
            transfer, made = services.create_transfer(
                session,
                sender=sender,
                receiver=receiver,
                actor=actor,
                priority=body.priority,
                reason=body.reason,
                origin=body.origin,
                calling_ae_title=body.calling_ae_title,
                idempotency_key=body.idempotency_key,
                study_instance_uids=body.study_instance_uids,
            )
        except TransferError as exc:
            raise HTTPException(409, str(exc)) from exc
        if body.study_instance_uids:
            # Removed for good, not merely set aside (a new transfer brings those back).
            removed = session.scalars(
                select(BlobRemoval.sha256)
                .join(TransferInstance, TransferInstance.blob_sha256 == BlobRemoval.sha256)
                .where(
                    TransferInstance.transfer_id == transfer.id,
                    BlobRemoval.state == RemovalState.removed,
                )
            )
            gone = [sha for sha in set(removed) if not hub.blobs.exists(sha)]
            if gone:
                # Accepted, it could never be delivered.
                raise HTTPException(409, RETAINED_AWAY)
        # Made just now from nothing: it carries no study or report to read back.
        empty = made and not body.study_instance_uids
        out = services.describe(session, transfer, (sender, receiver) if empty else None)
        if body.sha256:
            held = held_blobs(session, body.sha256)
        receiver_id = receiver.id
    if body.sha256:
        # Asked with the opening, the first batch costs the gateway one request less.
        out["missing"] = missing_blobs(hub.blobs, body.sha256, held)
    hub.notifier.nudge(receiver_id)
    return out


@router.get("/transfers")
def list_transfers(
    actor: Tracker,
    hub: HubDep,
    box: Literal["inbox", "outbox", "all"] = "all",
    status: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    query = select(Transfer)
    if not actor.network_wide:
        me = actor.institution_id
        if box == "inbox":
            query = query.where(Transfer.receiver_institution_id == me)
        elif box == "outbox":
            query = query.where(Transfer.sender_institution_id == me)
        else:
            query = query.where(
                (Transfer.receiver_institution_id == me) | (Transfer.sender_institution_id == me)
            )
    if status:
        query = query.where(Transfer.status == status)
    query = query.order_by(Transfer.priority_rank, Transfer.created_at.desc()).limit(limit)
    with hub.sessions() as session:
        return [services.describe(session, t) for t in session.scalars(query)]


@router.get("/transfers/{transfer_id}")
def get_transfer(transfer_id: str, actor: Tracker, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session:
        return services.describe(session, _load(session, transfer_id, actor, "sender", "receiver"))


class CloseIn(BaseModel):
    """How many instances the sending gateway declares for the transfer, and how it knows."""

    instances_declared: int = Field(ge=0, le=10_000_000)
    declared_by: Literal["gateway", "pacs"] = Field(
        "gateway",
        description="gateway: the instances it acknowledged to its PACS; "
        "pacs: the PACS's own count of the study (NumberOfStudyRelatedInstances)",
    )
    interrupted: bool = Field(
        False, description="An association was aborted and the study was not sent again"
    )


@router.post("/transfers/{transfer_id}/close")
def close(
    transfer_id: str, actor: GatewayActor, hub: HubDep, body: CloseIn | None = None
) -> dict[str, Any]:
    """The sending gateway has uploaded everything it will for this transfer. It is
    delivered only once the receiver confirms every instance declared here (without a
    declaration: every instance the hub received)."""
    declared = (
        services.Declared(body.instances_declared, body.declared_by, body.interrupted)
        if body is not None
        else None
    )
    with hub.sessions() as session, session.begin():
        transfer = _load(session, transfer_id, actor, "sender", hold=True)
        services.close_transfer(session, transfer, actor, declared)
        out = services.describe(session, transfer)
        receiver_id = transfer.receiver_institution_id
    hub.notifier.nudge(receiver_id)
    return out


@router.post("/transfers/{transfer_id}/retry")
def retry(transfer_id: str, actor: Tracker, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        transfer = _load(session, transfer_id, actor, "sender", "receiver", hold=True)
        services.retry_failed(session, transfer, actor)
        out = services.describe(session, transfer)
        receiver_id = transfer.receiver_institution_id
    hub.notifier.nudge(receiver_id)
    return out


@router.post("/transfers/{transfer_id}/deliveries")
def deliveries(
    transfer_id: str, body: DeliveriesIn, actor: GatewayActor, hub: HubDep
) -> dict[str, Any]:
    """The receiving gateway reports what reached its PACS."""
    with hub.sessions() as session, session.begin():
        transfer = _load(session, transfer_id, actor, "receiver", hold=True)
        services.record_deliveries(
            session,
            transfer,
            [Outcome(o.id, o.outcome, o.detail) for o in body.instances],
            [Outcome(o.id, o.outcome, o.detail, o.sop_instance_uid) for o in body.reports],
            actor,
        )
        return {"status": transfer.status}


@router.post("/transfers/{transfer_id}/reports", status_code=201, max_body_size=MAX_REPORT_BYTES)
async def attach_report(
    transfer_id: str,
    request: Request,
    actor: Sender,
    hub: HubDep,
    title: str = Query("Report", max_length=64),
    study_instance_uid: str | None = Query(None, max_length=64),
) -> dict[str, Any]:
    """Attach a report (the body: application/pdf or text/plain) to a transfer."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in services.REPORT_MEDIA_TYPES:
        raise HTTPException(415, "a report is application/pdf or text/plain")
    # Who may attach is settled before a byte of the body is read.
    await run_in_threadpool(_check_sender, hub, transfer_id, actor)
    writer = hub.blobs.writer()
    size = 0
    head = b""
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_REPORT_BYTES:
                raise HTTPException(413, f"a report is at most {MAX_REPORT_BYTES} bytes")
            if len(head) < 8:
                head += chunk[:8]
            writer.write(chunk)
        _check_report(media_type, head, size, writer.staged_path())
        return await run_in_threadpool(
            _store_report, hub, writer, transfer_id, actor, media_type, title, study_instance_uid
        )
    except ClientDisconnect as exc:
        raise HTTPException(400, "the upload was cut off") from exc
    finally:
        writer.abort()


def _check_sender(hub: Hub, transfer_id: str, actor: Actor) -> None:
    with hub.sessions() as session:
        _load(session, transfer_id, actor, "sender")


def _check_report(media_type: str, head: bytes, size: int, path: Path) -> None:
    if size == 0:
        raise HTTPException(422, "the report is empty")
    if media_type == "application/pdf" and not head.startswith(b"%PDF-"):
        raise HTTPException(422, "the body is not a PDF document")
    if media_type == "text/plain":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HTTPException(422, "a text report must be UTF-8") from exc
        if "\x00" in text:
            raise HTTPException(422, "a text report cannot contain NUL characters")


def _store_report(
    hub: Hub,
    writer: BlobWriter,
    transfer_id: str,
    actor: Actor,
    media_type: str,
    title: str,
    study_uid: str | None,
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        transfer = _load(session, transfer_id, actor, "sender")
        try:
            # Refuse before storing: a refused report leaves no blob behind.
            study_uid = services.report_study(session, transfer, study_uid)
        except TransferError as exc:
            raise HTTPException(409, str(exc)) from exc
        sha, size = writer.commit()
        ensure_blob_rows(session, {sha: size})
        try:
            report = services.add_report(
                session,
                transfer,
                media_type=media_type,
                title=title,
                study_instance_uid=study_uid,
                sha256=sha,
                size=size,
                actor=actor,
            )
        except TransferError as exc:
            raise HTTPException(409, str(exc)) from exc
        receiver_id = transfer.receiver_institution_id
        out = {"id": report.id, "sha256": sha, "study_instance_uid": report.study_instance_uid}
    hub.notifier.nudge(receiver_id)
    return out


@router.post(
    "/transfers/{transfer_id}/instances",
    max_body_size=MAX_BATCH_BYTES,
    openapi_extra={"requestBody": {"content": {MEDIA_TYPE: {"schema": {"type": "string"}}}}},
)
async def upload_instances(
    transfer_id: str,
    request: Request,
    actor: GatewayActor,
    hub: HubDep,
    close: bool = Query(
        False,
        description="The last batch: close the transfer with it, in the same transaction (as "
        "POST .../close would, with the declaration below). Sent again once the transfer is "
        "closed, it is answered from what the transfer carries, and changes nothing.",
    ),
    instances_declared: int | None = Query(None, ge=0, le=10_000_000),
    declared_by: Literal["gateway", "pacs"] = Query("gateway"),
    interrupted: bool = Query(False),
) -> dict[str, Any]:
    """A batch of instances from the sending gateway, as a stream of framed blobs.

    Each blob is hashed as it arrives and checked before it is stored; a blob that does
    not match its digest, is not a readable DICOM dataset, or would mix up a patient is
    refused on its own, with the reason, and nothing of it is kept.
    """
    if instances_declared is not None and not close:
        raise HTTPException(422, "instances_declared goes with close=true only")
    closing: services.Declared | None = None
    if close and instances_declared is not None:
        closing = services.Declared(instances_declared, declared_by, interrupted)
    # Off the event loop: on SQLite a transaction may wait for another's write lock.
    replay = await run_in_threadpool(_may_upload, hub, transfer_id, actor, close)
    decoder = FrameDecoder(MAX_INSTANCE_BYTES)
    staged: list[Staged] = []
    writer: BlobWriter | None = None
    try:
        async for chunk in request.stream():
            for event in decoder.feed(chunk):
                if isinstance(event, FrameData):
                    if writer is not None:
                        writer.write(event.data)
                elif isinstance(event, FrameStart):
                    if len(staged) >= MAX_BATCH_INSTANCES:
                        raise HTTPException(
                            413, f"at most {MAX_BATCH_INSTANCES} instances in one batch"
                        )
                    # A replay's bytes are not kept: only its digests are answered.
                    writer = hub.blobs.writer() if event.length and not replay else None
                elif isinstance(event, FrameEnd):
                    arrived = None
                    if writer is not None:
                        writer.finish()
                        if writer.size >= INTAKE_BYTES:
                            # Checked and made ready to store while the rest arrives.
                            arrived = hub.intake.submit(_arrived, writer, event.sha256)
                    staged.append((event.sha256, writer, arrived))
                    writer = None
        decoder.close()
        if replay:
            digests = [sha for sha, _, _ in staged]
            return await run_in_threadpool(_replayed, hub, transfer_id, digests, actor)
        return await run_in_threadpool(_ingest, hub, transfer_id, staged, actor, close, closing)
    except FramingError as exc:
        raise HTTPException(400, f"malformed blob stream: {exc}") from exc
    except ClientDisconnect as exc:
        # The gateway went away mid-batch: nothing of it is kept, and it sends it again.
        raise HTTPException(400, "the upload was cut off") from exc
    finally:
        for _, w, arrived in staged:
            if w is None:
                continue
            if arrived is not None:
                # Let go of the staged bytes once nothing reads them any more.
                arrived.cancel()
                arrived.add_done_callback(partial(_let_go, w))
            else:
                w.abort()
        if writer is not None:
            writer.abort()


def _may_upload(hub: Hub, transfer_id: str, actor: Actor, close: bool) -> bool:
    """Refuse a batch before a byte of it is read; True if it is a closing batch sent again
    (its answer lost), which finds its transfer closed."""
    with hub.sessions() as session:
        transfer = _load(session, transfer_id, actor, "sender")
        replay = close and transfer.status != TransferStatus.receiving
        if transfer.status != TransferStatus.receiving and not replay:
            raise HTTPException(409, f"transfer is {transfer.status}, no longer receiving")
        refusal = exchange_refusal(
            session, transfer.sender_institution_id, transfer.receiver_institution_id
        )
        if refusal and not replay:
            raise HTTPException(403, refusal)
        return replay


def _let_go(writer: BlobWriter, _: object) -> None:
    writer.abort()


def _checked(writer: BlobWriter) -> Header:
    """The header of a blob received; BadDataset if it is not one to store."""
    path = writer.staged_path()
    header = read_header(path)
    if not preamble_is_clean(path):
        # Gateways zero it; bytes there could be an executable (a polyglot file).
        raise BadDataset("the 128-byte preamble is not zeros")
    return header


def _arrived(writer: BlobWriter, sha256: str) -> Header:
    """A blob as soon as it has arrived: checked, then its bytes made ready to store
    (synced, or uploaded to an object store). BadDataset or BlobMismatch: refused."""
    header = _checked(writer)
    writer.prepare(sha256)
    return header


def _held(blobs: BlobStore, sha: str) -> tuple[Header, int]:
    """The header and size of a blob sent by reference: from its file, or streamed from an
    object store."""
    if not blobs.exists(sha):
        raise BadDataset("the hub does not hold this blob; send its bytes")
    path = blobs.local_path(sha)
    if path is not None:
        return read_header(path), path.stat().st_size
    with blobs.open(sha) as fh:
        return read_header(fh), fh.seek(0, io.SEEK_END)


def _replayed(hub: Hub, transfer_id: str, digests: list[str], actor: Actor) -> dict[str, Any]:
    with hub.sessions() as session:
        return _carried(session, _load(session, transfer_id, actor, "sender"), digests)


def _carried(session: Session, transfer: Transfer, digests: list[str]) -> dict[str, Any]:
    """The answer to a closing batch whose transfer is closed (sent again, its first answer
    lost): what the transfer carries of it was accepted then; the rest was refused, for the
    reasons the first answer gave (from its audit event), or for coming too late."""
    carried = set(
        session.scalars(
            select(TransferInstance.blob_sha256).where(
                TransferInstance.transfer_id == transfer.id,
                TransferInstance.blob_sha256.in_(set(digests)),
            )
        )
    )
    late = f"transfer is {transfer.status}, no longer receiving"
    first = audit.refusals(session, transfer.id) if set(digests) - carried else {}
    return {
        "accepted": [d for d in digests if d in carried],
        "refused": [
            {"sha256": d, "reason": first.get(d, late)} for d in digests if d not in carried
        ],
        "status": transfer.status,
    }


def _ingest(
    hub: Hub,
    transfer_id: str,
    staged: list[Staged],
    actor: Actor,
    close: bool = False,
    closing: services.Declared | None = None,
) -> dict[str, Any]:
    """Store and index a batch; with ``close``, close the transfer with it (``closing``: the
    sender's declaration)."""
    refused: list[dict[str, str]] = []
    ready: list[tuple[Header, str, int]] = []
    checked: list[tuple[Header, str, BlobWriter]] = []
    for sha, writer, arrived in staged:
        try:
            if writer is None:
                header, size = _held(hub.blobs, sha)
                ready.append((header, sha, size))
            else:
                header = arrived.result() if arrived is not None else _checked(writer)
                checked.append((header, sha, writer))
        except (BadDataset, BlobMismatch) as exc:
            refused.append({"sha256": sha, "reason": str(exc)})
    committed = hub.blobs.commit_batch([(w, sha) for _, sha, w in checked])
    for (header, sha, _), outcome in zip(checked, committed, strict=True):
        if isinstance(outcome, BlobMismatch):
            refused.append({"sha256": sha, "reason": str(outcome)})
        else:
            ready.append((header, outcome[0], outcome[1]))
    with hub.sessions() as session, session.begin():
        transfer = _load(session, transfer_id, actor, "sender", hold=True)
        if close and transfer.status != TransferStatus.receiving:
            # Its first attempt closed it while this one was on its way: the same answer.
            return _carried(session, transfer, [sha for sha, _, _ in staged])
        ensure_blob_rows(session, {sha: size for _, sha, size in ready})
        try:
            result = services.add_instances(session, transfer, ready, actor)
        except TransferError as exc:
            raise HTTPException(409, str(exc)) from exc
        refused += [{"sha256": s, "reason": r} for s, r in result.refused]
        if refused:
            record(
                session,
                audit.REFUSED,
                "failure",
                institution_id=transfer.sender_institution_id,
                transfer_ref=transfer.id,
                detail={"refused": refused[:50]},
                **actor.audit(),
            )
        if close:
            services.close_transfer(session, transfer, actor, closing)
        receiver_id = transfer.receiver_institution_id
        status = transfer.status
    hub.notifier.nudge(receiver_id)
    return {"accepted": result.accepted, "refused": refused, "status": status}

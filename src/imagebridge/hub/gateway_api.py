"""The hub's side of the gateway protocol: configuration, blobs, work and audit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from imagebridge.actors import Actor
from imagebridge.agreements.services import institutions_in_force, no_agreement
from imagebridge.audit.services import record
from imagebridge.hub.auth import GatewayActor, get_hub, public
from imagebridge.hub.state import Hub
from imagebridge.institutions.models import Institution
from imagebridge.nhs import normalise_nhs_number
from imagebridge.patients import services as patient_index
from imagebridge.storage.models import Blob
from imagebridge.storage.services import held_blobs, missing_blobs
from imagebridge.transfers import services
from imagebridge.transfers.framing import CHUNK, FRAME_HEADER_SIZE, MEDIA_TYPE, frame_header
from imagebridge.transfers.models import Report, Transfer, TransferInstance

router = APIRouter(prefix="/api/v1", tags=["gateway protocol"])
HubDep = Annotated[Hub, Depends(get_hub)]
# Long enough for a batch to reach a slow PACS; a lease a gateway abandons comes back after it.
LEASE_SECONDS = 120.0
# NHS numbers in one batch lookup: as many as the matches of one C-FIND.
MAX_LOOKUPS = 1000


class Digests(BaseModel):
    sha256: list[str] = Field(max_length=10000)


class GatewayEvent(BaseModel):
    at: datetime
    action: str = Field(pattern=r"^[a-z0-9_-]+:[a-z0-9_-]+:[a-z0-9_-]+$")
    outcome: str = Field(pattern=r"^(success|failure|refused)$")
    patient_ref: str = Field("", max_length=130)
    study_ref: str = Field("", max_length=64)
    source_address: str = Field("", max_length=64)
    detail: dict[str, Any] = Field(default_factory=dict)


class GatewayEvents(BaseModel):
    events: list[GatewayEvent] = Field(max_length=1000)


@router.get("/health", dependencies=[Depends(public)])
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/gateway/config")
def config(actor: GatewayActor, hub: HubDep) -> dict[str, Any]:
    """The routing table: which called AE title sends to which institution, how urgently."""
    with hub.sessions() as session:
        institutions = session.scalars(select(Institution).order_by(Institution.code)).all()
        me = next(i for i in institutions if i.id == actor.institution_id)
        # One read of the agreements for the whole directory (hundreds of institutions).
        signed = institutions_in_force(session)
        routes = []
        for i in institutions:
            if i.id == me.id:
                continue
            # The gateway refuses a C-STORE to a destination the hub would refuse.
            refusal = "" if i.id in signed else no_agreement(i.code)
            routes.append(
                {
                    "ae_title": i.routing_ae_title,
                    "institution": i.code,
                    "priority": "routine",
                    "refusal": refusal,
                }
            )
            if i.urgent_ae_title:
                routes.append(
                    {
                        "ae_title": i.urgent_ae_title,
                        "institution": i.code,
                        "priority": "urgent",
                        "refusal": refusal,
                    }
                )
        return {
            "institution": me.code,
            "name": me.name,
            "refusal": "" if me.id in signed else no_agreement(me.code),
            "routes": routes,
        }


@router.post("/gateway/blobs/missing")
def missing(body: Digests, actor: GatewayActor, hub: HubDep) -> dict[str, list[str]]:
    """Which of these blobs the hub does not hold yet: only those need uploading."""
    with hub.sessions() as session:
        held = held_blobs(session, body.sha256)
    return {"missing": missing_blobs(hub.blobs, body.sha256, held)}


@router.post("/gateway/blobs", response_class=StreamingResponse)
def download(body: Digests, actor: GatewayActor, hub: HubDep) -> StreamingResponse:
    """Blobs addressed to this gateway's institution, as a stream of framed blobs."""
    wanted = list(dict.fromkeys(body.sha256))
    with hub.sessions() as session:
        mine = Transfer.receiver_institution_id == actor.institution_id
        allowed = set(
            session.scalars(
                select(TransferInstance.blob_sha256)
                .join(Transfer, Transfer.id == TransferInstance.transfer_id)
                .where(mine, TransferInstance.blob_sha256.in_(wanted))
            )
        ) | set(
            session.scalars(
                select(Report.blob_sha256)
                .join(Transfer, Transfer.id == Report.transfer_id)
                .where(mine, Report.blob_sha256.in_(wanted))
            )
        )
    return framed_blobs(hub, wanted, allowed, "not addressed to this institution")


def framed_blobs(hub: Hub, wanted: list[str], allowed: set[str], why: str) -> StreamingResponse:
    """The wanted blobs as one framed stream; 404 if one is not allowed (``why``) or not held."""
    with hub.sessions() as session:
        sizes: dict[str, int] = {
            sha: size
            for sha, size in session.execute(
                select(Blob.sha256, Blob.size).where(Blob.sha256.in_(wanted))
            )
        }
    refused = [d for d in wanted if d not in allowed or d not in sizes]
    if refused:
        raise HTTPException(404, f"{len(refused)} blob(s) {why}")
    # A known length spares both sides chunked transfer coding on hundreds of megabytes.
    length = sum(FRAME_HEADER_SIZE + sizes[d] for d in wanted)

    def frames() -> Iterator[bytes]:
        for sha in wanted:
            with hub.blobs.open(sha) as fh:
                yield frame_header(sha, sizes[sha])
                while chunk := fh.read(CHUNK):
                    yield chunk

    async def stream() -> AsyncIterator[bytes]:
        # Reads straight from the event loop: blobs are local files, mostly in the page
        # cache, and handing each megabyte to a worker thread cost more than reading it.
        for chunk in frames():
            yield chunk

    # An object store's blobs come over the network: those are read in worker threads,
    # where Starlette iterates a plain iterator.
    local = not wanted or hub.blobs.local_path(wanted[0]) is not None
    return StreamingResponse(
        stream() if local else frames(),
        media_type=MEDIA_TYPE,
        headers={"Content-Length": str(length)},
    )


def _take_work(hub: Hub, actor: Actor, limit: int, max_bytes: int | None) -> dict[str, Any] | None:
    with hub.sessions() as session, session.begin():
        assert actor.institution_id is not None
        batch = services.next_work(session, actor.institution_id, limit, LEASE_SECONDS, max_bytes)
        if batch is None:
            return None
        t = batch.transfer
        return {
            "transfer": {
                "id": t.id,
                "sender": batch.sender_code,
                "priority": t.priority,
                "status": t.status,
                "reason": t.reason,
            },
            "instances": [vars(i) for i in batch.instances],
            "reports": [vars(r) for r in batch.reports],
        }


@router.get("/gateway/work")
async def work(
    actor: GatewayActor,
    hub: HubDep,
    limit: int = Query(32, ge=1, le=1000),
    max_bytes: int | None = Query(
        None, ge=1, description="Bytes the batch may come to (it still holds one item)"
    ),
    wait: float = Query(0.0, ge=0.0, description="Seconds to wait for work (long poll)"),
) -> dict[str, Any]:
    """Lease the next items to deliver, urgent transfers first; waits up to `wait` seconds."""
    assert actor.institution_id is not None
    deadline = time.monotonic() + min(wait, hub.settings.inbox_wait_seconds)
    while True:
        event = hub.notifier.event(actor.institution_id)
        found = await run_in_threadpool(_take_work, hub, actor, limit, max_bytes)
        if found is not None:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"transfer": None, "instances": [], "reports": []}
        with contextlib.suppress(TimeoutError):
            # The database is looked at again meanwhile (hub/inbox.py says how often).
            recheck = hub.notifier.recheck_seconds()
            await asyncio.wait_for(event.wait(), timeout=min(remaining, recheck))


@router.post("/gateway/work/release")
def release(actor: GatewayActor, hub: HubDep) -> dict[str, int]:
    """A starting gateway hands back whatever it had leased before it stopped."""
    with hub.sessions() as session, session.begin():
        assert actor.institution_id is not None
        count = services.release_leases(session, actor.institution_id)
    hub.notifier.nudge(actor.institution_id)
    return {"released": count}


class LocalIdQuery(BaseModel):
    nhs_number: str = Field(max_length=32)


@router.post("/gateway/patients/local-id")
def local_patient_id(body: LocalIdQuery, actor: GatewayActor, hub: HubDep) -> dict[str, Any]:
    """This institution's local ID for an NHS number, from the patient index, with the
    demographics its records hold for it; ``conflict`` says why there is none to file under.
    The NHS number travels in the body: URLs end up in logs."""
    nhs_number = normalise_nhs_number(body.nhs_number)
    if nhs_number is None:
        raise HTTPException(422, "not a valid NHS number (10 digits with a mod-11 check digit)")
    assert actor.institution_id is not None
    with hub.sessions() as session, session.begin():
        found = patient_index.local_id(session, actor.institution_id, nhs_number)
        audit_lookups(session, actor, {nhs_number: found}, operation="local-id")
    return found.as_json()


class LocalIdsQuery(BaseModel):
    nhs_numbers: list[Annotated[str, Field(max_length=32)]] = Field(max_length=MAX_LOOKUPS)


@router.post("/gateway/patients/local-ids")
def local_patient_ids(body: LocalIdsQuery, actor: GatewayActor, hub: HubDep) -> dict[str, Any]:
    """The answer of ``/gateway/patients/local-id`` for each of many NHS numbers at once,
    keyed by the number as normalised: the matches of one C-FIND name many patients, and
    a request each would cost more than the query. The batch is audited as one lookup
    naming every number, as ATNA audits a query."""
    numbers = {n: normalise_nhs_number(n) for n in body.nhs_numbers}
    invalid = [n for n, normal in numbers.items() if normal is None]
    if invalid:
        raise HTTPException(
            422, f"{len(invalid)} not valid NHS numbers (10 digits with a mod-11 check digit)"
        )
    assert actor.institution_id is not None
    asked = sorted({n for n in numbers.values() if n is not None})
    if not asked:
        return {"answers": {}}  # nothing looked up, nothing to audit
    with hub.sessions() as session, session.begin():
        found = patient_index.local_ids(session, actor.institution_id, asked)
        audit_lookups(session, actor, found)
    return {"answers": {n: found[n].as_json() for n in asked}}


def audit_lookups(
    session: Session,
    actor: Actor,
    found: dict[str, patient_index.LocalId],
    operation: str = "local-ids",
) -> None:
    """Local-ID lookups as one event naming every number (one patient's, or a query's, here
    or in ``/gateway/find``'s answer): ``found`` counts those with a local ID."""
    asked = sorted(found)
    record(
        session,
        "patient:identity:lookup",
        institution_id=actor.institution_id,
        patient_ref=asked[0] if len(asked) == 1 else "",
        detail={
            "operation": operation,
            "nhs_numbers": asked,
            "found": sum(1 for f in found.values() if f.patient_id is not None),
            "conflicts": {n: f.conflict for n, f in sorted(found.items()) if f.conflict},
        },
        patients=asked if len(asked) > 1 else (),
        **actor.audit(),
    )


@router.post("/gateway/audit", status_code=201)
def gateway_audit(body: GatewayEvents, actor: GatewayActor, hub: HubDep) -> dict[str, int]:
    """Events the gateway saw first (associations, C-STOREs), forwarded from its journal."""
    with hub.sessions() as session, session.begin():
        for e in body.events:
            event = record(
                session,
                e.action,
                e.outcome,
                actor_type="gateway",
                actor=actor.name,
                institution_id=actor.institution_id,
                patient_ref=e.patient_ref,
                study_ref=e.study_ref,
                source_address=e.source_address,
                detail=e.detail,
            )
            event.at = e.at
    return {"recorded": len(body.events)}

"""HTTP API of the audit trail: the auditor's search and the chain's verification."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from imagebridge.audit import services
from imagebridge.audit.chain import Anchor
from imagebridge.counts import INT32_MAX
from imagebridge.hub.auth import Auditor, get_hub
from imagebridge.hub.state import Hub

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get("/audit")
def list_events(
    actor: Auditor,
    hub: Annotated[Hub, Depends(get_hub)],
    action: Annotated[str | None, Query(description="Exact tag, or a prefix ending in ':'")] = None,
    transfer: str | None = None,
    outcome: str | None = None,
    patient: Annotated[
        str | None, Query(description="Patient reference (PatientID) exactly")
    ] = None,
    study: Annotated[str | None, Query(description="StudyInstanceUID")] = None,
    user: Annotated[str | None, Query(description="The actor: user or gateway name")] = None,
    institution: Annotated[str | None, Query(description="Institution code")] = None,
    since: Annotated[
        datetime | None, Query(description="From this time (ISO 8601, with zone)")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="Before this time (ISO 8601, with zone)")
    ] = None,
    after_id: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[dict[str, Any]]:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(422, f"{name} needs a time zone, e.g. 2026-11-28T09:00:00Z")
    query = services.search(
        action=action,
        transfer=transfer,
        outcome=outcome,
        patient=patient,
        study=study,
        actor=user,
        institution=institution,
        since=since,
        until=until,
        after_id=after_id,
        limit=limit,
    )
    with hub.sessions() as session:
        return [services.as_dict(e) for e in session.scalars(query)]


@router.get("/audit/verify")
def verify(
    actor: Auditor,
    hub: Annotated[Hub, Depends(get_hub)],
    anchor: Annotated[
        tuple[str, ...],
        Query(description="ID or ID:HASH of an event known to exist, e.g. a head noted earlier"),
    ] = (),
) -> dict[str, Any]:
    """Walk the hash chain and report the first altered, inserted or deleted event."""
    try:
        anchors = [Anchor.parse(a) for a in anchor]
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    report = services.verify_chain(hub.sessions, anchors)
    with hub.sessions() as session, session.begin():
        services.record(
            session,
            "audit:trail:verified",
            "success" if report.intact else "failure",
            institution_id=actor.institution_id,
            detail={"events": report.events, "fault": report.fault and report.fault.kind},
            **actor.audit(),
        )
    return {
        "intact": report.intact,
        "events": report.events,
        "head": {"id": report.head_id, "hash": report.head_hash},
        "fault": asdict(report.fault) if report.fault else None,
    }

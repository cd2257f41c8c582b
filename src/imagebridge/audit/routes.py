"""HTTP API of the audit trail."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from imagebridge.audit.models import AuditEvent
from imagebridge.hub.auth import Admin, get_hub
from imagebridge.hub.state import Hub

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get("/audit")
def list_events(
    actor: Admin,
    hub: Annotated[Hub, Depends(get_hub)],
    action: str | None = Query(None, description="Exact tag, or a prefix ending in ':'"),
    transfer: str | None = None,
    outcome: str | None = None,
    after_id: int = 0,
    limit: int = Query(200, ge=1, le=5000),
) -> list[dict[str, Any]]:
    query = select(AuditEvent).where(AuditEvent.id > after_id)
    if action:
        query = query.where(
            AuditEvent.action.startswith(action)
            if action.endswith(":")
            else AuditEvent.action == action
        )
    if transfer:
        query = query.where(AuditEvent.transfer_ref == transfer)
    if outcome:
        query = query.where(AuditEvent.outcome == outcome)
    with hub.sessions() as session:
        return [
            {
                "id": e.id,
                "at": e.at,
                "actor_type": e.actor_type,
                "actor": e.actor,
                "institution_id": e.institution_id,
                "action": e.action,
                "outcome": e.outcome,
                "patient_ref": e.patient_ref,
                "study_ref": e.study_ref,
                "transfer_ref": e.transfer_ref,
                "source_address": e.source_address,
                "detail": e.detail,
            }
            for e in session.scalars(query.order_by(AuditEvent.id).limit(limit))
        ]

"""Legal holds: administrators keep a study's images beyond the retention period."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.audit.services import record
from imagebridge.counts import RowId
from imagebridge.hub.auth import InstitutionAdmin, get_hub
from imagebridge.hub.state import Hub
from imagebridge.institutions.models import Institution
from imagebridge.institutions.services import get_institution
from imagebridge.retention import services
from imagebridge.retention.models import LegalHold
from imagebridge.retention.services import HoldError

router = APIRouter(prefix="/api/v1", tags=["retention"])
HubDep = Annotated[Hub, Depends(get_hub)]


class HoldIn(BaseModel):
    study_instance_uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$")
    reason: str = Field(
        min_length=1, max_length=2000, description="Why (e.g. the claim's reference)"
    )
    institution: str | None = Field(
        None, description="For which institution (network administrators); default: one's own"
    )


class ReleaseIn(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


def _out(session: Session, hold: LegalHold) -> dict[str, Any]:
    code = session.scalar(select(Institution.code).where(Institution.id == hold.institution_id))
    return {
        "id": hold.id,
        "study_instance_uid": hold.study_instance_uid,
        "institution": code,
        "reason": hold.reason,
        "placed_by": hold.placed_by,
        "placed_at": hold.placed_at,
        "released_at": hold.released_at,
        "released_by": hold.released_by,
        "release_reason": hold.release_reason,
    }


@router.get("/legal-holds")
def list_holds(
    actor: InstitutionAdmin,
    hub: HubDep,
    status: Literal["active", "released", "all"] = "active",
) -> list[dict[str, Any]]:
    """The holds of one's institution (the network's administrators: every institution's)."""
    with hub.sessions() as session, session.begin():
        holds = services.holds_of(session, actor, status)
        record(
            session,
            "retention:hold:listed",
            institution_id=actor.institution_id,
            detail={"status": status, "holds": len(holds)},
            **actor.audit(),
        )
        return [_out(session, h) for h in holds]


@router.post("/legal-holds", status_code=201)
def place_hold(body: HoldIn, actor: InstitutionAdmin, hub: HubDep) -> dict[str, Any]:
    """Keep a study that the institution sent or received from removal, until released."""
    with hub.sessions() as session, session.begin():
        if body.institution is not None:
            institution = get_institution(session, body.institution)
        else:
            institution = session.get(Institution, actor.institution_id or 0)
        if institution is None:
            raise HTTPException(404, "no such institution")
        try:
            hold = services.place_hold(
                session, actor, institution, body.study_instance_uid, body.reason, hub.clock()
            )
        except HoldError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        return _out(session, hold)


@router.post("/legal-holds/{hold_id}/release")
def release_hold(
    hold_id: RowId, body: ReleaseIn, actor: InstitutionAdmin, hub: HubDep
) -> dict[str, Any]:
    """Lift a hold: the study's images follow the retention policy again."""
    with hub.sessions() as session, session.begin():
        try:
            hold = services.release_hold(session, actor, hold_id, body.reason, hub.clock())
        except HoldError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        return _out(session, hold)

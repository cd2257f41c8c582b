"""HTTP API of data sharing agreements."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select

from imagebridge.actors import manages
from imagebridge.agreements import services
from imagebridge.agreements.models import Agreement
from imagebridge.audit.services import record
from imagebridge.hub.auth import InstitutionAdmin, NetworkAdmin, get_hub
from imagebridge.hub.inbox import TASKS, WORK
from imagebridge.hub.state import Hub
from imagebridge.institutions.models import Institution
from imagebridge.institutions.services import get_institution

router = APIRouter(prefix="/api/v1", tags=["agreements"])
HubDep = Annotated[Hub, Depends(get_hub)]


class AgreementIn(BaseModel):
    version: str = Field(min_length=1, max_length=32)
    text_sha256: str = Field(description="SHA-256 (hex) of the signed agreement's text")
    signatory_name: str = Field(min_length=1, max_length=200)
    signatory_role: str = Field(min_length=1, max_length=200)
    signed_on: date
    consent_party: Literal["sender", "receiver"] = Field(
        description="Which organisation obtains the patient's consent for an exchange"
    )


class WithdrawIn(BaseModel):
    reason: str = Field(min_length=1, max_length=500)


def _out(a: Agreement, code: str) -> dict[str, Any]:
    return {
        "id": a.id,
        "institution": code,
        "version": a.version,
        "text_sha256": a.text_sha256,
        "signatory_name": a.signatory_name,
        "signatory_role": a.signatory_role,
        "signed_on": a.signed_on.isoformat(),
        "consent_party": a.consent_party,
        "recorded_at": a.recorded_at,
        "recorded_by": a.recorded_by,
        "in_force": a.withdrawn_at is None,
        "withdrawn_at": a.withdrawn_at,
        "withdrawn_reason": a.withdrawn_reason,
    }


@router.post("/institutions/{code}/agreements", status_code=201)
def record_agreement(
    code: str, body: AgreementIn, actor: NetworkAdmin, hub: HubDep
) -> dict[str, Any]:
    """Record an institution's signed agreement: from now it may exchange."""
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None:
            raise HTTPException(404, "no such institution")
        try:
            agreement = services.record_agreement(
                session,
                institution,
                version=body.version,
                text_sha256=body.text_sha256,
                signatory_name=body.signatory_name,
                signatory_role=body.signatory_role,
                signed_on=body.signed_on,
                consent_party=body.consent_party,
                recorded_by=actor.name,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        record(
            session,
            "agreement:agreement:recorded",
            institution_id=institution.id,
            detail={"version": body.version, "consent_party": body.consent_party},
            **actor.audit(),
        )
        return _out(agreement, code)


@router.post("/institutions/{code}/agreements/withdraw")
def withdraw(code: str, body: WithdrawIn, actor: InstitutionAdmin, hub: HubDep) -> dict[str, Any]:
    """Withdraw the institution's agreement: exchange stops at once, both ways."""
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None or not manages(actor, institution.id):
            raise HTTPException(404, "no such institution")
        count = services.withdraw(
            session, institution, by=actor.name, reason=body.reason, now=hub.clock()
        )
        if not count:
            raise HTTPException(409, "no agreement in force to withdraw")
        record(
            session,
            "agreement:agreement:withdrawn",
            institution_id=institution.id,
            detail={"reason": body.reason},
            **actor.audit(),
        )
    for topic in (WORK, TASKS):
        hub.notifier.nudge(institution.id, topic)
    return {"institution": code, "withdrawn": count}


@router.get("/agreements")
def list_agreements(actor: InstitutionAdmin, hub: HubDep) -> list[dict[str, Any]]:
    query = select(Agreement, Institution.code).join(
        Institution, Institution.id == Agreement.institution_id
    )
    if not actor.network_wide:
        query = query.where(Agreement.institution_id == actor.institution_id)
    with hub.sessions() as session:
        return [_out(a, code) for a, code in session.execute(query.order_by(Agreement.id))]

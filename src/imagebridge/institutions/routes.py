"""HTTP API of the directory: institutions and gateways."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.actors import manages
from imagebridge.audit.services import record
from imagebridge.counts import RowId
from imagebridge.hub.auth import DirectoryReader, InstitutionAdmin, NetworkAdmin, get_hub
from imagebridge.hub.state import Hub
from imagebridge.institutions.models import DiscoveryRule, Gateway, Institution
from imagebridge.institutions.services import (
    DirectoryError,
    create_institution,
    get_institution,
    issue_gateway,
    revoke_gateway,
)

router = APIRouter(prefix="/api/v1", tags=["directory"])
HubDep = Annotated[Hub, Depends(get_hub)]


class InstitutionIn(BaseModel):
    code: str = Field(examples=["RXH"])
    name: str = Field(min_length=1, max_length=200)
    routing_ae_title: str | None = None
    urgent_ae_title: str | None = None


class GatewayIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)


def _out(i: Institution) -> dict[str, Any]:
    return {
        "code": i.code,
        "name": i.name,
        "routing_ae_title": i.routing_ae_title,
        "urgent_ae_title": i.urgent_ae_title,
    }


@router.post("/institutions", status_code=201)
def add_institution(body: InstitutionIn, actor: NetworkAdmin, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        try:
            institution = create_institution(
                session, body.code, body.name, body.routing_ae_title, body.urgent_ae_title
            )
        except DirectoryError as exc:
            raise HTTPException(409, str(exc)) from exc
        record(
            session,
            "directory:institution:created",
            institution_id=institution.id,
            detail={"code": institution.code},
            **actor.audit(),
        )
        return _out(institution)


@router.get("/institutions")
def list_institutions(actor: DirectoryReader, hub: HubDep) -> list[dict[str, Any]]:
    with hub.sessions() as session:
        return [_out(i) for i in session.scalars(select(Institution).order_by(Institution.code))]


@router.post("/institutions/{code}/gateways", status_code=201)
def add_gateway(code: str, body: GatewayIn, actor: InstitutionAdmin, hub: HubDep) -> dict[str, Any]:
    """Register a gateway; its secret token is in this answer and nowhere else."""
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None or not manages(actor, institution.id):
            raise HTTPException(404, "no such institution")
        gateway, token = issue_gateway(session, institution, body.name)
        record(
            session,
            "directory:gateway:issued",
            institution_id=institution.id,
            detail={"gateway_id": gateway.id, "name": gateway.name},
            **actor.audit(),
        )
        return {"id": gateway.id, "institution": code, "name": gateway.name, "token": token}


@router.post("/gateways/{gateway_id}/revoke")
def revoke(gateway_id: RowId, actor: InstitutionAdmin, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        gateway = session.get(Gateway, gateway_id)
        if gateway is None or not manages(actor, gateway.institution_id):
            raise HTTPException(404, "no such gateway")
        revoke_gateway(session, gateway)
        record(
            session,
            "directory:gateway:revoked",
            institution_id=gateway.institution_id,
            detail={"gateway_id": gateway.id},
            **actor.audit(),
        )
    hub.notifier.revoked()
    return {"id": gateway_id, "revoked": True}


class DiscoveryIn(BaseModel):
    to: list[str] = Field(
        max_length=1000,
        description='Institution codes that may find this institution\'s studies; ["*"] for '
        "every institution with an agreement; [] for none",
    )


def _discovery_out(session: Session, institution: Institution) -> dict[str, Any]:
    rules = session.scalars(
        select(DiscoveryRule).where(DiscoveryRule.source_institution_id == institution.id)
    ).all()
    codes = []
    for rule in rules:
        if rule.viewer_institution_id is None:
            codes.append("*")
        else:
            viewer = session.get(Institution, rule.viewer_institution_id)
            codes.append(viewer.code if viewer else str(rule.viewer_institution_id))
    return {"institution": institution.code, "to": sorted(codes)}


@router.get("/institutions/{code}/discovery")
def discovery(code: str, actor: InstitutionAdmin, hub: HubDep) -> dict[str, Any]:
    """Who may find this institution's studies in network queries."""
    with hub.sessions() as session:
        institution = get_institution(session, code)
        if institution is None or not manages(actor, institution.id):
            raise HTTPException(404, "no such institution")
        return _discovery_out(session, institution)


@router.put("/institutions/{code}/discovery")
def set_discovery(
    code: str, body: DiscoveryIn, actor: InstitutionAdmin, hub: HubDep
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None or not manages(actor, institution.id):
            raise HTTPException(404, "no such institution")
        viewers: list[int | None] = []
        for other in dict.fromkeys(body.to):
            if other == "*":
                viewers.append(None)
                continue
            viewer = get_institution(session, other)
            if viewer is None:
                raise HTTPException(422, f"no such institution: {other}")
            viewers.append(viewer.id)
        for rule in session.scalars(
            select(DiscoveryRule).where(DiscoveryRule.source_institution_id == institution.id)
        ):
            session.delete(rule)
        session.flush()
        for viewer_id in viewers:
            session.add(
                DiscoveryRule(source_institution_id=institution.id, viewer_institution_id=viewer_id)
            )
        session.flush()
        record(
            session,
            "directory:discovery:changed",
            institution_id=institution.id,
            detail={"to": sorted(body.to)},
            **actor.audit(),
        )
        return _discovery_out(session, institution)

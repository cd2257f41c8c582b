"""What the administration pages show: institutions with their agreements, trusted
networks and discovery rules; users and roles; gateways and routing AE titles. Changes go
through the API, whose checks and audit events they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.accounts.models import Role, User
from imagebridge.accounts.permissions import Permission
from imagebridge.actors import Actor, manages
from imagebridge.agreements.services import active_agreement
from imagebridge.institutions.models import DiscoveryRule, Gateway, Institution, TrustedNetwork


@dataclass
class InstitutionView:
    institution: Institution
    managed: bool
    agreement: Any = None
    trusted_networks: list[str] = field(default_factory=list)
    discovery: list[str] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)


def institutions(session: Session, actor: Actor) -> list[InstitutionView]:
    """Every institution (the directory is shared); details only of those one manages."""
    everyone = session.scalars(select(Institution).order_by(Institution.code)).all()
    codes = {i.id: i.code for i in everyone}
    out = []
    for institution in everyone:
        view = InstitutionView(institution, manages(actor, institution.id))
        view.agreement = active_agreement(session, institution.id)
        if view.managed:
            view.trusted_networks = list(
                session.scalars(
                    select(TrustedNetwork.cidr).where(
                        TrustedNetwork.institution_id == institution.id
                    )
                )
            )
            view.discovery = sorted(
                codes.get(v, "?") if v is not None else "*"
                for v in session.scalars(
                    select(DiscoveryRule.viewer_institution_id).where(
                        DiscoveryRule.source_institution_id == institution.id
                    )
                )
            )
            view.gateways = list(
                session.scalars(
                    select(Gateway)
                    .where(Gateway.institution_id == institution.id)
                    .order_by(Gateway.revoked_at.is_not(None), Gateway.name)
                )
            )
        out.append(view)
    return out


def managed(views: list[InstitutionView]) -> list[InstitutionView]:
    return [v for v in views if v.managed]


def users(session: Session, actor: Actor) -> list[tuple[User, str]]:
    query = select(User, Institution.code).join(Institution, Institution.id == User.institution_id)
    if not actor.network_wide:
        query = query.where(User.institution_id == actor.institution_id)
    return [
        (u, code) for u, code in session.execute(query.order_by(Institution.code, User.username))
    ]


def roles(session: Session, actor: Actor) -> list[Role]:
    query = select(Role).order_by(Role.builtin.desc(), Role.name)
    if not actor.network_wide:
        query = query.where(Role.builtin.is_(True) | (Role.institution_id == actor.institution_id))
    return [
        r
        for r in session.scalars(query)
        # Only the network's administrators hand out network administration.
        if actor.network_wide or Permission.ADMIN_NETWORK.value not in r.permissions
    ]


PERMISSIONS = [p.value for p in Permission if p not in (Permission.ADMIN_NETWORK,)]

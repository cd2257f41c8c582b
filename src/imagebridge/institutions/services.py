"""The directory's operations: institutions, gateways and their credentials."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.db import utcnow
from imagebridge.institutions.models import Gateway, Institution

CODE_PATTERN = re.compile(r"^[A-Z0-9]{2,8}$")
AE_PATTERN = re.compile(r"^[A-Z0-9_]{1,16}$")


class DirectoryError(ValueError):
    pass


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_institution(
    session: Session,
    code: str,
    name: str,
    routing_ae_title: str | None = None,
    urgent_ae_title: str | None = None,
) -> Institution:
    if not CODE_PATTERN.match(code):
        raise DirectoryError("institution code must be 2-8 capital letters or digits")
    routing = routing_ae_title or f"IB_{code}"
    urgent = urgent_ae_title or f"IB_{code}_URG"
    for ae in (routing, urgent):
        if not AE_PATTERN.match(ae):
            raise DirectoryError(f"routing AE title {ae!r} must be 1-16 of A-Z, 0-9, _")
    taken = session.scalar(
        select(Institution).where(
            (Institution.code == code)
            | Institution.routing_ae_title.in_([routing, urgent])
            | Institution.urgent_ae_title.in_([routing, urgent])
        )
    )
    if taken is not None:
        raise DirectoryError("institution code or routing AE title already in use")
    institution = Institution(
        code=code, name=name, routing_ae_title=routing, urgent_ae_title=urgent
    )
    session.add(institution)
    session.flush()
    return institution


def get_institution(session: Session, code: str) -> Institution | None:
    return session.scalar(select(Institution).where(Institution.code == code))


def issue_gateway(session: Session, institution: Institution, name: str) -> tuple[Gateway, str]:
    """A new gateway credential; the token is returned once and only its hash is kept."""
    token = "ibg_" + secrets.token_urlsafe(32)
    gateway = Gateway(institution_id=institution.id, name=name, token_sha256=token_digest(token))
    session.add(gateway)
    session.flush()
    return gateway, token


def authenticate_gateway(session: Session, token: str) -> Gateway | None:
    gateway = session.scalar(select(Gateway).where(Gateway.token_sha256 == token_digest(token)))
    if gateway is None or gateway.revoked_at is not None:
        return None
    return gateway


def revoke_gateway(session: Session, gateway: Gateway) -> None:
    gateway.revoked_at = utcnow()

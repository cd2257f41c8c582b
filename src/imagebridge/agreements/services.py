"""Recording, withdrawing and checking data sharing agreements."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from imagebridge.agreements.models import Agreement
from imagebridge.institutions.models import Institution

CONSENT_PARTIES = ("sender", "receiver")


def in_force() -> ColumnElement[bool]:
    """The condition on Agreement that it is in force: signed and not withdrawn."""
    return Agreement.withdrawn_at.is_(None)


def active_agreement(session: Session, institution_id: int) -> Agreement | None:
    return session.scalar(
        select(Agreement)
        .where(Agreement.institution_id == institution_id, in_force())
        .order_by(Agreement.id.desc())
        .limit(1)
    )


def signed_ids() -> Select[int]:
    """The institutions with an agreement in force, as a subquery for IN."""
    return select(Agreement.institution_id).where(in_force())


def institutions_in_force(session: Session) -> set[int]:
    return set(session.scalars(signed_ids()))


def record_agreement(
    session: Session,
    institution: Institution,
    *,
    version: str,
    text_sha256: str,
    signatory_name: str,
    signatory_role: str,
    signed_on: date,
    consent_party: str,
    recorded_by: str,
) -> Agreement:
    if consent_party not in CONSENT_PARTIES:
        raise ValueError("consent_party is sender or receiver")
    text_sha256 = text_sha256.lower()
    if len(text_sha256) != 64 or any(c not in "0123456789abcdef" for c in text_sha256):
        raise ValueError("text_sha256 is the 64 hex digits of the agreement text's SHA-256")
    agreement = Agreement(
        institution_id=institution.id,
        version=version,
        text_sha256=text_sha256,
        signatory_name=signatory_name,
        signatory_role=signatory_role,
        signed_on=signed_on,
        consent_party=consent_party,
        recorded_by=recorded_by,
    )
    session.add(agreement)
    session.flush()
    return agreement


def withdraw(
    session: Session, institution: Institution, *, by: str, reason: str, now: datetime
) -> int:
    """Withdraw every agreement in force for the institution; returns how many."""
    rows = session.scalars(
        select(Agreement).where(Agreement.institution_id == institution.id, in_force())
    ).all()
    for a in rows:
        a.withdrawn_at, a.withdrawn_by, a.withdrawn_reason = now, by, reason
    return len(rows)


def exchange_refusal(session: Session, *institution_ids: int) -> str | None:
    """Why these institutions may not exchange now, or None when every one has an agreement
    in force."""
    # Only these institutions' agreements: a national directory has hundreds.
    signed = set(session.scalars(signed_ids().where(Agreement.institution_id.in_(institution_ids))))
    for institution_id in institution_ids:
        if institution_id not in signed:
            institution = session.get(Institution, institution_id)
            return no_agreement(institution.code if institution else str(institution_id))
    return None


def no_agreement(code: str) -> str:
    return f"institution {code} has no signed data sharing agreement in force"

"""Recording, searching and verifying audit events.

Events go into the same transaction as the action they record; their place in the hash chain
is fixed when that transaction flushes them (see models.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, select, union
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from imagebridge.audit.chain import Anchor, ChainReport, Row, walk
from imagebridge.audit.models import NAMED, AuditEvent, AuditEventPatient, AuditForwarding
from imagebridge.db import make_engine, make_sessionmaker
from imagebridge.institutions.models import Institution

log = logging.getLogger(__name__)

# A batch's refused instances, with the reasons (transfers/routes.py).
REFUSED = "transfer:instances:refused"
# Events read per transaction while verifying: writers wait at most for one page.
VERIFY_PAGE = 2000


def record(
    session: Session,
    action: str,
    outcome: str = "success",
    *,
    actor_type: str = "system",
    actor: str = "",
    institution_id: int | None = None,
    patient_ref: str = "",
    study_ref: str = "",
    transfer_ref: str = "",
    source_address: str = "",
    detail: dict[str, Any] | None = None,
    patients: Iterable[str] = (),
) -> AuditEvent:
    """Add an event to the session's transaction. ``patients``: those it names among several
    (listed in its detail too), which a search by patient must find it by."""
    if action.count(":") != 2:
        raise ValueError("audit actions are tagged area:subject:action")
    event = AuditEvent(
        action=action,
        outcome=outcome,
        actor_type=actor_type,
        actor=actor,
        institution_id=institution_id,
        patient_ref=patient_ref[:130],
        study_ref=study_ref[:64],
        transfer_ref=transfer_ref,
        source_address=source_address[:64],
        detail=detail or {},
    )
    named = sorted({p[:130] for p in patients if p})
    if named:
        setattr(event, NAMED, named)
    session.add(event)
    # The application log names the event, never the patient.
    log.info("audit %s %s actor=%s:%s", action, outcome, actor_type, actor)
    return event


def search(
    *,
    action: str | None = None,
    transfer: str | None = None,
    outcome: str | None = None,
    patient: str | None = None,
    study: str | None = None,
    actor: str | None = None,
    institution: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: int = 0,
    limit: int = 200,
) -> Select[AuditEvent]:
    """The auditor's query: every filter given must match; `until` is exclusive."""
    query = select(AuditEvent).where(AuditEvent.id > after_id)
    if action:
        query = query.where(
            AuditEvent.action.startswith(action, autoescape=True)
            if action.endswith(":")
            else AuditEvent.action == action
        )
    exact = {
        AuditEvent.transfer_ref: transfer,
        AuditEvent.outcome: outcome,
        AuditEvent.study_ref: study,
        AuditEvent.actor: actor,
    }
    for column, value in exact.items():
        if value:
            query = query.where(column == value)
    if patient:
        # The events about the patient, and those naming the patient among several: one list
        # of ids from the two indexes (an OR of the two would scan the whole trail).
        about = union(
            select(AuditEvent.id).where(AuditEvent.patient_ref == patient),
            select(AuditEventPatient.event_id).where(AuditEventPatient.patient_ref == patient),
        )
        query = query.where(AuditEvent.id.in_(about))
    if institution:
        code = select(Institution.id).where(Institution.code == institution.upper())
        query = query.where(AuditEvent.institution_id.in_(code.scalar_subquery()))
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at < until)
    return query.order_by(AuditEvent.id).limit(limit)


def refusals(session: Session, transfer_id: str) -> dict[str, str]:
    """The reasons the transfer's instances were refused for, by digest, as its
    ``transfer:instances:refused`` events keep them (the first 50 of each batch)."""
    found: dict[str, str] = {}
    for detail in session.scalars(
        select(AuditEvent.detail)
        .where(AuditEvent.transfer_ref == transfer_id, AuditEvent.action == REFUSED)
        .order_by(AuditEvent.id)
    ):
        for refused in detail.get("refused", []):
            found[refused["sha256"]] = refused["reason"]
    return found


def as_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": event.at,
        "actor_type": event.actor_type,
        "actor": event.actor,
        "institution_id": event.institution_id,
        "action": event.action,
        "outcome": event.outcome,
        "patient_ref": event.patient_ref,
        "study_ref": event.study_ref,
        "transfer_ref": event.transfer_ref,
        "source_address": event.source_address,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def verify_chain(sessions: sessionmaker[Session], anchors: Sequence[Anchor] = ()) -> ChainReport:
    """Walk the whole trail; the forwarding cursor is an anchor too (the repository has a copy)."""
    with sessions() as session, session.begin():
        cursor = session.get(AuditForwarding, 1)
        if cursor is not None and cursor.event_id:
            anchors = [*anchors, Anchor(cursor.event_id, cursor.event_hash, "audit repository")]

    def find_hash(digest: str) -> int | None:
        with sessions() as session, session.begin():
            found: int | None = session.scalar(
                select(AuditEvent.id).where(AuditEvent.hash == digest).limit(1)
            )
            return found

    return walk(_stored_rows(sessions), anchors, find_hash)


def _stored_rows(sessions: sessionmaker[Session]) -> Iterator[Row]:
    # Core rows, not ORM objects: the values exactly as stored, each page its own transaction.
    table = AuditEvent.__table__
    after = 0
    while True:
        with sessions() as session, session.begin():
            page = (
                session.execute(
                    select(table).where(table.c.id > after).order_by(table.c.id).limit(VERIFY_PAGE)
                )
                .mappings()
                .all()
            )
        if not page:
            return
        for row in page:
            yield dict(row)
        after = page[-1]["id"]


class VerifyError(Exception):
    """The trail cannot be read at all (no database, or one from before the chain)."""


def verify_database(database_url: str, anchors: Sequence[str] = ()) -> ChainReport:
    """Verify a hub's trail from its database URL, without changing anything in it."""
    try:
        parsed = [Anchor.parse(a) for a in anchors]
    except ValueError as exc:
        raise VerifyError(str(exc)) from exc
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:" and not Path(path).exists():
            raise VerifyError(f"no database at {path}")
    engine = make_engine(database_url)
    try:
        return verify_chain(make_sessionmaker(engine), parsed)
    except OperationalError as exc:
        raise VerifyError(
            "cannot read the audit trail; is the database at the current schema "
            f"(start the hub once to upgrade it)? {exc.orig}"
        ) from exc
    finally:
        engine.dispose()

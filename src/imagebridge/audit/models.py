"""The audit trail: an append-only, hash-chained table of structured events."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, event, inspect, select, text
from sqlalchemy.orm import Mapped, Session, UOWTransaction, mapped_column, relationship

from imagebridge.audit.chain import FIELDS, GENESIS, event_hash
from imagebridge.db import Base, UTCDateTime, utcnow

# Set whenever a transaction that appended events commits: wakes the forwarder at once.
APPENDED = threading.Event()

# The patients an event names among several, held on the event until it is flushed.
NAMED = "_named_patients"

# pg_advisory_xact_lock key that serialises appends to the chain ("IBAUDIT" in ASCII).
CHAIN_LOCK_KEY = 0x4942415544495400


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor_type: Mapped[str] = mapped_column(String(16))  # user | gateway | system | admin
    actor: Mapped[str] = mapped_column(String(100), default="", index=True)
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)  # area:subject:action
    outcome: Mapped[str] = mapped_column(String(16))  # success | failure | refused
    patient_ref: Mapped[str] = mapped_column(String(130), default="", index=True)
    study_ref: Mapped[str] = mapped_column(String(64), default="", index=True)
    transfer_ref: Mapped[str] = mapped_column(String(32), default="", index=True)
    source_address: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The hash chain. Unique: two events can never follow the same one (no fork).
    prev_hash: Mapped[str] = mapped_column(String(64), server_default="", index=True, unique=True)
    hash: Mapped[str] = mapped_column(String(64), server_default="")

    def chain_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


class AuditEventPatient(Base):
    """A patient an event names among several (a query's matches, a batch of lookups), which
    its one ``patient_ref`` cannot hold: a search by patient finds the event through this.
    Append-only like the events; what it says is also in the event's chained detail."""

    __tablename__ = "audit_event_patients"

    event_id: Mapped[int] = mapped_column(ForeignKey("audit_events.id"), primary_key=True)
    patient_ref: Mapped[str] = mapped_column(String(130), primary_key=True, index=True)
    # Tells the flush to insert the event first (a foreign key alone does not).
    event: Mapped[AuditEvent] = relationship()


class AuditForwarding(Base):
    """The one row saying how far the audit repository has been sent the trail.

    It doubles as an anchor for `audit verify`: the repository holds a copy of every event
    up to here, so the chain must still hold this event with this hash. The database lets it
    move only forward.
    """

    __tablename__ = "audit_forwarding"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event_id: Mapped[int] = mapped_column(Integer, default=0)
    event_hash: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


@event.listens_for(Session, "before_flush")
def _link_new_events(session: Session, _context: UOWTransaction, _instances: Any) -> None:
    """Give new events their ids and chain hashes, in the order they were added.

    The chain head is read under a lock held to the end of the transaction: on SQLite every
    transaction already holds the write lock (BEGIN IMMEDIATE), on PostgreSQL an advisory
    lock serialises the appenders, so two transactions never link to the same head.
    """
    new = [obj for obj in session.new if isinstance(obj, AuditEvent)]
    if not new:
        return
    new.sort(key=lambda obj: inspect(obj).insert_order or 0)
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
    head = connection.execute(
        select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)
    ).first()
    last_id, last_hash = (head[0], head[1]) if head else (0, GENESIS)
    session.info["audit_appended"] = True
    for obj in new:
        _fill_defaults(obj)
        last_id += 1
        obj.id = last_id
        obj.prev_hash = last_hash
        obj.hash = last_hash = event_hash(obj.chain_values())
        for patient in getattr(obj, NAMED, ()):
            session.add(AuditEventPatient(event=obj, patient_ref=patient))


def _fill_defaults(obj: AuditEvent) -> None:
    # Column defaults would only apply at INSERT, after the hash is taken.
    for column in AuditEvent.__table__.columns:
        default = column.default
        if getattr(obj, column.key) is None and default is not None:
            value = default.arg if default.is_scalar else default.arg(None)
            setattr(obj, column.key, value)


@event.listens_for(Session, "after_commit")
def _announce(session: Session) -> None:
    if session.info.pop("audit_appended", False):
        APPENDED.set()


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop("audit_appended", None)

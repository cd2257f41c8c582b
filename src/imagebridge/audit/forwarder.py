"""Sends the audit trail to the audit repository, in order, from a durable cursor.

The work never waits for the repository: events are committed first, and this thread reads
them after the cursor and sends them. While the repository is down it retries with backoff;
nothing is lost because the cursor moves only after a send succeeded. Over TLS a message can
still be sent twice (a connection cut between the send and the cursor's commit), never
skipped; the `meta sequenceId` (the event id) lets the repository drop the repeat. Over UDP
a message the network drops is gone: that is UDP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Connection, Engine, event, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from imagebridge.audit import syslog
from imagebridge.audit.atna import AuditSource, audit_message
from imagebridge.audit.models import APPENDED, AuditEvent, AuditForwarding
from imagebridge.db import utcnow
from imagebridge.institutions.models import Institution
from imagebridge.settings import AuditRepository

log = logging.getLogger(__name__)

# pg_try_advisory_lock key: one forwarder for the whole network's hubs ("IBAUDFWD").
FORWARDER_LOCK_KEY = 0x4942415544465744


class AuditForwarder:
    def __init__(
        self,
        settings: AuditRepository,
        engine: Engine,
        sessions: sessionmaker[Session],
        *,
        transport: syslog.Transport | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions = sessions
        self.transport = transport or syslog.transport_for(
            settings.url,
            ca_file=settings.ca_file,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
        )
        self.source = AuditSource(settings.audit_source_id, settings.enterprise_site_id)
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-forwarder", daemon=True)
        self._institutions: dict[int, str] = {}
        self._leading = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        APPENDED.set()
        self._thread.join(timeout=5)
        self.transport.close()

    def _run(self) -> None:
        with self.engine.connect() as leader:
            try:
                self._loop(leader)
            finally:
                if self._leading:
                    # The pool keeps the connection, and the lock with it: hand it over now.
                    leader.execute(text("SELECT pg_advisory_unlock_all()"))
                    leader.commit()

    def _loop(self, leader: Connection) -> None:
        backoff = self.settings.retry_seconds
        while not self._stop.is_set():
            if not self._lead(leader):
                self._stop.wait(self.settings.poll_seconds * 5)
                continue
            # Cleared before reading: an event committed meanwhile sets it again.
            APPENDED.clear()
            try:
                sent = self.forward_batch()
            except OSError as exc:
                log.warning("audit repository unreachable (%s); retry in %.0f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.retry_max_seconds)
                continue
            except Exception:
                log.exception("audit forwarding failed; retrying")
                self._stop.wait(backoff)
                continue
            backoff = self.settings.retry_seconds
            if sent < self.settings.batch:
                APPENDED.wait(self.settings.poll_seconds)

    def _lead(self, connection: Connection) -> bool:
        """On PostgreSQL several hubs share the trail: only the holder of this lock sends.

        The lock belongs to the connection, so it passes to another hub when this one stops.
        """
        if self._leading or self.engine.dialect.name != "postgresql":
            return True
        self._leading = bool(
            connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": FORWARDER_LOCK_KEY}
            ).scalar()
        )
        connection.commit()
        return self._leading

    def forward_batch(self) -> int:
        """Send the next events after the cursor; returns how many were sent.

        On PostgreSQL the cursor's row stays locked from the read to its move, the send
        included. Should a second hub's forwarder also believe it leads (its lock's
        connection was cut and another took the lock), it waits for this one and starts
        after what this one sent: two hubs never send the same events. SQLite has one hub
        per database, and its write lock must not wait on the repository.
        """
        with self.sessions() as session, session.begin():
            fenced = session.get_bind().dialect.name == "postgresql"
            cursor = session.get(AuditForwarding, 1, with_for_update=fenced)
            after = cursor.event_id if cursor is not None else 0
            events = list(
                session.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.id > after)
                    .order_by(AuditEvent.id)
                    .limit(self.settings.batch)
                )
            )
            messages = [self._message(session, e) for e in events]
            if events and fenced:
                self.transport.send(messages)
                self._move(session, after, events[-1])
        if events and not fenced:
            self.transport.send(messages)
            with self.sessions() as session, session.begin():
                self._move(session, after, events[-1])
        return len(events)

    def _move(self, session: Session, after: int, last: AuditEvent) -> None:
        moved = session.execute(
            update(AuditForwarding)
            .where(AuditForwarding.id == 1, AuditForwarding.event_id == after)
            .values(event_id=last.id, event_hash=last.hash, updated_at=self.clock())
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            log.warning("the audit forwarding cursor moved under this forwarder")

    def _message(self, session: Session, event: AuditEvent) -> bytes:
        code = ""
        if event.institution_id is not None:
            if event.institution_id not in self._institutions:
                found = session.scalar(
                    select(Institution.code).where(Institution.id == event.institution_id)
                )
                self._institutions[event.institution_id] = found or ""
            code = self._institutions[event.institution_id]
        body = audit_message(event.chain_values(), self.source, code)
        return syslog.message(
            body,
            at=event.at,
            sequence_id=event.id,
            severity=syslog.SEVERITY_NOTICE
            if event.outcome == "success"
            else syslog.SEVERITY_WARNING,
            procid=self.source.process_id,
        )


def start_forwarder(
    settings: AuditRepository, engine: Engine, sessions: sessionmaker[Session]
) -> AuditForwarder | None:
    """Run a forwarder beside a hub when an audit repository is configured.

    It stops when the hub disposes of its engine, at the end of the application's life.
    """
    if not settings.url:
        return None
    forwarder = AuditForwarder(settings, engine, sessions)
    forwarder.start()
    event.listen(engine, "engine_disposed", lambda _engine: forwarder.stop())
    return forwarder

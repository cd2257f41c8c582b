"""Arrival notices, sent by a thread of the hub once the commit that delivered a transfer
has happened: a transaction that rolls back tells nobody, and the delivery never waits for
a mail or webhook server. Each notice is tried once; every outcome is audited, and a failure
is logged with the reason (never the patient)."""

from __future__ import annotations

import logging
import queue
import threading
import urllib.parse
from typing import Any

import httpx
from sqlalchemy import event
from sqlalchemy.orm import Session

from imagebridge.audit.services import record
from imagebridge.hub.state import Hub
from imagebridge.notifications import services
from imagebridge.notifications.services import Arrival
from imagebridge.transfers.models import Transfer
from imagebridge.transfers.services import DELIVERED

log = logging.getLogger(__name__)
ACTOR = {"actor_type": "system", "actor": "notifications"}


class Dispatcher:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.settings = hub.settings.notifications
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)

    @property
    def configured(self) -> bool:
        s = self.settings
        return bool((s.smtp_host and s.email_to) or s.webhooks)

    def start(self) -> None:
        event.listen(self.hub.sessions, "after_commit", self._after_commit)
        event.listen(self.hub.sessions, "after_rollback", self._after_rollback)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        event.remove(self.hub.sessions, "after_commit", self._after_commit)
        event.remove(self.hub.sessions, "after_rollback", self._after_rollback)
        self._queue.put(None)
        self._thread.join(timeout)

    def _after_commit(self, session: Session) -> None:
        for transfer_id in sorted(session.info.pop(DELIVERED, ())):
            self._queue.put(transfer_id)

    def _after_rollback(self, session: Session) -> None:
        session.info.pop(DELIVERED, None)

    def _run(self) -> None:
        while (transfer_id := self._queue.get()) is not None:
            try:
                self.notify(transfer_id)
            except Exception:  # the thread must outlive any one notice
                log.exception("arrival notice for transfer %s could not be prepared", transfer_id)

    def notify(self, transfer_id: str) -> None:
        with self.hub.sessions() as session:
            arrival = services.arrival_of(session, transfer_id, self.hub.settings.public_url)
            transfer = session.get(Transfer, transfer_id)
            receiver_id = transfer.receiver_institution_id if transfer else None
        if arrival is None:
            return
        s = self.settings
        to = services.recipients(s.email_to, arrival.receiver)
        if s.smtp_host and to:
            try:
                services.send_email(s, services.email_message(arrival, s.smtp_from, to))
            except Exception as exc:  # SMTP, socket and TLS errors alike
                self._outcome("email", arrival, receiver_id, exc, recipients=len(to))
            else:
                self._outcome("email", arrival, receiver_id, None, recipients=len(to))
        for url in services.webhook_urls(s.webhooks, arrival.receiver):
            where = _site(url)
            try:
                status = services.send_webhook(s, url, arrival)
            except httpx.HTTPError as exc:
                self._outcome("webhook", arrival, receiver_id, exc, site=where)
            else:
                self._outcome("webhook", arrival, receiver_id, None, site=where, status=status)

    def _outcome(
        self,
        channel: str,
        arrival: Arrival,
        institution_id: int | None,
        error: Exception | None,
        **detail: Any,
    ) -> None:
        if error is not None:
            reason = f"{type(error).__name__}: {error}"[:300]
            detail["reason"] = reason
            log.warning("%s notice of transfer %s failed: %s", channel, arrival.transfer_id, reason)
        with self.hub.sessions() as session, session.begin():
            record(
                session,
                f"notification:{channel}:{'failed' if error else 'sent'}",
                "failure" if error else "success",
                institution_id=institution_id,
                transfer_ref=arrival.transfer_id,
                detail=detail,
                **ACTOR,
            )


def _site(url: str) -> str:
    """Scheme and host only: a webhook's path often carries its own secret."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def install(hub: Hub) -> Dispatcher | None:
    """Start sending arrival notices, if any are configured."""
    dispatcher = Dispatcher(hub)
    if not dispatcher.configured:
        return None
    dispatcher.start()
    return dispatcher

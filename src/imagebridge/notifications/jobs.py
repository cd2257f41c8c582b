"""Arrival notices as jobs: queued in the transaction that delivers a transfer, so a
transaction that rolls back tells nobody, and the delivery never waits for a mail or webhook
server.

Each channel (the e-mail, each webhook) is a step of the job: once one succeeds it is
recorded, with its audit event, and a repeat of the job (after a failure of another channel,
or after a worker died) skips it. A channel that fails is audited and tried again with the
job's backoff. Between a send and the commit that records it a worker can still die, so a
receiver may, rarely, be told twice; the transfer id lets it notice.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy.orm import Session

from imagebridge.audit.services import record
from imagebridge.db import utcnow
from imagebridge.jobs.context import JobContext
from imagebridge.jobs.services import Claimed, enqueue
from imagebridge.notifications import services
from imagebridge.notifications.services import Arrival
from imagebridge.settings import Notifications
from imagebridge.transfers.models import Transfer

log = logging.getLogger(__name__)
ARRIVAL_NOTICE = "notification.arrival"
ACTOR = {"actor_type": "system", "actor": "notifications"}


class NoticeFailed(RuntimeError):
    """A channel could not be told; the job is tried again later."""


def queue_arrival_notice(session: Session, transfer_id: str) -> None:
    """In the transaction that moved the transfer to delivered."""
    enqueue(session, ARRIVAL_NOTICE, {"transfer_id": transfer_id}, now=utcnow())


def configured(settings: Notifications) -> bool:
    return bool((settings.smtp_host and settings.email_to) or settings.webhooks)


def send_arrival_notice(context: JobContext, job: Claimed) -> None:
    settings = context.settings.notifications
    if not configured(settings):
        return
    transfer_id = str(job.payload.get("transfer_id", ""))
    with context.sessions() as session:
        arrival = services.arrival_of(session, transfer_id, context.settings.public_url)
        transfer = session.get(Transfer, transfer_id)
        receiver_id = transfer.receiver_institution_id if transfer else None
    if arrival is None:
        return  # nothing left to announce
    failures = []
    for step, channel, send, detail in _channels(settings, arrival):
        if job.done(step):
            continue
        error: str | None = None
        try:
            detail |= send()
        except (OSError, httpx.HTTPError) as exc:  # SMTP, socket and TLS errors are OSErrors
            error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("%s notice of transfer %s failed: %s", channel, transfer_id, error)
            detail["reason"] = error
            failures.append(f"{channel}: {error}")
        with context.sessions() as session, session.begin():
            record(
                session,
                f"notification:{channel}:{'failed' if error else 'sent'}",
                "failure" if error else "success",
                institution_id=receiver_id,
                transfer_ref=arrival.transfer_id,
                detail={**detail, "attempt": job.attempt},
                **ACTOR,
            )
            if error is None:
                job.step_done(session, step)
    if failures:
        raise NoticeFailed("; ".join(failures))


Send = Callable[[], dict[str, Any]]


def _channels(
    settings: Notifications, arrival: Arrival
) -> list[tuple[str, str, Send, dict[str, Any]]]:
    """(step, channel, send, audit detail) for each way the receiver is to be told."""
    found: list[tuple[str, str, Send, dict[str, Any]]] = []
    to = services.recipients(settings.email_to, arrival.receiver)
    if settings.smtp_host and to:
        message = services.email_message(arrival, settings.smtp_from, to)

        def email() -> dict[str, Any]:
            services.send_email(settings, message)
            return {}

        found.append(("email", "email", email, {"recipients": len(to)}))
    for url in services.webhook_urls(settings.webhooks, arrival.receiver):
        step = "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]
        found.append((step, "webhook", _webhook(settings, url, arrival), {"site": _site(url)}))
    return found


def _webhook(settings: Notifications, url: str, arrival: Arrival) -> Send:
    return lambda: {"status": services.send_webhook(settings, url, arrival)}


def _site(url: str) -> str:
    """Scheme and host only: a webhook's path often carries its own secret."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

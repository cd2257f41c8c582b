"""Late urgent transfers: an alert, once, for an urgent transfer still undelivered past its
deadline (``urgent_late_seconds`` after it was created), typically because the receiving
PACS has been down.

A periodic job finds them and, in one transaction per sweep, marks each, records the audit
event ``transfer:transfer:late`` and queues a notice to the sending and the receiving
institutions, by e-mail and webhook where notifications are configured. The notice names
the transfer, the institutions and the counts, never the patient.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.audit.services import record
from imagebridge.jobs.context import JobContext
from imagebridge.jobs.services import Claimed, enqueue
from imagebridge.notifications import services as notices
from imagebridge.settings import Notifications
from imagebridge.transfers.models import Transfer
from imagebridge.transfers.services import OPEN_STATUSES, describe

log = logging.getLogger(__name__)
LATE_SWEEP = "transfers.late"
LATE_NOTICE = "notification.late"
EVENT = "transfer.late"
ACTOR = {"actor_type": "system", "actor": "alerts"}


class LateNoticeFailed(RuntimeError):
    """A channel could not be told; the job is tried again later."""


def sweep_interval(late_seconds: float) -> float:
    """Often enough that an alert comes at most a tenth of the deadline late."""
    return max(1.0, min(60.0, late_seconds / 10))


def raise_late_alerts(session: Session, *, now: datetime, late_after: timedelta) -> list[str]:
    """Mark and audit the urgent transfers late now; the ids of those newly late.

    Each is raised once: the mark is set in the same transaction as its audit event, under
    the row's lock where the database has them (another sweep skips the row).
    """
    late = session.scalars(
        select(Transfer)
        .where(
            Transfer.priority == "urgent",
            Transfer.status.in_(OPEN_STATUSES),
            Transfer.late_alerted_at.is_(None),
            Transfer.created_at <= now - late_after,
        )
        .order_by(Transfer.created_at)
        .with_for_update(skip_locked=True)
    ).all()
    for transfer in late:
        transfer.late_alerted_at = now
        waited = now - transfer.created_at
        record(
            session,
            "transfer:transfer:late",
            "failure",
            institution_id=transfer.receiver_institution_id,
            transfer_ref=transfer.id,
            detail={
                "status": transfer.status,
                "minutes_waiting": round(waited.total_seconds() / 60, 1),
                "instances_delivered": transfer.instances_delivered,
                "instances_total": transfer.instances_total,
                "reason": transfer.failure_reason[:200],
            },
            **ACTOR,
        )
        enqueue(session, LATE_NOTICE, {"transfer_id": transfer.id}, now=now)
    return [t.id for t in late]


def sweep(context: JobContext, job: Claimed) -> None:
    """The periodic job."""
    late_after = timedelta(seconds=context.settings.urgent_late_seconds)
    with context.sessions() as session, session.begin():
        late = raise_late_alerts(session, now=context.clock(), late_after=late_after)
    if late:
        log.warning("%d urgent transfer(s) late: %s", len(late), ", ".join(late))


def late_notice(transfer: dict[str, Any], minutes: float) -> dict[str, Any]:
    """What a notice says: the transfer and the counts, never the patient."""
    return {
        "event": EVENT,
        "transfer_id": transfer["id"],
        "sender": transfer["sender"],
        "receiver": transfer["receiver"],
        "priority": transfer["priority"],
        "status": transfer["status"],
        "minutes_waiting": minutes,
        "instances_total": transfer["instances_total"],
        "instances_delivered": transfer["instances_delivered"],
    }


def email_message(notice: dict[str, Any], sender: str, to: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = (
        f"ImageBridge: URGENT images from {notice['sender']} not yet delivered "
        f"to {notice['receiver']}"
    )
    message.set_content(
        f"An urgent transfer from {notice['sender']} to {notice['receiver']} has waited "
        f"{notice['minutes_waiting']} minutes and is not delivered yet "
        f"({notice['instances_delivered']} of {notice['instances_total']} images).\n"
        "Please check the receiving PACS and the gateway.\n\n"
        f"Transfer: {notice['transfer_id']}\nStatus:   {notice['status']}\n"
    )
    return message


def send_late_notice(context: JobContext, job: Claimed) -> None:
    """Tell both institutions; each channel once, the job retried for those that failed."""
    settings = context.settings.notifications
    with context.sessions() as session:
        transfer = session.get(Transfer, str(job.payload.get("transfer_id", "")))
        if transfer is None:
            return
        described = describe(session, transfer)
        minutes = round((context.clock() - transfer.created_at).total_seconds() / 60, 1)
        receiver_id = transfer.receiver_institution_id
    notice = late_notice(described, minutes)
    codes = [notice["receiver"], notice["sender"]]
    to = list(dict.fromkeys(a for c in codes for a in notices.recipients(settings.email_to, c)))
    channels: list[tuple[str, Any]] = []
    if settings.smtp_host and to:
        message = email_message(notice, settings.smtp_from, to)
        channels.append(("email", lambda: notices.send_email(settings, message)))
    body = json.dumps(notice, sort_keys=True).encode()
    for url in dict.fromkeys(u for c in codes for u in notices.webhook_urls(settings.webhooks, c)):
        step = "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]
        channels.append((step, lambda url=url: _post(settings, url, body)))
    failures = []
    for step, send in channels:
        if job.done(step):
            continue
        try:
            send()
        except (OSError, httpx.HTTPError) as exc:  # SMTP and socket errors are OSErrors
            failures.append(f"{step.partition(':')[0]}: {type(exc).__name__}")
            log.warning("late notice of transfer %s not sent: %s", notice["transfer_id"], exc)
            continue
        with context.sessions() as session, session.begin():
            record(
                session,
                f"notification:{step.partition(':')[0]}:sent",
                institution_id=receiver_id,
                transfer_ref=notice["transfer_id"],
                detail={"event": EVENT, "attempt": job.attempt},
                **ACTOR,
            )
            job.step_done(session, step)
    if failures:
        raise LateNoticeFailed("; ".join(failures))


def _post(settings: Notifications, url: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    if settings.webhook_secret:
        headers[notices.SIGNATURE_HEADER] = notices.signature(settings.webhook_secret, body)
    response = httpx.post(url, content=body, headers=headers, timeout=settings.timeout_seconds)
    response.raise_for_status()

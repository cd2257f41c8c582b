"""What an arrival notice says and how it is sent: e-mail over SMTP, JSON to a webhook.

A notice names the transfer, the institutions, the priority and the counts, and links to the
portal's inbox; never the patient, since mail and webhook receivers are outside the hub.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
from dataclasses import asdict, dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from imagebridge.institutions.models import Institution
from imagebridge.settings import Notifications
from imagebridge.transfers.models import Transfer, TransferStudy

SIGNATURE_HEADER = "X-ImageBridge-Signature"
EVENT = "transfer.delivered"


@dataclass(frozen=True)
class Arrival:
    """A delivered transfer, as a notice tells it."""

    transfer_id: str
    sender: str
    sender_name: str
    receiver: str
    receiver_name: str
    priority: str
    studies: int
    instances: int
    reports: int
    finished_at: str
    link: str


def arrival_of(session: Session, transfer_id: str, public_url: str) -> Arrival | None:
    transfer = session.get(Transfer, transfer_id)
    if transfer is None:
        return None
    sender = session.get(Institution, transfer.sender_institution_id)
    receiver = session.get(Institution, transfer.receiver_institution_id)
    if sender is None or receiver is None:
        return None
    studies = session.scalar(
        select(func.count())
        .select_from(TransferStudy)
        .where(TransferStudy.transfer_id == transfer.id)
    )
    finished: datetime | None = transfer.finished_at
    return Arrival(
        transfer_id=transfer.id,
        sender=sender.code,
        sender_name=sender.name,
        receiver=receiver.code,
        receiver_name=receiver.name,
        priority=transfer.priority,
        studies=int(studies or 0),
        instances=transfer.instances_delivered,
        reports=len(transfer.reports),
        finished_at=finished.isoformat() if finished else "",
        link=f"{public_url.rstrip('/')}/portal/inbox" if public_url else "",
    )


def recipients(table: dict[str, list[str]], code: str) -> list[str]:
    """The institution's own addresses and the network-wide ones (`*`), each once."""
    return list(dict.fromkeys([*table.get(code, []), *table.get("*", [])]))


def webhook_urls(table: dict[str, str], code: str) -> list[str]:
    return list(dict.fromkeys(u for u in (table.get(code, ""), table.get("*", "")) if u))


def email_message(arrival: Arrival, sender: str, to: list[str]) -> EmailMessage:
    urgent = "URGENT " if arrival.priority == "urgent" else ""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = f"ImageBridge: {urgent}images from {arrival.sender} have arrived"
    lines = [
        f"A {arrival.priority} transfer from {arrival.sender_name} ({arrival.sender}) "
        f"to {arrival.receiver_name} ({arrival.receiver}) has been delivered to your PACS.",
        "",
        f"Transfer:  {arrival.transfer_id}",
        f"Studies:   {arrival.studies}",
        f"Images:    {arrival.instances}",
        f"Reports:   {arrival.reports}",
        f"Delivered: {arrival.finished_at}",
    ]
    if arrival.link:
        lines += ["", f"Inbox: {arrival.link}"]
    message.set_content("\n".join(lines) + "\n")
    return message


def send_email(settings: Notifications, message: EmailMessage) -> None:
    """Hand the message to the configured SMTP server; raises OSError or SMTPException."""
    with smtplib.SMTP(
        settings.smtp_host, settings.smtp_port, timeout=settings.timeout_seconds
    ) as s:
        if settings.smtp_starttls:
            s.starttls(context=ssl.create_default_context())
        if settings.smtp_username:
            s.login(settings.smtp_username, settings.smtp_password)
        s.send_message(message)


def webhook_body(arrival: Arrival) -> bytes:
    return json.dumps({"event": EVENT, **asdict(arrival)}, sort_keys=True).encode()


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def send_webhook(settings: Notifications, url: str, arrival: Arrival) -> int:
    """POST the notice; the receiver's status code, or httpx.HTTPError."""
    body = webhook_body(arrival)
    headers: dict[str, Any] = {"Content-Type": "application/json"}
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = signature(settings.webhook_secret, body)
    response = httpx.post(url, content=body, headers=headers, timeout=settings.timeout_seconds)
    response.raise_for_status()
    return response.status_code

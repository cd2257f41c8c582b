"""Arrival notices: once the commit that delivers a transfer has happened, a job worker
e-mails the receiving institution through a real SMTP server (aiosmtpd on loopback) and POSTs
to its webhooks (an HTTP server on loopback). A notice names the transfer, never the patient;
a failure is logged and audited, holds nothing up and is tried again, without telling again
those already told; a transfer that fails tells nobody.

The hub is the real application in-process; the transfer goes through the real gateway
routes (upload, close, deliveries), so the notice follows the real commit.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from conftest import wait_until
from hubapp import InProcessHub
from imagebridge.demo.network import free_port
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.jobs.models import Job
from imagebridge.jobs.worker import Worker
from imagebridge.notifications.jobs import ARRIVAL_NOTICE, configured, send_arrival_notice
from imagebridge.notifications.services import SIGNATURE_HEADER, signature
from imagebridge.settings import JobSettings, Notifications
from imagebridge.transfers.models import TransferInstance

SECRET = "webhook-secret-for-tests"
PATIENT = {"patient_id": "SEG778899", "patient_name": "NOTICE^PATIENT", "nhs_number": "9434765919"}


class Mailbox:
    """An SMTP server's handler: keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"


class Hooks(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receivers() -> Iterator[tuple[Mailbox, list[tuple[str, dict[str, str], bytes]], int, int]]:
    mailbox = Mailbox()
    smtp_port = free_port()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    Hooks.received = []
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    thread = threading.Thread(target=hooks.serve_forever, daemon=True)
    thread.start()
    try:
        yield mailbox, Hooks.received, smtp_port, hooks.server_address[1]
    finally:
        hooks.shutdown()
        hooks.server_close()
        smtp.stop()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[InProcessHub]:
    hub = InProcessHub(tmp_path / "hub")
    hub.add_institution("SEG")
    hub.add_institution("RVH")
    yield hub
    hub.close()


def _transfer(net: InProcessHub, folder: Path, outcome: str) -> str:
    """SEG's gateway sends a study to RVH; RVH's gateway reports each instance's outcome."""
    study = generate_ct_study(folder, slices=3, rows=16, columns=16, **PATIENT)
    tid = net.upload("SEG", "RVH", study.paths)
    client = net.client()
    seg = {"Authorization": f"Bearer {net.gateway_token('SEG')}"}
    assert client.post(f"/api/v1/transfers/{tid}/close", headers=seg).status_code == 200
    with net.hub.sessions() as session:
        ids = session.scalars(
            select(TransferInstance.id).where(TransferInstance.transfer_id == tid)
        ).all()
    rvh = {"Authorization": f"Bearer {net.gateway_token('RVH')}"}
    r = client.post(
        f"/api/v1/transfers/{tid}/deliveries",
        headers=rvh,
        json={"instances": [{"id": i, "outcome": outcome, "detail": "PACS said no"} for i in ids]},
    )
    assert r.status_code == 200, r.text
    return tid


def _events(net: InProcessHub, action: str, transfer: str) -> list[dict[str, Any]]:
    r = net.client().get(
        "/api/v1/audit", params={"action": action, "transfer": transfer}, headers=net.admin_headers
    )
    found: list[dict[str, Any]] = r.json()
    return found


def _start(net: InProcessHub, settings: Notifications, **jobs: Any) -> Worker:
    """A worker of the job queue beside the hub, running arrival notices only."""
    net.hub.settings.notifications = settings
    net.hub.settings.jobs = JobSettings(poll_seconds=0.1, **jobs)
    worker = Worker(net.hub, handlers={ARRIVAL_NOTICE: send_arrival_notice}, schedules=[])
    worker.start()
    return worker


def _notices(net: InProcessHub) -> list[tuple[str, int, str]]:
    with net.hub.sessions() as session:
        jobs = session.scalars(select(Job).where(Job.kind == ARRIVAL_NOTICE).order_by(Job.id))
        return [(j.status, j.attempts, j.payload["transfer_id"]) for j in jobs]


def test_a_delivered_transfer_is_announced_by_mail_and_webhook(
    net: InProcessHub, receivers: Any, tmp_path: Path
) -> None:
    mailbox, hooks, smtp_port, hook_port = receivers
    dead = free_port()  # nothing listens here: that webhook fails
    worker = _start(
        net,
        Notifications(
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            smtp_from="imagebridge@hub.test",
            email_to={"RVH": ["radiology@rvh.test"], "*": ["network@hub.test"], "SEG": ["x@seg"]},
            webhooks={
                "RVH": f"http://127.0.0.1:{hook_port}/hooks/rvh",
                "*": f"http://127.0.0.1:{dead}/",
            },
            webhook_secret=SECRET,
            timeout_seconds=3,
        ),
        max_attempts=2,
        retry_seconds=0.2,
    )
    try:
        tid = _transfer(net, tmp_path / "study", "delivered")
        to, message = wait_until("the e-mail", lambda: mailbox.messages and mailbox.messages[0])
        wait_until("the webhook", lambda: hooks)
        # The dead webhook is tried again, then given up; those already told are not told again.
        wait_until("the notice given up", lambda: _notices(net) == [("failed", 2, tid)])
    finally:
        worker.stop()
    assert len(mailbox.messages) == 1 and len(hooks) == 1

    # The receiving institution's addresses and the network's, once each; not the sender's.
    assert sorted(to) == ["network@hub.test", "radiology@rvh.test"]
    assert message["From"] == "imagebridge@hub.test"
    assert "images from SEG have arrived" in message["Subject"]
    text = message.get_payload(decode=True).decode()
    assert tid in text and "Images:    3" in text and "SEG" in text and "RVH" in text
    [(path, headers, body)] = hooks
    assert path == "/hooks/rvh"
    assert headers[SIGNATURE_HEADER] == signature(SECRET, body)
    notice = json.loads(body)
    assert notice["event"] == "transfer.delivered" and notice["transfer_id"] == tid
    assert (notice["sender"], notice["receiver"], notice["instances"]) == ("SEG", "RVH", 3)
    # Mail and webhook receivers are outside the hub: they are never told who the patient is.
    for sent in (message.as_string(), body.decode()):
        for value in (*PATIENT.values(), "NOTICE", "19700101"):
            assert value not in sent

    [mailed] = _events(net, "notification:email:sent", tid)
    assert mailed["outcome"] == "success" and mailed["detail"]["recipients"] == 2
    [sent] = _events(net, "notification:webhook:sent", tid)
    assert sent["detail"]["site"] == f"http://127.0.0.1:{hook_port}"
    first, second = _events(net, "notification:webhook:failed", tid)
    assert [first["detail"]["attempt"], second["detail"]["attempt"]] == [1, 2]
    assert first["outcome"] == "failure" and first["detail"]["reason"].startswith("ConnectError")
    assert first["detail"]["site"] == f"http://127.0.0.1:{dead}"
    [abandoned] = _events(net, "job:job:abandoned", "")
    assert (
        abandoned["detail"]["kind"] == ARRIVAL_NOTICE
        and "ConnectError" in (abandoned["detail"]["error"])
    )
    # The delivery itself was never held up by the failing receiver.
    r = net.client().get(f"/api/v1/transfers/{tid}", headers=net.admin_headers)
    assert r.json()["status"] == "delivered"


def test_a_failed_transfer_and_an_unreachable_mail_server(
    net: InProcessHub, receivers: Any, tmp_path: Path
) -> None:
    mailbox, hooks, _, hook_port = receivers
    worker = _start(
        net,
        Notifications(
            smtp_host="127.0.0.1",
            smtp_port=free_port(),  # no mail server there
            email_to={"*": ["network@hub.test"]},
            webhooks={"*": f"http://127.0.0.1:{hook_port}/all"},
            timeout_seconds=3,
        ),
        max_attempts=1,
    )
    try:
        failed = _transfer(net, tmp_path / "failed", "failed")
        delivered = _transfer(net, tmp_path / "delivered", "delivered")
        wait_until("the webhook", lambda: hooks)
        wait_until("the mail failure", lambda: _events(net, "notification:email:failed", delivered))
        wait_until("the notice given up", lambda: _notices(net) == [("failed", 1, delivered)])
    finally:
        worker.stop()
    # Only the delivered transfer was announced.
    assert [json.loads(body)["transfer_id"] for _, _, body in hooks] == [delivered]
    assert not _events(net, "notification:", failed)
    assert not mailbox.messages
    [event] = _events(net, "notification:email:failed", delivered)
    assert "Connection refused" in event["detail"]["reason"]


def test_nothing_is_sent_when_nothing_is_configured(net: InProcessHub, tmp_path: Path) -> None:
    # Mail needs both a server and addresses.
    assert not configured(Notifications(smtp_host="127.0.0.1"))
    worker = _start(net, Notifications(smtp_host="127.0.0.1"))
    try:
        tid = _transfer(net, tmp_path / "study", "delivered")
        wait_until("the notice job", lambda: _notices(net) == [("done", 1, tid)])
    finally:
        worker.stop()
    assert not _events(net, "notification:", tid)


def test_a_notice_is_queued_only_by_the_commit_that_delivers(net: InProcessHub) -> None:
    """A job queued in a transaction that rolls back does not exist."""
    from imagebridge.notifications.jobs import queue_arrival_notice

    with net.hub.sessions() as session, session.begin():
        queue_arrival_notice(session, "committed")
    with pytest.raises(RuntimeError), net.hub.sessions() as session, session.begin():
        queue_arrival_notice(session, "rolled-back")
        raise RuntimeError("the delivery failed")
    assert [tid for _, _, tid in _notices(net)] == ["committed"]

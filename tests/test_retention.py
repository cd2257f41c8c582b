"""Retention: delivered images' blobs are removed after their period (urgent ones later),
never while another transfer, a legal hold, a share in force or the index outside any
transfer still needs them; index rows and the audit trail stay, and every removal is
audited. Legal holds are placed and released by administrators through the API.

The hub is the real application in-process; transfers go through the real gateway routes.
Time is moved by passing the sweep a later "now" (and the hub a later clock): deliveries are
stamped by the wall clock, so "31 days later" is the wall clock plus 31 days.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from hubapp import INSIDE, InProcessHub, Person
from imagebridge.db import utcnow
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.index.models import Instance, Series, Study
from imagebridge.jobs import kinds
from imagebridge.jobs.models import Job, JobStatus
from imagebridge.jobs.worker import Worker
from imagebridge.retention.jobs import SWEEP
from imagebridge.retention.models import BlobRemoval, RetentionMark
from imagebridge.retention.services import sweep
from imagebridge.settings import RetentionPolicy
from imagebridge.transfers.framing import MEDIA_TYPE, encode_files
from imagebridge.transfers.models import Report, TransferInstance

DAY = timedelta(days=1)
GRACE = timedelta(hours=1)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[InProcessHub]:
    hub = InProcessHub(tmp_path / "hub")
    hub.clock.now = utcnow()  # shares and holds are stamped by the hub's clock
    hub.hub.settings.retention = RetentionPolicy(
        enabled=True, routine_days=30, urgent_days=90, grace_seconds=GRACE.total_seconds()
    )
    for code in ("SEG", "RVH", "NTH"):
        hub.add_institution(code)
    yield hub
    hub.close()


class Sent:
    def __init__(self, transfer_id: str, study_uid: str, blobs: set[str]) -> None:
        self.id, self.study_uid, self.blobs = transfer_id, study_uid, blobs


def gateway_headers(net: InProcessHub, code: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {net.gateway_token(code)}"}


def send(
    net: InProcessHub,
    paths: list[Path],
    *,
    receiver: str = "RVH",
    priority: str = "routine",
    report: str | None = None,
    deliver: bool = True,
) -> Sent:
    """SEG's gateway uploads the files into a new transfer, closes it, and (by default) RVH's
    gateway reports every item delivered."""
    client = net.client()
    seg = gateway_headers(net, "SEG")
    r = client.post(
        "/api/v1/transfers",
        headers=seg,
        json={"receiver": receiver, "origin": "dicom", "priority": priority},
    )
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]
    r = client.post(
        f"/api/v1/transfers/{tid}/instances",
        headers={**seg, "Content-Type": MEDIA_TYPE},
        content=b"".join(encode_files(items)),
    )
    assert r.status_code == 200 and not r.json()["refused"], r.text
    blobs = {sha for sha, _ in items}
    if report is not None:
        r = client.post(
            f"/api/v1/transfers/{tid}/reports",
            headers={**seg, "Content-Type": "text/plain"},
            content=report.encode(),
        )
        assert r.status_code == 201, r.text
        blobs.add(r.json()["sha256"])
    r = client.post(f"/api/v1/transfers/{tid}/close", headers=seg)
    assert r.status_code == 200, r.text
    study_uid = r.json()["studies"][0]["study_instance_uid"]
    if deliver:
        deliver_all(net, tid, receiver)
    return Sent(tid, study_uid, blobs)


def deliver_all(net: InProcessHub, tid: str, receiver: str = "RVH") -> None:
    with net.hub.sessions() as session:
        items = session.scalars(
            select(TransferInstance.id).where(TransferInstance.transfer_id == tid)
        ).all()
        reports = session.scalars(select(Report.id).where(Report.transfer_id == tid)).all()
    r = net.client().post(
        f"/api/v1/transfers/{tid}/deliveries",
        headers=gateway_headers(net, receiver),
        json={
            "instances": [{"id": i, "outcome": "delivered"} for i in items],
            "reports": [
                {"id": i, "outcome": "delivered", "sop_instance_uid": "1.2.3"} for i in reports
            ],
        },
    )
    assert r.status_code == 200 and r.json()["status"] == "delivered", r.text


def study(folder: Path, patient: str) -> list[Path]:
    return generate_ct_study(folder, slices=3, rows=16, columns=16, patient_id=patient).paths


def held(net: InProcessHub, blobs: set[str]) -> set[str]:
    """The blobs the store still holds (within reach)."""
    return {sha for sha in blobs if net.hub.blobs.exists(sha)}


def index_rows(net: InProcessHub, study_uid: str) -> int:
    with net.hub.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Instance)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_uid)
            )
            or 0
        )


def events(net: InProcessHub, action: str, **params: str) -> list[dict[str, Any]]:
    r = net.client().get(
        "/api/v1/audit", params={"action": action, **params}, headers=net.admin_headers
    )
    found: list[dict[str, Any]] = r.json()
    return found


def removals(net: InProcessHub) -> dict[str, str]:
    with net.hub.sessions() as session:
        rows = session.execute(select(BlobRemoval.sha256, BlobRemoval.state))
        return {sha: state for sha, state in rows}


def run(net: InProcessHub, at: datetime) -> Any:
    net.clock.now = at
    return sweep(net.hub, at)


def test_delivered_images_go_after_their_period_and_nothing_else(
    net: InProcessHub, tmp_path: Path
) -> None:
    start = utcnow()
    removed = send(net, study(tmp_path / "a", "A1"), report="Normal chest.")
    urgent = send(net, study(tmp_path / "b", "B1"), priority="urgent")
    open_ = send(net, study(tmp_path / "c", "C1"), deliver=False)
    shared_files = study(tmp_path / "d", "D1")
    shared = send(net, shared_files)
    # The same bytes on their way to another institution, not delivered yet.
    pending = send(net, shared_files, receiver="NTH", deliver=False)
    assert pending.blobs == shared.blobs
    everything = removed.blobs | urgent.blobs | open_.blobs | shared.blobs
    assert held(net, everything) == everything

    # Within every period: nothing goes.
    assert run(net, start + 29 * DAY).set_aside == 0
    assert held(net, everything) == everything

    # A routine transfer 31 days after delivery: its images and report are set aside, out of
    # reach at once; the others stay.
    report = run(net, start + 31 * DAY)
    assert report.set_aside == len(removed.blobs) == 4 and report.kept["transfer"] == 3
    assert held(net, everything) == everything - removed.blobs
    assert set(removals(net)) == removed.blobs
    assert index_rows(net, removed.study_uid) == 3  # the index keeps its rows
    [event] = events(net, "retention:instances:removed")
    assert event["study_ref"] == removed.study_uid and event["transfer_ref"] == removed.id
    assert event["patient_ref"] == "A1"
    assert {k: event["detail"][k] for k in ("instances", "reports", "kept")} == {
        "instances": 3,
        "reports": 1,
        "kept": 0,
    }
    aside = net.hub.blobs.root / "set-aside"  # type: ignore[attr-defined]
    assert len(list(aside.rglob("*"))) > len(removed.blobs)  # still recoverable

    # After the grace period they are removed for good; a repeat changes nothing.
    run(net, start + 31 * DAY + 2 * GRACE)
    assert set(removals(net).values()) == {"removed"}
    assert not [p for p in aside.rglob("*") if p.is_file()]
    assert run(net, start + 31 * DAY + 3 * GRACE).transfers == 0
    assert len(events(net, "retention:instances:removed")) == 1

    # Urgent transfers are kept for their own, longer period.
    run(net, start + 91 * DAY)
    assert held(net, everything) == open_.blobs | shared.blobs
    # The open transfer, and the delivered one whose bytes another transfer still carries,
    # keep theirs; the index rows of every study remain.
    assert index_rows(net, urgent.study_uid) == 3 and index_rows(net, shared.study_uid) == 3
    r = net.client().get("/api/v1/audit/verify", headers=net.admin_headers)
    assert r.status_code == 200 and r.json()["intact"], r.text


def test_a_blob_needed_again_within_the_grace_period_is_put_back(
    net: InProcessHub, tmp_path: Path
) -> None:
    start, sent = set_aside(net, tmp_path)
    # SEG sends the study again from what the hub holds: the new transfer refers to the
    # blobs set aside a moment ago (as an upload that checked just before they moved would).
    r = net.client().post(
        "/api/v1/transfers",
        headers=gateway_headers(net, "SEG"),
        json={"receiver": "NTH", "study_instance_uids": [sent.study_uid]},
    )
    assert r.status_code == 201, r.text
    run(net, start + 31 * DAY + 2 * GRACE)
    assert held(net, sent.blobs) == sent.blobs
    assert set(removals(net).values()) == {"restored"}
    restored = events(net, "retention:blob:restored")
    assert len(restored) == 3 and {e["detail"]["reason"] for e in restored} == {"transfer"}


def test_bytes_stored_again_while_set_aside_are_kept(net: InProcessHub, tmp_path: Path) -> None:
    """An upload after the blob moved finds it missing and sends its bytes: stored again,
    and the copy set aside is dropped once its grace has passed."""
    start = utcnow()
    files = study(tmp_path / "a", "A1")
    sent = send(net, files)
    run(net, start + 31 * DAY)
    again = send(net, files, receiver="NTH", deliver=False)
    assert held(net, again.blobs) == sent.blobs
    run(net, start + 31 * DAY + 2 * GRACE)
    assert held(net, sent.blobs) == sent.blobs
    assert set(removals(net).values()) == {"restored"}
    aside = net.hub.blobs.root / "set-aside"  # type: ignore[attr-defined]
    assert not [p for p in aside.rglob("*") if p.is_file()]


def set_aside(net: InProcessHub, folder: Path) -> tuple[datetime, Sent]:
    """A study delivered 31 days ago, just set aside by the sweep."""
    start = utcnow()
    sent = send(net, study(folder / "a", "A1"))
    run(net, start + 31 * DAY)
    assert not held(net, sent.blobs)
    return start, sent


def _admin(net: InProcessHub, code: str, name: str) -> Person:
    net.add_user(code, name, ["pacs_manager"])
    return net.log_in(name, INSIDE)


def test_a_legal_hold_keeps_a_study_until_released(net: InProcessHub, tmp_path: Path) -> None:
    start = utcnow()
    sent = send(net, study(tmp_path / "a", "A1"))
    other = send(net, study(tmp_path / "b", "B1"))
    rvh, nth = _admin(net, "RVH", "rvh-admin"), _admin(net, "NTH", "nth-admin")
    hold = {"study_instance_uid": sent.study_uid, "reason": "Claim 2026/123"}

    # RVH received the study: its administrator may hold it. NTH never saw it: to NTH the
    # study does not exist. A clerk may not hold anything.
    r = nth.post("/api/v1/legal-holds", json=hold)
    assert r.status_code == 404 and "no study" in r.json()["detail"]
    net.add_user("RVH", "rvh-clerk", ["clerk"])
    clerk = net.log_in("rvh-clerk", INSIDE)
    assert clerk.post("/api/v1/legal-holds", json=hold).status_code == 403
    r = rvh.post("/api/v1/legal-holds", json={**hold, "study_instance_uid": "not a UID"})
    assert r.status_code == 422
    r = rvh.post("/api/v1/legal-holds", json=hold)
    assert r.status_code == 201, r.text
    hold_id = r.json()["id"]
    assert r.json()["institution"] == "RVH" and r.json()["placed_by"] == "user:rvh-admin"
    assert rvh.post("/api/v1/legal-holds", json=hold).status_code == 409
    [placed] = events(net, "retention:hold:placed")
    assert placed["study_ref"] == sent.study_uid and placed["actor"] == "rvh-admin"
    assert [h["id"] for h in rvh.get("/api/v1/legal-holds").json()] == [hold_id]
    assert nth.get("/api/v1/legal-holds").json() == []

    # Held: its images stay past the period; the other study's go.
    run(net, start + 31 * DAY)
    assert held(net, sent.blobs) == sent.blobs and not held(net, other.blobs)
    with net.hub.sessions() as session:
        mark = session.get(RetentionMark, sent.id)
        assert mark is not None and (mark.state, mark.recheck_after) == ("kept", None)
    # Looked at again each sweep? No: nothing changes until the hold is released.
    assert run(net, start + 32 * DAY).transfers == 0

    # Only RVH's administrators (or the network's) release it. (A month has passed: they
    # log in again.)
    rvh, nth = net.log_in("rvh-admin", INSIDE, rvh), net.log_in("nth-admin", INSIDE, nth)
    r = nth.post(f"/api/v1/legal-holds/{hold_id}/release", json={"reason": "mine now"})
    assert r.status_code == 404
    r = rvh.post(f"/api/v1/legal-holds/{hold_id}/release", json={"reason": "Claim settled"})
    assert r.status_code == 200 and r.json()["release_reason"] == "Claim settled"
    assert (
        rvh.post(f"/api/v1/legal-holds/{hold_id}/release", json={"reason": "x"}).status_code == 409
    )
    [released] = events(net, "retention:hold:released")
    assert released["study_ref"] == sent.study_uid
    run(net, start + 33 * DAY)
    assert not held(net, sent.blobs)


def test_a_hold_placed_within_the_grace_period_brings_the_images_back(
    net: InProcessHub, tmp_path: Path
) -> None:
    start, sent = set_aside(net, tmp_path)
    r = net.client().post(
        "/api/v1/legal-holds",
        headers=net.admin_headers,
        json={"study_instance_uid": sent.study_uid, "reason": "Inquest", "institution": "SEG"},
    )
    assert r.status_code == 201, r.text
    run(net, start + 31 * DAY + 2 * GRACE)
    assert held(net, sent.blobs) == sent.blobs
    assert {e["detail"]["reason"] for e in events(net, "retention:blob:restored")} == {"hold"}


def test_a_share_in_force_keeps_its_studies_until_it_ends(
    net: InProcessHub, tmp_path: Path
) -> None:
    start = utcnow()
    sent = send(net, study(tmp_path / "a", "A1"))
    net.add_user("SEG", "radiologist", ["radiologist"])
    net.add_user("SEG", "solicitor", [], external=True)
    radiologist = net.log_in("radiologist", INSIDE)
    r = radiologist.post(
        "/api/v1/shares",
        json={
            "grantee": "solicitor",
            "study_instance_uids": [sent.study_uid],
            "purpose": "Claim 2026/77",
            "days": 40,
        },
    )
    assert r.status_code == 201, r.text
    run(net, start + 31 * DAY)
    assert held(net, sent.blobs) == sent.blobs
    with net.hub.sessions() as session:
        mark = session.get(RetentionMark, sent.id)
        assert mark is not None and mark.state == "kept" and mark.recheck_after is not None
    # Looked at again once the share has ended.
    assert run(net, start + 35 * DAY).transfers == 0
    run(net, start + 41 * DAY)
    assert not held(net, sent.blobs)


def test_the_sweep_runs_as_a_periodic_job_once_per_period(
    net: InProcessHub, tmp_path: Path
) -> None:
    start = utcnow()
    sent = send(net, study(tmp_path / "a", "A1"))
    net.clock.now = start + 31 * DAY  # the hub's clock decides what is due
    schedules = kinds.schedules(net.hub.settings)
    assert SWEEP in {s.name for s in schedules}
    workers = [Worker(net.hub, schedules=schedules) for _ in range(2)]
    for worker in workers:
        worker.run_until_idle()
    assert not held(net, sent.blobs)
    with net.hub.sessions() as session:
        sweeps = session.scalars(select(Job).where(Job.kind == SWEEP)).all()
    assert [(j.status, j.attempts) for j in sweeps] == [(JobStatus.done, 1)]
    # Not enabled: not scheduled, and a sweep queued anyway does nothing.
    net.hub.settings.retention = RetentionPolicy()
    assert SWEEP not in {s.name for s in kinds.schedules(net.hub.settings)}


def test_removed_images_answer_410_and_cannot_be_sent_again(
    net: InProcessHub, tmp_path: Path
) -> None:
    start = utcnow()
    gone = send(net, study(tmp_path / "g", "G1"))
    run(net, start + 31 * DAY)
    run(net, start + 31 * DAY + 2 * GRACE)  # set aside, then removed for good
    assert not held(net, gone.blobs)
    # Reading them says why, in the protocol's terms.
    r = net.client().get(f"/dicomweb/studies/{gone.study_uid}", headers=net.admin_headers)
    assert r.status_code == 410 and "retention" in r.json()["detail"], r.text
    # A transfer made of them could never be delivered: refused with the reason.
    r = net.client().post(
        "/api/v1/transfers",
        headers=net.admin_headers,
        json={"sender": "SEG", "receiver": "RVH", "study_instance_uids": [gone.study_uid]},
    )
    assert r.status_code == 409 and "retention" in r.json()["detail"], r.text

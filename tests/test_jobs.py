"""The durable job queue: jobs exist once their transaction commits, each is run by one worker
at a time under a lease that another worker takes over when it runs out, failures are tried
again later and then given up (audited), periodic jobs are queued once per period however
many workers look, and a hub process on SQLite runs a worker of its own."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from conftest import wait_until
from hubapp import InProcessHub
from imagebridge.audit.models import AuditEvent
from imagebridge.db import make_engine, make_sessionmaker, utcnow
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.jobs.models import Job, JobStatus
from imagebridge.jobs.services import (
    Claimed,
    LeaseLost,
    Schedule,
    claim,
    enqueue,
    fail,
    finish,
    queue_due,
)
from imagebridge.jobs.worker import Worker
from imagebridge.migrate import upgrade
from imagebridge.notifications.jobs import ARRIVAL_NOTICE
from imagebridge.settings import JobSettings
from imagebridge.transfers.framing import MEDIA_TYPE, encode_files

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=utcnow().tzinfo)
KIND = "test.job"


@pytest.fixture
def db(database_url: str) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine, make_sessionmaker(engine)
    engine.dispose()


def _queue(sessions: sessionmaker[Session], payload: dict[str, Any] | None = None) -> int:
    with sessions() as session, session.begin():
        job = enqueue(session, KIND, payload, now=T0)
        session.flush()
        return job.id


def _claim(
    sessions: sessionmaker[Session], worker: str, now: datetime, **kw: Any
) -> Claimed | None:
    with sessions() as session, session.begin():
        return claim(
            session,
            [KIND],
            worker,
            now=now,
            lease_seconds=kw.get("lease", 10),
            max_attempts=kw.get("max_attempts", 3),
        )


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_job_exists_only_once_its_transaction_commits(db: Any) -> None:
    _, sessions = db
    with pytest.raises(RuntimeError), sessions() as session, session.begin():
        enqueue(session, KIND, {"n": 1}, now=T0)
        raise RuntimeError("the change that justified it failed")
    assert _claim(sessions, "w1", T0) is None
    _queue(sessions, {"n": 2})
    claimed = _claim(sessions, "w1", T0)
    assert claimed is not None and claimed.payload == {"n": 2}


def test_a_lease_that_runs_out_is_taken_up_and_only_the_new_holder_finishes(db: Any) -> None:
    _, sessions = db
    job_id = _queue(sessions)
    first = _claim(sessions, "w1", T0)
    assert first is not None and first.attempt == 1
    # While the lease lasts nobody else gets the job.
    assert _claim(sessions, "w2", T0 + timedelta(seconds=9)) is None
    second = _claim(sessions, "w2", T0 + timedelta(seconds=11))
    assert second is not None and second.id == job_id and second.attempt == 2
    assert second.token != first.token
    # The first worker, back from the dead, can neither checkpoint nor finish it.
    with pytest.raises(LeaseLost), sessions() as session, session.begin():
        first.step_done(session, "told")
    with sessions() as session, session.begin():
        assert not finish(session, first, now=T0 + timedelta(seconds=12))
    with sessions() as session, session.begin():
        second.step_done(session, "told")
        assert finish(session, second, now=T0 + timedelta(seconds=12))
    job = _job(sessions, job_id)
    assert (job.status, job.leased_by, job.attempts) == (JobStatus.done, "w2", 2)
    assert job.progress == {"steps": ["told"]}


def test_failures_are_tried_again_later_then_given_up_and_audited(db: Any) -> None:
    _, sessions = db
    job_id = _queue(sessions)
    now = T0
    waits = []
    for attempt in (1, 2, 3):
        claimed = _claim(sessions, "w1", now)
        assert claimed is not None and claimed.attempt == attempt
        with sessions() as session, session.begin():
            outcome = fail(
                session,
                claimed,
                f"OSError: try {attempt}",
                now=now,
                max_attempts=3,
                retry_seconds=2,
                retry_max_seconds=3,
            )
        assert outcome == ("failed" if attempt == 3 else "retry")
        job = _job(sessions, job_id)
        if outcome == "retry":
            waits.append((job.available_at - now).total_seconds())
            assert _claim(sessions, "w1", job.available_at - timedelta(seconds=1)) is None
            now = job.available_at
    assert waits == [2, 3]  # doubling, up to the longest wait
    job = _job(sessions, job_id)
    assert (job.status, job.last_error) == (JobStatus.failed, "OSError: try 3")
    assert _claim(sessions, "w1", now + timedelta(days=1)) is None
    with sessions() as session:
        [event] = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "job:job:abandoned")
        ).all()
    assert event.detail["job"] == job_id and event.detail["attempts"] == 3


def test_a_job_whose_workers_keep_dying_is_given_up(db: Any) -> None:
    _, sessions = db
    job_id = _queue(sessions)
    now = T0
    for _ in range(3):
        assert _claim(sessions, "w", now, lease=5) is not None
        now += timedelta(seconds=6)  # the worker died: the lease runs out
    assert _claim(sessions, "w", now, lease=5) is None
    assert _job(sessions, job_id).status == JobStatus.failed


def test_periodic_jobs_are_queued_once_per_period_however_many_workers_look(
    database_url: str,
) -> None:
    engines = [make_engine(database_url) for _ in range(4)]
    upgrade(engines[0])
    schedule = [Schedule("sweep", KIND, 60)]
    try:
        factories = [make_sessionmaker(e) for e in engines]

        def look(now: datetime) -> list[str]:
            """Every worker (eight threads, four connection pools) at once."""
            found: list[str] = []
            start = threading.Barrier(8)

            def one(sessions: sessionmaker[Session]) -> None:
                start.wait()
                with sessions() as session, session.begin():
                    found.extend(queue_due(session, schedule, now=now))

            threads = [threading.Thread(target=one, args=(factories[n % 4],)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return found

        assert look(T0) == ["sweep"]
        assert look(T0 + timedelta(seconds=59)) == []
        # Due again, but the last one has not run: not queued twice.
        assert look(T0 + timedelta(seconds=61)) == []
        claimed = _claim(factories[0], "w", T0 + timedelta(seconds=61))
        assert claimed is not None
        with factories[0]() as session, session.begin():
            finish(session, claimed, now=T0 + timedelta(seconds=62))
        assert look(T0 + timedelta(seconds=122)) == ["sweep"]
    finally:
        for e in engines:
            e.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_workers_claiming_together_take_each_job_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight claimers on two connection pools (two processes' worth) drain 200 jobs: on
    PostgreSQL they pass over each other's locked rows (SKIP LOCKED), on SQLite they take
    turns; either way no job is claimed twice and none is left."""
    url = (
        str(request.getfixturevalue("postgres_url"))
        if kind == "postgresql"
        else f"sqlite:///{tmp_path / 'hub.db'}"
    )
    engines = [make_engine(url) for _ in range(2)]
    upgrade(engines[0])
    factories = [make_sessionmaker(e) for e in engines]
    try:
        with factories[0]() as session, session.begin():
            for n in range(200):
                enqueue(session, KIND, {"n": n}, now=T0)
        claims: list[tuple[int, str]] = []

        def drain(sessions: sessionmaker[Session], name: str) -> None:
            while (claimed := _claim(sessions, name, T0 + timedelta(seconds=1))) is not None:
                claims.append((claimed.id, name))
                with sessions() as session, session.begin():
                    assert finish(session, claimed, now=T0 + timedelta(seconds=1))

        threads = [
            threading.Thread(target=drain, args=(factories[n % 2], f"w{n}")) for n in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = [job_id for job_id, _ in claims]
        assert len(ids) == 200 and len(set(ids)) == 200
        assert len({name for _, name in claims}) > 1  # they really worked side by side
        with factories[0]() as session:
            assert {j.status for j in session.scalars(select(Job))} == {JobStatus.done}
    finally:
        for e in engines:
            e.dispose()


def test_a_stopping_worker_hands_back_what_it_has_not_finished(tmp_path: Path) -> None:
    net = InProcessHub(tmp_path / "hub")
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow(context: Any, job: Claimed) -> None:
        ran.append("slow")
        started.set()
        release.wait(10)

    try:
        net.hub.settings.jobs = JobSettings(poll_seconds=0.05, concurrency=1)
        worker = Worker(net.hub, handlers={KIND: slow}, schedules=[], name="stopping")
        job_id = _queue(net.hub.sessions)
        worker.start()
        assert started.wait(10)
        worker.stop(timeout=0.2)
        job = _job(net.hub.sessions, job_id)
        assert job.status == JobStatus.queued and job.available_at <= utcnow()
        release.set()
        # Another worker takes it up at once.
        other = Worker(net.hub, handlers={KIND: lambda c, j: ran.append("other")}, schedules=[])
        assert other.run_until_idle() == 1
        assert ran == ["slow", "other"] and _job(net.hub.sessions, job_id).status == "done"
    finally:
        release.set()
        net.close()


# -- a hub process on SQLite runs its own worker -------------------------------------------


class Hooks(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hooks() -> Iterator[tuple[list[dict[str, Any]], int]]:
    Hooks.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Hooks.received, server.server_address[1]
    server.shutdown()
    server.server_close()


def deliver_over_http(net: Network, hub_url: str, folder: Path, tokens: dict[str, str]) -> str:
    """SEG's gateway uploads a small study for RVH and closes the transfer; RVH's reports
    every instance delivered. Through the hub's real HTTP routes; returns the transfer id."""
    paths = generate_ct_study(folder, slices=2, rows=16, columns=16).paths
    seg = {"Authorization": f"Bearer {tokens['SEG']}"}
    rvh = {"Authorization": f"Bearer {tokens['RVH']}"}
    with httpx.Client(base_url=hub_url, timeout=30) as client:
        r = client.post(
            "/api/v1/transfers", headers=seg, json={"receiver": "RVH", "origin": "dicom"}
        )
        tid: str = r.json()["id"]
        items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]
        r = client.post(
            f"/api/v1/transfers/{tid}/instances",
            headers={**seg, "Content-Type": MEDIA_TYPE},
            content=b"".join(encode_files(items)),
        )
        assert r.status_code == 200, r.text
        assert client.post(f"/api/v1/transfers/{tid}/close", headers=seg).status_code == 200
        work = client.get("/api/v1/gateway/work", headers=rvh).json()
        outcomes = [{"id": i["id"], "outcome": "delivered"} for i in work["instances"]]
        r = client.post(
            f"/api/v1/transfers/{tid}/deliveries", headers=rvh, json={"instances": outcomes}
        )
        assert r.json()["status"] == "delivered", r.text
    return tid


def test_a_hub_process_on_sqlite_runs_the_jobs_itself(
    tmp_path: Path, hooks: tuple[list[dict[str, Any]], int]
) -> None:
    received, port = hooks
    net = Network(tmp_path / "net")
    sqlite = f"sqlite:///{tmp_path / 'net' / 'hub' / 'hub.db'}"
    try:
        # SQLite whichever database the other tests use: the worker runs by default there.
        net.start_hub(
            database_url=sqlite,
            notifications={"webhooks": {"RVH": f"http://127.0.0.1:{port}/rvh"}},
            jobs={"poll_seconds": 0.2},
        )
        tokens = {}
        for code in ("SEG", "RVH"):
            net.add_institution(code, code)
            tokens[code] = net.issue_token(code)
        tid = deliver_over_http(net, net.hub_url, tmp_path / "study", tokens)
        wait_until("the arrival notice", lambda: received)
        assert [n["transfer_id"] for n in received] == [tid]
        engine = make_engine(sqlite)

        def notices() -> list[tuple[str, int]]:
            with engine.connect() as connection:
                query = select(Job.status, Job.attempts).where(Job.kind == ARRIVAL_NOTICE)
                return [(status, attempts) for status, attempts in connection.execute(query)]

        try:
            wait_until("the notice job done", lambda: notices() == [("done", 1)])
        finally:
            engine.dispose()
    finally:
        net.stop()

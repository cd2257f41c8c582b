"""Queueing, claiming and finishing jobs.

A job is queued in the caller's transaction, so it exists only once the change that
justifies it has committed. Workers claim jobs with a lease: on PostgreSQL with
``SELECT … FOR UPDATE SKIP LOCKED`` (claimers pass over each other's rows instead of
waiting), on SQLite inside the write lock every transaction takes (BEGIN IMMEDIATE). A
worker renews its leases while it lives; when it dies, its leases run out and another
worker takes the jobs up again. Every claim changes the job's lease token, and only the
holder of the current token may finish or checkpoint the job.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, event, exists, func, select, update
from sqlalchemy.orm import Session

from imagebridge.audit.services import record
from imagebridge.db import insert_missing
from imagebridge.jobs.models import Job, JobSchedule, JobStatus

# Set after a commit that queued jobs: wakes this process's worker at once (workers in
# other processes find them on their next poll).
QUEUED = threading.Event()
_QUEUED_KEY = "jobs_queued"
OPEN = (JobStatus.queued, JobStatus.running)


class LeaseLost(RuntimeError):
    """The job's lease ran out and another worker has taken it up."""


def enqueue(
    session: Session,
    kind: str,
    payload: dict[str, Any] | None = None,
    *,
    now: datetime,
    delay_seconds: float = 0.0,
) -> Job:
    """Queue a job in the caller's transaction: if that rolls back, there is no job."""
    job = Job(
        kind=kind,
        payload=payload or {},
        status=JobStatus.queued,
        available_at=now + timedelta(seconds=delay_seconds),
        created_at=now,
    )
    session.add(job)
    session.info[_QUEUED_KEY] = True
    return job


@event.listens_for(Session, "after_commit")
def _announce(session: Session) -> None:
    if session.info.pop(_QUEUED_KEY, False):
        QUEUED.set()


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(_QUEUED_KEY, None)


@dataclass
class Claimed:
    """A job as its worker holds it."""

    id: int
    kind: str
    payload: dict[str, Any]
    attempt: int
    token: str
    progress: dict[str, Any] = field(default_factory=dict)

    def done(self, step: str) -> bool:
        """Whether an earlier attempt finished this step."""
        return step in self.progress.get("steps", ())

    def step_done(self, session: Session, step: str) -> None:
        """Record, in the caller's transaction, that a step is done: a repeat skips it."""
        steps = [*self.progress.get("steps", ()), step]
        moved = session.execute(
            _held(self).values(progress={**self.progress, "steps": steps})
        ).rowcount  # type: ignore[attr-defined]
        if moved != 1:
            raise LeaseLost(f"job {self.id} was taken up by another worker")
        self.progress["steps"] = steps


def _held(claimed: Claimed) -> Any:
    return update(Job).where(
        Job.id == claimed.id,
        Job.lease_token == claimed.token,
        Job.status == JobStatus.running,
    )


def claim(
    session: Session,
    kinds: Iterable[str],
    worker: str,
    *,
    now: datetime,
    lease_seconds: float,
    max_attempts: int,
) -> Claimed | None:
    """Lease the job that has waited longest among those due, or one whose lease ran out.

    A job claimed ``max_attempts`` times without finishing (its workers kept dying on it) is
    given up instead of being run again.
    """
    while True:
        query = (
            select(Job)
            .where(Job.status.in_(OPEN), Job.available_at <= now, Job.kind.in_(list(kinds)))
            .order_by(Job.available_at, Job.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job = session.scalar(query)
        if job is None:
            return None
        if job.status == JobStatus.running and job.attempts >= max_attempts:
            _give_up(
                session, job, f"its worker stopped during each of {job.attempts} attempts", now
            )
            continue
        job.status = JobStatus.running
        job.attempts += 1
        job.leased_by = worker[:100]
        job.lease_token = secrets.token_hex(16)
        job.available_at = now + timedelta(seconds=lease_seconds)
        session.flush()
        return Claimed(
            job.id, job.kind, dict(job.payload), job.attempts, job.lease_token, dict(job.progress)
        )


def renew(
    session: Session, held: Iterable[Claimed], *, now: datetime, lease_seconds: float
) -> list[int]:
    """Extend the leases of the jobs a worker is running; the ids of those it no longer holds."""
    lost = []
    until = now + timedelta(seconds=lease_seconds)
    for claimed in held:
        moved = session.execute(_held(claimed).values(available_at=until)).rowcount  # type: ignore[attr-defined]
        if moved != 1:
            lost.append(claimed.id)
    return lost


def finish(session: Session, claimed: Claimed, *, now: datetime) -> bool:
    """The job is done; False if its lease was lost (the new holder finishes it)."""
    moved = session.execute(
        _held(claimed).values(status=JobStatus.done, finished_at=now, available_at=now)
    ).rowcount  # type: ignore[attr-defined]
    return bool(moved == 1)


def backoff(attempt: int, first: float, longest: float) -> float:
    """Seconds before attempt ``attempt + 1``: doubling from ``first`` up to ``longest``."""
    return float(min(first * 2 ** max(attempt - 1, 0), longest))


def fail(
    session: Session,
    claimed: Claimed,
    error: str,
    *,
    now: datetime,
    max_attempts: int,
    retry_seconds: float,
    retry_max_seconds: float,
) -> str:
    """After a failed attempt: ``retry`` (queued again, later), ``failed`` (given up, and
    audited) or ``lost`` (another worker holds the job now)."""
    job = session.scalar(
        select(Job).where(
            Job.id == claimed.id,
            Job.lease_token == claimed.token,
            Job.status == JobStatus.running,
        )
    )
    if job is None:
        return "lost"
    if claimed.attempt >= max_attempts:
        _give_up(session, job, error, now)
        return "failed"
    job.status = JobStatus.queued
    job.last_error = error[:2000]
    job.available_at = now + timedelta(
        seconds=backoff(claimed.attempt, retry_seconds, retry_max_seconds)
    )
    return "retry"


def _give_up(session: Session, job: Job, error: str, now: datetime) -> None:
    job.status = JobStatus.failed
    job.last_error = error[:2000]
    job.finished_at = now
    record(
        session,
        "job:job:abandoned",
        "failure",
        actor_type="system",
        actor="jobs",
        detail={"job": job.id, "kind": job.kind, "attempts": job.attempts, "error": error[:300]},
    )


def hand_back(session: Session, held: Iterable[Claimed], *, now: datetime) -> None:
    """A stopping worker returns the jobs it has not finished, for others to take up now."""
    for claimed in held:
        session.execute(_held(claimed).values(status=JobStatus.queued, available_at=now))


@dataclass(frozen=True)
class Schedule:
    """A periodic job: ``kind`` queued every ``interval_seconds`` under ``name``."""

    name: str
    kind: str
    interval_seconds: float


def queue_due(session: Session, schedules: Iterable[Schedule], *, now: datetime) -> list[str]:
    """Queue the periodic jobs that have fallen due; the names of those queued.

    Whichever process moves a schedule's next run forward queues its job, in the same
    transaction: the conditional UPDATE lets exactly one of several workers do so. A job
    still queued or running from the last period is not queued twice.
    """
    schedules = list(schedules)
    insert_missing(session, JobSchedule, [{"name": s.name, "next_run_at": now} for s in schedules])
    queued = []
    for s in schedules:
        moved = session.execute(
            update(JobSchedule)
            .where(JobSchedule.name == s.name, JobSchedule.next_run_at <= now)
            .values(next_run_at=now + timedelta(seconds=s.interval_seconds))
        ).rowcount  # type: ignore[attr-defined]
        if moved != 1:
            continue
        pending = session.scalar(select(exists().where(Job.kind == s.kind, Job.status.in_(OPEN))))
        if not pending:
            enqueue(session, s.kind, {"schedule": s.name}, now=now)
            queued.append(s.name)
    return queued


def prune(session: Session, *, before: datetime) -> int:
    """Remove jobs that finished before ``before``; how many."""
    result = session.execute(
        delete(Job).where(
            Job.status.in_((JobStatus.done, JobStatus.failed)), Job.finished_at < before
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Depth:
    kind: str
    status: str
    count: int
    earliest: datetime | None  # the earliest time one of them became available


def depth(session: Session) -> list[Depth]:
    """Jobs by kind and status, given-up ones included."""
    return [
        Depth(kind, status, count, earliest)
        for kind, status, count, earliest in session.execute(
            select(Job.kind, Job.status, func.count(), func.min(Job.available_at))
            .where(Job.status.in_((*OPEN, JobStatus.failed)))
            .group_by(Job.kind, Job.status)
        )
    ]

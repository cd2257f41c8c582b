"""The job table and the periodic schedules."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from imagebridge.db import Base, UTCDateTime, utcnow


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"  # leased by a worker
    done = "done"
    failed = "failed"  # given up after its last attempt


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_available", "status", "available_at"),)

    # SQLite numbers its rows only with INTEGER keys; elsewhere ids outlive 2**31.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(12), default=JobStatus.queued)
    # When a worker may take the job: when it falls due, or, while one runs it, when that
    # worker's lease ends (a worker renews it while it lives). One column for both keeps the
    # claim a single range scan.
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    leased_by: Mapped[str] = mapped_column(String(100), default="")
    # Changes with every claim: only the current holder may finish or checkpoint the job.
    lease_token: Mapped[str] = mapped_column(String(32), default="")
    # Steps already done, so that a repeat after a crash skips them.
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobSchedule(Base):
    """When a periodic job next falls due: moved forward by whichever worker queues it."""

    __tablename__ = "job_schedules"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime)

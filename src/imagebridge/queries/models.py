"""Durable tasks the hub gives a gateway: query its PACS (find) or fetch studies from it."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from imagebridge.db import Base, UTCDateTime, new_id, utcnow


class TaskKind(enum.StrEnum):
    FIND = "find"  # C-FIND the PACS and answer the matches
    FETCH = "fetch"  # retrieve studies from the PACS and upload them as a transfer


class TaskStatus(enum.StrEnum):
    pending = "pending"
    running = "running"  # leased by the gateway
    done = "done"
    failed = "failed"
    expired = "expired"  # nobody answered in time: the answer is no longer wanted


FINISHED = (TaskStatus.done, TaskStatus.failed, TaskStatus.expired)


class GatewayTask(Base):
    __tablename__ = "gateway_tasks"
    __table_args__ = (Index("ix_gateway_tasks_inbox", "institution_id", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # The institution whose gateway runs the task, against its own PACS.
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(12), default=TaskStatus.pending)
    # find: level, keys, limit. fetch: level, keys, receiver, priority, reason.
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # find: the matches. fetch: instances uploaded.
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    requester_institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    requested_by: Mapped[str] = mapped_column(String(100), default="")
    # fetch: the transfer that carries the fetched instances.
    transfer_id: Mapped[str] = mapped_column(String(32), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

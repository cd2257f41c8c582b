"""The audit trail: an append-only table of structured events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from imagebridge.db import Base, UTCDateTime, utcnow


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor_type: Mapped[str] = mapped_column(String(16))  # user | gateway | system | admin
    actor: Mapped[str] = mapped_column(String(100), default="")
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)  # area:subject:action
    outcome: Mapped[str] = mapped_column(String(16))  # success | failure | refused
    patient_ref: Mapped[str] = mapped_column(String(130), default="")
    study_ref: Mapped[str] = mapped_column(String(64), default="", index=True)
    transfer_ref: Mapped[str] = mapped_column(String(32), default="", index=True)
    source_address: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

"""Transfers: studies and reports on their way from one institution to another."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from imagebridge.db import Base, UTCDateTime, new_id, utcnow


class TransferStatus(enum.StrEnum):
    receiving = "receiving"  # the sender is still uploading
    queued = "queued"  # complete at the hub, nothing delivered yet
    delivering = "delivering"
    delivered = "delivered"
    failed = "failed"


class ItemStatus(enum.StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


PRIORITY_RANK = {"urgent": 0, "routine": 1}


class Transfer(Base):
    __tablename__ = "transfers"
    __table_args__ = (
        UniqueConstraint("sender_institution_id", "idempotency_key"),
        Index("ix_transfers_inbox", "receiver_institution_id", "status", "priority_rank"),
        # Transfers by status, and those finished lately (metrics, retention).
        Index("ix_transfers_status_finished_at", "status", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    sender_institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    receiver_institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    priority: Mapped[str] = mapped_column(String(8), default="routine")
    priority_rank: Mapped[int] = mapped_column(Integer, default=1)
    reason: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(12), default=TransferStatus.receiving)
    origin: Mapped[str] = mapped_column(String(8), default="api")  # dicom | api
    idempotency_key: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    created_by: Mapped[str] = mapped_column(String(100), default="")
    instances_total: Mapped[int] = mapped_column(Integer, default=0)
    instances_delivered: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    # How many instances the sender says the transfer carries, and who counted them:
    # "gateway" (what it acknowledged to its PACS), "pacs" (the PACS's own count of the
    # study), "hub" (what the hub holds). Delivered only once the receiver confirms as many.
    instances_declared: Mapped[int | None] = mapped_column(Integer)
    declared_by: Mapped[str] = mapped_column(String(8), default="")
    # The sending association was aborted and the study not sent again in full.
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_delivered: Mapped[int] = mapped_column(BigInteger, default=0)
    failure_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    received_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivery_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When an urgent transfer still undelivered past its deadline raised its alert (once).
    late_alerted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    studies: Mapped[list[TransferStudy]] = relationship(
        cascade="all, delete-orphan", order_by="TransferStudy.id"
    )
    reports: Mapped[list[Report]] = relationship(cascade="all, delete-orphan", order_by="Report.id")


class TransferStudy(Base):
    __tablename__ = "transfer_studies"
    __table_args__ = (UniqueConstraint("transfer_id", "study_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    transfer_id: Mapped[str] = mapped_column(ForeignKey("transfers.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)


class TransferInstance(Base):
    __tablename__ = "transfer_instances"
    __table_args__ = (
        UniqueConstraint("transfer_id", "instance_id"),
        Index("ix_transfer_instances_work", "transfer_id", "status", "lease_until"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    transfer_id: Mapped[str] = mapped_column(ForeignKey("transfers.id"))
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    # The exact bytes this transfer carries, even if the index later holds newer ones.
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(12), default=ItemStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    detail: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    transfer_id: Mapped[str] = mapped_column(ForeignKey("transfers.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(32))  # application/pdf | text/plain
    title: Mapped[str] = mapped_column(String(64), default="Report")
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(12), default=ItemStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    detail: Mapped[str] = mapped_column(Text, default="")
    # The SOP Instance UID the receiving gateway gave the encapsulated report.
    delivered_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

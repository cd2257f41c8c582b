"""Legal holds, and what the retention sweep has done to transfers and blobs."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from imagebridge.db import Base, UTCDateTime, utcnow


class LegalHold(Base):
    """A study whose images the retention policy must not remove while the hold is on.

    It names the study by its StudyInstanceUID: every copy the hub holds of that study is
    kept, whichever institution it is filed under.
    """

    __tablename__ = "legal_holds"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    # The institution for which the hold was placed (its administrators may release it).
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    placed_by: Mapped[str] = mapped_column(String(100))
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    released_by: Mapped[str] = mapped_column(String(100), default="")
    release_reason: Mapped[str] = mapped_column(Text, default="")


class Examined(enum.StrEnum):
    done = "done"  # its blobs are removed, or left to the transfers that still need them
    kept = "kept"  # some were kept for a hold or a share: look again when that may end


class RetentionMark(Base):
    """A transfer the sweep has examined."""

    __tablename__ = "retention_marks"

    transfer_id: Mapped[str] = mapped_column(ForeignKey("transfers.id"), primary_key=True)
    state: Mapped[str] = mapped_column(String(8))
    examined_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # kept: when to look again (the end of the share that keeps it); none while a hold
    # keeps it (releasing the hold sets it).
    recheck_after: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RemovalState(enum.StrEnum):
    aside = "aside"  # set aside; removed for good after the grace period
    removed = "removed"
    restored = "restored"  # needed again within the grace period: put back


class BlobRemoval(Base):
    """A blob the sweep took away, and what became of it."""

    __tablename__ = "blob_removals"
    __table_args__ = (Index("ix_blob_removals_state", "state", "set_aside_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    transfer_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(12), default=RemovalState.aside)
    set_aside_at: Mapped[datetime] = mapped_column(UTCDateTime)
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

"""Grants of time-limited access to named studies for an external user."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from imagebridge.db import Base, UTCDateTime, utcnow
from imagebridge.index.models import Study


class Share(Base):
    __tablename__ = "shares"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The institution whose studies are shared, and the user who shared them.
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"), index=True)
    granted_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    grantee_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    studies: Mapped[list[Study]] = relationship(secondary="share_studies", lazy="selectin")


class ShareStudy(Base):
    __tablename__ = "share_studies"

    share_id: Mapped[int] = mapped_column(ForeignKey("shares.id"), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)

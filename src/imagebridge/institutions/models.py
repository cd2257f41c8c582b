"""The directory: institutions, their gateways and routing AE titles."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from imagebridge.db import Base, UTCDateTime, utcnow


class Institution(Base):
    __tablename__ = "institutions"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(16), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # Picking this AE title in a PACS send list routes a study here (routine)...
    routing_ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    # ...and this one, if set, routes it as urgent.
    urgent_ae_title: Mapped[str | None] = mapped_column(String(16), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    gateways: Mapped[list[Gateway]] = relationship(back_populates="institution")


class Gateway(Base):
    __tablename__ = "gateways"

    id: Mapped[int] = mapped_column(primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # SHA-256 of the secret token; the token itself is shown once, at issue.
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    institution: Mapped[Institution] = relationship(back_populates="gateways")


class TrustedNetwork(Base):
    """An address range of an institution's own network: logins from inside it may skip the
    second factor (never for administrators or external users)."""

    __tablename__ = "trusted_networks"

    id: Mapped[int] = mapped_column(primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"), index=True)
    cidr: Mapped[str] = mapped_column(String(64))


class DiscoveryRule(Base):
    """An institution lets others find its studies: one row per institution it allows, or
    one row without a viewer for the whole network. With no row, nobody else finds them."""

    __tablename__ = "discovery_rules"
    __table_args__ = (UniqueConstraint("source_institution_id", "viewer_institution_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source_institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"), index=True)
    viewer_institution_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"))

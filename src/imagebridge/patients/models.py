"""The patient index: one person per NHS number, and each institution's local identifiers
for that person with the demographics the institution holds."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from imagebridge.db import Base, UTCDateTime, utcnow

# Where a local identifier comes from: a study the hub indexed, or the institution's own
# statement (its PAS or PACS, through an administrator or a feed).
INDEXED = "indexed"
REGISTERED = "registered"


class Person(Base):
    __tablename__ = "persons"

    id: Mapped[int] = mapped_column(primary_key=True)
    nhs_number: Mapped[str] = mapped_column(String(10), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PatientIdentifier(Base):
    """An institution's identifier (issuer + value) for a person, with its demographics.

    An indexed identifier follows one index Patient row (``patient_ref``); a registered one
    has none. The same local ID may appear from both sources: they are compared, not merged.
    """

    __tablename__ = "patient_identifiers"
    __table_args__ = (Index("ix_patient_identifiers_local_id", "issuer", "value"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("persons.id"), index=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"), index=True)
    # IssuerOfPatientID, or the institution's code where the PACS names no issuer.
    issuer: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    patient_ref: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), unique=True)
    family: Mapped[str] = mapped_column(String(200), default="")
    given: Mapped[str] = mapped_column(String(200), default="")  # given names, space-separated
    birth_date: Mapped[str] = mapped_column(String(8), default="")  # YYYYMMDD as in DICOM
    sex: Mapped[str] = mapped_column(String(16), default="")  # M, F, O or empty as in DICOM
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    person: Mapped[Person] = relationship()


class IdentityFlag(Base):
    """Identifiers that disagree, for a human to look at: never merged or split silently.

    ``signature`` names the disagreement (kind, the two identifiers and their values), so
    the same disagreement is raised once, even after it was resolved.
    """

    __tablename__ = "identity_flags"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # birth_date | sex | nhs_number
    signature: Mapped[str] = mapped_column(String(300), unique=True)
    identifier_id: Mapped[int] = mapped_column(ForeignKey("patient_identifiers.id"), index=True)
    other_identifier_id: Mapped[int] = mapped_column(
        ForeignKey("patient_identifiers.id"), index=True
    )
    reason: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolved_by: Mapped[str] = mapped_column(String(200), default="")
    resolution: Mapped[str] = mapped_column(String(500), default="")

    identifier: Mapped[PatientIdentifier] = relationship(foreign_keys=[identifier_id])
    other_identifier: Mapped[PatientIdentifier] = relationship(foreign_keys=[other_identifier_id])

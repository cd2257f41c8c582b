"""The outbox and inbox: an institution's transfers with their progress, filtered."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.index.models import Patient, Study
from imagebridge.institutions.models import Institution
from imagebridge.nhs import normalise_nhs_number
from imagebridge.transfers.models import Transfer, TransferStatus, TransferStudy

Box = Literal["inbox", "outbox"]
STATUSES = tuple(s.value for s in TransferStatus)
LIMIT = 200


@dataclass(frozen=True)
class Filters:
    box: Box = "outbox"
    since: date | None = None
    until: date | None = None  # inclusive: the whole day
    status: str = ""
    institution: str = ""  # the other side's code
    patient: str = ""  # patient ID, NHS number, or the start of the family name


@dataclass
class Progress:
    percent: int
    rate: float | None  # instances per second
    seconds_left: float | None


@dataclass
class Row:
    transfer: Transfer
    counterpart: str
    progress: Progress
    studies: list[dict[str, Any]] = field(default_factory=list)


def progress(t: Transfer, now: datetime) -> Progress:
    """How far delivery has come, at what rate since it began, and how long is left."""
    settled = t.instances_delivered + t.instances_failed
    percent = int(100 * settled / t.instances_total) if t.instances_total else 0
    if t.status == TransferStatus.delivered:
        percent = 100
    rate = left = None
    started = t.delivery_started_at
    if started is not None and t.instances_delivered:
        elapsed = ((t.finished_at or now) - started).total_seconds()
        if elapsed > 0:
            rate = t.instances_delivered / elapsed
            if t.status not in (TransferStatus.delivered, TransferStatus.failed):
                left = max(t.instances_total - settled, 0) / rate
    return Progress(percent, rate, left)


def _day_start(d: date) -> datetime:
    return datetime.combine(d, time.min, tzinfo=UTC)


def _patient_condition(term: str) -> Any:
    nhs = normalise_nhs_number(term)
    matching = [Patient.patient_id == term, Patient.patient_name.istartswith(term, autoescape=True)]
    if nhs:
        matching.append(Patient.nhs_number == nhs)
    return Transfer.id.in_(
        select(TransferStudy.transfer_id)
        .join(Study, Study.id == TransferStudy.study_id)
        .join(Patient, Patient.id == Study.patient_ref)
        .where(or_(*matching))
    )


def rows(session: Session, actor: Actor, f: Filters, now: datetime) -> list[Row]:
    """The actor's institution's transfers in one box, urgent first, then newest."""
    codes: dict[int, str] = {
        i: c for i, c in session.execute(select(Institution.id, Institution.code))
    }
    query = select(Transfer)
    mine, other = (
        (Transfer.receiver_institution_id, Transfer.sender_institution_id)
        if f.box == "inbox"
        else (Transfer.sender_institution_id, Transfer.receiver_institution_id)
    )
    if not actor.network_wide:
        query = query.where(mine == actor.institution_id)
    if f.status in STATUSES:
        query = query.where(Transfer.status == f.status)
    if f.since is not None:
        query = query.where(Transfer.created_at >= _day_start(f.since))
    if f.until is not None:
        query = query.where(Transfer.created_at < _day_start(f.until + timedelta(days=1)))
    if f.institution:
        wanted = [i for i, c in codes.items() if c == f.institution.strip().upper()]
        query = query.where(other.in_(wanted))
    if f.patient.strip():
        query = query.where(_patient_condition(f.patient.strip()))
    query = query.order_by(Transfer.priority_rank, Transfer.created_at.desc()).limit(LIMIT)
    transfers = session.scalars(query).all()
    out = {
        t.id: Row(
            t,
            codes.get(
                t.sender_institution_id if f.box == "inbox" else t.receiver_institution_id, ""
            ),
            progress(t, now),
        )
        for t in transfers
    }
    studies = session.execute(
        select(TransferStudy.transfer_id, Study, Patient)
        .join(Study, Study.id == TransferStudy.study_id)
        .join(Patient, Patient.id == Study.patient_ref)
        .where(TransferStudy.transfer_id.in_(list(out)))
        .order_by(TransferStudy.id)
    ).all()
    for transfer_id, study, patient in studies:
        out[transfer_id].studies.append(
            {
                "id": study.id,
                "description": study.study_description,
                "date": study.study_date,
                "patient_name": patient.patient_name,
                "patient_id": patient.patient_id,
                "nhs_number": patient.nhs_number or "",
            }
        )
    return list(out.values())


def counterparts(session: Session) -> list[tuple[str, str]]:
    return [
        (i.code, i.name) for i in session.scalars(select(Institution).order_by(Institution.code))
    ]

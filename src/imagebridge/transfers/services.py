"""The transfer engine: create transfers, take in their instances, hand out and track delivery."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.agreements.services import exchange_refusal, signed_ids
from imagebridge.audit.services import record
from imagebridge.db import utcnow
from imagebridge.dicom.part10 import Header
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.index.services import Indexed, NotIndexed, index_instances
from imagebridge.institutions.models import Institution
from imagebridge.notifications.jobs import queue_arrival_notice
from imagebridge.transfers.models import (
    PRIORITY_RANK,
    ItemStatus,
    Report,
    Transfer,
    TransferInstance,
    TransferStatus,
    TransferStudy,
)

OPEN_STATUSES = (TransferStatus.receiving, TransferStatus.queued, TransferStatus.delivering)
REPORT_MEDIA_TYPES = ("application/pdf", "text/plain")


_ITEMS = cast(Table, TransferInstance.__table__)
# Executed with one parameter set per item: SET takes the columns each set names.
_RESEND_ITEM = update(_ITEMS).where(_ITEMS.c.id == bindparam("row_id"))


class TransferError(ValueError):
    """A request the transfer engine refuses, with the reason in plain words."""


# Which transaction holds which transfer's row (session.info: per session, so per request).
_HELD = "imagebridge.transfers.held"


def hold(
    session: Session, transfer_id: str, only: ColumnElement[bool] | None = None
) -> Transfer | None:
    """The transfer, read afresh and held to the end of the transaction: a later turn on it
    in the same transaction need not read it again. ``only``: what the row must meet to be
    read (whose it is); a row that does not is neither read nor held, so a caller refused
    it never holds up its rightful users."""
    query = select(Transfer).where(Transfer.id == transfer_id)
    if only is not None:
        query = query.where(only)
    transfer = session.scalars(
        query.with_for_update().execution_options(populate_existing=True)
    ).one_or_none()
    if transfer is not None:
        session.info.setdefault(_HELD, {})[transfer.id] = session.get_transaction()
    return transfer


def _take_turn(session: Session, transfer: Transfer) -> None:
    """Hold the transfer's row to the end of the transaction, reading it afresh.

    Requests on one transfer (uploads, deliveries, close, retry) add to its counts and move
    its status. On PostgreSQL two at once would both start from the same old values; SQLite
    has one writer at a time anyway (and no row locks: there this is a plain reread).
    """
    held = session.info.get(_HELD, {})
    if held.get(transfer.id) is not session.get_transaction():
        session.refresh(transfer, with_for_update=True)


def create_transfer(
    session: Session,
    *,
    sender: Institution,
    receiver: Institution,
    actor: Actor,
    priority: str = "routine",
    reason: str = "",
    origin: str = "api",
    calling_ae_title: str = "",
    idempotency_key: str | None = None,
    study_instance_uids: list[str] | None = None,
) -> tuple[Transfer, bool]:
    """Create a transfer, or return the one made earlier with the same idempotency key."""
    if idempotency_key:
        existing = session.scalar(
            select(Transfer).where(
                Transfer.sender_institution_id == sender.id,
                Transfer.idempotency_key == idempotency_key,
            )
        )
        if existing is not None:
            return existing, False
    if sender.id == receiver.id:
        raise TransferError("sender and receiver are the same institution")
    if priority not in PRIORITY_RANK:
        raise TransferError("priority must be urgent or routine")
    transfer = Transfer(
        sender_institution_id=sender.id,
        receiver_institution_id=receiver.id,
        priority=priority,
        priority_rank=PRIORITY_RANK[priority],
        reason=reason[:2000],
        origin=origin,
        calling_ae_title=calling_ae_title,
        idempotency_key=idempotency_key,
        created_by=f"{actor.kind}:{actor.name}",
        status=TransferStatus.receiving,
    )
    session.add(transfer)
    session.flush()
    if study_instance_uids:
        _add_held_studies(session, transfer, sender, study_instance_uids)
        transfer.received_at = utcnow()
        transfer.status = TransferStatus.queued
        transfer.instances_declared, transfer.declared_by = transfer.instances_total, "hub"
    elif origin == "api":
        raise TransferError("name at least one study the hub holds for the sender")
    record(
        session,
        "transfer:transfer:created",
        institution_id=sender.id,
        transfer_ref=transfer.id,
        detail={"receiver": receiver.code, "priority": priority, "origin": origin},
        **actor.audit(),
    )
    return transfer, True


def _add_held_studies(
    session: Session, transfer: Transfer, sender: Institution, uids: list[str]
) -> None:
    for uid in dict.fromkeys(uids):
        study = session.scalar(
            select(Study).where(Study.institution_id == sender.id, Study.study_instance_uid == uid)
        )
        if study is None:
            raise TransferError(f"study {uid} is not held by the hub for {sender.code}")
        session.add(TransferStudy(transfer_id=transfer.id, study_id=study.id))
        rows = session.execute(
            select(Instance.id, Instance.blob_sha256, Instance.size)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id)
        ).all()
        for instance_id, sha, size in rows:
            session.add(
                TransferInstance(
                    transfer_id=transfer.id, instance_id=instance_id, blob_sha256=sha, size=size
                )
            )
            transfer.instances_total += 1
            transfer.bytes_total += size
    session.flush()


@dataclass
class IngestResult:
    accepted: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def add_instances(
    session: Session,
    transfer: Transfer,
    items: list[tuple[Header, str, int]],
    actor: Actor,
    nhs_issuer: str = "NHS",
) -> IngestResult:
    """Index received instances and attach them to a transfer still receiving."""
    _take_turn(session, transfer)
    if transfer.status != TransferStatus.receiving:
        raise TransferError(f"transfer is {transfer.status}, no longer receiving")
    result = IngestResult()
    per_study: Counter[tuple[str, str]] = Counter()
    linked_studies = set(
        session.scalars(
            select(TransferStudy.study_id).where(TransferStudy.transfer_id == transfer.id)
        )
    )
    indexed = index_instances(session, transfer.sender_institution_id, items, nhs_issuer)
    instance_ids = [i.id for i in indexed if isinstance(i, Indexed)]
    carried = {
        row.instance_id: row
        for row in session.execute(
            select(
                TransferInstance.id,
                TransferInstance.instance_id,
                TransferInstance.status,
                TransferInstance.size,
            ).where(
                TransferInstance.transfer_id == transfer.id,
                TransferInstance.instance_id.in_(instance_ids),
            )
        )
    }
    # Rows by instance: an instance sent twice in one batch is carried once, newest bytes.
    new_items: dict[int, dict[str, Any]] = {}
    resent: dict[int, dict[str, Any]] = {}
    for (header, sha, size), instance in zip(items, indexed, strict=True):
        if isinstance(instance, NotIndexed):
            result.refused.append((sha, str(instance)))
            record(
                session,
                "transfer:instance:refused",
                "failure",
                institution_id=transfer.sender_institution_id,
                patient_ref=header.text("PatientID"),
                study_ref=header.study_instance_uid,
                transfer_ref=transfer.id,
                detail={"reason": str(instance), "sop_instance_uid": header.sop_instance_uid},
                **actor.audit(),
            )
            continue
        if instance.study_id not in linked_studies:
            session.add(TransferStudy(transfer_id=transfer.id, study_id=instance.study_id))
            linked_studies.add(instance.study_id)
        item = carried.get(instance.id)
        if item is None:
            previous = new_items.get(instance.id)
            if previous is None:
                transfer.instances_total += 1
            else:
                transfer.bytes_total -= previous["size"]
            transfer.bytes_total += size
            new_items[instance.id] = {
                "transfer_id": transfer.id,
                "instance_id": instance.id,
                "blob_sha256": sha,
                "size": size,
            }
        else:
            # Sent again while the transfer is open: deliver it again (a PACS user who
            # resends expects it to arrive), with the newest bytes.
            previous = resent.get(instance.id)
            counted_size = item.size if previous is None else previous["size"]
            if previous is None and item.status == ItemStatus.delivered:
                transfer.instances_delivered -= 1
                transfer.bytes_delivered -= item.size
            elif previous is None and item.status == ItemStatus.failed:
                transfer.instances_failed -= 1
            transfer.bytes_total += size - counted_size
            resent[instance.id] = {
                "row_id": item.id,
                "blob_sha256": sha,
                "size": size,
                "status": ItemStatus.pending,
                "lease_until": None,
                "detail": "",
            }
        result.accepted.append(sha)
        per_study[(header.text("PatientID"), header.study_instance_uid)] += 1
    if new_items:
        session.execute(insert(_ITEMS), list(new_items.values()))
    if resent:
        session.execute(_RESEND_ITEM, list(resent.values()))
    for (patient_id, study_uid), count in per_study.items():
        # One event per study and batch, as an ATNA "DICOM Instances Transferred" message.
        record(
            session,
            "transfer:instances:received",
            institution_id=transfer.sender_institution_id,
            patient_ref=patient_id,
            study_ref=study_uid,
            transfer_ref=transfer.id,
            detail={"instances": count},
            **actor.audit(),
        )
    session.flush()
    return result


@dataclass(frozen=True)
class Declared:
    """What the sender says a transfer carries, as it closes it."""

    instances: int
    by: str = "gateway"  # gateway | pacs: who counted them
    interrupted: bool = False  # an association was aborted and the study not sent again


def close_transfer(
    session: Session, transfer: Transfer, actor: Actor, declared: Declared | None = None
) -> None:
    """The sender has sent everything: the transfer is complete at the hub.

    Without a declared count (an older gateway, a fetch), the count is what the hub holds.
    """
    _take_turn(session, transfer)
    if transfer.status != TransferStatus.receiving:
        return
    if declared is None:
        declared = Declared(transfer.instances_total, "hub")
    transfer.instances_declared = declared.instances
    transfer.declared_by = declared.by
    transfer.interrupted = declared.interrupted
    transfer.received_at = utcnow()
    transfer.status = TransferStatus.queued
    if transfer.instances_total == 0 and not transfer.reports:
        transfer.status = TransferStatus.failed
        transfer.failure_reason = "no instance was received"
        transfer.finished_at = utcnow()
    record(
        session,
        "transfer:transfer:received",
        institution_id=transfer.sender_institution_id,
        transfer_ref=transfer.id,
        detail={
            "instances": transfer.instances_total,
            "bytes": transfer.bytes_total,
            "declared": declared.instances,
            "declared_by": declared.by,
            "interrupted": declared.interrupted,
        },
        **actor.audit(),
    )
    refresh_status(session, transfer, actor)


def add_report(
    session: Session,
    transfer: Transfer,
    *,
    media_type: str,
    title: str,
    study_instance_uid: str | None,
    sha256: str,
    size: int,
    actor: Actor,
) -> Report:
    _take_turn(session, transfer)
    if media_type not in REPORT_MEDIA_TYPES:
        raise TransferError("a report is application/pdf or text/plain")
    study_instance_uid = report_study(session, transfer, study_instance_uid)
    report = Report(
        transfer_id=transfer.id,
        study_instance_uid=study_instance_uid,
        media_type=media_type,
        title=title[:64] or "Report",
        blob_sha256=sha256,
        size=size,
    )
    transfer.reports.append(report)
    session.flush()
    record(
        session,
        "transfer:report:attached",
        institution_id=transfer.sender_institution_id,
        study_ref=study_instance_uid,
        transfer_ref=transfer.id,
        detail={"media_type": media_type, "bytes": size},
        **actor.audit(),
    )
    if transfer.status in (TransferStatus.delivered, TransferStatus.failed):
        # A report may follow the images: the transfer reopens to deliver it.
        transfer.finished_at = None
        transfer.status = TransferStatus.delivering
    return report


def report_study(session: Session, transfer: Transfer, study_instance_uid: str | None) -> str:
    """The study a report goes into: the one named, or the transfer's only study."""
    uids = study_uids(session, transfer)
    if study_instance_uid is None:
        if len(uids) != 1:
            raise TransferError("the transfer carries several studies (or none yet): name one")
        return uids[0]
    if study_instance_uid not in uids:
        raise TransferError("the transfer does not carry that study")
    return study_instance_uid


def study_uids(session: Session, transfer: Transfer) -> list[str]:
    return list(
        session.scalars(
            select(Study.study_instance_uid)
            .join(TransferStudy, TransferStudy.study_id == Study.id)
            .where(TransferStudy.transfer_id == transfer.id)
            .order_by(TransferStudy.id)
        )
    )


@dataclass
class WorkItem:
    id: int
    sha256: str
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str


@dataclass
class ReportItem:
    id: int
    sha256: str
    media_type: str
    title: str
    study_instance_uid: str
    template_sha256: str  # an image of the study whose header the report copies


@dataclass
class WorkBatch:
    transfer: Transfer
    sender_code: str
    instances: list[WorkItem]
    reports: list[ReportItem]


def _within(candidates: Sequence[WorkItem], max_bytes: int | None) -> list[WorkItem]:
    items: list[WorkItem] = []
    total = 0
    for item in candidates:
        total += item.size
        if items and max_bytes is not None and total > max_bytes:
            break
        items.append(item)
    return items


def next_work(
    session: Session,
    receiver_id: int,
    limit: int,
    lease_seconds: float,
    max_bytes: int | None = None,
) -> WorkBatch | None:
    """Lease the next deliverable items for an institution: urgent first, then oldest; at
    most ``limit`` of them, and no more than ``max_bytes`` together (but always one)."""
    now = utcnow()
    free = or_(TransferInstance.lease_until.is_(None), TransferInstance.lease_until < now)
    # A withdrawn agreement stops delivery at once, on either side.
    if exchange_refusal(session, receiver_id):
        return None
    transfers = session.scalars(
        select(Transfer)
        .where(
            Transfer.receiver_institution_id == receiver_id,
            Transfer.status.in_(OPEN_STATUSES),
            Transfer.sender_institution_id.in_(signed_ids()),
        )
        .order_by(Transfer.priority_rank, Transfer.created_at)
    ).all()
    lease = now + timedelta(seconds=lease_seconds)
    for transfer in transfers:
        rows = session.execute(
            select(
                TransferInstance.id,
                TransferInstance.blob_sha256,
                TransferInstance.size,
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
                Instance.transfer_syntax_uid,
                Study.study_instance_uid,
            )
            .join(Instance, Instance.id == TransferInstance.instance_id)
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(
                TransferInstance.transfer_id == transfer.id,
                TransferInstance.status == ItemStatus.pending,
                free,
            )
            .order_by(TransferInstance.id)
            .limit(limit)
            # Another hub process may be leasing this transfer's items right now: take others.
            .with_for_update(of=TransferInstance, skip_locked=True)
        ).all()
        items = _within([WorkItem(*row) for row in rows], max_bytes)
        if items:
            # One statement for the whole lease: this runs for every batch delivered.
            session.execute(
                update(TransferInstance)
                .where(TransferInstance.id.in_([i.id for i in items]))
                .values(lease_until=lease, attempts=TransferInstance.attempts + 1)
                .execution_options(synchronize_session=False)
            )
        reports = [] if items else _report_work(session, transfer, lease)
        if items or reports:
            sender = session.get(Institution, transfer.sender_institution_id)
            assert sender is not None
            session.flush()
            return WorkBatch(transfer, sender.code, items, reports)
    return None


def _report_work(session: Session, transfer: Transfer, lease: Any) -> list[ReportItem]:
    # Reports go once the images are in: they must land in a study the PACS already has.
    if transfer.status == TransferStatus.receiving:
        return []
    unfinished = session.scalar(
        select(func.count())
        .select_from(TransferInstance)
        .where(
            TransferInstance.transfer_id == transfer.id,
            TransferInstance.status == ItemStatus.pending,
        )
    )
    if unfinished:
        return []
    now = utcnow()
    out: list[ReportItem] = []
    free = session.scalars(
        select(Report)
        .where(
            Report.transfer_id == transfer.id,
            Report.status == ItemStatus.pending,
            or_(Report.lease_until.is_(None), Report.lease_until <= now),
        )
        .order_by(Report.id)
        .with_for_update(skip_locked=True)
    )
    for report in free:
        template = session.scalar(
            select(TransferInstance.blob_sha256)
            .join(Instance, Instance.id == TransferInstance.instance_id)
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(
                TransferInstance.transfer_id == transfer.id,
                Study.study_instance_uid == report.study_instance_uid,
            )
            .limit(1)
        )
        if template is None:
            continue
        report.lease_until = lease
        report.attempts += 1
        out.append(
            ReportItem(
                report.id,
                report.blob_sha256,
                report.media_type,
                report.title,
                report.study_instance_uid,
                template,
            )
        )
    return out


def release_leases(session: Session, receiver_id: int) -> int:
    """Clear the leases on an institution's undelivered items (its gateway restarted)."""
    mine = select(Transfer.id).where(
        Transfer.receiver_institution_id == receiver_id, Transfer.status.in_(OPEN_STATUSES)
    )
    result = session.execute(
        update(TransferInstance)
        .where(
            TransferInstance.transfer_id.in_(mine),
            TransferInstance.status == ItemStatus.pending,
            TransferInstance.lease_until.is_not(None),
        )
        .values(lease_until=None)
    )
    session.execute(
        update(Report)
        .where(Report.transfer_id.in_(mine), Report.status == ItemStatus.pending)
        .values(lease_until=None)
    )
    count: int = getattr(result, "rowcount", 0)
    return count


@dataclass(frozen=True)
class Outcome:
    id: int
    outcome: str  # delivered | failed | retry
    detail: str = ""
    sop_instance_uid: str = ""


def record_deliveries(
    session: Session,
    transfer: Transfer,
    instances: list[Outcome],
    reports: list[Outcome],
    actor: Actor,
) -> None:
    _take_turn(session, transfer)
    now = utcnow()
    by_id = {o.id: o for o in instances}
    pending = (
        session.execute(
            select(TransferInstance.id, TransferInstance.size).where(
                TransferInstance.transfer_id == transfer.id,
                TransferInstance.id.in_(by_id),
                # A repeated report of the same delivery changes nothing.
                TransferInstance.status == ItemStatus.pending,
            )
        ).all()
        if by_id
        else []
    )
    delivered = failed = 0
    failures: Counter[str] = Counter()
    changes: list[dict[str, Any]] = []
    for item_id, size in pending:
        outcome = by_id[item_id]
        status, delivered_at = ItemStatus.pending, None  # "retry": back in the queue
        if outcome.outcome == "delivered":
            status, delivered_at = ItemStatus.delivered, now
            transfer.bytes_delivered += size
            delivered += 1
        elif outcome.outcome == "failed":
            status = ItemStatus.failed
            failed += 1
            failures[outcome.detail[:200]] += 1
        changes.append(
            {
                "id": item_id,
                "status": status,
                "delivered_at": delivered_at,
                "detail": outcome.detail[:500],
                "lease_until": None,
            }
        )
    if changes:
        # Bulk UPDATE by primary key: one executemany for the batch.
        session.execute(update(TransferInstance), changes)
    transfer.instances_delivered += delivered
    transfer.instances_failed += failed
    if delivered and transfer.delivery_started_at is None:
        transfer.delivery_started_at = now
    for report in transfer.reports:
        r = next((o for o in reports if o.id == report.id), None)
        if r is None or report.status != ItemStatus.pending:
            continue
        report.lease_until = None
        report.detail = r.detail[:500]
        if r.outcome == "delivered":
            report.status = ItemStatus.delivered
            report.delivered_sop_instance_uid = r.sop_instance_uid[:64]
        elif r.outcome == "failed":
            report.status = ItemStatus.failed
            failures[r.detail[:200]] += 1
        record(
            session,
            f"transfer:report:{r.outcome}",
            "success" if r.outcome == "delivered" else "failure",
            institution_id=transfer.receiver_institution_id,
            study_ref=report.study_instance_uid,
            transfer_ref=transfer.id,
            detail={"detail": r.detail[:200]},
            **actor.audit(),
        )
    if delivered:
        record(
            session,
            "transfer:instances:delivered",
            institution_id=transfer.receiver_institution_id,
            transfer_ref=transfer.id,
            detail={"instances": delivered},
            **actor.audit(),
        )
    if failures:
        transfer.failure_reason = "; ".join(sorted(failures))[:2000]
        record(
            session,
            "transfer:instances:failed",
            "failure",
            institution_id=transfer.receiver_institution_id,
            transfer_ref=transfer.id,
            detail={"failures": dict(failures)},
            **actor.audit(),
        )
    retried = [o for o in instances if o.outcome == "retry"]
    if retried:
        record(
            session,
            "transfer:delivery:deferred",
            "failure",
            institution_id=transfer.receiver_institution_id,
            transfer_ref=transfer.id,
            detail={"instances": len(retried), "reason": retried[0].detail[:200]},
            **actor.audit(),
        )
    refresh_status(session, transfer, actor)


def retry_failed(session: Session, transfer: Transfer, actor: Actor) -> int:
    """Put failed items back in the queue."""
    _take_turn(session, transfer)
    result = session.execute(
        update(TransferInstance)
        .where(
            TransferInstance.transfer_id == transfer.id,
            TransferInstance.status == ItemStatus.failed,
        )
        .values(status=ItemStatus.pending, lease_until=None, detail="")
    )
    count: int = getattr(result, "rowcount", 0)
    reports = 0
    for report in transfer.reports:
        if report.status == ItemStatus.failed:
            report.status, report.lease_until, report.detail = ItemStatus.pending, None, ""
            reports += 1
    transfer.instances_failed -= count
    if count or reports:
        transfer.failure_reason = ""
        transfer.finished_at = None
        transfer.status = TransferStatus.queued
        refresh_status(session, transfer, actor)
    record(
        session,
        "transfer:transfer:retried",
        institution_id=transfer.sender_institution_id,
        transfer_ref=transfer.id,
        detail={"instances": count, "reports": reports},
        **actor.audit(),
    )
    return count + reports


def refresh_status(session: Session, transfer: Transfer, actor: Actor) -> None:
    if transfer.status == TransferStatus.receiving:
        return
    reports = Counter(r.status for r in transfer.reports)
    settled = transfer.instances_delivered + transfer.instances_failed
    if settled >= transfer.instances_total and not reports[ItemStatus.pending]:
        failed = transfer.instances_failed or reports[ItemStatus.failed]
        shortfall = incompleteness(transfer)
        if shortfall and not failed:
            transfer.failure_reason = shortfall
        new = TransferStatus.failed if failed or shortfall else TransferStatus.delivered
    elif transfer.instances_delivered or reports[ItemStatus.delivered]:
        new = TransferStatus.delivering
    else:
        new = TransferStatus.queued
    if new == transfer.status:
        return
    transfer.status = new
    if new in (TransferStatus.delivered, TransferStatus.failed):
        transfer.finished_at = utcnow()
        if new == TransferStatus.delivered:
            queue_arrival_notice(session, transfer.id)
        record(
            session,
            f"transfer:transfer:{new}",
            "success" if new == TransferStatus.delivered else "failure",
            institution_id=transfer.receiver_institution_id,
            transfer_ref=transfer.id,
            detail={
                "instances_delivered": transfer.instances_delivered,
                "instances_failed": transfer.instances_failed,
                "reason": transfer.failure_reason[:200],
            },
            **actor.audit(),
        )


def incompleteness(transfer: Transfer) -> str:
    """Why a transfer whose items are all settled is still not complete; "" if it is."""
    declared = transfer.instances_declared
    if declared is not None and transfer.instances_delivered < declared:
        return (
            f"incomplete: the receiver confirmed {transfer.instances_delivered} of the "
            f"{declared} instances declared by the {transfer.declared_by}"
        )
    if transfer.interrupted:
        return "incomplete: the sending association was aborted and the study not sent again"
    return ""


def describe(
    session: Session, transfer: Transfer, parties: tuple[Institution, Institution] | None = None
) -> dict[str, Any]:
    """The transfer as the API shows it. ``parties``: its sender and receiver, when the
    caller has them and the transfer was just made empty (no studies or reports to read)."""
    # The two institutions named, not the whole directory (hundreds in a national network);
    # the studies as columns, not ORM objects: create and close answer with this.
    if parties is not None:
        codes = {i.id: i.code for i in parties}
        return _described(transfer, codes, [], [])
    codes = {
        i: code
        for i, code in session.execute(
            select(Institution.id, Institution.code).where(
                Institution.id.in_(
                    {transfer.sender_institution_id, transfer.receiver_institution_id}
                )
            )
        )
    }
    studies = session.execute(
        select(
            Study.study_instance_uid,
            Patient.patient_id,
            Patient.patient_name,
            Patient.nhs_number,
            Study.study_date,
            Study.accession_number,
            Study.study_description,
        )
        .join(TransferStudy, TransferStudy.study_id == Study.id)
        .join(Patient, Patient.id == Study.patient_ref)
        .where(TransferStudy.transfer_id == transfer.id)
        .order_by(TransferStudy.id)
    ).all()
    return _described(transfer, codes, studies, transfer.reports)


def _described(
    transfer: Transfer, codes: dict[int, str], studies: Sequence[Any], reports: Sequence[Report]
) -> dict[str, Any]:
    return {
        "id": transfer.id,
        "sender": codes.get(transfer.sender_institution_id),
        "receiver": codes.get(transfer.receiver_institution_id),
        "priority": transfer.priority,
        "reason": transfer.reason,
        "status": transfer.status,
        "origin": transfer.origin,
        "calling_ae_title": transfer.calling_ae_title,
        "created_by": transfer.created_by,
        "instances_total": transfer.instances_total,
        "instances_delivered": transfer.instances_delivered,
        "instances_failed": transfer.instances_failed,
        # Completeness: what the sender declared, what the receiver confirmed holding.
        "instances_declared": transfer.instances_declared,
        "declared_by": transfer.declared_by,
        "instances_confirmed": transfer.instances_delivered,
        "interrupted": transfer.interrupted,
        "bytes_total": transfer.bytes_total,
        "bytes_delivered": transfer.bytes_delivered,
        "failure_reason": transfer.failure_reason,
        "created_at": transfer.created_at,
        "received_at": transfer.received_at,
        "delivery_started_at": transfer.delivery_started_at,
        "finished_at": transfer.finished_at,
        "studies": [
            {
                "study_instance_uid": s.study_instance_uid,
                "patient_id": s.patient_id,
                "patient_name": s.patient_name,
                "nhs_number": s.nhs_number,
                "study_date": s.study_date,
                "accession_number": s.accession_number,
                "study_description": s.study_description,
            }
            for s in studies
        ],
        "reports": [
            {
                "id": r.id,
                "media_type": r.media_type,
                "title": r.title,
                "study_instance_uid": r.study_instance_uid,
                "status": r.status,
                "detail": r.detail,
                "delivered_sop_instance_uid": r.delivered_sop_instance_uid,
            }
            for r in reports
        ],
    }

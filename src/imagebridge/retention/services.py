"""The retention policy: delivered images' bytes go after their period; index rows, reports'
records and the audit trail stay.

A transfer becomes eligible ``routine_days`` (urgent: ``urgent_days``) after it was
delivered; failed and open transfers never are. A blob of an eligible transfer is removed
only if nothing else needs it:

- a transfer not yet eligible carries it (its own sweep decides later);
- the index holds it outside any transfer (stored by STOW-RS, say): not the exchange's;
- its study is under a legal hold, or in a share in force.

Removal is in two steps. The sweep first records the blob as set aside and moves it out of
reach: from then on an upload of the same bytes stores them again instead of referring to
the old copy. After ``grace_seconds`` the sweep looks again: if something came to need the
blob meanwhile (an upload that referred to it just before it moved, a hold placed since) it
is put back; otherwise it is removed for good. Every step is recorded before or after it is
taken so that a repeat, after a crash, does it again harmlessly.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, or_, select, union, update
from sqlalchemy.orm import Session

from imagebridge.actors import Actor, manages
from imagebridge.audit.services import record
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.index.visibility import Scope
from imagebridge.institutions.models import Institution
from imagebridge.jobs.context import JobContext
from imagebridge.retention.models import (
    BlobRemoval,
    Examined,
    LegalHold,
    RemovalState,
    RetentionMark,
)
from imagebridge.settings import RetentionPolicy
from imagebridge.shares.models import Share, ShareStudy
from imagebridge.transfers.models import (
    Report,
    Transfer,
    TransferInstance,
    TransferStatus,
    TransferStudy,
)

# Digests per IN list: well below every database's limit on bound parameters.
CHUNK = 500
# Batches one sweep takes on at most, so that one run ends even on a large backlog.
MAX_BATCHES = 1000


class HoldError(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def eligible(policy: RetentionPolicy, now: datetime) -> ColumnElement[bool]:
    """A condition on Transfer: delivered, and longer ago than its priority's period."""
    urgent = Transfer.priority == "urgent"
    return and_(
        Transfer.status == TransferStatus.delivered,
        Transfer.finished_at.is_not(None),
        or_(
            and_(urgent, Transfer.finished_at <= now - timedelta(days=policy.urgent_days)),
            and_(~urgent, Transfer.finished_at <= now - timedelta(days=policy.routine_days)),
        ),
    )


@dataclass(frozen=True)
class Guards:
    """Studies (by StudyInstanceUID) whose images must stay: held, or shared until when."""

    held: frozenset[str]
    shared: dict[str, datetime]

    @property
    def uids(self) -> set[str]:
        return set(self.held) | set(self.shared)


def guards(session: Session, now: datetime) -> Guards:
    held = session.scalars(
        select(LegalHold.study_instance_uid).where(LegalHold.released_at.is_(None))
    )
    shared: dict[str, datetime] = {}
    for uid, expires in session.execute(
        select(Study.study_instance_uid, Share.expires_at)
        .join(ShareStudy, ShareStudy.study_id == Study.id)
        .join(Share, Share.id == ShareStudy.share_id)
        .where(Share.revoked_at.is_(None), Share.expires_at > now)
    ):
        shared[uid] = max(expires, shared.get(uid, expires))
    return Guards(frozenset(held), shared)


def _chunks(values: Iterable[str]) -> Iterator[list[str]]:
    values = sorted(set(values))
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def why_kept(
    session: Session, blobs: Iterable[str], policy: RetentionPolicy, now: datetime, g: Guards
) -> dict[str, str]:
    """The blobs among these that must stay, each with the reason: ``hold``, ``share``,
    ``transfer`` (a transfer not yet eligible carries it) or ``index``."""
    reasons: dict[str, str] = {}
    pending = ~eligible(policy, now)
    carried = exists().where(TransferInstance.instance_id == Instance.id)
    for chunk in _chunks(blobs):
        for sha in session.scalars(
            union(
                select(TransferInstance.blob_sha256)
                .join(Transfer, Transfer.id == TransferInstance.transfer_id)
                .where(TransferInstance.blob_sha256.in_(chunk), pending),
                select(Report.blob_sha256)
                .join(Transfer, Transfer.id == Report.transfer_id)
                .where(Report.blob_sha256.in_(chunk), pending),
            )
        ):
            reasons[sha] = "transfer"
        for sha in session.scalars(
            select(Instance.blob_sha256).where(Instance.blob_sha256.in_(chunk), ~carried)
        ):
            reasons.setdefault(sha, "index")
        if not g.uids:
            continue
        for sha, uid in session.execute(_studies_of(chunk)):
            if uid in g.held:
                reasons[sha] = "hold"
            elif uid in g.shared and reasons.get(sha) != "hold":
                reasons[sha] = "share"
    return reasons


def _studies_of(chunk: list[str]) -> Any:
    """(blob, StudyInstanceUID) for every study these blobs are images or reports of."""
    return union(
        select(Instance.blob_sha256, Study.study_instance_uid)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Instance.blob_sha256.in_(chunk)),
        select(TransferInstance.blob_sha256, Study.study_instance_uid)
        .join(Instance, Instance.id == TransferInstance.instance_id)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(TransferInstance.blob_sha256.in_(chunk)),
        select(Report.blob_sha256, Report.study_instance_uid).where(Report.blob_sha256.in_(chunk)),
    )


def due_transfers(session: Session, policy: RetentionPolicy, now: datetime) -> list[str]:
    """Eligible transfers not yet examined, or kept and due for another look; oldest first."""
    mark = RetentionMark
    return list(
        session.scalars(
            select(Transfer.id)
            .outerjoin(mark, mark.transfer_id == Transfer.id)
            .where(
                eligible(policy, now),
                or_(
                    mark.transfer_id.is_(None),
                    and_(mark.state == Examined.kept, mark.recheck_after <= now),
                ),
            )
            .order_by(Transfer.finished_at, Transfer.id)
            .limit(policy.batch)
        )
    )


@dataclass
class Examination:
    removed: list[str] = field(default_factory=list)
    kept: Counter[str] = field(default_factory=Counter)


def examine(
    session: Session, transfer_id: str, policy: RetentionPolicy, now: datetime
) -> Examination | None:
    """Record the transfer's removable blobs as set aside, audited per study; None if the
    transfer is not (or no longer) due. The caller moves the blobs once this commits."""
    transfer = session.get(Transfer, transfer_id, with_for_update=True)
    if transfer is None or not session.scalar(
        select(exists().where(Transfer.id == transfer_id, eligible(policy, now)))
    ):
        return None
    mark = session.get(RetentionMark, transfer_id)
    if mark is not None and (
        mark.state == Examined.done or mark.recheck_after is None or mark.recheck_after > now
    ):
        return None
    images = session.execute(
        select(
            TransferInstance.blob_sha256,
            TransferInstance.size,
            Study.study_instance_uid,
            Patient.patient_id,
        )
        .join(Instance, Instance.id == TransferInstance.instance_id)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .join(Patient, Patient.id == Study.patient_ref)
        .where(TransferInstance.transfer_id == transfer_id)
    ).all()
    reports = session.execute(
        select(Report.blob_sha256, Report.size, Report.study_instance_uid).where(
            Report.transfer_id == transfer_id
        )
    ).all()
    candidates = {row[0] for row in images} | {row[0] for row in reports}
    candidates -= set(
        session.scalars(
            select(BlobRemoval.sha256).where(
                BlobRemoval.state == RemovalState.aside, BlobRemoval.sha256.in_(candidates)
            )
        )
    )
    g = guards(session, now)
    kept = why_kept(session, candidates, policy, now, g)
    out = Examination(sorted(candidates - set(kept)), Counter(kept.values()))
    removed = set(out.removed)
    for sha in out.removed:
        session.add(
            BlobRemoval(
                sha256=sha, transfer_id=transfer_id, state=RemovalState.aside, set_aside_at=now
            )
        )
    _audit_removal(session, transfer, images, reports, removed)
    lapsing = [g.shared[uid] for sha, uid in _guarded(images, reports, kept) if uid in g.shared]
    if mark is None:
        mark = RetentionMark(transfer_id=transfer_id)
        session.add(mark)
    mark.examined_at = now
    mark.state = Examined.kept if {"hold", "share"} & set(kept.values()) else Examined.done
    # Looked at again when the last share keeping it ends; a hold's release says when.
    mark.recheck_after = None if "hold" in kept.values() else max(lapsing, default=None)
    return out


def _guarded(
    images: Iterable[Any], reports: Iterable[Any], kept: dict[str, str]
) -> Iterator[tuple[str, str]]:
    for row in [*images, *reports]:
        if kept.get(row[0]) in ("hold", "share"):
            yield row[0], row[2]


def _audit_removal(
    session: Session,
    transfer: Transfer,
    images: Iterable[Any],
    reports: Iterable[Any],
    removed: set[str],
) -> None:
    """One event per study whose images or reports went, like those of their arrival."""
    per_study: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"instances": 0, "reports": 0, "bytes": 0, "kept": 0, "patient": ""}
    )
    for sha, size, uid, patient_id in images:
        counts = per_study[uid]
        counts["patient"] = patient_id
        counts["instances" if sha in removed else "kept"] += 1
        counts["bytes"] += size if sha in removed else 0
    for sha, size, uid in reports:
        counts = per_study[uid]
        counts["reports" if sha in removed else "kept"] += 1
        counts["bytes"] += size if sha in removed else 0
    for uid, counts in sorted(per_study.items()):
        patient = counts.pop("patient")
        if not counts["instances"] and not counts["reports"]:
            continue  # examined, nothing removed: nothing happened to record
        record(
            session,
            "retention:instances:removed",
            institution_id=transfer.sender_institution_id,
            patient_ref=patient,
            study_ref=uid,
            transfer_ref=transfer.id,
            detail=counts,
            actor_type="system",
            actor="retention",
        )


@dataclass
class SweepReport:
    transfers: int = 0
    set_aside: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    removed: int = 0
    restored: int = 0


def sweep(context: JobContext, now: datetime) -> SweepReport:
    """Examine the transfers that are due, then settle the blobs whose grace has passed."""
    policy = context.settings.retention
    report = SweepReport()
    for _ in range(MAX_BATCHES):
        with context.sessions() as session:
            due = due_transfers(session, policy, now)
        if not due:
            break
        for transfer_id in due:
            with context.sessions() as session, session.begin():
                found = examine(session, transfer_id, policy, now)
            if found is None:
                continue
            report.transfers += 1
            report.kept += found.kept
            for sha in found.removed:  # recorded first: a crash here leaves it to settle
                context.blobs.set_aside(sha)
            report.set_aside += len(found.removed)
    report.removed, report.restored = settle(context, now)
    return report


def settle(context: JobContext, now: datetime) -> tuple[int, int]:
    """Blobs set aside longer than the grace period: put back if needed again, else removed
    for good; (removed, restored)."""
    policy = context.settings.retention
    removed = restored = 0
    before = now - timedelta(seconds=policy.grace_seconds)
    last = 0
    while True:
        with context.sessions() as session:
            rows = session.execute(
                select(BlobRemoval.id, BlobRemoval.sha256, BlobRemoval.transfer_id)
                .where(
                    BlobRemoval.state == RemovalState.aside,
                    BlobRemoval.set_aside_at <= before,
                    BlobRemoval.id > last,
                )
                .order_by(BlobRemoval.id)
                .limit(CHUNK)
            ).all()
            if not rows:
                return removed, restored
            kept = why_kept(session, {r.sha256 for r in rows}, policy, now, guards(session, now))
        for row in rows:
            last = row.id
            if row.sha256 in kept:
                context.blobs.put_back(row.sha256)
                _settled(context, row.id, RemovalState.restored, now, kept[row.sha256], row)
                restored += 1
            elif context.blobs.exists(row.sha256):
                # Stored again (or never moved: a crash): out of reach again, and wait anew.
                with context.sessions() as session, session.begin():
                    session.execute(
                        update(BlobRemoval).where(BlobRemoval.id == row.id).values(set_aside_at=now)
                    )
                context.blobs.set_aside(row.sha256)
            else:
                context.blobs.discard(row.sha256)
                _settled(context, row.id, RemovalState.removed, now, "", row)
                removed += 1


def _settled(
    context: JobContext, removal_id: int, state: RemovalState, now: datetime, why: str, row: Any
) -> None:
    with context.sessions() as session, session.begin():
        session.execute(
            update(BlobRemoval)
            .where(BlobRemoval.id == removal_id)
            .values(state=state, settled_at=now)
        )
        if state == RemovalState.restored:
            record(
                session,
                "retention:blob:restored",
                transfer_ref=row.transfer_id,
                detail={"sha256": row.sha256, "reason": why},
                actor_type="system",
                actor="retention",
            )


# -- legal holds ---------------------------------------------------------------------------


def place_hold(
    session: Session,
    actor: Actor,
    institution: Institution,
    study_instance_uid: str,
    reason: str,
    now: datetime,
) -> LegalHold:
    """Hold a study the institution sent or received; audited."""
    if not manages(actor, institution.id):
        raise HoldError(
            403, "only the institution's or the network's administrators hold its studies"
        )
    scope = Scope(frozenset({institution.id}), institution.id)
    known = session.scalar(
        select(exists().where(Study.study_instance_uid == study_instance_uid, scope.where()))
    )
    if not known:
        raise HoldError(404, f"the hub holds no study with that UID for {institution.code}")
    active = session.scalar(
        select(LegalHold).where(
            LegalHold.study_instance_uid == study_instance_uid,
            LegalHold.institution_id == institution.id,
            LegalHold.released_at.is_(None),
        )
    )
    if active is not None:
        raise HoldError(
            409, f"the study is already on hold for {institution.code} (hold {active.id})"
        )
    hold = LegalHold(
        study_instance_uid=study_instance_uid,
        institution_id=institution.id,
        reason=reason,
        placed_by=f"{actor.kind}:{actor.name}"[:100],
        placed_at=now,
    )
    session.add(hold)
    session.flush()
    record(
        session,
        "retention:hold:placed",
        institution_id=institution.id,
        study_ref=study_instance_uid,
        detail={"hold": hold.id, "reason": reason[:500]},
        **actor.audit(),
    )
    return hold


def release_hold(
    session: Session, actor: Actor, hold_id: int, reason: str, now: datetime
) -> LegalHold:
    """Lift a hold; the transfers it kept are looked at again by the next sweep. Audited."""
    hold = session.get(LegalHold, hold_id, with_for_update=True)
    if hold is None or not manages(actor, hold.institution_id):
        raise HoldError(404, "no such legal hold")
    if hold.released_at is not None:
        raise HoldError(409, "the hold was released already")
    hold.released_at = now
    hold.released_by = f"{actor.kind}:{actor.name}"[:100]
    hold.release_reason = reason
    carrying = (
        select(TransferStudy.transfer_id)
        .join(Study, Study.id == TransferStudy.study_id)
        .where(Study.study_instance_uid == hold.study_instance_uid)
    )
    session.execute(
        update(RetentionMark)
        .where(RetentionMark.state == Examined.kept, RetentionMark.transfer_id.in_(carrying))
        .values(recheck_after=now)
    )
    record(
        session,
        "retention:hold:released",
        institution_id=hold.institution_id,
        study_ref=hold.study_instance_uid,
        detail={"hold": hold.id, "reason": reason[:500]},
        **actor.audit(),
    )
    return hold


def holds_of(session: Session, actor: Actor, status: str) -> list[LegalHold]:
    """The holds the caller administers: ``active``, ``released`` or ``all``."""
    query = select(LegalHold).order_by(LegalHold.id)
    if not actor.network_wide:
        query = query.where(LegalHold.institution_id == actor.institution_id)
    if status == "active":
        query = query.where(LegalHold.released_at.is_(None))
    elif status == "released":
        query = query.where(LegalHold.released_at.is_not(None))
    return list(session.scalars(query))

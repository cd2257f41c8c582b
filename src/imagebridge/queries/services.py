"""Query/retrieve across the network: what an institution may see, the gateways' tasks, and
the merge of the hub's index with what the institutions' PACS answer.

A gateway's institution sees its own studies, those transferred to it, and the studies of
institutions that let it discover them, while both have an agreement in force. The same rule
picks the institutions whose PACS a query is forwarded to.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.agreements.models import Agreement
from imagebridge.agreements.services import in_force
from imagebridge.audit.services import record
from imagebridge.db import utcnow
from imagebridge.index.models import Instance, Series, Study
from imagebridge.index.query import (
    COUNTS,
    KEYS,
    LEVELS,
    MAX_LIMIT,
    MODALITIES_IN_STUDY,
    QueryError,
    check,
    find,
)
from imagebridge.index.visibility import Scope, discovery_sources
from imagebridge.institutions.models import Gateway, Institution
from imagebridge.queries.models import FINISHED, GatewayTask, TaskKind, TaskStatus

# A fetch a gateway took but never answered (it stopped) is handed out again after this.
FETCH_LEASE_SECONDS = 600.0
FETCH_ATTEMPTS = 3
# A gateway polls the hub without pause; one silent for longer is off, not slow.
GATEWAY_RECENT_SECONDS = 120.0
# A fetch nobody could run within this time is dropped.
FETCH_EXPIRY_SECONDS = 24 * 3600.0
# The key that makes two answers the same entity, per level.
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Audit events name at most this many studies.
AUDITED_STUDIES = 100
_RETURNED = frozenset(KEYS) | {MODALITIES_IN_STUDY} | {k for ks in COUNTS.values() for k in ks}
# The hub's references a match shows outside the hub.
_SHOWN_REFERENCES = frozenset({"_institution", "_nhs_number"})


def local_patient(keys: dict[str, str], nhs_issuer: str) -> bool:
    """A PatientID not qualified as an NHS number is the asking institution's own identifier:
    the same value elsewhere names another patient, so it matches only at home."""
    pid = keys.get("PatientID", "").strip()
    return pid not in ("", "*") and keys.get("IssuerOfPatientID", "").strip() != nhs_issuer


def network_scope(
    session: Session, institution_id: int, keys: dict[str, str], nhs_issuer: str = "NHS"
) -> tuple[Scope, list[Institution]]:
    """What this institution may see for a query: its scope in the hub's index, and the
    institutions whose PACS may be asked (with a gateway to ask)."""
    home: tuple[Scope, list[Institution]] = (Scope(frozenset({institution_id}), None), [])
    if local_patient(keys, nhs_issuer):
        return home
    # One round to the database for what every query needs: of this institution and those
    # that let it discover them, which have an agreement in force, and which have a gateway
    # heard from lately (asking one that is off would make every query wait).
    recent = utcnow() - timedelta(seconds=GATEWAY_RECENT_SECONDS)
    answering = exists().where(
        Gateway.institution_id == Agreement.institution_id,
        Gateway.revoked_at.is_(None),
        Gateway.last_seen_at > recent,
    )
    rows = session.execute(
        select(Agreement.institution_id, answering)
        .where(
            in_force(),
            or_(
                Agreement.institution_id == institution_id,
                Agreement.institution_id.in_(discovery_sources(institution_id)),
            ),
        )
        .distinct()
    ).all()
    signed = {row[0] for row in rows}
    if institution_id not in signed:
        return home
    scope = Scope(frozenset(signed), institution_id)
    asked = {row[0] for row in rows if row[1]} - {institution_id}
    if not asked:
        return scope, []
    sources = session.scalars(
        select(Institution).where(Institution.id.in_(asked)).order_by(Institution.code)
    ).all()
    return scope, list(sources)


def matching_keys(level: str, keys: dict[str, str]) -> dict[str, str]:
    """The keys the index matches on. Optional keys it does not hold, and return keys below
    the level asked with nothing to match, are ignored, as PS3.4 C.2.2.1 allows."""
    depth = LEVELS.index(level)
    out: dict[str, str] = {}
    for keyword, value in keys.items():
        value = value.strip()
        key = KEYS.get(keyword)
        if key is None and keyword != MODALITIES_IN_STUDY:
            continue
        below = key is not None and LEVELS.index(key.level) > depth
        if below and value in ("", "*"):
            continue
        out[keyword] = value
    return out


def validate(level: str, keys: dict[str, str]) -> dict[str, str]:
    """The matching keys, or QueryError with the reason the standard would give."""
    matching = matching_keys(level, keys)
    check(level, matching)
    return matching


def hub_matches(
    session: Session,
    level: str,
    keys: dict[str, str],
    scope: Scope,
    limit: int,
    fields: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The index's matches; with ``fields``, only those keywords of each (and the hub's
    own references): a gateway asks for what its caller asked, not all the hub holds."""
    # As a match leaves the hub: DICOM keywords, the institution and the NHS number.
    keep = (_RETURNED if fields is None else _RETURNED & set(fields)) | _SHOWN_REFERENCES
    matches = find(session, level, keys, scope, limit=limit, fields=keep)
    for match in matches:
        match["_nhs_number"] = match["_nhs_number"] or ""
        match["_source"] = "hub"
    return matches


def pacs_matches(
    matches: list[dict[str, Any]], code: str, fields: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """A gateway's answer, cleaned: only DICOM keywords with text values (those of
    ``fields``, when given), and its origin."""
    out = []
    for match in matches:
        clean: dict[str, Any] = {}
        for keyword, value in match.items():
            if not keyword.isalnum() or not keyword[:1].isupper():
                continue
            if fields is not None and keyword not in fields:
                continue
            if isinstance(value, list):
                clean[keyword] = [str(v)[:1024] for v in value[:64]]
            elif isinstance(value, str | int):
                clean[keyword] = str(value)[:1024]
        clean["_institution"] = code
        nhs = match.get("_nhs_number")
        clean["_nhs_number"] = nhs if isinstance(nhs, str) and nhs.isdigit() else ""
        clean["_source"] = "pacs"
        out.append(clean)
    return out


def merge(level: str, *answers: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """One answer per entity: a study both in the hub and in a PACS is the hub's answer."""
    unique = UNIQUE_KEYS[level]
    seen: set[tuple[str, ...]] = set()
    out: list[dict[str, Any]] = []
    for matches in answers:
        for match in matches:
            ident: tuple[str, ...] = (str(match.get(unique, "")),)
            if level == "PATIENT":  # the same patient ID elsewhere is another patient
                ident = (str(match.get("_institution", "")), ident[0])
            if not ident[-1] or ident in seen:
                continue
            seen.add(ident)
            out.append(match)
            if len(out) >= limit:
                return out
    return out


def retrieve_keys(level: str, keys: dict[str, str]) -> dict[str, str]:
    """The unique keys of a C-MOVE or C-GET (PS3.4 C.4.2.1.4.1): the level's own is required.
    Below the patient level the UIDs say everything: a PatientID given beside them is the
    caller's local one, and must not narrow the search to the caller's own studies."""
    if level not in UNIQUE_KEYS:
        raise QueryError(f"unsupported retrieve level: {level}")
    if level == "PATIENT":
        names: tuple[str, ...] = ("PatientID", "IssuerOfPatientID")
    else:
        names = tuple(UNIQUE_KEYS[n] for n in LEVELS[1 : LEVELS.index(level) + 1])
    chosen = {k: keys[k].strip() for k in names if keys.get(k, "").strip()}
    if not chosen.get(UNIQUE_KEYS[level]):
        raise QueryError(f"a {level} retrieve needs {UNIQUE_KEYS[level]}")
    if any(c in chosen.get("PatientID", "") for c in "*?"):
        raise QueryError("the PatientID of a retrieve is a single value")
    return chosen


def held_instances(
    session: Session, level: str, keys: dict[str, str], scope: Scope
) -> list[dict[str, Any]]:
    """Every instance the hub holds for a retrieve, within the scope; each SOP instance once
    (a study held for two institutions is one study)."""
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = find(session, "IMAGE", keys, scope, limit=MAX_LIMIT, offset=offset)
        for m in page:
            out.setdefault(
                m["SOPInstanceUID"],
                {
                    "sha256": m["_blob_sha256"],
                    "size": m["_size"],
                    "sop_class_uid": m["SOPClassUID"],
                    "sop_instance_uid": m["SOPInstanceUID"],
                    "transfer_syntax_uid": m["_transfer_syntax_uid"],
                    "study_instance_uid": m["StudyInstanceUID"],
                    "patient_id": m["PatientID"],
                    "institution": m["_institution"],
                },
            )
        if len(page) < MAX_LIMIT:
            return list(out.values())
        offset += MAX_LIMIT


def blobs_in_scope(session: Session, scope: Scope, digests: list[str]) -> set[str]:
    return set(
        session.scalars(
            select(Instance.blob_sha256)
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(scope.where(), Instance.blob_sha256.in_(digests))
        )
    )


# -- tasks --------------------------------------------------------------------------------


def create_task(
    session: Session,
    *,
    institution_id: int,
    kind: TaskKind,
    request: dict[str, Any],
    requester_institution_id: int,
    requested_by: str,
    expires_at: datetime,
) -> GatewayTask:
    task = GatewayTask(
        institution_id=institution_id,
        kind=kind,
        status=TaskStatus.pending,
        request=request,
        result={},
        requester_institution_id=requester_institution_id,
        requested_by=requested_by[:100],
        expires_at=expires_at,
    )
    session.add(task)
    session.flush()
    return task


def lease_task(
    session: Session, institution_id: int, kind: TaskKind, now: datetime
) -> GatewayTask | None:
    """The oldest task of this kind waiting for this institution's gateway, leased to it."""
    candidates = session.scalars(
        select(GatewayTask)
        .where(
            GatewayTask.institution_id == institution_id,
            GatewayTask.kind == kind,
            or_(
                GatewayTask.status == TaskStatus.pending,
                (GatewayTask.status == TaskStatus.running) & (GatewayTask.lease_until < now),
            ),
        )
        .order_by(GatewayTask.created_at)
        .limit(20)
        .with_for_update(skip_locked=True)
    ).all()
    for task in candidates:
        if task.expires_at <= now or task.attempts >= FETCH_ATTEMPTS:
            finish_task(task, TaskStatus.expired, now, error="not run in time")
            continue
        task.status = TaskStatus.running
        task.attempts += 1
        # A query's answer is wanted until it expires; a fetch may take long, and a
        # gateway that stopped halfway hands it on after the lease.
        lease = timedelta(seconds=FETCH_LEASE_SECONDS)
        task.lease_until = task.expires_at if task.kind == TaskKind.FIND else now + lease
        return task
    return None


def finish_task(
    task: GatewayTask,
    status: TaskStatus,
    now: datetime,
    *,
    result: dict[str, Any] | None = None,
    error: str = "",
    transfer_id: str = "",
) -> None:
    task.status = status
    task.result = result or {}
    task.error = error[:500]
    task.transfer_id = transfer_id
    task.lease_until = None
    task.finished_at = now


def task_out(session: Session, task: GatewayTask) -> dict[str, Any]:
    """A task as its gateway receives it: the requester is the institution itself when its
    own users ask, in the PACS's own terms."""
    codes = dict(
        session.execute(
            select(Institution.id, Institution.code).where(
                Institution.id.in_({task.institution_id, task.requester_institution_id})
            )
        ).all()
    )
    return {
        "id": task.id,
        "kind": task.kind,
        "institution": codes[task.institution_id],
        "requester": codes[task.requester_institution_id],
        "request": task.request,
    }


def finished(session: Session, ids: list[str]) -> bool:
    if not ids:
        return True
    open_tasks = session.scalar(
        select(GatewayTask.id).where(GatewayTask.id.in_(ids), GatewayTask.status.not_in(FINISHED))
    )
    return open_tasks is None


def collect(
    session: Session, ids: list[str], now: datetime, fields: Collection[str] | None = None
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """The matches of each answered find task by institution code (with only the keywords
    of ``fields``, when given), and the institutions that did not answer in time (their
    tasks expire: a late answer is refused)."""
    answered: dict[str, list[dict[str, Any]]] = {}
    unanswered: list[str] = []
    if not ids:
        return answered, unanswered
    rows = session.execute(
        select(GatewayTask, Institution.code)
        .join(Institution, Institution.id == GatewayTask.institution_id)
        .where(GatewayTask.id.in_(ids))
        .order_by(Institution.code)
    ).all()
    for task, code in rows:
        if task.status == TaskStatus.done:
            answered[code] = pacs_matches(task.result.get("matches", []), code, fields)
        else:
            if task.status not in FINISHED:
                finish_task(task, TaskStatus.expired, now, error="no answer in time")
            unanswered.append(code)
    return answered, unanswered


def audit_query(
    session: Session,
    actor: Actor,
    action: str,
    *,
    level: str,
    keys: dict[str, str],
    matches: list[dict[str, Any]],
    outcome: str = "success",
    **detail: Any,
) -> None:
    """A query with what it returned: counts and the studies named."""
    studies = sorted({str(m.get("StudyInstanceUID", "")) for m in matches} - {""})
    record(
        session,
        action,
        outcome,
        institution_id=actor.institution_id,
        patient_ref=keys.get("PatientID", ""),
        study_ref=studies[0] if len(studies) == 1 else "",
        detail={
            "level": level,
            "query": keys,
            "matches": len(matches),
            "studies": studies[:AUDITED_STUDIES],
            **detail,
        },
        **actor.audit(),
    )

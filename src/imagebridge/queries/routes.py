"""HTTP API of query/retrieve: the gateways' network queries and retrieves, their tasks, and
the institution users' requests to their own PACS."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from imagebridge.accounts.permissions import Permission
from imagebridge.actors import Actor
from imagebridge.agreements.services import exchange_refusal
from imagebridge.audit.services import record
from imagebridge.hub.auth import GatewayActor, Sender, get_hub, require
from imagebridge.hub.gateway_api import Digests, audit_lookups, framed_blobs
from imagebridge.hub.inbox import TASKS
from imagebridge.hub.state import Hub
from imagebridge.index.query import MAX_LIMIT, QueryError
from imagebridge.institutions.models import Gateway, Institution
from imagebridge.institutions.services import get_institution
from imagebridge.nhs import is_valid_nhs_number
from imagebridge.patients import services as patient_index
from imagebridge.queries import services
from imagebridge.queries.models import FINISHED, GatewayTask, TaskKind, TaskStatus
from imagebridge.transfers.models import Transfer, TransferStatus

router = APIRouter(prefix="/api/v1", tags=["query/retrieve"])
HubDep = Annotated[Hub, Depends(get_hub)]
Viewer = Annotated[Actor, Depends(require(Permission.SEND_STUDIES, Permission.VIEW_STUDIES))]
Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
NOT_YOURS = "no such task, or not one of your institution"
T = TypeVar("T")
NHS = "NHS"


class QueryIn(BaseModel):
    level: Level
    keys: dict[str, str] = Field(default_factory=dict, max_length=100)
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    sop_class_uid: str = Field("", max_length=64, description="The C-FIND's information model")
    calling_ae_title: str = Field("", max_length=16, description="Who asked the gateway")
    fields: list[str] | None = Field(
        None,
        max_length=1000,
        description="The DICOM keywords each match returns (default: every one the hub holds)",
    )


class RetrieveIn(BaseModel):
    level: Level
    keys: dict[str, str] = Field(default_factory=dict, max_length=100)
    priority: Literal["urgent", "routine"] = "routine"
    calling_ae_title: str = Field("", max_length=16)
    destination: str = Field("", max_length=16, description="Move destination, if a C-MOVE")


class TaskResultIn(BaseModel):
    status: Literal["done", "failed"]
    matches: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_LIMIT)
    error: str = Field("", max_length=500)
    transfer_id: str = Field("", max_length=32)
    instances: int = Field(0, ge=0)


class PacsFindIn(BaseModel):
    level: Level
    keys: dict[str, str] = Field(default_factory=dict, max_length=100)
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    institution: str | None = Field(None, description="Whose PACS (network administrators)")


class PacsFetchIn(BaseModel):
    study_instance_uids: list[str] = Field(min_length=1, max_length=100)
    receiver: str = Field(description="Receiving institution's code")
    priority: Literal["urgent", "routine"] = "routine"
    reason: str = Field("", max_length=2000)
    institution: str | None = Field(None, description="Whose PACS (network administrators)")


def _bad_query(exc: QueryError) -> HTTPException:
    return HTTPException(400, str(exc))


async def _poll(
    hub: Hub, institution_id: int, seconds: float, check: Callable[[], T | None]
) -> T | None:
    """``check`` until it answers or the time is up. A nudge for the institution wakes the
    wait early; the database is rechecked meanwhile, for what other hub processes wrote."""
    deadline = time.monotonic() + seconds
    while True:
        event = hub.notifier.event(institution_id, TASKS)
        found = await run_in_threadpool(check)
        remaining = deadline - time.monotonic()
        if found is not None or remaining <= 0:
            return found
        with contextlib.suppress(TimeoutError):
            recheck = hub.notifier.recheck_seconds(TASKS)
            await asyncio.wait_for(event.wait(), timeout=min(remaining, recheck))


async def _await_tasks(hub: Hub, waiter: int, ids: list[str], seconds: float) -> None:
    """Until every task is finished or the time is up; answers nudge the waiting institution."""
    if not ids:
        return  # nothing asked of any gateway: no round to the database to find that out
    await _poll(hub, waiter, seconds, lambda: True if _finished(hub, ids) else None)


def _finished(hub: Hub, ids: list[str]) -> bool:
    with hub.sessions() as session:
        return services.finished(session, ids)


def _ask(
    session: Session,
    hub: Hub,
    institutions: list[Institution],
    request: dict[str, Any],
    actor: Actor,
    *,
    kind: TaskKind = TaskKind.FIND,
    requester: int | None = None,
    seconds: float | None = None,
) -> list[str]:
    """A task for each institution's gateway; by default a query for the actor's
    institution, wanted for as long as a network query waits."""
    now = hub.clock()
    expires = now + timedelta(seconds=seconds or hub.settings.query_wait_seconds)
    ids = []
    for institution in institutions:
        task = services.create_task(
            session,
            institution_id=institution.id,
            kind=kind,
            request=request,
            requester_institution_id=requester or actor.institution_id or institution.id,
            requested_by=f"{actor.kind}:{actor.name}",
            expires_at=expires,
        )
        ids.append(task.id)
    return ids


def _nudge_after_commit(hub: Hub, institution_ids: list[int]) -> None:
    for institution_id in institution_ids:
        hub.notifier.nudge(institution_id, TASKS)


# -- a gateway's network query ------------------------------------------------------------


@dataclass
class _Started:
    matching: dict[str, str]
    hub: list[dict[str, Any]]
    tasks: list[str] = field(default_factory=list)
    # With no PACS to ask, the answer, given in the same transaction as the search.
    answer: dict[str, Any] | None = None


def _start_find(hub: Hub, actor: Actor, body: QueryIn) -> _Started:
    assert actor.institution_id is not None
    refused: QueryError | None = None
    with hub.sessions() as session, session.begin():
        try:
            matching = services.validate(body.level, body.keys)
            scope, sources = services.network_scope(session, actor.institution_id, matching)
            found = services.hub_matches(
                session, body.level, matching, scope, body.limit, body.fields
            )
        except QueryError as exc:
            refused = exc
            services.audit_query(
                session,
                actor,
                "query:network:refused",
                level=body.level,
                keys=body.keys,
                matches=[],
                outcome="failure",
                reason=str(exc),
            )
        else:
            request = {"level": body.level, "keys": matching, "limit": body.limit}
            started = _Started(matching, found, _ask(session, hub, sources, request, actor))
            if not started.tasks:
                started.answer = _answer(session, actor, body, started, {}, [])
    if refused is not None:
        raise _bad_query(refused)
    _nudge_after_commit(hub, [s.id for s in sources])
    return started


def _finish_find(hub: Hub, actor: Actor, body: QueryIn, started: _Started) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        fields = None if body.fields is None else set(body.fields)
        answered, unanswered = services.collect(session, started.tasks, hub.clock(), fields)
        return _answer(session, actor, body, started, answered, unanswered)


def _answer(
    session: Session,
    actor: Actor,
    body: QueryIn,
    started: _Started,
    answered: dict[str, list[dict[str, Any]]],
    unanswered: list[str],
) -> dict[str, Any]:
    """The matches of the hub and of the PACS that answered, merged and audited."""
    from_pacs = [m for ms in answered.values() for m in ms]
    matches = services.merge(body.level, started.hub, from_pacs, limit=body.limit)
    # Looked up before the events are recorded, so that both are written in one flush.
    local_ids = _local_ids_of(session, actor, matches)
    services.audit_query(
        session,
        actor,
        "query:network:answered",
        level=body.level,
        keys=started.matching,
        matches=matches,
        sop_class_uid=body.sop_class_uid,
        calling_ae_title=body.calling_ae_title,
        from_hub=len(started.hub),
        from_pacs={code: len(m) for code, m in answered.items()},
        unanswered=unanswered,
    )
    if local_ids:
        audit_lookups(session, actor, local_ids)
    return {
        "matches": matches,
        "answered": sorted(answered),
        "unanswered": unanswered,
        "local_ids": {n: found.as_json() for n, found in local_ids.items()},
    }


def _local_ids_of(
    session: Session, actor: Actor, matches: list[dict[str, Any]]
) -> dict[str, patient_index.LocalId]:
    """The asking institution's local IDs of the other institutions' patients among the
    matches, as ``/gateway/patients/local-ids`` answers: the gateway shows each match under
    the identity delivery would give it, and would otherwise ask for them straight after."""
    assert actor.institution_id is not None
    me = session.get(Institution, actor.institution_id)
    own = me.code if me else ""
    # The hub's own numbers are valid when indexed; a PACS's answer may hold anything.
    asked = sorted(
        {
            number
            for m in matches
            if (number := str(m.get("_nhs_number") or ""))
            and m.get("_institution") != own
            and (m.get("_source") == "hub" or is_valid_nhs_number(number))
        }
    )
    if not asked:
        return {}
    return patient_index.local_ids(session, actor.institution_id, asked)


@router.post("/gateway/find")
async def gateway_find(body: QueryIn, actor: GatewayActor, hub: HubDep) -> dict[str, Any]:
    """A C-FIND for the gateway's institution: the hub's index within what it may see, and
    the PACS of the institutions that let it discover their studies, merged."""
    assert actor.institution_id is not None
    started = await run_in_threadpool(_start_find, hub, actor, body)
    if started.answer is not None:
        return started.answer
    await _await_tasks(hub, actor.institution_id, started.tasks, hub.settings.query_wait_seconds)
    return await run_in_threadpool(_finish_find, hub, actor, body, started)


# -- a gateway's retrieve -----------------------------------------------------------------


def _start_retrieve(hub: Hub, actor: Actor, body: RetrieveIn) -> dict[str, Any]:
    assert actor.institution_id is not None
    refused: QueryError | None = None
    tasks: list[str] = []
    with hub.sessions() as session, session.begin():
        try:
            keys = services.retrieve_keys(body.level, body.keys)
            scope, sources = services.network_scope(session, actor.institution_id, keys)
            instances = services.held_instances(session, body.level, keys, scope)
        except QueryError as exc:
            refused = exc
            record(
                session,
                "retrieve:study:refused",
                "failure",
                institution_id=actor.institution_id,
                detail={"level": body.level, "query": body.keys, "reason": str(exc)},
                **actor.audit(),
            )
        else:
            _audit_exported(session, actor, body, keys, instances)
            if not instances and sources:
                # Not in the hub: which discoverable PACS holds it?
                request = {"level": "STUDY", "keys": _study_keys(keys), "limit": 1}
                tasks = _ask(session, hub, sources, request, actor)
    if refused is not None:
        raise _bad_query(refused)
    _nudge_after_commit(hub, [s.id for s in sources] if tasks else [])
    return {"keys": keys, "instances": instances, "tasks": tasks}


def _audit_exported(
    session: Session,
    actor: Actor,
    body: RetrieveIn,
    keys: dict[str, str],
    instances: list[dict[str, Any]],
) -> None:
    """One event per study the retrieve sends, as ATNA's export."""
    per_study: dict[tuple[str, str, str], int] = {}
    for i in instances:
        ident = (i["institution"], i["patient_id"], i["study_instance_uid"])
        per_study[ident] = per_study.get(ident, 0) + 1
    for (code, patient, study), count in per_study.items():
        record(
            session,
            "retrieve:study:exported",
            institution_id=actor.institution_id,
            patient_ref=patient,
            study_ref=study,
            detail={
                "level": body.level,
                "query": keys,
                "instances": count,
                "held_by": code,
                "calling_ae_title": body.calling_ae_title,
                "destination": body.destination,
            },
            **actor.audit(),
        )


def _study_keys(keys: dict[str, str]) -> dict[str, str]:
    wanted = ("StudyInstanceUID", "PatientID", "IssuerOfPatientID")
    return {k: v for k, v in keys.items() if k in wanted}


def _fetch_from_source(
    hub: Hub, actor: Actor, body: RetrieveIn, keys: dict[str, str], tasks: list[str]
) -> dict[str, Any]:
    assert actor.institution_id is not None
    with hub.sessions() as session, session.begin():
        answered, _ = services.collect(session, tasks, hub.clock())
        holders = [code for code, matches in answered.items() if matches]
        me = session.get(Institution, actor.institution_id)
        assert me is not None
        if not holders:
            record(
                session,
                "retrieve:study:not_found",
                institution_id=actor.institution_id,
                detail={"level": body.level, "query": keys, "asked": sorted(answered)},
                **actor.audit(),
            )
            return {"instances": [], "fetch": None, "source": None}
        source = get_institution(session, holders[0])
        assert source is not None
        reason = f"retrieve by {me.code}" + (
            f" for {body.calling_ae_title}" if body.calling_ae_title else ""
        )
        request = {
            "level": body.level,
            "keys": keys,
            "receiver": me.code,
            "priority": body.priority,
            "reason": reason,
        }
        [task_id] = _ask(
            session,
            hub,
            [source],
            request,
            actor,
            kind=TaskKind.FETCH,
            seconds=services.FETCH_EXPIRY_SECONDS,
        )
        record(
            session,
            "retrieve:fetch:requested",
            institution_id=actor.institution_id,
            study_ref=keys.get("StudyInstanceUID", ""),
            detail={"level": body.level, "query": keys, "source": source.code, "task": task_id},
            **actor.audit(),
        )
        source_id = source.id
    hub.notifier.nudge(source_id, TASKS)
    return {"instances": [], "fetch": task_id, "source": holders[0]}


@router.post("/gateway/retrieve")
async def gateway_retrieve(body: RetrieveIn, actor: GatewayActor, hub: HubDep) -> dict[str, Any]:
    """What a C-MOVE or C-GET sends: the instances the hub holds within the institution's
    sight; or, when it holds none, a fetch from the PACS of an institution that has them
    (follow it with GET /gateway/fetches/{task_id}, then ask again)."""
    assert actor.institution_id is not None
    started = await run_in_threadpool(_start_retrieve, hub, actor, body)
    if started["instances"] or not started["tasks"]:
        return {"instances": started["instances"], "fetch": None, "source": None}
    await _await_tasks(hub, actor.institution_id, started["tasks"], hub.settings.query_wait_seconds)
    return await run_in_threadpool(
        _fetch_from_source, hub, actor, body, started["keys"], started["tasks"]
    )


def _fetch_state(hub: Hub, actor: Actor, task_id: str) -> dict[str, Any]:
    with hub.sessions() as session:
        task = session.get(GatewayTask, task_id)
        if task is None or task.requester_institution_id != actor.institution_id:
            raise HTTPException(404, NOT_YOURS)
        return _describe(session, task)


def _describe(session: Session, task: GatewayTask) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": task.id,
        "kind": task.kind,
        "status": task.status,
        "error": task.error,
        "transfer_id": task.transfer_id or None,
        "created_at": task.created_at.isoformat(),
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }
    if task.kind == TaskKind.FIND:
        out["matches"] = task.result.get("matches", [])
    else:
        out["instances"] = task.result.get("instances", 0)
        transfer = session.get(Transfer, task.transfer_id) if task.transfer_id else None
        out["transfer_status"] = transfer.status if transfer else None
    return out


@router.get("/gateway/fetches/{task_id}")
async def gateway_fetch(
    task_id: str,
    actor: GatewayActor,
    hub: HubDep,
    wait: float = Query(0.0, ge=0.0, description="Seconds to wait for the fetch to finish"),
) -> dict[str, Any]:
    """A fetch this institution asked for; waits up to `wait` seconds for it to finish."""
    assert actor.institution_id is not None
    state = await run_in_threadpool(_fetch_state, hub, actor, task_id)
    if state["status"] not in FINISHED and wait > 0:
        limit = min(wait, hub.settings.inbox_wait_seconds)
        await _await_tasks(hub, actor.institution_id, [task_id], limit)
        state = await run_in_threadpool(_fetch_state, hub, actor, task_id)
    return state


@router.post("/gateway/retrieve/blobs", response_class=StreamingResponse)
def retrieve_blobs(body: Digests, actor: GatewayActor, hub: HubDep) -> StreamingResponse:
    """Blobs of instances the gateway's institution may retrieve, as framed blobs."""
    assert actor.institution_id is not None
    wanted = list(dict.fromkeys(body.sha256))
    with hub.sessions() as session:
        scope, _ = services.network_scope(session, actor.institution_id, {})
        allowed = services.blobs_in_scope(session, scope, wanted)
    return framed_blobs(hub, wanted, allowed, "not retrievable by this institution")


# -- a gateway's tasks --------------------------------------------------------------------


def _take_task(hub: Hub, actor: Actor, kind: TaskKind) -> dict[str, Any] | None:
    assert actor.institution_id is not None
    with hub.sessions() as session, session.begin():
        task = services.lease_task(session, actor.institution_id, kind, hub.clock())
        return services.task_out(session, task) if task is not None else None


@router.get("/gateway/tasks")
async def gateway_tasks(
    actor: GatewayActor,
    hub: HubDep,
    kind: Annotated[TaskKind, Query(description="find (queries) or fetch")] = TaskKind.FIND,
    wait: float = Query(0.0, ge=0.0, description="Seconds to wait for a task (long poll)"),
) -> dict[str, Any]:
    """Lease the next task of a kind for this gateway's PACS."""
    assert actor.institution_id is not None
    seconds = min(wait, hub.settings.inbox_wait_seconds)
    task = await _poll(hub, actor.institution_id, seconds, lambda: _take_task(hub, actor, kind))
    return {"task": task}


def _check_fetch_transfer(session: Session, task: GatewayTask, transfer_id: str) -> None:
    transfer = session.get(Transfer, transfer_id)
    receiver = get_institution(session, str(task.request.get("receiver", "")))
    if (
        transfer is None
        or receiver is None
        or transfer.sender_institution_id != task.institution_id
        or transfer.receiver_institution_id != receiver.id
        or transfer.status == TransferStatus.receiving
    ):
        raise HTTPException(409, "the fetch's transfer must be closed, to the fetch's receiver")


@router.post("/gateway/tasks/{task_id}/result")
def gateway_task_result(
    task_id: str, body: TaskResultIn, actor: GatewayActor, hub: HubDep
) -> dict[str, Any]:
    """The gateway's answer to a task: the matches of a query, or the transfer of a fetch.
    An answer after the task expired is refused: nobody waits for it any more."""
    with hub.sessions() as session, session.begin():
        task = session.get(GatewayTask, task_id)
        if task is None or task.institution_id != actor.institution_id:
            raise HTTPException(404, NOT_YOURS)
        now = hub.clock()
        if task.status not in FINISHED and task.expires_at <= now:
            services.finish_task(task, TaskStatus.expired, now, error="answered too late")
        late = task.status if task.status in FINISHED else None
        if late is None:
            status = _finish(session, task, body, actor, now)
        requester = task.requester_institution_id
    if late is not None:
        raise HTTPException(409, f"the task is {late}: its answer is not wanted")
    hub.notifier.nudge(requester, TASKS)
    return {"id": task_id, "status": status}


def _finish(
    session: Session, task: GatewayTask, body: TaskResultIn, actor: Actor, now: datetime
) -> TaskStatus:
    if body.status == "done" and task.kind == TaskKind.FETCH:
        _check_fetch_transfer(session, task, body.transfer_id)
    fetch = task.kind == TaskKind.FETCH
    status = TaskStatus.done if body.status == "done" else TaskStatus.failed
    services.finish_task(
        task,
        status,
        now,
        result={"instances": body.instances} if fetch else {"matches": body.matches},
        error=body.error,
        transfer_id=body.transfer_id if fetch else "",
    )
    if fetch:
        done = status == TaskStatus.done
        record(
            session,
            f"retrieve:fetch:{'completed' if done else 'failed'}",
            "success" if done else "failure",
            institution_id=actor.institution_id,
            transfer_ref=body.transfer_id,
            study_ref=str(task.request.get("keys", {}).get("StudyInstanceUID", ""))[:64],
            detail={"task": task.id, "instances": body.instances, "error": body.error},
            **actor.audit(),
        )
    return status


# -- an institution's users and their own PACS --------------------------------------------


def _home(session: Session, actor: Actor, code: str | None) -> Institution:
    """The institution whose PACS is asked: one's own; network administrators name one."""
    if actor.network_wide:
        if code is None:
            raise HTTPException(422, "institution is required")
        institution = get_institution(session, code)
    else:
        if code is not None and code != _code_of(session, actor.institution_id):
            raise HTTPException(403, "one asks one's own institution's PACS only")
        institution = session.get(Institution, actor.institution_id)
    if institution is None:
        raise HTTPException(404, "no such institution")
    refusal = exchange_refusal(session, institution.id)
    if refusal:
        raise HTTPException(403, refusal)
    gateway = session.scalar(
        select(Gateway.id).where(
            Gateway.institution_id == institution.id, Gateway.revoked_at.is_(None)
        )
    )
    if gateway is None:
        raise HTTPException(409, f"institution {institution.code} has no gateway to ask")
    return institution


def _code_of(session: Session, institution_id: int | None) -> str:
    institution = session.get(Institution, institution_id) if institution_id else None
    return institution.code if institution else ""


def _start_pacs_find(hub: Hub, actor: Actor, body: PacsFindIn) -> tuple[int, str, dict[str, str]]:
    with hub.sessions() as session, session.begin():
        home = _home(session, actor, body.institution)
        try:
            matching = services.validate(body.level, body.keys)
        except QueryError as exc:
            raise _bad_query(exc) from exc
        request = {"level": body.level, "keys": matching, "limit": body.limit}
        [task_id] = _ask(session, hub, [home], request, actor, requester=home.id)
        home_id = home.id
    hub.notifier.nudge(home_id, TASKS)
    return home_id, task_id, matching


def _finish_pacs_find(
    hub: Hub, actor: Actor, body: PacsFindIn, home_id: int, task_id: str, keys: dict[str, str]
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        answered, unanswered = services.collect(session, [task_id], hub.clock())
        matches = [m for found in answered.values() for m in found]
        services.audit_query(
            session,
            actor,
            "query:pacs:queried",
            level=body.level,
            keys=keys,
            matches=matches,
            outcome="success" if answered else "failure",
            institution=_code_of(session, home_id),
            task=task_id,
        )
        task = session.get(GatewayTask, task_id)
        assert task is not None
        out = _describe(session, task)
    if unanswered:
        raise HTTPException(504, "the institution's gateway did not answer in time")
    if out["status"] == TaskStatus.failed:
        raise HTTPException(502, f"the gateway could not query its PACS: {out['error']}")
    out["matches"] = matches
    return out


@router.post("/pacs/find")
async def pacs_find(body: PacsFindIn, actor: Viewer, hub: HubDep) -> dict[str, Any]:
    """Query one's own institution's PACS through its gateway (C-FIND)."""
    home_id, task_id, keys = await run_in_threadpool(_start_pacs_find, hub, actor, body)
    await _await_tasks(hub, home_id, [task_id], hub.settings.query_wait_seconds)
    return await run_in_threadpool(_finish_pacs_find, hub, actor, body, home_id, task_id, keys)


def _start_pacs_fetch(hub: Hub, actor: Actor, body: PacsFetchIn) -> tuple[int, dict[str, Any]]:
    with hub.sessions() as session, session.begin():
        home = _home(session, actor, body.institution)
        receiver = get_institution(session, body.receiver)
        if receiver is None:
            raise HTTPException(404, "unknown receiver institution")
        if receiver.id == home.id:
            raise HTTPException(409, "sender and receiver are the same institution")
        refusal = exchange_refusal(session, receiver.id)
        if refusal:
            raise HTTPException(403, refusal)
        uids = list(dict.fromkeys(u.strip() for u in body.study_instance_uids))
        if any(not u or any(c in u for c in "*?\\") for u in uids):
            raise HTTPException(422, "study_instance_uids are single UIDs")
        request = {
            "level": "STUDY",
            "keys": {"StudyInstanceUID": "\\".join(uids)},
            "receiver": receiver.code,
            "priority": body.priority,
            "reason": body.reason or f"sent from the PACS by {actor.name}",
        }
        [task_id] = _ask(
            session,
            hub,
            [home],
            request,
            actor,
            kind=TaskKind.FETCH,
            requester=home.id,
            seconds=services.FETCH_EXPIRY_SECONDS,
        )
        for uid in uids:
            record(
                session,
                "retrieve:fetch:requested",
                institution_id=home.id,
                study_ref=uid,
                detail={"receiver": receiver.code, "priority": body.priority, "task": task_id},
                **actor.audit(),
            )
        task = session.get(GatewayTask, task_id)
        assert task is not None
        out = _describe(session, task)
        home_id = home.id
    return home_id, out


@router.post("/pacs/fetch", status_code=202)
def pacs_fetch(body: PacsFetchIn, actor: Sender, hub: HubDep) -> dict[str, Any]:
    """Have one's own gateway fetch studies from its PACS and send them to another
    institution as a transfer; follow it with GET /pacs/tasks/{task_id}."""
    home_id, out = _start_pacs_fetch(hub, actor, body)
    hub.notifier.nudge(home_id, TASKS)
    return out


@router.get("/pacs/tasks/{task_id}")
def pacs_task(task_id: str, actor: Viewer, hub: HubDep) -> dict[str, Any]:
    """A query or fetch asked of one's own institution's PACS."""
    with hub.sessions() as session:
        task = session.get(GatewayTask, task_id)
        # Tasks of network queries, asked by other institutions, are not the users' to see.
        own_pacs = task is not None and task.requester_institution_id == task.institution_id
        if (
            task is None
            or not own_pacs
            or not (actor.network_wide or task.institution_id == actor.institution_id)
        ):
            raise HTTPException(404, NOT_YOURS)
        return _describe(session, task)

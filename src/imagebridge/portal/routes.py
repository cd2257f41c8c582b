"""The portal's pages and the parts of pages their scripts fetch: thin, over the services.

Pages check permissions with `require_page` (a browser without a session is sent to log
in, one without the permission sees why not); what the scripts fetch checks as the API
does. Changes go through the JSON API with the session's X-CSRF-Token. Nothing that names
a patient travels in a URL: searches are POSTed, studies are named by the hub's row id.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from imagebridge.accounts import services as accounts
from imagebridge.accounts.models import User
from imagebridge.accounts.permissions import Permission
from imagebridge.actors import Actor
from imagebridge.audit import services as audit
from imagebridge.audit.services import record
from imagebridge.counts import RowId
from imagebridge.hub.auth import (
    SESSION_COOKIE,
    PageRefused,
    get_hub,
    public,
    require,
    require_page,
)
from imagebridge.hub.state import Hub
from imagebridge.index.models import Study
from imagebridge.index.query import QueryError
from imagebridge.nhs import normalise_nhs_number
from imagebridge.patients import services as patient_services
from imagebridge.portal import admin, pages, studies, transfers
from imagebridge.portal.pages import Section, fragment, render
from imagebridge.shares import services as share_services
from imagebridge.storage.blobs import read_chunks

router = APIRouter(tags=["portal"], include_in_schema=False)
HubDep = Annotated[Hub, Depends(get_hub)]
STATIC_FILES = {p.name: p for p in pages.STATIC.iterdir() if p.is_file()}
MEDIA_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


def _page(section: Section) -> Any:
    """A page's check: who may open the section."""
    return Depends(require_page(*section.permissions))


def _part(section: Section) -> Any:
    """The check of what the section's script fetches: as the API checks."""
    return Depends(require(*section.permissions))


Anyone = Annotated[Actor, Depends(require_page(*Permission))]
Sending = Annotated[Actor, _page(pages.SEND)]
SendingPart = Annotated[Actor, _part(pages.SEND)]
Tracking = Annotated[Actor, _page(pages.OUTBOX)]
TrackingPart = Annotated[Actor, _part(pages.OUTBOX)]
Finding = Annotated[Actor, _page(pages.PATIENT)]
FindingPart = Annotated[Actor, _part(pages.PATIENT)]
Viewing = Annotated[Actor, _page(pages.VIEWER)]
ViewingPart = Annotated[Actor, _part(pages.VIEWER)]
Administering = Annotated[Actor, _page(pages.INSTITUTIONS)]
Auditing = Annotated[Actor, _page(pages.AUDIT)]
Sharing = Annotated[Actor, _page(pages.SHARES)]
SeeingShared = Annotated[Actor, _page(pages.SHARED)]
AuditingPart = Annotated[Actor, _part(pages.AUDIT)]


def refusal_page(request: Request, exc: PageRefused) -> Response:
    """A page refused: to the login page without a session, else a page saying why."""
    if exc.status_code == 401:
        # Back to this page after the login: its path only, which names no patient.
        target = request.url.path if request.method == "GET" else "/portal/"
        return RedirectResponse(f"/portal/login?next={target}", 303)
    return render(
        request,
        "refused.html",
        title="Not permitted",
        actor=getattr(request.state, "actor", None),
        status=exc.status_code,
        reason=str(exc.detail),
    )


# -- public: the way in ---------------------------------------------------------------------


@router.get("/", dependencies=[Depends(public)])
def root() -> RedirectResponse:
    return RedirectResponse("/portal/", 303)


@router.get("/portal/login", dependencies=[Depends(public)])
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html", title="Log in")


@router.get("/portal/static/{name}", dependencies=[Depends(public)])
def static(name: str) -> Response:
    path = STATIC_FILES.get(name)
    if path is None:
        raise HTTPException(404, "no such file")
    media_type = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})


# -- home -----------------------------------------------------------------------------------


@router.get("/portal/")
def home(request: Request, actor: Anyone, hub: HubDep) -> HTMLResponse:
    with hub.sessions() as session:
        institution = studies.institution_name(session, actor.institution_id)
    return render(request, "home.html", title="Home", actor=actor, institution=institution)


# -- one's own account -----------------------------------------------------------------------


@router.get("/portal/account")
def account(request: Request, actor: Anyone, hub: HubDep) -> HTMLResponse:
    """Password, sessions and API tokens: a person's own, changed through the API."""
    if actor.user_id is None:
        raise PageRefused(403, "the bootstrap credential has no account page")
    with hub.sessions() as session:
        user = session.get(User, actor.user_id)
        assert user is not None
        cookie = request.cookies.get(SESSION_COOKIE, "")
        context: dict[str, Any] = {
            "user": user,
            "institution": studies.institution_name(session, actor.institution_id),
            "live": accounts.live_sessions(session, user.id, cookie),
            "tokens": accounts.api_tokens_of(session, user.id),
            "scopes": sorted(actor.permissions),
            "max_days": hub.settings.accounts.api_token_max_days,
        }
        return pages.section_page(request, "account.html", actor, pages.ACCOUNT, **context)


# -- legal access: shares granted, and what is shared with an external user ---------------------


@router.get("/portal/shares")
def shares_page(
    request: Request, actor: Sharing, hub: HubDep, study: RowId | None = None
) -> HTMLResponse:
    """The institution's shares with external users: grant one (``study``: the hub's row of
    a study to share, from the viewer or the patient's record), revoke one."""
    granted: list[dict[str, Any]] = []
    chosen = None
    with hub.sessions() as session:
        if actor.institution_id is not None:
            granted = share_services.institution_shares(session, actor.institution_id)
        row = session.get(Study, study) if study is not None else None
        if row is not None and row.id in _shareable(session, actor, [row.study_instance_uid]):
            chosen = row
    return pages.section_page(
        request,
        "shares.html",
        actor,
        pages.SHARES,
        shares=granted,
        chosen=chosen,
        max_days=share_services.MAX_SHARE_DAYS,
    )


def _shareable(session: Session, actor: Actor, uids: list[str]) -> set[int]:
    """The rows of the studies among these that the caller may share: those its institution
    holds, if it may share at all."""
    if actor.institution_id is None or not uids or not pages.allowed(actor, pages.SHARES):
        return set()
    return {s.id for s in share_services.visible_studies(session, actor.institution_id, uids)}


@router.get("/portal/shared")
def shared_page(request: Request, actor: SeeingShared, hub: HubDep) -> HTMLResponse:
    """An external user's page: what is shared with them, until when, to download."""
    with hub.sessions() as session, session.begin():
        shown = share_services.shared_with(session, actor, hub.clock())
    return pages.section_page(request, "shared.html", actor, pages.SHARED, shares=shown)


# -- send -----------------------------------------------------------------------------------


class StudySearchIn(BaseModel):
    keys: dict[str, str] = Field(default_factory=dict, max_length=20)
    limit: int = Field(50, ge=1, le=200)


@router.get("/portal/send")
def send_page(request: Request, actor: Sending, hub: HubDep) -> HTMLResponse:
    with hub.sessions() as session:
        destinations = studies.destinations(session, actor)
        pacs = studies.has_gateway(session, actor.institution_id)
    return render(
        request,
        "send.html",
        title="Send studies",
        actor=actor,
        section=pages.SEND,
        destinations=destinations,
        pacs=pacs,
    )


@router.post("/portal/send/studies")
def held_studies(body: StudySearchIn, actor: SendingPart, hub: HubDep) -> dict[str, Any]:
    """Studies the hub holds for one's institution, matched as a C-FIND would match them."""
    keys = {k: v for k, v in body.keys.items() if k in studies.SEARCH_KEYS and v.strip()}
    with hub.sessions() as session:
        try:
            found = studies.held_studies(session, actor, keys, body.limit)
        except QueryError as exc:
            raise HTTPException(400, str(exc)) from exc
    return {"matches": [studies.public_match(m) for m in found]}


# -- outbox and inbox -----------------------------------------------------------------------


class TransfersIn(BaseModel):
    box: Literal["inbox", "outbox"] = "outbox"
    since: date | None = None
    until: date | None = None
    status: str = Field("", max_length=16)
    institution: str = Field("", max_length=16)
    patient: str = Field("", max_length=64)


def _transfers_page(request: Request, actor: Actor, hub: Hub, box: str) -> HTMLResponse:
    section = pages.INBOX if box == "inbox" else pages.OUTBOX
    with hub.sessions() as session:
        others = transfers.counterparts(session)
    return pages.section_page(
        request,
        "transfers.html",
        actor,
        section,
        box=box,
        institutions=others,
        statuses=transfers.STATUSES,
    )


@router.get("/portal/outbox")
def outbox(request: Request, actor: Tracking, hub: HubDep) -> HTMLResponse:
    return _transfers_page(request, actor, hub, "outbox")


@router.get("/portal/inbox")
def inbox(request: Request, actor: Tracking, hub: HubDep) -> HTMLResponse:
    return _transfers_page(request, actor, hub, "inbox")


@router.post("/portal/transfers/rows")
def transfer_rows(body: TransfersIn, actor: TrackingPart, hub: HubDep) -> HTMLResponse:
    filters = transfers.Filters(**body.model_dump())
    with hub.sessions() as session:
        found = transfers.rows(session, actor, filters, hub.clock())
        return fragment(
            "transfer_rows.html",
            rows=found,
            box=body.box,
            can_view=pages.allowed(actor, pages.VIEWER),
            can_send=actor.can(Permission.SEND_STUDIES.value),
        )


# -- patient --------------------------------------------------------------------------------


class PatientIn(BaseModel):
    term: str = Field(min_length=1, max_length=64, description="NHS number or local ID")


@router.get("/portal/patient")
def patient_page(request: Request, actor: Finding) -> HTMLResponse:
    return pages.section_page(request, "patient.html", actor, pages.PATIENT)


@router.post("/portal/patient")
def patient_search(body: PatientIn, actor: FindingPart, hub: HubDep) -> HTMLResponse:
    with hub.sessions() as session, session.begin():
        found = studies.patient_record(session, actor, body.term)
        by = "nhs_number" if normalise_nhs_number(body.term) else "local_id"
        names = found.nhs_numbers if found and found.nhs_numbers else [body.term.strip()]
        for ref in names:
            # One event per patient named, so that a search of the trail by patient finds it.
            record(
                session,
                "portal:patient:searched",
                "success" if found else "failure",
                institution_id=actor.institution_id,
                patient_ref=ref,
                detail={"by": by, "studies": len(found.studies) if found else 0},
                **actor.audit(),
            )
        uids = [s["uid"] for s in found.studies] if found else []
        return fragment(
            "patient_record.html",
            record=found,
            can_view=pages.allowed(actor, pages.VIEWER),
            shareable=_shareable(session, actor, uids),
        )


# -- viewer and reports ---------------------------------------------------------------------


@router.get("/portal/studies/{study_id}")
def viewer(study_id: RowId, request: Request, actor: Viewing, hub: HubDep) -> HTMLResponse:
    with hub.sessions() as session, session.begin():
        study = studies.visible_study(session, actor, study_id)
        if study is None:
            raise HTTPException(404, "no such study, or not one you may see")
        summary = studies.study_summary(session, study)
        reports = studies.reports_of(session, actor, [study])[study.id]
        record(
            session,
            "portal:study:viewed",
            institution_id=actor.institution_id,
            patient_ref=summary["patient_id"],
            study_ref=study.study_instance_uid,
            detail={"reports": len(reports)},
            **actor.audit(),
        )
        shareable = study.id in _shareable(session, actor, [study.study_instance_uid])
    return pages.section_page(
        request,
        "viewer.html",
        actor,
        pages.VIEWER,
        study=summary,
        reports=reports,
        share_link=f"/portal/shares?study={study_id}" if shareable else "",
    )


@router.get("/portal/reports/{report_id}")
def report(report_id: RowId, actor: ViewingPart, hub: HubDep) -> Response:
    with hub.sessions() as session, session.begin():
        found = studies.readable_report(session, actor, report_id)
        if found is None:
            raise HTTPException(404, "no such report, or not one you may read")
        record(
            session,
            "portal:report:viewed",
            institution_id=actor.institution_id,
            study_ref=found.study_instance_uid,
            transfer_ref=found.transfer_id,
            detail={"report": found.id, "media_type": found.media_type},
            **actor.audit(),
        )
        sha, media_type = found.blob_sha256, found.media_type
    charset = "; charset=utf-8" if media_type == "text/plain" else ""
    headers = {**pages.NO_STORE, "Content-Disposition": "inline"}
    path = hub.blobs.local_path(sha)
    if path is None:  # in an object store: streamed from there
        body = read_chunks(hub.blobs, sha)
        return StreamingResponse(body, media_type=media_type + charset, headers=headers)
    return FileResponse(path, media_type=media_type + charset, headers=headers)


# -- administration -------------------------------------------------------------------------


def _admin_page(
    request: Request, actor: Actor, hub: Hub, section: Section, template: str
) -> HTMLResponse:
    with hub.sessions() as session:
        views = admin.institutions(session, actor)
        context: dict[str, Any] = {"institutions": views, "managed": admin.managed(views)}
        if section is pages.USERS:
            context.update(
                users=admin.users(session, actor),
                roles=admin.roles(session, actor),
                permissions=admin.PERMISSIONS,
            )
        return pages.section_page(request, template, actor, section, **context)


@router.get("/portal/admin/institutions")
def admin_institutions(request: Request, actor: Administering, hub: HubDep) -> HTMLResponse:
    return _admin_page(request, actor, hub, pages.INSTITUTIONS, "admin_institutions.html")


@router.get("/portal/admin/users")
def admin_users(request: Request, actor: Administering, hub: HubDep) -> HTMLResponse:
    return _admin_page(request, actor, hub, pages.USERS, "admin_users.html")


@router.get("/portal/admin/gateways")
def admin_gateways(request: Request, actor: Administering, hub: HubDep) -> HTMLResponse:
    return _admin_page(request, actor, hub, pages.GATEWAYS, "admin_gateways.html")


@router.get("/portal/admin/flags")
def identity_flags(
    request: Request,
    actor: Administering,
    hub: HubDep,
    status: Literal["open", "resolved", "all"] = "open",
) -> HTMLResponse:
    """Identifiers that disagree, for a person to look at and record what they found."""
    with hub.sessions() as session, session.begin():
        flags = patient_services.listed_flags(session, actor, status)
    return pages.section_page(
        request, "admin_flags.html", actor, pages.FLAGS, flags=flags, shown=status
    )


# -- audit trail ----------------------------------------------------------------------------


class AuditIn(BaseModel):
    action: str = Field("", max_length=100)
    user: str = Field("", max_length=64)
    institution: str = Field("", max_length=16)
    patient: str = Field("", max_length=130)
    study: str = Field("", max_length=64)
    transfer: str = Field("", max_length=64)
    outcome: str = Field("", max_length=16)
    since: date | None = None
    until: date | None = None  # inclusive: the whole day
    limit: int = Field(200, ge=1, le=5000)


def _events(hub: Hub, body: AuditIn) -> list[dict[str, Any]]:
    def day(d: date | None, extra: int = 0) -> datetime | None:
        return datetime.combine(d, time.min, tzinfo=UTC) + timedelta(days=extra) if d else None

    query = audit.search(
        action=body.action.strip() or None,
        transfer=body.transfer.strip() or None,
        outcome=body.outcome.strip() or None,
        patient=body.patient.strip() or None,
        study=body.study.strip() or None,
        actor=body.user.strip() or None,
        institution=body.institution.strip() or None,
        since=day(body.since),
        until=day(body.until, 1),
        limit=body.limit,
    )
    with hub.sessions() as session:
        codes = dict(studies.institution_codes(session))
        return [
            {**audit.as_dict(e), "institution": codes.get(e.institution_id or 0, "")}
            for e in session.scalars(query)
        ]


@router.get("/portal/audit")
def audit_page(request: Request, actor: Auditing) -> HTMLResponse:
    return pages.section_page(request, "audit.html", actor, pages.AUDIT)


@router.post("/portal/audit/events")
def audit_events(body: AuditIn, actor: AuditingPart, hub: HubDep) -> HTMLResponse:
    return fragment("audit_rows.html", events=_events(hub, body))


CSV_COLUMNS = (
    "id",
    "at",
    "actor_type",
    "actor",
    "institution",
    "action",
    "outcome",
    "patient_ref",
    "study_ref",
    "transfer_ref",
    "source_address",
    "detail",
    "hash",
)


@router.post("/portal/audit/export")
def audit_export(body: AuditIn, actor: AuditingPart, hub: HubDep) -> Response:
    """The events found, as CSV; the export itself is an event."""
    events = _events(hub, body)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for e in events:
        writer.writerow(
            [
                json.dumps(e[c], sort_keys=True) if c == "detail" else _cell(e[c])
                for c in CSV_COLUMNS
            ]
        )
    with hub.sessions() as session, session.begin():
        record(
            session,
            "audit:trail:exported",
            institution_id=actor.institution_id,
            detail={"events": len(events), "format": "csv"},
            **actor.audit(),
        )
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={
            **pages.NO_STORE,
            "Content-Disposition": 'attachment; filename="imagebridge-audit.csv"',
        },
    )


def _cell(value: Any) -> str:
    text = value.isoformat() if isinstance(value, datetime) else str(value or "")
    # A spreadsheet must not run what an event recorded: no leading formula characters.
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text

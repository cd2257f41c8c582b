"""Rendering the portal's pages: the templates, the navigation a person may use, and the
session's CSRF token that every form sends back as the X-CSRF-Token header."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from imagebridge.accounts import services as accounts
from imagebridge.accounts.permissions import Permission
from imagebridge.actors import Actor
from imagebridge.hub.auth import SESSION_COOKIE

HERE = Path(__file__).parent
STATIC = HERE / "static"
P = Permission


@dataclass(frozen=True)
class Section:
    """A page of the portal and who may open it (any one of the permissions)."""

    label: str
    path: str
    permissions: tuple[Permission, ...]
    group: str = ""


SEND = Section("Send", "/portal/send", (P.SEND_STUDIES,))
OUTBOX = Section("Outbox", "/portal/outbox", (P.TRACK_TRANSFERS,))
INBOX = Section("Inbox", "/portal/inbox", (P.TRACK_TRANSFERS,))
PATIENT = Section("Patient", "/portal/patient", (P.VIEW_STUDIES, P.QUERY_NETWORK))
VIEWER = Section("Viewer", "/portal/studies", (P.VIEW_STUDIES, P.DOWNLOAD))
ADMIN = (P.ADMIN_INSTITUTION, P.ADMIN_NETWORK)
INSTITUTIONS = Section("Institutions", "/portal/admin/institutions", ADMIN, "Administration")
USERS = Section("Users", "/portal/admin/users", ADMIN, "Administration")
GATEWAYS = Section("Gateways", "/portal/admin/gateways", ADMIN, "Administration")
FLAGS = Section("Identity flags", "/portal/admin/flags", ADMIN, "Administration")
AUDIT = Section("Audit trail", "/portal/audit", (P.READ_AUDIT,), "Administration")
SHARES = Section("Shares", "/portal/shares", (P.SHARE_EXTERNAL,))
SHARED = Section("Shared with me", "/portal/shared", (P.VIEW_SHARED,))
SECTIONS = (
    SEND,
    OUTBOX,
    INBOX,
    PATIENT,
    SHARES,
    SHARED,
    INSTITUTIONS,
    USERS,
    GATEWAYS,
    FLAGS,
    AUDIT,
)
# Every person's own: reached from their name at the top of each page, not the menu.
ACCOUNT = Section("My account", "/portal/account", tuple(Permission))


def allowed(actor: Actor, section: Section) -> bool:
    return any(actor.can(p.value) for p in section.permissions)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _dicom_date(value: str) -> str:
    return (
        f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value
    )


def _person_name(value: str) -> str:
    """DICOM PN (FAMILY^GIVEN) as people write it."""
    family, _, rest = (value or "").partition("^")
    given = rest.replace("^", " ").strip()
    return f"{family}, {given}" if given else family


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(when=_when, dicom_date=_dicom_date, person_name=_person_name)


def csrf_of(request: Request) -> str:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return accounts.csrf_token(cookie) if cookie else ""


def render(
    request: Request,
    template: str,
    *,
    title: str,
    actor: Actor | None = None,
    section: Section | None = None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A whole page. Titles name the page only: never a patient."""
    nav = [s for s in SECTIONS if actor is not None and allowed(actor, s)]
    body = templates.get_template(template).render(
        title=title,
        actor=actor,
        nav=nav,
        current=section,
        csrf=csrf_of(request),
        can=(lambda p: actor is not None and actor.can(p)),
        **context,
    )
    return HTMLResponse(body, status, headers=NO_STORE)


def section_page(
    request: Request, template: str, actor: Actor, section: Section, **context: Any
) -> HTMLResponse:
    """A page of a section, titled as the section is."""
    return render(request, template, title=section.label, actor=actor, section=section, **context)


def fragment(template: str, **context: Any) -> HTMLResponse:
    """Part of a page, fetched by the page's script."""
    return HTMLResponse(templates.get_template(template).render(**context), headers=NO_STORE)


# Pages show patients: browsers must not keep them in their cache.
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "same-origin"}

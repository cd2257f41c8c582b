"""HTTP API of people's accounts: login with a second factor, sessions, API tokens, and the
administration of users, roles and trusted networks."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.accounts import services as accounts
from imagebridge.accounts import totp
from imagebridge.accounts.models import ApiToken, Role, User, WebSession
from imagebridge.accounts.permissions import Permission
from imagebridge.actors import Actor, manages
from imagebridge.audit.services import record
from imagebridge.counts import RowId
from imagebridge.hub.auth import (
    SESSION_COOKIE,
    InstitutionAdmin,
    LoggedIn,
    client_address,
    get_hub,
    public,
    require,
)
from imagebridge.hub.state import Hub
from imagebridge.institutions.models import Institution, TrustedNetwork
from imagebridge.institutions.services import get_institution

router = APIRouter(prefix="/api/v1", tags=["accounts"])
HubDep = Annotated[Hub, Depends(get_hub)]
# Any person who has completed the login, whatever their permissions.
Person = Annotated[Actor, Depends(require(*Permission))]


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class CodeIn(BaseModel):
    code: str = Field(min_length=1, max_length=32)


class PasswordIn(BaseModel):
    current: str = Field(max_length=1024)
    new: str = Field(max_length=1024)


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(min_length=1)
    days: int = 30


class UserIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(max_length=1024)
    institution: str | None = Field(None, description="Code; default the caller's own")
    roles: list[str] = Field(default_factory=list)
    kind: Literal["staff", "external"] = "staff"
    display_name: str = Field("", max_length=200)
    email: str = Field("", max_length=254)


class RolesIn(BaseModel):
    roles: list[str]


class RoleIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    permissions: list[str] = Field(min_length=1)


class NetworksIn(BaseModel):
    cidrs: list[str] = Field(max_length=100)


def _audit(
    session: Session,
    action: str,
    outcome: str,
    actor: Actor | None,
    request: Request,
    **detail: Any,
) -> None:
    who = (
        actor.audit()
        if actor
        else {"actor_type": "user", "actor": "", "source_address": client_address(request)}
    )
    record(
        session,
        action,
        outcome,
        institution_id=actor.institution_id if actor else None,
        detail=detail,
        **who,
    )


def _set_cookie(hub: Hub, response: Response, token: str) -> None:
    policy = hub.settings.accounts
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(policy.session_absolute_hours * 3600),
        httponly=True,
        secure=policy.cookie_secure,
        samesite="strict",
        path="/",
    )


def _refusal(
    session: Session,
    request: Request,
    exc: accounts.AccountError,
    username: str,
    institution_id: int | None,
) -> HTTPException:
    """Audit a refused login step in the transaction that also keeps its failure counters."""
    if exc.audit_action:
        record(
            session,
            exc.audit_action,
            "refused",
            actor_type="user",
            actor=username[:64],
            institution_id=institution_id,
            source_address=client_address(request),
            detail={"reason": exc.reason},
        )
    return HTTPException(exc.status, exc.reason)


@router.post("/auth/login", dependencies=[Depends(public)])
def login(body: LoginIn, request: Request, response: Response, hub: HubDep) -> dict[str, Any]:
    """Check the password. The answer says whether a second factor is needed next:
    "code" (a TOTP or recovery code), "enrol" (set one up first) or "" (logged in)."""
    address = client_address(request)
    refused: HTTPException | None = None
    with hub.sessions() as session, session.begin():
        try:
            done = accounts.log_in(
                session,
                body.username,
                body.password,
                address=address,
                now=hub.clock(),
                policy=hub.settings.accounts,
            )
        except accounts.AccountError as exc:
            # Caught inside the transaction: the failure counters must stick.
            refused = _refusal(session, request, exc, body.username, None)
        else:
            record(
                session,
                "user:login:success" if not done.second_factor else "user:login:password",
                "success",
                actor_type="user",
                actor=done.user.username,
                institution_id=done.user.institution_id,
                source_address=address,
                detail={"second_factor": done.second_factor or "not required"},
            )
    if refused is not None:
        raise refused
    _set_cookie(hub, response, done.token)
    return {"second_factor": done.second_factor, "csrf_token": accounts.csrf_token(done.token)}


def _current(session: Session, request: Request, hub: Hub) -> tuple[WebSession, str]:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    web_session = accounts.find_session(session, cookie, hub.clock(), hub.settings.accounts)
    if web_session is None:
        raise HTTPException(401, "not logged in, or the session has ended")
    return web_session, cookie


@router.post("/auth/totp")
def second_factor(
    body: CodeIn, actor: LoggedIn, request: Request, response: Response, hub: HubDep
) -> dict[str, Any]:
    """Give the second factor: a current TOTP code, or one of the recovery codes."""
    now = hub.clock()
    refused: HTTPException | None = None
    with hub.sessions() as session, session.begin():
        web_session, _ = _current(session, request, hub)
        user = web_session.user
        try:
            if accounts.is_locked(user, now):
                raise accounts.AccountError(
                    "this account is locked after repeated failed logins", 403, "user:login:locked"
                )
            try:
                used = accounts.check_second_factor(user, body.code, now, hub.sealer)
            except accounts.AccountError:
                accounts.note_failure(user, now, hub.settings.accounts)
                raise
        except accounts.AccountError as exc:
            refused = _refusal(session, request, exc, actor.name, actor.institution_id)
        else:
            web_session.mfa_passed = True
            token = accounts.rotate(web_session)
            _audit(
                session,
                "user:login:success",
                "success",
                actor,
                request,
                second_factor=used,
                recovery_codes_left=len(user.recovery_codes),
            )
    if refused is not None:
        raise refused
    _set_cookie(hub, response, token)
    return {"second_factor": "", "csrf_token": accounts.csrf_token(token)}


@router.post("/auth/totp/enrol")
def enrol(actor: LoggedIn, request: Request, hub: HubDep) -> dict[str, Any]:
    """Start setting up an authenticator app: scan the QR code, then confirm with a code."""
    with hub.sessions() as session, session.begin():
        web_session, _ = _current(session, request, hub)
        try:
            secret = accounts.start_enrolment(web_session.user, hub.sealer)
        except accounts.AccountError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        uri = totp.provisioning_uri(secret, web_session.user.username)
        _audit(session, "user:totp:enrolment-started", "success", actor, request)
    return {"secret": secret, "otpauth_uri": uri, "qr_svg": totp.qr_svg(uri)}


@router.post("/auth/totp/confirm")
def confirm(
    body: CodeIn, actor: LoggedIn, request: Request, response: Response, hub: HubDep
) -> dict[str, Any]:
    """The first code from the app: two-factor login is on, and the recovery codes are in
    this answer only."""
    with hub.sessions() as session, session.begin():
        web_session, _ = _current(session, request, hub)
        try:
            codes = accounts.confirm_enrolment(web_session.user, body.code, hub.clock(), hub.sealer)
        except accounts.AccountError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        web_session.mfa_passed = True
        token = accounts.rotate(web_session)
        _audit(session, "user:totp:enrolled", "success", actor, request)
    _set_cookie(hub, response, token)
    return {"recovery_codes": codes, "csrf_token": accounts.csrf_token(token)}


@router.post("/auth/logout")
def logout(actor: LoggedIn, request: Request, response: Response, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        web_session, _ = _current(session, request, hub)
        web_session.ended_at = hub.clock()
        _audit(session, "user:session:ended", "success", actor, request, by="logout")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"logged_out": True}


@router.get("/auth/session")
def whoami(actor: LoggedIn, request: Request, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session:
        web_session, cookie = _current(session, request, hub)
        user = web_session.user
        institution = session.get(Institution, user.institution_id)
        return {
            "username": user.username,
            "display_name": user.display_name,
            "kind": user.kind,
            "institution": institution.code if institution else None,
            "permissions": sorted(actor.permissions),
            "second_factor_pending": not web_session.mfa_passed,
            "totp_enabled": user.totp_enabled,
            "csrf_token": accounts.csrf_token(cookie),
        }


@router.post("/auth/password")
def change_password(
    body: PasswordIn, actor: Person, request: Request, hub: HubDep
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        user = session.get(User, actor.user_id)
        if user is None:
            raise HTTPException(403, "for people's accounts only")
        try:
            accounts.change_password(session, user, body.current, body.new)
        except accounts.AccountError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        # Whoever else held the old password is logged out everywhere.
        ended = accounts.end_sessions(
            session, user.id, hub.clock(), keep=request.cookies.get(SESSION_COOKIE)
        )
        _audit(session, "user:password:changed", "success", actor, request, sessions_ended=ended)
    return {"changed": True, "other_sessions_ended": ended}


@router.get("/auth/sessions")
def my_sessions(actor: Person, request: Request, hub: HubDep) -> list[dict[str, Any]]:
    """One's own live sessions: where and when they began, and which one is this."""
    if actor.user_id is None:
        return []  # a gateway: no sessions of its own
    with hub.sessions() as session:
        return accounts.live_sessions(
            session, actor.user_id, request.cookies.get(SESSION_COOKIE, "")
        )


@router.post("/auth/sessions/{session_id}/end")
def end_my_session(
    session_id: RowId, actor: Person, request: Request, hub: HubDep
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        row = session.get(WebSession, session_id)
        if row is None or row.user_id != actor.user_id:
            raise HTTPException(404, "no such session")
        row.ended_at = row.ended_at or hub.clock()
        _audit(session, "user:session:ended", "success", actor, request, by="user")
    return {"id": session_id, "ended": True}


# --- API tokens -------------------------------------------------------------------------


@router.post("/tokens", status_code=201)
def create_token(body: TokenIn, actor: Person, request: Request, hub: HubDep) -> dict[str, Any]:
    """A token for scripts (`Authorization: Bearer …`), limited to the named permissions
    of its user; shown in this answer only."""
    with hub.sessions() as session, session.begin():
        user = session.get(User, actor.user_id)
        if user is None:
            raise HTTPException(403, "API tokens belong to people's accounts")
        try:
            row, token = accounts.create_api_token(
                session,
                user,
                name=body.name,
                scopes=body.scopes,
                days=body.days,
                now=hub.clock(),
                policy=hub.settings.accounts,
            )
        except accounts.AccountError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        _audit(
            session,
            "user:token:created",
            "success",
            actor,
            request,
            token_id=row.id,
            scopes=row.scopes,
        )
        return {**accounts.described_token(row), "token": token}


@router.get("/tokens")
def list_tokens(actor: Person, hub: HubDep) -> list[dict[str, Any]]:
    if actor.user_id is None:
        return []  # a gateway: its own token is not one of these
    with hub.sessions() as session:
        return accounts.api_tokens_of(session, actor.user_id)


@router.post("/tokens/{token_id}/revoke")
def revoke_token(token_id: RowId, actor: Person, request: Request, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        row = session.get(ApiToken, token_id)
        if row is None or row.user_id != actor.user_id:
            raise HTTPException(404, "no such token")
        row.revoked_at = row.revoked_at or hub.clock()
        _audit(session, "user:token:revoked", "success", actor, request, token_id=row.id)
        return accounts.described_token(row)


# --- administration of users, roles and trusted networks ---------------------------------


def _user_out(session: Session, u: User) -> dict[str, Any]:
    institution = session.get(Institution, u.institution_id)
    return {
        "id": u.id,
        "username": u.username,
        "institution": institution.code if institution else None,
        "kind": u.kind,
        "display_name": u.display_name,
        "roles": sorted(r.name for r in u.roles),
        "totp_enabled": u.totp_enabled,
        "locked_until": u.locked_until,
        "disabled": u.disabled_at is not None,
    }


def _managed_user(session: Session, actor: Actor, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None or not manages(actor, user.institution_id):
        raise HTTPException(404, "no such user")
    return user


def _grantable(actor: Actor, roles: list[Role]) -> None:
    """An institution's administrator cannot hand out more than the institution may have."""
    for role in roles:
        if Permission.ADMIN_NETWORK.value in role.permissions and not actor.network_wide:
            raise HTTPException(403, f"only the network's administrators grant {role.name}")


@router.post("/users", status_code=201)
def create_user(
    body: UserIn, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        if body.institution is None:
            institution = (
                session.get(Institution, actor.institution_id) if actor.institution_id else None
            )
        else:
            institution = get_institution(session, body.institution)
        if institution is None or not manages(actor, institution.id):
            raise HTTPException(404, "no such institution")
        try:
            _grantable(actor, accounts.resolve_roles(session, body.roles, institution.id))
            user = accounts.create_user(
                session,
                institution=institution,
                username=body.username,
                password=body.password,
                role_names=body.roles,
                kind=body.kind,
                display_name=body.display_name,
                email=body.email,
            )
        except accounts.AccountError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        _audit(
            session,
            "user:account:created",
            "success",
            actor,
            request,
            user=user.username,
            roles=body.roles,
            kind=body.kind,
        )
        return _user_out(session, user)


@router.get("/users")
def list_users(actor: InstitutionAdmin, hub: HubDep) -> list[dict[str, Any]]:
    query = select(User).order_by(User.username)
    if not actor.network_wide:
        query = query.where(User.institution_id == actor.institution_id)
    with hub.sessions() as session:
        return [_user_out(session, u) for u in session.scalars(query)]


@router.put("/users/{user_id}/roles")
def set_roles(
    user_id: RowId, body: RolesIn, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        user = _managed_user(session, actor, user_id)
        if user.kind == "external" and body.roles:
            raise HTTPException(422, "external users have no roles; share studies with them")
        try:
            roles = accounts.resolve_roles(session, body.roles, user.institution_id)
        except accounts.AccountError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        _grantable(actor, roles)
        before = sorted(r.name for r in user.roles)
        user.roles = roles
        _audit(
            session,
            "user:roles:changed",
            "success",
            actor,
            request,
            user=user.username,
            before=before,
            after=sorted(body.roles),
        )
        return _user_out(session, user)


def _admin_action(
    hub: Hub, actor: Actor, request: Request, user_id: int, action: str
) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        user = _managed_user(session, actor, user_id)
        now = hub.clock()
        ended = 0
        if action == "unlock":
            user.locked_until, user.failed_logins = None, 0
        elif action == "sessions-ended":
            ended = accounts.end_sessions(session, user.id, now)
        elif action == "second-factor-reset":
            accounts.reset_second_factor(user)
            ended = accounts.end_sessions(session, user.id, now)
        elif action == "disabled":
            user.disabled_at = now
            ended = accounts.end_sessions(session, user.id, now)
        _audit(
            session,
            f"user:account:{action}",
            "success",
            actor,
            request,
            user=user.username,
            sessions_ended=ended,
        )
        return {**_user_out(session, user), "sessions_ended": ended}


@router.post("/users/{user_id}/unlock")
def unlock(
    user_id: RowId, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    return _admin_action(hub, actor, request, user_id, "unlock")


@router.post("/users/{user_id}/sessions/end")
def end_sessions(
    user_id: RowId, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    return _admin_action(hub, actor, request, user_id, "sessions-ended")


@router.post("/users/{user_id}/second-factor/reset")
def reset_second_factor(
    user_id: RowId, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    return _admin_action(hub, actor, request, user_id, "second-factor-reset")


@router.post("/users/{user_id}/disable")
def disable(
    user_id: RowId, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    return _admin_action(hub, actor, request, user_id, "disabled")


@router.get("/roles")
def list_roles(actor: InstitutionAdmin, hub: HubDep) -> list[dict[str, Any]]:
    query = select(Role).order_by(Role.builtin.desc(), Role.name)
    if not actor.network_wide:
        query = query.where(Role.builtin.is_(True) | (Role.institution_id == actor.institution_id))
    with hub.sessions() as session:
        return [
            {
                "name": r.name,
                "builtin": r.builtin,
                "permissions": r.permissions,
                "institution_id": r.institution_id,
            }
            for r in session.scalars(query)
        ]


@router.post("/roles", status_code=201)
def create_role(
    body: RoleIn, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    """A custom role of the caller's institution, from the named permissions."""
    if actor.institution_id is None:
        raise HTTPException(422, "custom roles belong to an institution")
    with hub.sessions() as session, session.begin():
        try:
            role = accounts.create_role(
                session,
                institution_id=actor.institution_id,
                name=body.name,
                permissions=body.permissions,
            )
        except accounts.AccountError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        _audit(
            session,
            "user:role:created",
            "success",
            actor,
            request,
            role=role.name,
            permissions=role.permissions,
        )
        return {"name": role.name, "builtin": False, "permissions": role.permissions}


@router.get("/institutions/{code}/trusted-networks")
def trusted_networks(code: str, actor: InstitutionAdmin, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session:
        institution = get_institution(session, code)
        if institution is None or not manages(actor, institution.id):
            raise HTTPException(404, "no such institution")
        cidrs = session.scalars(
            select(TrustedNetwork.cidr).where(TrustedNetwork.institution_id == institution.id)
        )
        return {"institution": code, "cidrs": list(cidrs)}


@router.put("/institutions/{code}/trusted-networks")
def set_trusted_networks(
    code: str, body: NetworksIn, actor: InstitutionAdmin, request: Request, hub: HubDep
) -> dict[str, Any]:
    """Logins from these networks may skip the second factor (never administrators' or
    external users')."""
    try:
        cidrs = [str(ipaddress.ip_network(c.strip(), strict=False)) for c in body.cidrs]
    except ValueError as exc:
        raise HTTPException(422, f"not a network in CIDR notation: {exc}") from exc
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None or not manages(actor, institution.id):
            raise HTTPException(404, "no such institution")
        for row in session.scalars(
            select(TrustedNetwork).where(TrustedNetwork.institution_id == institution.id)
        ):
            session.delete(row)
        for cidr in dict.fromkeys(cidrs):
            session.add(TrustedNetwork(institution_id=institution.id, cidr=cidr))
        _audit(
            session,
            "directory:trusted-networks:changed",
            "success",
            actor,
            request,
            institution=code,
            cidrs=cidrs,
        )
        return {"institution": code, "cidrs": cidrs}

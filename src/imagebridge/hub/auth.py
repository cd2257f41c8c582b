"""Who is calling and what they may do: every route depends on exactly one of these checks.

Callers are people (a session cookie from the login, or an API token `ibu_…` limited to
scopes), gateways (their own token `ibg_…`), or the bootstrap credential in
data_dir/admin-token, accepted from loopback addresses only so that an operator on the hub's
machine can set the network up before any user exists.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from imagebridge.accounts import services as accounts
from imagebridge.accounts.permissions import BOOTSTRAP_PERMISSIONS, Permission
from imagebridge.actors import Actor
from imagebridge.db import utcnow
from imagebridge.hub.state import Hub
from imagebridge.hub.tokens import Verified
from imagebridge.institutions.services import authenticate_gateway, token_digest

SESSION_COOKIE = "ib_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What a gateway may do besides its own routes: open transfers for its institution and
# follow them.
GATEWAY_PERMISSIONS = frozenset({Permission.SEND_STUDIES, Permission.TRACK_TRANSFERS})

_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def hub_of(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


async def get_hub(request: Request) -> Hub:
    """As a dependency: async, so that resolving it takes no trip to a worker thread."""
    return hub_of(request)


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, reason, headers={"WWW-Authenticate": "Bearer"}
    )


def _cached_gateway(
    request: Request, credentials: HTTPAuthorizationCredentials | None
) -> Actor | None:
    """A gateway whose token was verified moments ago: known without the database, so
    without a trip to a worker thread (gateways make most of the hub's requests)."""
    if credentials is None or not credentials.credentials.startswith("ibg_"):
        return None
    cached = hub_of(request).token_cache.get(token_digest(credentials.credentials))
    if cached is None:
        return None
    actor = _gateway(request, cached)
    request.state.actor = actor
    return actor


def _gateway(request: Request, verified: Verified) -> Actor:
    return Actor(
        "gateway",
        verified.name,
        verified.institution_id,
        client_address(request),
        GATEWAY_PERMISSIONS,
    )


def _gateway_actor(request: Request, hub: Hub, token: str) -> Actor | None:
    key = token_digest(token)
    cached = hub.token_cache.get(key)
    if cached is None:
        generation = hub.token_cache.generation  # before the lookup: see hub/tokens.py
        with hub.sessions() as session, session.begin():
            gateway = authenticate_gateway(session, token)
            if gateway is None:
                hub.token_cache.drop(key)
                return None
            gateway.last_seen_at = utcnow()
            name = f"{gateway.institution.code}/{gateway.name}"
            cached = hub.token_cache.remember(key, name, gateway.institution_id, generation)
    return _gateway(request, cached)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _bootstrap_actor(request: Request, hub: Hub, token: str) -> Actor | None:
    if not hmac.compare_digest(token.encode(), hub.admin_token.encode()):
        return None
    address = client_address(request)
    if not _is_loopback(address):
        raise HTTPException(403, "the bootstrap credential is accepted from the hub's host only")
    return Actor("admin", "network-admin", None, address, BOOTSTRAP_PERMISSIONS)


def _token_actor(request: Request, hub: Hub, token: str) -> Actor:
    if token.startswith("ibg_"):
        actor = _gateway_actor(request, hub, token)
        if actor is None:
            raise _unauthorized("unknown or revoked gateway token")
        return actor
    if token.startswith(accounts.API_TOKEN_PREFIX):
        with hub.sessions() as session:
            row = accounts.find_api_token(session, token, hub.clock())
            if row is None:
                raise _unauthorized("unknown, expired or revoked API token")
            user = row.user
            # A token never carries more than its user holds today.
            held = frozenset(p.value for p in accounts.permissions_of(user))
            return Actor(
                "user",
                user.username,
                user.institution_id,
                client_address(request),
                held & frozenset(row.scopes),
                user.id,
            )
    actor = _bootstrap_actor(request, hub, token)
    if actor is None:
        raise _unauthorized("unknown token")
    return actor


def _session_actor(request: Request, hub: Hub, cookie: str, *, complete: bool) -> Actor:
    with hub.sessions() as session, session.begin():
        web_session = accounts.find_session(session, cookie, hub.clock(), hub.settings.accounts)
        if web_session is None:
            raise _unauthorized("not logged in, or the session has ended")
        if complete and not web_session.mfa_passed:
            raise _unauthorized("the second factor is still required")
        user = web_session.user
        perms = accounts.permissions_of(user) if web_session.mfa_passed else frozenset()
        actor = Actor(
            "user",
            user.username,
            user.institution_id,
            client_address(request),
            frozenset(p.value for p in perms),
            user.id,
        )
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), accounts.csrf_token(cookie).encode()):
            raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header")
    return actor


def identify(
    request: Request, credentials: HTTPAuthorizationCredentials | None, *, complete: bool = True
) -> Actor:
    """The caller, from a bearer token or the session cookie; 401 when there is neither."""
    hub = hub_of(request)
    if credentials is not None:
        actor = _token_actor(request, hub, credentials.credentials)
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            raise _unauthorized("authentication required")
        actor = _session_actor(request, hub, cookie, complete=complete)
    request.state.actor = actor
    return actor


Check = Callable[[Request, HTTPAuthorizationCredentials | None], Awaitable[Actor]]


def require(*permissions: Permission) -> Check:
    """A check that passes callers holding any one of the permissions."""
    wanted = frozenset(p.value for p in permissions)

    async def check(request: Request, credentials: Credentials) -> Actor:
        actor = _cached_gateway(request, credentials)
        if actor is None:
            actor = await run_in_threadpool(identify, request, credentials)
        if not actor.permissions & wanted:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "this needs the permission " + " or ".join(sorted(wanted)),
            )
        return actor

    check.__name__ = "require_" + "_or_".join(sorted(wanted))
    check.permissions = wanted  # type: ignore[attr-defined]
    return check


class PageRefused(HTTPException):
    """A portal page's check said no: a browser without a session is sent to log in (401),
    one without the permission is shown why (403)."""


def require_page(*permissions: Permission) -> Check:
    """The page variant of `require`: the same check, answered for a person at a browser.
    A script's bearer token is refused as the API refuses it."""
    api_check = require(*permissions)

    async def check(request: Request, credentials: Credentials) -> Actor:
        try:
            return await api_check(request, credentials)
        except PageRefused:
            raise
        except HTTPException as exc:
            if exc.status_code == 401 and credentials is None:
                raise PageRefused(401, exc.detail) from exc
            if exc.status_code == 403 and str(exc.detail).startswith("this needs"):
                raise PageRefused(403, exc.detail) from exc
            raise

    wanted: frozenset[str] = api_check.permissions  # type: ignore[attr-defined]
    check.__name__ = "page_" + api_check.__name__
    check.permissions = wanted  # type: ignore[attr-defined]
    return check


async def require_gateway(request: Request, credentials: Credentials) -> Actor:
    """A gateway, identified by its own token; acts for its institution only."""
    actor = _cached_gateway(request, credentials)
    if actor is None:
        actor = await run_in_threadpool(_require_gateway, request, credentials)
    return actor


def _require_gateway(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Actor:
    if credentials is None:
        if request.cookies.get(SESSION_COOKIE):
            raise HTTPException(403, "for gateways only")
        raise _unauthorized("authentication required")
    actor = _token_actor(request, hub_of(request), credentials.credentials)
    request.state.actor = actor
    if actor.kind != "gateway":
        raise HTTPException(403, "for gateways only")
    return actor


def require_login(request: Request, credentials: Credentials) -> Actor:
    """Any logged-in person, even one still owing the second factor: for the login steps
    (enrolment, code, logout) and one's own account."""
    actor = identify(request, credentials, complete=False)
    if actor.kind != "user":
        raise HTTPException(403, "for people's accounts only")
    return actor


def public() -> None:
    """Marks a route deliberately open to anyone (health checks, the login form)."""


SCRAPER_ONLY = "for the metrics scraper only"


def require_scraper(request: Request, credentials: Credentials) -> None:
    """Prometheus, presenting the `[metrics] scrape_token`; no person, gateway or token."""
    if credentials is None:
        if request.cookies.get(SESSION_COOKIE):
            raise HTTPException(403, SCRAPER_ONLY)
        raise _unauthorized("authentication required")
    expected = hub_of(request).settings.metrics.scrape_token.get_secret_value()
    # Compared as digests: equal lengths, so the time taken says nothing about the token.
    given = hashlib.sha256(credentials.credentials.encode()).digest()
    if not expected or not hmac.compare_digest(given, hashlib.sha256(expected.encode()).digest()):
        raise _unauthorized("unknown scrape token")


def checks_of(dependency: object) -> frozenset[str] | None:
    """The permissions a dependency checks, or None if it is not one of the checks here."""
    if dependency in (require_gateway, require_login, require_scraper, public):
        return frozenset()
    return getattr(dependency, "permissions", None)


GatewayActor = Annotated[Actor, Depends(require_gateway)]
LoggedIn = Annotated[Actor, Depends(require_login)]
P = Permission
NetworkAdmin = Annotated[Actor, Depends(require(P.ADMIN_NETWORK))]
InstitutionAdmin = Annotated[Actor, Depends(require(P.ADMIN_INSTITUTION, P.ADMIN_NETWORK))]
Sender = Annotated[Actor, Depends(require(P.SEND_STUDIES))]
Tracker = Annotated[Actor, Depends(require(P.TRACK_TRANSFERS))]
Auditor = Annotated[Actor, Depends(require(P.READ_AUDIT))]
Sharer = Annotated[Actor, Depends(require(P.SHARE_EXTERNAL))]
SharedViewer = Annotated[Actor, Depends(require(P.VIEW_SHARED))]
# The directory is what people pick destinations from and gateways route by.
DirectoryReader = Annotated[
    Actor,
    Depends(
        require(
            P.SEND_STUDIES,
            P.TRACK_TRANSFERS,
            P.QUERY_NETWORK,
            P.ADMIN_INSTITUTION,
            P.ADMIN_NETWORK,
        )
    ),
]

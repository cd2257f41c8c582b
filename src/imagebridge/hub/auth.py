"""Who is calling: every route depends on exactly one of these checks."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from imagebridge.actors import Actor
from imagebridge.db import utcnow
from imagebridge.hub.state import Hub
from imagebridge.institutions.services import authenticate_gateway, token_digest

_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, reason, headers={"WWW-Authenticate": "Bearer"}
    )


# A gateway calls many times a second; remembering a verified token briefly keeps the
# database out of the hot path. A revocation takes effect within this time.
TOKEN_CACHE_SECONDS = 5.0


def _gateway_actor(request: Request, hub: Hub, token: str) -> Actor | None:
    if not token.startswith("ibg_"):
        return None
    key = token_digest(token)
    cached = hub.token_cache.get(key)
    if cached is None or cached[2] < time.monotonic():
        with hub.sessions() as session, session.begin():
            gateway = authenticate_gateway(session, token)
            if gateway is None:
                hub.token_cache.pop(key, None)
                return None
            gateway.last_seen_at = utcnow()
            cached = (
                f"{gateway.institution.code}/{gateway.name}",
                gateway.institution_id,
                time.monotonic() + TOKEN_CACHE_SECONDS,
            )
            hub.token_cache[key] = cached
    return Actor("gateway", cached[0], cached[1], _client(request))


def require_admin(request: Request, credentials: Credentials) -> Actor:
    """The network administrator."""
    hub = get_hub(request)
    if credentials is None:
        raise _unauthorized("authentication required")
    if not hmac.compare_digest(credentials.credentials.encode(), hub.admin_token.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "network administrator only")
    return Actor("admin", "network-admin", None, _client(request))


def require_gateway(request: Request, credentials: Credentials) -> Actor:
    """A gateway, identified by its own token; acts for its institution only."""
    if credentials is None:
        raise _unauthorized("authentication required")
    actor = _gateway_actor(request, get_hub(request), credentials.credentials)
    if actor is None:
        raise _unauthorized("unknown or revoked gateway token")
    return actor


def require_member(request: Request, credentials: Credentials) -> Actor:
    """The administrator or a gateway: what each may see is checked by the route."""
    if credentials is None:
        raise _unauthorized("authentication required")
    hub = get_hub(request)
    if hmac.compare_digest(credentials.credentials.encode(), hub.admin_token.encode()):
        return Actor("admin", "network-admin", None, _client(request))
    actor = _gateway_actor(request, hub, credentials.credentials)
    if actor is None:
        raise _unauthorized("unknown token")
    return actor


def public() -> None:
    """Marks a route deliberately open to anyone (health checks)."""


AUTH_CHECKS = (require_admin, require_gateway, require_member, public)
Admin = Annotated[Actor, Depends(require_admin)]
GatewayActor = Annotated[Actor, Depends(require_gateway)]
Member = Annotated[Actor, Depends(require_member)]

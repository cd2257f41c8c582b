"""Every route of the hub's API declares who may call it, and refuses everyone else.

The app is built in-process from its own route table, so a route added later without an
authentication check fails here before anyone can call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from imagebridge.hub.app import create_app
from imagebridge.hub.auth import (
    AUTH_CHECKS,
    GatewayActor,
    Member,
    public,
    require_admin,
    require_gateway,
    require_member,
)
from imagebridge.hub.state import Hub
from imagebridge.settings import HubSettings

# FastAPI's own documentation routes: open to anyone by choice, and nothing else is.
DOCUMENTATION_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
PUBLIC_ROUTES = {("GET", "/api/v1/health")}
BAD_CREDENTIALS = {
    "no token": {},
    "empty bearer": {"Authorization": "Bearer "},
    "not bearer": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    "unknown token": {"Authorization": "Bearer nonsense"},
    "forged gateway token": {"Authorization": "Bearer ibg_forged-token-that-was-never-issued"},
    "forged admin token": {"Authorization": "Bearer iba_forged-token-that-was-never-issued"},
}


def _routes(app: FastAPI) -> list[Any]:
    """The app's effective routes, with the prefixes and dependencies of included routers."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI >= 0.16x keeps routers lazy
    except ImportError:  # older FastAPI flattens included routers into app.routes
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


class HubClient:
    """A synchronous client calling the app in-process through httpx's ASGI transport."""

    def __init__(self, app: FastAPI) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://hub.test"
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._loop.run_until_complete(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


def _calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    hub = Hub.open(HubSettings(data_dir=tmp_path_factory.mktemp("hub")))
    yield create_app(hub)
    hub.engine.dispose()


def auth_table(app: FastAPI) -> tuple[dict[tuple[str, str], Callable[..., Any]], list[str]]:
    """(method, path) -> the auth check of every API route, and what is wrong with the rest."""
    found: dict[tuple[str, str], Callable[..., Any]] = {}
    problems: list[str] = []
    for route in _routes(app):
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            if route.path not in DOCUMENTATION_ROUTES:
                problems.append(f"unexpected non-API route {route.path}")
            continue
        used = {call for call in _calls(dependant) if call in AUTH_CHECKS}
        for method in sorted(route.methods - {"HEAD"}):
            if len(used) == 1:
                found[(method, route.path)] = next(iter(used))
            else:
                names = sorted(c.__name__ for c in used)
                problems.append(f"{method} {route.path}: {len(used)} auth checks {names}")
    return found, problems


@pytest.fixture(scope="module")
def checks(app: FastAPI) -> dict[tuple[str, str], Callable[..., Any]]:
    found, problems = auth_table(app)
    assert not problems, "\n".join(problems)
    return found


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[HubClient]:
    c = HubClient(app)
    yield c
    c.close()


@pytest.fixture(scope="module")
def admin_token(app: FastAPI) -> str:
    hub: Hub = app.state.hub
    return hub.admin_token


@pytest.fixture(scope="module")
def gateway_token(client: HubClient, admin_token: str) -> str:
    headers = {"Authorization": f"Bearer {admin_token}"}
    r = client.post("/api/v1/institutions", json={"code": "SEG", "name": "SEG"}, headers=headers)
    assert r.status_code == 201, r.text
    r = client.post("/api/v1/institutions/SEG/gateways", json={"name": "gw"}, headers=headers)
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def _call(client: HubClient, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    url = path.replace("{", "").replace("}", "")  # e.g. /transfers/transfer_id
    for name in ("gateway_id",):  # integer path parameters
        url = url.replace(name, "1")
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, url, headers=headers, **body)


def test_every_route_has_exactly_one_auth_check(
    app: FastAPI, checks: dict[tuple[str, str], Callable[..., Any]]
) -> None:
    assert {route for route, check in checks.items() if check is public} == PUBLIC_ROUTES
    documented = {route.path for route in _routes(app) if getattr(route, "dependant", None) is None}
    assert documented == DOCUMENTATION_ROUTES
    # Sanity: the walk really reached the routers' routes.
    assert checks[("GET", "/api/v1/audit")] is require_admin
    assert checks[("POST", "/api/v1/transfers/{transfer_id}/instances")] is require_gateway
    assert checks[("GET", "/api/v1/transfers")] is require_member


def institution_of(actor: GatewayActor) -> Any:
    """A dependency that depends on an auth check: the walk must look through it."""
    return actor.institution_id


def test_the_walk_finds_routes_without_exactly_one_check() -> None:
    """The check of the route table itself: unauthenticated or doubly-checked routes fail."""
    router = APIRouter(prefix="/api/v1")

    @router.get("/open")
    def open_route() -> None: ...

    @router.get("/both", dependencies=[Depends(require_admin)])
    def both(actor: Member) -> None: ...

    @router.get("/nested")
    def nested(institution: Annotated[Any, Depends(institution_of)]) -> None: ...

    app = FastAPI()
    app.include_router(router)
    found, problems = auth_table(app)
    assert found == {("GET", "/api/v1/nested"): require_gateway}
    assert problems == [
        "GET /api/v1/open: 0 auth checks []",
        "GET /api/v1/both: 2 auth checks ['require_admin', 'require_member']",
    ]


def test_public_routes_answer_without_a_token(
    client: HubClient, checks: dict[tuple[str, str], Callable[..., Any]]
) -> None:
    for method, path in PUBLIC_ROUTES:
        assert _call(client, method, path, {}).status_code == 200
    for path in DOCUMENTATION_ROUTES - {"/docs/oauth2-redirect"}:
        assert client.get(path).status_code == 200


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_routes_refuse_missing_or_bad_tokens(
    client: HubClient,
    checks: dict[tuple[str, str], Callable[..., Any]],
    credentials: str,
) -> None:
    headers = BAD_CREDENTIALS[credentials]
    wrong = []
    for (method, path), check in checks.items():
        if check is public:
            continue
        r = _call(client, method, path, headers)
        if r.status_code not in (401, 403):
            wrong.append(f"{method} {path}: {r.status_code} {r.text[:100]}")
        elif r.status_code == 401:
            assert r.headers.get("WWW-Authenticate") == "Bearer", (method, path)
    assert not wrong, "\n".join(wrong)


def test_admin_routes_refuse_a_gateway_token(
    client: HubClient, checks: dict[tuple[str, str], Callable[..., Any]], gateway_token: str
) -> None:
    headers = {"Authorization": f"Bearer {gateway_token}"}
    admin_routes = [route for route, check in checks.items() if check is require_admin]
    assert len(admin_routes) >= 4
    answers = {route: _call(client, *route, headers).status_code for route in admin_routes}
    assert answers == {route: 403 for route in admin_routes}
    # The same token is good where a gateway may go.
    assert client.get("/api/v1/gateway/config", headers=headers).status_code == 200


def test_gateway_routes_refuse_the_admin_token(
    client: HubClient, checks: dict[tuple[str, str], Callable[..., Any]], admin_token: str
) -> None:
    """The administrator acts through the API, never as a gateway of some institution."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    gateway_routes = [route for route, check in checks.items() if check is require_gateway]
    assert len(gateway_routes) >= 5
    answers = {route: _call(client, *route, headers).status_code for route in gateway_routes}
    assert all(status in (401, 403) for status in answers.values()), answers
    assert client.get("/api/v1/audit", headers=headers).status_code == 200


def test_a_revoked_gateway_token_is_refused(
    client: HubClient, admin_token: str, tmp_path: Path
) -> None:
    admin = {"Authorization": f"Bearer {admin_token}"}
    r = client.post("/api/v1/institutions", json={"code": "RVK", "name": "Revoked"}, headers=admin)
    assert r.status_code == 201, r.text
    issued = client.post("/api/v1/institutions/RVK/gateways", json={"name": "old"}, headers=admin)
    gw = {"Authorization": f"Bearer {issued.json()['token']}"}
    assert client.get("/api/v1/gateway/config", headers=gw).status_code == 200
    r = client.post(f"/api/v1/gateways/{issued.json()['id']}/revoke", headers=admin)
    assert r.status_code == 200, r.text
    assert client.get("/api/v1/gateway/config", headers=gw).status_code == 401
    assert client.get("/api/v1/transfers", headers=gw).status_code == 401

"""Every route of the hub's API checks a permission, and refuses everyone without it.

The app is built in-process from its own route table, so a route added later without a
check fails here before anyone can call it. Then the whole table is walked against a user of
every built-in role, a gateway, the bootstrap credential and no credential at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from hubapp import OUTSIDE, HubClient, InProcessHub, Person
from imagebridge.accounts.permissions import BUILTIN_ROLES, Permission
from imagebridge.hub.auth import (
    GatewayActor,
    checks_of,
    public,
    require,
    require_gateway,
    require_login,
)

# FastAPI's own documentation routes: open to anyone by choice, and nothing else is.
DOCUMENTATION_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
PUBLIC_ROUTES = {
    ("GET", "/api/v1/health"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("POST", "/api/v1/auth/login"),
    # The portal's way in: its login page, its style and scripts, and / sending there.
    ("GET", "/"),
    ("GET", "/portal/login"),
    ("GET", "/portal/static/{name}"),
}
BAD_CREDENTIALS = {
    "no token": {},
    "empty bearer": {"Authorization": "Bearer "},
    "not bearer": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    "unknown token": {"Authorization": "Bearer nonsense"},
    "forged gateway token": {"Authorization": "Bearer ibg_forged-token-that-was-never-issued"},
    "forged admin token": {"Authorization": "Bearer iba_forged-token-that-was-never-issued"},
    "forged API token": {"Authorization": "Bearer ibu_forged-token-that-was-never-issued"},
    "forged session cookie": {"Cookie": "ib_session=ibs_forged-session-never-opened"},
}
# Spot checks that the table says what the product promises.
EXPECTED = {
    ("POST", "/api/v1/institutions"): {"admin_network"},
    ("POST", "/api/v1/institutions/{code}/agreements"): {"admin_network"},
    ("POST", "/api/v1/transfers"): {"send_studies"},
    ("GET", "/api/v1/transfers"): {"track_transfers"},
    ("GET", "/api/v1/audit"): {"read_audit"},
    ("POST", "/api/v1/users"): {"admin_institution", "admin_network"},
    ("POST", "/api/v1/shares"): {"share_external"},
    ("GET", "/api/v1/shared/{share_id}/package"): {"view_shared"},
    ("GET", "/dicomweb/studies"): {"view_studies", "query_network"},
    ("GET", "/dicomweb/studies/{study}"): {"view_studies", "download"},
    ("POST", "/dicomweb/studies"): {"send_studies"},
    ("GET", "/portal/send"): {"send_studies"},
    ("GET", "/portal/audit"): {"read_audit"},
    ("POST", "/portal/audit/export"): {"read_audit"},
    ("GET", "/portal/admin/users"): {"admin_institution", "admin_network"},
    ("POST", "/api/v1/legal-holds"): {"admin_institution", "admin_network"},
    ("GET", "/metrics"): set(),
}


def _routes(app: FastAPI) -> list[Any]:
    """The app's effective routes, with the prefixes and dependencies of included routers."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI >= 0.16x keeps routers lazy
    except ImportError:  # older FastAPI flattens included routers into app.routes
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def _calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


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
        used = {call for call in _calls(dependant) if checks_of(call) is not None}
        for method in sorted(route.methods - {"HEAD"}):
            if len(used) == 1:
                found[(method, route.path)] = next(iter(used))
            else:
                names = sorted(c.__name__ for c in used)
                problems.append(f"{method} {route.path}: {len(used)} auth checks {names}")
    return found, problems


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    t = InProcessHub(tmp_path_factory.mktemp("hub"))
    t.add_institution("SEG")
    t.add_institution("RVH")
    yield t
    t.close()


@pytest.fixture(scope="module")
def checks(net: InProcessHub) -> dict[tuple[str, str], Callable[..., Any]]:
    found, problems = auth_table(net.app)
    assert not problems, "\n".join(problems)
    return found


@pytest.fixture(scope="module")
def people(net: InProcessHub) -> dict[str, Person]:
    """A logged-in user of every built-in role (from outside: with the second factor)."""
    out = {}
    for role in BUILTIN_ROLES:
        if role == "external_legal":
            net.add_user("SEG", "solicitor", [], external=True)
            out[role] = net.log_in("solicitor", OUTSIDE)
        else:
            net.add_user("SEG", role, [role])
            out[role] = net.log_in(role, OUTSIDE)
    return out


def _url(path: str) -> str:
    """A concrete URL naming nothing that exists, so that no allowed call changes state."""
    for name, value in (
        ("{code}", "NOPE"),
        ("{transfer_id}", "no-such-transfer"),
        ("{gateway_id}", "999999"),
        ("{user_id}", "999999"),
        ("{token_id}", "999999"),
        ("{share_id}", "999999"),
        ("{study}", "1.2.3.999"),
        ("{series}", "1.2.3.999.1"),
        ("{instance}", "1.2.3.999.1.1"),
        ("{frames}", "1"),
        ("{path:path}", "7FE00010"),
        ("{session_id}", "999999"),
        ("{patient_id}", "999999"),
        ("{flag_id}", "999999"),
        ("{study_id}", "999999"),
        ("{report_id}", "999999"),
        ("{task_id}", "no-such-task"),
        ("{hold_id}", "999999"),
    ):
        path = path.replace(name, value)
    assert "{" not in path, f"give the test a value for {path}"
    return path


def _call(
    client: HubClient | Person, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, _url(path), headers=headers or {}, **body)


def _is_page(check: Callable[..., Any]) -> bool:
    return check.__name__.startswith("page_")


def _sent_to_login(r: httpx.Response) -> bool:
    return r.status_code == 303 and r.headers["location"].startswith("/portal/login?next=/portal")


def _refused_by_check(r: httpx.Response) -> bool:
    """Refused by the route's authorization check, not by what the route found afterwards."""
    if r.status_code == 401 or _sent_to_login(r):
        return True
    if r.status_code == 403 and r.headers["content-type"].startswith("text/html"):
        return "this needs the permission" in r.text  # a portal page saying why not
    detail = r.json().get("detail", "") if r.status_code == 403 else ""
    return isinstance(detail, str) and detail.startswith(
        (
            "this needs the permission",
            "for gateways only",
            "for people's accounts only",
            "for the metrics scraper only",
        )
    )


def test_every_route_has_exactly_one_auth_check(
    net: InProcessHub, checks: dict[tuple[str, str], Callable[..., Any]]
) -> None:
    assert {route for route, check in checks.items() if check is public} == PUBLIC_ROUTES
    documented = {
        route.path for route in _routes(net.app) if getattr(route, "dependant", None) is None
    }
    assert documented == DOCUMENTATION_ROUTES
    # The walk really reached the routers' routes, and found what each one checks.
    assert checks[("POST", "/api/v1/transfers/{transfer_id}/instances")] is require_gateway
    for route, wanted in EXPECTED.items():
        assert checks_of(checks[route]) == wanted, route


def institution_of(actor: GatewayActor) -> Any:
    """A dependency that depends on an auth check: the walk must look through it."""
    return actor.institution_id


def test_the_walk_finds_routes_without_exactly_one_check() -> None:
    """The check of the route table itself: unchecked or doubly-checked routes fail."""
    router = APIRouter(prefix="/api/v1")
    admin = require(Permission.ADMIN_NETWORK)

    @router.get("/open")
    def open_route() -> None: ...

    @router.get("/both", dependencies=[Depends(admin)])
    def both(actor: GatewayActor) -> None: ...

    @router.get("/nested")
    def nested(institution: Annotated[Any, Depends(institution_of)]) -> None: ...

    app = FastAPI()
    app.include_router(router)
    found, problems = auth_table(app)
    assert found == {("GET", "/api/v1/nested"): require_gateway}
    assert problems == [
        "GET /api/v1/open: 0 auth checks []",
        "GET /api/v1/both: 2 auth checks ['require_admin_network', 'require_gateway']",
    ]


def test_public_routes_answer_without_credentials(
    net: InProcessHub, checks: dict[tuple[str, str], Callable[..., Any]]
) -> None:
    client = net.client()
    assert client.get("/api/v1/health").status_code == 200
    # The login form is open, and says no without revealing whether the user exists.
    r = client.post("/api/v1/auth/login", json={"username": "nobody", "password": "x" * 12})
    assert r.status_code == 401 and r.json()["detail"] == "wrong user name or password"
    for path in DOCUMENTATION_ROUTES - {"/docs/oauth2-redirect"}:
        assert client.get(path).status_code == 200


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_routes_refuse_missing_or_bad_credentials(
    net: InProcessHub,
    checks: dict[tuple[str, str], Callable[..., Any]],
    credentials: str,
) -> None:
    headers = BAD_CREDENTIALS[credentials]
    wrong = []
    for (method, path), check in checks.items():
        if check is public:
            continue
        r = _call(net.client(), method, path, headers)
        if _is_page(check) and r.status_code != 401:
            # A browser without a session is sent to the login page, and back afterwards.
            if not _sent_to_login(r) or not r.headers["location"].endswith(_url(path)):
                wrong.append(f"{method} {path}: {r.status_code}, not sent to log in")
        elif r.status_code not in (401, 403):
            wrong.append(f"{method} {path}: {r.status_code} {r.text[:100]}")
        elif r.status_code == 401:
            assert r.headers.get("WWW-Authenticate") == "Bearer", (method, path)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("role", list(BUILTIN_ROLES))
def test_route_role_matrix(
    checks: dict[tuple[str, str], Callable[..., Any]], people: dict[str, Person], role: str
) -> None:
    """A role's user gets past exactly the checks its permissions meet, on every route."""
    person = people[role]
    held = {p.value for p in BUILTIN_ROLES[role]}
    if role == "external_legal":
        held = {"view_shared"}
    wrong = []
    for (method, path), check in sorted(checks.items()):
        if check in (public, require_login):
            continue  # the login steps themselves: tested in test_login
        r = _call(person, method, path)
        allowed = check is not require_gateway and bool(checks_of(check) & held)  # type: ignore[operator]
        if allowed and _refused_by_check(r):
            wrong.append(f"{method} {path}: {r.status_code} {r.text}, but {role} may")
        if not allowed and not (r.status_code == 403 and _refused_by_check(r)):
            wrong.append(f"{method} {path}: {r.status_code}, but {role} may not")
    assert not wrong, "\n".join(wrong)


def test_gateway_token_reaches_gateway_routes_and_its_permissions_only(
    net: InProcessHub, checks: dict[tuple[str, str], Callable[..., Any]]
) -> None:
    headers = {"Authorization": f"Bearer {net.gateway_token('SEG')}"}
    held = {"send_studies", "track_transfers"}
    wrong = []
    for (method, path), check in sorted(checks.items()):
        if check is public:
            continue
        r = _call(net.client(), method, path, headers)
        allowed = check is require_gateway or bool((checks_of(check) or set()) & held)
        if allowed == _refused_by_check(r):
            wrong.append(f"{method} {path}: {r.status_code} {r.text}")
    assert not wrong, "\n".join(wrong)
    assert net.client().get("/api/v1/gateway/config", headers=headers).status_code == 200


def test_bootstrap_credential_is_for_the_hubs_host_only(
    net: InProcessHub, checks: dict[tuple[str, str], Callable[..., Any]]
) -> None:
    """The administrator's bootstrap token works from loopback, never as a gateway, and
    never from another address."""
    gateway_routes = [route for route, check in checks.items() if check is require_gateway]
    assert len(gateway_routes) >= 5
    for route in gateway_routes:
        assert _call(net.client(), *route, net.admin_headers).status_code in (401, 403), route
    assert net.client().get("/api/v1/audit", headers=net.admin_headers).status_code == 200
    r = net.client(OUTSIDE).get("/api/v1/audit", headers=net.admin_headers)
    assert r.status_code == 403 and "host only" in r.json()["detail"]


def test_a_revoked_gateway_token_is_refused(net: InProcessHub, tmp_path: Path) -> None:
    net.add_institution("RVK")
    issued = net.admin("POST", "/api/v1/institutions/RVK/gateways", json={"name": "old"})
    gw = {"Authorization": f"Bearer {issued.json()['token']}"}
    client = net.client()
    assert client.get("/api/v1/gateway/config", headers=gw).status_code == 200
    net.admin("POST", f"/api/v1/gateways/{issued.json()['id']}/revoke")
    assert client.get("/api/v1/gateway/config", headers=gw).status_code == 401
    assert client.get("/api/v1/transfers", headers=gw).status_code == 401


def test_portal_pages_send_browsers_to_log_in_and_say_why_not(
    net: InProcessHub,
    checks: dict[tuple[str, str], Callable[..., Any]],
    people: dict[str, Person],
) -> None:
    """The page variant of the check: the walk above covers every page; here is what a
    person sees. No session: the login page, then back. A session without the permission:
    a page saying which permission it needs, with only the pages they may use offered."""
    pages = sorted((method, path) for (method, path), check in checks.items() if _is_page(check))
    assert len(pages) >= 10 and {method for method, _ in pages} == {"GET"}, pages
    r = net.client().get("/portal/audit")
    assert r.status_code == 303 and r.headers["location"] == "/portal/login?next=/portal/audit"
    assert net.client().get("/portal/login").status_code == 200
    clerk = people["clerk"]
    r = clerk.get("/portal/audit")
    assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
    assert "this needs the permission read_audit" in r.text
    assert 'href="/portal/audit"' not in r.text and 'href="/portal/send"' in r.text
    assert clerk.get("/portal/send").status_code == 200
    # What the pages' scripts fetch is checked as the API checks: 401 or 403 in JSON.
    r = net.client().post("/portal/transfers/rows", json={})
    assert r.status_code == 401 and r.json()["detail"] == "authentication required"
    r = clerk.post("/portal/audit/events", json={})
    assert r.status_code == 403 and r.json()["detail"].startswith("this needs the permission")

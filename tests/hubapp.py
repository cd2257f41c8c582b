"""The hub's real application in-process, with a clock the test moves, and people who log in
through the real login steps (password, then TOTP where the rules ask for it)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from imagebridge.accounts import totp
from imagebridge.demo.network import Network
from imagebridge.hub.app import create_app
from imagebridge.hub.auth import CSRF_HEADER, SESSION_COOKIE
from imagebridge.hub.state import Hub
from imagebridge.settings import HubSettings
from imagebridge.transfers.framing import MEDIA_TYPE, encode_files

PASSWORD = "correct horse battery staple 42"
INSIDE = "10.20.30.40"  # within the test institutions' trusted network
OUTSIDE = "203.0.113.7"  # documentation range: never trusted


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class HubClient:
    """A synchronous client calling the app in-process through httpx's ASGI transport, from
    a chosen source address."""

    def __init__(self, app: FastAPI, address: str = "127.0.0.1") -> None:
        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=(address, 40000)),
            base_url="http://hub.test",
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._loop.run_until_complete(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


@dataclass
class Person:
    """A logged-in user: the session cookie and CSRF token go with every request."""

    username: str
    client: HubClient
    cookie: str = ""
    csrf: str = ""
    secret: str = ""
    recovery_codes: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Cookie": f"{SESSION_COOKIE}={self.cookie}", CSRF_HEADER: self.csrf}

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def take(self, response: httpx.Response) -> httpx.Response:
        """Keep the session cookie and CSRF token a login step answered with."""
        if SESSION_COOKIE in response.cookies:
            self.cookie = response.cookies[SESSION_COOKIE]
        if response.status_code == 200 and "csrf_token" in response.json():
            self.csrf = response.json()["csrf_token"]
        return response


class InProcessHub:
    """A hub on a temporary folder with its bootstrap credential, institutions with signed
    agreements, and helpers to make users and log them in."""

    def __init__(self, folder: Path) -> None:
        self.clock = Clock()
        # The same database choice as the hubs the tests start as processes.
        self.databases = Network.databases
        self.database_url = self.databases.create() if self.databases else ""
        self.hub = Hub.open(HubSettings(data_dir=folder, database_url=self.database_url))
        self.hub.clock = self.clock
        self.app = create_app(self.hub)
        self.clients: dict[str, HubClient] = {}
        self.admin_headers = {"Authorization": f"Bearer {self.hub.admin_token}"}
        self.gateway_tokens: dict[str, str] = {}

    def client(self, address: str = "127.0.0.1") -> HubClient:
        if address not in self.clients:
            self.clients[address] = HubClient(self.app, address)
        return self.clients[address]

    def admin(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        r = self.client().request(method, url, headers=self.admin_headers, **kwargs)
        assert r.status_code < 300, (url, r.status_code, r.text)
        return r

    def add_institution(self, code: str, *, agreement: bool = True) -> None:
        self.admin("POST", "/api/v1/institutions", json={"code": code, "name": code})
        self.admin(
            "PUT", f"/api/v1/institutions/{code}/trusted-networks", json={"cidrs": ["10.0.0.0/8"]}
        )
        if agreement:
            self.sign(code)

    def sign(self, code: str) -> None:
        self.admin(
            "POST",
            f"/api/v1/institutions/{code}/agreements",
            json={
                "version": "2026.1",
                "text_sha256": hashlib.sha256(b"agreement").hexdigest(),
                "signatory_name": "A Guardian",
                "signatory_role": "Caldicott Guardian",
                "signed_on": "2026-01-15",
                "consent_party": "sender",
            },
        )

    def gateway_token(self, code: str) -> str:
        if code not in self.gateway_tokens:
            r = self.admin("POST", f"/api/v1/institutions/{code}/gateways", json={"name": "gw"})
            self.gateway_tokens[code] = r.json()["token"]
        return self.gateway_tokens[code]

    def upload(self, sender: str, receiver: str, paths: list[Path]) -> str:
        """The sender's gateway uploads instances into a new transfer to the receiver, through
        the real upload route; returns the transfer's id."""
        headers = {"Authorization": f"Bearer {self.gateway_token(sender)}"}
        client = self.client()
        r = client.post(
            "/api/v1/transfers", headers=headers, json={"receiver": receiver, "origin": "dicom"}
        )
        assert r.status_code == 201, r.text
        tid: str = r.json()["id"]
        items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]
        r = client.post(
            f"/api/v1/transfers/{tid}/instances",
            headers={**headers, "Content-Type": MEDIA_TYPE},
            content=b"".join(encode_files(items)),
        )
        assert r.status_code == 200 and len(r.json()["accepted"]) == len(paths), r.text
        return tid

    def add_user(
        self, code: str, username: str, roles: list[str], *, external: bool = False
    ) -> None:
        self.admin(
            "POST",
            "/api/v1/users",
            json={
                "username": username,
                "password": PASSWORD,
                "institution": code,
                "roles": roles,
                "kind": "external" if external else "staff",
            },
        )

    def code(self, person: Person, later: float = 0) -> str:
        return totp.code_at(person.secret, self.clock().timestamp() + later)

    def log_in(self, username: str, address: str = INSIDE, person: Person | None = None) -> Person:
        """The whole login: password, then enrolment or a code where one is required."""
        person = person or Person(username, self.client(address))
        person.client = self.client(address)
        r = person.take(
            person.client.post(
                "/api/v1/auth/login", json={"username": username, "password": PASSWORD}
            )
        )
        assert r.status_code == 200, r.text
        step = r.json()["second_factor"]
        if step == "enrol":
            r = person.post("/api/v1/auth/totp/enrol")
            assert r.status_code == 200, r.text
            person.secret = r.json()["secret"]
            r = person.take(
                person.post("/api/v1/auth/totp/confirm", json={"code": self.code(person)})
            )
            assert r.status_code == 200, r.text
            person.recovery_codes = r.json()["recovery_codes"]
            # The next code must come from a later time step: the enrolment used this one.
            self.clock.advance(seconds=30)
        elif step == "code":
            r = person.take(person.post("/api/v1/auth/totp", json={"code": self.code(person)}))
            assert r.status_code == 200, r.text
            self.clock.advance(seconds=30)
        return person

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.hub.engine.dispose()
        if self.databases is not None:
            self.databases.drop(self.database_url)

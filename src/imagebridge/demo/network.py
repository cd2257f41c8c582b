"""A whole ImageBridge network on loopback: a hub and gateways, each its own process.

Used by the demo, the tests and the benchmark. Every process it starts it stops, by pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_toml(path: Path, values: dict[str, Any]) -> None:
    """Enough TOML for our settings: scalars, lists of scalars, tables and arrays of tables."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            for k, v in value.items():
                if isinstance(v, dict):
                    tables.append(f"\n[{key}.{k}]")
                    tables += [f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
                else:
                    tables.append(f"{k} = {_toml_value(v)}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                tables.append(f"\n[[{key}]]")
                tables += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines + tables) + "\n")


@dataclass
class GatewayProcess:
    code: str
    ae_title: str
    port: int
    config: Path
    process: subprocess.Popen[bytes]
    log: Path


class HubDatabases(Protocol):
    """A database server that gives each new hub an empty database of its own."""

    def create(self) -> str:
        """Make a database for a new hub (empty, or at the newest schema); answer its URL."""
        ...

    def drop(self, url: str) -> None: ...


@dataclass
class Network:
    # Where new hubs get their database when their settings name none; unset, it is SQLite
    # in the hub's data_dir. (The tests set it to run every hub on PostgreSQL.)
    databases: ClassVar[HubDatabases | None] = None

    root: Path
    hub_port: int = 0
    hub_process: subprocess.Popen[bytes] | None = None
    gateways: dict[str, GatewayProcess] = field(default_factory=dict)
    admin_token: str = ""
    env: dict[str, str] = field(default_factory=dict)
    hub_ca: Path | None = None  # set when the hub's main port speaks HTTPS
    database_url: str = ""  # the hub's when made by `databases`; dropped by `stop`

    @property
    def hub_url(self) -> str:
        scheme = "https" if self.hub_ca else "http"
        return f"{scheme}://127.0.0.1:{self.hub_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client of the hub's main port trusts."""
        return ssl.create_default_context(cafile=self.hub_ca) if self.hub_ca else True

    @property
    def hub_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.root / 'hub' / 'hub.db'}"

    def start_hub(self, **settings: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.hub_port = self.hub_port or free_port()
        if not self.database_url and self.databases is not None:
            self.database_url = self.databases.create()
        if self.database_url:
            settings = {"database_url": self.database_url, **settings}
        config = self.root / "hub.toml"
        write_toml(
            config, {"data_dir": "hub", "host": "127.0.0.1", "port": self.hub_port, **settings}
        )
        self.hub_process = self._spawn(["hub", "--config", str(config)], self.root / "hub.log")
        wait_for_port(self.hub_port, self.hub_process)
        self.admin_token = (self.root / "hub" / "admin-token").read_text().strip()

    def secret_key(self) -> str:
        """The key this hub seals secrets with: another hub process on the same database
        needs it too (IMAGEBRIDGE_HUB_SECRET_KEY)."""
        return (self.root / "hub" / "secret-key").read_text().strip()

    def _spawn(
        self, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "imagebridge", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, **(env or {})},
            )

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.hub_url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=60,
            verify=self.verify,
        )

    def add_institution(self, code: str, name: str, *, agreement: bool = True) -> dict[str, Any]:
        """Add an institution, by default with its data sharing agreement signed."""
        with self.admin() as client:
            r = client.post("/api/v1/institutions", json={"code": code, "name": name})
            r.raise_for_status()
            result: dict[str, Any] = r.json()
        if agreement:
            self.sign_agreement(code)
        return result

    def sign_agreement(self, code: str) -> None:
        text = f"ImageBridge data sharing agreement, version 1, for {code}".encode()
        with self.admin() as client:
            r = client.post(
                f"/api/v1/institutions/{code}/agreements",
                json={
                    "version": "1",
                    "text_sha256": hashlib.sha256(text).hexdigest(),
                    "signatory_name": "Demo Signatory",
                    "signatory_role": "Caldicott Guardian",
                    "signed_on": "2026-01-01",
                    "consent_party": "sender",
                },
            )
            r.raise_for_status()

    def user_token(
        self,
        code: str,
        username: str,
        roles: list[str],
        scopes: list[str],
        password: str = "correct horse battery staple 42",
    ) -> str:
        """An API token of a new user of ``code``, who logs in from a trusted network (so
        without a second factor: ``roles`` must not make an administrator)."""
        with self.admin() as admin:
            admin.put(
                f"/api/v1/institutions/{code}/trusted-networks", json={"cidrs": ["127.0.0.0/8"]}
            ).raise_for_status()
            user = {"username": username, "password": password, "institution": code}
            admin.post("/api/v1/users", json={**user, "roles": roles}).raise_for_status()
        with httpx.Client(base_url=self.hub_url, verify=self.verify, timeout=60) as c:
            r = c.post("/api/v1/auth/login", json={"username": username, "password": password})
            r.raise_for_status()
            session = {"Cookie": f"ib_session={r.cookies['ib_session']}"}
            r = c.post(
                "/api/v1/tokens",
                headers={**session, "X-CSRF-Token": r.json()["csrf_token"]},
                json={"name": username, "scopes": scopes, "days": 1},
            )
            r.raise_for_status()
            token: str = r.json()["token"]
            return token

    def issue_token(self, code: str, name: str = "gateway") -> str:
        with self.admin() as client:
            r = client.post(f"/api/v1/institutions/{code}/gateways", json={"name": name})
            r.raise_for_status()
            token: str = r.json()["token"]
            return token

    def start_gateway(
        self,
        code: str,
        *,
        calling_aes: list[dict[str, Any]],
        pacs: list[dict[str, Any]] | None = None,
        ae_title: str | None = None,
        port: int | None = None,
        **settings: Any,
    ) -> GatewayProcess:
        """Start (or restart, keeping its spool) the gateway of an institution."""
        previous = self.gateways.get(code)
        token = self.issue_token(code) if previous is None else None
        folder = self.root / f"gateway-{code}"
        folder.mkdir(parents=True, exist_ok=True)
        token_env = {"IMAGEBRIDGE_GATEWAY_TOKEN": token} if token else {}
        if previous is not None:
            token_env = {"IMAGEBRIDGE_GATEWAY_TOKEN": (folder / ".token").read_text()}
        else:
            # The token stays out of the config file; the demo keeps it beside, private.
            fd = os.open(folder / ".token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token or "")
        port = port or (previous.port if previous else free_port())
        ae = ae_title or (previous.ae_title if previous else f"IB_GW_{code}")
        config = folder / "gateway.toml"
        write_toml(
            config,
            {
                "data_dir": "data",
                "hub_url": self.hub_url,
                "ae_title": ae,
                "host": "127.0.0.1",
                "port": port,
                **settings,
                "calling_aes": calling_aes,
                "pacs": pacs or [],
            },
        )
        process = self._spawn(
            ["gateway", "--config", str(config)], folder / "gateway.log", token_env
        )
        wait_for_port(port, process)
        gw = GatewayProcess(code, ae, port, config, process, folder / "gateway.log")
        self.gateways[code] = gw
        return gw

    def stop_gateway(self, code: str) -> None:
        stop_process(self.gateways[code].process)

    def stop(self) -> None:
        for gw in self.gateways.values():
            stop_process(gw.process)
        if self.hub_process is not None:
            stop_process(self.hub_process)
        if self.database_url and self.databases is not None:
            self.databases.drop(self.database_url)
            self.database_url = ""


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

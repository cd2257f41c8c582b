"""Shared fixtures: real servers on loopback, free ports, stopped by pid after each test."""

from __future__ import annotations

import glob
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import text

from imagebridge.db import make_engine
from imagebridge.demo.network import Network, free_port
from imagebridge.demo.pacs import MiniPacs
from pg import HubDatabases, PostgresServer
from seaweed import SeaweedServer, weed_path

IN_CI = os.environ.get("CI", "").lower() == "true"
# The hubs' database: "sqlite" (each in its data_dir) or "postgresql" (one server for the
# session, an empty database per hub).
TEST_DATABASE = os.environ.get("IMAGEBRIDGE_TEST_DATABASE", "sqlite")


def require_tool(path: str) -> str:
    """A real peer's executable; under CI its absence fails the test instead of skipping."""
    found = path if os.path.isabs(path) and os.path.exists(path) else shutil.which(path)
    if not found:
        if IN_CI:
            pytest.fail(f"{path} is required under CI")
        pytest.skip(f"{path} not installed")
    return found


def pytest_configure(config: pytest.Config) -> None:
    if TEST_DATABASE not in ("sqlite", "postgresql"):
        raise pytest.UsageError("IMAGEBRIDGE_TEST_DATABASE is sqlite or postgresql")


def pytest_report_header() -> str:
    return f"hub database: {TEST_DATABASE}"


def _pg_tool(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return require_tool(found[-1] if found else name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, started when a test first needs it."""
    server = PostgresServer(_pg_tool("postgres"), _pg_tool("initdb"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def hub_databases(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under IMAGEBRIDGE_TEST_DATABASE=postgresql every hub a test starts gets its own
    database on the session's server."""
    if TEST_DATABASE != "postgresql":
        yield
        return
    Network.databases = HubDatabases(request.getfixturevalue("postgres_server"))
    try:
        yield
    finally:
        Network.databases = None


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedServer]:
    """One SeaweedFS (S3) server for the whole session, started when a test first needs it;
    each test makes its own bucket."""
    server = SeaweedServer(require_tool(weed_path()))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty PostgreSQL database, whichever database the hubs use."""
    url = postgres_server.create()
    yield url
    postgres_server.drop(url)


@pytest.fixture
def database_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database of the kind the hubs use, for tests that open engines themselves."""
    if TEST_DATABASE == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'hub.db'}"


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """A running hub with two institutions, SEG (sender) and RVH (receiver)."""
    net = Network(tmp_path / "net")
    try:
        net.start_hub()
        net.add_institution("SEG", "St Elsewhere General Hospital")
        net.add_institution("RVH", "Riverside Hospital")
        yield net
    finally:
        net.stop()


@pytest.fixture
def mini_pacs(tmp_path: Path) -> Iterator[Callable[[str], MiniPacs]]:
    """Factory for small archives that store what they receive; all stopped at the end."""
    started: list[MiniPacs] = []

    def make(ae_title: str, port: int | None = None) -> MiniPacs:
        pacs = MiniPacs(ae_title, port or free_port(), tmp_path / f"pacs-{ae_title}")
        pacs.start()
        started.append(pacs)
        return pacs

    yield make
    for pacs in started:
        pacs.stop()


def settled_files(folder: Path, count: int, timeout: float = 120) -> list[Path]:
    """The files a PACS wrote into ``folder``, once there are ``count`` and none is still
    being written: DCMTK's storescp writes straight under the final name, so a file may be
    seen empty or cut short. Sizes unchanged over a pause, and none empty, say it is done."""
    deadline = time.monotonic() + timeout
    before: dict[Path, int] = {}
    while time.monotonic() < deadline:
        sizes = {p: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        if len(sizes) >= count and all(sizes.values()) and sizes == before:
            return sorted(sizes)
        before = sizes
        time.sleep(0.3)
    raise AssertionError(f"{count} whole files never arrived in {folder.name}")


def whole_dataset(path: Path, **options: Any) -> Dataset | None:
    """The dataset in a file a PACS wrote, or None while it is still being written."""
    try:
        return dcmread(path, **options)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError):
        return None


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    """Poll ``check`` until it answers something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_transfer(
    net: Network, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120
) -> dict[str, Any]:
    """Poll the hub's transfer list until one transfer satisfies the predicate."""
    deadline = time.monotonic() + timeout
    with net.admin() as admin:
        while time.monotonic() < deadline:
            for t in admin.get("/api/v1/transfers").json():
                if predicate(t):
                    return dict(t)
            time.sleep(0.1)
    raise AssertionError("no transfer reached the expected state in time")


def hub_query(net: Network, statement: str) -> list[tuple[Any, ...]]:
    """Rows straight from a hub's database, whichever kind it is."""
    engine = make_engine(net.hub_database_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(statement))]
    finally:
        engine.dispose()


def audit_events(net: Network, action: str) -> list[dict[str, Any]]:
    with httpx.Client(
        base_url=net.hub_url, headers={"Authorization": f"Bearer {net.admin_token}"}
    ) as c:
        result: list[dict[str, Any]] = c.get("/api/v1/audit", params={"action": action}).json()
        return result

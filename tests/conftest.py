"""Shared fixtures: real servers on loopback, free ports, stopped by pid after each test."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagebridge.demo.network import Network, free_port
from imagebridge.demo.pacs import MiniPacs

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(path: str) -> str:
    """A real peer's executable; under CI its absence fails the test instead of skipping."""
    found = path if os.path.isabs(path) and os.path.exists(path) else shutil.which(path)
    if not found:
        if IN_CI:
            pytest.fail(f"{path} is required under CI")
        pytest.skip(f"{path} not installed")
    return found


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


def audit_events(net: Network, action: str) -> list[dict[str, Any]]:
    with httpx.Client(
        base_url=net.hub_url, headers={"Authorization": f"Bearer {net.admin_token}"}
    ) as c:
        result: list[dict[str, Any]] = c.get("/api/v1/audit", params={"action": action}).json()
        return result

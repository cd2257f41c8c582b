"""A gateway token revoked through one hub process is refused at once by another that had
it cached: the revocation crosses the processes' channel (PostgreSQL NOTIFY), where the
cache alone would keep accepting it for TOKEN_CACHE_SECONDS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import hub_query, wait_until
from imagebridge.demo.network import Network
from imagebridge.hub.tokens import TOKEN_CACHE_SECONDS, TokenCache

LISTENING = "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN imagebridge_inbox'"


@pytest.fixture
def two_hubs(tmp_path: Path, postgres_url: str) -> Iterator[tuple[Network, Network]]:
    hubs = [Network(tmp_path / "one"), Network(tmp_path / "two")]
    try:
        for hub in hubs:
            hub.database_url = postgres_url
            if hub is hubs[1]:  # one network: one key for the secrets both keep
                hub.env = {"IMAGEBRIDGE_HUB_SECRET_KEY": hubs[0].secret_key()}
            hub.start_hub(blob_dir=str(tmp_path / "blobs"))
        hubs[1].admin_token = hubs[0].admin_token
        yield hubs[0], hubs[1]
    finally:
        hubs[1].database_url = ""  # the first drops the database, once both have stopped
        for hub in reversed(hubs):
            hub.stop()


def test_a_token_revoked_through_one_hub_is_refused_by_the_other_at_once(
    two_hubs: tuple[Network, Network],
) -> None:
    one, two = two_hubs
    one.add_institution("RVK", "Revoked Gateways Hospital")
    with one.admin() as admin:
        issued = admin.post("/api/v1/institutions/RVK/gateways", json={"name": "old"}).json()
    wait_until("both hubs listening", lambda: hub_query(one, LISTENING) == [(2,)])
    gateway = {"Authorization": f"Bearer {issued['token']}"}
    with httpx.Client(base_url=two.hub_url, headers=gateway, timeout=30) as client:
        cached = time.monotonic()
        assert client.get("/api/v1/gateway/config").status_code == 200  # now in two's cache
        with one.admin() as admin:
            admin.post(f"/api/v1/gateways/{issued['id']}/revoke").raise_for_status()
        while (answer := client.get("/api/v1/gateway/config")).status_code == 200:
            assert time.monotonic() - cached < TOKEN_CACHE_SECONDS, "accepted from the cache"
            time.sleep(0.02)
        refused = time.monotonic() - cached
    assert answer.status_code == 401, answer.text
    # Well before the cache would have let it go by itself.
    assert refused < TOKEN_CACHE_SECONDS - 1, refused


def test_a_lookup_begun_before_a_revocation_does_not_put_the_token_back() -> None:
    """A request that read the gateway's row just before the revocation committed, and comes
    back after the notice emptied the cache, must not remember what it read."""
    cache = TokenCache()
    before = cache.generation
    cache.forget()  # the revocation's notice arrives meanwhile
    cache.remember("digest", "RVK/old", 7, before)
    assert cache.get("digest") is None
    cache.remember("digest", "RVK/new", 7, cache.generation)
    found = cache.get("digest")
    assert found is not None and found.name == "RVK/new"

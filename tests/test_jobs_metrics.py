"""What operators watch: /health answers while the process lives, /ready says whether the
database (reachable, at the newest schema) and the blob store can serve, /metrics gives
Prometheus the network's figures from the database, to its scraper only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from hubapp import InProcessHub
from imagebridge.db import utcnow
from imagebridge.settings import MetricsSettings
from imagebridge.transfers.models import TransferInstance
from test_retention import gateway_headers, send, study

TOKEN = "a-scrape-token"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[InProcessHub]:
    hub = InProcessHub(tmp_path / "hub")
    hub.clock.now = utcnow()
    hub.hub.settings.metrics = MetricsSettings(scrape_token=TOKEN, cache_seconds=0)  # type: ignore[arg-type]
    for code in ("SEG", "RVH"):
        hub.add_institution(code)
    yield hub
    hub.close()


def test_health_and_readiness(net: InProcessHub) -> None:
    client = net.client("203.0.113.7")  # from anywhere, without credentials
    assert client.get("/health").json() == {"status": "ok"}
    ready = {"status": "ready", "database": "ok", "blob_store": "ok"}
    assert client.get("/ready").json() == ready
    # A database behind the code's schema is not ready (a migration still to run).
    with net.hub.engine.begin() as connection:
        head = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["database"] == "not migrated"
    with net.hub.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    # Nor is a hub whose blob store has gone.
    root: Path = net.hub.blobs.root  # type: ignore[attr-defined]
    root.rename(root.with_name("elsewhere"))
    try:
        r = client.get("/ready")
        assert r.status_code == 503
        assert r.json() == {"status": "not ready", "database": "ok", "blob_store": "unreachable"}
    finally:
        root.with_name("elsewhere").rename(root)
    assert client.get("/ready").status_code == 200


def _scrape(net: InProcessHub) -> dict[str, float]:
    r = net.client().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith(
        "text/plain; version=0.0.4"
    )
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def test_metrics_from_the_database_for_the_scraper_only(net: InProcessHub, tmp_path: Path) -> None:
    client = net.client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers=net.admin_headers).status_code == 401

    send(net, study(tmp_path / "a", "A1"))  # delivered
    send(net, study(tmp_path / "b", "B1"), deliver=False)  # queued
    failed = send(net, study(tmp_path / "c", "C1"), deliver=False)
    m = _scrape(net)
    assert m["imagebridge_transfers_open{status=queued}"] == 2
    assert m["imagebridge_transfers_open{status=receiving}"] == 0
    assert m["imagebridge_transfers_finished{status=delivered}"] == 1
    assert m["imagebridge_instances_received_per_second{}"] == pytest.approx(9 / 60)
    assert m["imagebridge_instances_delivered_per_second{}"] == pytest.approx(3 / 60)
    assert m["imagebridge_delivery_latency_seconds_gcount{}"] == 1
    assert m["imagebridge_delivery_latency_seconds_bucket{le=+Inf}"] == 1
    assert m["imagebridge_delivery_latency_seconds_bucket{le=5.0}"] == 1
    # The arrival notice waits for a worker (none runs here).
    assert m["imagebridge_jobs{kind=notification.arrival,status=queued}"] == 1
    assert m["imagebridge_jobs_overdue_seconds{kind=notification.arrival}"] >= 0
    # A failed delivery shows among the errors.
    with net.hub.sessions() as session:
        items = session.scalars(
            select(TransferInstance.id).where(TransferInstance.transfer_id == failed.id)
        ).all()
    r = net.client().post(
        f"/api/v1/transfers/{failed.id}/deliveries",
        headers=gateway_headers(net, "RVH"),
        json={
            "instances": [{"id": i, "outcome": "failed", "detail": "PACS said no"} for i in items]
        },
    )
    assert r.json()["status"] == "failed"
    m = _scrape(net)
    assert m["imagebridge_transfers_finished{status=failed}"] == 1
    assert m["imagebridge_errors{action=transfer:instances:failed,outcome=failure}"] == 1
    assert m["imagebridge_errors{action=http:request:refused,outcome=refused}"] >= 3

"""Figures for Prometheus, read from the database at scrape time.

Several hub processes serve /metrics behind one address; each counts nothing in its own
memory, so whichever answers gives the same figures. Rates and recent counts are taken
over windows of the audit trail and the transfers table (through their time indexes)
instead of counters kept in memory, which would differ from process to process and restart
at zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from imagebridge.audit.models import AuditEvent
from imagebridge.jobs.models import JobStatus
from imagebridge.jobs.services import depth
from imagebridge.settings import MetricsSettings
from imagebridge.transfers.models import Transfer, TransferStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPEN = (TransferStatus.receiving, TransferStatus.queued, TransferStatus.delivering)
FINISHED = (TransferStatus.delivered, TransferStatus.failed)
RECEIVED, DELIVERED = "transfer:instances:received", "transfer:instances:delivered"
# Delivery latency buckets, seconds: an urgent study within a minute, a routine one in hours.
LATENCY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600)


class DatabaseCollector(Collector):
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: MetricsSettings,
        clock: Callable[[], datetime],
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        with self.sessions() as session:
            yield from self._transfers(session, now)
            yield from self._instances(session, now)
            yield self._latency(session, now)
            yield from self._jobs(session, now)
            yield self._errors(session, now)

    def _transfers(self, session: Session, now: datetime) -> Iterator[Metric]:
        open_ = GaugeMetricFamily(
            "imagebridge_transfers_open", "Transfers not yet finished, by status", labels=["status"]
        )
        counts = _pairs(
            session.execute(
                select(Transfer.status, func.count())
                .where(Transfer.status.in_(OPEN))
                .group_by(Transfer.status)
            )
        )
        for status in OPEN:
            open_.add_metric([status], counts.get(status, 0))
        yield open_
        window = self.settings.window_seconds
        finished = GaugeMetricFamily(
            "imagebridge_transfers_finished",
            f"Transfers delivered or failed in the last {window:g} s, by status",
            labels=["status"],
        )
        counts = _pairs(
            session.execute(
                select(Transfer.status, func.count())
                .where(Transfer.status.in_(FINISHED), Transfer.finished_at >= _ago(now, window))
                .group_by(Transfer.status)
            )
        )
        for status in FINISHED:
            finished.add_metric([status], counts.get(status, 0))
        yield finished

    def _instances(self, session: Session, now: datetime) -> Iterator[Metric]:
        window = self.settings.rate_window_seconds
        sums = _pairs(
            session.execute(
                select(AuditEvent.action, func.sum(AuditEvent.detail["instances"].as_integer()))
                .where(
                    AuditEvent.at >= _ago(now, window), AuditEvent.action.in_((RECEIVED, DELIVERED))
                )
                .group_by(AuditEvent.action)
            )
        )
        for action, name in ((RECEIVED, "received"), (DELIVERED, "delivered")):
            yield GaugeMetricFamily(
                f"imagebridge_instances_{name}_per_second",
                f"Instances {name} per second, over the last {window:g} s",
                value=(sums.get(action) or 0) / window,
            )

    def _latency(self, session: Session, now: datetime) -> Metric:
        """From complete at the hub to delivered, for transfers delivered in the window."""
        window = self.settings.window_seconds
        seconds = [
            (finished - received).total_seconds()
            for received, finished in session.execute(
                select(Transfer.received_at, Transfer.finished_at).where(
                    Transfer.status == TransferStatus.delivered,
                    Transfer.finished_at >= _ago(now, window),
                    Transfer.received_at.is_not(None),
                )
            )
            if received is not None and finished is not None
        ]
        family = GaugeHistogramMetricFamily(
            "imagebridge_delivery_latency_seconds",
            f"Time from a transfer complete at the hub to delivered, for those delivered in the "
            f"last {window:g} s",
        )
        family.add_metric([], _buckets(seconds), sum(seconds))
        return family

    def _jobs(self, session: Session, now: datetime) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "imagebridge_jobs",
            "Jobs queued, running or given up, by kind",
            labels=["kind", "status"],
        )
        waiting = GaugeMetricFamily(
            "imagebridge_jobs_overdue_seconds",
            "How long the longest-waiting due job of each kind has waited for a worker",
            labels=["kind"],
        )
        for d in depth(session):
            jobs.add_metric([d.kind, d.status], d.count)
            if d.status == JobStatus.queued and d.earliest is not None:
                waiting.add_metric([d.kind], max((now - d.earliest).total_seconds(), 0.0))
        yield jobs
        yield waiting

    def _errors(self, session: Session, now: datetime) -> Metric:
        window = self.settings.rate_window_seconds
        family = GaugeMetricFamily(
            "imagebridge_errors",
            f"Failed and refused actions in the last {window:g} s, from the audit trail",
            labels=["action", "outcome"],
        )
        for action, outcome, count in session.execute(
            select(AuditEvent.action, AuditEvent.outcome, func.count())
            .where(AuditEvent.at >= _ago(now, window), AuditEvent.outcome != "success")
            .group_by(AuditEvent.action, AuditEvent.outcome)
        ):
            family.add_metric([action, outcome], count)
        return family


def _pairs(rows: Iterable[Any]) -> dict[Any, Any]:
    """(key, value) rows as a dict (a Result looks like a mapping to dict() itself)."""
    return {key: value for key, value in rows}


def _ago(now: datetime, seconds: float) -> datetime:
    return now - timedelta(seconds=seconds)


def _buckets(values: Iterable[float]) -> list[tuple[str, float]]:
    values = sorted(values)
    out = [
        (repr(float(bound)), float(sum(1 for v in values if v <= bound)))  # le="5.0"
        for bound in LATENCY_BUCKETS
    ]
    return [*out, ("+Inf", float(len(values)))]


class Exposition:
    """The text Prometheus scrapes, computed at most every ``cache_seconds`` per process."""

    def __init__(self, collector: DatabaseCollector, cache_seconds: float) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._text = b""
        self._at = float("-inf")

    def render(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._at >= self.cache_seconds:
                self._text = generate_latest(self.registry)
                self._at = time.monotonic()
            return self._text

"""The kinds of job the hub runs, what runs each, and which recur."""

from __future__ import annotations

from datetime import timedelta

from imagebridge.db import utcnow
from imagebridge.jobs.context import Handler, JobContext
from imagebridge.jobs.services import Claimed, Schedule, prune
from imagebridge.settings import HubSettings

PRUNE = "jobs.prune"
PRUNE_INTERVAL_SECONDS = 3600.0


def prune_finished(context: JobContext, job: Claimed) -> None:
    """Finished jobs are kept a while for inspection, then removed."""
    keep = timedelta(days=context.settings.jobs.keep_finished_days)
    with context.sessions() as session, session.begin():
        prune(session, before=utcnow() - keep)  # jobs finish by the wall clock


def handlers() -> dict[str, Handler]:
    # Imported here: the areas' job modules use the queue themselves.
    from imagebridge.notifications.jobs import ARRIVAL_NOTICE, send_arrival_notice
    from imagebridge.retention.jobs import SWEEP, sweep
    from imagebridge.transfers import alerts

    return {
        ARRIVAL_NOTICE: send_arrival_notice,
        SWEEP: sweep,
        PRUNE: prune_finished,
        alerts.LATE_SWEEP: alerts.sweep,
        alerts.LATE_NOTICE: alerts.send_late_notice,
    }


def schedules(settings: HubSettings) -> list[Schedule]:
    from imagebridge.retention.jobs import SWEEP
    from imagebridge.transfers.alerts import LATE_SWEEP, sweep_interval

    found = [Schedule(PRUNE, PRUNE, PRUNE_INTERVAL_SECONDS)]
    found.append(Schedule(LATE_SWEEP, LATE_SWEEP, sweep_interval(settings.urgent_late_seconds)))
    if settings.retention.enabled:
        found.append(Schedule(SWEEP, SWEEP, settings.retention.sweep_interval_seconds))
    return found

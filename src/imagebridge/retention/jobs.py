"""The retention sweep, a periodic job."""

from __future__ import annotations

import logging

from imagebridge.jobs.context import JobContext
from imagebridge.jobs.services import Claimed
from imagebridge.retention.services import sweep as run_sweep

log = logging.getLogger(__name__)
SWEEP = "retention.sweep"


def sweep(context: JobContext, job: Claimed) -> None:
    if not context.settings.retention.enabled:
        return
    report = run_sweep(context, context.clock())
    log.info(
        "retention: %d transfers examined, %d blobs set aside, %d removed, %d put back; kept %s",
        report.transfers,
        report.set_aside,
        report.removed,
        report.restored,
        dict(report.kept),
    )

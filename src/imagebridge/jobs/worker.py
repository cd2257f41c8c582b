"""A worker: threads that claim jobs and run them, and one that keeps their leases alive and
queues the periodic jobs when they fall due.

Any number of workers, in hub processes or in `imagebridge worker` processes on other
machines, share one queue. A worker that dies loses nothing: its leases run out and the
others take its jobs up.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from imagebridge.db import utcnow
from imagebridge.jobs import kinds
from imagebridge.jobs.context import Handler, JobContext
from imagebridge.jobs.models import JobSchedule
from imagebridge.jobs.services import (
    QUEUED,
    Claimed,
    LeaseLost,
    Schedule,
    claim,
    fail,
    finish,
    hand_back,
    queue_due,
    renew,
)

log = logging.getLogger(__name__)


def default_name() -> str:
    """Host, process and a random suffix: unique even for two workers in one process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    def __init__(
        self,
        context: JobContext,
        *,
        name: str | None = None,
        handlers: Mapping[str, Handler] | None = None,
        schedules: Sequence[Schedule] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.context = context
        # Leases and schedules follow the wall clock, as queueing does; the handlers use the
        # context's clock for what they decide (retention periods).
        self.clock = clock
        self.settings = context.settings.jobs
        self.name = name or default_name()
        self.handlers = dict(kinds.handlers() if handlers is None else handlers)
        self.schedules = list(kinds.schedules(context.settings) if schedules is None else schedules)
        self._stop = threading.Event()
        self._held: dict[int, Claimed] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._next_schedule_check = clock()

    def start(self) -> None:
        targets = [self._run] * self.settings.concurrency + [self._keep]
        for n, target in enumerate(targets):
            thread = threading.Thread(target=target, name=f"jobs-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("job worker %s started (%d at once)", self.name, self.settings.concurrency)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; wait for those running, and hand back any still unfinished."""
        self._stop.set()
        QUEUED.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        with self._lock:
            unfinished = list(self._held.values())
        if unfinished:
            with self.context.sessions() as session, session.begin():
                hand_back(session, unfinished, now=self.clock())

    def run_next(self) -> bool:
        """Claim one job and run it; False if none was due."""
        s = self.settings
        with self.context.sessions() as session, session.begin():
            claimed = claim(
                session,
                self.handlers,
                self.name,
                now=self.clock(),
                lease_seconds=s.lease_seconds,
                max_attempts=s.max_attempts,
            )
        if claimed is None:
            return False
        with self._lock:
            self._held[claimed.id] = claimed
        try:
            self._execute(claimed)
        finally:
            with self._lock:
                self._held.pop(claimed.id, None)
        return True

    def run_until_idle(self, limit: int = 10000) -> int:
        """Run due jobs in this thread until none is left; how many ran."""
        self.queue_periodic()
        ran = 0
        while ran < limit and self.run_next():
            ran += 1
        return ran

    def queue_periodic(self) -> None:
        if not self.schedules:
            return
        now = self.clock()
        with self.context.sessions() as session, session.begin():
            queue_due(session, self.schedules, now=now)
            names = [s.name for s in self.schedules]
            soonest = session.scalar(
                select(func.min(JobSchedule.next_run_at)).where(JobSchedule.name.in_(names))
            )
        self._next_schedule_check = soonest or now

    def _execute(self, claimed: Claimed) -> None:
        s = self.settings
        try:
            self.handlers[claimed.kind](self.context, claimed)
        except LeaseLost as exc:
            log.warning("job %s (%s): %s", claimed.id, claimed.kind, exc)
            return
        except Exception as exc:
            # The reason, not the traceback's data: handlers speak of transfers, not patients.
            error = f"{type(exc).__name__}: {exc}"
            log.debug("job %s (%s) failed", claimed.id, claimed.kind, exc_info=True)
            with self.context.sessions() as session, session.begin():
                outcome = fail(
                    session,
                    claimed,
                    error,
                    now=self.clock(),
                    max_attempts=s.max_attempts,
                    retry_seconds=s.retry_seconds,
                    retry_max_seconds=s.retry_max_seconds,
                )
            log.warning(
                "job %s (%s) attempt %d failed (%s): %s",
                claimed.id,
                claimed.kind,
                claimed.attempt,
                outcome,
                error[:300],
            )
            return
        with self.context.sessions() as session, session.begin():
            finished = finish(session, claimed, now=self.clock())
        if not finished:
            log.warning("job %s (%s) finished after its lease was lost", claimed.id, claimed.kind)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_next():
                    continue
            except OperationalError as exc:  # the database away for a moment: an outage
                log.warning("job worker %s: the database is unavailable (%s)", self.name, exc.orig)
            except Exception:  # the database away for a moment: try again shortly
                log.exception("job worker %s could not claim a job", self.name)
            QUEUED.wait(self.settings.poll_seconds)
            QUEUED.clear()

    def _keep(self) -> None:
        """Renew the leases of running jobs well before they end; queue periodic jobs."""
        s = self.settings
        tick = min(s.poll_seconds, s.lease_seconds / 3)
        while not self._stop.wait(tick):
            try:
                self._renew()
                if self.clock() >= self._next_schedule_check:
                    self.queue_periodic()
            except OperationalError as exc:
                log.warning("job worker %s: the database is unavailable (%s)", self.name, exc.orig)
            except Exception:
                log.exception("job worker %s could not renew its leases", self.name)

    def _renew(self) -> None:
        with self._lock:
            held = list(self._held.values())
        if not held:
            return
        with self.context.sessions() as session, session.begin():
            lost = renew(session, held, now=self.clock(), lease_seconds=self.settings.lease_seconds)
        for job_id in lost:
            log.warning("job %s: the lease ran out; another worker has it now", job_id)


def start_in_process(context: JobContext) -> Worker | None:
    """The worker a hub process runs beside its web application, when the settings ask."""
    if not context.settings.runs_worker:
        return None
    worker = Worker(context)
    worker.start()
    return worker

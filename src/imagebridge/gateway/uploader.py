"""Moves the outbound spool to the hub: in batches, resumably, while studies still arrive."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from imagebridge.gateway.hubclient import HubClient, HubError, HubUnavailable
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.spool import Outbound, Spool
from imagebridge.settings import GatewaySettings

log = logging.getLogger(__name__)
# While a study arrives, a batch waits for this many instances, or for the sender to pause.
MIN_BATCH_INSTANCES = 8
SETTLE_SECONDS = 0.1


class Backoff:
    """Exponential backoff between a first and a longest delay."""

    def __init__(self, first: float, longest: float) -> None:
        self.first, self.longest = first, longest
        self.delay = 0.0

    def failed(self) -> float:
        self.delay = min(self.longest, self.delay * 2 if self.delay else self.first)
        return self.delay

    def succeeded(self) -> None:
        self.delay = 0.0


class Uploader:
    def __init__(
        self, settings: GatewaySettings, spool: Spool, hub: HubClient, journal: Journal
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.hub = hub
        self.journal = journal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self.backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.spool.changed:
            self.spool.changed.notify_all()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
                self.backoff.succeeded()
            except HubUnavailable as exc:
                delay = self.backoff.failed()
                log.warning("hub unavailable (%s); retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                continue
            except Exception:
                log.exception("upload step failed")
                self._stop.wait(self.backoff.failed())
                continue
            if not busy:
                with self.spool.changed:
                    self.spool.changed.wait(timeout=0.2)

    def step(self) -> bool:
        """Do one unit of work; False when there was nothing to do."""
        self.spool.close_stable(
            self.settings.study_stable_seconds, self.settings.study_resend_seconds
        )
        self._forward_journal()
        for t in self.spool.by_priority():
            batch = self.spool.take_batch(
                t,
                self.settings.upload_batch_instances,
                self.settings.upload_batch_bytes,
                min_items=MIN_BATCH_INSTANCES,
                settle=SETTLE_SECONDS,
            )
            missing: set[str] | None = None
            if t.hub_id is None:
                if not batch and not self.spool.ready_to_finish(t):
                    continue  # opened with its first batch: one request less
                missing = self._open_on_hub(t, batch)
                if t.hub_id is None:  # refused for good, set aside
                    return True
            if batch:
                # The study complete and this batch all that is left: it closes the transfer
                # too (one request less; after an outage, every study is sent this way).
                last = self.spool.is_last_batch(t, batch)
                closed = self._upload(t, batch, missing, close=last)
                if closed and self.spool.ready_to_finish(t):
                    self.spool.finish(t)
                return True
            if self.spool.ready_to_finish(t):
                assert t.hub_id is not None
                self.hub.close_transfer(t.hub_id, _declared(t))
                self.spool.finish(t)
                return True
        return False

    def _open_on_hub(self, t: Outbound, batch: list[tuple[str, Path]]) -> set[str] | None:
        """Open the transfer on the hub (``t.hub_id`` stays None if the hub will never take
        it); which of the first batch's blobs the hub lacks, if it said."""
        shas = [sha for sha, _ in batch]
        try:
            made = self.hub.create_transfer(
                receiver=t.destination,
                priority=t.priority,
                origin="dicom",
                calling_ae_title=t.calling_ae_title,
                idempotency_key=t.local_id,
                reason=f"sent by {t.calling_ae_title}",
                sha256=shas,
            )
        except HubError as exc:
            # The hub will never take this transfer (e.g. unknown destination): set aside.
            self.spool.release(t, shas)
            log.error("hub refused a transfer: %s", exc)
            for sha in list(t.pending):
                self.spool.refuse(t, sha, str(exc))
            self.journal.write("transfer:transfer:refused", "failure", reason=str(exc))
            if t.closed:
                self.spool.finish(t)
            return None
        except BaseException:
            self.spool.release(t, shas)
            raise
        self.spool.set_hub_id(t, made["id"])
        # A hub older than this question does not answer it: then it is asked on its own.
        return set(made["missing"]) if "missing" in made else None

    def _upload(
        self,
        t: Outbound,
        batch: list[tuple[str, Path]],
        missing: set[str] | None = None,
        close: bool = False,
    ) -> bool:
        """``missing``: which of the batch's blobs the hub lacks, if already asked; ``close``:
        the batch closes the transfer. Whether the transfer is closed on the hub."""
        assert t.hub_id is not None
        shas = [sha for sha, _ in batch]
        try:
            if missing is None:
                missing = self.hub.missing(shas)
            result = self.hub.upload(
                t.hub_id,
                [(sha, path if sha in missing else None) for sha, path in batch],
                close=close,
                declared=_declared(t),
            )
        except HubError as exc:
            self.spool.release(t, shas)
            log.error("hub refused a batch: %s", exc)
            for sha in shas:
                self.spool.refuse(t, sha, str(exc))
            self.journal.write(
                "transfer:instances:refused", "failure", instances=len(shas), reason=str(exc)
            )
            return False  # still open: closed on its own once nothing is left
        except BaseException:
            # Whatever went wrong, the batch is sent again: an instance left marked in
            # flight would hold its transfer open for ever.
            self.spool.release(t, shas)
            raise
        self.spool.uploaded(t, result["accepted"])
        for refused in result["refused"]:
            self.spool.refuse(t, refused["sha256"], refused["reason"])
        # An answer naming neither (never expected) must not leave the instance in flight.
        self.spool.release(t, shas)
        if close and result.get("status", "receiving") == "receiving":
            # A hub older than closing batches took the batch and left the transfer open.
            self.hub.close_transfer(t.hub_id, _declared(t))
        return close

    def _forward_journal(self) -> None:
        for path in self.journal.pending_batches():
            events = Journal.read(path)
            try:
                for start in range(0, len(events), 500):
                    self.hub.audit(events[start : start + 500])
            except HubError as exc:
                # The hub will never take this file; every later event must not wait behind it.
                log.error("the hub refused journal file %s (%s); set aside", path.name, exc)
                self.journal.set_aside(path)
                continue
            path.unlink()


def _declared(t: Outbound) -> dict[str, Any] | None:
    """What the transfer declares to the hub as it closes (nothing, if closed by a version
    that did not count)."""
    if t.declared is None:
        return None
    return {
        "instances_declared": t.declared,
        "declared_by": t.declared_by,
        "interrupted": t.interrupted,
    }

"""Inbound: take work addressed to this institution from the hub and deliver it to the PACS.

A fetcher leases the next batch (urgent transfers first), downloads and reconciles it,
while a sender C-STOREs the previous batch: the two overlap. While the PACS is down the
batch is handed back and retried with exponential backoff; nothing is lost or skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from imagebridge.dicom.reports import basic_text_sr, encapsulated_pdf, to_part10
from imagebridge.dicom.store_scu import FileToSend, Node, NodeUnavailable, StoreResult, store_files
from imagebridge.gateway.hubclient import HubClient, HubError, HubUnavailable
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.patient_index import IndexedMrnLookup
from imagebridge.gateway.reconcile import apply, plan, reconcile_dataset
from imagebridge.gateway.routing import RoutingTable
from imagebridge.gateway.uploader import Backoff
from imagebridge.settings import GatewaySettings

log = logging.getLogger(__name__)
# A batch is leased, downloaded and sent as one: larger batches cost fewer requests on both
# sides; its bytes bound what the download cache holds for it.
BATCH = 128
BATCH_BYTES = 64 * 1024**2
LONG_POLL_SECONDS = 20.0


@dataclass
class Prepared:
    transfer_id: str
    sender: str
    instances: list[tuple[int, FileToSend]] = field(default_factory=list)
    reports: list[tuple[int, FileToSend, str]] = field(default_factory=list)  # + SOP instance
    failed: list[dict[str, Any]] = field(default_factory=list)
    failed_reports: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    blobs: set[str] = field(default_factory=set)


class Deliverer:
    def __init__(
        self,
        settings: GatewaySettings,
        hub: HubClient,
        routing: RoutingTable,
        journal: Journal,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.routing = routing
        self.journal = journal
        self.cache = settings.data_dir / "inbound" / "blobs"
        self.ready = settings.data_dir / "inbound" / "ready"
        for d in (self.cache, self.ready):
            d.mkdir(parents=True, exist_ok=True)
        self.nodes = [Node(p.ae_title, p.host, p.port) for p in settings.pacs]
        self._queue: queue.Queue[Prepared] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._fetch_loop, name="fetcher", daemon=True),
            threading.Thread(target=self._send_loop, name="sender", daemon=True),
        ]
        self.backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)
        # The fetcher must not find a cached blob that the sender is about to evict; and a
        # blob stays while a prepared batch still sends from it (two may share one).
        self._cache_lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        self._pacs_ok = threading.Event()
        self._pacs_ok.set()
        # Batches leased and not yet reported: releasing leases must wait until none is.
        self._held = 0
        self._held_changed = threading.Condition()
        self._mrn_lookup = IndexedMrnLookup(hub, settings.reconciliation.mrn_map)

    def start(self) -> None:
        if not self.nodes:
            log.warning("no PACS configured: this gateway will not take inbound transfers")
            return
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._pacs_ok.set()
        fetcher, sender = self._threads
        # The sender finishes the batch it is storing. The fetcher is mostly blocked in the
        # hub's long poll (up to LONG_POLL_SECONDS): not worth waiting for, since whatever it
        # has leased but not handed over expires on the hub and is leased again.
        if sender.is_alive():
            sender.join(timeout=LONG_POLL_SECONDS + 10)
        if fetcher.is_alive():
            fetcher.join(timeout=1.0)

    # -- fetching ---------------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        hub_backoff = Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        released = False
        while not self._stop.is_set():
            if not released:
                # Work leased by this gateway before a restart, or by an answer that never
                # arrived (the hub went down mid-reply), would wait for its lease to expire.
                if not self._none_held():
                    continue
                try:
                    self.hub.release_leases()
                    released = True
                except (HubUnavailable, HubError) as exc:
                    self._stop.wait(hub_backoff.failed())
                    log.warning("cannot reach the hub (%s)", exc)
                    continue
            # While the PACS is down, wait instead of leasing work that cannot be delivered.
            self._pacs_ok.wait()
            try:
                work = self.hub.work(BATCH, LONG_POLL_SECONDS, BATCH_BYTES)
                hub_backoff.succeeded()
            except (HubUnavailable, HubError) as exc:
                delay = hub_backoff.failed()
                log.warning("cannot reach the hub for work (%s); retrying in %.1f s", exc, delay)
                released = False
                self._stop.wait(delay)
                continue
            if work["transfer"] is None:
                continue
            try:
                with self._cache_lock:
                    prepared = self._prepare(work)
            except (HubUnavailable, HubError) as exc:
                log.warning("download failed (%s); the batch goes back to the hub", exc)
                released = False
                self._stop.wait(hub_backoff.failed())
                continue
            self._hold(1)
            while not self._stop.is_set():
                try:
                    self._queue.put(prepared, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def _hold(self, change: int) -> None:
        with self._held_changed:
            self._held += change
            self._held_changed.notify_all()

    def _none_held(self) -> bool:
        with self._held_changed:
            return self._held_changed.wait_for(lambda: self._held == 0, timeout=0.5)

    def _prepare(self, work: dict[str, Any]) -> Prepared:
        transfer = work["transfer"]
        p = Prepared(transfer["id"], transfer["sender"])
        wanted = {i["sha256"] for i in work["instances"]}
        wanted |= {r["sha256"] for r in work["reports"]} | {
            r["template_sha256"] for r in work["reports"]
        }
        p.blobs = wanted
        missing = [sha for sha in wanted if not (self.cache / f"{sha}.dcm").exists()]
        if missing:
            self.hub.download(missing, self.cache)
        policy = self.settings.reconciliation
        me = self.routing.institution or self.settings.ae_title
        for item in work["instances"]:
            src = self.cache / f"{item['sha256']}.dcm"
            try:
                # Only the dataset's start changes: it is sent from memory, then the rest
                # straight from the cached blob.
                rewritten = reconcile_dataset(
                    src,
                    sender_code=p.sender,
                    receiver_code=me,
                    policy=policy,
                    mrn_lookup=self._mrn_lookup,
                )
            except Exception as exc:
                log.error("reconciliation failed: %s", type(exc).__name__)
                p.failed.append(
                    {
                        "id": item["id"],
                        "outcome": "failed",
                        "detail": f"reconciliation failed: {type(exc).__name__}",
                    }
                )
                continue
            to_send = FileToSend(
                src,
                item["sop_class_uid"],
                item["transfer_syntax_uid"],
                head=rewritten.head,
                offset=rewritten.offset,
                sop_instance_uid=rewritten.meta.sop_instance_uid,
            )
            p.instances.append((item["id"], to_send))
        self._in_use.update(p.blobs)
        for report in work["reports"]:
            try:
                p.reports.append(self._prepare_report(p, report))
            except (ValueError, OSError) as exc:
                p.failed_reports.append(
                    {
                        "id": report["id"],
                        "outcome": "failed",
                        "detail": f"report not deliverable: {exc}",
                    }
                )
        return p

    def _prepare_report(self, p: Prepared, report: dict[str, Any]) -> tuple[int, FileToSend, str]:
        template = dcmread(self.cache / f"{report['template_sha256']}.dcm", stop_before_pixels=True)
        policy = self.settings.reconciliation
        me = self.routing.institution or self.settings.ae_title
        apply(
            template,
            plan(
                template,
                sender_code=p.sender,
                receiver_code=me,
                policy=policy,
                mrn_lookup=self._mrn_lookup,
            ),
        )
        content = (self.cache / f"{report['sha256']}.dcm").read_bytes()
        if report["media_type"] == "application/pdf":
            ds = encapsulated_pdf(content, template, title=report["title"])
        else:
            ds = basic_text_sr(content.decode("utf-8"), template, title=report["title"])
        # The same report delivered twice must be the same instance in the PACS.
        ds.SeriesInstanceUID = generate_uid(
            entropy_srcs=[p.transfer_id, str(report["id"]), "series"]
        )
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[p.transfer_id, str(report["id"])])
        dst = self.ready / f"{p.transfer_id}-report-{report['id']}.dcm"
        dst.write_bytes(to_part10(ds))
        p.files.append(dst)
        return (
            report["id"],
            FileToSend(dst, str(ds.SOPClassUID), "1.2.840.10008.1.2.1"),
            str(ds.SOPInstanceUID),
        )

    # -- sending ----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                prepared = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self._deliver(prepared)
            self._hold(-1)

    def _deliver(self, p: Prepared) -> None:
        files = [f for _, f in p.instances] + [f for _, f, _ in p.reports]
        results: list[StoreResult] = [StoreResult("delivered")] * len(files)
        try:
            for node in self.nodes:
                node_results = store_files(node, self.settings.ae_title, files) if files else []
                # An instance is delivered when every configured node has it.
                results = [_worse(a, b) for a, b in zip(results, node_results, strict=True)]
            self.backoff.succeeded()
            self._pacs_ok.set()
        except NodeUnavailable as exc:
            results = [StoreResult("retry", f"PACS unavailable: {exc}")] * len(files)
        n = len(p.instances)
        instances = p.failed + [
            {"id": item_id, "outcome": r.outcome, "detail": r.detail}
            for (item_id, _), r in zip(p.instances, results[:n], strict=True)
        ]
        reports = p.failed_reports + [
            {"id": rid, "outcome": r.outcome, "detail": r.detail, "sop_instance_uid": uid}
            for (rid, _, uid), r in zip(p.reports, results[n:], strict=True)
        ]
        self._report(p, instances, reports)
        for path in p.files:
            path.unlink(missing_ok=True)
        if any(r.outcome == "retry" for r in results):
            self._release(p, evict=False)  # kept for the retry
            self._pacs_ok.clear()
            delay = self.backoff.failed()
            log.warning("PACS delivery deferred; retrying in %.1f s", delay)
            self._hand_back_queued()
            self._stop.wait(delay)
            # The fetcher may have queued the batch it held when the first hand-back made
            # room: leased before a more urgent transfer was free, it must not go first.
            self._hand_back_queued()
            self._pacs_ok.set()
        else:
            self._release(p, evict=True)

    def _report(
        self, p: Prepared, instances: list[dict[str, Any]], reports: list[dict[str, Any]]
    ) -> None:
        while not self._stop.is_set():
            try:
                self.hub.deliveries(p.transfer_id, instances, reports)
                return
            except HubUnavailable as exc:
                log.warning("cannot report deliveries yet (%s)", exc)
                self._stop.wait(1.0)
            except HubError as exc:
                log.error("hub refused a delivery report: %s", exc)
                return

    def _hand_back_queued(self) -> None:
        try:
            queued = self._queue.get_nowait()
        except queue.Empty:
            return
        self._report(
            queued,
            [
                {"id": i, "outcome": "retry", "detail": "PACS unavailable"}
                for i, _ in queued.instances
            ],
            [
                {"id": i, "outcome": "retry", "detail": "PACS unavailable"}
                for i, _, _ in queued.reports
            ],
        )
        for path in queued.files:
            path.unlink(missing_ok=True)
        self._release(queued, evict=False)
        self._hold(-1)

    def _release(self, p: Prepared, *, evict: bool) -> None:
        """A batch is done with its blobs. Delivered ones leave the cache unless another batch
        still needs them; a report's template is fetched again if needed."""
        with self._cache_lock:
            self._in_use.subtract(p.blobs)
            for sha in p.blobs:
                if self._in_use[sha] <= 0:
                    del self._in_use[sha]
                    if evict:
                        (self.cache / f"{sha}.dcm").unlink(missing_ok=True)


_RANK = {"delivered": 0, "retry": 1, "failed": 2}


def _worse(a: StoreResult, b: StoreResult) -> StoreResult:
    return a if _RANK[a.outcome] >= _RANK[b.outcome] else b

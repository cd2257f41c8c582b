"""A gateway process: the DICOM SCP, the uploader and the deliverer, around one spool; the
query/retrieve SCP and the worker for the hub's tasks beside them."""

from __future__ import annotations

import logging
import threading

from imagebridge.gateway.completeness import StudyCounts
from imagebridge.gateway.delivery import Deliverer
from imagebridge.gateway.hubclient import HubClient, HubError, HubUnavailable
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.pacs_scu import MoveInbox
from imagebridge.gateway.patient_index import IndexedMrnLookup
from imagebridge.gateway.qrscp import QueryRetrieveSCP
from imagebridge.gateway.routing import RoutingTable
from imagebridge.gateway.scp import StorageSCP
from imagebridge.gateway.spool import Spool
from imagebridge.gateway.tasks import TaskWorker
from imagebridge.gateway.uploader import Uploader
from imagebridge.pki.tls import hub_client_context
from imagebridge.settings import GatewaySettings

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        if not settings.token:
            raise ValueError(
                "the gateway needs its token (token = ... or IMAGEBRIDGE_GATEWAY_TOKEN)"
            )
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(settings.data_dir / "journal")
        self.spool = Spool(settings.data_dir / "spool", settings.spool_min_free_bytes)
        self.routing = RoutingTable(settings.data_dir / "routes.json")
        tls = hub_client_context(settings)
        self.hub = HubClient(settings.hub_url, settings.token, tls=tls)
        fetches = MoveInbox()
        self.scp = StorageSCP(settings, self.spool, self.routing, self.journal, fetches)
        self.uploader = Uploader(settings, self.spool, self.hub, self.journal)
        # Studies cut off by an aborted association: the PACS's own count says when complete.
        self.study_counts = (
            StudyCounts(settings, settings.pacs_qr, self.spool) if settings.pacs_qr else None
        )
        self.deliverer = Deliverer(
            settings,
            HubClient(settings.hub_url, settings.token, tls=tls),
            self.routing,
            self.journal,
        )

        # Query/retrieve: each operation opens its own client (their bulk downloads must not
        # share a connection); patient identity is looked up as delivery does.
        def client() -> HubClient:
            return HubClient(settings.hub_url, settings.token, tls=tls)

        lookup = IndexedMrnLookup(client(), settings.reconciliation.mrn_map)
        self.qr = QueryRetrieveSCP(
            settings, client, self.routing, self.journal, self.scp.caller, lookup
        )
        self.scp.services += self.qr.attach(self.scp.ae)
        self.scp.finder = self.qr
        self.tasks = TaskWorker(settings, client, self.journal, fetches, lookup)
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="routes", daemon=True)
        self.port = 0

    def refresh_routes(self) -> bool:
        try:
            self.routing.update(self.hub.config())
            return True
        except (HubUnavailable, HubError) as exc:
            log.warning("routing table not refreshed (%s); using the cached one", exc)
            return False

    def start(self) -> int:
        self.refresh_routes()
        self.port = self.scp.start()
        self.uploader.start()
        if self.study_counts is not None:
            self.study_counts.start()
        self.deliverer.start()
        self.tasks.start()
        self._refresher.start()
        log.info(
            "gateway %s listening on %s:%d", self.settings.ae_title, self.settings.host, self.port
        )
        return self.port

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.settings.routes_refresh_seconds):
            self.refresh_routes()

    def stop(self) -> None:
        """Stop taking new associations, then let the workers finish their current step."""
        self._stop.set()
        self.scp.stop(self.settings.shutdown_grace_seconds)
        self.uploader.stop()
        if self.study_counts is not None:
            self.study_counts.stop()
        self.deliverer.stop()
        self.tasks.stop()
        self.qr.stop()
        self.hub.close()

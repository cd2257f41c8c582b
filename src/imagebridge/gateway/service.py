"""A gateway process: the DICOM SCP, the uploader and the deliverer, around one spool."""

from __future__ import annotations

import logging
import threading

from imagebridge.gateway.delivery import Deliverer
from imagebridge.gateway.hubclient import HubClient, HubError, HubUnavailable
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.routing import RoutingTable
from imagebridge.gateway.scp import StorageSCP
from imagebridge.gateway.spool import Spool
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
        self.scp = StorageSCP(settings, self.spool, self.routing, self.journal)
        self.uploader = Uploader(settings, self.spool, self.hub, self.journal)
        self.deliverer = Deliverer(
            settings,
            HubClient(settings.hub_url, settings.token, tls=tls),
            self.routing,
            self.journal,
        )
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
        self.deliverer.start()
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
        self.scp.stop()
        self.uploader.stop()
        self.deliverer.stop()
        self.hub.close()

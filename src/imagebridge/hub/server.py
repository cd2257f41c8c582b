"""Running the hub's web application under uvicorn."""

from __future__ import annotations

import threading

import uvicorn

from imagebridge.audit.forwarder import start_forwarder
from imagebridge.hub.app import create_app
from imagebridge.hub.state import Hub
from imagebridge.settings import HubSettings


def make_server(settings: HubSettings, log_level: str = "warning") -> uvicorn.Server:
    hub = Hub.open(settings)
    # The audit trail goes to the audit repository, if one is configured.
    start_forwarder(settings.audit_repository, hub.engine, hub.sessions)
    config = uvicorn.Config(
        create_app(hub),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,  # request paths are fine, but keep the log about the service
        timeout_keep_alive=75,
        # Gateways' long polls would hold a stop for up to inbox_wait_seconds; an upload cut
        # short here is safe: the gateway still holds it in its spool and sends it again.
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


class HubThread:
    """A hub in a background thread of this process (demo and tests)."""

    def __init__(self, settings: HubSettings) -> None:
        self.server = make_server(settings)
        self.thread = threading.Thread(target=self.server.run, name="hub", daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the hub failed to start")
            self.thread.join(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

"""Running the hub's web application under uvicorn: one listener for people, one for gateways.

With transport security configured, the main port speaks HTTPS, and ``gateway_port`` is a
second listener that requires a client certificate from the network's CA (mutual TLS).
Browsers have no client certificates, so people and gateways meet the hub on different
ports; once the gateway listener exists, gateway tokens are refused on the main port.

On the gateway listener every request is checked against its connection's certificate:
not revoked since the handshake (a keep-alive connection outlives a revocation), and
carrying the token of the gateway the certificate names, so a stolen token is no use
without its gateway's key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import threading
from typing import Any

import uvicorn
from cryptography import x509
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from imagebridge.audit.forwarder import start_forwarder
from imagebridge.audit.services import record
from imagebridge.hub.app import create_app
from imagebridge.hub.state import Hub
from imagebridge.institutions.services import authenticate_gateway, token_digest
from imagebridge.pki.names import GatewayName, gateway_of
from imagebridge.pki.tls import GatewayListenerTLS, TLSConfigError, server_context
from imagebridge.settings import HubSettings

log = logging.getLogger(__name__)

GATEWAY_TOKEN_PREFIX = "ibg_"
TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot start


def make_server(settings: HubSettings, log_level: str = "warning") -> uvicorn.Server:
    # TLS settings first: a bad file stops the hub before it opens anything.
    gateway_tls = _gateway_tls(settings)
    main_context = (
        server_context(settings.tls_cert, settings.tls_key)
        if settings.tls_cert is not None and settings.tls_key is not None
        else None
    )
    hub = Hub.open(settings)
    # The audit trail goes to the audit repository, if one is configured.
    start_forwarder(settings.audit_repository, hub.engine, hub.sessions)
    app = create_app(hub)
    common: dict[str, Any] = {
        "host": settings.host,
        "log_level": log_level,
        "access_log": False,  # request paths are fine, but keep the log about the service
        "timeout_keep_alive": 75,
        # Gateways' long polls would hold a stop for up to inbox_wait_seconds; an upload cut
        # short here is safe: the gateway still holds it in its spool and sends it again.
        "timeout_graceful_shutdown": 5,
    }
    config = uvicorn.Config(
        app if gateway_tls is None else PeopleListener(app, hub),
        port=settings.port,
        ssl_context_factory=_fixed(main_context) if main_context else None,
        **common,
    )
    if gateway_tls is None:
        return uvicorn.Server(config)
    assert settings.gateway_port is not None
    gateway_config = uvicorn.Config(
        app,
        port=settings.gateway_port,
        http=_gateway_protocol(hub, gateway_tls),
        ssl_context_factory=_fixed(gateway_tls.context),
        lifespan="off",  # the main listener runs the application's lifespan
        **common,
    )
    return HubServer(config, gateway_config)


def _gateway_tls(settings: HubSettings) -> GatewayListenerTLS | None:
    if settings.tls_cert is not None and settings.tls_key is None:
        raise TLSConfigError("tls_cert needs tls_key")
    if settings.gateway_port is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None or settings.tls_client_ca is None:
        raise TLSConfigError("gateway_port needs tls_cert, tls_key and tls_client_ca")
    return GatewayListenerTLS(
        settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_crl
    )


def _fixed(context: ssl.SSLContext) -> Any:
    return lambda config, default: context


class HubServer(uvicorn.Server):
    """uvicorn with a second listener, for gateways, sharing the application and its state."""

    def __init__(self, config: uvicorn.Config, gateway_config: uvicorn.Config) -> None:
        super().__init__(config)
        self.gateway_config = gateway_config

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        gateway = self.gateway_config
        if not gateway.loaded:
            gateway.load()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            protocol: asyncio.Protocol = gateway.http_protocol_class(  # type: ignore[call-arg]
                config=gateway,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )
            return protocol

        try:
            server = await asyncio.get_running_loop().create_server(
                create_protocol, host=gateway.host, port=gateway.port, ssl=gateway.ssl
            )
        except OSError as exc:
            log.error("gateway listener: %s", exc)
            await self.shutdown()
            sys.exit(STARTUP_FAILURE)
        # Closed and awaited with the main listener on shutdown.
        self.servers.append(server)


def _gateway_protocol(hub: Hub, tls: GatewayListenerTLS) -> type[asyncio.Protocol]:
    class GatewayListenerProtocol(HttpToolsProtocol):
        """Each connection's requests go through a check of that connection's certificate."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            version = ssl_object.version() if ssl_object is not None else None
            client = self.client[0] if self.client else ""
            self.app = GatewayConnection(self.app, hub, tls, der, version, client)

    return GatewayListenerProtocol


async def _respond(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"detail": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        # The next attempt must come on a new connection, through a new handshake.
        headers += [(b"www-authenticate", b"Bearer"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _refusal(hub: Hub, scope: Scope, reason: str, actor: str, detail: dict[str, Any]) -> None:
    client = scope.get("client")
    with hub.sessions() as session, session.begin():
        record(
            session,
            "tls:certificate:refused",
            "refused",
            actor_type="gateway" if actor else "unknown",
            actor=actor,
            source_address=client[0] if client else "",
            detail={
                "reason": reason,
                "method": scope.get("method", ""),
                "path": scope.get("path", ""),  # no query string: it may name a study
                **detail,
            },
        )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _has_cookie(scope: Scope) -> bool:
    return any(name == b"cookie" for name, _ in scope.get("headers", []))


class PeopleListener:
    """The main port when gateways have their own: a gateway token here is refused, so a
    stolen token is no use without the gateway's certificate.

    Refusals of credentials are 401: a gateway keeps its spool and tries again, until an
    operator has fixed its certificate or its hub_url.
    """

    def __init__(self, app: ASGIApp, hub: Hub) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (_bearer(scope) or "").startswith(GATEWAY_TOKEN_PREFIX):
            reason = "gateways connect through the hub's mutual-TLS gateway listener"
            await run_in_threadpool(_refusal, self.hub, scope, reason, "", {})
            await _respond(send, 401, reason)
            return
        await self.app(scope, receive, send)


class GatewayConnection:
    """The application as one connection of the gateway listener sees it."""

    def __init__(
        self,
        app: ASGIApp,
        hub: Hub,
        tls: GatewayListenerTLS,
        der: bytes | None,
        version: str | None,
        client: str,
    ) -> None:
        self.app = app
        self.hub = hub
        self.tls = tls
        certificate = x509.load_der_x509_certificate(der) if der else None
        self.serial = certificate.serial_number if certificate else 0
        self.gateway: GatewayName | None = gateway_of(certificate) if certificate else None
        # The ASGI TLS extension, for routes that want to know who is on the other end.
        self.extension = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": certificate.subject.rfc4514_string() if certificate else None,
            "client_cert_error": None,
            "tls_version": TLS_VERSIONS.get(version or ""),
            "cipher_suite": None,
        }
        # Digests of tokens already found to belong to this certificate's gateway (requests
        # of one connection run one at a time, on the event loop).
        self._bound: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # gateways speak plain HTTP
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["extensions"] = {**(scope.get("extensions") or {}), "tls": self.extension}
        refusal = await self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, reason = refusal
        detail = {"serial": f"{self.serial:X}"}
        await run_in_threadpool(_refusal, self.hub, scope, reason, str(self.gateway or ""), detail)
        await _respond(send, status, reason)

    async def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, reason) if the request may not go on: 401 for the gateway's credentials,
        403 for callers that are no gateway."""
        if self.gateway is None:
            return 401, "the client certificate names no gateway"
        if self.tls.revoked(self.serial):
            return 401, "the client certificate has been revoked"
        token = _bearer(scope)
        if token is None and not _has_cookie(scope):
            return None  # no credentials: the application answers (401, or a public route)
        if token is None or not token.startswith(GATEWAY_TOKEN_PREFIX):
            return 403, "the gateway listener serves gateways only"
        digest = token_digest(token)
        if digest in self._bound:
            return None
        owner = await run_in_threadpool(self._owner, token)
        if owner is None:
            return None  # an unknown or revoked token: the application answers 401
        if owner != self.gateway:
            return 401, f"the token is not that of the certificate's gateway {self.gateway}"
        self._bound.add(digest)
        return None

    def _owner(self, token: str) -> GatewayName | None:
        with self.hub.sessions() as session:
            gateway = authenticate_gateway(session, token)
            if gateway is None:
                return None
            return GatewayName(gateway.institution.code, gateway.name)


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

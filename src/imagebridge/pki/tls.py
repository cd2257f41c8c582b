"""SSL contexts: the hub's listeners, the gateway's HTTPS client and the DICOM TLS SCP."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from imagebridge.settings import GatewaySettings

log = logging.getLogger(__name__)

# Warn this long before the CRL's next update: past it, every client certificate is refused.
CRL_WARNING = timedelta(days=30)


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used, or settings that do not fit."""


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot use certificate {cert} with key {key}: {exc}") from None


def _load_trust(context: ssl.SSLContext, path: Path) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load {path}: {exc}") from None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """HTTPS for people: the hub proves who it is; browsers bring no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    return context


def mutual_server_context(
    cert: Path, key: Path, client_ca: Path, crl: Path | None = None
) -> ssl.SSLContext:
    """The gateways' listener: a client certificate from the network's CA, not revoked."""
    context = server_context(cert, key)
    # Gateways are ours and speak TLS 1.3; there are no old clients to wait for.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # No session tickets: a resumed session skips the certificate checks, and a revocation
    # must hold for every new connection.
    context.num_tickets = 0
    context.verify_mode = ssl.CERT_REQUIRED
    _load_trust(context, client_ca)
    if crl is not None:
        _load_trust(context, crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


class GatewayListenerTLS:
    """The mutual-TLS listener's trust, following the CRL file as the CA rewrites it.

    A context keeps every CRL loaded into it, and OpenSSL picks the one with the latest
    lastUpdate, whole seconds compared: a CRL signed in the same second as the one loaded
    before it is ignored (measured with OpenSSL 3.0). So each change of the file builds a
    new context, and the listener's own context hands each new handshake to the newest
    one from its SNI callback, which OpenSSL calls for every ClientHello, SNI or not.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path, crl: Path | None) -> None:
        self._files = (cert, key, client_ca)
        self.crl = crl
        try:
            self._ca = x509.load_pem_x509_certificate(client_ca.read_bytes())
        except (OSError, ValueError) as exc:
            raise TLSConfigError(f"cannot read the client CA {client_ca}: {exc}") from None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        if crl is not None:
            self._stamp = _stamp(crl)
            self._revoked = self._read_crl(crl)
        self.context = mutual_server_context(cert, key, client_ca, crl)
        self._current = self.context
        self.context.sni_callback = self._on_client_hello

    def revoked(self, serial: int) -> bool:
        """Whether the CA's current CRL lists this serial (for connections already open)."""
        self._refresh()
        return serial in self._revoked

    def _on_client_hello(
        self,
        connection: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        own: ssl.SSLContext,
    ) -> None:
        current = self._refresh()
        if current is not own:
            connection.context = current

    def _refresh(self) -> ssl.SSLContext:
        if self.crl is None:
            return self._current
        try:
            stamp = _stamp(self.crl)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return self._current
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload()
        return self._current

    def _reload(self) -> None:
        assert self.crl is not None
        try:
            revoked = self._read_crl(self.crl)
            context = mutual_server_context(*self._files, self.crl)
        except TLSConfigError as exc:
            log.error("CRL not reloaded, the previous one stays in force: %s", exc)
            return
        self._current, self._revoked = context, revoked
        log.info("CRL reloaded: %d certificates revoked", len(revoked))

    def _read_crl(self, path: Path) -> frozenset[int]:
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TLSConfigError(f"cannot read the CRL {path}: {exc}") from None
        issuer_key = cast(CertificateIssuerPublicKeyTypes, self._ca.public_key())
        if crl.issuer != self._ca.subject or not crl.is_signature_valid(issuer_key):
            raise TLSConfigError(f"the CRL {path} is not signed by the client CA")
        next_update = crl.next_update_utc
        if next_update is not None:
            left = next_update - datetime.now(UTC)
            if left <= timedelta(0):
                log.error(
                    "the CRL expired on %s: every gateway is refused until "
                    "`imagebridge ca crl` signs a new one",
                    next_update.date(),
                )
            elif left < CRL_WARNING:
                log.warning(
                    "the CRL expires on %s: sign a new one with `imagebridge ca crl`",
                    next_update.date(),
                )
        return frozenset(entry.serial_number for entry in crl)


def _stamp(path: Path) -> tuple[int, int, int]:
    # The CA replaces the file by rename, so a new CRL is a new inode.
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# -- the gateway's side ----------------------------------------------------------------------


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """HTTPS to the hub: trust only the network's CA when given, show our own certificate."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the CA {ca}: {exc}") from None
    if cert is not None:
        _load_chain(context, cert, key)
    return context


def hub_client_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The context for the gateway's HubClient; None when the hub is reached over http."""
    if not settings.hub_url.lower().startswith("https://"):
        if settings.hub_ca or settings.hub_tls_cert:
            raise TLSConfigError("hub_ca and hub_tls_cert need an https:// hub_url")
        return None
    return client_context(settings.hub_ca, settings.hub_tls_cert, settings.hub_tls_key)


class _DeferredHandshake(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in its accept loop, where a handshake would let
    one silent client hold up every other. Deferred, it happens in the association's own
    thread (see `handshake`), under a timeout."""

    timeout: float | None = None

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        sock.settimeout(self.timeout)
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def dicom_scp_context(
    settings: GatewaySettings, timeout: float | None = 60
) -> ssl.SSLContext | None:
    """DICOM TLS (PS3.15 B, BCP 195: TLS 1.2 or later) for the gateway's SCP, if configured."""
    if settings.dicom_tls_cert is None:
        return None
    context = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    context.timeout = timeout
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, settings.dicom_tls_cert, settings.dicom_tls_key)
    if settings.dicom_tls_ca is not None:
        _load_trust(context, settings.dicom_tls_ca)
        required = settings.dicom_tls_require_client_cert
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    elif settings.dicom_tls_require_client_cert:
        raise TLSConfigError("dicom_tls_require_client_cert needs dicom_tls_ca")
    return context


def handshake(sock: socket.socket) -> str | None:
    """Complete a deferred server handshake; the reason it failed, or None.

    Done before the DICOM layer reads, so that a caller refused for its certificate (or
    for not speaking TLS) is answered by closing the connection and recorded with its
    reason, instead of surfacing as a read error deep in the DICOM layer. A peer that
    leaves without a word (a port probe) is closed quietly: there is nothing to record.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        sock.do_handshake()
    except ssl.SSLEOFError:
        sock.close()
        return None
    except ssl.SSLCertVerificationError as exc:
        reason = f"TLS: client certificate refused ({exc.verify_message})"
    except ssl.SSLError as exc:
        reason = f"TLS: handshake failed ({exc.reason or exc})"
    except OSError as exc:
        reason = f"TLS: handshake failed ({exc.strerror or type(exc).__name__})"
    else:
        return None
    sock.close()
    return reason

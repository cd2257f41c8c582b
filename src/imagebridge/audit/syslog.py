"""Syslog messages (RFC 5424) and their transports: TLS (RFC 5425) and UDP (RFC 5426)."""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

BOM = b"\xef\xbb\xbf"
FACILITY_SECURITY = 10  # security/authorization messages, as IHE ATNA asks
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
MSGID_ATNA = "IHE+RFC-3881"
APP_NAME = "imagebridge"
# Largest UDP payload; RFC 5426 receivers must take 480 bytes and should take 2048.
UDP_MAX = 65507


def _header_field(value: str, limit: int) -> str:
    # Header fields are printable US-ASCII without spaces, or "-" when there is nothing.
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def message(
    body: bytes,
    *,
    at: datetime,
    sequence_id: int | None = None,
    severity: int = SEVERITY_NOTICE,
    hostname: str | None = None,
    procid: str = "-",
    msgid: str = MSGID_ATNA,
) -> bytes:
    """One SYSLOG-MSG: header, structured data, then the UTF-8 body marked by a BOM.

    The `meta` element's sequenceId lets the repository notice a message that never came.
    """
    stamp = at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    structured = "-"
    if sequence_id is not None and 1 <= sequence_id <= 2147483647:
        structured = f'[meta sequenceId="{_sd_value(str(sequence_id))}"]'
    header = " ".join(
        (
            f"<{FACILITY_SECURITY * 8 + severity}>1",
            stamp,
            _header_field(hostname or socket.gethostname(), 255),
            APP_NAME,
            _header_field(procid, 128),
            _header_field(msgid, 32),
            structured,
        )
    )
    return header.encode("ascii") + b" " + BOM + body


def octet_counted(messages: Sequence[bytes]) -> bytes:
    """RFC 5425 framing: each message preceded by its length in octets and a space."""
    return b"".join(b"%d %s" % (len(m), m) for m in messages)


class Transport(Protocol):
    def send(self, messages: Sequence[bytes]) -> None:
        """Send in order; raise OSError if the repository cannot be reached."""

    def close(self) -> None: ...


class TlsTransport:
    """A kept-open TLS connection, opened again when the repository closed it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file:
            self.context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self._sock: ssl.SSLSocket | None = None

    def send(self, messages: Sequence[bytes]) -> None:
        sock = self._connected()
        try:
            sock.sendall(octet_counted(messages))
        except OSError:
            self.close()
            raise

    def _connected(self) -> ssl.SSLSocket:
        if self._sock is not None and self._peer_closed(self._sock):
            self.close()
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        return self._sock

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> bool:
        # A repository never speaks on this connection: readable means it closed or failed.
        # Checking before each send keeps a restarted repository from swallowing messages.
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable)
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class UdpTransport:
    """One datagram per message; UDP cannot tell whether anyone listened."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address = (host, port)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)

    def send(self, messages: Sequence[bytes]) -> None:
        for m in messages:
            self._sock.sendto(m[:UDP_MAX], self.address)

    def close(self) -> None:
        self._sock.close()


def transport_for(
    url: str,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> Transport:
    """`syslog+tls://host[:6514]` or `syslog+udp://host[:514]`."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"no host in audit repository URL {url!r}")
    if parts.scheme == "syslog+tls":
        return TlsTransport(
            parts.hostname,
            parts.port or 6514,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
    if parts.scheme == "syslog+udp":
        return UdpTransport(parts.hostname, parts.port or 514)
    raise ValueError(f"audit repository URL must start syslog+tls:// or syslog+udp://: {url!r}")

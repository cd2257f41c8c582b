"""The gateway's HTTP client for the hub."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from imagebridge.transfers.framing import (
    FRAME_HEADER_SIZE,
    MEDIA_TYPE,
    FrameData,
    FrameDecoder,
    FrameStart,
    FramingError,
    encode_files,
)

# Below the hub's keep-alive timeout (75 s): an older idle connection is replaced.
IDLE_RECONNECT_SECONDS = 30.0


class HubError(RuntimeError):
    """The hub refused a request (4xx): retrying the same request will not help."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class HubUnavailable(RuntimeError):
    """The hub could not be reached or failed (network, 5xx): try again later."""


class HubClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """tls: for an https hub, the context with the trusted CA and our certificate."""
        self._base = urlsplit(base_url)
        if tls is None and self._base.scheme == "https":
            tls = ssl.create_default_context()
        # (Loading the system's CAs costs tens of milliseconds: not for a plain-HTTP hub.)
        self._tls = tls
        transport = httpx.HTTPTransport(
            retries=0,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            verify=tls if tls is not None else False,
        )
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )
        self._auth = {"Authorization": f"Bearer {token}"}
        self._bulk: http.client.HTTPConnection | None = None
        self._bulk_used_at = 0.0

    def close(self) -> None:
        self._http.close()
        if self._bulk is not None:
            self._bulk.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"hub unreachable: {_why(exc)}") from exc
        return _check(response).json()

    def config(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/api/v1/gateway/config")
        return result

    def create_transfer(self, **body: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/v1/transfers", json=body)
        return result

    def missing(self, digests: list[str]) -> set[str]:
        result = self._call("POST", "/api/v1/gateway/blobs/missing", json={"sha256": digests})
        return set(result["missing"])

    def upload(
        self,
        transfer_id: str,
        items: list[tuple[str, Path | None]],
        close: bool = False,
        declared: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send a batch as one framed stream of known length (no chunked coding); with
        ``close``, the last one, which closes the transfer (``declared``: as for
        close_transfer)."""
        length = sum(FRAME_HEADER_SIZE + (p.stat().st_size if p else 0) for _, p in items)
        query = ""
        if close:
            closing = {"close": True, **(declared or {})}
            query = "?" + urlencode({k: str(v).lower() for k, v in closing.items()})
        result: dict[str, Any] = self._bulk_request(
            "POST",
            f"/api/v1/transfers/{transfer_id}/instances{query}",
            encode_files(items),
            {"Content-Type": MEDIA_TYPE, "Content-Length": str(length)},
        )
        return result

    def close_transfer(
        self, transfer_id: str, declared: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``declared``: instances_declared, declared_by, interrupted (see the hub's route)."""
        result: dict[str, Any] = self._call(
            "POST", f"/api/v1/transfers/{transfer_id}/close", json=declared
        )
        return result

    def work(self, limit: int, wait: float, max_bytes: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "wait": wait}
        if max_bytes is not None:
            params["max_bytes"] = max_bytes
        result: dict[str, Any] = self._call(
            "GET",
            "/api/v1/gateway/work",
            params=params,
            timeout=wait + 30,
        )
        return result

    def release_leases(self) -> int:
        result = self._call("POST", "/api/v1/gateway/work/release")
        released: int = result["released"]
        return released

    def find(self, query: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A network query for this institution: the hub's index and the discoverable PACS."""
        result: dict[str, Any] = self._call(
            "POST", "/api/v1/gateway/find", json=query, timeout=timeout
        )
        return result

    def retrieve(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The instances a retrieve sends, or the fetch started for them."""
        result: dict[str, Any] = self._call(
            "POST", "/api/v1/gateway/retrieve", json=request, timeout=timeout
        )
        return result

    def fetch_state(self, task_id: str, wait: float) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "GET", f"/api/v1/gateway/fetches/{task_id}", params={"wait": wait}, timeout=wait + 30
        )
        return result

    def next_task(self, kind: str, wait: float) -> dict[str, Any] | None:
        """Lease the next task of this kind (find, fetch) for this gateway's PACS."""
        result = self._call(
            "GET", "/api/v1/gateway/tasks", params={"kind": kind, "wait": wait}, timeout=wait + 30
        )
        task: dict[str, Any] | None = result["task"]
        return task

    def task_result(self, task_id: str, answer: dict[str, Any]) -> None:
        self._call("POST", f"/api/v1/gateway/tasks/{task_id}/result", json=answer)

    def download(
        self, digests: list[str], folder: Path, route: str = "/api/v1/gateway/blobs"
    ) -> dict[str, Path]:
        """Fetch blobs into folder (named by digest), checking each digest on arrival.
        ``route`` names what they are for: delivery (the default) or a retrieve.

        The bulk of a study comes this way, so it reads with http.client straight into a
        reused buffer: a fraction of the CPU of a general-purpose client for the same bytes.
        """
        paths: dict[str, Path] = {}
        decoder = FrameDecoder(max_blob_bytes=1 << 40)
        sink: _BlobSink | None = None
        conn = self._bulk_connection()
        try:
            conn.request(
                "POST",
                self._base.path.rstrip("/") + route,
                body=json.dumps({"sha256": digests}),
                headers={**self._auth, "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            if response.status >= 400:
                _raise_for(response.status, response.read().decode("utf-8", "replace"))
            buffer = memoryview(bytearray(1 << 20))
            while n := response.readinto(buffer):
                for event in decoder.feed(buffer[:n]):
                    if isinstance(event, FrameData):
                        assert sink is not None
                        sink.write(event.data)
                    elif isinstance(event, FrameStart):
                        sink = _BlobSink(folder, event.sha256)
                    else:
                        assert sink is not None
                        paths[event.sha256] = sink.finish()
                        sink = None
            decoder.close()
            # http.client ends a body cut short by the peer without an error: a hub that
            # stops between two blobs must not pass for one that sent them all.
            if short := len(set(digests) - paths.keys()):
                raise FramingError(f"stream ended with {short} blob(s) not sent")
        except (OSError, http.client.HTTPException, FramingError) as exc:
            conn.close()
            self._bulk = None
            raise HubUnavailable(f"download interrupted: {_why(exc)}") from exc
        finally:
            if sink is not None:
                sink.abort()
        return paths

    def _bulk_request(
        self, method: str, path: str, body: Iterable[bytes], headers: dict[str, str]
    ) -> Any:
        conn = self._bulk_connection()
        try:
            conn.request(
                method,
                self._base.path.rstrip("/") + path,
                body=body,
                headers={**self._auth, **headers},
                encode_chunked=False,
            )
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._bulk = None
            raise HubUnavailable(f"hub unreachable: {_why(exc)}") from exc
        if response.status >= 400:
            _raise_for(response.status, text)
        return json.loads(text)

    def _bulk_connection(self) -> http.client.HTTPConnection:
        idle = time.monotonic() - self._bulk_used_at
        if self._bulk is not None and idle > IDLE_RECONNECT_SECONDS:
            # The hub may have closed an idle keep-alive connection; do not find out mid-body.
            self._bulk.close()
            self._bulk = None
        self._bulk_used_at = time.monotonic()
        if self._bulk is None:
            host = self._base.hostname or "127.0.0.1"
            if self._base.scheme == "https":
                self._bulk = http.client.HTTPSConnection(
                    host, self._base.port or 443, timeout=60, context=self._tls
                )
            else:
                self._bulk = http.client.HTTPConnection(host, self._base.port or 80, timeout=60)
            try:
                self._bulk.connect()
            except OSError as exc:  # refused, or a TLS handshake that failed
                self._bulk = None
                raise HubUnavailable(f"hub unreachable: {_why(exc)}") from exc
            assert self._bulk.sock is not None
            self._bulk.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._bulk

    def deliveries(
        self, transfer_id: str, instances: list[dict[str, Any]], reports: list[dict[str, Any]]
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST",
            f"/api/v1/transfers/{transfer_id}/deliveries",
            json={"instances": instances, "reports": reports},
        )
        return result

    def local_patient_id(self, nhs_number: str) -> dict[str, Any]:
        """This institution's local ID for an NHS number, from the hub's patient index."""
        result: dict[str, Any] = self._call(
            "POST", "/api/v1/gateway/patients/local-id", json={"nhs_number": nhs_number}
        )
        return result

    def local_patient_ids(self, nhs_numbers: list[str]) -> dict[str, dict[str, Any]]:
        """``local_patient_id`` for many NHS numbers in one request (at most 1,000)."""
        result = self._call(
            "POST", "/api/v1/gateway/patients/local-ids", json={"nhs_numbers": nhs_numbers}
        )
        answers: dict[str, dict[str, Any]] = result["answers"]
        return answers

    def audit(self, events: list[dict[str, Any]]) -> None:
        self._call("POST", "/api/v1/gateway/audit", json={"events": events})


def _why(exc: BaseException) -> str:
    """The exception's kind, and for TLS the reason: a refused certificate must be obvious."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLError):
        return f"{type(exc).__name__} (TLS: {cause.reason or cause})"
    return type(exc).__name__


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        _raise_for(response.status_code, response.text)
    return response


def _raise_for(status: int, text: str) -> None:
    try:
        reason = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        reason = text
    message = f"hub answered {status}: {reason}"
    # 401: the hub did not accept our token or certificate. The spool waits for an operator
    # to fix them, rather than setting the studies aside as refused.
    if status >= 500 or status in (401, 429):
        raise HubUnavailable(message)
    raise HubError(message, status)


class _BlobSink:
    """One blob being downloaded: written beside its final name, checked, then renamed."""

    def __init__(self, folder: Path, sha256: str) -> None:
        self.sha256 = sha256
        self.final = folder / f"{sha256}.dcm"
        self.tmp = folder / f".{sha256}.part"
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self.hash = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.hash.update(data)

    def finish(self) -> Path:
        self.fh.close()
        if self.hash.hexdigest() != self.sha256:
            self.tmp.unlink(missing_ok=True)
            raise FramingError("a downloaded blob did not match its digest")
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)

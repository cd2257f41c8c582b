"""The gateway's HTTP client for the hub."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from imagebridge.transfers.framing import (
    CHUNK,
    MEDIA_TYPE,
    FrameData,
    FrameDecoder,
    FrameEnd,
    FrameStart,
    encode_files,
)


class HubError(RuntimeError):
    """The hub refused a request (4xx): retrying the same request will not help."""


class HubUnavailable(RuntimeError):
    """The hub could not be reached or failed (network, 5xx): try again later."""


class HubClient:
    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        transport = httpx.HTTPTransport(
            retries=0, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"hub unreachable: {type(exc).__name__}") from exc
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

    def upload(self, transfer_id: str, items: Iterable[tuple[str, Path | None]]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST",
            f"/api/v1/transfers/{transfer_id}/instances",
            content=encode_files(items),
            headers={"Content-Type": MEDIA_TYPE},
        )
        return result

    def close_transfer(self, transfer_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/v1/transfers/{transfer_id}/close")
        return result

    def work(self, limit: int, wait: float) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "GET",
            "/api/v1/gateway/work",
            params={"limit": limit, "wait": wait},
            timeout=wait + 30,
        )
        return result

    def release_leases(self) -> int:
        result = self._call("POST", "/api/v1/gateway/work/release")
        released: int = result["released"]
        return released

    def download(self, digests: list[str], folder: Path) -> dict[str, Path]:
        """Fetch blobs into folder (named by digest), checking each digest on arrival."""
        import hashlib
        import os

        paths: dict[str, Path] = {}
        decoder = FrameDecoder(max_blob_bytes=1 << 40)
        fh = None
        digest = None
        tmp: Path | None = None
        try:
            with self._http.stream(
                "POST", "/api/v1/gateway/blobs", json={"sha256": digests}
            ) as response:
                _check(response, stream=True)
                for chunk in response.iter_raw(CHUNK):
                    for event in decoder.feed(chunk):
                        if isinstance(event, FrameStart):
                            tmp = folder / f".{event.sha256}.part"
                            fh = open(tmp, "wb")  # noqa: SIM115 - closed at FrameEnd
                            digest = hashlib.sha256()
                        elif isinstance(event, FrameData):
                            assert fh is not None and digest is not None
                            fh.write(event.data)
                            digest.update(event.data)
                        elif isinstance(event, FrameEnd):
                            assert fh is not None and digest is not None and tmp is not None
                            fh.close()
                            fh = None
                            if digest.hexdigest() != event.sha256:
                                raise HubUnavailable("a downloaded blob did not match its digest")
                            final = folder / f"{event.sha256}.dcm"
                            os.replace(tmp, final)
                            paths[event.sha256] = final
                decoder.close()
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"hub unreachable: {type(exc).__name__}") from exc
        finally:
            if fh is not None:
                fh.close()
        return paths

    def deliveries(
        self, transfer_id: str, instances: list[dict[str, Any]], reports: list[dict[str, Any]]
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST",
            f"/api/v1/transfers/{transfer_id}/deliveries",
            json={"instances": instances, "reports": reports},
        )
        return result

    def audit(self, events: list[dict[str, Any]]) -> None:
        self._call("POST", "/api/v1/gateway/audit", json={"events": events})


def _check(response: httpx.Response, stream: bool = False) -> httpx.Response:
    if response.status_code < 400:
        return response
    if stream:
        response.read()
    try:
        reason = response.json().get("detail", response.text)
    except ValueError:
        reason = response.text
    message = f"hub answered {response.status_code}: {reason}"
    if response.status_code >= 500 or response.status_code == 429:
        raise HubUnavailable(message)
    raise HubError(message)

"""Lengths that declare gigabytes, and bodies that keep coming, at a real hub process: each is
refused before it costs the hub memory (its peak RSS is read from /proc) or a file
descriptor per blob, and the hub serves on.
"""

from __future__ import annotations

import hashlib
import resource
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from conftest import audit_events
from fuzz.checks import our_tracebacks, peak_rss_mb
from fuzz.figures import input_path
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.transfers.framing import MEDIA_TYPE, frame_header

TERABYTE = 10**12
DICOM_BODY = 'multipart/related; type="application/dicom"; boundary=b0undary'


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("oversized") / "net")
    try:
        network.start_hub()
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        yield network
    finally:
        network.stop()
    assert our_tracebacks(network.root / "hub.log") == []


@pytest.fixture(scope="module")
def credentials(net: Network) -> dict[str, str]:
    return {
        "gateway": net.issue_token("SEG", "gw"),
        "clerk": net.user_token("SEG", "clerk", ["clerk"], ["send_studies", "track_transfers"]),
    }


@pytest.fixture(scope="module")
def transfer(net: Network, credentials: dict[str, str]) -> str:
    with httpx.Client(base_url=net.hub_url, timeout=30) as c:
        r = c.post(
            "/api/v1/transfers",
            headers={"Authorization": f"Bearer {credentials['gateway']}"},
            json={"receiver": "RVH", "origin": "dicom", "idempotency_key": uuid.uuid4().hex},
        )
        assert r.status_code == 201, r.text
        transfer_id: str = r.json()["id"]
        return transfer_id


def hub_pid(net: Network) -> int:
    assert net.hub_process is not None and net.hub_process.poll() is None
    return net.hub_process.pid


def upload(net: Network, token: str, transfer: str, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=net.hub_url, timeout=120) as c:
        return c.post(
            f"/api/v1/transfers/{transfer}/instances",
            content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE},
        )


def raw_request(net: Network, head: str, body: bytes) -> tuple[int, bytes]:
    """Send a request by hand (its headers may lie about the body); the status and what
    the hub said."""
    with socket.create_connection(("127.0.0.1", net.hub_port), timeout=30) as s:
        s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer and (data := s.recv(4096)):
            answer += data
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, answer


ROUTES = {
    # (method and path, whose credential, content type)
    "json": ("POST /api/v1/auth/login", None, "application/json"),
    "upload": ("POST /api/v1/transfers/{transfer}/instances", "gateway", MEDIA_TYPE),
    "report": ("POST /api/v1/transfers/{transfer}/reports", "gateway", "application/pdf"),
    "stow": ("POST /dicomweb/studies", "clerk", DICOM_BODY),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@input_path("HTTP: oversized declared lengths")
def test_a_content_length_of_a_terabyte_is_refused_at_once(
    net: Network, credentials: dict[str, str], transfer: str, route: str
) -> None:
    line, who, content_type = ROUTES[route]
    head = "\r\n".join(
        [
            line.format(transfer=transfer) + " HTTP/1.1",
            "Host: hub",
            f"Content-Type: {content_type}",
            f"Content-Length: {TERABYTE}",
            *([f"Authorization: Bearer {credentials[who]}"] if who else []),
        ]
    )
    before = peak_rss_mb(hub_pid(net))
    started = time.monotonic()
    status, answer = raw_request(net, head, b"x" * 4096)
    assert status == 413, answer[:300]
    assert time.monotonic() - started < 10
    assert peak_rss_mb(hub_pid(net)) - before < 16
    path = line.split(" ")[1].format(transfer=transfer)
    refused = audit_events(net, "http:request:refused")
    assert [e for e in refused if e["detail"]["path"] == path and e["detail"]["status"] == 413]


@input_path("HTTP: oversized declared lengths")
def test_a_body_that_keeps_coming_is_cut_off_at_its_limit(net: Network) -> None:
    """Chunked, so no Content-Length announces it: 300 MB of JSON to a public route."""
    head = "\r\n".join(
        [
            "POST /api/v1/auth/login HTTP/1.1",
            "Host: hub",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ]
    )
    chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
    before = peak_rss_mb(hub_pid(net))
    with socket.create_connection(("127.0.0.1", net.hub_port), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n\r\n")
        sent = 0
        try:
            while sent < 300:
                s.sendall(chunk)
                sent += 1
        except OSError:
            pass  # the hub answered and closed
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert peak_rss_mb(hub_pid(net)) - before < 64


@input_path("HTTP: oversized declared lengths")
def test_a_frame_declaring_100_gb_is_refused_without_allocating(
    net: Network, credentials: dict[str, str], transfer: str
) -> None:
    before = peak_rss_mb(hub_pid(net))
    body = frame_header(hashlib.sha256(b"x").hexdigest(), 100 * 10**9) + b"x" * 65536
    r = upload(net, credentials["gateway"], transfer, body)
    assert r.status_code == 400, r.text
    assert "exceeds" in r.json()["detail"]
    assert peak_rss_mb(hub_pid(net)) - before < 16


@pytest.fixture
def few_file_descriptors(net: Network) -> Iterator[None]:
    """The hub with the soft limit most systems start a service with (1024 files)."""
    pid = hub_pid(net)
    saved = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, saved[1]))
    yield
    resource.prlimit(pid, resource.RLIMIT_NOFILE, saved)


@input_path("HTTP: many small blobs in one request")
def test_a_batch_of_thousands_of_small_blobs_needs_no_descriptor_each(
    net: Network, credentials: dict[str, str], transfer: str, few_file_descriptors: None
) -> None:
    blobs = [b"not DICOM %d" % n for n in range(3000)]
    body = b"".join(frame_header(hashlib.sha256(b).hexdigest(), len(b)) + b for b in blobs)
    r = upload(net, credentials["gateway"], transfer, body)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["refused"]) == len(blobs)
    assert {x["reason"] for x in r.json()["refused"]} == {"not a DICOM Part 10 file"}


@input_path("HTTP: many small blobs in one request")
def test_a_stow_body_of_thousands_of_parts_needs_no_descriptor_each(
    net: Network,
    credentials: dict[str, str],
    few_file_descriptors: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    study = generate_ct_study(tmp_path_factory.mktemp("ct"), slices=1, rows=16, columns=16)
    part = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + study.paths[0].read_bytes()
    body = (part + b"\r\n") * 2000 + b"--b0undary--\r\n"
    with httpx.Client(base_url=net.hub_url, timeout=300) as c:
        r = c.post(
            "/dicomweb/studies",
            content=body,
            headers={
                "Authorization": f"Bearer {credentials['clerk']}",
                "Content-Type": DICOM_BODY,
                "Accept": "application/dicom+json",
            },
        )
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["00081199"]["Value"]) == 2000  # one instance, stored once

"""Gateways reach the hub over HTTPS with mutual TLS (real hub and gateway processes).

The hub serves people on its main port (HTTPS, no client certificate) and gateways on
``gateway_port``, which requires a certificate from the network's CA that is not revoked
and that names the gateway whose token comes with it.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from imagebridge.demo.network import Network, free_port, write_toml
from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, generate_ct_study
from imagebridge.dicom.store_scu import FileToSend, Node, store_files
from imagebridge.pki.ca import CertificateAuthority, Credentials

EXPLICIT_LE = "1.2.840.10008.1.2.1"
FAST = {"study_stable_seconds": 0.5, "retry_initial_seconds": 0.2, "retry_max_seconds": 0.5}
REFUSED = "tls:certificate:refused"


@dataclass
class Pki:
    root: Path
    ca: CertificateAuthority

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    def issue(self, folder: str, make: Callable[[CertificateAuthority], Credentials]) -> Path:
        """Credentials in root/folder (issued once per module), returned as that folder."""
        out = self.root / folder
        if not out.exists():
            self.ca.export(make(self.ca), out)
        return out

    def gateway(self, code: str, name: str = "gateway") -> Path:
        return self.issue(f"gw-{code}-{name}", lambda ca: ca.issue_gateway(code, name))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("mtls")
    pki = Pki(root, CertificateAuthority.create(root / "ca"))
    pki.issue("hub", lambda ca: ca.issue_server(["127.0.0.1"]))
    return pki


@pytest.fixture
def net(tmp_path: Path, pki: Pki) -> Iterator[Network]:
    network = Network(tmp_path / "net", hub_ca=pki.ca_cert)
    try:
        network.start_hub(
            tls_cert=str(pki.root / "hub" / "cert.pem"),
            tls_key=str(pki.root / "hub" / "key.pem"),
            tls_client_ca=str(pki.ca_cert),
            tls_crl=str(pki.ca.crl_path),
            gateway_port=free_port(),
            inbox_wait_seconds=1.0,
        )
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        yield network
    finally:
        network.stop()
    logs = [p for p in network.root.rglob("*.log") if "Traceback" in p.read_text()]
    assert not logs, f"tracebacks in {logs}"


def gateway_url(net: Network) -> str:
    config = tomllib.loads((net.root / "hub.toml").read_text())
    return f"https://127.0.0.1:{config['gateway_port']}"


def gateway_client(net: Network, pki: Pki, credentials: Path | None, token: str) -> httpx.Client:
    context = ssl.create_default_context(cafile=pki.ca_cert)
    if credentials is not None:
        context.load_cert_chain(credentials / "cert.pem", credentials / "key.pem")
    return httpx.Client(
        base_url=gateway_url(net),
        verify=context,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def refusals(net: Network) -> list[dict[str, Any]]:
    with net.admin() as admin:
        events: list[dict[str, Any]] = admin.get("/api/v1/audit", params={"action": REFUSED}).json()
    return events


def tls_settings(pki: Pki, credentials: Path, net: Network) -> dict[str, Any]:
    return {
        "hub_url": gateway_url(net),
        "hub_ca": str(pki.ca_cert),
        "hub_tls_cert": str(credentials / "cert.pem"),
        "hub_tls_key": str(credentials / "key.pem"),
        **FAST,
    }


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def delivered(net: Network, study_uid: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        with net.admin() as admin:
            for t in admin.get("/api/v1/transfers").json():
                studies = {s["study_instance_uid"] for s in t["studies"]}
                if study_uid in studies and t["status"] == "delivered":
                    return dict(t)
        return None

    result: dict[str, Any] = wait_until("the transfer to be delivered", check)
    return result


def test_gateways_exchange_a_study_through_the_mutual_tls_listener(
    net: Network, pki: Pki, mini_pacs: Callable[[str], MiniPacs], tmp_path: Path
) -> None:
    rvh_pacs = mini_pacs("PACS_RVH")
    seg = net.start_gateway(
        "SEG",
        calling_aes=[{"ae_title": "PACS_SEG", "host": "127.0.0.1"}],
        **tls_settings(pki, pki.gateway("SEG"), net),
    )
    net.start_gateway(
        "RVH",
        calling_aes=[],
        pacs=[{"name": "pacs", "ae_title": "PACS_RVH", "host": "127.0.0.1", "port": rvh_pacs.port}],
        **tls_settings(pki, pki.gateway("RVH"), net),
    )
    study = generate_ct_study(tmp_path / "study", slices=6, rows=64, columns=64)
    files = [FileToSend(p, CT_IMAGE_STORAGE, EXPLICIT_LE) for p in study.paths]
    results = store_files(Node("IB_RVH", "127.0.0.1", seg.port), "PACS_SEG", files)
    assert [r.outcome for r in results] == ["delivered"] * len(files)

    transfer = delivered(net, study.study_instance_uid)
    assert transfer["instances_delivered"] == len(files)
    assert wait_until("the PACS to hold the study", lambda: rvh_pacs.count() == len(files))
    # Both gateways' tokens only work with their certificates, so all of it went through
    # the mutual-TLS listener.
    assert refusals(net) == []


def test_gateway_tokens_are_refused_on_the_peoples_port(net: Network) -> None:
    token = net.issue_token("SEG", "gw1")
    with httpx.Client(base_url=net.hub_url, verify=net.verify) as people:
        assert people.get("/api/v1/health").status_code == 200  # HTTPS, no client certificate
        r = people.get("/api/v1/gateway/config", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert "mutual-TLS gateway listener" in r.json()["detail"]
    assert [e["detail"]["path"] for e in refusals(net)] == ["/api/v1/gateway/config"]


def test_missing_foreign_and_server_certificates_are_refused_at_the_handshake(
    net: Network, pki: Pki, tmp_path: Path
) -> None:
    token = net.issue_token("SEG")
    rogue = CertificateAuthority.create(tmp_path / "rogue-ca")
    rogue.export(rogue.issue_gateway("SEG", "gateway"), tmp_path / "rogue")
    for credentials in (None, tmp_path / "rogue", pki.root / "hub"):
        with (
            gateway_client(net, pki, credentials, token) as client,
            pytest.raises(httpx.TransportError),
        ):
            client.get("/api/v1/gateway/config")
    with gateway_client(net, pki, pki.gateway("SEG"), token) as client:
        r = client.get("/api/v1/gateway/config")
        assert r.status_code == 200 and r.json()["institution"] == "SEG"


def test_a_token_works_only_with_its_own_gateways_certificate(net: Network, pki: Pki) -> None:
    seg_token = net.issue_token("SEG")
    with gateway_client(net, pki, pki.gateway("RVH"), seg_token) as client:
        r = client.get("/api/v1/gateway/config")
    assert r.status_code == 401
    assert "certificate's gateway RVH/gateway" in r.json()["detail"]
    (event,) = refusals(net)
    assert event["actor"] == "RVH/gateway" and event["outcome"] == "refused"

    with gateway_client(net, pki, pki.gateway("SEG"), net.admin_token) as client:
        r = client.get("/api/v1/gateway/config")
        assert r.status_code == 403 and "gateways only" in r.json()["detail"]
        client.headers["Authorization"] = "Bearer ibg_not-a-token"
        assert client.get("/api/v1/gateway/config").status_code == 401  # the application's
        client.headers["Authorization"] = f"Bearer {seg_token}"
        assert client.get("/api/v1/gateway/config").status_code == 200
        # The ASGI TLS extension tells the application who is on the other end; the
        # health route does not need it, but it must not break public routes.
        del client.headers["Authorization"]
        assert client.get("/api/v1/health").status_code == 200


def test_revocation_takes_effect_while_the_hub_runs(net: Network, pki: Pki) -> None:
    names = ("gw-a", "gw-b", "gw-c")
    tokens = {name: net.issue_token("SEG", name) for name in names}
    creds = {name: pki.gateway("SEG", name) for name in names}
    serial = {
        name: x509.load_pem_x509_certificate((creds[name] / "cert.pem").read_bytes()).serial_number
        for name in names
    }
    kept = gateway_client(net, pki, creds["gw-a"], tokens["gw-a"])
    with kept:
        assert kept.get("/api/v1/gateway/config").status_code == 200

        revoked = subprocess.run(
            [sys.executable, "-m", "imagebridge", "ca", "revoke", "--dir", str(pki.ca.folder),
             "--serial", f"{serial['gw-a']:X}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr

        # The connection opened before the revocation is still up: its next request is refused.
        r = kept.get("/api/v1/gateway/config")
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
        assert refusals(net)[0]["detail"]["serial"] == f"{serial['gw-a']:X}"
    with (
        gateway_client(net, pki, creds["gw-a"], tokens["gw-a"]) as again,
        pytest.raises(httpx.TransportError),
    ):
        again.get("/api/v1/gateway/config")

    # A second CRL signed within the same second as the first (the CA's clock held still):
    # a context that merely loaded it beside the first would keep using the first.
    crl = x509.load_pem_x509_crl(pki.ca.crl_path.read_bytes())
    same_second = CertificateAuthority.open(pki.ca.folder, clock=lambda: crl.last_update_utc)
    same_second.revoke(serial["gw-b"])
    with (
        gateway_client(net, pki, creds["gw-b"], tokens["gw-b"]) as b,
        pytest.raises(httpx.TransportError),
    ):
        b.get("/api/v1/gateway/config")
    with gateway_client(net, pki, creds["gw-c"], tokens["gw-c"]) as c:
        assert c.get("/api/v1/gateway/config").status_code == 200


def test_a_refused_gateway_keeps_its_spool_until_its_certificate_is_fixed(
    net: Network, pki: Pki, mini_pacs: Callable[[str], MiniPacs], tmp_path: Path
) -> None:
    rvh_pacs = mini_pacs("PACS_RVH")
    net.start_gateway(
        "RVH",
        calling_aes=[],
        pacs=[{"name": "pacs", "ae_title": "PACS_RVH", "host": "127.0.0.1", "port": rvh_pacs.port}],
        **tls_settings(pki, pki.gateway("RVH"), net),
    )
    # SEG's gateway learns its routes, then comes back with RVH's certificate by mistake:
    # the hub refuses its token with that certificate.
    calling = [{"ae_title": "PACS_SEG", "host": "127.0.0.1"}]
    net.start_gateway("SEG", calling_aes=calling, **tls_settings(pki, pki.gateway("SEG"), net))
    net.stop_gateway("SEG")
    seg = net.start_gateway(
        "SEG", calling_aes=calling, **tls_settings(pki, pki.gateway("RVH"), net)
    )
    study = generate_ct_study(tmp_path / "study", slices=3, rows=64, columns=64)
    files = [FileToSend(p, CT_IMAGE_STORAGE, EXPLICIT_LE) for p in study.paths]
    results = store_files(Node("IB_RVH", "127.0.0.1", seg.port), "PACS_SEG", files)
    assert [r.outcome for r in results] == ["delivered"] * len(files)
    wait_until("the hub to refuse the gateway", lambda: refusals(net))
    assert "not that of the certificate's gateway" in seg.log.read_text()
    assert rvh_pacs.count() == 0

    net.stop_gateway("SEG")
    net.start_gateway("SEG", calling_aes=calling, **tls_settings(pki, pki.gateway("SEG"), net))
    delivered(net, study.study_instance_uid)
    assert wait_until("the PACS to hold the study", lambda: rvh_pacs.count() == len(files))


def test_the_hub_refuses_to_start_with_an_incomplete_tls_setup(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    write_toml(config, {"data_dir": "hub", "port": free_port(), "gateway_port": free_port()})
    result = subprocess.run(
        [sys.executable, "-m", "imagebridge", "hub", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "gateway_port needs tls_cert, tls_key and tls_client_ca" in result.stderr
    assert "Traceback" not in result.stderr

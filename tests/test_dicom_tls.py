"""DICOM TLS (PS3.15 B) on the gateway's SCP, against DCMTK's echoscu and pynetdicom.

The gateway runs as its own process; the calling nodes hold certificates from the network's
CA (or from a stranger's). Calling AE titles and addresses are checked over TLS as ever.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from conftest import audit_events, require_tool, wait_for_transfer
from imagebridge.demo.network import GatewayProcess, Network, free_port, write_toml
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, generate_ct_study
from imagebridge.dicom.net import VERIFICATION
from imagebridge.pki.ca import CertificateAuthority

pytestmark = pytest.mark.peers

ECHOSCU = "/usr/bin/echoscu"
CALLING_AE = "PACS_SEG"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass
class Pki:
    ca_cert: Path
    scp: Path  # the gateway's DICOM TLS server certificate
    node: Path  # the local PACS's certificate, from the network's CA
    stranger: Path  # a certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("dicom-tls")
    ca = CertificateAuthority.create(root / "ca")
    ca.export(ca.issue_server(["127.0.0.1"]), root / "scp")
    ca.export(ca.issue_node(CALLING_AE), root / "node")
    other = CertificateAuthority.create(root / "other-ca")
    other.export(other.issue_node(CALLING_AE), root / "stranger")
    return Pki(ca.certificate_path, root / "scp", root / "node", root / "stranger")


def start_tls_gateway(net: Network, pki: Pki, code: str, **settings: object) -> GatewayProcess:
    return net.start_gateway(
        code,
        calling_aes=[{"ae_title": CALLING_AE, "host": "127.0.0.1"}],
        dicom_tls_cert=str(pki.scp / "cert.pem"),
        dicom_tls_key=str(pki.scp / "key.pem"),
        dicom_tls_ca=str(pki.ca_cert),
        study_stable_seconds=0.5,
        **settings,
    )


@pytest.fixture
def gateway(network: Network, pki: Pki) -> Iterator[GatewayProcess]:
    gw = start_tls_gateway(network, pki, "SEG")
    yield gw
    network.stop_gateway("SEG")
    assert "Traceback" not in gw.log.read_text()


def echoscu(
    gw: GatewayProcess, *args: str, calling: str = CALLING_AE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(ECHOSCU), *args, "-aet", calling, "-aec", gw.ae_title, "127.0.0.1",
         str(gw.port)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip


def tls(credentials: Path) -> list[str]:
    return ["+tls", str(credentials / "key.pem"), str(credentials / "cert.pem")]


def test_echoscu_with_the_networks_certificate(gateway: GatewayProcess, pki: Pki) -> None:
    result = echoscu(gateway, *tls(pki.node), "+cf", str(pki.ca_cert))
    assert result.returncode == 0, result.stdout + result.stderr


def test_echoscu_refused_without_tls_or_with_a_strangers_certificate(
    network: Network, gateway: GatewayProcess, pki: Pki
) -> None:
    plain = echoscu(gateway)
    assert plain.returncode != 0
    stranger = echoscu(gateway, *tls(pki.stranger), "+cf", str(pki.ca_cert))
    assert stranger.returncode != 0
    # Over TLS, an unknown calling AE title is still rejected, with the standard reason.
    unknown = echoscu(gateway, *tls(pki.node), "+cf", str(pki.ca_cert), calling="STRANGER")
    assert unknown.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown.stdout + unknown.stderr
    # The gateway answers the next caller as before.
    assert echoscu(gateway, *tls(pki.node), "+cf", str(pki.ca_cert)).returncode == 0
    # Each refusal is in the audit trail with its reason; the port probe made when the
    # gateway started (connect, then close) is not.
    reasons = wait_for_events(network, "dicom:association:refused", 3)
    assert sorted(e["detail"]["reason"] for e in reasons) == [
        "TLS: client certificate refused (unable to get local issuer certificate)",
        "TLS: handshake failed (WRONG_VERSION_NUMBER)",
        "calling AE title not recognised",
    ]


def wait_for_events(net: Network, action: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = audit_events(net, action)
        if len(events) >= count:
            time.sleep(0.5)  # and no more than count arrive
            return audit_events(net, action)
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} {action} events")


def client_context(pki: Pki, credentials: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_cert)
    if credentials is not None:
        context.load_cert_chain(credentials / "cert.pem", credentials / "key.pem")
    return context


def associate(gw: GatewayProcess, context: ssl.SSLContext, called: str) -> Association:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    return ae.associate("127.0.0.1", gw.port, ae_title=called, tls_args=(context, "127.0.0.1"))


def test_pynetdicom_stores_a_study_over_tls(
    network: Network, gateway: GatewayProcess, pki: Pki, tmp_path: Path
) -> None:
    study = generate_ct_study(tmp_path / "study", slices=3, rows=64, columns=64)
    assoc = associate(gateway, client_context(pki, pki.node), "IB_RVH")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        for path in study.paths:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    transfer = wait_for_transfer(
        network,
        lambda t: (
            any(s["study_instance_uid"] == study.study_instance_uid for s in t["studies"])
            and t["instances_total"] == len(study.paths)
        ),
        timeout=60,
    )
    assert transfer["receiver"] == "RVH"


def test_pynetdicom_refused_without_a_client_certificate(gateway: GatewayProcess, pki: Pki) -> None:
    assoc = associate(gateway, client_context(pki, None), gateway.ae_title)
    assert not assoc.is_established
    assoc = associate(gateway, client_context(pki, pki.stranger), gateway.ae_title)
    assert not assoc.is_established
    assoc = associate(gateway, client_context(pki, pki.node), gateway.ae_title)
    assert assoc.is_established
    assoc.release()


def test_client_certificates_may_be_optional(network: Network, pki: Pki) -> None:
    gw = start_tls_gateway(network, pki, "RVH", dicom_tls_require_client_cert=False)
    assoc = associate(gw, client_context(pki, None), gw.ae_title)
    assert assoc.is_established
    assoc.release()
    # A certificate that is shown must still chain to the CA.
    assoc = associate(gw, client_context(pki, pki.stranger), gw.ae_title)
    assert not assoc.is_established
    assert echoscu(gw).returncode != 0  # and TLS itself is not optional
    network.stop_gateway("RVH")
    assert "Traceback" not in gw.log.read_text()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"dicom_tls_cert": "scp/cert.pem", "dicom_tls_key": "scp/key.pem"},
         "dicom_tls_require_client_cert needs dicom_tls_ca"),
        ({"dicom_tls_cert": "scp/missing.pem", "dicom_tls_key": "scp/key.pem",
          "dicom_tls_ca": "ca/ca.pem"}, "cannot use certificate"),
        ({"hub_ca": "ca/ca.pem"}, "need an https:// hub_url"),
    ],
)  # fmt: skip
def test_a_gateway_with_unusable_tls_settings_says_why(
    pki: Pki, tmp_path: Path, settings: dict[str, str], reason: str
) -> None:
    base = pki.ca_cert.parent.parent
    config = tmp_path / "gateway.toml"
    paths = {key: str(base / value) for key, value in settings.items()}
    write_toml(config, {"data_dir": "data", "token": "ibg_unused", "port": free_port(), **paths})
    result = subprocess.run(
        [sys.executable, "-m", "imagebridge", "gateway", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and reason in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

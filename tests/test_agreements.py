"""An institution without a signed data sharing agreement exchanges nothing: it cannot send
(over DICOM or the API) or receive; withdrawing an agreement stops exchange at once.

A real hub and real gateways on loopback, a PACS sending with C-STORE.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import audit_events, require_tool, wait_until
from imagebridge.demo.network import GatewayProcess, Network
from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, StudyFiles, generate_ct_study
from imagebridge.dicom.store_scu import FileToSend, Node, store_files

EXPLICIT_LE = "1.2.840.10008.1.2.1"
FAST = {
    "study_stable_seconds": 0.5,
    "retry_initial_seconds": 0.2,
    "retry_max_seconds": 0.5,
    "routes_refresh_seconds": 0.3,
}
NO_AGREEMENT = "has no signed data sharing agreement in force"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    network = Network(tmp_path / "net")
    try:
        network.start_hub(inbox_wait_seconds=1.0)
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital", agreement=False)
        yield network
    finally:
        network.stop()


def _gateways(net: Network, mini_pacs: Callable[..., MiniPacs]) -> tuple[GatewayProcess, MiniPacs]:
    pacs = mini_pacs("PACS_RVH")
    seg = net.start_gateway(
        "SEG", calling_aes=[{"ae_title": "PACS_SEG", "host": "127.0.0.1"}], **FAST
    )
    net.start_gateway(
        "RVH",
        calling_aes=[{"ae_title": "PACS_RVH", "host": "127.0.0.1"}],
        pacs=[{"name": "pacs", "ae_title": "PACS_RVH", "host": "127.0.0.1", "port": pacs.port}],
        **FAST,
    )
    return seg, pacs


def _send(gw: GatewayProcess, study: StudyFiles) -> list[str]:
    files = [FileToSend(p, CT_IMAGE_STORAGE, EXPLICIT_LE) for p in study.paths]
    return [
        r.detail or r.outcome
        for r in store_files(Node("IB_RVH", "127.0.0.1", gw.port), "PACS_SEG", files)
    ]


def _api_transfer(net: Network, uid: str) -> Any:
    with net.admin() as admin:
        return admin.post(
            "/api/v1/transfers",
            json={"sender": "SEG", "receiver": "RVH", "study_instance_uids": [uid]},
        )


def _until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _status(net: Network, tid: str) -> dict[str, Any]:
    with net.admin() as admin:
        result: dict[str, Any] = admin.get(f"/api/v1/transfers/{tid}").json()
        return result


def test_no_exchange_without_agreement_and_withdrawal_stops_it_at_once(
    net: Network, mini_pacs: Callable[..., MiniPacs], tmp_path: Path
) -> None:
    seg, pacs = _gateways(net, mini_pacs)
    study = generate_ct_study(tmp_path / "study", slices=4, rows=64, columns=64)

    # RVH has signed nothing: its PACS-side peer is refused with the standard status.
    outcomes = _send(seg, study)
    assert all("0x0124" in o and NO_AGREEMENT in o for o in outcomes), outcomes
    refused = wait_until(
        "the refusal audited at the hub", lambda: audit_events(net, "dicom:instance:refused")
    )
    assert NO_AGREEMENT in refused[-1]["detail"]["reason"]
    r = _api_transfer(net, study.study_instance_uid)
    assert r.status_code == 403 and NO_AGREEMENT in r.json()["detail"]
    assert pacs.count() == 0

    # Signed: the same study goes through.
    net.sign_agreement("RVH")
    _until("the gateway to learn of the agreement", lambda: _send(seg, study) == ["delivered"] * 4)
    _until("delivery", lambda: pacs.count() == 4)

    # The receiver withdraws: a transfer waiting for it is held, not delivered...
    with net.admin() as admin:
        r = admin.post(
            "/api/v1/institutions/RVH/agreements/withdraw", json={"reason": "under review"}
        )
        assert r.status_code == 200, r.text
    r = _api_transfer(net, study.study_instance_uid)
    assert r.status_code == 403 and "RVH" in r.json()["detail"]
    assert audit_events(net, "agreement:agreement:withdrawn")
    # ...and the sender can no longer send there over DICOM either.
    _until("DICOM refusal", lambda: all("0x0124" in o for o in _send(seg, study)))

    # A transfer opened while both had signed is held while one has withdrawn.
    net.sign_agreement("RVH")
    rvh_settings = {
        "calling_aes": [{"ae_title": "PACS_RVH", "host": "127.0.0.1"}],
        "pacs": [{"name": "pacs", "ae_title": "PACS_RVH", "host": "127.0.0.1", "port": pacs.port}],
        **FAST,
    }
    net.stop_gateway("RVH")
    later = generate_ct_study(tmp_path / "later", slices=3, rows=64, columns=64)
    _until("sending again", lambda: _send(seg, later) == ["delivered"] * 3)
    queued = _until(
        "the transfer to be queued",
        lambda: [
            t
            for t in _transfers(net)
            if t["status"] == "queued"
            and t["studies"][0]["study_instance_uid"] == later.study_instance_uid
        ],
    )
    with net.admin() as admin:
        admin.post("/api/v1/institutions/SEG/agreements/withdraw", json={"reason": "paused"})
    net.start_gateway("RVH", **rvh_settings)
    time.sleep(3)  # a negative: nothing may arrive while the sender has withdrawn
    assert pacs.count() == 4
    assert _status(net, queued[0]["id"])["instances_delivered"] == 0
    net.sign_agreement("SEG")
    _until("delivery after re-signing", lambda: pacs.count() == 7)


def _transfers(net: Network) -> list[dict[str, Any]]:
    with net.admin() as admin:
        result: list[dict[str, Any]] = admin.get("/api/v1/transfers").json()
        return result


def test_each_calling_node_does_only_the_dicom_actions_it_is_permitted(
    net: Network, tmp_path: Path
) -> None:
    """A modality allowed only to verify the connection cannot store, and vice versa."""
    echoscu = require_tool("/usr/bin/echoscu")
    net.sign_agreement("RVH")
    gw = net.start_gateway(
        "SEG",
        calling_aes=[
            {"ae_title": "ECHO_ONLY", "host": "127.0.0.1", "permissions": ["echo"]},
            {"ae_title": "STORE_ONLY", "host": "127.0.0.1", "permissions": ["store"]},
        ],
        **FAST,
    )
    env = {**os.environ, "TCP_NODELAY": "1"}

    def echo(calling: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [echoscu, "-v", "-aet", calling, "-aec", gw.ae_title, "127.0.0.1", str(gw.port)],
            env=env,
            capture_output=True,
            text=True,
        )

    allowed = echo("ECHO_ONLY")
    assert "Received Echo Response (Success)" in allowed.stdout + allowed.stderr, allowed
    refused = echo("STORE_ONLY")
    assert "Received Echo Response (Unknown Status: 0x124)" in refused.stdout + refused.stderr
    study = generate_ct_study(tmp_path / "study", slices=1, rows=64, columns=64)
    files = [FileToSend(p, CT_IMAGE_STORAGE, EXPLICIT_LE) for p in study.paths]
    node = Node("IB_RVH", "127.0.0.1", gw.port)
    (result,) = store_files(node, "ECHO_ONLY", files)
    assert result.outcome == "failed" and "0x0124" in result.detail
    (result,) = store_files(node, "STORE_ONLY", files)
    assert result.outcome == "delivered", result.detail

    def refusals() -> set[str]:
        events = audit_events(net, "dicom:instance:refused")
        reasons = {e["detail"]["reason"] for e in events}
        return reasons if {"C-STORE not permitted", "C-ECHO not permitted"} <= reasons else set()

    # The gateway's journal reaches the hub on the uploader's next round.
    wait_until("both refusals audited at the hub", refusals)

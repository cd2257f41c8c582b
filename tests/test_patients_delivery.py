"""Reconciliation through the patient index, end to end: hub and gateways as processes, DCMTK
storescu as SEG's PACS and DCMTK storescp as RVH's.

RVH's local IDs come from the index two ways: registered by its administrator (as from its
PAS), and from a study RVH itself sent. A study whose birth date disagrees with RVH's record
goes under the foreign ID and raises an identity flag, even though the static map knows an
MRN for it; an NHS number the index does not know falls back to the static map.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from conftest import audit_events, require_tool, wait_for_transfer, whole_dataset
from imagebridge.demo.network import Network, free_port, stop_process, wait_for_port
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.gateway.hubclient import HubClient
from imagebridge.gateway.patient_index import IndexedMrnLookup
from imagebridge.gateway.reconcile import LocalPatient, plan, reconcile_file
from imagebridge.settings import Reconciliation

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ALICE = "9434765919"  # registered at RVH as RVH0042
BOB = "9434765005"  # registered at RVH as RVH0077, born a day earlier than SEG says
CAROL = "9434765013"  # RVH0123 in a study RVH sent
DAVE = "9434765021"  # only in RVH's static map
FAST = {"study_stable_seconds": 0.5, "retry_initial_seconds": 0.2, "retry_max_seconds": 0.5}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Network, Path]]:
    storescp = require_tool("/usr/bin/storescp")
    root = tmp_path_factory.mktemp("identity")
    received = root / "pacs-rvh"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(
        [storescp, "--aetitle", "PACS_RVH", "--output-directory", str(received), str(pacs_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    network = Network(root / "net")
    try:
        wait_for_port(pacs_port, None)
        network.start_hub(inbox_wait_seconds=1.0)
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        network.start_gateway(
            "SEG", calling_aes=[{"ae_title": "PACS_SEG", "host": "127.0.0.1"}], **FAST
        )
        network.start_gateway(
            "RVH",
            calling_aes=[{"ae_title": "PACS_RVH", "host": "127.0.0.1"}],
            pacs=[{"ae_title": "PACS_RVH", "host": "127.0.0.1", "port": pacs_port}],
            reconciliation={"mrn_map": {BOB: "RVH-STATIC-B", DAVE: "RVH-STATIC-D"}},
            **FAST,
        )
        yield network, received
    finally:
        network.stop()
        stop_process(pacs)
    crashed = [p.name for p in network.root.rglob("*.log") if "Traceback" in p.read_text()]
    assert not crashed, f"tracebacks in {crashed}"


def study(folder: Path, patient_id: str, nhs: str, birth: str, sex: str) -> StudyFiles:
    return generate_ct_study(
        folder,
        slices=2,
        rows=32,
        columns=32,
        patient_id=patient_id,
        patient_name=f"TEST^{patient_id}",
        birth_date=birth,
        sex=sex,
        nhs_number=nhs,
    )


def storescu(net: Network, code: str, called_ae: str, files: StudyFiles) -> None:
    """The institution's PACS (DCMTK) sends the study to its gateway."""
    gateway = net.gateways[code]
    subprocess.run(
        [
            require_tool("/usr/bin/storescu"),
            "--aetitle",
            f"PACS_{code}",
            "--call",
            called_ae,
            "127.0.0.1",
            str(gateway.port),
            *map(str, files.paths),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
    )


def register(net: Network, value: str, nhs: str, birth: str, gender: str) -> None:
    """RVH's local ID, as its PAS states it (here through the network's operator)."""
    with net.admin() as admin:
        r = admin.put(
            "/fhir/Patient",
            params={"identifier": f"urn:imagebridge:issuer:RVH|{value}"},
            json={
                "resourceType": "Patient",
                "identifier": [{"system": NHS_SYSTEM, "value": nhs}],
                "birthDate": birth,
                "gender": gender,
            },
        )
        assert r.status_code == 201, r.text


def delivered(received: Path, files: StudyFiles, timeout: float = 60) -> list[Any]:
    """The study's instances as RVH's PACS received them."""
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files.paths}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            ds
            for ds in (whole_dataset(p, stop_before_pixels=True) for p in received.iterdir())
            if ds is not None and ds.SOPInstanceUID in uids
        ]
        if len(found) == len(uids):
            return found
        time.sleep(0.2)
    raise AssertionError("the study did not reach RVH's PACS in time")


def test_delivery_files_under_the_local_id_the_index_knows(
    net: tuple[Network, Path], tmp_path: Path
) -> None:
    network, received = net
    register(network, "RVH0042", ALICE, "1970-01-01", "female")
    register(network, "RVH0077", BOB, "1965-05-05", "male")
    own = study(tmp_path / "own", "RVH0123", CAROL, "19500505", "F")
    storescu(network, "RVH", "IB_SEG", own)
    # Indexed on arrival at the hub: RVH's own ID for Carol is known from now on.
    wait_for_transfer(
        network,
        lambda t: (
            t["status"] == "queued"
            and t["studies"][0]["study_instance_uid"] == own.study_instance_uid
        ),
    )

    sent = {
        "alice": study(tmp_path / "a", "SEG778899", ALICE, "19700101", "F"),
        "bob": study(tmp_path / "b", "SEG5", BOB, "19650506", "M"),
        "carol": study(tmp_path / "c", "SEG9", CAROL, "19500505", "F"),
        "dave": study(tmp_path / "d", "SEG11", DAVE, "19800101", "M"),
    }
    for files in sent.values():
        storescu(network, "SEG", "IB_RVH", files)
    arrived = {name: delivered(received, files) for name, files in sent.items()}
    ids = {
        name: {(ds.PatientID, ds.IssuerOfPatientID) for ds in got} for name, got in arrived.items()
    }
    assert ids == {
        "alice": {("RVH0042", "RVH")},  # registered
        # Born a day apart: never under RVH's MRN, nor the static map's.
        "bob": {("EXT-SEG-SEG5", "RVH")},
        "carol": {("RVH0123", "RVH")},  # from the study RVH sent
        "dave": {("RVH-STATIC-D", "RVH")},  # unknown to the index: the static map
    }
    for got in arrived.values():
        for ds in got:  # the sender's identity travels along
            assert (ds.OtherPatientIDsSequence[-1].IssuerOfPatientID) == "SEG"

    with network.admin() as admin:
        flags = admin.get("/api/v1/patients/flags").json()
    [flag] = flags
    assert flag["kind"] == "birth_date"
    assert {(s["institution"], s["birth_date"]) for s in flag["identifiers"]} == {
        ("SEG", "19650506"),
        ("RVH", "19650505"),
    }
    # The gateway asked the hub once per patient: two instances, one question.
    lookups = [
        e
        for e in audit_events(network, "patient:identity:lookup")
        if e["actor_type"] == "gateway" and e["patient_ref"] == ALICE
    ]
    assert len(lookups) == 1 and lookups[0]["detail"]["found"] == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_gateway_keeps_answers_briefly_and_falls_back_without_the_hub(
    net: tuple[Network, Path],
) -> None:
    network, _ = net
    erin = "9434765048"
    clock = Clock()
    hub = HubClient(network.hub_url, network.issue_token("RVH", "probe"))
    lookup = IndexedMrnLookup(hub, {erin: "RVH-STATIC-E"}, cache_seconds=60, clock=clock)
    try:
        assert lookup(erin) == "RVH-STATIC-E"  # the index knows no local ID yet
        register(network, "RVH0200", erin, "1990-09-09", "other")
        assert lookup(erin) == "RVH-STATIC-E"  # the answer is kept a while...
        clock.now += 61
        assert lookup(erin) == LocalPatient("RVH0200", "RVH", "19900909", "O")  # ...not longer
    finally:
        hub.close()
    unreachable = HubClient(f"http://127.0.0.1:{free_port()}", "ibg_unused", timeout=2)
    try:
        fallback = IndexedMrnLookup(unreachable, {erin: "RVH-STATIC-E"})
        fallback.prefetch([erin])  # said in the log; each lookup then asks, and falls back
        assert fallback(erin) == "RVH-STATIC-E"
    finally:
        unreachable.close()


def test_the_gateway_asks_for_many_patients_at_once(net: tuple[Network, Path]) -> None:
    """Before answering a C-FIND the gateway learns the local ID of every patient in its
    matches with one request, audited as one lookup; the lookups that follow ask the hub
    nothing."""
    network, _ = net
    gina, hal = "9434765218", "9434765226"
    register(network, "RVH0300", gina, "1991-01-01", "female")
    hub = HubClient(network.hub_url, network.issue_token("RVH", "probe"))
    lookup = IndexedMrnLookup(hub, {hal: "RVH-STATIC-H"})
    try:
        before = len(gateway_lookups(network))
        lookup.prefetch([gina, hal])
        asked = len(gateway_lookups(network))
        assert lookup(gina) == LocalPatient("RVH0300", "RVH", "19910101", "F")
        assert lookup(hal) == "RVH-STATIC-H"  # the index knows none: the static map
        assert len(gateway_lookups(network)) == asked == before + 1
        detail = gateway_lookups(network)[-1]["detail"]
        assert detail["nhs_numbers"] == [gina, hal] and detail["found"] == 1
    finally:
        hub.close()


def gateway_lookups(network: Network) -> list[dict[str, Any]]:
    return [
        e for e in audit_events(network, "patient:identity:lookup") if e["actor_type"] == "gateway"
    ]


@pytest.mark.parametrize(
    ("birth", "sex", "expected", "mismatch"),
    [
        ("19700101", "F", ("RVH0042", "RVH-PAS"), ""),
        ("", "", ("RVH0042", "RVH-PAS"), ""),  # nothing arrives to contradict the record
        ("19700102", "F", ("EXT-SEG-SEG1", "RVH"), "birth date differs"),
        ("19700101", "M", ("EXT-SEG-SEG1", "RVH"), "sex differs"),
    ],
)
def test_the_index_mrn_is_used_only_when_the_demographics_agree(
    tmp_path: Path, birth: str, sex: str, expected: tuple[str, str], mismatch: str
) -> None:
    files = study(tmp_path / "s", "SEG1", ALICE, birth, sex)
    known = LocalPatient("RVH0042", "RVH-PAS", "19700101", "F")
    policy = Reconciliation()
    decided = plan(
        dcmread(files.paths[0]),
        sender_code="SEG",
        receiver_code="RVH",
        policy=policy,
        mrn_lookup={ALICE: known}.get,
    )
    rewritten = reconcile_file(
        files.paths[0],
        tmp_path / "out.dcm",
        sender_code="SEG",
        receiver_code="RVH",
        policy=policy,
        mrn_lookup={ALICE: known}.get,
    )
    assert decided == rewritten
    assert (rewritten.patient_id, rewritten.issuer_of_patient_id) == expected
    assert rewritten.identity_mismatch == mismatch and rewritten.matched == (not mismatch)
    out = dcmread(tmp_path / "out.dcm")
    assert (out.PatientID, out.IssuerOfPatientID) == expected

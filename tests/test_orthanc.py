"""Against a real PACS: Orthanc A at SEG pushes through the network into Orthanc B at RVH.

One network for the module: a hub, gateway SEG (Orthanc A may call it) and gateway RVH
(delivering into Orthanc B, with one NHS number mapped to a local MRN). Each test sends its
own study and finds it by its StudyInstanceUID.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset

from conftest import audit_events, require_tool, wait_for_transfer
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.dicom.reports import minimal_pdf
from orthanc import ORTHANC, Modality, Orthanc

pytestmark = pytest.mark.peers

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
MAPPED_NHS_NUMBER = "9434765919"
UNMAPPED_NHS_NUMBER = "4010232137"
MRN_AT_RVH = "RVH0042"
# What reconciliation may change; every other element must arrive as it was sent.
RECONCILED = frozenset(
    {
        pydicom.tag.Tag("PatientID"),
        pydicom.tag.Tag("IssuerOfPatientID"),
        pydicom.tag.Tag("AccessionNumber"),
        pydicom.tag.Tag("OtherPatientIDsSequence"),
    }
)


@dataclass
class Peers:
    net: Network
    orthanc_a: Orthanc  # SEG's PACS, the sender
    orthanc_b: Orthanc  # RVH's PACS, the receiver


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    executable = require_tool(ORTHANC)
    root = tmp_path_factory.mktemp("orthanc-network")
    net = Network(root / "net")
    orthanc_b = Orthanc("ORTHANC_B", root / "orthanc-b")
    orthanc_a: Orthanc | None = None
    try:
        # Short long polls: a stopping gateway or hub need not wait out a 20 s poll.
        net.start_hub(inbox_wait_seconds=2.0)
        net.add_institution("SEG", "St Elsewhere General Hospital")
        net.add_institution("RVH", "Riverside Hospital")
        orthanc_b.start(executable)
        gw_seg = net.start_gateway(
            "SEG", calling_aes=[{"ae_title": "ORTHANC_A", "host": "127.0.0.1"}]
        )
        net.start_gateway(
            "RVH",
            calling_aes=[],
            pacs=[
                {
                    "name": "orthanc",
                    "ae_title": "ORTHANC_B",
                    "host": "127.0.0.1",
                    "port": orthanc_b.dicom_port,
                }
            ],
            reconciliation={"mrn_map": {MAPPED_NHS_NUMBER: MRN_AT_RVH}},
        )
        orthanc_a = Orthanc(
            "ORTHANC_A",
            root / "orthanc-a",
            {
                # The routing AE of RVH at gateway SEG: what a PACS user picks to send there.
                "to-rvh": Modality("IB_RVH", gw_seg.port),
                "gateway": Modality(gw_seg.ae_title, gw_seg.port),
                # Orthanc calling with an AE title the gateway does not know.
                "stranger": Modality("IB_RVH", gw_seg.port, local_ae_title="STRANGER"),
            },
        )
        orthanc_a.start(executable)
        yield Peers(net, orthanc_a, orthanc_b)
    finally:
        # Orthanc takes a couple of seconds to stop: both at once, while the network stops.
        running = [o for o in (orthanc_a, orthanc_b) if o is not None]
        for orthanc in running:
            orthanc.terminate()
        net.stop()
        for orthanc in running:
            orthanc.stop()


def _push_through_orthanc(peers: Peers, study: StudyFiles) -> dict[str, Any]:
    """Upload the study into Orthanc A and have it C-STORE the study to IB_RVH."""
    [study_id] = peers.orthanc_a.upload(study.paths)
    with peers.orthanc_a.client() as c:
        r = c.post("/modalities/to-rvh/store", json={"Resources": [study_id], "Synchronous": True})
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    assert job["FailedInstancesCount"] == 0
    assert job["InstancesCount"] == len(study.paths)
    assert job["RemoteAet"] == "IB_RVH"
    return wait_for_transfer(
        peers.net,
        lambda t: any(s["study_instance_uid"] == study.study_instance_uid for s in t["studies"]),
        timeout=60,
    )


def _wait_delivered(net: Network, transfer_id: str) -> dict[str, Any]:
    t = wait_for_transfer(
        net,
        lambda t: (
            t["id"] == transfer_id
            and (
                t["status"] == "failed"
                or (
                    t["status"] == "delivered"
                    and all(r["status"] == "delivered" for r in t["reports"])
                )
            )
        ),
        timeout=90,
    )
    assert t["status"] == "delivered", t
    return t


def _received(orthanc: Orthanc, study_instance_uid: str) -> list[FileDataset]:
    study_id = orthanc.find_study(study_instance_uid)
    assert study_id is not None, f"study {study_instance_uid} not in {orthanc.ae_title}"
    return [pydicom.dcmread(io.BytesIO(data)) for data in orthanc.study_files(study_id)]


def _split(received: list[FileDataset]) -> tuple[dict[str, FileDataset], list[FileDataset]]:
    images = {str(ds.SOPInstanceUID): ds for ds in received}
    pdfs = [ds for ds in received if ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE]
    for ds in pdfs:
        del images[str(ds.SOPInstanceUID)]
    return images, pdfs


def _assert_unchanged_but_identity(received: FileDataset, original: FileDataset) -> None:
    """Every element but the reconciled ones equal, the pixel data byte for byte."""
    assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    received_tags = {e.tag for e in received} - RECONCILED
    original_tags = {e.tag for e in original} - RECONCILED
    added, lost = sorted(received_tags - original_tags), sorted(original_tags - received_tags)
    assert not added and not lost, f"added {added}, lost {lost}"
    for tag in sorted(original_tags):
        assert received[tag] == original[tag], f"{received[tag]} != {original[tag]}"
    assert received.PixelData == original.PixelData


def _assert_original_identity_kept(received: Dataset, original: Dataset) -> None:
    """The sender's Other Patient IDs stay; the sender's own ID joins them, with its issuer."""
    items = list(received.OtherPatientIDsSequence)
    for item in original.get("OtherPatientIDsSequence", []):
        assert item in items
    assert any(
        item.PatientID == original.PatientID and item.IssuerOfPatientID == "SEG" for item in items
    ), items


def test_orthanc_echoes_the_gateway(peers: Peers) -> None:
    with peers.orthanc_a.client() as c:
        # Its own AE title and a routing AE title both answer a known caller.
        assert c.post("/modalities/gateway/echo", json={}).status_code == 200
        assert c.post("/modalities/to-rvh/echo", json={}).status_code == 200
        # A caller the gateway was not told about is refused, and the hub hears of it.
        assert c.post("/modalities/stranger/echo", json={}).status_code != 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        refused = [
            e
            for e in audit_events(peers.net, "dicom:association:refused")
            if e["detail"].get("calling_ae_title") == "STRANGER"
        ]
        if refused:
            break
        time.sleep(0.2)
    assert refused, "no dicom:association:refused event for STRANGER at the hub"
    assert refused[0]["outcome"] == "refused"
    assert refused[0]["source_address"] == "127.0.0.1"


def test_orthanc_to_orthanc_with_report_and_mapped_patient(peers: Peers, tmp_path: Path) -> None:
    study = generate_ct_study(
        tmp_path / "study",
        slices=20,
        rows=512,
        columns=512,
        patient_id="SEG778899",
        patient_name="MÜLLER^ZOË",
        nhs_number=MAPPED_NHS_NUMBER,
        accession_number="ACC0042",
    )
    transfer = _push_through_orthanc(peers, study)
    assert transfer["sender"] == "SEG"
    assert transfer["receiver"] == "RVH"
    assert transfer["calling_ae_title"] == "ORTHANC_A"

    pdf = minimal_pdf(["CT chest report", "", "No acute abnormality."])
    with peers.net.admin() as admin:
        r = admin.post(
            f"/api/v1/transfers/{transfer['id']}/reports",
            content=pdf,
            headers={"Content-Type": "application/pdf"},
            params={"title": "CT chest report"},
        )
        assert r.status_code == 201, r.text
    final = _wait_delivered(peers.net, transfer["id"])
    assert final["instances_delivered"] == len(study.paths)

    images, pdfs = _split(_received(peers.orthanc_b, study.study_instance_uid))
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, study.paths)}
    assert images.keys() == originals.keys()
    for uid, ds in images.items():
        original = originals[uid]
        assert ds.PatientID == MRN_AT_RVH
        assert ds.IssuerOfPatientID == "RVH"
        assert ds.AccessionNumber == "SEG-ACC0042"
        _assert_original_identity_kept(ds, original)
        _assert_unchanged_but_identity(ds, original)

    [report] = pdfs
    assert report.StudyInstanceUID == study.study_instance_uid
    assert report.PatientID == MRN_AT_RVH
    assert report.IssuerOfPatientID == "RVH"
    assert report.PatientName == "MÜLLER^ZOË"
    assert report.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(report.EncapsulatedDocument).startswith(pdf)
    assert final["reports"][0]["delivered_sop_instance_uid"] == report.SOPInstanceUID


def test_orthanc_unmatched_patient_keeps_a_foreign_id(peers: Peers, tmp_path: Path) -> None:
    study = generate_ct_study(
        tmp_path / "study",
        slices=3,
        rows=128,
        columns=128,
        patient_id="SEG123",
        nhs_number=UNMAPPED_NHS_NUMBER,
        accession_number="ACC0099",
    )
    transfer = _push_through_orthanc(peers, study)
    _wait_delivered(peers.net, transfer["id"])

    images, pdfs = _split(_received(peers.orthanc_b, study.study_instance_uid))
    assert not pdfs
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, study.paths)}
    assert images.keys() == originals.keys()
    for uid, ds in images.items():
        assert ds.PatientID == "EXT-SEG-SEG123"
        assert ds.IssuerOfPatientID == "RVH"
        assert ds.AccessionNumber == "SEG-ACC0099"
        _assert_original_identity_kept(ds, originals[uid])
        _assert_unchanged_but_identity(ds, originals[uid])

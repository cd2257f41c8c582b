"""The hub with its blobs in SeaweedFS (S3) instead of a local folder, everything else real:
a hub process, gateways and a PACS exchanging studies, DICOMweb retrieving them, and a
solicitor's package and a report read in the portal. Every blob goes into the bucket under
its digest, and out of it to each caller by streaming; the hub keeps none on its disk."""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from conftest import require_tool
from hubapp import INSIDE, InProcessHub
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.part10 import read_meta
from imagebridge.dicom.reports import minimal_pdf
from imagebridge.gateway.hubclient import HubClient, HubUnavailable
from imagebridge.storage.blobs import blob_name
from seaweed import SeaweedServer
from test_dicomweb import parts, token_for
from test_exchange import (
    MiniPacsFactory,
    assert_arrived_intact,
    assert_no_tracebacks,
    delivered,
    make_study,
    send,
    spool_digest,
    start_receiver,
    start_sender,
    wait_until,
)

MiB = 1024 * 1024
SECRET_ENV = "IMAGEBRIDGE_HUB_BLOB_STORE__SECRET_ACCESS_KEY"


def store_settings(seaweedfs: SeaweedServer, bucket: str) -> dict[str, Any]:
    """Objects over 5 MiB (the smallest part S3 allows) go in parts of that size."""
    return seaweedfs.blob_store(bucket, multipart_threshold=5 * MiB, multipart_part_size=5 * MiB)


def bucket_digests(seaweedfs: SeaweedServer, bucket: str) -> dict[str, str]:
    """Digest -> ETag of every object in the bucket, each checked to be named as the local
    store names its files."""
    pages = seaweedfs.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    found = {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}
    out = {key.rpartition("/")[2]: etag.strip('"') for key, etag in found.items()}
    assert set(found) == {f"blobs/{blob_name(d)}" for d in out}
    return out


def local_blobs(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]


@pytest.fixture
def net(tmp_path: Path, seaweedfs: SeaweedServer) -> Iterator[tuple[Network, str]]:
    bucket = seaweedfs.create_bucket()
    network = Network(tmp_path / "net", env={SECRET_ENV: seaweedfs.secret_key})
    try:
        network.start_hub(inbox_wait_seconds=1.0, blob_store=store_settings(seaweedfs, bucket))
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        with network.admin() as admin:
            admin.put(
                "/api/v1/institutions/SEG/trusted-networks", json={"cidrs": ["127.0.0.0/8"]}
            ).raise_for_status()
        yield network, bucket
    finally:
        network.stop()
    assert_no_tracebacks(network)


def test_an_exchange_through_seaweedfs(
    net: tuple[Network, str], seaweedfs: SeaweedServer, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    network, bucket = net
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(network)
    start_receiver(network, "RVH", pacs.port)
    small = make_study(tmp_path / "small")
    # Over the multipart threshold: each slice goes into the bucket in two parts.
    large = generate_ct_study(tmp_path / "large", slices=2, rows=1700, columns=1700)
    assert min(p.stat().st_size for p in large.paths) > 5 * MiB

    send(seg, "IB_RVH", small)
    send(seg, "IB_RVH", large)
    delivered(network, small.study_instance_uid)
    delivered(network, large.study_instance_uid)
    assert_arrived_intact(pacs, small)
    assert_arrived_intact(pacs, large)
    stored = bucket_digests(seaweedfs, bucket)
    sent = {spool_digest(p) for p in [*small.paths, *large.paths]}
    assert set(stored) == sent
    assert all(stored[spool_digest(p)].endswith("-2") for p in large.paths)
    assert local_blobs(network.root / "hub") == []

    # Sent again, the study goes by reference to what the bucket holds.
    send(seg, "IB_RVH", small)
    delivered(network, small.study_instance_uid, 2)
    assert set(bucket_digests(seaweedfs, bucket)) == sent

    # A report attached through the API is stored in the bucket and reaches the PACS.
    with network.admin() as admin:
        r = admin.post(
            "/api/v1/transfers",
            json={
                "sender": "SEG",
                "receiver": "RVH",
                "study_instance_uids": [large.study_instance_uid],
            },
        )
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        pdf = minimal_pdf(["CT: no acute abnormality."])
        r = admin.post(
            f"/api/v1/transfers/{tid}/reports",
            content=pdf,
            headers={"Content-Type": "application/pdf"},
        )
        assert r.status_code == 201, r.text
        wait_until(
            "the report delivered",
            lambda: all(
                x["status"] == "delivered"
                for x in admin.get(f"/api/v1/transfers/{tid}").json()["reports"]
            ),
        )
    assert hashlib.sha256(pdf).hexdigest() in bucket_digests(seaweedfs, bucket)
    delivered_pdfs = [ds for p in pacs.received() if "EncapsulatedDocument" in (ds := dcmread(p))]
    assert [ds.EncapsulatedDocument.rstrip(b"\0") for ds in delivered_pdfs] == [pdf]

    # DICOMweb reads from the bucket: whole instances, and a frame found by seeking.
    token = token_for(
        network, "SEG", "seg.radiologist", "radiologist", ["view_studies", "download"]
    )
    with httpx.Client(
        base_url=f"{network.hub_url}/dicomweb",
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    ) as c:
        r = c.get(
            f"/studies/{large.study_instance_uid}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
    assert r.status_code == 200, r.text
    assert {hashlib.sha256(data).hexdigest() for _, data in parts(r)} == {
        spool_digest(p) for p in large.paths
    }
    client = DICOMwebClient(
        url=f"{network.hub_url}/dicomweb", headers={"Authorization": f"Bearer {token}"}
    )
    ds = dcmread(large.paths[1])
    [frame] = client.retrieve_instance_frames(
        large.study_instance_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1]
    )
    assert frame == ds.PixelData
    assert local_blobs(network.root / "hub") == []


# -- in-process: the share package and the portal's report ------------------------------------


@pytest.fixture
def hub_on_s3(
    tmp_path: Path, seaweedfs: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[InProcessHub, str]]:
    bucket = seaweedfs.create_bucket()
    for key, value in store_settings(seaweedfs, bucket).items():
        monkeypatch.setenv(f"IMAGEBRIDGE_HUB_BLOB_STORE__{key.upper()}", str(value))
    monkeypatch.setenv(SECRET_ENV, seaweedfs.secret_key)
    t = InProcessHub(tmp_path / "hub")
    t.add_institution("SEG")
    t.add_institution("RVH")
    t.add_user("SEG", "doctor", ["radiologist"])
    t.add_user("SEG", "solicitor", [], external=True)
    yield t, bucket
    t.close()


def test_a_share_package_and_a_report_come_out_of_the_bucket(
    hub_on_s3: tuple[InProcessHub, str], seaweedfs: SeaweedServer, tmp_path: Path
) -> None:
    dcmdump = require_tool("/usr/bin/dcmdump")
    hub, bucket = hub_on_s3
    study = generate_ct_study(tmp_path / "study", slices=3, rows=64, columns=64)
    tid = hub.upload("SEG", "RVH", study.paths)
    pdf = minimal_pdf(["CT head: no acute abnormality."])
    r = hub.client().post(
        f"/api/v1/transfers/{tid}/reports",
        headers={
            "Authorization": f"Bearer {hub.gateway_token('SEG')}",
            "Content-Type": "application/pdf",
        },
        content=pdf,
    )
    assert r.status_code == 201, r.text
    report_id = r.json()["id"]
    stored = bucket_digests(seaweedfs, bucket)
    assert set(stored) == {hashlib.sha256(p.read_bytes()).hexdigest() for p in study.paths} | {
        hashlib.sha256(pdf).hexdigest()
    }
    assert local_blobs(tmp_path / "hub") == []

    doctor = hub.log_in("doctor", INSIDE)
    r = doctor.get(f"/portal/reports/{report_id}")
    assert r.status_code == 200 and r.content == pdf
    assert r.headers["content-type"] == "application/pdf"

    r = doctor.post(
        "/api/v1/shares",
        json={
            "grantee": "solicitor",
            "study_instance_uids": [study.study_instance_uid],
            "purpose": "Personal injury claim 2026/113",
            "days": 7,
        },
    )
    assert r.status_code == 201, r.text
    solicitor = hub.log_in("solicitor", INSIDE)
    r = solicitor.get(f"/api/v1/shared/{r.json()['id']}/package")
    assert r.status_code == 200, r.text
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        archive.extractall(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    by_uid = {read_meta(io.BytesIO(p.read_bytes())).sop_instance_uid: p for p in files}
    for path in study.paths:
        sent = dcmread(path)
        assert dcmread(by_uid[sent.SOPInstanceUID]).PixelData == sent.PixelData
    dump = subprocess.run(
        [dcmdump, str(folder / "DICOMDIR")], capture_output=True, text=True, check=True
    )
    assert dump.stdout.count("(0004,1430) CS [IMAGE") == 3
    assert "ENCAP DOC" in dump.stdout


def test_a_bucket_that_refuses_a_write_is_answered_503_and_nothing_is_kept(
    seaweedfs: SeaweedServer, tmp_path: Path
) -> None:
    """The hub's credentials may read the bucket but not write it (a policy gone wrong): a
    gateway's upload is answered 503 with the store's reason (the gateway backs off and
    sends again), never a 500, and the transfer holds nothing of the batch."""
    bucket = seaweedfs.create_bucket()
    network = Network(tmp_path / "net", env={SECRET_ENV: seaweedfs.reader_secret})
    study = make_study(tmp_path / "study", slices=2)
    try:
        settings = store_settings(seaweedfs, bucket) | {"access_key_id": seaweedfs.reader_key}
        network.start_hub(blob_store=settings)
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        hub = HubClient(network.hub_url, network.issue_token("SEG"))
        try:
            made = hub.create_transfer(
                receiver="RVH", priority="routine", origin="dicom", calling_ae_title="PACS"
            )
            items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in study.paths]
            with pytest.raises(HubUnavailable, match="503: the blob store is unavailable"):
                hub.upload(made["id"], items)
        finally:
            hub.close()
        with network.admin() as admin:
            transfer = admin.get(f"/api/v1/transfers/{made['id']}").json()
        assert transfer["instances_total"] == 0
        assert "Traceback" not in (network.root / "hub.log").read_text()
    finally:
        network.stop()

"""The last batch of a transfer closes it in the same request and transaction; sent again
(its answer lost on the way), it finds the transfer closed and is answered from what the
transfer carries, changing nothing. A gateway whose study is complete when its last batch
leaves (after an outage, every study) sends it that way."""

from __future__ import annotations

import hashlib
import uuid
from contextlib import closing
from pathlib import Path

import httpx
import pydicom
import pytest

from conftest import audit_events
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.gateway.hubclient import HubClient, HubError
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.spool import Spool
from imagebridge.gateway.uploader import Uploader
from imagebridge.settings import GatewaySettings

DECLARED = {"instances_declared": 4, "declared_by": "gateway", "interrupted": False}


def study_of(folder: Path) -> StudyFiles:
    return generate_ct_study(folder, slices=4, rows=64, columns=64, patient_id="SEG7001")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def opened(client: HubClient) -> str:
    made = client.create_transfer(
        receiver="RVH", origin="dicom", idempotency_key=uuid.uuid4().hex, reason="test"
    )
    transfer_id: str = made["id"]
    return transfer_id


def test_a_closing_batch_closes_its_transfer_and_a_replay_changes_nothing(
    network: Network, tmp_path: Path
) -> None:
    study = study_of(tmp_path / "study")
    items: list[tuple[str, Path | None]] = [(digest(p), p) for p in study.paths]
    token = network.issue_token("SEG")
    with closing(HubClient(network.hub_url, token)) as client:
        tid = opened(client)
        first = client.upload(tid, items, close=True, declared=DECLARED)
        assert sorted(first["accepted"]) == sorted(d for d, _ in items)
        assert first["refused"] == [] and first["status"] == "queued"

        # The answer was lost: the gateway sends the same batch again.
        again = client.upload(tid, items, close=True, declared=DECLARED)
        assert again["accepted"] == first["accepted"] and again["refused"] == []
        # One digest the transfer never carried: refused, saying why.
        stranger = hashlib.sha256(b"not in this transfer").hexdigest()
        mixed = client.upload(tid, [(stranger, None), *items[:1]], close=True)
        assert mixed["accepted"] == [items[0][0]]
        assert mixed["refused"] == [
            {"sha256": stranger, "reason": "transfer is queued, no longer receiving"}
        ]
        # Without close, a closed transfer takes nothing, as before.
        with pytest.raises(HubError, match="no longer receiving"):
            client.upload(tid, items[:1])
        # A declaration belongs to a closing batch only.
        r = httpx.post(
            f"{network.hub_url}/api/v1/transfers/{tid}/instances?instances_declared=4",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 422 and "close=true" in r.json()["detail"]

    with network.admin() as admin:
        t = admin.get(f"/api/v1/transfers/{tid}").json()
    assert t["instances_total"] == 4 and t["instances_declared"] == 4
    assert t["declared_by"] == "gateway" and t["received_at"] is not None
    received = [e for e in audit_events(network, "transfer:transfer:received")]
    assert [e["transfer_ref"] for e in received] == [tid]
    batches = audit_events(network, "transfer:instances:received")
    assert [e["detail"]["instances"] for e in batches if e["transfer_ref"] == tid] == [4]


def test_a_closing_batch_with_a_refused_instance_closes_the_transfer_short(
    network: Network, tmp_path: Path
) -> None:
    study = study_of(tmp_path / "study")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 64)
    items: list[tuple[str, Path | None]] = [(digest(p), p) for p in [*study.paths[:3], broken]]
    with closing(HubClient(network.hub_url, network.issue_token("SEG"))) as client:
        tid = opened(client)
        answer = client.upload(tid, items, close=True, declared=DECLARED)
        assert len(answer["accepted"]) == 3
        assert [r["sha256"] for r in answer["refused"]] == [items[3][0]]
        # Sent again, its answer lost: the same answer, with the first one's reason.
        again = client.upload(tid, items, close=True, declared=DECLARED)
        assert again == answer, (again, answer)
    with network.admin() as admin:
        t = admin.get(f"/api/v1/transfers/{tid}").json()
    # Closed with 3 of the 4 declared: never delivered as complete.
    assert t["status"] == "queued" and t["instances_total"] == 3
    assert t["instances_declared"] == 4


def test_a_gateway_sends_a_complete_study_in_one_request_after_the_opening(
    network: Network, tmp_path: Path
) -> None:
    """Its study closed before the first batch leaves, the uploader opens the transfer
    (asking which blobs the hub lacks) and sends the batch that closes it: one step, two
    requests, and the spool is empty."""
    study = study_of(tmp_path / "study")
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    association: set[str] = set()
    for path in study.paths:
        ds = pydicom.dcmread(path)
        meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        spool.accept(
            path.read_bytes()[meta_end:],
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            destination="RVH",
            priority="routine",
            study_instance_uid=study.study_instance_uid,
            calling_ae_title="PACS_SEG",
            association=association,
        )
    spool.association_ended(association)
    spool.close_stable(0.0)
    settings = GatewaySettings(hub_url=network.hub_url, token="unused")
    requests: list[str] = []
    with closing(HubClient(network.hub_url, network.issue_token("SEG"))) as client:
        # The real client, its calls noted on the way through.
        for name in ("create_transfer", "missing", "upload", "close_transfer"):
            call = getattr(client, name)

            def noted(
                *args: object, _name: str = name, _call: object = call, **kw: object
            ) -> object:
                requests.append(_name)
                return _call(*args, **kw)  # type: ignore[operator]

            setattr(client, name, noted)
        uploader = Uploader(settings, spool, client, Journal(tmp_path / "journal"))
        assert uploader.step()
    assert requests == ["create_transfer", "upload"]
    assert spool.pending_count() == 0 and not list(spool.out.iterdir())
    with network.admin() as admin:
        (t,) = [
            t
            for t in admin.get("/api/v1/transfers").json()
            if t["studies"] and t["studies"][0]["study_instance_uid"] == study.study_instance_uid
        ]
    assert t["status"] == "queued" and t["instances_total"] == t["instances_declared"] == 4

"""A large blob of an uploaded batch is checked and made ready to store as soon as it has
arrived, while the rest of the batch is still on its way (synced in a folder; uploaded to an
object store). Refusals keep their reasons, nothing refused is stored, and in a folder a
batch that fails part-way keeps nothing of itself."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest

from fuzz.http_inputs import with_preamble
from hubapp import InProcessHub
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.transfers.framing import MEDIA_TYPE, frame_header
from imagebridge.transfers.routes import INTAKE_BYTES
from seaweed import SeaweedServer
from test_storage_exchange import SECRET_ENV, bucket_digests, store_settings


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[InProcessHub]:
    h = InProcessHub(tmp_path / "hub")
    h.add_institution("SEG")
    h.add_institution("RVH")
    yield h
    h.close()


def stored(hub: InProcessHub) -> set[str]:
    root = hub.hub.settings.resolved_blob_dir
    return {p.name for p in root.rglob("*") if p.is_file() and p.parent != root / "tmp"}


def staged(hub: InProcessHub) -> list[Path]:
    """The staged files left, once the checks still running have let go of theirs."""
    tmp = hub.hub.settings.resolved_blob_dir / "tmp"
    deadline = time.monotonic() + 10
    while (left := list(tmp.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def framed(digests: list[str], blobs: list[bytes]) -> bytes:
    return b"".join(frame_header(s, len(d)) + d for s, d in zip(digests, blobs, strict=True))


def open_transfer(hub: InProcessHub) -> tuple[str, dict[str, str]]:
    gateway = {"Authorization": f"Bearer {hub.gateway_token('SEG')}"}
    r = hub.client().post(
        "/api/v1/transfers", headers=gateway, json={"receiver": "RVH", "origin": "dicom"}
    )
    assert r.status_code == 201, r.text
    return r.json()["id"], gateway


def test_large_blobs_are_checked_as_they_arrive_each_refused_with_its_reason(
    hub: InProcessHub, tmp_path: Path
) -> None:
    large = generate_ct_study(tmp_path / "large", slices=4, rows=512, columns=512)
    small = generate_ct_study(tmp_path / "small", slices=1, rows=16, columns=16)
    good, polyglot, liar, other = (p.read_bytes() for p in large.paths)
    polyglot = with_preamble(polyglot)
    tiny = small.paths[0].read_bytes()
    assert min(len(good), len(polyglot), len(liar), len(other)) >= INTAKE_BYTES > len(tiny)

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    claimed = sha(other)  # announced for the bytes of another instance
    announced = [sha(good), sha(polyglot), claimed, sha(tiny)]
    transfer, gateway = open_transfer(hub)
    intake, submitted = hub.hub.intake, []

    def submit(*args: Any) -> Future[Any]:  # the real pool, each handing noted
        submitted.append(args[1:])
        return real_submit(*args)

    real_submit, intake.submit = intake.submit, submit  # type: ignore[method-assign]
    r = hub.client().post(
        f"/api/v1/transfers/{transfer}/instances",
        headers={**gateway, "Content-Type": MEDIA_TYPE},
        content=framed(announced, [good, polyglot, liar, tiny]),
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["accepted"] == [sha(good), sha(tiny)]
    assert answer["refused"] == [
        {"sha256": sha(polyglot), "reason": "the 128-byte preamble is not zeros"},
        {"sha256": claimed, "reason": f"content hashes to {sha(liar)}, not {claimed}"},
    ]
    assert stored(hub) == {sha(good), sha(tiny)}
    assert staged(hub) == []
    # The large ones were checked as they arrived, the small one with its batch.
    assert [sha256 for _, sha256 in submitted] == announced[:3]
    refused = hub.admin("GET", "/api/v1/audit", params={"action": "transfer:instances:refused"})
    assert [e["sha256"] for e in refused.json()[-1]["detail"]["refused"]] == [
        sha(polyglot),
        claimed,
    ]


def test_a_batch_cut_short_after_large_blobs_arrived_keeps_nothing(
    hub: InProcessHub, tmp_path: Path
) -> None:
    study = generate_ct_study(tmp_path / "ct", slices=3, rows=512, columns=512)
    blobs = [p.read_bytes() for p in study.paths]
    digests = [hashlib.sha256(d).hexdigest() for d in blobs]
    whole = framed(digests[:2], blobs[:2])
    # The third frame announces its length, and the body ends half-way through it.
    body = whole + frame_header(digests[2], len(blobs[2])) + blobs[2][: len(blobs[2]) // 2]
    transfer, gateway = open_transfer(hub)
    r = hub.client().post(
        f"/api/v1/transfers/{transfer}/instances",
        headers={**gateway, "Content-Type": MEDIA_TYPE},
        content=body,
    )
    assert r.status_code == 400, r.text
    assert "malformed blob stream" in r.json()["detail"]
    assert staged(hub) == []
    assert stored(hub) == set()
    r = hub.client().get(f"/api/v1/transfers/{transfer}", headers=gateway)
    assert r.status_code == 200, r.text
    assert r.json()["instances_total"] == 0
    # Sent again whole, the same blobs are taken.
    r = hub.client().post(
        f"/api/v1/transfers/{transfer}/instances",
        headers={**gateway, "Content-Type": MEDIA_TYPE},
        content=framed(digests, blobs),
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == digests
    assert stored(hub) == set(digests)
    assert staged(hub) == []


def test_in_a_bucket_only_the_large_blobs_that_pass_their_checks_are_uploaded(
    seaweedfs: SeaweedServer, tmp_path: Path
) -> None:
    bucket = seaweedfs.create_bucket()
    network = Network(tmp_path / "net", env={SECRET_ENV: seaweedfs.secret_key})
    study = generate_ct_study(tmp_path / "ct", slices=3, rows=512, columns=512)
    good, polyglot, liar = (p.read_bytes() for p in study.paths)
    polyglot = with_preamble(polyglot)
    digests = [hashlib.sha256(d).hexdigest() for d in (good, polyglot)] + ["0" * 64]
    try:
        network.start_hub(blob_store=store_settings(seaweedfs, bucket))
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        gateway = {"Authorization": f"Bearer {network.issue_token('SEG')}"}
        with httpx.Client(base_url=network.hub_url, headers=gateway, timeout=60) as client:
            r = client.post("/api/v1/transfers", json={"receiver": "RVH", "origin": "dicom"})
            assert r.status_code == 201, r.text
            r = client.post(
                f"/api/v1/transfers/{r.json()['id']}/instances",
                headers={"Content-Type": MEDIA_TYPE},
                content=framed(digests, [good, polyglot, liar]),
            )
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == digests[:1]
        assert [x["sha256"] for x in r.json()["refused"]] == digests[1:]
        assert set(bucket_digests(seaweedfs, bucket)) == set(digests[:1])
    finally:
        network.stop()

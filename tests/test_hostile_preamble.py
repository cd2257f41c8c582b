"""A DICOM file with an executable hidden in its 128-byte preamble (a PE/DICOM polyglot, as
in CVE-2019-11687) is neutralised on every path: the preamble is never passed on as
received, neither by what the hub stores, nor by WADO-RS, nor to the receiving PACS, nor in
a share package.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import require_tool, settled_files
from fuzz.figures import input_path
from fuzz.http_inputs import EXECUTABLE, with_preamble
from hubapp import INSIDE, InProcessHub
from imagebridge.demo.network import Network, free_port, stop_process, wait_for_port
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.transfers.framing import MEDIA_TYPE, frame_header

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00\x01\x00\x00\x00"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_BODY = 'multipart/related; type="application/dicom"; boundary=polyglot'


def polyglot(study: StudyFiles, preamble: bytes, folder: Path) -> list[Path]:
    """The study's files, each carrying ``preamble`` (an executable's first bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in study.paths:
        target = folder / path.name
        target.write_bytes(with_preamble(path.read_bytes(), preamble))
        out.append(target)
    return out


def assert_neutralised(data: bytes, preamble: bytes) -> None:
    """A Part 10 file whose preamble is zeros, and which holds nothing of the executable."""
    assert data[128:132] == b"DICM"
    assert data[:128] == bytes(128)
    assert preamble[:24] not in data


def wado_instances(answer: httpx.Response) -> list[bytes]:
    """The Part 10 files of a multipart WADO-RS answer."""
    boundary = answer.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = answer.content.split(b"--" + boundary.encode())[1:-1]
    return [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts]


# -- through the network, from a PACS to a PACS --------------------------------------------------


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp as the receiving PACS: it writes each file it receives."""
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [require_tool(STORESCP), "-aet", "PACS_RVH", "-od", str(folder), "+B", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, None)
        yield port, folder
    finally:
        stop_process(process)


@input_path("DICOM files with an executable in the preamble")
def test_a_polyglot_sent_by_a_pacs_arrives_without_its_executable(
    network: Network, storescp: tuple[int, Path], tmp_path: Path
) -> None:
    port, received = storescp
    study = generate_ct_study(tmp_path / "ct", slices=3, rows=32, columns=32)
    files = polyglot(study, EXECUTABLE, tmp_path / "polyglot")
    seg = network.start_gateway(
        "SEG", calling_aes=[{"ae_title": "PACS_SEG", "host": "127.0.0.1"}], study_stable_seconds=1
    )
    network.start_gateway(
        "RVH",
        calling_aes=[],
        pacs=[{"name": "pacs", "ae_title": "PACS_RVH", "host": "127.0.0.1", "port": port}],
    )
    storescu = [require_tool(STORESCU), "-aet", "PACS_SEG", "-aec", "IB_RVH"]
    subprocess.run(
        [*storescu, "127.0.0.1", str(seg.port), *map(str, files)],
        env=DCMTK_ENV,
        check=True,
        capture_output=True,
        timeout=60,
    )
    arrived = settled_files(received, len(files))
    assert len(arrived) == len(files)
    for path in arrived:  # what the receiving PACS got
        assert_neutralised(path.read_bytes(), EXECUTABLE)
    blobs = [p for p in (network.root / "hub" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == len(files)
    for path in blobs:  # what the hub stores
        assert_neutralised(path.read_bytes(), EXECUTABLE)
    token = network.user_token("SEG", "radiologist", ["radiologist"], ["view_studies", "download"])
    with httpx.Client(base_url=network.hub_url, timeout=60) as c:
        r = c.get(
            f"/dicomweb/studies/{study.study_instance_uid}",
            headers={"Authorization": f"Bearer {token}", "Accept": WADO_ACCEPT},
        )
    assert r.status_code == 200, r.text[:300]
    instances = wado_instances(r)
    assert len(instances) == len(files)
    for data in instances:  # what WADO-RS returns
        assert_neutralised(data, EXECUTABLE)


# -- into the hub directly -----------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[InProcessHub]:
    h = InProcessHub(tmp_path / "hub")
    h.add_institution("SEG")
    h.add_institution("RVH")
    h.add_user("SEG", "doctor", ["radiologist", "clerk"])
    h.add_user("SEG", "solicitor", [], external=True)
    yield h
    h.close()


def stored(hub: InProcessHub) -> list[Path]:
    root = hub.hub.settings.resolved_blob_dir
    return [p for p in root.rglob("*") if p.is_file() and p.parent != root / "tmp"]


def stow(hub: InProcessHub, files: list[Path]) -> httpx.Response:
    doctor = hub.log_in("doctor", INSIDE)
    body = b"".join(
        b"--polyglot\r\nContent-Type: application/dicom\r\n\r\n" + p.read_bytes() + b"\r\n"
        for p in files
    )
    return doctor.post(
        "/dicomweb/studies",
        content=body + b"--polyglot--\r\n",
        headers={"Content-Type": DICOM_BODY, "Accept": "application/dicom+json"},
    )


@pytest.mark.parametrize("preamble", [EXECUTABLE, ELF], ids=["PE", "ELF"])
@input_path("DICOM files with an executable in the preamble")
def test_a_polyglot_stored_with_stow_rs_is_kept_with_a_zero_preamble(
    hub: InProcessHub, tmp_path: Path, preamble: bytes
) -> None:
    study = generate_ct_study(tmp_path / "ct", slices=2, rows=16, columns=16)
    r = stow(hub, polyglot(study, preamble, tmp_path / "polyglot"))
    assert r.status_code == 200, r.text
    blobs = stored(hub)
    assert len(blobs) == 2
    for path in blobs:
        assert_neutralised(path.read_bytes(), preamble)


@input_path("DICOM files with an executable in the preamble")
def test_a_polyglot_uploaded_by_a_gateway_is_refused_with_its_reason(
    hub: InProcessHub, tmp_path: Path
) -> None:
    """Gateways zero the preamble themselves; one that does not is not trusted to."""
    study = generate_ct_study(tmp_path / "ct", slices=1, rows=16, columns=16)
    data = with_preamble(study.paths[0].read_bytes())
    sha = hashlib.sha256(data).hexdigest()
    gateway = {"Authorization": f"Bearer {hub.gateway_token('SEG')}"}
    client = hub.client()
    r = client.post(
        "/api/v1/transfers", headers=gateway, json={"receiver": "RVH", "origin": "dicom"}
    )
    assert r.status_code == 201, r.text
    transfer = r.json()["id"]
    r = client.post(
        f"/api/v1/transfers/{transfer}/instances",
        headers={**gateway, "Content-Type": MEDIA_TYPE},
        content=frame_header(sha, len(data)) + data,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "accepted": [],
        "refused": [{"sha256": sha, "reason": "the 128-byte preamble is not zeros"}],
        "status": "receiving",
    }
    refused = hub.admin("GET", "/api/v1/audit", params={"action": "transfer:instances:refused"})
    assert refused.json()[-1]["detail"]["refused"][0]["sha256"] == sha
    assert stored(hub) == []


@input_path("DICOM files with an executable in the preamble")
def test_a_blob_stored_before_the_hub_refused_polyglots_is_still_passed_on_neutralised(
    hub: InProcessHub, tmp_path: Path
) -> None:
    """A stored file is given an executable preamble behind the hub's back (as an older
    hub would have kept it): WADO-RS and the share package still send zeros."""
    study = generate_ct_study(tmp_path / "ct", slices=2, rows=16, columns=16)
    assert stow(hub, study.paths).status_code == 200
    for path in stored(hub):
        path.write_bytes(with_preamble(path.read_bytes()))
    doctor = hub.log_in("doctor", INSIDE)
    r = doctor.get(f"/dicomweb/studies/{study.study_instance_uid}", headers={"Accept": WADO_ACCEPT})
    assert r.status_code == 200, r.text[:300]
    for data in wado_instances(r):
        assert_neutralised(data, EXECUTABLE)
    r = doctor.post(
        "/api/v1/shares",
        json={
            "grantee": "solicitor",
            "study_instance_uids": [study.study_instance_uid],
            "purpose": "Personal injury claim",
            "days": 7,
        },
    )
    assert r.status_code == 201, r.text
    solicitor = hub.log_in("solicitor", INSIDE)
    package = solicitor.get(f"/api/v1/shared/{r.json()['id']}/package")
    assert package.status_code == 200, package.text[:300]
    with zipfile.ZipFile(io.BytesIO(package.content)) as archive:
        files = [archive.read(n) for n in archive.namelist() if not n.endswith("DICOMDIR")]
    assert len(files) == 2
    for data in files:
        assert_neutralised(data, EXECUTABLE)

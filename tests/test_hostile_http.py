"""Hostile bodies and parameters at the hub's HTTP edges, through its real application:
STOW-RS multipart bodies, QIDO-RS searches, the gateways' framed blob stream and uploaded
reports.

No answer is a 5xx (the in-process transport raises any error the application lets out);
each refusal says why; the blob store holds only whole blobs and no preamble as sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from fuzz.checks import assert_blob_store_whole
from fuzz.figures import budget, input_path
from fuzz.http_inputs import (
    Part10,
    StowRequest,
    broken_frame_streams,
    fhir_patients,
    fhir_requests,
    frame_streams,
    qido_searches,
    reports,
    retrieve_requests,
    stow_requests,
)
from hubapp import HubClient, InProcessHub, Person
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.part10 import read_meta
from imagebridge.transfers.framing import MEDIA_TYPE, frame_header

DICOM_JSON = "application/dicom+json"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    h = InProcessHub(tmp_path_factory.mktemp("hostile-http"))
    try:
        h.add_institution("SEG")
        h.add_institution("RVH")
        h.add_user("SEG", "pacs", ["pacs_manager"])
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def pacs(hub: InProcessHub) -> Person:
    """SEG's PACS manager: sends (STOW-RS), queries and retrieves."""
    return hub.log_in("pacs")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Part10]:
    study = generate_ct_study(tmp_path_factory.mktemp("ct"), slices=4, rows=16, columns=16)
    out = []
    for path in study.paths:
        data = path.read_bytes()
        out.append(Part10(data, read_meta(io.BytesIO(data)).sop_instance_uid))
    return out


@pytest.fixture(scope="module")
def gateway(hub: InProcessHub) -> dict[str, str]:
    return {"Authorization": f"Bearer {hub.gateway_token('SEG')}"}


def blob_root(hub: InProcessHub) -> Path:
    return hub.hub.settings.resolved_blob_dir


def assert_refusal_says_why(r: httpx.Response) -> None:
    """A 4xx answer names its reason: a JSON detail, or a DICOMweb Warning header."""
    if r.status_code < 400:
        return
    reason = r.headers.get("warning", "")
    if r.headers.get("content-type", "").startswith("application/json"):
        reason = reason or str(r.json().get("detail", ""))
    assert reason.strip(), f"{r.status_code} without a reason"


def refusals(hub: InProcessHub) -> int:
    """Audit events of refused or failed requests so far."""
    with hub.hub.engine.connect() as connection:
        query = "SELECT count(*) FROM audit_events WHERE outcome IN ('refused', 'failure')"
        count: int = connection.execute(text(query)).scalar_one()
        return count


def assert_refusal_audited(hub: InProcessHub, before: int, r: httpx.Response) -> None:
    if r.status_code >= 400 or r.status_code == 202:  # 202: some parts refused
        assert refusals(hub) > before, f"{r.status_code} left no audit event"


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def stored_and_failed(r: httpx.Response) -> tuple[int, int]:
    answer: dict[str, Any] = r.json() if r.content else {}
    stored = len(answer.get("00081199", {}).get("Value", []))
    failed = len(answer.get("00081198", {}).get("Value", []))
    return stored, failed


# -- STOW-RS -------------------------------------------------------------------------------------


@budget(60)
@given(data=st.data())
@input_path("HTTP: STOW-RS multipart bodies")
def test_stow_bodies_store_whole_parts_and_refuse_the_rest(
    hub: InProcessHub, pacs: Person, files: list[Part10], data: st.DataObject
) -> None:
    request: StowRequest = data.draw(stow_requests(files))
    before = refusals(hub)
    r = pacs.post(
        "/dicomweb/studies",
        content=_chunks(request.body, request.chunk),
        headers={"Content-Type": request.content_type, "Accept": DICOM_JSON},
    )
    assert r.status_code in (200, 202, 400, 409, 413, 415), (r.status_code, r.text[:300])
    assert_refusal_says_why(r)
    assert_refusal_audited(hub, before, r)
    if request.well_formed:
        expected = sum(p.stored for p in request.parts)
        assert stored_and_failed(r) == (expected, len(request.parts) - expected), [
            p.kind for p in request.parts
        ]
        assert r.status_code == (
            200 if expected == len(request.parts) else 202 if expected else 400
        )
    assert_blob_store_whole(blob_root(hub))


# -- QIDO-RS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(pacs: Person, files: list[Part10]) -> tuple[str, str, str]:
    """The CT is stored, so that searches have something to find; its study, series and
    an instance."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.data + b"\r\n"
        for f in files
    )
    r = pacs.post(
        "/dicomweb/studies",
        content=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    assert r.status_code == 200, r.text
    found = pacs.get("/dicomweb/instances", headers={"Accept": DICOM_JSON}).json()
    uids = [found[0][tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")]
    return uids[0], uids[1], uids[2]


@budget(150)
@given(data=st.data())
@input_path("HTTP: QIDO-RS parameters")
def test_qido_searches_answer_or_say_what_is_wrong(
    hub: InProcessHub, pacs: Person, indexed: tuple[str, str, str], data: st.DataObject
) -> None:
    path, params, accept = data.draw(qido_searches(*indexed[:2]))
    headers = {"Accept": accept} if accept is not None else {}
    before = refusals(hub)
    r = pacs.get("/dicomweb" + path, params=params, headers=headers)
    assert r.status_code in (200, 204, 400, 404, 406), (r.status_code, r.text[:300])
    assert_refusal_says_why(r)
    assert_refusal_audited(hub, before, r)
    if r.status_code == 200:
        assert isinstance(r.json(), list)


@budget(100)
@given(data=st.data())
@input_path("HTTP: WADO-RS parameters")
def test_retrieves_answer_or_say_what_is_wrong(
    hub: InProcessHub, pacs: Person, indexed: tuple[str, str, str], data: st.DataObject
) -> None:
    path, params, accept = data.draw(retrieve_requests(*indexed))
    headers = {"Accept": accept} if accept is not None else {}
    before = refusals(hub)
    r = pacs.get("/dicomweb" + path, params=params, headers=headers)
    assert r.status_code in (200, 400, 404, 406), (path, r.status_code, r.text[:300])
    assert_refusal_says_why(r)
    assert_refusal_audited(hub, before, r)
    if r.content[128:132] == b"DICM":
        assert not any(r.content[:128]), "a preamble passed on"


@budget(100)
@given(data=st.data())
@input_path("HTTP: FHIR PIXm/PDQm parameters")
def test_patient_lookups_answer_or_say_what_is_wrong(
    hub: InProcessHub, pacs: Person, data: st.DataObject
) -> None:
    path, params = data.draw(fhir_requests())
    before = refusals(hub)
    r = pacs.get(path, params=params)
    assert_refusal_audited(hub, before, r)
    # 307: "/fhir/Patient/" is redirected to "/fhir/Patient".
    assert r.status_code in (200, 307, 400, 403, 404), (path, r.status_code, r.text[:300])
    if r.status_code >= 400 and "detail" not in r.json():  # else: no such route at all
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["diagnostics"]


@budget(60)
@given(data=st.data())
@input_path("HTTP: FHIR Patient feed bodies")
def test_patient_feeds_register_or_say_what_is_wrong(pacs: Person, data: st.DataObject) -> None:
    body = json.dumps(data.draw(fhir_patients())).encode()
    identifier = data.draw(st.sampled_from(["urn:imagebridge:issuer:SEG|A123456", "x|y", ""]))
    r = pacs.request(
        "PUT",
        "/fhir/Patient",
        params={"identifier": identifier},
        content=body,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert r.status_code in (200, 201, 400, 403, 404, 409, 412, 422), (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.json()["resourceType"] == "OperationOutcome", r.text[:300]


# -- the gateways' framed blob stream ------------------------------------------------------------


def open_transfer(client: HubClient, gateway: dict[str, str]) -> str:
    r = client.post(
        "/api/v1/transfers",
        headers=gateway,
        json={"receiver": "RVH", "origin": "dicom", "idempotency_key": uuid.uuid4().hex},
    )
    assert r.status_code == 201, r.text
    transfer_id: str = r.json()["id"]
    return transfer_id


def upload(
    client: HubClient, gateway: dict[str, str], transfer: str, body: bytes, chunk: int
) -> httpx.Response:
    return client.post(
        f"/api/v1/transfers/{transfer}/instances",
        headers={**gateway, "Content-Type": MEDIA_TYPE},
        content=_chunks(body, chunk),
    )


@pytest.fixture(scope="module")
def held(hub: InProcessHub, gateway: dict[str, str], files: list[Part10]) -> Part10:
    """A blob the hub already holds, for frames that refer to it."""
    client = hub.client()
    transfer = open_transfer(client, gateway)
    r = upload(client, gateway, transfer, _frame(files[0]), 65536)
    assert r.status_code == 200 and r.json()["refused"] == [], r.text
    return files[0]


def _frame(f: Part10) -> bytes:
    return frame_header(f.sha256, len(f.data)) + f.data


@budget(60)
@given(data=st.data())
@input_path("HTTP: gateway upload frames")
def test_framed_uploads_accept_sound_blobs_and_refuse_each_bad_one(
    hub: InProcessHub,
    gateway: dict[str, str],
    files: list[Part10],
    held: Part10,
    data: st.DataObject,
) -> None:
    client = hub.client()
    transfer = open_transfer(client, gateway)
    body, frames = data.draw(frame_streams(files[1:], held))
    before = refusals(hub)
    r = upload(client, gateway, transfer, body, data.draw(st.sampled_from([1, 40, 4096, 65536])))
    assert r.status_code == 200, (r.status_code, r.text[:300])
    if r.json()["refused"]:
        assert refusals(hub) > before, "refused instances left no audit event"
    answer = r.json()
    assert set(answer["accepted"]) == {f.sha256 for f in frames if f.accepted}
    refused = {x["sha256"]: x["reason"] for x in answer["refused"]}
    assert set(refused) == {f.sha256 for f in frames if not f.accepted}
    assert all(refused.values())
    for f in frames:
        if f.kind == "executable-preamble":
            assert "preamble" in refused[f.sha256]
    assert_blob_store_whole(blob_root(hub))


@budget(40)
@given(data=st.data())
@input_path("HTTP: gateway upload frames")
def test_broken_framing_is_refused_whole(
    hub: InProcessHub, gateway: dict[str, str], files: list[Part10], data: st.DataObject
) -> None:
    client = hub.client()
    transfer = open_transfer(client, gateway)
    before = refusals(hub)
    r = upload(client, gateway, transfer, data.draw(broken_frame_streams(files)), 4096)
    assert r.status_code in (400, 413), (r.status_code, r.text[:300])
    assert_refusal_audited(hub, before, r)
    assert "malformed blob stream" in r.json()["detail"]
    state = client.get(f"/api/v1/transfers/{transfer}", headers=hub.admin_headers).json()
    assert state["instances_total"] == 0
    assert_blob_store_whole(blob_root(hub))


# -- reports -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_transfer(hub: InProcessHub, files: list[Part10]) -> str:
    """A transfer of one study, still receiving, as reports are attached to."""
    folder = Path(hub.hub.settings.data_dir) / "report-study"
    folder.mkdir(exist_ok=True)
    path = folder / "instance.dcm"
    path.write_bytes(files[2].data)
    return hub.upload("SEG", "RVH", [path])


@budget(60)
@given(data=st.data())
@input_path("HTTP: uploaded reports")
def test_reports_are_stored_only_when_they_are_what_they_claim(
    hub: InProcessHub, gateway: dict[str, str], report_transfer: str, data: st.DataObject
) -> None:
    media_type, body, params = data.draw(reports())
    client = hub.client()
    url = f"/api/v1/transfers/{report_transfer}"
    before = len(client.get(url, headers=hub.admin_headers).json()["reports"])
    headers = {**gateway, "Content-Type": media_type} if media_type else dict(gateway)
    refused_before = refusals(hub)
    r = client.post(url + "/reports", params=params, content=body, headers=headers)
    assert r.status_code in (201, 400, 409, 413, 415, 422), (r.status_code, r.text[:300])
    assert_refusal_says_why(r)
    assert_refusal_audited(hub, refused_before, r)
    after = len(client.get(url, headers=hub.admin_headers).json()["reports"])
    kind = media_type.split(";")[0].strip().lower()
    if r.status_code == 201:
        assert after == before + 1
        if kind == "application/pdf":
            assert body.startswith(b"%PDF-")
        else:
            assert kind == "text/plain" and body and b"\x00" not in body
            body.decode("utf-8")
        stored = blob_root(hub).rglob(r.json()["sha256"])
        assert [p.read_bytes() for p in stored] == [body]
    else:
        assert after == before, "a refused report was kept"
    assert_blob_store_whole(blob_root(hub))


def test_an_uploaded_report_is_kept_byte_for_byte(
    hub: InProcessHub, gateway: dict[str, str], report_transfer: str
) -> None:
    """The oracle of the property above, on a report known to be sound."""
    body = "No fracture. — Dr Zoë".encode()
    r = hub.client().post(
        f"/api/v1/transfers/{report_transfer}/reports",
        content=body,
        headers={**gateway, "Content-Type": "text/plain"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()

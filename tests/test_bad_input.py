"""Bad input at the edges: refused with a clear status, audited, never a crash or a partial copy.

One network for the module (hub, SEG's gateway); every test sends something wrong, then checks
the answer, the audit trail, that the gateway and the hub still serve, and that neither the
gateway's spool nor the hub's blob store holds any part of what was refused.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association

from conftest import audit_events, hub_query
from imagebridge.demo.network import GatewayProcess, Network
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, StudyFiles, generate_ct_study
from imagebridge.dicom.net import NODELAY_HANDLERS, requested_contexts
from imagebridge.dicom.part10 import file_meta
from imagebridge.dicom.reports import minimal_pdf
from imagebridge.transfers.framing import MEDIA_TYPE, frame_header

EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
SENDER_AE = "PACS_SEG"

# DIMSE statuses and A-ASSOCIATE-RJ fields (PS3.4 B.2.3, PS3.8 9.3.4)
CANNOT_UNDERSTAND = 0xC000
DATASET_DOES_NOT_MATCH = 0xA900
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


def assert_no_tracebacks(net: Network) -> None:
    """No process of the network logged an unhandled error, whatever it was sent."""
    logs = sorted(net.root.rglob("*.log"))
    assert logs
    crashed = [
        str(p.relative_to(net.root)) for p in logs if "Traceback" in p.read_text("utf-8", "replace")
    ]
    assert not crashed, f"tracebacks in {crashed}"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("bad-input") / "net")
    try:
        network.start_hub(inbox_wait_seconds=1.0)
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        network.add_institution("NTH", "Northern Trauma Hospital")
        network.start_gateway(
            "SEG",
            calling_aes=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}],
            study_stable_seconds=0.5,
        )
        yield network
    finally:
        network.stop()
    assert_no_tracebacks(network)


@pytest.fixture(scope="module")
def gateway(net: Network) -> GatewayProcess:
    return net.gateways["SEG"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    return generate_ct_study(tmp_path_factory.mktemp("ct"), slices=2, rows=64, columns=64)


@pytest.fixture(autouse=True)
def nothing_kept(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: no partial or refused instance in the spool or the hub."""
    yield
    if "net" not in request.fixturenames:
        return
    net: Network = request.getfixturevalue("net")
    spool = net.root / "gateway-SEG" / "data" / "spool"
    assert not list((spool / "tmp").iterdir())
    assert not list((spool / "out").glob("*/*.dcm"))
    blobs = net.root / "hub" / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()]  # not even in blobs/tmp
    assert hub_query(net, "SELECT count(*) FROM blobs") == [(0,)]
    assert hub_query(net, "SELECT count(*) FROM instances") == [(0,)]
    for log in (net.root / "hub.log", net.root / "gateway-SEG" / "gateway.log"):
        assert "Traceback" not in log.read_text("utf-8", "replace"), log


# -- helpers -----------------------------------------------------------------------------------


def last_audit_id(net: Network) -> int:
    with net.admin() as admin:
        events = admin.get("/api/v1/audit", params={"limit": 5000}).json()
    return max((e["id"] for e in events), default=0)


def wait_for_audit(
    net: Network,
    action: str,
    after: int,
    match: Callable[[dict[str, Any]], bool] = lambda e: True,
    timeout: float = 15,
) -> dict[str, Any]:
    """The first event of that action after ``after`` that matches (gateway events: polled)."""
    deadline = time.monotonic() + timeout
    with net.admin() as admin:
        while time.monotonic() < deadline:
            events = admin.get("/api/v1/audit", params={"action": action, "after_id": after})
            found = [e for e in events.json() if match(e)]
            if found:
                return dict(found[0])
            time.sleep(0.1)
    raise AssertionError(f"no {action} audit event")


def associate(gw: GatewayProcess, called: str = "IB_RVH", calling: str = SENDER_AE) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts = requested_contexts([(CT_IMAGE_STORAGE, EXPLICIT_LE)])
    contexts += requested_contexts([(VERIFICATION, EXPLICIT_LE)])
    return ae.associate(
        "127.0.0.1", gw.port, contexts=contexts, ae_title=called, evt_handlers=NODELAY_HANDLERS
    )


def assert_gateway_answers(gw: GatewayProcess) -> None:
    assert gw.process.poll() is None, "the gateway process exited"
    assoc = associate(gw, called=gw.ae_title)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def store_file(gw: GatewayProcess, path: Path) -> int:
    """C-STORE a Part 10 file's dataset bytes exactly as they are on disk; the status."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as stored, never re-encoded
    assoc = associate(gw)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        status: int = rsp.Status
        return status
    finally:
        assoc.release()


def encode(ds: Any) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def refused_instance(
    net: Network, gw: GatewayProcess, path: Path, status: int, *reasons: str
) -> dict[str, Any]:
    """Send a bad file; check the status, the forwarded audit event and the gateway's health."""
    after = last_audit_id(net)
    assert store_file(gw, path) == status
    event = wait_for_audit(net, "dicom:instance:refused", after)
    assert event["outcome"] == "failure"
    assert event["actor_type"] == "gateway"
    assert event["detail"]["status"] == f"0x{status:04X}"
    assert any(reason in event["detail"]["reason"] for reason in reasons), event["detail"]
    assert event["detail"]["calling_ae_title"] == SENDER_AE
    assert event["source_address"] == "127.0.0.1"
    assert_gateway_answers(gw)
    return event


# -- DICOM: instances --------------------------------------------------------------------------


def test_truncated_dataset_is_refused(
    net: Network, gateway: GatewayProcess, study: StudyFiles, tmp_path: Path
) -> None:
    data = study.paths[0].read_bytes()
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(data[: len(data) - 1000])  # ends inside the pixel data
    refused_instance(net, gateway, cut, CANNOT_UNDERSTAND, "truncated")


def test_corrupt_dataset_is_refused(
    net: Network, gateway: GatewayProcess, study: StudyFiles, tmp_path: Path
) -> None:
    ds = dcmread(study.paths[0], stop_before_pixels=True)
    garbage = tmp_path / "garbage.dcm"
    meta = file_meta(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID), EXPLICIT_LE)
    garbage.write_bytes(meta + b"\xde\xad\xbe\xef\x00\xff\x13\x37" * 512)
    refused_instance(net, gateway, garbage, CANNOT_UNDERSTAND, "unreadable", "missing")


def test_dataset_without_sop_instance_uid_is_refused(
    net: Network, gateway: GatewayProcess, study: StudyFiles, tmp_path: Path
) -> None:
    ds = dcmread(study.paths[0])
    uid = str(ds.SOPInstanceUID)
    del ds.SOPInstanceUID
    path = tmp_path / "no-uid.dcm"
    path.write_bytes(file_meta(CT_IMAGE_STORAGE, uid, EXPLICIT_LE) + encode(ds))
    refused_instance(net, gateway, path, CANNOT_UNDERSTAND, "missing SOPInstanceUID")


def test_dataset_not_matching_the_request_is_refused(
    net: Network, gateway: GatewayProcess, study: StudyFiles, tmp_path: Path
) -> None:
    ds = dcmread(study.paths[0])
    request_uid = generate_uid()  # what the C-STORE request announces; not the dataset's
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(file_meta(CT_IMAGE_STORAGE, request_uid, EXPLICIT_LE) + encode(ds))
    event = refused_instance(net, gateway, path, DATASET_DOES_NOT_MATCH, "does not match")
    assert event["study_ref"] == study.study_instance_uid


# -- DICOM: associations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calling", "called", "diagnostic"),
    [
        (SENDER_AE, "IB_NOWHERE", CALLED_AE_NOT_RECOGNISED),
        ("STRANGER", "IB_RVH", CALLING_AE_NOT_RECOGNISED),
    ],
    ids=["unknown-routing-ae", "unknown-calling-ae"],
)
def test_association_from_or_to_an_unknown_ae_is_rejected(
    net: Network, gateway: GatewayProcess, calling: str, called: str, diagnostic: int
) -> None:
    after = last_audit_id(net)
    assoc = associate(gateway, called=called, calling=calling)
    assert assoc.is_rejected and not assoc.is_established
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, diagnostic)
    event = wait_for_audit(
        net,
        "dicom:association:refused",
        after,
        lambda e: e["detail"]["called_ae_title"] == called,
    )
    assert event["outcome"] == "refused"
    assert event["detail"]["calling_ae_title"] == calling
    assert (
        "not recognised" in event["detail"]["reason"]
        or "no known route" in (event["detail"]["reason"])
    )
    assert_gateway_answers(gateway)


# -- the hub's HTTP API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens(net: Network) -> dict[str, str]:
    return {code: net.issue_token(code, "tests") for code in ("SEG", "RVH", "NTH")}


def client(net: Network, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=net.hub_url, headers=headers, timeout=30)


def open_transfer(net: Network, token: str, receiver: str = "RVH") -> str:
    """A transfer still receiving, as a gateway opens one for a study arriving by DICOM."""
    with client(net, token) as c:
        r = c.post(
            "/api/v1/transfers",
            json={"receiver": receiver, "origin": "dicom", "idempotency_key": uuid.uuid4().hex},
        )
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "receiving"
        transfer_id: str = r.json()["id"]
        return transfer_id


def upload(net: Network, token: str | None, transfer_id: str, body: bytes) -> httpx.Response:
    with client(net, token) as c:
        return c.post(
            f"/api/v1/transfers/{transfer_id}/instances",
            content=body,
            headers={"Content-Type": MEDIA_TYPE},
        )


def assert_hub_healthy(net: Network) -> None:
    assert net.hub_process is not None and net.hub_process.poll() is None
    with client(net, None) as c:
        assert c.get("/api/v1/health").json() == {"status": "ok"}


def transfer_state(net: Network, transfer_id: str) -> dict[str, Any]:
    with net.admin() as admin:
        state: dict[str, Any] = admin.get(f"/api/v1/transfers/{transfer_id}").json()
        return state


def hub_rss_bytes(net: Network) -> int:
    assert net.hub_process is not None
    status = Path(f"/proc/{net.hub_process.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


SHA_A = hashlib.sha256(b"a").hexdigest()


@pytest.mark.parametrize(
    "body",
    [
        b"\x00" * 10,  # shorter than a frame header
        frame_header(SHA_A, 100) + b"x" * 50,  # ends inside a blob
        frame_header(SHA_A, 4) + b"abcd" + b"\x01\x02",  # trailing bytes
    ],
    ids=["short-header", "short-blob", "trailing-bytes"],
)
def test_malformed_blob_stream_is_refused(
    net: Network, tokens: dict[str, str], body: bytes
) -> None:
    transfer_id = open_transfer(net, tokens["SEG"])
    r = upload(net, tokens["SEG"], transfer_id, body)
    assert r.status_code == 400, r.text
    assert "malformed" in r.json()["detail"]
    assert transfer_state(net, transfer_id)["instances_total"] == 0
    assert_hub_healthy(net)


def test_huge_declared_blob_length_is_refused_without_allocating(
    net: Network, tokens: dict[str, str]
) -> None:
    transfer_id = open_transfer(net, tokens["SEG"])
    before = hub_rss_bytes(net)
    started = time.monotonic()
    r = upload(net, tokens["SEG"], transfer_id, frame_header(SHA_A, 2**60) + b"x" * 4096)
    assert r.status_code in (400, 413), r.text
    assert time.monotonic() - started < 10
    assert hub_rss_bytes(net) - before < 64 * 1024**2
    assert_hub_healthy(net)


def test_blob_not_matching_its_digest_is_refused(
    net: Network, tokens: dict[str, str], study: StudyFiles
) -> None:
    """Readable DICOM under a wrong digest, and a truncated one under its right digest."""
    transfer_id = open_transfer(net, tokens["SEG"])
    good = study.paths[0].read_bytes()
    wrong_sha = hashlib.sha256(b"some other content").hexdigest()
    truncated = study.paths[1].read_bytes()[:-1000]
    truncated_sha = hashlib.sha256(truncated).hexdigest()
    body = (
        frame_header(wrong_sha, len(good))
        + good
        + frame_header(truncated_sha, len(truncated))
        + truncated
    )
    after = last_audit_id(net)
    r = upload(net, tokens["SEG"], transfer_id, body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["accepted"] == []
    reasons = {x["sha256"]: x["reason"] for x in answer["refused"]}
    assert set(reasons) == {wrong_sha, truncated_sha}
    assert f"not {wrong_sha}" in reasons[wrong_sha]
    assert "truncated" in reasons[truncated_sha]
    event = wait_for_audit(
        net, "transfer:instances:refused", after, lambda e: e["transfer_ref"] == transfer_id
    )
    assert event["outcome"] == "failure"
    assert {x["sha256"] for x in event["detail"]["refused"]} == {wrong_sha, truncated_sha}
    state = transfer_state(net, transfer_id)
    assert state["instances_total"] == 0 and state["studies"] == []
    assert_hub_healthy(net)


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/pdf", b"this is not a PDF document", 422),
        ("text/plain", b"\xff\xfe not UTF-8 \xc3\x28", 422),
        ("text/plain", b"", 422),
        ("image/png", b"\x89PNG\r\n\x1a\n", 415),
        ("application/octet-stream", minimal_pdf(["a report"]), 415),
    ],
    ids=["pdf-not-pdf", "text-not-utf8", "empty", "png", "octet-stream"],
)
def test_bad_report_is_refused(
    net: Network, tokens: dict[str, str], content_type: str, body: bytes, status: int
) -> None:
    transfer_id = open_transfer(net, tokens["SEG"])
    with client(net, tokens["SEG"]) as c:
        r = c.post(
            f"/api/v1/transfers/{transfer_id}/reports",
            content=body,
            headers={"Content-Type": content_type},
        )
    assert r.status_code == status, r.text
    assert transfer_state(net, transfer_id)["reports"] == []
    assert_hub_healthy(net)


@pytest.mark.parametrize("token", [None, "ibg_not-a-real-token", "nonsense"])
def test_requests_without_a_valid_token_are_refused(
    net: Network, tokens: dict[str, str], study: StudyFiles, token: str | None
) -> None:
    transfer_id = open_transfer(net, tokens["SEG"])
    good = study.paths[0].read_bytes()
    body = frame_header(hashlib.sha256(good).hexdigest(), len(good)) + good
    r = upload(net, token, transfer_id, body)
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == "Bearer"
    with client(net, token) as c:
        assert c.get(f"/api/v1/transfers/{transfer_id}").status_code == 401
        assert c.get("/api/v1/transfers").status_code == 401
        r = c.post(
            f"/api/v1/transfers/{transfer_id}/reports",
            content=minimal_pdf(["report"]),
            headers={"Content-Type": "application/pdf"},
        )
        assert r.status_code == 401
    assert transfer_state(net, transfer_id)["instances_total"] == 0
    assert_hub_healthy(net)


def test_a_gateway_cannot_touch_another_institutions_transfer(
    net: Network, tokens: dict[str, str], study: StudyFiles
) -> None:
    """NTH's gateway on a transfer from SEG to RVH: refused as if it did not exist."""
    transfer_id = open_transfer(net, tokens["SEG"])
    good = study.paths[0].read_bytes()
    frames = frame_header(hashlib.sha256(good).hexdigest(), len(good)) + good
    base = f"/api/v1/transfers/{transfer_id}"
    with client(net, tokens["NTH"]) as c:
        assert c.get(base).json() == c.get("/api/v1/transfers/no-such").json()
        assert c.get(base).status_code == 403
        assert transfer_id not in {t["id"] for t in c.get("/api/v1/transfers").json()}
        answers = [
            c.post(f"{base}/instances", content=frames, headers={"Content-Type": MEDIA_TYPE}),
            c.post(
                f"{base}/reports",
                content=minimal_pdf(["report"]),
                headers={"Content-Type": "application/pdf"},
            ),
            c.post(f"{base}/close"),
            c.post(f"{base}/retry"),
            c.post(f"{base}/deliveries", json={"instances": [], "reports": []}),
        ]
    assert [a.status_code for a in answers] == [403] * len(answers), [a.text for a in answers]
    # The receiver may not upload into it or close it either: only the sender may.
    with client(net, tokens["RVH"]) as c:
        assert c.get(base).status_code == 200
        r = c.post(f"{base}/instances", content=frames, headers={"Content-Type": MEDIA_TYPE})
        assert r.status_code == 403
        assert c.post(f"{base}/close").status_code == 403
    state = transfer_state(net, transfer_id)
    assert state["status"] == "receiving" and state["instances_total"] == 0
    assert state["reports"] == []
    assert_hub_healthy(net)


def test_refused_requests_are_audited(net: Network, tokens: dict[str, str]) -> None:
    after = last_audit_id(net)
    transfer_id = open_transfer(net, tokens["SEG"])
    with client(net, "ibg_forged") as c:
        assert c.get(f"/api/v1/transfers/{transfer_id}").status_code == 401
    with client(net, tokens["SEG"]) as c:
        r = c.post(
            f"/api/v1/transfers/{transfer_id}/reports",
            content=b"x",
            headers={"Content-Type": "image/png"},
        )
        assert r.status_code == 415
    path = f"/api/v1/transfers/{transfer_id}"
    unauthorised = wait_for_audit(
        net, "http:request:refused", after, lambda e: e["detail"]["status"] == 401
    )
    assert unauthorised["outcome"] == "refused"
    assert unauthorised["detail"]["path"] == path
    assert unauthorised["source_address"] == "127.0.0.1"
    wrong_type = wait_for_audit(
        net, "http:request:refused", after, lambda e: e["detail"]["status"] == 415
    )
    assert "pdf" in wrong_type["detail"]["reason"]


def test_a_journal_file_the_hub_refuses_is_set_aside_and_later_events_still_arrive(
    network: Network,
) -> None:
    """One bad file must not hold back every later audit event of the gateway."""
    journal = network.root / "gateway-SEG" / "data" / "journal"
    journal.mkdir(parents=True)
    bad = {"at": "not a time", "action": "no tags here", "outcome": "success", "detail": {}}
    (journal / "sealed-00000000T000000000000.jsonl").write_text(json.dumps(bad) + "\n")
    gw = network.start_gateway("SEG", calling_aes=[{"ae_title": "PACS_SEG", "host": "127.0.0.1"}])
    ae = AE(ae_title="PACS_SEG")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    assoc.release()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        accepted = [
            e
            for e in audit_events(network, "dicom:association:accepted")
            if e["detail"].get("calling_ae_title") == "PACS_SEG"
        ]
        if accepted:
            break
        time.sleep(0.2)
    assert accepted, "the later event never reached the hub"
    assert [p.name for p in (journal / "refused").iterdir()] == [
        "sealed-00000000T000000000000.jsonl"
    ]

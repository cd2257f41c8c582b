"""A study's journey through real processes: hub and gateways as subprocesses, mini PACS.

Each test builds its own small network on loopback (hub, SEG's gateway as sender, RVH's and
sometimes a third institution's gateway as receivers) and stops every process it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE

from conftest import audit_events, hub_query
from imagebridge.demo.network import GatewayProcess, Network, free_port
from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, StudyFiles, generate_ct_study
from imagebridge.dicom.net import NODELAY_HANDLERS, requested_contexts
from imagebridge.dicom.part10 import file_meta
from imagebridge.dicom.reports import BASIC_TEXT_SR_STORAGE
from imagebridge.dicom.store_scu import FileToSend, Node, StoreResult, store_files
from imagebridge.storage.blobs import is_digest

EXPLICIT_LE = "1.2.840.10008.1.2.1"
SENDER_AE = "PACS_SEG"
# Quick settings for the tests: studies close soon after their association, retries are fast.
FAST = {"study_stable_seconds": 0.5, "retry_initial_seconds": 0.2, "retry_max_seconds": 0.5}
MiniPacsFactory = Callable[..., MiniPacs]


# -- the network ---------------------------------------------------------------------------


def assert_no_tracebacks(net: Network) -> None:
    """No process of the network logged an unhandled error, whatever it was sent."""
    logs = sorted(net.root.rglob("*.log"))
    assert logs
    crashed = [
        str(p.relative_to(net.root)) for p in logs if "Traceback" in p.read_text("utf-8", "replace")
    ]
    assert not crashed, f"tracebacks in {crashed}"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    """Hub with SEG and RVH, like the shared ``network`` fixture, with 1 s inbox polls.

    A receiving gateway's long poll (20 s by default) must not outlive the test: stopping
    it would wait for the poll, or leave work leased to a poll nobody reads any more.
    """
    network = Network(tmp_path / "net")
    try:
        network.start_hub(inbox_wait_seconds=1.0)
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        yield network
    finally:
        network.stop()
    assert_no_tracebacks(network)


def start_sender(net: Network, **settings: Any) -> GatewayProcess:
    return net.start_gateway(
        "SEG", calling_aes=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}], **{**FAST, **settings}
    )


def start_receiver(net: Network, code: str, pacs_port: int, **settings: Any) -> GatewayProcess:
    return net.start_gateway(
        code,
        calling_aes=[{"ae_title": f"PACS_{code}", "host": "127.0.0.1"}],
        pacs=[{"name": "pacs", "ae_title": f"PACS_{code}", "host": "127.0.0.1", "port": pacs_port}],
        **{**FAST, **settings},
    )


def make_study(folder: Path, slices: int = 10, **kwargs: Any) -> StudyFiles:
    return generate_ct_study(folder, slices=slices, rows=128, columns=128, **kwargs)


def to_send(study: StudyFiles) -> list[FileToSend]:
    return [FileToSend(p, CT_IMAGE_STORAGE, EXPLICIT_LE) for p in study.paths]


def send(
    gw: GatewayProcess,
    called_ae: str,
    study: StudyFiles,
    on_result: Callable[[int, StoreResult], None] | None = None,
) -> None:
    """C-STORE a study to the gateway as its PACS would; every instance must be accepted."""
    results = store_files(
        Node(called_ae, "127.0.0.1", gw.port), SENDER_AE, to_send(study), on_result=on_result
    )
    assert [r.outcome for r in results] == ["delivered"] * len(study.paths), results


def send_with_priority_high(gw: GatewayProcess, called_ae: str, study: StudyFiles) -> None:
    """C-STORE with Priority HIGH (0x0001), the other way a PACS asks for urgency."""
    ae = AE(ae_title=SENDER_AE)
    contexts = requested_contexts([(CT_IMAGE_STORAGE, EXPLICIT_LE)])
    assoc = ae.associate(
        "127.0.0.1", gw.port, contexts=contexts, ae_title=called_ae, evt_handlers=NODELAY_HANDLERS
    )
    assert assoc.is_established
    try:
        for path in study.paths:
            rsp = assoc.send_c_store(path, priority=1)
            assert rsp.Status == 0x0000
    finally:
        assoc.release()


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def transfers_of(net: Network, study_uid: str) -> list[dict[str, Any]]:
    with net.admin() as admin:
        found: list[dict[str, Any]] = admin.get("/api/v1/transfers").json()
    return [t for t in found if any(s["study_instance_uid"] == study_uid for s in t["studies"])]


def delivered(net: Network, study_uid: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait until ``count`` transfers carrying the study are delivered; return them."""

    def check() -> list[dict[str, Any]] | None:
        done = [t for t in transfers_of(net, study_uid) if t["status"] == "delivered"]
        return done if len(done) >= count else None

    result: list[dict[str, Any]] = wait_until(f"{count} delivered transfer(s)", check)
    return result


def sop_uids(study: StudyFiles) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.paths}


def received_uids(pacs: MiniPacs) -> set[str]:
    return {p.stem for p in pacs.received()}


def assert_arrived_intact(pacs: MiniPacs, study: StudyFiles) -> None:
    """Every instance of the study is in the PACS with the very pixels that were sent."""
    assert sop_uids(study) <= received_uids(pacs)
    for path in study.paths:
        sent = dcmread(path)
        got = dcmread(pacs.store_dir / f"{sent.SOPInstanceUID}.dcm")
        assert got.StudyInstanceUID == sent.StudyInstanceUID
        assert got.PixelData == sent.PixelData


# -- the hub's blob store, seen from outside -------------------------------------------------


def blob_files(net: Network) -> set[str]:
    """Digests of the objects in the hub's local blob store (``<data_dir>/blobs/ab/cd/<sha>``)."""
    root = net.root / "hub" / "blobs"
    return {p.name for p in root.glob("??/??/*") if p.is_file() and is_digest(p.name)}


def blob_rows(net: Network) -> set[str]:
    return {row[0] for row in hub_query(net, "SELECT sha256 FROM blobs")}


def spool_digest(path: Path) -> str:
    """The digest a gateway gives an instance: its own meta group + the dataset as sent."""
    data = path.read_bytes()
    (group_length,) = struct.unpack("<I", data[140:144])
    ds = dcmread(path, stop_before_pixels=True)
    meta = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT_LE)
    return hashlib.sha256(meta + data[144 + group_length :]).hexdigest()


class HubLink:
    """A TCP relay between a gateway and the hub: counts what the gateway sends, can cut it.

    Lets a test see the bytes on the wire and take the hub away from one gateway only.
    """

    def __init__(self, hub_port: int) -> None:
        self.hub_port = hub_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sent = 0  # bytes from the gateway to the hub
        self.blocked = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.hub_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def block(self) -> None:
        """Drop every connection and refuse new ones: the hub is unreachable."""
        self.blocked = True
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def unblock(self) -> None:
        self.blocked = False

    def close(self) -> None:
        self.listener.close()
        self.block()


@pytest.fixture
def hub_link(net: Network) -> Iterator[HubLink]:
    link = HubLink(net.hub_port)
    yield link
    link.close()


# -- single source ---------------------------------------------------------------------------


def test_a_study_sent_three_times_is_stored_once(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    """Twice to RVH and once to a third institution: one copy of each instance at the hub."""
    net.add_institution("NTH", "Northern Trauma Hospital")
    pacs_rvh, pacs_nth = mini_pacs("PACS_RVH"), mini_pacs("PACS_NTH")
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs_rvh.port)
    start_receiver(net, "NTH", pacs_nth.port)
    study = make_study(tmp_path / "study")
    uid = study.study_instance_uid

    send(seg, "IB_RVH", study)
    delivered(net, uid, 1)
    # The first transfer is closed once delivered: the same study again is a new transfer.
    send(seg, "IB_RVH", study)
    delivered(net, uid, 2)
    send(seg, "IB_NTH", study)
    transfers = delivered(net, uid, 3)

    assert sorted(t["receiver"] for t in transfers) == ["NTH", "RVH", "RVH"]
    assert len({t["id"] for t in transfers}) == 3
    for t in transfers:
        assert t["sender"] == "SEG" and t["origin"] == "dicom"
        assert t["instances_total"] == t["instances_delivered"] == len(study.paths)
        assert t["instances_failed"] == 0
    expected = {spool_digest(p) for p in study.paths}
    assert blob_files(net) == expected  # one object per instance, named by its digest
    assert blob_rows(net) == expected
    assert_arrived_intact(pacs_rvh, study)
    assert_arrived_intact(pacs_nth, study)
    assert pacs_rvh.count() == pacs_nth.count() == len(study.paths)


def test_sending_a_study_again_uploads_no_instance_bytes(
    net: Network, mini_pacs: MiniPacsFactory, hub_link: HubLink, tmp_path: Path
) -> None:
    """The second upload of a study names blobs the hub holds instead of sending them."""
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net, hub_url=hub_link.url)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study")
    uid = study.study_instance_uid
    smallest = min(p.stat().st_size for p in study.paths)

    before = hub_link.sent
    send(seg, "IB_RVH", study)
    delivered(net, uid, 1)
    first = hub_link.sent - before
    assert first > 0.9 * study.total_bytes  # the instances went over the wire once

    digests = sorted(spool_digest(p) for p in study.paths)
    token = (net.root / "gateway-SEG" / ".token").read_text()
    unknown = hashlib.sha256(b"never uploaded").hexdigest()
    with httpx.Client(base_url=net.hub_url, headers={"Authorization": f"Bearer {token}"}) as c:
        r = c.post("/api/v1/gateway/blobs/missing", json={"sha256": [*digests, unknown]})
        assert r.status_code == 200
        assert r.json()["missing"] == [unknown]
        # Opening a transfer asks the same question for its first batch.
        opening = {"receiver": "RVH", "origin": "dicom", "sha256": [*digests, unknown]}
        r = c.post("/api/v1/transfers", json=opening)
        assert r.status_code == 201 and r.json()["missing"] == [unknown]
    with net.admin() as admin:
        r = admin.post("/api/v1/transfers", json={**opening, "sender": "SEG"})
        assert r.status_code == 422 and "only a gateway" in r.json()["detail"]

    before = hub_link.sent
    send(seg, "IB_RVH", study)
    transfers = delivered(net, uid, 2)
    second = hub_link.sent - before
    # Requests, reference frames and audit events only: less than one instance's bytes.
    assert second < smallest, (first, second)
    assert all(t["instances_delivered"] == len(study.paths) for t in transfers)
    assert blob_files(net) == set(digests)
    assert len(audit_events(net, "transfer:instances:received")) >= 2


# -- delivery while the receiving PACS is away -----------------------------------------------


def test_delivery_waits_for_a_pacs_that_is_down(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    pacs_port = free_port()  # nothing listens here yet
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs_port)
    study = make_study(tmp_path / "study")

    send(seg, "IB_RVH", study)
    tid = wait_until("a transfer", lambda: transfers_of(net, study.study_instance_uid))[0]["id"]

    def deferred() -> list[dict[str, Any]]:
        return [e for e in audit_events(net, "transfer:delivery:deferred") if e["transfer_ref"]]

    events = wait_until("two deferred deliveries", lambda: len(deferred()) >= 2 and deferred())
    assert {e["transfer_ref"] for e in events} == {tid}
    assert all("PACS unavailable" in e["detail"]["reason"] for e in events)
    with net.admin() as admin:
        t = admin.get(f"/api/v1/transfers/{tid}").json()
    assert t["status"] != "delivered"
    assert t["instances_delivered"] == 0 and t["instances_failed"] == 0

    pacs = mini_pacs("PACS_RVH", pacs_port)
    (t,) = delivered(net, study.study_instance_uid)
    assert t["id"] == tid
    assert t["instances_delivered"] == t["instances_total"] == len(study.paths)
    assert pacs.count() == len(study.paths)
    assert_arrived_intact(pacs, study)


def test_urgent_studies_overtake_routine_ones(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    """With the PACS down, a routine study waits; urgent ones sent later arrive before it."""
    pacs_port = free_port()
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs_port)
    routine = make_study(tmp_path / "routine", patient_id="R1", accession_number="ACCR")
    urgent = make_study(tmp_path / "urgent", patient_id="U1", accession_number="ACCU")
    high = make_study(tmp_path / "high", slices=3, patient_id="H1", accession_number="ACCH")

    send(seg, "IB_RVH", routine)
    wait_until(
        "a deferred routine delivery",
        lambda: audit_events(net, "transfer:delivery:deferred"),
    )
    send(seg, "IB_RVH_URG", urgent)  # urgent by the called AE title
    send_with_priority_high(seg, "IB_RVH", high)  # urgent by the C-STORE priority

    def at_hub(study: StudyFiles) -> dict[str, Any] | None:
        found = transfers_of(net, study.study_instance_uid)
        return found[0] if found and found[0]["received_at"] else None

    t_routine, t_urgent, t_high = (
        wait_until("the transfers complete at the hub", lambda s=s: at_hub(s))
        for s in (routine, urgent, high)
    )
    assert (t_routine["priority"], t_urgent["priority"], t_high["priority"]) == (
        "routine",
        "urgent",
        "urgent",
    )
    # Let the deliverer go round its retry loop once more with all three queued.
    seen = len(audit_events(net, "transfer:delivery:deferred"))
    wait_until(
        "another deferred delivery",
        lambda: len(audit_events(net, "transfer:delivery:deferred")) > seen,
    )

    pacs = mini_pacs("PACS_RVH", pacs_port)
    for study in (routine, urgent, high):
        delivered(net, study.study_instance_uid)

    def arrivals(study: StudyFiles) -> list[int]:
        return [(pacs.store_dir / f"{u}.dcm").stat().st_mtime_ns for u in sop_uids(study)]

    last_urgent = max(arrivals(urgent) + arrivals(high))
    first_routine = min(arrivals(routine))
    assert last_urgent < first_routine, "a routine instance reached the PACS before urgent ones"
    for study in (routine, urgent, high):
        assert_arrived_intact(pacs, study)


# -- a sending gateway restarted mid-upload --------------------------------------------------


def test_a_restarted_gateway_finishes_the_upload(
    net: Network, mini_pacs: MiniPacsFactory, hub_link: HubLink, tmp_path: Path
) -> None:
    """Acknowledged instances survive a gateway stop; the upload resumes, nothing twice."""
    pacs = mini_pacs("PACS_RVH")
    settings = {"hub_url": hub_link.url, "upload_batch_instances": 4}
    seg = start_sender(net, **settings)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=20)
    uid = study.study_instance_uid

    def after_each(index: int, result: StoreResult) -> None:
        if index == 7:
            # Part of the study is at the hub; then the hub becomes unreachable.
            wait_until(
                "a first batch at the hub",
                lambda: any(t["instances_total"] for t in transfers_of(net, uid)),
            )
            hub_link.block()

    send(seg, "IB_RVH", study, on_result=after_each)
    net.stop_gateway("SEG")  # right after the C-STOREs were answered

    spool = net.root / "gateway-SEG" / "data" / "spool"
    pending = list((spool / "out").glob("*/*.dcm"))
    (t,) = transfers_of(net, uid)
    assert t["status"] == "receiving"
    assert 0 < t["instances_total"] < len(study.paths)
    assert len(pending) >= len(study.paths) - 8
    assert not list((spool / "tmp").iterdir())

    hub_link.unblock()
    start_sender(net, **settings)  # the same code: a restart, keeping the spool
    (t,) = delivered(net, uid)
    assert t["instances_total"] == t["instances_delivered"] == len(study.paths)
    assert pacs.count() == len(study.paths)
    assert_arrived_intact(pacs, study)
    assert blob_files(net) == {spool_digest(p) for p in study.paths}
    wait_until("the spool emptied", lambda: not list((spool / "out").glob("*/*.dcm")))
    # The journal written before the stop reached the hub after the restart.
    received = wait_until(
        "the association's audit event",
        lambda: [
            e
            for e in audit_events(net, "dicom:instances:received")
            if e["study_ref"] == uid and e["detail"]["instances"] == len(study.paths)
        ],
    )
    assert received[0]["detail"]["calling_ae_title"] == SENDER_AE


# -- a transfer made through the API, with a report -------------------------------------------


def test_a_transfer_created_through_the_api_carries_a_text_report(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    net.add_institution("NTH", "Northern Trauma Hospital")
    pacs_rvh, pacs_nth = mini_pacs("PACS_RVH"), mini_pacs("PACS_NTH")
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs_rvh.port)
    start_receiver(net, "NTH", pacs_nth.port)
    study = make_study(tmp_path / "study")
    uid = study.study_instance_uid
    send(seg, "IB_RVH", study)
    delivered(net, uid)  # now the hub holds the study for SEG

    text = "CT chest: no acute abnormality.\nReported by Dr Test."
    with net.admin() as admin:
        r = admin.post(
            "/api/v1/transfers",
            json={
                "sender": "SEG",
                "receiver": "NTH",
                "priority": "urgent",
                "reason": "trauma referral",
                "study_instance_uids": [uid],
            },
        )
        assert r.status_code == 201, r.text
        made = r.json()
        assert made["origin"] == "api" and made["priority"] == "urgent"
        assert made["reason"] == "trauma referral"
        assert made["instances_total"] == len(study.paths)
        r = admin.post(
            f"/api/v1/transfers/{made['id']}/reports",
            content=text.encode(),
            headers={"Content-Type": "text/plain; charset=utf-8"},
            params={"title": "CT chest report"},
        )
        assert r.status_code == 201, r.text
        assert r.json()["study_instance_uid"] == uid

        def finished() -> dict[str, Any] | None:
            t: dict[str, Any] = admin.get(f"/api/v1/transfers/{made['id']}").json()
            done = t["status"] == "delivered" and t["reports"]
            return t if done and all(x["status"] == "delivered" for x in t["reports"]) else None

        t = wait_until("the API transfer delivered with its report", finished)
    assert t["instances_delivered"] == len(study.paths)
    assert_arrived_intact(pacs_nth, study)
    reports = [dcmread(p) for p in pacs_nth.received() if p.stem not in sop_uids(study)]
    assert len(reports) == 1
    (sr,) = reports
    assert sr.SOPClassUID == BASIC_TEXT_SR_STORAGE
    assert sr.SOPInstanceUID == t["reports"][0]["delivered_sop_instance_uid"]
    assert sr.StudyInstanceUID == uid
    assert sr.ContentSequence[0].TextValue == text
    image = dcmread(study.paths[0], stop_before_pixels=True)
    image = dcmread(pacs_nth.store_dir / f"{image.SOPInstanceUID}.dcm", stop_before_pixels=True)
    assert sr.PatientID == image.PatientID  # filed under the same (reconciled) patient
    assert not (set(received_uids(pacs_rvh)) - sop_uids(study))  # RVH got no report

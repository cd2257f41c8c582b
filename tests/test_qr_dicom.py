"""Query/retrieve through the gateways, with real peers: DCMTK findscu, movescu and getscu
against gateway RVH; real Orthancs as the PACS behind gateways SEG (fetched by C-GET) and
NTH (fetched by C-MOVE to the gateway's own AE title); DCMTK storescp as the workstation a
C-MOVE sends to.

One network for the module. Patient A has the NHS number NHS_NUMBER everywhere, and a local
MRN at each institution. Studies of A:

- ``hub_seg``: SEG's, in the hub and in SEG's PACS (one answer, not two);
- ``pacs_seg``: SEG's, only in SEG's PACS (found by a federated query, fetched by C-GET);
- ``pacs_nth``: NTH's, only in NTH's PACS (fetched by C-MOVE to gateway NTH);
- ``own_rvh``: RVH's own, in the hub;
- ``hub_lok``: LOK's, in the hub; LOK lets SEG discover its studies, not RVH;
- ``hub_noa``: NOA's, in the hub; NOA's agreement was withdrawn.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from conftest import audit_events, require_tool, whole_dataset
from imagebridge.demo.network import GatewayProcess, Network, free_port, wait_for_port
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.dicom.net import NODELAY_HANDLERS
from imagebridge.dicom.part10 import IMPLEMENTATION_CLASS_UID
from imagebridge.gateway.hubclient import HubClient
from imagebridge.gateway.pacs_scu import STUDY_ROOT_FIND, STUDY_ROOT_MOVE
from orthanc import ORTHANC, Modality, Orthanc

pytestmark = pytest.mark.peers

FINDSCU = "/usr/bin/findscu"
MOVESCU = "/usr/bin/movescu"
GETSCU = "/usr/bin/getscu"
STORESCP = "/usr/bin/storescp"
NHS_NUMBER = "9434765919"
MRN = {"RVH": "RVH0042", "SEG": "SEG778899", "NTH": "NTH555", "LOK": "LOK1", "NOA": "NOA1"}
WORKSTATION = "WS"  # calling node with find, move and get; also the move destination
NO_QR = "NOQR"  # calling node with echo and store only
PASSWORD = "correct horse battery staple 42"
DISCOVERY = {"SEG": ["*"], "NTH": ["RVH"], "LOK": ["SEG"], "NOA": ["*"]}


@dataclass
class QR:
    net: Network
    rvh: GatewayProcess
    studies: dict[str, StudyFiles]
    workstation: Path  # where storescp, the move destination, writes


def _dcmtk(tool: str, *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [require_tool(tool), *args],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.stdout + result.stderr


def _upload(net: Network, code: str, receiver: str, study: StudyFiles) -> None:
    """The institution's studies reach the hub as a gateway sends them: a transfer."""
    hub = HubClient(net.hub_url, net.issue_token(code, f"uploader-{study.study_instance_uid}"))
    try:
        t = hub.create_transfer(receiver=receiver, origin="dicom", reason="earlier exchange")
        items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in study.paths]
        assert len(hub.upload(t["id"], list(items))["accepted"]) == len(items)
        hub.close_transfer(t["id"])
    finally:
        hub.close()


def _study(root: Path, code: str, name: str, date: str) -> StudyFiles:
    return generate_ct_study(
        root / name,
        slices=3,
        rows=32,
        columns=32,
        patient_id=MRN[code],
        issuer_of_patient_id=code,
        nhs_number=NHS_NUMBER,
        accession_number=f"{code}{date[2:6]}",
        study_description=name,
        study_date=date,
    )


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QR]:
    orthanc_exe = require_tool(ORTHANC)
    root = tmp_path_factory.mktemp("qr")
    net = Network(root / "net")
    orthancs: list[Orthanc] = []
    storescp: subprocess.Popen[bytes] | None = None
    try:
        net.start_hub(inbox_wait_seconds=2.0, query_wait_seconds=5.0)
        for code in ("SEG", "RVH", "NTH", "LOK", "NOA"):
            net.add_institution(code, f"{code} hospital")
        with net.admin() as admin:
            for code, viewers in DISCOVERY.items():
                r = admin.put(f"/api/v1/institutions/{code}/discovery", json={"to": viewers})
                r.raise_for_status()
        studies = {
            "hub_seg": _study(root, "SEG", "hub_seg", "20200101"),
            "pacs_seg": _study(root, "SEG", "pacs_seg", "20210101"),
            "pacs_nth": _study(root, "NTH", "pacs_nth", "20220101"),
            "own_rvh": _study(root, "RVH", "own_rvh", "20230101"),
            "hub_lok": _study(root, "LOK", "hub_lok", "20190101"),
            "hub_noa": _study(root, "NOA", "hub_noa", "20180101"),
        }
        _upload(net, "SEG", "NTH", studies["hub_seg"])
        _upload(net, "RVH", "SEG", studies["own_rvh"])
        _upload(net, "LOK", "SEG", studies["hub_lok"])
        _upload(net, "NOA", "SEG", studies["hub_noa"])
        with net.admin() as admin:
            r = admin.post("/api/v1/institutions/NOA/agreements/withdraw", json={"reason": "t"})
            r.raise_for_status()

        ports = {code: free_port() for code in ("SEG", "NTH")}
        for code in ("SEG", "NTH"):
            orthanc = Orthanc(
                f"ORTHANC_{code}",
                root / f"orthanc-{code}",
                {"gateway": Modality(f"IB_GW_{code}", ports[code])},
            )
            orthanc.start(orthanc_exe)
            orthancs.append(orthanc)
        seg_pacs, nth_pacs = orthancs
        seg_pacs.upload(studies["hub_seg"].paths + studies["pacs_seg"].paths)
        nth_pacs.upload(studies["pacs_nth"].paths)

        workstation = root / "workstation"
        workstation.mkdir()
        ws_port = free_port()
        storescp = subprocess.Popen(
            [
                require_tool(STORESCP),
                "-aet",
                WORKSTATION,
                "+xa",
                "-od",
                str(workstation),
                str(ws_port),
            ],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(ws_port, None)

        for code, orthanc, method in (("SEG", seg_pacs, "get"), ("NTH", nth_pacs, "move")):
            net.start_gateway(
                code,
                port=ports[code],
                # Orthanc answering a fetch needs no permission of its own: the gateway asked.
                calling_aes=[{"ae_title": orthanc.ae_title, "permissions": ["echo"]}],
                pacs_qr={
                    "ae_title": orthanc.ae_title,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "retrieve": method,
                },
                reconciliation={"mrn_map": {NHS_NUMBER: MRN[code]}},
            )
        for code in ("LOK", "NOA"):
            net.start_gateway(code, calling_aes=[])
        rvh = net.start_gateway(
            "RVH",
            calling_aes=[
                {"ae_title": WORKSTATION, "permissions": ["echo", "find", "move", "get"]},
                {"ae_title": NO_QR, "permissions": ["echo", "store"]},
            ],
            move_destinations=[{"ae_title": WORKSTATION, "host": "127.0.0.1", "port": ws_port}],
            reconciliation={"mrn_map": {NHS_NUMBER: MRN["RVH"]}},
        )
        yield QR(net, rvh, studies, workstation)
    finally:
        for orthanc in orthancs:
            orthanc.terminate()
        if storescp is not None:
            os.kill(storescp.pid, signal.SIGTERM)
            storescp.wait(timeout=10)
        net.stop()
        for orthanc in orthancs:
            orthanc.stop()


# -- helpers ------------------------------------------------------------------------------


def _find(
    qr: QR, tmp: Path, *keys: str, root: str = "-S", calling: str = WORKSTATION
) -> tuple[str, list[FileDataset]]:
    """findscu with the keys; its output and the responses it extracted."""
    tmp.mkdir(parents=True, exist_ok=True)
    args = [root, "-v", "-X", "-od", str(tmp), "-aet", calling, "-aec", qr.rvh.ae_title]
    for key in keys:
        args += ["-k", key]
    output = _dcmtk(FINDSCU, *args, "127.0.0.1", str(qr.rvh.port))
    return output, [pydicom.dcmread(p) for p in sorted(tmp.glob("rsp*.dcm"))]


def _move(qr: QR, *keys: str, destination: str = WORKSTATION, calling: str = WORKSTATION) -> str:
    args = ["-S", "-d", "-aet", calling, "-aec", qr.rvh.ae_title, "-aem", destination]
    for key in keys:
        args += ["-k", key]
    return _dcmtk(MOVESCU, *args, "127.0.0.1", str(qr.rvh.port), timeout=300)


def _get(qr: QR, out: Path, *keys: str, calling: str = WORKSTATION) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-S", "-d", "-aet", calling, "-aec", qr.rvh.ae_title, "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    return _dcmtk(GETSCU, *args, "127.0.0.1", str(qr.rvh.port), timeout=300)


def _statuses(output: str) -> list[int]:
    """Every DIMSE status in DCMTK's debug dump of the responses."""
    return [int(s, 16) for s in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)]


def _counts(output: str, name: str) -> list[int]:
    return [int(n) for n in re.findall(rf"{name} Suboperations\s*:\s*(\d+)", output)]


def _at_workstation(qr: QR, study_instance_uid: str, count: int) -> list[FileDataset]:
    deadline = time.monotonic() + 30
    while True:
        found = [
            ds
            for ds in (whole_dataset(p) for p in qr.workstation.iterdir() if p.is_file())
            if ds is not None and ds.StudyInstanceUID == study_instance_uid
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _events(net: Network, action: str, predicate: Any, timeout: float = 15) -> list[dict[str, Any]]:
    """Audit events of the action that satisfy the predicate, once the gateways have
    forwarded their journals."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_events(net, action) if predicate(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _uids(qr: QR, *names: str) -> set[str]:
    return {qr.studies[n].study_instance_uid for n in names}


def _same_pixels(received: FileDataset, sent: Path) -> None:
    original = pydicom.dcmread(sent)
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.PixelData == original.PixelData


# -- C-FIND -------------------------------------------------------------------------------


def test_findscu_by_nhs_number_finds_the_network_within_sight(qr: QR, tmp_path: Path) -> None:
    output, responses = _find(
        qr,
        tmp_path,
        "QueryRetrieveLevel=STUDY",
        f"PatientID={NHS_NUMBER}",
        "IssuerOfPatientID=NHS",
        "StudyInstanceUID",
        "StudyDate",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "RetrieveAETitle",
        "InstanceAvailability",
    )
    assert "Received Final Find Response (Success)" in output, output
    by_uid = {str(ds.StudyInstanceUID): ds for ds in responses}
    # One answer per study: hub_seg is both in the hub and in SEG's PACS. LOK does not let
    # RVH discover it; NOA has no agreement in force.
    assert len(responses) == len(by_uid) == 4
    assert set(by_uid) == _uids(qr, "hub_seg", "pacs_seg", "pacs_nth", "own_rvh")
    for ds in responses:
        # Every study under RVH's own identity of the patient, as delivery would file it.
        assert (ds.PatientID, ds.IssuerOfPatientID) == (MRN["RVH"], "RVH")
        assert ds.RetrieveAETitle == qr.rvh.ae_title
    hub_seg = by_uid[qr.studies["hub_seg"].study_instance_uid]
    assert hub_seg.AccessionNumber == "SEG-SEG2001"
    assert hub_seg.InstanceAvailability == "ONLINE"
    assert by_uid[qr.studies["pacs_nth"].study_instance_uid].InstanceAvailability == "NEARLINE"
    assert by_uid[qr.studies["pacs_nth"].study_instance_uid].ModalitiesInStudy == "CT"
    assert by_uid[qr.studies["own_rvh"].study_instance_uid].AccessionNumber == "RVH2301"

    # The hub: what it answered and whom it asked; the PACS of LOK and NOA never.
    [answered] = _events(
        qr.net,
        "query:network:answered",
        lambda e: (
            e["detail"]["query"].get("PatientID") == NHS_NUMBER
            and e["detail"]["level"] == "STUDY"
            and e["detail"]["matches"] == 4
        ),
    )
    assert answered["detail"]["from_hub"] == 2  # hub_seg, own_rvh
    assert set(answered["detail"]["from_pacs"]) == {"SEG", "NTH"}
    assert answered["detail"]["unanswered"] == []
    assert set(answered["detail"]["studies"]) == set(by_uid)
    # The source gateways' journals, and RVH's.
    for code in ("SEG", "NTH"):
        assert _events(
            qr.net, "pacs:query:answered", lambda e, c=code: e["actor"].startswith(f"{c}/")
        )
    assert not [
        e
        for e in audit_events(qr.net, "pacs:query:answered")
        if e["actor"].startswith(("LOK/", "NOA/"))
    ]
    [gateway_event] = _events(
        qr.net,
        "dicom:query:answered",
        lambda e: (
            e["detail"]["calling_ae_title"] == WORKSTATION
            and e["detail"]["matches"] == 4
            and e["detail"]["query"].get("IssuerOfPatientID") == "NHS"
        ),
    )
    assert gateway_event["patient_ref"] == NHS_NUMBER


def test_findscu_by_the_local_mrn_asks_the_network_by_nhs_number(qr: QR, tmp_path: Path) -> None:
    output, responses = _find(
        qr, tmp_path, "QueryRetrieveLevel=STUDY", f"PatientID={MRN['RVH']}", "StudyInstanceUID"
    )
    assert "Received Final Find Response (Success)" in output, output
    assert {str(ds.StudyInstanceUID) for ds in responses} == _uids(
        qr, "hub_seg", "pacs_seg", "pacs_nth", "own_rvh"
    )


def test_a_local_id_never_matches_another_institutions_patient(qr: QR, tmp_path: Path) -> None:
    """SEG's MRN asked at RVH is no identifier of RVH's: nothing, rather than SEG's patient."""
    output, responses = _find(
        qr, tmp_path, "QueryRetrieveLevel=STUDY", f"PatientID={MRN['SEG']}", "StudyInstanceUID"
    )
    assert "Received Final Find Response (Success)" in output, output
    assert responses == []


def test_findscu_patient_series_and_image_levels(qr: QR, tmp_path: Path) -> None:
    _, patients = _find(
        qr,
        tmp_path / "patient",
        "QueryRetrieveLevel=PATIENT",
        f"PatientID={NHS_NUMBER}",
        "IssuerOfPatientID=NHS",
        "PatientName",
        root="-P",
    )
    # The patient as RVH knows it, once, though three institutions hold studies of A.
    assert [(p.PatientID, p.IssuerOfPatientID) for p in patients] == [(MRN["RVH"], "RVH")]

    nth = qr.studies["pacs_nth"]
    _, series = _find(
        qr,
        tmp_path / "series",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={nth.study_instance_uid}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    )
    assert [(s.SeriesInstanceUID, s.Modality) for s in series] == [(nth.series_instance_uid, "CT")]
    assert series[0].NumberOfSeriesRelatedInstances == 3

    seg = qr.studies["hub_seg"]
    _, images = _find(
        qr,
        tmp_path / "image",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={seg.study_instance_uid}",
        f"SeriesInstanceUID={seg.series_instance_uid}",
        "SOPInstanceUID",
        "InstanceNumber",
    )
    expected = {pydicom.dcmread(p).SOPInstanceUID for p in seg.paths}
    assert {i.SOPInstanceUID for i in images} == expected
    assert len(images) == 3


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_both_acceptors_answer_a_c_find_alike(qr: QR, syntax: str) -> None:
    """An association for C-FIND alone is our acceptor's, one that also asks for C-MOVE is
    pynetdicom's: the same query gets the same answers from both, element for element
    (our acceptor encodes them itself)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = NHS_NUMBER
    query.IssuerOfPatientID = "NHS"
    for keyword in (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "RetrieveAETitle",
        "InstanceAvailability",
    ):
        setattr(query, keyword, "")
    query.ProcedureCodeSequence = Sequence()  # asked for, returned empty
    answers: dict[bool, list[Dataset]] = {}
    for models in ([STUDY_ROOT_FIND], [STUDY_ROOT_FIND, STUDY_ROOT_MOVE]):
        ae = AE(ae_title=WORKSTATION)
        for model in models:
            ae.add_requested_context(model, [syntax])
        assoc = ae.associate(
            "127.0.0.1", qr.rvh.port, ae_title=qr.rvh.ae_title, evt_handlers=NODELAY_HANDLERS
        )
        assert assoc.is_established
        ours = assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        try:
            responses = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
        finally:
            assoc.release()
        assert responses[-1][0].Status == 0x0000
        pending = [ds for status, ds in responses if status.Status == 0xFF00]
        answers[ours] = sorted(pending, key=lambda ds: str(ds.StudyInstanceUID))
    assert len(answers[True]) >= 3
    assert answers[True] == answers[False]
    for ds in answers[True]:
        assert ds.ProcedureCodeSequence == Sequence()
        assert ds.RetrieveAETitle == qr.rvh.ae_title


# -- C-MOVE and C-GET ---------------------------------------------------------------------


def test_movescu_sends_a_study_the_hub_holds_reconciled(qr: QR) -> None:
    study = qr.studies["hub_seg"]
    output = _move(qr, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}")
    statuses = _statuses(output)
    assert statuses[-1] == 0x0000, output
    # A pending response after each sub-operation, counting down what remains.
    assert statuses.count(0xFF00) == 3
    assert _counts(output, "Remaining")[:3] == [2, 1, 0]
    assert _counts(output, "Completed")[-1] == 3
    assert _counts(output, "Failed")[-1] == 0
    received = _at_workstation(qr, study.study_instance_uid, 3)
    assert len(received) == 3
    for ds in received:
        assert (ds.PatientID, ds.IssuerOfPatientID) == (MRN["RVH"], "RVH")
        assert ds.AccessionNumber == "SEG-SEG2001"
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    for path in study.paths:
        _same_pixels(by_uid[pydicom.dcmread(path).SOPInstanceUID], path)

    [event] = _events(
        qr.net,
        "retrieve:study:exported",
        lambda e: e["study_ref"] == study.study_instance_uid,
    )
    assert event["detail"]["instances"] == 3 and event["detail"]["destination"] == WORKSTATION
    assert _events(
        qr.net,
        "dicom:instances:retrieved",
        lambda e: e["study_ref"] == study.study_instance_uid and e["detail"]["instances"] == 3,
    )


def test_movescu_of_a_study_only_in_another_pacs_fetches_it_by_c_get(qr: QR) -> None:
    study = qr.studies["pacs_seg"]
    output = _move(qr, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}")
    assert _statuses(output)[-1] == 0x0000, output
    assert _counts(output, "Completed")[-1] == 3
    received = _at_workstation(qr, study.study_instance_uid, 3)
    assert len(received) == 3
    assert {(ds.PatientID, ds.IssuerOfPatientID) for ds in received} == {(MRN["RVH"], "RVH")}

    # Gateway SEG fetched it from its PACS and sent it to RVH as a transfer.
    [fetched] = _events(
        qr.net, "retrieve:fetch:completed", lambda e: e["study_ref"] == study.study_instance_uid
    )
    with qr.net.admin() as admin:
        transfer = admin.get(f"/api/v1/transfers/{fetched['transfer_ref']}").json()
    assert transfer["sender"] == "SEG" and transfer["receiver"] == "RVH"
    assert transfer["reason"] == f"retrieve by RVH for {WORKSTATION}"
    assert transfer["instances_total"] == 3
    assert _events(
        qr.net,
        "pacs:study:fetched",
        lambda e: e["study_ref"] == study.study_instance_uid and e["actor"].startswith("SEG/"),
    )


def test_getscu_of_a_study_only_in_nth_pacs_fetched_by_c_move_to_the_gateway(
    qr: QR, tmp_path: Path
) -> None:
    study = qr.studies["pacs_nth"]
    output = _get(
        qr, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}"
    )
    assert _statuses(output)[-1] == 0x0000, output
    received = [pydicom.dcmread(p) for p in tmp_path.iterdir()]
    assert len(received) == 3
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    for path in study.paths:
        ds = by_uid[pydicom.dcmread(path).SOPInstanceUID]
        assert (ds.PatientID, ds.IssuerOfPatientID) == (MRN["RVH"], "RVH")
        assert ds.AccessionNumber == "NTH-NTH2201"
        _same_pixels(ds, path)
    assert _events(
        qr.net,
        "pacs:study:fetched",
        lambda e: e["study_ref"] == study.study_instance_uid and e["actor"].startswith("NTH/"),
    )


def test_getscu_of_a_series_and_of_one_instance_of_the_own_study(qr: QR, tmp_path: Path) -> None:
    study = qr.studies["own_rvh"]
    output = _get(
        qr,
        tmp_path,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study.study_instance_uid}",
        f"SeriesInstanceUID={study.series_instance_uid}",
    )
    assert _statuses(output)[-1] == 0x0000, output
    received = [pydicom.dcmread(p) for p in tmp_path.iterdir()]
    # RVH's own study goes as RVH sent it.
    assert sorted(ds.PatientID for ds in received) == [MRN["RVH"]] * 3
    assert {ds.AccessionNumber for ds in received} == {"RVH2301"}

    one = pydicom.dcmread(study.paths[1])
    output = _get(
        qr,
        tmp_path / "one",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study.study_instance_uid}",
        f"SeriesInstanceUID={study.series_instance_uid}",
        f"SOPInstanceUID={one.SOPInstanceUID}",
    )
    assert _statuses(output)[-1] == 0x0000, output
    [only] = [pydicom.dcmread(p) for p in (tmp_path / "one").iterdir()]
    assert only.SOPInstanceUID == one.SOPInstanceUID


@pytest.mark.parametrize("name", ["hub_lok", "hub_noa"])
def test_a_study_out_of_sight_cannot_be_retrieved(qr: QR, tmp_path: Path, name: str) -> None:
    study = qr.studies[name]
    output = _get(
        qr, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}"
    )
    assert _statuses(output)[-1] == 0x0000, output
    assert _counts(output, "Completed")[-1] == 0
    assert list(tmp_path.iterdir()) == []
    _, found = _find(
        qr,
        tmp_path / "find",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study.study_instance_uid}",
    )
    assert found == []


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "root", "reason"),
    [
        (["QueryRetrieveLevel=FOO"], "-S", "query level FOO"),
        (["QueryRetrieveLevel=PATIENT", "PatientID"], "-S", "query level PATIENT"),
        (["PatientID=x"], "-S", "query level missing"),
        (["QueryRetrieveLevel=STUDY", "StudyDate=2020-x"], "-S", "not a DA range"),
        (["QueryRetrieveLevel=STUDY", "StudyDate=yesterday"], "-S", "a date is YYYYMMDD"),
        (["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.*"], "-S", "not by wildcard"),
        (["QueryRetrieveLevel=STUDY", "Modality=CT"], "-S", "below STUDY"),
    ],
)
def test_bad_queries_fail_with_a900_and_are_audited(
    qr: QR, tmp_path: Path, keys: list[str], root: str, reason: str
) -> None:
    tmp_path.mkdir(exist_ok=True)
    output = _dcmtk(
        FINDSCU,
        root,
        "-d",
        "-aet",
        WORKSTATION,
        "-aec",
        qr.rvh.ae_title,
        *[a for k in keys for a in ("-k", k)],
        "127.0.0.1",
        str(qr.rvh.port),
    )
    assert _statuses(output) == [0xA900], output
    assert reason in output  # the reason travels as the Error Comment
    assert _events(
        qr.net,
        "dicom:query:refused",
        lambda e: reason in e["detail"]["reason"] and e["detail"]["status"] == "0xA900",
    )


def test_unknown_move_destination_is_a801(qr: QR) -> None:
    study = qr.studies["own_rvh"]
    output = _move(
        qr,
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study.study_instance_uid}",
        destination="NOWHERE",
    )
    assert _statuses(output) == [0xA801], output
    assert _events(
        qr.net,
        "dicom:retrieve:refused",
        lambda e: e["detail"]["status"] == "0xA801" and "NOWHERE" in e["detail"]["reason"],
    )


def test_retrieve_without_its_unique_key_is_a900(qr: QR, tmp_path: Path) -> None:
    output = _get(qr, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=x")
    assert _statuses(output)[-1] == 0xA900, output
    assert "needs StudyInstanceUID" in output


def test_a_calling_node_without_query_permissions_is_refused_0124(qr: QR, tmp_path: Path) -> None:
    study = qr.studies["own_rvh"]
    keys = ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}")
    find = _dcmtk(
        FINDSCU,
        "-S",
        "-d",
        "-aet",
        NO_QR,
        "-aec",
        qr.rvh.ae_title,
        *[a for k in keys for a in ("-k", k)],
        "127.0.0.1",
        str(qr.rvh.port),
    )
    move = _move(qr, *keys, calling=NO_QR)
    get = _get(qr, tmp_path, *keys, calling=NO_QR)
    for output in (find, move, get):
        assert _statuses(output)[-1] == 0x0124, output
    assert list(tmp_path.iterdir()) == []
    for action, service in (
        ("dicom:query:refused", "C-FIND"),
        ("dicom:retrieve:refused", "C-MOVE"),
        ("dicom:retrieve:refused", "C-GET"),
    ):
        [event] = _events(
            qr.net,
            action,
            lambda e, s=service: (
                e["detail"]["calling_ae_title"] == NO_QR
                and e["detail"]["reason"] == f"{s} not permitted"
            ),
        )
        assert event["outcome"] == "refused" and event["detail"]["status"] == "0x0124"


# -- an institution's users and their own PACS --------------------------------------------


@contextmanager
def _log_in(net: Network, code: str, username: str, role: str) -> Iterator[httpx.Client]:
    """A user of the institution, logged in from its trusted network (no second factor)."""
    with net.admin() as admin:
        admin.put(
            f"/api/v1/institutions/{code}/trusted-networks", json={"cidrs": ["127.0.0.0/8"]}
        ).raise_for_status()
        admin.post(
            "/api/v1/users",
            json={
                "username": username,
                "password": PASSWORD,
                "institution": code,
                "roles": [role],
                "kind": "staff",
            },
        ).raise_for_status()
    with httpx.Client(base_url=net.hub_url, timeout=60) as client:
        r = client.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD})
        assert r.status_code == 200 and not r.json()["second_factor"], r.text
        # The session cookie is Secure: sent by hand over the test's plain HTTP.
        client.headers["Cookie"] = f"ib_session={r.cookies['ib_session']}"
        client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        yield client


def test_users_query_their_pacs_and_send_from_it(qr: QR) -> None:
    with _log_in(qr.net, "SEG", "seg.radiographer", "radiographer") as user:
        r = user.post(
            "/api/v1/pacs/find",
            json={"level": "STUDY", "keys": {"PatientID": MRN["SEG"], "StudyInstanceUID": ""}},
        )
        assert r.status_code == 200, r.text
        found = {m["StudyInstanceUID"] for m in r.json()["matches"]}
        assert found == _uids(qr, "hub_seg", "pacs_seg")

        r = user.post(
            "/api/v1/pacs/fetch",
            json={
                "study_instance_uids": sorted(found),
                "receiver": "NTH",
                "priority": "urgent",
                "reason": "clinic tomorrow",
            },
        )
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while (state := user.get(f"/api/v1/pacs/tasks/{task_id}").json())["status"] != "done":
            assert state["status"] in ("pending", "running"), state
            assert time.monotonic() < deadline
            time.sleep(0.3)
        transfer = user.get(f"/api/v1/transfers/{state['transfer_id']}").json()
    assert (transfer["sender"], transfer["receiver"]) == ("SEG", "NTH")
    assert (transfer["priority"], transfer["reason"]) == ("urgent", "clinic tomorrow")
    assert transfer["instances_total"] == 6  # both studies, fetched one after the other
    [asked] = _events(qr.net, "query:pacs:queried", lambda e: e["actor"] == "seg.radiographer")
    assert set(asked["detail"]["studies"]) == found


def test_users_refusals_on_their_pacs(qr: QR) -> None:
    with _log_in(qr.net, "SEG", "seg.auditor", "auditor") as auditor:
        r = auditor.post("/api/v1/pacs/find", json={"level": "STUDY", "keys": {}})
        assert r.status_code == 403
    with _log_in(qr.net, "SEG", "seg.clerk", "clerk") as clerk:
        r = clerk.post("/api/v1/pacs/find", json={"level": "STUDY", "keys": {"StudyDate": "x"}})
        assert r.status_code == 400 and "YYYYMMDD" in r.json()["detail"]
        # NOA's agreement was withdrawn: nothing is sent there.
        r = clerk.post(
            "/api/v1/pacs/fetch", json={"study_instance_uids": ["1.2.3"], "receiver": "NOA"}
        )
        assert r.status_code == 403 and "agreement" in r.json()["detail"]


def test_a_source_gateway_that_does_not_answer_is_waited_for_a_bounded_time(
    qr: QR, tmp_path: Path
) -> None:
    """Last: it stops gateway NTH. The answer comes after the hub's wait, without NTH's PACS
    (pacs_nth is found all the same: a retrieve above brought it into the hub)."""
    qr.net.stop_gateway("NTH")
    started = time.monotonic()
    output, responses = _find(
        qr, tmp_path, "QueryRetrieveLevel=STUDY", f"PatientID={MRN['RVH']}", "StudyInstanceUID"
    )
    elapsed = time.monotonic() - started
    assert "Received Final Find Response (Success)" in output, output
    assert 4.5 < elapsed < 30
    assert {str(ds.StudyInstanceUID) for ds in responses} == _uids(
        qr, "hub_seg", "pacs_seg", "pacs_nth", "own_rvh"
    )
    [event] = _events(
        qr.net, "query:network:answered", lambda e: e["detail"]["unanswered"] == ["NTH"]
    )
    assert event["detail"]["from_pacs"] == {"SEG": 2}


def test_c_cancel_ends_a_query_waiting_for_the_network(qr: QR) -> None:
    """With NTH's gateway stopped the gateway waits for the network: a C-CANCEL then (from
    pynetdicom: DCMTK cancels only after a response) ends the query with FE00 at once."""
    qr.net.stop_gateway("NTH")  # already, when the module runs in order
    ae = AE(ae_title=WORKSTATION)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate(
        "127.0.0.1", qr.rvh.port, ae_title=qr.rvh.ae_title, evt_handlers=NODELAY_HANDLERS
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = NHS_NUMBER
    query.IssuerOfPatientID = "NHS"
    query.StudyInstanceUID = ""
    answers: list[Any] = []
    try:
        finding = threading.Thread(
            target=lambda: answers.extend(assoc.send_c_find(query, STUDY_ROOT_FIND, msg_id=7))
        )
        started = time.monotonic()
        finding.start()
        time.sleep(0.5)
        assoc.send_c_cancel(7, query_model=STUDY_ROOT_FIND)
        finding.join(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        assoc.release()
    assert [status.Status for status, _ in answers] == [0xFE00]
    assert elapsed < 3
    assert _events(
        qr.net,
        "dicom:query:answered",
        lambda e: e["detail"]["cancelled"] and e["detail"]["matches"] == 0,
    )

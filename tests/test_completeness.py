"""Study completeness: a transfer is delivered only when the receiver confirms every instance
the sender declared, and never after a sending association was aborted and not resumed.

Real processes (hub, gateways), a real receiving archive, and, for the PACS's own count of a
study, a real Orthanc answering C-FIND.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from conftest import audit_events, require_tool
from imagebridge.demo.network import Network, free_port
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, StudyFiles
from imagebridge.dicom.net import NODELAY_HANDLERS, requested_contexts
from orthanc import ORTHANC, Modality, running_orthanc
from test_exchange import (  # the same small network and helpers as the exchange tests
    EXPLICIT_LE,
    SENDER_AE,
    MiniPacsFactory,
    assert_arrived_intact,
    assert_no_tracebacks,
    delivered,
    make_study,
    received_uids,
    send,
    sop_uids,
    start_receiver,
    start_sender,
    transfers_of,
    wait_until,
)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    """Hub with SEG and RVH; 1 s inbox polls, so that no long poll outlives the test."""
    network = Network(tmp_path / "net")
    try:
        network.start_hub(inbox_wait_seconds=1.0)
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        yield network
    finally:
        network.stop()
    assert_no_tracebacks(network)


def send_then_abort(port: int, paths: list[Path], called_ae: str = "IB_RVH") -> None:
    """C-STORE these files, every one answered with success, then A-ABORT the association,
    as a PACS does whose connection fails before it has sent the whole study."""
    ae = AE(ae_title=SENDER_AE)
    contexts = requested_contexts([(CT_IMAGE_STORAGE, EXPLICIT_LE)])
    assoc = ae.associate(
        "127.0.0.1", port, contexts=contexts, ae_title=called_ae, evt_handlers=NODELAY_HANDLERS
    )
    assert assoc.is_established
    for path in paths:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.abort()


def settled(net: Network, study_uid: str, timeout: float = 60) -> dict[str, Any]:
    """The study's only transfer, once delivered or failed."""

    def check() -> dict[str, Any] | None:
        found = transfers_of(net, study_uid)
        assert len(found) <= 1, found
        return found[0] if found and found[0]["status"] in ("delivered", "failed") else None

    result: dict[str, Any] = wait_until("the transfer settled", check, timeout)
    return result


def test_the_transfer_shows_what_was_declared_and_what_was_confirmed(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=6)

    send(seg, "IB_RVH", study)
    (t,) = delivered(net, study.study_instance_uid)
    assert t["instances_declared"] == t["instances_confirmed"] == 6
    assert t["declared_by"] == "gateway" and t["interrupted"] is False
    with net.admin() as admin:
        one = admin.get(f"/api/v1/transfers/{t['id']}").json()
    assert (one["instances_declared"], one["instances_confirmed"]) == (6, 6)
    (received,) = [
        e for e in audit_events(net, "transfer:transfer:received") if e["transfer_ref"] == t["id"]
    ]
    assert received["detail"]["declared"] == 6


def test_an_aborted_association_keeps_the_study_open_until_it_is_sent_again(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net, study_resend_seconds=120)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=10)
    uid = study.study_instance_uid

    send_then_abort(seg.port, study.paths[:4])
    wait_until("the first instances delivered", lambda: len(received_uids(pacs)) == 4)
    time.sleep(2.0)  # four times study_stable_seconds: a released study would have closed
    (t,) = transfers_of(net, uid)
    assert t["status"] == "receiving" and t["instances_declared"] is None

    # The PACS sends again what it did not finish, in an association it releases.
    rest = make_study_rest(study.paths[4:])
    send(seg, "IB_RVH", rest)
    t = settled(net, uid)
    assert t["status"] == "delivered", t["failure_reason"]
    assert t["instances_declared"] == t["instances_confirmed"] == 10
    assert t["interrupted"] is False
    assert_arrived_intact(pacs, study)


def test_a_study_not_sent_again_after_an_abort_is_never_delivered(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net, study_resend_seconds=3)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=10)

    send_then_abort(seg.port, study.paths[:4])
    t = settled(net, study.study_instance_uid)
    assert t["status"] == "failed"
    assert t["interrupted"] is True
    assert "aborted" in t["failure_reason"]
    # What did arrive is in the PACS: a partial study beats none, and says so.
    assert t["instances_declared"] == t["instances_confirmed"] == 4
    assert len(received_uids(pacs)) == 4
    failed = [e for e in audit_events(net, "transfer:transfer:failed") if e["transfer_ref"]]
    assert [e["transfer_ref"] for e in failed] == [t["id"]]


def test_a_sending_gateway_killed_mid_association_waits_for_the_resend(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    """A crash cuts the association as an abort does: the spool knows after the restart."""
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net, study_resend_seconds=120)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=10)
    uid = study.study_instance_uid

    ae = AE(ae_title=SENDER_AE)
    contexts = requested_contexts([(CT_IMAGE_STORAGE, EXPLICIT_LE)])
    assoc = ae.associate(
        "127.0.0.1", seg.port, contexts=contexts, ae_title="IB_RVH", evt_handlers=NODELAY_HANDLERS
    )
    for path in study.paths[:5]:
        assert assoc.send_c_store(path).Status == 0x0000
    os.kill(seg.process.pid, signal.SIGKILL)
    seg.process.wait()
    assoc.abort()
    start_sender(net, study_resend_seconds=120)  # the same folder, port and token

    wait_until("the first instances delivered", lambda: len(received_uids(pacs)) == 5)
    time.sleep(2.0)
    (t,) = transfers_of(net, uid)
    assert t["status"] == "receiving"

    send(seg, "IB_RVH", make_study_rest(study.paths[5:]))
    t = settled(net, uid)
    assert t["status"] == "delivered", t["failure_reason"]
    assert t["instances_declared"] == t["instances_confirmed"] == 10
    assert_arrived_intact(pacs, study)


def test_an_acknowledged_instance_the_hub_refuses_leaves_the_transfer_incomplete(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    """The PACS was told "stored" for every instance: one missing at the far end is a
    failure to report, not a delivery."""
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=5)
    # The same study, one more instance under another patient: the hub refuses to mix them.
    stray = dcmread(study.paths[0])
    stray.SOPInstanceUID = generate_uid()
    stray.file_meta.MediaStorageSOPInstanceUID = stray.SOPInstanceUID
    stray.PatientID = "OTHER1"
    stray_path = tmp_path / "stray.dcm"
    stray.save_as(stray_path, enforce_file_format=True)

    send(seg, "IB_RVH", make_study_rest([*study.paths, stray_path]))
    t = settled(net, study.study_instance_uid)
    assert t["status"] == "failed"
    assert t["instances_declared"] == 6 and t["instances_confirmed"] == 5
    assert "5 of the 6" in t["failure_reason"]
    assert received_uids(pacs) == sop_uids(study)


def test_the_pacs_count_tells_when_a_study_cut_off_is_complete(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    """With [pacs_qr], the sending PACS is asked how many instances the study has
    (NumberOfStudyRelatedInstances): no waiting for a resend that is not needed, and a
    study still short of it is declared with the PACS's count."""
    require_tool(ORTHANC)
    pacs = mini_pacs("PACS_RVH")
    gateway_port = free_port()
    complete = make_study(tmp_path / "complete", slices=6, accession_number="ACC1")
    short = make_study(tmp_path / "short", slices=6, accession_number="ACC2")
    with running_orthanc(
        "ORTHANC_SEG",
        tmp_path / "orthanc",
        {"gateway": Modality("IB_GW_SEG", gateway_port)},
    ) as orthanc:
        orthanc.upload(complete.paths + short.paths)
        seg = start_sender(
            net,
            port=gateway_port,
            study_resend_seconds=8,
            pacs_qr={
                "ae_title": "ORTHANC_SEG",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "timeout_seconds": 10,
            },
        )
        start_receiver(net, "RVH", pacs.port)
        send_then_abort(seg.port, complete.paths)  # aborted after the last answer
        t = settled(net, complete.study_instance_uid)
        # Closed on the PACS's count: after the wait it would be interrupted, and failed.
        assert t["status"] == "delivered", t["failure_reason"]
        assert t["interrupted"] is False
        assert (t["instances_declared"], t["declared_by"]) == (6, "pacs")
        assert t["instances_confirmed"] == 6

        send_then_abort(seg.port, short.paths[:2])
        t = settled(net, short.study_instance_uid)
    assert t["status"] == "failed"
    assert (t["instances_declared"], t["declared_by"], t["instances_confirmed"]) == (6, "pacs", 2)
    assert "2 of the 6 instances declared by the pacs" in t["failure_reason"]


def make_study_rest(paths: list[Path]) -> StudyFiles:
    """Some files of a study, to send as one."""
    first = dcmread(paths[0], stop_before_pixels=True)
    return StudyFiles(
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        list(paths),
        sum(p.stat().st_size for p in paths),
    )

"""The synthetic CT generator and the demo PACS, with real DICOM senders (DCMTK, pynetdicom)."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, StudyFiles, generate_ct_study
from imagebridge.dicom.net import NODELAY_HANDLERS
from imagebridge.dicom.part10 import file_meta, read_header

VERIFICATION = "1.2.840.10008.1.1"
STORESCU = Path("/usr/bin/storescu")  # DCMTK's; a pynetdicom "storescu" may shadow it on PATH


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dataset_part(data: bytes) -> bytes:
    """The bytes after the file meta group (preamble, 'DICM', group 0002)."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length, first
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    return generate_ct_study(tmp_path_factory.mktemp("ct"), slices=5, rows=64, columns=64)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[MiniPacs]:
    archive = MiniPacs("TESTPACS", free_port(), tmp_path / "pacs")
    archive.start()
    try:
        yield archive
    finally:
        archive.stop()


def test_synthetic_study_files(study: StudyFiles) -> None:
    assert [p.name for p in study.paths] == [f"CT{n:04d}.dcm" for n in range(1, 6)]
    assert study.total_bytes == sum(p.stat().st_size for p in study.paths)
    slices = [pydicom.dcmread(p) for p in study.paths]
    hus = []
    for n, (path, ds) in enumerate(zip(study.paths, slices, strict=True), start=1):
        data = path.read_bytes()
        assert data.startswith(
            file_meta(CT_IMAGE_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian)
        )
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.SeriesInstanceUID == study.series_instance_uid
        assert ds.InstanceNumber == n
        assert float(ds.ImagePositionPatient[2]) == float(ds.SliceLocation) == -(n - 1)
        assert (ds.PatientID, str(ds.PatientName), ds.PatientSex) == ("A123456", "DEMO^ALICE", "F")
        [nhs] = ds.OtherPatientIDsSequence
        assert (nhs.PatientID, nhs.IssuerOfPatientID, nhs.TypeOfPatientID) == (
            "9434765919",
            "NHS",
            "TEXT",
        )
        assert (ds.RescaleIntercept, ds.RescaleSlope, ds.PixelRepresentation) == (-1024, 1, 1)
        pixels = ds.pixel_array
        assert pixels.shape == (64, 64) and pixels.dtype == np.int16
        hu = pixels.astype(np.int32) - 1024
        hus.append(hu)
        # Air, lung, soft tissue and bone all present: not a flat test pattern.
        assert hu.min() < -900 and hu.max() > 300
        assert np.count_nonzero((hu > -900) & (hu < -700)) > 20  # lung
        assert np.count_nonzero((hu > -20) & (hu < 100)) > 200  # soft tissue
        assert len(np.unique(hu)) > 100
        read_header(data)  # ImageBridge's strict reader accepts the files
    assert len({ds.SOPInstanceUID for ds in slices}) == 5
    assert not np.array_equal(hus[0], hus[1])


def test_seed_fixes_pixels_not_uids(tmp_path: Path) -> None:
    a = generate_ct_study(tmp_path / "a", slices=2, rows=32, columns=32, seed=7)
    b = generate_ct_study(tmp_path / "b", slices=2, rows=32, columns=32, seed=7)
    c = generate_ct_study(tmp_path / "c", slices=2, rows=32, columns=32, seed=8)
    pa, pb, pc = (pydicom.dcmread(s.paths[1]).PixelData for s in (a, b, c))
    assert pa == pb != pc
    assert a.study_instance_uid != b.study_instance_uid


def test_optional_identifiers(tmp_path: Path) -> None:
    files = generate_ct_study(
        tmp_path, slices=1, rows=16, columns=16, nhs_number=None, issuer_of_patient_id="RGT"
    )
    ds = pydicom.dcmread(files.paths[0])
    assert "OtherPatientIDsSequence" not in ds
    assert ds.IssuerOfPatientID == "RGT"
    with pytest.raises(ValueError):
        generate_ct_study(tmp_path, slices=0)


def test_full_size_slice_is_about_512_kib(tmp_path: Path) -> None:
    files = generate_ct_study(tmp_path, slices=2)
    per_slice = files.total_bytes / 2
    assert 512 * 1024 < per_slice < 520 * 1024


def _assert_stored_as_sent(pacs: MiniPacs, study: StudyFiles) -> None:
    assert pacs.count() == len(study.paths)
    for original in study.paths:
        sent = original.read_bytes()
        uid = pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID
        stored = (pacs.store_dir / f"{uid}.dcm").read_bytes()
        assert dataset_part(stored) == dataset_part(sent)
        # Both sides write ImageBridge's deterministic meta group: whole files match.
        assert stored == sent
    assert not list(pacs.store_dir.glob(".*.tmp"))


def _scu() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def test_pynetdicom_scu_stores_byte_identical(pacs: MiniPacs, study: StudyFiles) -> None:
    handlers: list[evt.EventHandlerType] = [*NODELAY_HANDLERS]
    assoc = _scu().associate("127.0.0.1", pacs.port, ae_title="TESTPACS", evt_handlers=handlers)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        for path in study.paths:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    _assert_stored_as_sent(pacs, study)
    assert pacs.received() == sorted(pacs.received())


def test_dcmtk_storescu_stores_byte_identical(pacs: MiniPacs, study: StudyFiles) -> None:
    if not STORESCU.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"DCMTK {STORESCU} is required under CI (apt-get install dcmtk)")
        pytest.skip(f"DCMTK {STORESCU} not installed")
    result = subprocess.run(
        [str(STORESCU), "-aet", "DCMTK", "-aec", "TESTPACS", "127.0.0.1", str(pacs.port)]
        + [str(p) for p in study.paths],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    _assert_stored_as_sent(pacs, study)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, on purpose here
def test_refuses_instance_uid_that_is_not_a_uid(pacs: MiniPacs, study: StudyFiles) -> None:
    """The SOP Instance UID names the file: '../' must not escape the store directory."""
    ds = pydicom.dcmread(study.paths[0])
    ds.SOPInstanceUID = "../../escaped"
    assoc = _scu().associate("127.0.0.1", pacs.port, ae_title="TESTPACS")
    try:
        assert assoc.send_c_store(ds).Status == 0xC000
        ds.SOPInstanceUID = generate_uid()
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert pacs.count() == 1
    assert not (pacs.store_dir.parent.parent / "escaped.dcm").exists()


def test_stop_is_idempotent_and_frees_the_port(tmp_path: Path) -> None:
    with MiniPacs("ANY", 0, tmp_path / "d") as pacs:
        port = pacs.port
        assert port != 0
        assoc = _scu().associate("127.0.0.1", port)
        assert assoc.is_established
        assoc.release()
    pacs.stop()
    assoc = _scu().associate("127.0.0.1", port)
    assert not assoc.is_established


def test_command_line_runs_until_sigterm(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "imagebridge.demo.pacs", "--ae", "CLIPACS", "--port", "0"]
    cmd += ["--dir", str(tmp_path / "store")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "MiniPacs did not announce itself"
        line = proc.stdout.readline()
        assert "CLIPACS listening on 127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1])
        assoc = _scu().associate("127.0.0.1", port, ae_title="CLIPACS")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped, 0 instances stored" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

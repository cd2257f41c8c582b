"""Against DCMTK's tools, the reference DICOM implementation: echoscu, storescu and dcmsend.

One network for the module: a hub, gateway SEG (PACS_SEG may call it from loopback) and
gateway RVH delivering into a mini PACS on a port fixed here; a test that sends starts that
PACS (fixture ``mini_pacs``) for itself. Each test finds its own studies by their UIDs.
DCMTK runs with TCP_NODELAY=1, or each instance waits ~40 ms on delayed ACKs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import FileDataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from conftest import audit_events, require_tool, wait_for_transfer
from imagebridge.demo.network import Network, free_port
from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import generate_ct_study

pytestmark = pytest.mark.peers

# Absolute paths: a pynetdicom "storescu" earlier on PATH must not stand in for DCMTK's.
ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
DCMSEND = "/usr/bin/dcmsend"
CALLING_AE = "PACS_SEG"
RVH_PACS_AE = "PACS_RVH"
RECONCILED = frozenset(
    Tag(k) for k in ("PatientID", "IssuerOfPatientID", "AccessionNumber", "OtherPatientIDsSequence")
)
PIXEL_DATA = Tag("PixelData")
# DCMTK drops Data Set Trailing Padding when it sends (even straight to a plain SCP); PS3.10
# lets any reader ignore it.
NOT_COMPARED = RECONCILED | {Tag("DataSetTrailingPadding")}

# pydicom's bundled files, one or more per transfer syntax a PACS may send compressed.
COMPRESSED_FILES = {
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "SC_rgb_rle.dcm": "1.2.840.10008.1.2.5",  # RLE lossless
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order (SV1)
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "JPEG-lossy.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended (12 bit)
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
}
# Retired, still met; DCMTK converts it unless asked to propose it first (storescu -xb).
BIG_ENDIAN_FILE = "MR_small_bigendian.dcm"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass
class Gateways:
    net: Network
    seg_ae_title: str
    seg_port: int
    rvh_pacs_port: int  # where gateway RVH delivers; a test starts a mini PACS there


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    net = Network(tmp_path_factory.mktemp("dcmtk-network") / "net")
    rvh_pacs_port = free_port()
    try:
        # Short long polls: a stopping gateway or hub need not wait out a 20 s poll.
        net.start_hub(inbox_wait_seconds=2.0)
        net.add_institution("SEG", "St Elsewhere General Hospital")
        net.add_institution("RVH", "Riverside Hospital")
        seg = net.start_gateway("SEG", calling_aes=[{"ae_title": CALLING_AE, "host": "127.0.0.1"}])
        net.start_gateway(
            "RVH",
            calling_aes=[],
            pacs=[
                {
                    "name": "pacs",
                    "ae_title": RVH_PACS_AE,
                    "host": "127.0.0.1",
                    "port": rvh_pacs_port,
                }
            ],
        )
        yield Gateways(net, seg.ae_title, seg.port, rvh_pacs_port)
    finally:
        net.stop()


def _dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(tool), *args],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _storescu(
    gw: Gateways, *files: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """storescu from the PACS of SEG to its gateway, for RVH."""
    return _dcmtk(
        STORESCU,
        *options,
        "-aet",
        CALLING_AE,
        "-aec",
        "IB_RVH",
        "127.0.0.1",
        str(gw.seg_port),
        *files,
    )


def _echo(gw: Gateways, calling: str, called: str) -> subprocess.CompletedProcess[str]:
    return _dcmtk(ECHOSCU, "-aet", calling, "-aec", called, "127.0.0.1", str(gw.seg_port))


def _refusals(net: Network, field: str, value: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The hub's dicom:association:refused events with ``detail[field] == value``, once the
    gateway has forwarded them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            e
            for e in audit_events(net, "dicom:association:refused")
            if e["detail"].get(field) == value
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _rvh_pacs(gw: Gateways, mini_pacs: Callable[[str, int | None], MiniPacs]) -> MiniPacs:
    return mini_pacs(RVH_PACS_AE, gw.rvh_pacs_port)


def _wait_for_files(pacs: MiniPacs, count: int, timeout: float = 60) -> list[Path]:
    deadline = time.monotonic() + timeout
    while pacs.count() < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return pacs.received()


def _wait_delivered(net: Network, study_instance_uid: str) -> dict[str, Any]:
    def done(t: dict[str, Any]) -> bool:
        ours = any(s["study_instance_uid"] == study_instance_uid for s in t["studies"])
        return ours and t["status"] in ("delivered", "failed")

    t = wait_for_transfer(net, done, timeout=60)
    assert t["status"] == "delivered", t
    return t


def _assert_same_but_identity(received: FileDataset, sent: FileDataset) -> None:
    """Same transfer syntax, same elements but the reconciled ones, pixel data byte-identical."""
    assert received.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    received_tags = {e.tag for e in received} - NOT_COMPARED
    sent_tags = {e.tag for e in sent} - NOT_COMPARED
    assert received_tags == sent_tags
    for tag in sorted(sent_tags - {PIXEL_DATA}):
        assert received[tag] == sent[tag], f"{received[tag]} != {sent[tag]}"
    assert received.PixelData == sent.PixelData
    expected_vr = sent[PIXEL_DATA].VR
    if sent.file_meta.TransferSyntaxUID.is_encapsulated:
        expected_vr = "OB"  # DCMTK corrects the VR of encapsulated pixel data (some files: OW)
    received_vr = received[PIXEL_DATA].VR
    assert received_vr == expected_vr
    assert received.PatientID == f"EXT-SEG-{sent.get('PatientID', '')}"
    assert received.IssuerOfPatientID == "RVH"


def test_echoscu_is_answered_for_known_calling_ae(gateways: Gateways) -> None:
    for called in (gateways.seg_ae_title, "IB_RVH", "IB_RVH_URG"):
        result = _echo(gateways, CALLING_AE, called)
        assert result.returncode == 0, (called, result.stdout, result.stderr)


def test_echoscu_from_unknown_calling_ae_is_rejected_and_audited(gateways: Gateways) -> None:
    result = _echo(gateways, "INTRUDER", gateways.seg_ae_title)

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Association Rejected" in output
    assert "Calling AE Title Not Recognized" in output
    [event] = _refusals(gateways.net, "calling_ae_title", "INTRUDER")
    assert event["outcome"] == "refused"
    assert event["source_address"] == "127.0.0.1"
    assert event["detail"]["called_ae_title"] == gateways.seg_ae_title


def test_echoscu_to_unknown_called_ae_is_rejected_and_audited(gateways: Gateways) -> None:
    result = _echo(gateways, CALLING_AE, "IB_NOWHERE")

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Association Rejected" in output
    assert "Called AE Title Not Recognized" in output
    [event] = _refusals(gateways.net, "called_ae_title", "IB_NOWHERE")
    assert event["outcome"] == "refused"
    assert event["detail"]["calling_ae_title"] == CALLING_AE


def test_storescu_study_reaches_the_receiving_pacs_complete(
    gateways: Gateways, mini_pacs: Callable[[str, int | None], MiniPacs], tmp_path: Path
) -> None:
    pacs = _rvh_pacs(gateways, mini_pacs)
    study = generate_ct_study(
        tmp_path / "study", slices=20, rows=256, columns=256, patient_id="SEG5150"
    )
    result = _storescu(gateways, *map(str, study.paths))
    assert result.returncode == 0, result.stderr

    transfer = _wait_delivered(gateways.net, study.study_instance_uid)
    assert transfer["calling_ae_title"] == CALLING_AE
    assert transfer["instances_delivered"] == len(study.paths)
    received = {p.stem: pydicom.dcmread(p) for p in _wait_for_files(pacs, len(study.paths))}
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, study.paths)}
    assert received.keys() == sent.keys()
    for uid, ds in received.items():
        assert ds.StudyInstanceUID == study.study_instance_uid
        # No NHS number mapping at RVH: the sender's ID stays, marked foreign.
        _assert_same_but_identity(ds, sent[uid])
        assert ds.AccessionNumber == "SEG-ACC0001"


def _peak_rss_reset(pid: int) -> None:
    """Start the process's peak resident size (VmHWM) again from its present size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_very_large_instance_is_received_to_disk_not_held_in_memory(
    gateways: Gateways, mini_pacs: Callable[[str, int | None], MiniPacs], tmp_path: Path
) -> None:
    """A 134 MB instance (large tomosynthesis and whole-slide objects reach gigabytes) goes
    to the spool as it arrives: the gateway's peak memory grows by far less than its size,
    and it reaches the receiving PACS whole."""
    pacs = _rvh_pacs(gateways, mini_pacs)
    study = generate_ct_study(tmp_path / "study", slices=1, patient_id="SEG5151")
    ds = pydicom.dcmread(study.paths[0])
    ds.Rows = ds.Columns = 8192
    ds.PixelData = os.urandom(8192 * 8192 * 2)
    ds.save_as(study.paths[0])
    size_mb = study.paths[0].stat().st_size / 2**20
    seg = gateways.net.gateways["SEG"].process.pid
    _peak_rss_reset(seg)
    before = _peak_rss_mb(seg)

    result = _storescu(gateways, str(study.paths[0]))
    assert result.returncode == 0, result.stderr
    _wait_delivered(gateways.net, study.study_instance_uid)
    grown = _peak_rss_mb(seg) - before
    assert grown < size_mb / 2, (
        f"the gateway grew by {grown:.0f} MB for a {size_mb:.0f} MB instance"
    )
    (received,) = _wait_for_files(pacs, 1)
    assert pydicom.dcmread(received).PixelData == ds.PixelData
    assert not list((gateways.net.root / "gateway-SEG" / "data" / "spool" / "tmp").iterdir())


def _testdata(names: list[str]) -> dict[str, Path]:
    """Paths of pydicom's bundled files by name (listed without a pattern: a pattern makes
    pydicom try to download, and hang here)."""
    bundled = {Path(p).name for p in get_testdata_files()}
    missing = [n for n in names if n not in bundled]
    assert not missing, f"pydicom lacks {missing}"
    return {n: Path(str(get_testdata_file(n, download=False))) for n in names}


def _sendable_copies(files: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The files as they are, except copies where they could not travel: a gateway refuses an
    instance without Study and Series Instance UIDs (type 1) or without a PatientID (it could
    not be filed safely), and two instances sharing a SOPInstanceUID would be one. The pixel
    data and its encoding stay: pydicom writes encapsulated pixel data back as it read it."""
    folder.mkdir(exist_ok=True)
    seen: set[str] = set()
    out: dict[str, Path] = {}
    for name, path in files.items():
        ds = pydicom.dcmread(path)
        changed = False
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if keyword not in ds:
                setattr(ds, keyword, generate_uid())
                changed = True
        if not str(ds.get("PatientID", "")).strip():
            ds.PatientID = f"TEST-{Path(name).stem[:16]}"
            changed = True
        if ds.SOPInstanceUID in seen:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            changed = True
        seen.add(str(ds.SOPInstanceUID))
        if changed:
            out[name] = folder / name
            ds.save_as(out[name], enforce_file_format=True)
        else:
            out[name] = path
    return out


def test_compressed_and_big_endian_syntaxes_arrive_unchanged(
    gateways: Gateways, mini_pacs: Callable[[str, int | None], MiniPacs], tmp_path: Path
) -> None:
    pacs = _rvh_pacs(gateways, mini_pacs)
    names = [*COMPRESSED_FILES, BIG_ENDIAN_FILE]
    files = _sendable_copies(_testdata(names), tmp_path / "copies")
    sent = {name: pydicom.dcmread(path) for name, path in files.items()}
    syntaxes = {**COMPRESSED_FILES, BIG_ENDIAN_FILE: EXPLICIT_VR_BIG_ENDIAN}
    for name, ds in sent.items():
        assert ds.file_meta.TransferSyntaxUID == syntaxes[name], name
    compressed = [str(files[name]) for name in COMPRESSED_FILES]

    result = _dcmtk(
        DCMSEND,
        "-v",
        "-aet",
        CALLING_AE,
        "-aec",
        "IB_RVH",
        "--decompress-never",  # what arrives must be what was sent, not a decompressed copy
        "--no-halt",
        "127.0.0.1",
        str(gateways.seg_port),
        *compressed,
    )
    # dcmsend exits 0 even when the peer refuses an instance: its summary tells.
    summary = result.stdout + result.stderr
    assert result.returncode == 0, summary
    succeeded = re.search(r"with status SUCCESS\s*:\s*(\d+)", summary)
    assert succeeded is not None and int(succeeded[1]) == len(compressed), summary
    assert "with status ERROR" not in summary and "with status WARNING" not in summary, summary
    result = _storescu(gateways, str(files[BIG_ENDIAN_FILE]), options=("--propose-big",))
    assert result.returncode == 0, result.stderr

    received = {p.stem: pydicom.dcmread(p) for p in _wait_for_files(pacs, len(sent))}
    assert sorted(received) == sorted(str(ds.SOPInstanceUID) for ds in sent.values())
    for name, ds in sent.items():
        arrived = received[str(ds.SOPInstanceUID)]
        try:
            _assert_same_but_identity(arrived, ds)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    for ds in sent.values():
        _wait_delivered(gateways.net, str(ds.StudyInstanceUID))

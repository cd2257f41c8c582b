"""The raw-socket C-STORE client (dicom/ul.py, dicom/store_scu.py) against real peers.

DCMTK's storescp checks that what arrives is the file's dataset byte for byte; pynetdicom
AEs, configured per test, play peers that choose syntaxes, answer with given statuses,
abort, stall or reject. Every server a test starts is stopped when it ends.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt

from conftest import require_tool
from imagebridge.demo.network import free_port, wait_for_port
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, generate_ct_study
from imagebridge.dicom import ul
from imagebridge.dicom.part10 import file_meta, read_meta
from imagebridge.dicom.store_scu import FileToSend, Node, NodeUnavailable, store_files
from imagebridge.dicom.ul import set_nodelay
from imagebridge.gateway.reconcile import Rewritten, reconcile_dataset
from imagebridge.settings import Reconciliation

STORESCP = "/usr/bin/storescp"  # absolute: pynetdicom installs a "storescp" too
PEER_AE = "PEER"
CALLING_AE = "IB_TEST"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def to_send(paths: list[Path]) -> list[FileToSend]:
    out = []
    for path in paths:
        with open(path, "rb") as fh:
            meta = read_meta(fh)
        out.append(FileToSend(path, meta.sop_class_uid, meta.transfer_syntax_uid))
    return out


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its meta group (which must carry a group length)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + group_length :]


@pytest.fixture
def ct_files(tmp_path: Path) -> list[FileToSend]:
    return to_send(generate_ct_study(tmp_path / "ct", slices=3, rows=64, columns=64).paths)


@dataclass
class Peer:
    node: Node
    stored: list[tuple[Dataset, str]] = field(default_factory=list)  # dataset, syntax
    message_ids: list[int] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    aborted: threading.Event = field(default_factory=threading.Event)


Answer = Callable[[int, evt.Event], Any]  # (index of the request, event) -> status


@pytest.fixture
def start_peer() -> Iterator[Callable[..., Peer]]:
    """Factory for pynetdicom storage SCPs on free loopback ports, shut down at the end."""
    servers: list[Any] = []

    def start(
        contexts: list[tuple[str, list[str]]],
        answer: Answer = lambda index, event: 0x0000,
        *,
        max_pdu: int = 16382,
        require_calling_aet: list[str] | None = None,
    ) -> Peer:
        ae = AE(ae_title=PEER_AE)
        ae.maximum_pdu_size = max_pdu
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        for sop_class, syntaxes in contexts:
            ae.add_supported_context(sop_class, syntaxes)
        if require_calling_aet:
            ae.require_calling_aet = require_calling_aet
        port = free_port()
        peer = Peer(Node(PEER_AE, "127.0.0.1", port))

        def on_store(event: evt.Event) -> Any:
            index = len(peer.message_ids)
            peer.message_ids.append(int(event.request.MessageID))
            ds = event.dataset
            ds.file_meta = event.file_meta
            peer.stored.append((ds, str(event.context.transfer_syntax)))
            return answer(index, event)

        handlers = [
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_RELEASED, lambda event: peer.released.set()),
            (evt.EVT_ABORTED, lambda event: peer.aborted.set()),
        ]
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return peer

    yield start
    for server in servers:
        server.shutdown()


def store_into_storescp(
    storescp: str, out: Path, max_pdu: int, files: list[FileToSend]
) -> dict[str, Path]:
    """Send files to a DCMTK storescp; what it stored, by SOP Instance UID."""
    out.mkdir()
    port = free_port()
    # +B: DCMTK writes its own meta, then the dataset exactly as it arrived.
    command = [storescp, "--max-pdu", str(max_pdu), "+B", "-od", str(out), str(port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc, timeout=10)
        results = store_files(Node("STORESCP", "127.0.0.1", port), CALLING_AE, files, timeout=10)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert [r.outcome for r in results] == ["delivered"] * len(files), (results, stderr)
    received = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()
    }
    assert len(received) == len(files)
    return received


# 1. Byte for byte into DCMTK, in many small PDUs and in a few large ones.


@pytest.mark.peers
@pytest.mark.parametrize("max_pdu", [4096, 131072])
def test_dcmtk_receives_the_datasets_byte_for_byte(tmp_path: Path, max_pdu: int) -> None:
    storescp = require_tool(STORESCP)
    # 512 x 512 x 16 bit: 128 PDUs a file at 4096, 5 at 131072.
    study = generate_ct_study(tmp_path / "src", slices=3, rows=512, columns=512)
    files = to_send(study.paths)
    received = store_into_storescp(storescp, tmp_path / "out", max_pdu, files)
    for f in files:
        with open(f.path, "rb") as fh:
            meta = read_meta(fh)
            fh.seek(meta.dataset_offset)
            source = fh.read()
        stored = received[meta.sop_instance_uid]
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert dataset_bytes(stored) == source


# 2. Conversion to the only syntax a peer takes.


def test_explicit_file_is_converted_for_an_implicit_only_peer(
    tmp_path: Path, start_peer: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unlimited PDUs on the peer side: we send 1 MiB fragments of a 2 MiB dataset, through
    # a small send buffer (as over a slow link), so the kernel takes each in several parts.
    def small_send_buffer(sock: socket.socket) -> None:
        set_nodelay(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)

    monkeypatch.setattr(ul, "set_nodelay", small_send_buffer)
    study = generate_ct_study(tmp_path / "ct", slices=2, rows=1024, columns=1024)
    peer = start_peer([(CT_IMAGE_STORAGE, [ImplicitVRLittleEndian])], max_pdu=0)
    results = store_files(peer.node, CALLING_AE, to_send(study.paths), timeout=10)
    assert [r.outcome for r in results] == ["delivered", "delivered"], results
    for path, (received, syntax) in zip(study.paths, peer.stored, strict=True):
        source = pydicom.dcmread(path)
        assert syntax == ImplicitVRLittleEndian
        assert received.SOPInstanceUID == source.SOPInstanceUID
        assert received.PixelData == source.PixelData
        for elem in source:
            assert received[elem.tag].value == elem.value, elem.keyword


# 3. Decompression for a peer that takes only uncompressed syntaxes.


def test_jpeg2000_is_decompressed_for_an_uncompressed_only_peer(
    tmp_path: Path, start_peer: Callable[..., Peer]
) -> None:
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm", download=False))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            setattr(ds, keyword, generate_uid())
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)  # the dataset only: its meta is in ds.file_meta
    path = tmp_path / "j2k.dcm"
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    path.write_bytes(file_meta(sop_class, sop_instance, JPEG2000) + buffer.getvalue())
    expected = pydicom.dcmread(path).pixel_array

    peer = start_peer([(sop_class, UNCOMPRESSED)])
    [result] = store_files(peer.node, CALLING_AE, to_send([path]), timeout=10)
    assert result.outcome == "delivered", result
    [(received, syntax)] = peer.stored
    assert syntax in UNCOMPRESSED
    assert received.file_meta.TransferSyntaxUID in UNCOMPRESSED
    assert not received["PixelData"].is_undefined_length  # native, not encapsulated
    # The same instance, only re-encoded: its identity does not change.
    assert received.SOPInstanceUID == sop_instance
    assert received.StudyInstanceUID == ds.StudyInstanceUID
    assert np.array_equal(received.pixel_array, expected)


# 4. A SOP class the peer does not take at all.


def test_sop_class_the_peer_refuses_fails_clearly(
    tmp_path: Path, start_peer: Callable[..., Peer], ct_files: list[FileToSend]
) -> None:
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    mr_path = tmp_path / "mr.dcm"
    mr.save_as(mr_path, enforce_file_format=True)
    # The association itself is accepted (for MR); CT has no context in it.
    peer = start_peer([(MR_IMAGE_STORAGE, UNCOMPRESSED)])
    files = [ct_files[0], *to_send([mr_path])]
    ct_result, mr_result = store_files(peer.node, CALLING_AE, files, timeout=10)
    assert ct_result.outcome == "failed"
    assert "accepts neither the SOP class" in ct_result.detail
    assert mr_result.outcome == "delivered", mr_result
    assert [str(ds.SOPClassUID) for ds, _ in peer.stored] == [MR_IMAGE_STORAGE]


# 5. No association.


def test_rejected_association_raises_node_unavailable(
    start_peer: Callable[..., Peer], ct_files: list[FileToSend]
) -> None:
    peer = start_peer([(CT_IMAGE_STORAGE, UNCOMPRESSED)], require_calling_aet=["SOMEONE_ELSE"])
    with pytest.raises(NodeUnavailable, match="rejected"):
        store_files(peer.node, CALLING_AE, ct_files, timeout=5)
    assert peer.stored == []


def test_nothing_listening_raises_node_unavailable(ct_files: list[FileToSend]) -> None:
    node = Node(PEER_AE, "127.0.0.1", free_port())
    with pytest.raises(NodeUnavailable, match="cannot connect"):
        store_files(node, CALLING_AE, ct_files, timeout=5)


# 6. Statuses.


def test_statuses_map_to_retry_failed_and_delivered(
    start_peer: Callable[..., Peer], ct_files: list[FileToSend]
) -> None:
    failure = Dataset()
    failure.Status = 0xC000
    failure.ErrorComment = "cannot understand"
    statuses: list[Any] = [0xA700, failure, 0xB000]
    peer = start_peer([(CT_IMAGE_STORAGE, UNCOMPRESSED)], lambda i, event: statuses[i])
    out_of_resources, failed, warning = store_files(peer.node, CALLING_AE, ct_files, timeout=10)
    assert out_of_resources.outcome == "retry"
    assert "0xA700" in out_of_resources.detail
    assert failed.outcome == "failed"
    assert "0xC000" in failed.detail and "cannot understand" in failed.detail
    assert warning.outcome == "delivered"
    assert "0xB000" in warning.detail
    assert len(peer.stored) == 3


# 7. The peer aborts in the middle.


def test_abort_after_the_first_instance_leaves_the_rest_for_retry(
    start_peer: Callable[..., Peer], ct_files: list[FileToSend]
) -> None:
    def answer(index: int, event: evt.Event) -> int:
        if index == 1:
            event.assoc.abort()
        return 0x0000

    peer = start_peer([(CT_IMAGE_STORAGE, UNCOMPRESSED)], answer)
    start = time.monotonic()
    results = store_files(peer.node, CALLING_AE, ct_files, timeout=5)
    assert time.monotonic() - start < 4
    assert [r.outcome for r in results] == ["delivered", "retry", "retry"], results
    assert "abort" in results[1].detail
    assert len(peer.stored) == 2


# 8. The peer never answers.


def test_unanswered_c_store_times_out_as_retry(
    start_peer: Callable[..., Peer], ct_files: list[FileToSend]
) -> None:
    stop_waiting = threading.Event()

    def answer(index: int, event: evt.Event) -> int:
        stop_waiting.wait(10)  # far beyond the client's timeout; set when the test ends
        return 0x0000

    peer = start_peer([(CT_IMAGE_STORAGE, UNCOMPRESSED)], answer)
    start = time.monotonic()
    try:
        results = store_files(peer.node, CALLING_AE, ct_files, timeout=2)
    finally:
        stop_waiting.set()
    elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 5, elapsed
    assert [r.outcome for r in results] == ["retry"] * 3, results
    assert len(peer.stored) == 1
    assert peer.aborted.wait(5)


# 9. Message IDs and release.


def test_message_ids_increase_and_the_association_is_released(
    start_peer: Callable[..., Peer], ct_files: list[FileToSend]
) -> None:
    peer = start_peer([(CT_IMAGE_STORAGE, UNCOMPRESSED)])
    results = store_files(peer.node, CALLING_AE, ct_files, timeout=10)
    assert [r.outcome for r in results] == ["delivered"] * 3
    assert peer.message_ids == sorted(set(peer.message_ids))
    assert len(peer.message_ids) == 3
    assert peer.released.wait(5)
    assert not peer.aborted.is_set()
    sent = [str(ds.SOPInstanceUID) for ds, _ in peer.stored]
    expected = []
    for f in ct_files:
        with open(f.path, "rb") as fh:
            expected.append(read_meta(fh).sop_instance_uid)
    assert sent == expected


# 6. A dataset rewritten at its start (a reconciled instance): the new start goes from
#    memory, the rest from the stored file as it is.


def rewritten(path: Path) -> tuple[FileToSend, Rewritten]:
    r = reconcile_dataset(
        path,
        sender_code="SEG",
        receiver_code="RVH",
        policy=Reconciliation(),
        mrn_lookup=lambda nhs_number: None,
    )
    meta = r.meta
    to_send = FileToSend(
        path,
        meta.sop_class_uid,
        meta.transfer_syntax_uid,
        head=r.head,
        offset=r.offset,
        sop_instance_uid=meta.sop_instance_uid,
    )
    return to_send, r


@pytest.mark.peers
@pytest.mark.parametrize("max_pdu", [16384, 131072])
def test_a_rewritten_start_then_the_stored_rest_arrive_byte_for_byte(
    tmp_path: Path, max_pdu: int
) -> None:
    storescp = require_tool(STORESCP)
    study = generate_ct_study(tmp_path / "src", slices=3, rows=512, columns=512)
    pairs = [rewritten(path) for path in study.paths]
    received = store_into_storescp(storescp, tmp_path / "out", max_pdu, [f for f, _ in pairs])
    for f, r in pairs:
        stored = received[f.sop_instance_uid]
        assert dataset_bytes(stored) == r.head + f.path.read_bytes()[r.offset :]
        ds = pydicom.dcmread(stored)
        assert ds.PatientID == "EXT-SEG-A123456"
        assert ds.PixelData == pydicom.dcmread(f.path).PixelData


def test_a_rewritten_jpeg2000_is_decompressed_with_its_new_start(
    tmp_path: Path, start_peer: Callable[..., Peer]
) -> None:
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm", download=False))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    path = tmp_path / "j2k.dcm"
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    path.write_bytes(file_meta(sop_class, sop_instance, JPEG2000) + buffer.getvalue())
    to_send, _ = rewritten(path)

    peer = start_peer([(sop_class, UNCOMPRESSED)])
    [result] = store_files(peer.node, CALLING_AE, [to_send], timeout=10)
    assert result.outcome == "delivered", result
    [(received, syntax)] = peer.stored
    assert syntax in UNCOMPRESSED
    assert received.SOPInstanceUID == sop_instance
    assert received.PatientID == f"EXT-SEG-{ds.PatientID}"
    assert received.IssuerOfPatientID == "RVH"
    assert np.array_equal(received.pixel_array, pydicom.dcmread(path).pixel_array)

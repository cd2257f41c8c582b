"""Hostile DICOM at a real gateway, over a plain socket: malformed PDUs and DIMSE messages,
damaged datasets and query identifiers, and lengths that declare gigabytes.

Each is refused in DICOM's own terms (A-ASSOCIATE-RJ, A-ABORT, or a C-STORE or C-FIND
failure status with its reason, audited); the gateway serves on, its memory stays bounded,
and what it acknowledged reaches the hub whole.
"""

from __future__ import annotations

import hashlib
import io
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import audit_events, hub_query
from fuzz import dimse
from fuzz.checks import our_tracebacks, peak_rss_mb, proc_status_kb, rss_mb
from fuzz.datasets import SYNTAX_CONTEXTS, Instance, damaged, deflate_bomb, elements
from fuzz.figures import budget, input_path
from imagebridge.demo.network import GatewayProcess, Network
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.part10 import IMPLEMENTATION_CLASS_UID, file_meta, read_meta
from imagebridge.dicom.ul import associate_rq

CALLING = "PACS_SEG"
FINDER = "WS_SEG"  # a workstation that may query
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
# A sound C-FIND identifier, implicit VR little endian: STUDY level, patient ID "P*",
# study date and instance UID asked for.
QUERY = b"".join(
    struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    for tag, value in (
        (0x00080020, b""),
        (0x00080052, b"STUDY "),
        (0x00100020, b"P*"),
        (0x0020000D, b""),
    )
)
# C-FIND statuses (PS3.4 C.4.1.1.4): success, pending, cancel, and the refusals.
FIND_ENDS = {0x0000, 0xFE00, 0xA700, 0xA900, 0xC000, 0x0122, 0x0124}
ROUTE = "IB_RVH"
# C-STORE statuses the gateway may answer with (PS3.4 B.2.3); anything else, 0xC2xx above
# all, is pynetdicom answering for a handler of ours that failed.
SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
REFUSALS = {OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND}
# What one connection may cost the gateway at most, however it was spoken to.
MEMORY_SLACK_MB = 64
FRAGMENT = 16 * 1024


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("hostile-dicom") / "net")
    try:
        network.start_hub()
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        network.start_gateway(
            "SEG",
            calling_aes=[
                {"ae_title": CALLING, "host": "127.0.0.1"},
                {"ae_title": FINDER, "host": "127.0.0.1", "permissions": ["echo", "find"]},
            ],
            study_stable_seconds=1,
        )
        yield network
    finally:
        network.stop()


@pytest.fixture(scope="module")
def gateway(net: Network) -> GatewayProcess:
    return net.gateways["SEG"]


@pytest.fixture(scope="module")
def baseline(gateway: GatewayProcess) -> dict[str, float]:
    assert dimse.echo(gateway.port, gateway.ae_title, CALLING) == SUCCESS
    time.sleep(0.5)
    pid = gateway.process.pid
    return {"rss": rss_mb(pid), "threads": proc_status_kb(pid, "Threads")}


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Instance:
    """A small CT instance: its dataset as a C-STORE carries it."""
    study = generate_ct_study(tmp_path_factory.mktemp("ct"), slices=1, rows=16, columns=16)
    data = study.paths[0].read_bytes()
    meta = read_meta(io.BytesIO(data))
    return Instance(data[meta.dataset_offset :], meta.sop_class_uid, meta.sop_instance_uid)


def assert_serving(gw: GatewayProcess, baseline: dict[str, float]) -> None:
    assert gw.process.poll() is None, "the gateway exited"
    assert dimse.echo(gw.port, gw.ae_title, CALLING) == SUCCESS
    assert rss_mb(gw.process.pid) < baseline["rss"] + MEMORY_SLACK_MB


def c_store(port: int, case: Instance, called: str = ROUTE) -> dimse.Exchange:
    """One C-STORE on its own association, the dataset in 16 KiB fragments."""
    peer = dimse.Peer(port)
    answer = peer.associate(called, CALLING)
    assert answer is not None and answer[0] == dimse.A_ASSOCIATE_AC
    context = SYNTAX_CONTEXTS[case.transfer_syntax_uid]
    peer.send(dimse.p_data(dimse.pdv(context, dimse.store_command(case.sop_instance_uid), 3)))
    data = case.dataset
    pieces = [data[i : i + FRAGMENT] for i in range(0, len(data), FRAGMENT)] or [b""]
    for n, piece in enumerate(pieces):
        peer.send(dimse.p_data(dimse.pdv(context, piece, 2 if n == len(pieces) - 1 else 0)))
    response = peer.read_pdu()
    peer.send(dimse.release_rq())
    exchange = peer.finish()
    if response is not None:
        exchange.pdus.insert(0, response)
    return exchange


def test_the_raw_client_speaks_dicom(gateway: GatewayProcess) -> None:
    """The harness itself: a sound association and C-ECHO through it succeed, and a port
    with nothing behind it is not mistaken for a refusal."""
    assert dimse.echo(gateway.port, gateway.ae_title, CALLING) == SUCCESS
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        dimse.Peer(port)


# -- malformed PDUs ------------------------------------------------------------------------------


@budget(40)
@given(data=st.data())
@input_path("DICOM: association requests (PDUs)")
def test_malformed_association_requests_are_refused(
    gateway: GatewayProcess, baseline: dict[str, float], data: st.DataObject
) -> None:
    opening = data.draw(dimse.opening_bytes(gateway.ae_title, CALLING))
    peer = dimse.Peer(gateway.port)
    peer.send(opening)
    exchange = peer.finish()
    # Refused (A-ASSOCIATE-RJ or A-ABORT) or simply closed; an A-ASSOCIATE-AC only for a
    # request that survived its damage.
    assert set(exchange.types()) <= {
        dimse.A_ASSOCIATE_AC,
        dimse.A_ASSOCIATE_RJ,
        dimse.A_ABORT,
        dimse.A_RELEASE_RP,
    }
    assert exchange.closed_by_peer, "the gateway kept a broken association open"
    assert_serving(gateway, baseline)


@budget(40)
@given(data=st.data())
@input_path("DICOM: DIMSE messages (P-DATA)")
def test_malformed_dimse_messages_are_refused(
    gateway: GatewayProcess, baseline: dict[str, float], instance: Instance, data: st.DataObject
) -> None:
    pdus = data.draw(dimse.hostile_pdus(instance.sop_instance_uid, instance.dataset))
    peer = dimse.Peer(gateway.port)
    answer = peer.associate(ROUTE, CALLING)
    assert answer is not None and answer[0] == dimse.A_ASSOCIATE_AC
    for raw in pdus:
        if not peer.send(raw):
            break
    exchange = peer.finish()
    # Whatever it answered, no DIMSE response says a handler of ours failed.
    assert not [s for s in exchange.statuses() if 0xC100 <= s <= 0xC2FF], exchange.statuses()
    assert exchange.closed_by_peer, "the gateway kept a broken association open"
    assert_serving(gateway, baseline)


@budget(40)
@given(data=st.data())
@input_path("DICOM: C-FIND identifiers")
def test_damaged_query_identifiers_get_a_c_find_status(
    gateway: GatewayProcess, baseline: dict[str, float], data: st.DataObject
) -> None:
    """Our acceptor's C-FIND: an identifier that cannot be read, or asks what cannot be
    asked, ends with a failure status and its reason; one that survived its damage is
    answered; either way the association goes on."""
    identifier = data.draw(st.one_of(dimse.mutated_bytes(QUERY), st.binary(max_size=256)))
    peer = dimse.Peer(gateway.port)
    peer.send(associate_rq(gateway.ae_title, FINDER, [(1, FIND, [dimse.IMPLICIT_LE])], 1 << 16))
    answer = peer.read_pdu()
    assert answer is not None and answer[0] == dimse.A_ASSOCIATE_AC
    assert IMPLEMENTATION_CLASS_UID.encode() in answer[1]  # ours, not pynetdicom's
    peer.send(dimse.p_data(dimse.pdv(1, dimse.c_find_rq(FIND, 7), 3)))
    peer.send(dimse.p_data(dimse.pdv(1, identifier, 2)))
    exchange = dimse.Exchange()
    while True:
        pdu = peer.read_pdu()
        assert pdu is not None and pdu[0] == dimse.P_DATA_TF, "no final C-FIND response"
        exchange.pdus.append(pdu)
        statuses = exchange.statuses()
        if statuses and statuses[-1] not in (0xFF00, 0xFF01):
            break
    final = statuses[-1]
    assert final in FIND_ENDS, f"status 0x{final:04X}"
    if final != 0x0000:
        assert exchange.comments()[-1], "a refusal without its reason"
    peer.send(dimse.release_rq())
    assert peer.finish().types() == [dimse.A_RELEASE_RP]
    assert_serving(gateway, baseline)


# -- damaged datasets ----------------------------------------------------------------------------

ACKNOWLEDGED: dict[str, Instance] = {}  # sha256 of the spooled file -> what was sent
REFUSED: list[int] = []


@budget(60)
@given(data=st.data())
@input_path("DICOM: C-STORE datasets")
def test_damaged_datasets_are_refused_with_a_reason_or_stored_whole(
    gateway: GatewayProcess, baseline: dict[str, float], instance: Instance, data: st.DataObject
) -> None:
    case = data.draw(damaged(instance))
    exchange = c_store(gateway.port, case)
    statuses = exchange.statuses()
    assert len(statuses) == 1, f"no C-STORE response: {exchange.types()}"
    status = statuses[0]
    if status == SUCCESS:
        meta = file_meta(case.sop_class_uid, case.sop_instance_uid, case.transfer_syntax_uid)
        ACKNOWLEDGED[hashlib.sha256(meta + case.dataset).hexdigest()] = case
    else:
        assert status in REFUSALS, f"status 0x{status:04X}"
        assert exchange.comments()[0], "a refusal without its reason"
        REFUSED.append(status)
    assert_serving(gateway, baseline)


def test_what_was_acknowledged_reached_the_hub_whole_and_refusals_were_audited(
    net: Network, gateway: GatewayProcess, baseline: dict[str, float]
) -> None:
    """After the damaged datasets: each acknowledged one is at the hub (or set aside by the
    gateway with the hub's reason), each refusal is in the audit trail, and no association
    or thread was left behind."""
    refused_folder = net.root / "gateway-SEG" / "data" / "spool" / "refused"
    deadline = time.monotonic() + 120
    missing = set(ACKNOWLEDGED)
    while missing and time.monotonic() < deadline:
        held = {row[0] for row in hub_query(net, "SELECT sha256 FROM blobs")}
        set_aside = {p.stem for p in refused_folder.glob("*.dcm")}
        missing -= held | set_aside
        time.sleep(0.5)
    assert not missing, f"{len(missing)} acknowledged instances never reached the hub"
    deadline = time.monotonic() + 60
    count = "SELECT count(*) FROM audit_events WHERE action = 'dicom:instance:refused'"
    while hub_query(net, count)[0][0] < len(REFUSED) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert hub_query(net, count)[0][0] >= len(REFUSED)
    assert all(e["detail"]["reason"] for e in audit_events(net, "dicom:instance:refused"))
    assert not list((net.root / "gateway-SEG" / "data" / "spool" / "tmp").iterdir())
    threads = proc_status_kb(gateway.process.pid, "Threads")
    assert threads <= baseline["threads"] + 4, "associations left open"
    assert_serving(gateway, baseline)


# -- declared lengths of gigabytes ---------------------------------------------------------------


@input_path("DICOM: oversized declared lengths")
def test_a_pdu_declaring_4_gb_is_aborted_before_it_is_read(
    gateway: GatewayProcess, baseline: dict[str, float]
) -> None:
    peer = dimse.Peer(gateway.port)
    answer = peer.associate(ROUTE, CALLING)
    assert answer is not None and answer[0] == dimse.A_ASSOCIATE_AC
    before = peak_rss_mb(gateway.process.pid)
    peer.send(struct.pack(">BBI", dimse.P_DATA_TF, 0, 0xFFFFFFFF))
    sent = 0
    chunk = bytes(1 << 20)
    while sent < 256 and peer.send(chunk):  # the bytes it declared, until refused
        sent += 1
    exchange = peer.finish()
    assert exchange.closed_by_peer
    assert dimse.A_ASSOCIATE_AC not in exchange.types()
    assert sent < 256, "the gateway read on into a 4 GB PDU"
    assert peak_rss_mb(gateway.process.pid) - before < 32
    assert_serving(gateway, baseline)


@input_path("DICOM: oversized declared lengths")
def test_an_element_declaring_0xfffffff0_bytes_is_refused_without_allocating(
    gateway: GatewayProcess, baseline: dict[str, float], instance: Instance
) -> None:
    data = bytearray(instance.dataset)
    struct.pack_into("<I", data, pixel_data_start(instance) + 8, 0xFFFFFFF0)  # OW: 4 bytes
    case = Instance(bytes(data), instance.sop_class_uid, instance.sop_instance_uid)
    assert_refused_without_allocating(gateway, baseline, case, "truncated")


@input_path("DICOM: oversized declared lengths")
def test_a_deflate_bomb_is_refused_without_inflating_it(
    gateway: GatewayProcess, baseline: dict[str, float], instance: Instance
) -> None:
    """600 KB that inflate to 600 MB, in the Deflated Explicit VR Little Endian syntax."""
    bomb = deflate_bomb(instance.dataset[: pixel_data_start(instance)], 600 * 1024**2)
    assert len(bomb) < 1024**2
    case = Instance(bomb, instance.sop_class_uid, instance.sop_instance_uid, dimse.DEFLATED_LE)
    assert_refused_without_allocating(gateway, baseline, case, "inflates to more than")


def pixel_data_start(instance: Instance) -> int:
    return next(start for tag, start, _, _ in elements(instance.dataset) if tag == 0x7FE00010)


def assert_refused_without_allocating(
    gateway: GatewayProcess, baseline: dict[str, float], case: Instance, reason: str
) -> None:
    before = peak_rss_mb(gateway.process.pid)
    exchange = c_store(gateway.port, case)
    assert exchange.statuses() == [CANNOT_UNDERSTAND]
    assert reason in exchange.comments()[0]
    assert peak_rss_mb(gateway.process.pid) - before < 32
    assert_serving(gateway, baseline)


def test_no_handler_of_the_gateway_failed(net: Network, gateway: GatewayProcess) -> None:
    """Last: whatever came before, nothing went through our code as an unhandled error."""
    assert our_tracebacks(gateway.log) == []
    assert our_tracebacks(net.root / "hub.log") == []

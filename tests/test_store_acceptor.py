"""The gateway's port has two acceptors behind it: our own for plain storage, verification
and C-FIND associations, pynetdicom's for the rest (C-MOVE, C-GET, anything unusual),
handed the connection with its request unread. Each answer says who gave it: the
A-ASSOCIATE-AC carries the implementation class UID of the acceptor that sent it.

Both count against one limit of associations at once, and a request that comes in pieces
still gets its answer.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz import dimse
from imagebridge.demo.network import GatewayProcess, Network
from imagebridge.dicom.acceptor import AssociateRequest, Refusal
from imagebridge.dicom.part10 import IMPLEMENTATION_CLASS_UID
from imagebridge.dicom.ul import associate_rq
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.routing import RoutingTable
from imagebridge.gateway.scp import StorageSCP
from imagebridge.gateway.spool import Spool
from imagebridge.settings import CallingNode, GatewaySettings

CALLING = "PACS_SEG"
ROUTE = "IB_RVH"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve - MOVE
LIMIT = 3


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    network = Network(tmp_path_factory.mktemp("acceptor") / "net")
    try:
        network.start_hub()
        network.add_institution("SEG", "St Elsewhere General Hospital")
        network.add_institution("RVH", "Riverside Hospital")
        yield network.start_gateway(
            "SEG",
            calling_aes=[{"ae_title": CALLING, "host": "127.0.0.1"}],
            max_associations=LIMIT,
        )
    finally:
        network.stop()


def implementation_uid(ac: bytes) -> str:
    """The implementation class UID in an A-ASSOCIATE-AC's user information."""
    pos = 68
    while pos + 4 <= len(ac):
        item_type, _, length = struct.unpack_from(">BBH", ac, pos)
        if item_type == 0x50:
            sub = pos + 4
            while sub < pos + 4 + length:
                sub_type, _, sub_length = struct.unpack_from(">BBH", ac, sub)
                if sub_type == 0x52:
                    return ac[sub + 4 : sub + 4 + sub_length].decode().rstrip("\x00")
                sub += 4 + sub_length
        pos += 4 + length
    raise AssertionError("no implementation class UID")


def echo_on(peer: dimse.Peer) -> int:
    peer.send(dimse.p_data(dimse.pdv(dimse.ECHO_CONTEXT, dimse.c_echo_rq(), 3)))
    answer = peer.read_pdu()
    assert answer is not None and answer[0] == dimse.P_DATA_TF
    status = dimse.Exchange([answer]).statuses()[0]
    peer.send(dimse.release_rq())
    assert peer.read_pdu() == (dimse.A_RELEASE_RP, b"\x00" * 4)
    return status


@pytest.mark.parametrize(
    ("abstract_syntaxes", "ours"),
    [((), True), ((FIND,), True), ((FIND, MOVE), False), ((MOVE,), False)],
)
def test_storage_and_find_are_ours_and_retrieve_is_pynetdicoms(
    gateway: GatewayProcess, abstract_syntaxes: tuple[str, ...], ours: bool
) -> None:
    contexts = [(1, dimse.VERIFICATION, [dimse.IMPLICIT_LE])]
    contexts += [(3 + 2 * n, uid, [dimse.IMPLICIT_LE]) for n, uid in enumerate(abstract_syntaxes)]
    peer = dimse.Peer(gateway.port)
    peer.send(associate_rq(gateway.ae_title, CALLING, contexts, 1 << 16))
    answer = peer.read_pdu()
    assert answer is not None and answer[0] == dimse.A_ASSOCIATE_AC
    assert (implementation_uid(answer[1]) == IMPLEMENTATION_CLASS_UID) is ours
    assert echo_on(peer) == 0x0000


def test_a_request_in_pieces_is_answered(gateway: GatewayProcess) -> None:
    request = dimse.association_request(ROUTE, CALLING)
    peer = dimse.Peer(gateway.port)
    peer.send(request[:20])
    time.sleep(0.5)  # longer than our acceptor waits for the rest: pynetdicom reads it
    peer.send(request[20:])
    answer = peer.read_pdu()
    assert answer is not None and answer[0] == dimse.A_ASSOCIATE_AC
    assert echo_on(peer) == 0x0000


def _held(gateway: GatewayProcess, request: bytes) -> dimse.Peer:
    """An association, once the earlier tests' have ended: pynetdicom counts one of its own
    as open until its thread has finished, a moment after the release."""
    deadline = time.monotonic() + 15
    while True:
        peer = dimse.Peer(gateway.port)
        peer.send(request)
        answer = peer.read_pdu()
        if answer is not None and answer[0] == dimse.A_ASSOCIATE_AC:
            return peer
        assert answer == (dimse.A_ASSOCIATE_RJ, bytes([0, 2, 3, 2])), answer
        assert time.monotonic() < deadline, "the earlier associations never ended"
        peer.finish()
        time.sleep(0.2)


def test_one_limit_of_associations_for_both_acceptors(gateway: GatewayProcess) -> None:
    # One held by pynetdicom (C-MOVE is its), the others by ours.
    move = associate_rq(
        gateway.ae_title,
        CALLING,
        [(1, dimse.VERIFICATION, [dimse.IMPLICIT_LE]), (3, MOVE, [dimse.IMPLICIT_LE])],
        1 << 16,
    )
    held = [_held(gateway, move)]
    held += [_held(gateway, dimse.association_request(ROUTE, CALLING)) for _ in range(LIMIT - 1)]
    for request in (
        dimse.association_request(ROUTE, CALLING),  # for ours
        associate_rq(gateway.ae_title, CALLING, [(3, MOVE, [dimse.IMPLICIT_LE])], 1 << 16),
    ):
        extra = dimse.Peer(gateway.port)
        extra.send(request)
        # Rejected-transient by the service provider: local limit exceeded (PS3.8 9.3.4).
        assert extra.read_pdu() == (dimse.A_ASSOCIATE_RJ, bytes([0, 2, 3, 2]))
        assert extra.finish().closed_by_peer
    for peer in held:
        assert echo_on(peer) == 0x0000
        peer.sock.close()
    assert echo_on(_held(gateway, dimse.association_request(ROUTE, CALLING))) == 0x0000


def test_requests_admitted_at_the_same_moment_stay_within_the_limit(tmp_path: Path) -> None:
    """Admitted requests count as open before their associations are served, so that many
    arriving together cannot each find room under the limit and together pass it."""
    settings = GatewaySettings(
        data_dir=tmp_path,
        ae_title="IB_GW_SEG",
        max_associations=LIMIT,
        calling_aes=[CallingNode(ae_title=CALLING, host="127.0.0.1")],
    )
    scp = StorageSCP(
        settings,
        Spool(tmp_path / "spool", 0),
        RoutingTable(tmp_path / "routes.json"),
        Journal(tmp_path / "journal"),
    )
    request = AssociateRequest("IB_GW_SEG", CALLING, (), 0, b"")
    callers = 4 * LIMIT
    start = threading.Barrier(callers)
    answers: list[object] = []

    def ask() -> None:
        start.wait()
        answers.append(scp.admit(request, "127.0.0.1"))

    threads = [threading.Thread(target=ask) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(a, Refusal) for a in answers) == LIMIT
    # A request refused for who it is gives its place back.
    stranger = AssociateRequest("IB_GW_SEG", "STRANGER", (), 0, b"")
    scp._admitting = 0
    assert isinstance(scp.admit(stranger, "127.0.0.1"), Refusal)
    assert scp._admitting == 0

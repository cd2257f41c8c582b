"""The DICOM Upper Layer spoken badly: PDUs built byte by byte (PS3.8 9.3), well-formed or
not, sent over a plain socket to a real SCP, and what came back.

Nothing here goes through pynetdicom or our own requestor, so that any byte can be wrong.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

from hypothesis import strategies as st

from imagebridge.dicom.ul import associate_rq, c_store_rq

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
# Context ids as the requests below propose them.
ECHO_CONTEXT, STORE_CONTEXT = 1, 3


def pdu(pdu_type: int, body: bytes, declared: int | None = None) -> bytes:
    """A PDU; ``declared`` overrides its length field (a lie about what follows)."""
    length = len(body) if declared is None else declared
    return struct.pack(">BBI", pdu_type, 0, length) + body


def pdv(context_id: int, payload: bytes, control: int, declared: int | None = None) -> bytes:
    """One presentation data value item: control bit 0 marks a command, bit 1 the last
    fragment (PS3.8 E.2)."""
    length = len(payload) + 2 if declared is None else declared
    return struct.pack(">IBB", length, context_id, control) + payload


def p_data(*items: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(items))


def association_request(called: str, calling: str, max_pdu: int = 1 << 16) -> bytes:
    """Verification and CT storage in the four uncompressed and deflated syntaxes."""
    syntaxes = [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE]
    contexts = [
        (ECHO_CONTEXT, VERIFICATION, [IMPLICIT_LE]),
        (STORE_CONTEXT, CT_IMAGE_STORAGE, syntaxes[:1]),
        (5, CT_IMAGE_STORAGE, syntaxes[1:2]),
        (7, CT_IMAGE_STORAGE, syntaxes[2:3]),
        (9, CT_IMAGE_STORAGE, syntaxes[3:]),
    ]
    return associate_rq(called, calling, contexts, max_pdu)


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_echo_rq(message_id: int = 1) -> bytes:
    uid = VERIFICATION.encode() + b"\x00"
    body = b"".join(
        (
            _element(0x00000002, uid),
            _element(0x00000100, struct.pack("<H", 0x0030)),
            _element(0x00000110, struct.pack("<H", message_id)),
            _element(0x00000800, struct.pack("<H", 0x0101)),  # no dataset
        )
    )
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def c_find_rq(sop_class_uid: str, message_id: int = 1) -> bytes:
    uid = sop_class_uid.encode() + b"\x00" * (len(sop_class_uid) % 2)
    body = b"".join(
        (
            _element(0x00000002, uid),
            _element(0x00000100, struct.pack("<H", 0x0020)),
            _element(0x00000110, struct.pack("<H", message_id)),
            _element(0x00000700, struct.pack("<H", 0)),  # medium priority
            _element(0x00000800, struct.pack("<H", 0x0000)),  # an identifier follows
        )
    )
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def store_command(sop_instance_uid: str, message_id: int = 1) -> bytes:
    return c_store_rq(message_id, CT_IMAGE_STORAGE, sop_instance_uid, 0)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, b"\x00" * 4)


@dataclass
class Exchange:
    """What the SCP sent back, PDU by PDU, and how the connection ended."""

    pdus: list[tuple[int, bytes]] = field(default_factory=list)
    closed_by_peer: bool = False
    seconds: float = 0.0

    def types(self) -> list[int]:
        return [t for t, _ in self.pdus]

    def statuses(self) -> list[int]:
        """The Status (0000,0900) of each DIMSE response the SCP sent."""
        found = []
        for pdu_type, body in self.pdus:
            if pdu_type != P_DATA_TF:
                continue
            command = parse_command(_pdv_payloads(body))
            if 0x00000900 in command:
                found.append(struct.unpack("<H", command[0x00000900][:2])[0])
        return found

    def comments(self) -> list[str]:
        out = []
        for pdu_type, body in self.pdus:
            if pdu_type == P_DATA_TF:
                comment = parse_command(_pdv_payloads(body)).get(0x00000902, b"")
                out.append(comment.rstrip(b" \x00").decode("ascii", "replace"))
        return out


def _pdv_payloads(body: bytes) -> bytes:
    out = b""
    pos = 0
    while pos + 6 <= len(body):
        (length,) = struct.unpack_from(">I", body, pos)
        out += body[pos + 6 : pos + 4 + length]
        pos += 4 + length
    return out


def parse_command(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[group << 16 | elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


class Peer:
    """A raw connection to an SCP on loopback."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """False once the SCP has closed the connection (it may refuse mid-way)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next whole PDU, or None at the end of the stream."""
        while True:
            if len(self.buffer) >= 6:
                pdu_type, _, length = struct.unpack_from(">BBI", self.buffer)
                if len(self.buffer) >= 6 + length:
                    body = self.buffer[6 : 6 + length]
                    self.buffer = self.buffer[6 + length :]
                    return pdu_type, body
            try:
                chunk = self.sock.recv(1 << 16)
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            self.buffer += chunk

    def associate(self, called: str, calling: str) -> tuple[int, bytes] | None:
        self.send(association_request(called, calling))
        return self.read_pdu()

    def finish(self) -> Exchange:
        """Say nothing more; gather every PDU until the SCP closes the connection."""
        started = time.monotonic()
        exchange = Exchange()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        while (answer := self.read_pdu()) is not None:
            exchange.pdus.append(answer)
        try:
            exchange.closed_by_peer = self.sock.recv(1) == b""
        except TimeoutError:
            exchange.closed_by_peer = False
        except OSError:  # reset: closed too
            exchange.closed_by_peer = True
        self.sock.close()
        exchange.seconds = time.monotonic() - started
        return exchange


def echo(port: int, called: str, calling: str) -> int | None:
    """A C-ECHO over a raw association: its status, or None if it failed."""
    peer = Peer(port)
    try:
        answer = peer.associate(called, calling)
        if answer is None or answer[0] != A_ASSOCIATE_AC:
            return None
        peer.send(p_data(pdv(ECHO_CONTEXT, c_echo_rq(), 3)))
        response = peer.read_pdu()
        peer.send(release_rq())
        statuses = Exchange([response] if response else []).statuses()
        return statuses[0] if statuses else None
    finally:
        peer.finish()


# -- strategies ---------------------------------------------------------------------------------

_UINT32 = st.one_of(
    st.sampled_from([0, 1, 2, 5, 6, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes changed, cut short, or spliced with noise."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if how == "flip" and out:
            out[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del out[at:]
        elif how == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif out:
            del out[at : at + draw(st.integers(1, 16))]
    return bytes(out)


@st.composite
def opening_bytes(draw: st.DrawFn, called: str, calling: str) -> bytes:
    """What a hostile peer may send first, instead of a sound A-ASSOCIATE-RQ."""
    good = association_request(called, calling)
    kind = draw(
        st.sampled_from(["noise", "mutated", "lying-length", "other-pdu", "huge-items", "short"])
    )
    if kind == "noise":
        return draw(st.binary(min_size=1, max_size=512))
    if kind == "mutated":
        return draw(mutated_bytes(good))
    if kind == "lying-length":
        return pdu(A_ASSOCIATE_RQ, good[6:], declared=draw(_UINT32))
    if kind == "other-pdu":
        pdu_type = draw(st.integers(0, 255).filter(lambda t: t != A_ASSOCIATE_RQ))
        return pdu(pdu_type, draw(st.binary(max_size=64)))
    if kind == "huge-items":
        # An item whose length runs past the PDU (PS3.8 9.3.2 variable items).
        body = bytearray(good[6:])
        at = 68 + draw(st.integers(0, 8))
        body[at : at + 4] = struct.pack(">BBH", body[at], 0, draw(st.integers(0, 0xFFFF)))
        return pdu(A_ASSOCIATE_RQ, bytes(body))
    return good[: draw(st.integers(0, len(good) - 1))]


@st.composite
def hostile_pdus(draw: st.DrawFn, sop_instance_uid: str, dataset: bytes) -> list[bytes]:
    """PDUs a hostile peer sends on an accepted association."""
    kinds = [
        "pdv-length-past-end",
        "pdv-length-short",
        "unknown-context",
        "command-noise",
        "dataset-first",
        "dataset-noise",
        "control-noise",
        "unknown-pdu",
        "second-associate",
        "release-rp",
        "abort-noise",
        "lying-pdu-length",
        "empty-p-data",
        "mutated-p-data",
    ]
    out: list[bytes] = []
    command = store_command(sop_instance_uid)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "pdv-length-past-end":
            out.append(p_data(pdv(ECHO_CONTEXT, c_echo_rq(), 3, declared=draw(_UINT32))))
        elif kind == "pdv-length-short":
            out.append(p_data(pdv(ECHO_CONTEXT, c_echo_rq(), 3, declared=draw(st.integers(0, 1)))))
        elif kind == "unknown-context":
            context = draw(st.integers(0, 255).filter(lambda c: c not in (1, 3, 5, 7, 9)))
            out.append(p_data(pdv(context, c_echo_rq(), 3)))
        elif kind == "command-noise":
            out.append(p_data(pdv(ECHO_CONTEXT, draw(st.binary(max_size=256)), 3)))
        elif kind == "dataset-first":
            out.append(p_data(pdv(STORE_CONTEXT, dataset[:512], 2)))
        elif kind == "dataset-noise":
            out.append(p_data(pdv(STORE_CONTEXT, command, 3)))
            out.append(p_data(pdv(STORE_CONTEXT, draw(st.binary(max_size=512)), 2)))
        elif kind == "control-noise":
            control = draw(st.integers(0, 255))
            out.append(p_data(pdv(STORE_CONTEXT, command, control)))
        elif kind == "unknown-pdu":
            pdu_type = draw(st.integers(8, 255))
            out.append(pdu(pdu_type, draw(st.binary(max_size=64))))
        elif kind == "second-associate":
            out.append(association_request("IB_RVH", "PACS_SEG"))
        elif kind == "release-rp":
            out.append(pdu(A_RELEASE_RP, b"\x00" * 4))
        elif kind == "abort-noise":
            out.append(pdu(A_ABORT, draw(st.binary(max_size=8))))
        elif kind == "lying-pdu-length":
            body = pdv(STORE_CONTEXT, command, 3)
            out.append(pdu(P_DATA_TF, body, declared=draw(_UINT32)))
        elif kind == "empty-p-data":
            out.append(pdu(P_DATA_TF, b""))
        else:
            out.append(draw(mutated_bytes(p_data(pdv(STORE_CONTEXT, command, 3)))))
    return out

"""A small DICOM Upper Layer client (PS3.8) for the one thing on our hot path: C-STORE.

pynetdicom spends milliseconds of Python per message building command sets with pydicom
and pushing every PDU through its state machine; sending a study that way costs more CPU
than the rest of a gateway together. Here a command set is a few struct.pack calls and a
dataset goes from the file to the socket in PDU-sized slices, never decoded.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from imagebridge.dicom.encode import element, padded
from imagebridge.dicom.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
OUR_MAX_PDU = 1 << 20
# When the peer sets no limit (0), still send bounded PDUs.
UNLIMITED_SEND_PDU = 1 << 20
# A dataset is read from its file this much at a time, and its PDUs sent in one system
# call: DCMTK accepts 16 KiB PDUs by default, a few thousand of them for a CT.
SEND_CHUNK = 1 << 20
MAX_IOV = 512  # well below IOV_MAX (1024 on Linux)

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

C_STORE_RQ = 0x0001
PRIORITY_MEDIUM = 0x0000
NO_DATASET = 0x0101


class AssociationError(ConnectionError):
    """No association: refused, aborted, or the peer could not be reached."""


class ProtocolError(ConnectionError):
    """The peer sent something this client cannot follow; the association is aborted."""


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle: DIMSE is request/response, and delayed ACKs cost ~40 ms a message."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _padded_ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16, b" ")


def pdu_item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def associate_rq(
    called: str, calling: str, contexts: list[tuple[int, str, list[str]]], max_pdu: int
) -> bytes:
    body = struct.pack(">HH", 1, 0) + _padded_ae(called) + _padded_ae(calling) + b"\x00" * 32
    body += pdu_item(0x10, _uid(APPLICATION_CONTEXT))
    for context_id, abstract, syntaxes in contexts:
        sub = pdu_item(0x30, _uid(abstract)) + b"".join(pdu_item(0x40, _uid(s)) for s in syntaxes)
        body += pdu_item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = (
        pdu_item(0x51, struct.pack(">I", max_pdu))
        + pdu_item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
        + pdu_item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii"))
    )
    body += pdu_item(0x50, user)
    return struct.pack(">BBI", A_ASSOCIATE_RQ, 0, len(body)) + body


@dataclass
class Accepted:
    max_pdu: int
    # context id -> (abstract syntax, accepted transfer syntax)
    contexts: dict[int, tuple[str, str]]


def parse_associate_ac(body: bytes, proposed: dict[int, str]) -> Accepted:
    pos = 68  # protocol version, reserved, AE titles, reserved
    max_pdu = 0
    contexts: dict[int, tuple[str, str]] = {}
    while pos + 4 <= len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type == 0x21 and len(value) >= 4:
            context_id, _, result, _ = struct.unpack_from(">BBBB", value)
            if result == 0 and context_id in proposed and len(value) >= 8:
                _, _, ts_len = struct.unpack_from(">BBH", value, 4)
                syntax = value[8 : 8 + ts_len].rstrip(b"\x00").decode("ascii")
                contexts[context_id] = (proposed[context_id], syntax)
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_type, _, sub_len = struct.unpack_from(">BBH", value, sub)
                if sub_type == 0x51 and sub_len == 4:
                    (max_pdu,) = struct.unpack_from(">I", value, sub + 4)
                sub += 4 + sub_len
    return Accepted(max_pdu, contexts)


def command_element(tag: int, value: bytes) -> bytes:
    """A command set's element: always implicit VR little endian (PS3.7 6.3.1)."""
    return element(tag, "", value, implicit=True)


def even_uid(uid: str) -> bytes:
    return padded(uid.encode("ascii"), "UI")


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int) -> bytes:
    """The C-STORE-RQ command set, implicit VR little endian (PS3.7 9.3.1.1)."""
    body = b"".join(
        (
            command_element(0x00000002, even_uid(sop_class)),
            command_element(0x00000100, struct.pack("<H", C_STORE_RQ)),
            command_element(0x00000110, struct.pack("<H", message_id)),
            command_element(0x00000700, struct.pack("<H", priority)),
            command_element(0x00000800, struct.pack("<H", 0x0000)),  # a dataset follows
            command_element(0x00001000, even_uid(sop_instance)),
        )
    )
    return command_element(0x00000000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[(group << 16) | elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of an open file, from ``offset``."""

    file: io.BufferedIOBase
    offset: int
    length: int


@dataclass(frozen=True)
class StoreResponse:
    status: int
    error_comment: str


class Association:
    """One association as a requestor, for C-STORE."""

    def __init__(self, sock: socket.socket, accepted: Accepted, timeout: float) -> None:
        self.sock = sock
        self.accepted = accepted
        self.timeout = timeout
        peer = accepted.max_pdu or UNLIMITED_SEND_PDU
        # Each PDU carries a 6-byte PDV item header inside its length.
        self.fragment = max(1, min(peer, UNLIMITED_SEND_PDU) - 6)
        self.message_id = 0
        self.established = True
        self._buffer = bytearray(SEND_CHUNK)

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        called: str,
        calling: str,
        contexts: list[tuple[str, list[str]]],
        timeout: float = 60.0,
    ) -> Association:
        numbered = [(1 + 2 * i, a, s) for i, (a, s) in enumerate(contexts)]
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise AssociationError(f"cannot connect: {exc.strerror or exc}") from exc
        set_nodelay(sock)
        sock.settimeout(timeout)
        try:
            sock.sendall(associate_rq(called, calling, numbered, OUR_MAX_PDU))
            pdu_type, body = _read_pdu(sock)
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise AssociationError(f"association failed: {exc}") from exc
        if pdu_type == A_ASSOCIATE_AC:
            accepted = parse_associate_ac(body, {cid: a for cid, a, _ in numbered})
            return cls(sock, accepted, timeout)
        sock.close()
        if pdu_type == A_ASSOCIATE_RJ and len(body) >= 4:
            _, result, source, reason = struct.unpack_from(">BBBB", body)
            raise AssociationError(
                f"association rejected (result {result}, source {source}, reason {reason})"
            )
        raise AssociationError("association aborted by the peer")

    def context_for(self, sop_class: str, syntax: str) -> int | None:
        for context_id, (abstract, accepted) in self.accepted.contexts.items():
            if abstract == sop_class and accepted == syntax:
                return context_id
        return None

    def c_store(
        self,
        context_id: int,
        sop_class: str,
        sop_instance: str,
        dataset: Sequence[bytes | FileRange],
        priority: int = PRIORITY_MEDIUM,
    ) -> StoreResponse:
        """Send one dataset, the concatenation of ``dataset``'s parts, and await the answer."""
        self.message_id = (self.message_id % 0xFFFF) + 1
        command = c_store_rq(self.message_id, sop_class, sop_instance, priority)
        try:
            self._send_dataset(context_id, command, dataset)
            return self._read_response()
        except (OSError, ProtocolError) as exc:
            self.abort()
            raise AssociationError(f"association lost during C-STORE: {exc}") from exc

    def _send_dataset(
        self, context_id: int, command: bytes, parts: Sequence[bytes | FileRange]
    ) -> None:
        """The command, then the dataset in PDUs of the negotiated size, many PDUs to a
        system call, file bytes read into one reused buffer."""
        iov: list[bytes | memoryview] = [_pdv_header(context_id, len(command), 3), command]
        remaining = sum(len(p) if isinstance(p, bytes) else p.length for p in parts)
        if remaining == 0:
            iov.append(_pdv_header(context_id, 0, 2))
        room = 0  # what the current PDU still takes
        for chunk, reused in self._chunks(parts):
            while chunk:
                if room == 0:
                    room = min(self.fragment, remaining)
                    remaining -= room
                    iov.append(_pdv_header(context_id, room, 0 if remaining else 2))
                iov.append(chunk[:room])
                taken = min(room, len(chunk))
                chunk, room = chunk[taken:], room - taken
                if len(iov) >= MAX_IOV:
                    self._send_all(iov)
            if reused:  # the buffer is read into again: what points into it goes first
                self._send_all(iov)
        self._send_all(iov)

    def _chunks(self, parts: Sequence[bytes | FileRange]) -> Iterator[tuple[memoryview, bool]]:
        """The parts' bytes, a file's read into the association's buffer (True: reused)."""
        buffer = memoryview(self._buffer)
        for part in parts:
            if isinstance(part, bytes):
                yield memoryview(part), False
                continue
            part.file.seek(part.offset)
            left = part.length
            while left:
                n = part.file.readinto(buffer[: min(left, len(buffer))])
                if not n:
                    raise ProtocolError("the file ended before its dataset did")
                left -= n
                yield buffer[:n], True

    def _send_all(self, iov: list[bytes | memoryview]) -> None:
        """sendmsg until all of ``iov`` is sent (it may take part: a full send buffer)."""
        start = 0
        while start < len(iov):
            batch = iov[start : start + MAX_IOV]
            sent = self.sock.sendmsg(batch)
            if sent == sum(map(len, batch)):  # the usual case: all of it
                start += len(batch)
                continue
            while sent >= len(iov[start]):
                sent -= len(iov[start])
                start += 1
            iov[start] = memoryview(iov[start])[sent:]
        iov.clear()

    def _read_response(self) -> StoreResponse:
        command = bytearray()
        while True:
            pdu_type, body = _read_pdu(self.sock)
            if pdu_type == A_ABORT:
                self.established = False
                raise ProtocolError("the peer aborted the association")
            if pdu_type == A_RELEASE_RQ:
                raise ProtocolError("the peer released the association mid-operation")
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type {pdu_type}")
            pos = 0
            last = False
            while pos + 6 <= len(body):
                (item_length,) = struct.unpack_from(">I", body, pos)
                control = body[pos + 5]
                command += body[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if control & 1 and control & 2:
                    last = True
            if last:
                break
        fields = parse_command(bytes(command))
        if 0x00000900 not in fields:
            raise ProtocolError("a response without a status")
        (status,) = struct.unpack("<H", fields[0x00000900][:2])
        comment = fields.get(0x00000902, b"").rstrip(b" \x00").decode("ascii", "replace")
        return StoreResponse(status, comment)

    def release(self) -> None:
        if not self.established:
            return
        self.established = False
        try:
            self.sock.sendall(struct.pack(">BBII", A_RELEASE_RQ, 0, 4, 0))
            while True:
                pdu_type, _ = _read_pdu(self.sock)
                if pdu_type in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, ProtocolError):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        if self.established:
            self.established = False
            with contextlib.suppress(OSError):
                self.sock.sendall(struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, 0, 0))
        self.sock.close()


def _pdv_header(context_id: int, length: int, control: int) -> bytes:
    """A P-DATA-TF PDU holding one PDV of ``length`` bytes; control bit 0 marks a command,
    bit 1 the last fragment."""
    return struct.pack(">BBIIBB", P_DATA_TF, 0, length + 6, length + 2, context_id, control)


MAX_INCOMING_PDU = OUR_MAX_PDU + 64


def read_exact(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes from the socket, into one buffer (not copied again)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ProtocolError("the connection closed")
        got += r
    return buf


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, _, length = struct.unpack(">BBI", read_exact(sock, 6))
    if length > MAX_INCOMING_PDU:
        raise ProtocolError(f"a PDU of {length} bytes exceeds the {OUR_MAX_PDU} we accept")
    return pdu_type, bytes(read_exact(sock, length))

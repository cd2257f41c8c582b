"""A small DICOM Upper Layer acceptor (PS3.8) for what a gateway does most: C-STORE (and
C-ECHO) from a PACS or modality, and C-FIND from a workstation.

pynetdicom decodes and re-encodes every command set with pydicom and passes each PDU
between threads through its state machine: for a CT of hundreds of slices, or a C-FIND
answered with hundreds of matches, that is most of a gateway's CPU. Here one thread reads
PDUs straight into the message they belong to and answers with a few struct.pack calls; a
dataset is handed on as the bytes received, and a C-FIND's answers are sent in batches.

Only plain, well-formed requests for storage, verification and C-FIND come here (see
``storage_request``); anything else (C-MOVE and C-GET, extended negotiation, user
identity, TLS, a request that does not parse) stays with pynetdicom, which answers it as
before.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from imagebridge.dicom.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from imagebridge.dicom.received import Received
from imagebridge.dicom.ul import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    APPLICATION_CONTEXT,
    NO_DATASET,
    P_DATA_TF,
    ProtocolError,
    command_element,
    even_uid,
    parse_command,
    pdu_item,
    read_exact,
)

log = logging.getLogger(__name__)

# The longest A-ASSOCIATE-RQ read here; a longer one is pynetdicom's to judge.
MAX_REQUEST = 64 * 1024
PARTIAL_SECONDS = 0.2
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_CANCEL_RQ = 0x0FFF
UNABLE_TO_PROCESS = 0xC000
# A C-FIND's answers go out when this much is ready (and at the end): one send, not one each.
SEND_BATCH = 64 * 1024
# A-ABORT (PS3.8 9.3.8): source 2 = service provider; reasons
UNEXPECTED_PDU, INVALID_PARAMETER = 2, 6
# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2)
ACCEPTED, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4


@dataclass(frozen=True)
class Context:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    called_ae_title: str
    calling_ae_title: str
    contexts: tuple[Context, ...]
    max_pdu: int  # the longest PDU the requestor takes; 0: no limit
    raw_titles: bytes  # called, calling and the reserved field, echoed in the answer


@dataclass(frozen=True)
class StoreRequest:
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Refusal:
    """An A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source and reason."""

    result: int
    source: int
    reason: int


A = TypeVar("A")


class StoreService(Protocol[A]):
    """What the acceptor asks of its owner. ``A`` is the owner's record of an admitted
    association; each answer is a DIMSE status and its error comment."""

    def admit(self, request: AssociateRequest, address: str) -> A | Refusal: ...

    def echo(self, admitted: A) -> tuple[int, str]: ...

    def store(self, admitted: A, request: StoreRequest, dataset: Received) -> tuple[int, str]:
        """``dataset``: whole, in memory or in a file; ``dataset.error`` if it could not be
        kept."""
        ...

    def find(
        self,
        admitted: A,
        sop_class: str,
        identifier: bytes,
        transfer_syntax: str,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, str, bytes | None]]:
        """A C-FIND's answers: (status, error comment, identifier encoded in
        ``transfer_syntax``) for each pending one, then the final one without an identifier.
        ``cancelled`` says whether the caller has sent C-CANCEL."""
        ...

    def ended(self, admitted: A, *, aborted: bool) -> None: ...


def sniff(sock: socket.socket, timeout: float) -> bytes | None:
    """The A-ASSOCIATE-RQ waiting on a new connection, peeked: left unread, for pynetdicom
    should it be the one to answer. None when the connection closed or sent nothing in
    ``timeout``; ``b""`` when what came is something else, too long, or still not whole
    after PARTIAL_SECONDS (a peek cannot tell a pause from a peer that stopped: pynetdicom
    reads those)."""
    try:
        sock.settimeout(timeout)
        data = sock.recv(MAX_REQUEST, socket.MSG_PEEK)
        if not data:
            return None
        give_up = time.monotonic() + PARTIAL_SECONDS
        while True:
            if len(data) >= 6:
                pdu_type, _, length = struct.unpack_from(">BBI", data)
                if pdu_type != A_ASSOCIATE_RQ or length > MAX_REQUEST - 6:
                    return b""
                if len(data) >= 6 + length:
                    return data[: 6 + length]
            if time.monotonic() > give_up:
                return b""
            time.sleep(0.005)  # a peek answers at once, with what it answered before
            data = sock.recv(MAX_REQUEST, socket.MSG_PEEK)
    except OSError:
        return None


def storage_request(
    pdu: bytes, supported: Collection[str], others: Collection[str]
) -> AssociateRequest | None:
    """The request parsed, if it is plain and asks only for ``supported`` abstract syntaxes
    (or ones nobody here supports, which are refused); None when any context asks for one
    of ``others`` or anything is out of the ordinary."""
    body = pdu[6:]
    if len(body) < 68 or struct.unpack_from(">H", body)[0] & 1 == 0:
        return None
    try:
        called = body[4:20].decode("ascii").strip()
        calling = body[20:36].decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    contexts: list[Context] = []
    max_pdu = -1
    application = False
    for item_type, value in _items(body, 68):
        if item_type == 0x10:
            application = value.rstrip(b"\x00").decode("ascii", "replace") == APPLICATION_CONTEXT
        elif item_type == 0x20:
            context = _context(value)
            if context is None or context.abstract_syntax in others:
                return None
            contexts.append(context)
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0):
                if sub_type == 0x51 and len(sub) == 4:
                    (max_pdu,) = struct.unpack(">I", sub)
                elif sub_type not in (0x52, 0x53, 0x54, 0x55):
                    return None  # extended negotiation, user identity: pynetdicom's
        else:
            return None
    ids = [c.context_id for c in contexts]
    if (
        not application
        or not contexts
        or max_pdu < 0
        or len(set(ids)) != len(ids)
        or any(i % 2 == 0 for i in ids)
        or not any(c.abstract_syntax in supported for c in contexts)
    ):
        return None
    return AssociateRequest(called, calling, tuple(contexts), max_pdu, bytes(body[4:68]))


def _items(data: bytes, pos: int) -> list[tuple[int, bytes]]:
    """The items from ``pos`` to the end; a length past the end gives one item of type -1,
    which every caller refuses."""
    found: list[tuple[int, bytes]] = []
    while pos < len(data):
        if pos + 4 > len(data):
            return [(-1, b"")]
        item_type, _, length = struct.unpack_from(">BBH", data, pos)
        if pos + 4 + length > len(data):
            return [(-1, b"")]
        found.append((item_type, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return found


def _context(value: bytes) -> Context | None:
    if len(value) < 4:
        return None
    context_id = value[0]
    abstract = ""
    syntaxes: list[str] = []
    for sub_type, sub in _items(value, 4):
        try:
            uid = sub.rstrip(b"\x00").decode("ascii")
        except UnicodeDecodeError:
            return None
        if sub_type == 0x30 and not abstract:
            abstract = uid
        elif sub_type == 0x40:
            syntaxes.append(uid)
        else:
            return None
    if not abstract or not syntaxes:
        return None
    return Context(context_id, abstract, tuple(syntaxes))


def associate_ac(
    request: AssociateRequest, chosen: Mapping[int, str | None], max_pdu: int
) -> bytes:
    """The A-ASSOCIATE-AC: each context accepted with its chosen syntax, or refused."""
    body = (
        struct.pack(">HH", 1, 0) + request.raw_titles + pdu_item(0x10, APPLICATION_CONTEXT.encode())
    )
    for context in request.contexts:
        syntax = chosen.get(context.context_id)
        if syntax is None:
            # Refused: the syntax field is not significant, but must be there.
            result = (
                TRANSFER_SYNTAXES_NOT_SUPPORTED
                if context.context_id in chosen
                else ABSTRACT_SYNTAX_NOT_SUPPORTED
            )
            syntax = context.transfer_syntaxes[0]
        else:
            result = ACCEPTED
        body += pdu_item(
            0x21,
            struct.pack(">BBBB", context.context_id, 0, result, 0)
            + pdu_item(0x40, syntax.encode("ascii")),
        )
    user = (
        pdu_item(0x51, struct.pack(">I", max_pdu))
        + pdu_item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + pdu_item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii"))
    )
    body += pdu_item(0x50, user)
    return struct.pack(">BBI", A_ASSOCIATE_AC, 0, len(body)) + body


def associate_rj(refusal: Refusal) -> bytes:
    return struct.pack(
        ">BBIBBBB", A_ASSOCIATE_RJ, 0, 4, 0, refusal.result, refusal.source, refusal.reason
    )


def abort_pdu(reason: int) -> bytes:
    return struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, 2, reason)


def response(
    command_field: int,
    message_id: int,
    sop_class: str,
    sop_instance: str,
    status: int,
    comment: str = "",
    *,
    has_dataset: bool = False,
) -> bytes:
    """A C-STORE-RSP, C-ECHO-RSP or C-FIND-RSP command set, implicit VR little endian
    (PS3.7 9.3)."""
    parts = [
        command_element(0x00000002, even_uid(sop_class)),
        command_element(0x00000100, struct.pack("<H", command_field)),
        command_element(0x00000120, struct.pack("<H", message_id)),
        command_element(0x00000800, struct.pack("<H", 0x0000 if has_dataset else NO_DATASET)),
        command_element(0x00000900, struct.pack("<H", status)),
    ]
    if comment and status != 0:
        text = comment.encode("ascii", "replace")[:64]
        parts.append(command_element(0x00000902, text + b" " * (len(text) % 2)))
    if sop_instance:
        parts.append(command_element(0x00001000, even_uid(sop_instance)))
    body = b"".join(parts)
    return command_element(0x00000000, struct.pack("<I", len(body))) + body


class Aborted(Exception):
    """The association ends now with an A-ABORT of this reason."""

    def __init__(self, reason: int) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerAborted(Exception):
    """The peer sent A-ABORT while an answer was being sent."""


@dataclass
class _Message:
    context: Context
    command: dict[int, bytes]
    dataset: Received


class StoreAssociation(Generic[A]):
    """One accepted association, served in the calling thread until it ends."""

    def __init__(
        self,
        sock: socket.socket,
        request: AssociateRequest,
        accepted: Mapping[int, tuple[Context, str]],
        service: StoreService[A],
        admitted: A,
        *,
        max_pdu: int,
        timeout: float,
        spill_dir: Path | None = None,
        reserve: Callable[[int], None] | None = None,
    ) -> None:
        """``spill_dir``: where a large C-STORE dataset is kept as it arrives, ``reserve``
        asked for the room (see Received)."""
        self.sock = sock
        self.spill_dir = spill_dir
        self.reserve = reserve
        self.accepted = accepted
        self.service = service
        self.admitted = admitted
        self.timeout = timeout
        # What a peer may send in one PDU: what we announced, and never less than 1 MiB
        # (some send association-sized PDUs regardless); checked before a byte of it is read.
        self.limit = max(max_pdu, 1 << 20) + 6
        peer = request.max_pdu or (1 << 20)
        self.fragment = max(peer - 6, 64)
        self._command = bytearray()
        self._message: _Message | None = None
        # The message ID of the C-FIND being answered, and whether C-CANCEL came for it.
        self._finding: int | None = None
        self._cancelled = False

    def serve(self) -> None:
        aborted = True
        try:
            self.sock.settimeout(self.timeout)
            aborted = not self._loop()
        except Aborted as exc:
            with contextlib.suppress(OSError):
                self.sock.sendall(abort_pdu(exc.reason))
        except (OSError, ProtocolError, PeerAborted):
            pass  # the connection dropped or timed out, or the peer aborted
        finally:
            if self._message is not None:  # an instance cut short: nothing of it is kept
                self._message.dataset.discard()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.service.ended(self.admitted, aborted=aborted)

    def abort(self) -> None:
        """From another thread: end the association now (the process is stopping)."""
        with contextlib.suppress(OSError):
            self.sock.sendall(abort_pdu(0))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _loop(self) -> bool:
        """True when released; False when the peer aborted."""
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == P_DATA_TF:
                self._p_data(body)
            elif pdu_type == A_RELEASE_RQ:
                with contextlib.suppress(OSError):
                    self.sock.sendall(struct.pack(">BBII", A_RELEASE_RP, 0, 4, 0))
                # A release in the middle of a message leaves that instance unanswered.
                return self._message is None and not self._command
            elif pdu_type == A_ABORT:
                return False
            else:
                raise Aborted(UNEXPECTED_PDU)

    def _read_pdu(self) -> tuple[int, memoryview]:
        head = read_exact(self.sock, 6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        if length > self.limit:
            raise Aborted(INVALID_PARAMETER)
        return pdu_type, memoryview(read_exact(self.sock, length))

    def _p_data(self, body: memoryview) -> None:
        if len(body) < 6:
            raise Aborted(INVALID_PARAMETER)
        pos = 0
        while pos < len(body):
            if pos + 6 > len(body):
                raise Aborted(INVALID_PARAMETER)
            (length,) = struct.unpack_from(">I", body, pos)
            end = pos + 4 + length
            if length < 2 or end > len(body):
                raise Aborted(INVALID_PARAMETER)
            context_id, control = body[pos + 4], body[pos + 5]
            if context_id not in self.accepted or control > 3:
                raise Aborted(INVALID_PARAMETER)
            data = body[pos + 6 : end]
            if control & 1:
                self._command_fragment(context_id, data, last=bool(control & 2))
            else:
                self._dataset_fragment(context_id, data, last=bool(control & 2))
            pos = end

    def _command_fragment(self, context_id: int, data: memoryview, *, last: bool) -> None:
        if self._message is not None:
            raise Aborted(UNEXPECTED_PDU)  # a command while a dataset was due
        self._command += data
        if len(self._command) > 64 * 1024:
            raise Aborted(INVALID_PARAMETER)
        if not last:
            return
        command = parse_command(bytes(self._command))
        self._command.clear()
        context, _ = self.accepted[context_id]
        field_ = _us(command, 0x00000100)
        if field_ == C_CANCEL_RQ:
            # Only a C-FIND runs long enough to cancel; a late C-CANCEL is no error.
            if self._finding is not None and _us(command, 0x00000120) == self._finding:
                self._cancelled = True
            return
        if self._finding is not None:
            raise Aborted(UNEXPECTED_PDU)  # one operation at a time (no asynchronous window)
        has_dataset = _us(command, 0x00000800) != NO_DATASET
        if field_ == C_ECHO_RQ and not has_dataset:
            status, comment = self.service.echo(self.admitted)
            self._answer(
                context_id, C_ECHO_RSP, command, context.abstract_syntax, "", status, comment
            )
        elif field_ in (C_STORE_RQ, C_FIND_RQ) and has_dataset:
            # A C-FIND identifier is small: only an instance may go to disk.
            spill = self.spill_dir if field_ == C_STORE_RQ else None
            self._message = _Message(context, command, Received(spill, reserve=self.reserve))
        elif field_ == C_FIND_RQ:
            self._find(context_id, command, b"")  # no identifier: refused as unreadable
        else:
            raise Aborted(UNEXPECTED_PDU)

    def _dataset_fragment(self, context_id: int, data: memoryview, *, last: bool) -> None:
        message = self._message
        if message is None or message.context.context_id != context_id:
            raise Aborted(UNEXPECTED_PDU)
        message.dataset.append(data)
        if not last:
            return
        self._message = None
        _, syntax = self.accepted[context_id]
        command = message.command
        if _us(command, 0x00000100) == C_FIND_RQ:
            identifier = message.dataset.data
            assert not isinstance(identifier, Path)  # a C-FIND's is never spilled
            self._find(context_id, command, bytes(identifier))
            return
        request = StoreRequest(
            message_id=_us(command, 0x00000110),
            sop_class_uid=_uid(command, 0x00000002),
            sop_instance_uid=_uid(command, 0x00001000),
            priority=_us(command, 0x00000700),
            transfer_syntax_uid=syntax,
        )
        try:
            status, comment = self.service.store(self.admitted, request, message.dataset)
        finally:
            message.dataset.discard()
        self._answer(
            context_id,
            C_STORE_RSP,
            command,
            request.sop_class_uid,
            request.sop_instance_uid,
            status,
            comment,
        )

    def _answer(
        self,
        context_id: int,
        command_field: int,
        command: dict[int, bytes],
        sop_class: str,
        sop_instance: str,
        status: int,
        comment: str,
    ) -> None:
        data = response(
            command_field, _us(command, 0x00000110), sop_class, sop_instance, status, comment
        )
        self.sock.sendall(self._p_data_tf(context_id, data, command=True))

    def _p_data_tf(self, context_id: int, data: bytes, *, command: bool) -> bytes:
        """``data`` as P-DATA-TF PDUs of one PDV each, none longer than the peer takes."""
        kind = 1 if command else 0
        if len(data) <= self.fragment:  # the usual case (a C-FIND answers hundreds at once)
            head = (P_DATA_TF, 0, len(data) + 6, len(data) + 2, context_id, kind | 2)
            return struct.pack(">BBIIBB", *head) + data
        pieces = [data[i : i + self.fragment] for i in range(0, len(data), self.fragment)]
        return b"".join(
            struct.pack(
                ">BBIIBB",
                P_DATA_TF,
                0,
                len(piece) + 6,
                len(piece) + 2,
                context_id,
                kind | (2 if n == len(pieces) - 1 else 0),
            )
            + piece
            for n, piece in enumerate(pieces or [b""])
        )

    def _find(self, context_id: int, command: dict[int, bytes], identifier: bytes) -> None:
        """Answer a C-FIND: each match as the service yields it, sent in batches, while
        listening for the caller's C-CANCEL; always a final response."""
        context, syntax = self.accepted[context_id]
        sop_class = context.abstract_syntax
        message_id = _us(command, 0x00000110)
        self._finding, self._cancelled = message_id, False
        out = bytearray()
        try:
            answers = self.service.find(
                self.admitted, sop_class, identifier, syntax, self._cancel_requested
            )
            pending: dict[int, bytes] = {}  # each pending status's command: the same each time
            for status, comment, data in answers:
                if data is None:
                    final = response(C_FIND_RSP, message_id, sop_class, "", status, comment)
                    out += self._p_data_tf(context_id, final, command=True)
                    break
                if status not in pending:
                    head = response(C_FIND_RSP, message_id, sop_class, "", status, has_dataset=True)
                    pending[status] = self._p_data_tf(context_id, head, command=True)
                out += pending[status]
                out += self._p_data_tf(context_id, data, command=False)
                if len(out) >= SEND_BATCH:
                    self.sock.sendall(out)
                    out.clear()
            else:
                raise RuntimeError("a C-FIND ended without a final status")
        except (Aborted, PeerAborted, OSError, ProtocolError):
            raise
        except Exception:
            log.exception("a C-FIND failed")
            failure = response(C_FIND_RSP, message_id, sop_class, "", UNABLE_TO_PROCESS, "failed")
            out += self._p_data_tf(context_id, failure, command=True)
        finally:
            self._finding = None
        self.sock.sendall(out)

    def _cancel_requested(self) -> bool:
        """Whether C-CANCEL has come for the C-FIND being answered: reads what the peer
        has sent meanwhile, without waiting."""
        if not self._cancelled and select.select([self.sock], [], [], 0)[0]:
            pdu_type, body = self._read_pdu()
            if pdu_type == P_DATA_TF:
                self._p_data(body)
            elif pdu_type == A_ABORT:
                raise PeerAborted()
            else:
                raise Aborted(UNEXPECTED_PDU)
        return self._cancelled


def _us(command: dict[int, bytes], tag: int) -> int:
    value = command.get(tag, b"")
    if len(value) != 2:
        raise Aborted(INVALID_PARAMETER)
    result: int = struct.unpack("<H", value)[0]
    return result


def _uid(command: dict[int, bytes], tag: int) -> str:
    return command.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def negotiate(
    request: AssociateRequest, syntaxes: Callable[[str], Sequence[str] | None]
) -> tuple[dict[int, str | None], dict[int, tuple[Context, str]]]:
    """Each proposed context's answer: the first of its syntaxes that ``syntaxes`` lists
    for its abstract syntax (the requestor's order), None when none is, no entry when the
    abstract syntax is not supported; and the accepted ones by id."""
    chosen: dict[int, str | None] = {}
    accepted: dict[int, tuple[Context, str]] = {}
    for context in request.contexts:
        ours = syntaxes(context.abstract_syntax)
        if ours is None:
            continue
        pick = next((s for s in context.transfer_syntaxes if s in ours), None)
        chosen[context.context_id] = pick
        if pick is not None:
            accepted[context.context_id] = (context, pick)
    return chosen, accepted

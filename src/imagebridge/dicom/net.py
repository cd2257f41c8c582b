"""pynetdicom plumbing shared by every DICOM edge: contexts, TCP_NODELAY, Part 10 framing."""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Iterable

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

from imagebridge.dicom.acceptor import StoreRequest
from imagebridge.dicom.received import Received
from imagebridge.dicom.ul import set_nodelay

log = logging.getLogger(__name__)

# Every syntax a gateway accepts as received; it never asks a sender to transcode.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

# pynetdicom formats every DIMSE message and identifier for its log even when the logger
# drops them: CPU for each C-FIND match, and patient data one log level away. Off for every
# process that imports a DICOM edge.
pynetdicom_config.LOG_HANDLER_LEVEL = "none"
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_SOP_CLASSES: list[str] = [
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax
]


# A-ABORT from the service provider, reason "invalid PDU parameter value" (PS3.8 9.3.8).
_ABORT_INVALID_PDU = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 2, 6)
# The longest PDU read when the AE sets no maximum (0): association PDUs stay far below.
_UNLIMITED_PDU_CAP = 64 * 1024**2


def limit_incoming_pdus(assoc: Association, max_pdu: int) -> None:
    """Abort an association whose peer announces a PDU longer than we accept.

    pynetdicom reads each PDU whole before decoding it, so a declared length of 4 GB would
    have it gather whatever the peer sends into memory. The length is checked as the
    header arrives, before any of the body is read.
    """
    sock = assoc.dul.socket
    if sock is None:
        return
    limit = max(max_pdu or _UNLIMITED_PDU_CAP, 1 << 20)  # association PDUs may be larger
    recv = sock.recv

    def bounded_recv(nr_bytes: int) -> bytearray:
        if nr_bytes <= limit:
            return recv(nr_bytes)
        log.warning("association aborted: a PDU of %d bytes exceeds %d", nr_bytes, limit)
        if sock.socket is not None:
            with contextlib.suppress(OSError):
                sock.socket.sendall(_ABORT_INVALID_PDU)
        return bytearray()  # pynetdicom sees the PDU cut short and closes the connection

    sock.recv = bounded_recv  # type: ignore[method-assign]


def end_if_never_requested(assoc: Association) -> None:
    """Free the association slot of a connection that closed before any A-ASSOCIATE-RQ.

    pynetdicom's acceptor waits ``acse_timeout`` (30 s) for the request even after the
    connection is gone, counting against the AE's maximum: a few junk connections a minute
    would shut every PACS out. An empty primitive wakes it, and it ends the association.
    """
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


def c_store_of(event: evt.Event) -> tuple[StoreRequest, Received]:
    """A pynetdicom C-STORE event as our acceptor gives one: the request and its dataset."""
    request = event.request
    assert isinstance(request, C_STORE) and request.DataSet is not None
    store = StoreRequest(
        message_id=int(request.MessageID or 0),
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        priority=int(request.Priority or 0),
        transfer_syntax_uid=str(event.context.transfer_syntax),
    )
    return store, Received.whole(request.DataSet.getvalue())


def _on_conn_open(event: evt.Event) -> None:
    if event.assoc.dul.socket is not None:
        set_nodelay(event.assoc.dul.socket.socket)


NODELAY_HANDLERS: list[evt.EventHandlerType] = [(evt.EVT_CONN_OPEN, _on_conn_open)]


def storage_scp_ae(ae_title: str, max_pdu: int = 1_048_576) -> AE:
    """An AE that accepts verification and every storage SOP class in every common syntax."""
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def requested_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts to propose for (SOP class, transfer syntax) pairs.

    Each stored syntax gets its own context, and each SOP class one more with the
    uncompressed syntaxes, so a peer that refuses a compressed syntax can still be served
    (we decompress only then). pynetdicom allows at most 128 contexts.
    """
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, str]] = set()
    classes: list[str] = []
    for sop_class, syntax in pairs:
        if sop_class not in classes:
            classes.append(sop_class)
        if syntax in UNCOMPRESSED or (sop_class, syntax) in seen:
            continue
        seen.add((sop_class, syntax))
        contexts.append(_context(sop_class, [syntax]))
    for sop_class in classes:
        contexts.append(_context(sop_class, list(UNCOMPRESSED)))
    if len(contexts) > 128:
        raise ValueError("more than 128 presentation contexts needed for one association")
    return contexts


def _context(sop_class: str, syntaxes: list[str]) -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = UID(sop_class)
    cx.transfer_syntax = [UID(s) for s in syntaxes]
    return cx

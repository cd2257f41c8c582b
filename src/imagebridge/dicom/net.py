"""pynetdicom plumbing shared by every DICOM edge: contexts, TCP_NODELAY, Part 10 framing."""

from __future__ import annotations

import socket
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
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

# Every syntax a gateway accepts as received; it never asks a sender to transcode.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
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


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle: DIMSE is request/response, and delayed ACKs cost ~40 ms a message."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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

"""The gateway's DICOM edge: C-ECHO and C-STORE from the local PACS and modalities, and
the port its query/retrieve services share.

Handlers are thin: they check who is calling and where to, then hand the received bytes
to the spool. A C-STORE is answered with success only after the instance is durable.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association

from imagebridge.dicom.acceptor import (
    AssociateRequest,
    Refusal,
    StoreAssociation,
    StoreRequest,
    associate_ac,
    associate_rj,
    negotiate,
    sniff,
    storage_request,
)
from imagebridge.dicom.net import (
    STORAGE_SOP_CLASSES,
    VERIFICATION,
    c_store_of,
    end_if_never_requested,
    limit_incoming_pdus,
    storage_scp_ae,
)
from imagebridge.dicom.part10 import BadDataset, read_header
from imagebridge.dicom.received import Received
from imagebridge.dicom.ul import set_nodelay
from imagebridge.gateway.journal import Journal
from imagebridge.gateway.pacs_scu import MoveInbox
from imagebridge.gateway.routing import RoutingTable
from imagebridge.gateway.spool import Spool, SpoolFull
from imagebridge.pki.tls import dicom_scp_context, handshake
from imagebridge.settings import GatewaySettings

log = logging.getLogger(__name__)

# DIMSE statuses (PS3.4 B.2.3 and Annex C)
# After an abort, the association's own end (and its spool record) takes this at most.
ABORT_WAIT_SECONDS = 5.0
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
NO_ROUTE = 0xC001  # a failure status in the C000-CFFF "cannot understand" range
NOT_AUTHORIZED = 0x0124  # PS3.7 C.4.2: Refused: Not Authorized

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, by the service user
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07
# ... and rejected-transient, by the service provider (presentation): too many at once
TOO_MANY = Refusal(0x02, 0x03, 0x02)


@dataclass
class _AssociationState:
    calling_ae_title: str
    called_ae_title: str
    address: str
    permissions: frozenset[str]
    transfers: set[str] = field(default_factory=set)
    studies: Counter[tuple[str, str]] = field(default_factory=Counter)
    refused: int = 0
    out_of_resources: bool = False  # some C-STORE was refused with A700: it will come again


class Finder(Protocol):
    """The C-FIND service our acceptor answers with (``gateway/qrscp.py``)."""

    @property
    def find_classes(self) -> Collection[str]: ...

    def find_encoded(
        self,
        caller: _AssociationState,
        sop_class: str,
        identifier: bytes,
        transfer_syntax: str,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, str, bytes | None]]: ...


def _status(answer: tuple[int, str]) -> int | Dataset:
    """A handler's answer as pynetdicom takes it."""
    code, comment = answer
    if code == SUCCESS:
        return SUCCESS
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class StorageSCP:
    """C-ECHO and C-STORE on the gateway's port, with pynetdicom's AE beside them.

    A plain association that asks only for storage, verification and C-FIND is served by
    our own acceptor (``dicom/acceptor.py``): that is every PACS sending a study and every
    workstation searching, and the CPU a C-STORE or a C-FIND match costs there is a
    fraction of pynetdicom's. Everything else (C-MOVE and C-GET on the same port, DICOM
    TLS, anything out of the ordinary) is handed to pynetdicom with its request unread.
    Both apply the same checks, through the same methods below.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        spool: Spool,
        routing: RoutingTable,
        journal: Journal,
        fetches: MoveInbox | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.routing = routing
        self.journal = journal
        # C-STOREs from the PACS answering a C-MOVE this gateway started.
        self.fetches = fetches or MoveInbox()
        # Handlers of further services on the same AE (query/retrieve), added before start.
        self.services: list[evt.EventHandlerType] = []
        # C-FIND as our acceptor answers it, when query/retrieve is served.
        self.finder: Finder | None = None
        self.ae = storage_scp_ae(settings.ae_title, settings.max_pdu)
        self.ae.maximum_associations = settings.max_associations
        # Any called AE title may arrive: each names a destination, checked on request.
        self.ae.require_called_aet = False
        self._states: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._own: set[StoreAssociation[_AssociationState]] = set()
        # Admitted by our acceptor and not yet among _own: counted, so that requests
        # admitted at the same moment cannot together pass the limit.
        self._admitting = 0
        self._connections: set[threading.Thread] = set()
        self._closing = False
        self._syntaxes: dict[str, list[str]] = {}
        self._others: frozenset[str] = frozenset()
        # Built now, so that a bad certificate or key stops the gateway before it starts.
        self._tls = dicom_scp_context(settings, self.ae.network_timeout)

    def start(self) -> int:
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
            *self.services,
        ]
        # What the AE supports, services added: ours serves storage, verification and C-FIND.
        self._syntaxes = {
            str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
            for cx in self.ae.supported_contexts
        }
        ours = set(STORAGE_SOP_CLASSES) | {VERIFICATION}
        if self.finder is not None:
            ours |= set(self.finder.find_classes)
        self._others = frozenset(self._syntaxes) - ours
        self._server = self.ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            # DICOM TLS when configured; the calling AE and address checks apply as ever.
            ssl_context=self._tls,
        )
        if self._tls is None:
            # Each connection first comes to us (see the class's comment).
            self._server.process_request = self._connection
        port: int = self._server.server_address[1]
        return port

    def stop(self, grace_seconds: float = 0.0) -> None:
        """Take no new associations; let those open finish for up to ``grace_seconds`` (a
        PACS mid-study completes it), then abort the rest, each recorded as aborted so that
        its studies wait for the PACS to send again. An association cut by the process
        ending instead would leave a study that every C-STORE of was answered waiting for a
        resend that never comes."""
        if self._server is None:
            return
        server, self._server = self._server, None
        with self._lock:
            self._closing = True
        open_ones: list[Association] = list(server.active_associations)
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        with self._lock:
            connections = list(self._connections)
        for assoc in open_ones:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        for assoc in open_ones:
            if assoc.is_alive():
                assoc.abort()
                assoc.join(ABORT_WAIT_SECONDS)
        with self._lock:
            own = list(self._own)
        for association in own:
            association.abort()
        for thread in connections:
            thread.join(ABORT_WAIT_SECONDS)

    def caller(self, assoc: Association) -> _AssociationState | None:
        """The calling node of an accepted association, with its permissions."""
        return self._states.get(id(assoc))

    # -- the checks, for both acceptors ------------------------------------------------------

    def admit(self, request: AssociateRequest, address: str) -> _AssociationState | Refusal:
        """Our acceptor's A-ASSOCIATE-RQ: who may call, to what, and how many at once."""
        return self._admit(request.calling_ae_title, request.called_ae_title, address, busy=1)

    def _admit(
        self, calling: str, called: str, address: str, busy: int
    ) -> _AssociationState | Refusal:
        """``busy``: what this request adds to the associations counted open; if admitted,
        it stays counted until ``_serve`` counts the association itself (or gives up)."""
        server = self._server
        with self._lock:
            open_now = self._admitting + len(self._own)
            open_now += len(server.active_associations if server else [])
            full = open_now + busy > self.settings.max_associations
            if not full:
                self._admitting += busy
        if full:
            log.warning("association refused: %d associations open", open_now)
            self._refused(calling, called, address, "too many associations at once")
            return TOO_MANY
        try:
            admitted = self._check_caller(calling, called, address)
        except BaseException:
            self._give_back(busy)
            raise
        if isinstance(admitted, Refusal):
            self._give_back(busy)
        return admitted

    def _give_back(self, admitted: int) -> None:
        """Admitted requests that will not become associations: no longer counted open."""
        with self._lock:
            self._admitting -= admitted

    def _check_caller(self, calling: str, called: str, address: str) -> _AssociationState | Refusal:
        """Who may call, to what: the caller's state, or why it is refused."""
        known = [
            n
            for n in self.settings.calling_aes
            if n.ae_title == calling and (n.host is None or n.host == address)
        ]
        if not known:
            why, diagnostic = "calling AE title not recognised", CALLING_AE_NOT_RECOGNISED
        elif called != self.settings.ae_title and self.routing.lookup(called) is None:
            why, diagnostic = "called AE title is no known route", CALLED_AE_NOT_RECOGNISED
        else:
            self.journal.write(
                "dicom:association:accepted",
                source_address=address,
                calling_ae_title=calling,
                called_ae_title=called,
            )
            return _AssociationState(calling, called, address, frozenset(known[0].permissions))
        log.warning("association refused: %s", why)
        self._refused(calling, called, address, why)
        return Refusal(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)

    def _refused(self, calling: str, called: str, address: str, why: str) -> None:
        self.journal.write(
            "dicom:association:refused",
            "refused",
            source_address=address,
            calling_ae_title=calling,
            called_ae_title=called,
            reason=why,
        )

    def echo(self, state: _AssociationState) -> tuple[int, str]:
        if "echo" not in state.permissions:
            return self._refuse(state, NOT_AUTHORIZED, "C-ECHO not permitted", "", "")
        return SUCCESS, ""

    def store(
        self, state: _AssociationState, request: StoreRequest, dataset: Received
    ) -> tuple[int, str]:
        """One C-STORE: checked, then durable in the spool before it is answered."""
        if state.called_ae_title == self.settings.ae_title and self.fetches.expects(
            state.calling_ae_title
        ):
            # Not a send to route: the PACS answering a fetch this gateway asked for.
            status = self.fetches.c_store(state.calling_ae_title, request, dataset)
            return status, ""
        if "store" not in state.permissions:
            return self._refuse(state, NOT_AUTHORIZED, "C-STORE not permitted", "", "")
        route = self.routing.lookup(state.called_ae_title)
        if route is None:
            return self._refuse(state, NO_ROUTE, "no route: send to a routing AE title", "", "")
        refusal = self.routing.refusal or route.refusal
        if refusal:
            return self._refuse(state, NOT_AUTHORIZED, refusal, "", "")
        if not dataset.kept():  # the disk filled while a large instance arrived
            return self._refuse(state, OUT_OF_RESOURCES, dataset.error, "", "")
        syntax = request.transfer_syntax_uid
        try:
            header = read_header(dataset.data, syntax)
        except BadDataset as exc:
            return self._refuse(state, CANNOT_UNDERSTAND, str(exc), "", "")
        if header.sop_class_uid != request.sop_class_uid or (
            header.sop_instance_uid != request.sop_instance_uid
        ):
            return self._refuse(
                state,
                DATASET_DOES_NOT_MATCH,
                "dataset does not match the SOP class/instance of the request",
                header.text("PatientID"),
                header.study_instance_uid,
            )
        if not header.text("PatientID").strip():
            # Every ID-less instance would land under one "EXT-<sender>-" patient.
            return self._refuse(
                state, CANNOT_UNDERSTAND, "no PatientID: cannot be filed safely", "", ""
            )
        priority = "urgent" if request.priority == 1 else route.priority  # 1 = HIGH
        try:
            self.spool.accept(
                dataset,
                sop_class_uid=header.sop_class_uid,
                sop_instance_uid=header.sop_instance_uid,
                transfer_syntax_uid=syntax,
                destination=route.institution,
                priority=priority,
                study_instance_uid=header.study_instance_uid,
                calling_ae_title=state.calling_ae_title,
                association=state.transfers,
            )
        except SpoolFull as exc:
            return self._refuse(
                state,
                OUT_OF_RESOURCES,
                str(exc),
                header.text("PatientID"),
                header.study_instance_uid,
            )
        except OSError as exc:
            # A full disk is an outage, not a crash: the PACS sends again later.
            log.error("spool write failed: %s", exc.strerror or type(exc).__name__)
            return self._refuse(
                state,
                OUT_OF_RESOURCES,
                f"spool write failed: {exc.strerror or type(exc).__name__}",
                header.text("PatientID"),
                header.study_instance_uid,
            )
        state.studies[(header.text("PatientID"), header.study_instance_uid)] += 1
        return SUCCESS, ""

    def find(
        self,
        state: _AssociationState,
        sop_class: str,
        identifier: bytes,
        transfer_syntax: str,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, str, bytes | None]]:
        if self.finder is None:  # not negotiated without one
            return iter([(NOT_AUTHORIZED, "C-FIND not served here", None)])
        return self.finder.find_encoded(state, sop_class, identifier, transfer_syntax, cancelled)

    def _refuse(
        self, state: _AssociationState, code: int, reason: str, patient: str, study: str
    ) -> tuple[int, str]:
        state.refused += 1
        state.out_of_resources |= code == OUT_OF_RESOURCES
        log.warning("C-STORE refused (0x%04X): %s", code, reason)
        self.journal.write(
            "dicom:instance:refused",
            "failure",
            patient_ref=patient,
            study_ref=study,
            source_address=state.address,
            calling_ae_title=state.calling_ae_title,
            called_ae_title=state.called_ae_title,
            status=f"0x{code:04X}",
            reason=reason,
        )
        return code, reason

    def ended(self, state: _AssociationState, *, aborted: bool) -> None:
        # Anything but a release (an A-ABORT, a dropped connection) leaves the study open
        # for the PACS to send again what got no answer; so does a refusal for want of space.
        self.spool.association_ended(state.transfers, aborted=aborted or state.out_of_resources)
        for (patient, study), count in state.studies.items():
            # One event per study and association, like ATNA's "DICOM Instances Transferred".
            self.journal.write(
                "dicom:instances:received",
                patient_ref=patient,
                study_ref=study,
                source_address=state.address,
                calling_ae_title=state.calling_ae_title,
                called_ae_title=state.called_ae_title,
                instances=count,
                aborted=aborted,
            )

    # -- our acceptor ------------------------------------------------------------------------

    def _connection(self, sock: socket.socket, address: Sequence[Any]) -> None:
        """From pynetdicom's accept loop: each connection gets a thread of its own."""
        thread = threading.Thread(
            target=self._serve_connection, args=(sock, address), name="store-scp", daemon=True
        )
        with self._lock:
            self._connections.add(thread)
        thread.start()

    def _serve_connection(self, sock: socket.socket, address: Sequence[Any]) -> None:
        try:
            set_nodelay(sock)
            pdu = sniff(sock, self.ae.acse_timeout or 30.0)
            if pdu is None:  # closed, or no whole request in time
                _close(sock)
                return
            request = storage_request(pdu, self._syntaxes, self._others) if pdu else None
            server = self._server
            if request is None or server is None:
                if server is None:
                    _close(sock)
                else:
                    server.process_request_thread(sock, address)  # pynetdicom's, unread
                return
            self._serve(sock, pdu, request, str(address[0]))
        except Exception:
            log.exception("an association failed")
            _close(sock)
        finally:
            with self._lock:
                self._connections.discard(threading.current_thread())

    def _serve(
        self, sock: socket.socket, pdu: bytes, request: AssociateRequest, address: str
    ) -> None:
        sock.settimeout(self.ae.network_timeout or 60.0)
        sock.recv(len(pdu), socket.MSG_WAITALL)  # read at last: it is ours to answer
        admitted = self.admit(request, address)
        if isinstance(admitted, Refusal):
            with contextlib.suppress(OSError):
                sock.sendall(associate_rj(admitted))
            _close(sock)
            return
        try:
            chosen, accepted = negotiate(request, self._syntaxes.get)
            association = StoreAssociation(
                sock,
                request,
                accepted,
                self,
                admitted,
                max_pdu=self.settings.max_pdu,
                timeout=self.ae.network_timeout or 60.0,
                spill_dir=self.spool.tmp,  # the spool's disk: a large instance ends up there
                reserve=self.spool.check_space,  # and its reserve of free space holds
            )
        except BaseException:
            self._give_back(1)
            raise
        with self._lock:
            self._own.add(association)
            self._admitting -= 1  # counted among _own from here on
            closing = self._closing
        try:
            if closing:
                association.abort()
            else:
                sock.sendall(associate_ac(request, chosen, self.settings.max_pdu))
            association.serve()
        finally:
            with self._lock:
                self._own.discard(association)

    # -- pynetdicom's events -----------------------------------------------------------------

    def _on_open(self, event: evt.Event) -> None:
        if event.assoc.dul.socket is None or event.assoc.dul.socket.socket is None:
            return
        sock = event.assoc.dul.socket.socket
        set_nodelay(sock)
        limit_incoming_pdus(event.assoc, self.settings.max_pdu)
        refused = handshake(sock)  # DICOM TLS: nothing unless the SCP speaks it
        if refused is not None:
            log.warning("association refused: %s", refused)
            address = event.assoc.requestor.address
            self.journal.write(
                "dicom:association:refused", "refused", source_address=address, reason=refused
            )

    def _on_requested(self, event: evt.Event) -> None:
        assoc: Association = event.assoc
        request = assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ is in
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        # (pynetdicom counts this one among its own already.)
        admitted = self._admit(calling, called, assoc.requestor.address, busy=0)
        if isinstance(admitted, Refusal):
            assoc.acse.send_reject(admitted.result, admitted.source, admitted.reason)
            # As pynetdicom does for its own rejections: wait until the DUL has sent the
            # A-ASSOCIATE-RJ, or the socket is shut down first and the peer sees only an abort.
            assoc.kill()
            return
        with self._lock:
            self._states[id(assoc)] = admitted

    def _on_echo(self, event: evt.Event) -> int | Dataset:
        state = self._states.get(id(event.assoc))
        if state is None:
            return _status((NOT_AUTHORIZED, "C-ECHO not permitted"))
        return _status(self.echo(state))

    def _on_store(self, event: evt.Event) -> int | Dataset:
        state = self._states.get(id(event.assoc))
        if state is None:
            return _status((CANNOT_UNDERSTAND, "association not accepted"))
        return _status(self.store(state, *c_store_of(event)))

    def _on_end(self, event: evt.Event) -> None:
        if event.event is evt.EVT_CONN_CLOSE:
            end_if_never_requested(event.assoc)
        with self._lock:
            state = self._states.pop(id(event.assoc), None)
        if state is not None:
            self.ended(state, aborted=event.event is not evt.EVT_RELEASED)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()

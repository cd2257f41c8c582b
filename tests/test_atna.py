"""The audit trail as IHE ATNA messages: a real hub sends them to syslog receivers on loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import Engine, text

from imagebridge.audit.atna import AuditSource, audit_message, spec_for
from imagebridge.audit.forwarder import AuditForwarder
from imagebridge.audit.services import record
from imagebridge.db import make_engine, make_sessionmaker, transaction
from imagebridge.demo.network import Network, free_port
from imagebridge.migrate import upgrade
from imagebridge.settings import AuditRepository

# RFC 5424: PRI VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA, then MSG
# (here always UTF-8, so it starts with a BOM).
FRAME = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) "
    rb"(?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) (?P<sd>-|(?:\[[^\]]*\])+) "
    rb"\xef\xbb\xbf(?P<msg>.*)\Z",
    re.S,
)
SEQUENCE = re.compile(rb'\[meta sequenceId="(\d+)"\]')


# -- a test CA, made here -------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Audit Test CA"))
        .issuer_name(_name("Audit Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    server, server_key = leaf("audit-repository", ExtendedKeyUsageOID.SERVER_AUTH)
    client, client_key = leaf("imagebridge-hub", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=_write_cert(folder / "ca.pem", ca),
        server_cert=_write_cert(folder / "server.pem", server),
        server_key=_write_key(folder / "server.key", server_key),
        client_cert=_write_cert(folder / "client.pem", client),
        client_key=_write_key(folder / "client.key", client_key),
    )


# -- audit repositories: a syslog receiver over TLS (RFC 5425) and over UDP (RFC 5426) -------


@dataclass
class Receiver:
    port: int
    frames: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def add(self, frame: bytes) -> None:
        with self.changed:
            self.frames.append(frame)
            self.changed.notify_all()

    def wait_for(self, done: Callable[[list[bytes]], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not done(self.frames):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{len(self.frames)} frames; errors: {self.errors}")
                self.changed.wait(remaining)

    def sequence_ids(self) -> list[int]:
        with self.changed:
            return [_sequence_id(f) for f in self.frames]


class TlsReceiver(Receiver):
    """Requires a client certificate from the test CA, reads octet-counted frames."""

    def __init__(self, port: int, pki: Pki) -> None:
        super().__init__(port)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.context.load_verify_locations(pki.ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.clients: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.listener = listener
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            # Shutdown, not just close, wakes the thread blocked in accept().
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
        self.clients.clear()
        for t in self.threads:
            t.join(timeout=10)
        self.threads.clear()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            conn = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self.clients.append(conn)
            self._spawn(self._read, conn)

    def _read(self, conn: ssl.SSLSocket) -> None:
        try:
            conn.do_handshake()
            buffer = b""
            while data := conn.recv(65536):
                buffer += data
                while (space := buffer.find(b" ")) > 0:
                    if not buffer[:space].isdigit():
                        self.errors.append(f"bad frame length {buffer[:20]!r}")
                        return
                    end = space + 1 + int(buffer[:space])
                    if len(buffer) < end:
                        break
                    self.add(buffer[space + 1 : end])
                    buffer = buffer[end:]
            if buffer:
                self.errors.append(f"connection ended inside a frame: {buffer[:40]!r}")
        except (OSError, ssl.SSLError) as exc:
            if self.listener is not None:  # not a stop of ours
                self.errors.append(repr(exc))


class UdpReceiver(Receiver):
    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        self.sock.bind(("127.0.0.1", self.port))
        self.thread.start()

    def stop(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)

    def _read(self) -> None:
        while True:
            try:
                datagram = self.sock.recv(65536)
            except OSError:
                return
            self.add(datagram)


def eventually(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _sequence_id(frame: bytes) -> int:
    found = SEQUENCE.search(frame[:300])
    assert found, frame[:200]
    return int(found.group(1))


# -- a hub sending to them -------------------------------------------------------------------


@dataclass
class AuditedHub:
    net: Network
    engine: Engine

    def record(self, action: str, outcome: str = "success", **fields: Any) -> None:
        with transaction(make_sessionmaker(self.engine)) as session:
            record(session, action, outcome, **fields)

    def head(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(text("SELECT max(id) FROM audit_events")).scalar_one())

    def cursor(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(text("SELECT event_id FROM audit_forwarding")).scalar_one())

    def actions(self) -> dict[int, str]:
        with self.engine.connect() as c:
            rows = c.execute(text("SELECT id, action FROM audit_events")).all()
            return {int(i): str(a) for i, a in rows}


@pytest.fixture
def audited_hub(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], AuditedHub]]:
    started: list[AuditedHub] = []

    def start(repository: dict[str, Any]) -> AuditedHub:
        net = Network(tmp_path / "net")
        net.start_hub(
            audit_repository={
                "audit_source_id": "test-hub",
                "poll_seconds": 0.2,
                "retry_seconds": 0.1,
                "retry_max_seconds": 0.5,
                **repository,
            }
        )
        hub = AuditedHub(net, make_engine(net.hub_database_url))
        started.append(hub)
        return hub

    yield start
    for hub in started:
        hub.net.stop()
        hub.engine.dispose()


def _tls_settings(port: int, pki: Pki, relative: bool = False) -> dict[str, Any]:
    """Absolute paths, or relative to the hub's config file (in tmp_path/net)."""

    def path(p: Path) -> str:
        return f"../{p.parent.name}/{p.name}" if relative else str(p)

    return {
        "url": f"syslog+tls://127.0.0.1:{port}",
        "ca_file": path(pki.ca),
        "cert_file": path(pki.client_cert),
        "key_file": path(pki.client_key),
    }


# -- what a valid message looks like ---------------------------------------------------------

# tag, outcome -> EventID, EventActionCode, EventOutcomeIndicator, a required EventTypeCode
EXPECTED: list[tuple[str, str, str, str, str, str | None]] = [
    ("user:login:success", "success", "110114", "E", "0", "110122"),
    ("user:login:failure", "failure", "110114", "E", "4", "110122"),
    ("user:session:ended", "success", "110114", "E", "0", "110123"),
    ("user:totp:replayed", "refused", "110113", "E", "4", "110132"),
    ("tls:certificate:refused", "refused", "110113", "E", "4", "110126"),
    ("http:request:refused", "refused", "110113", "E", "4", "110132"),
    ("dicom:association:accepted", "success", "110113", "E", "0", "110126"),
    ("dicom:association:refused", "refused", "110113", "E", "4", "110126"),
    ("dicom:instances:received", "success", "110104", "C", "0", None),
    ("transfer:transfer:created", "success", "110102", "E", "0", None),
    ("transfer:instances:delivered", "success", "110104", "R", "0", None),
    ("transfer:transfer:failed", "failure", "110104", "R", "8", None),
    ("dicomweb:query:performed", "success", "110112", "E", "0", None),
    ("share:package:exported", "success", "110106", "R", "0", None),
    ("share:study:viewed", "success", "110103", "R", "0", None),
    ("share:access:granted", "success", "110113", "E", "0", "110135"),
    ("agreement:agreement:recorded", "success", "110113", "E", "0", "110129"),
    ("agreement:agreement:withdrawn", "success", "110113", "E", "0", "110129"),
    ("user:role:created", "success", "110113", "E", "0", "110136"),
    ("user:roles:changed", "success", "110113", "E", "0", "110137"),
    ("index:patient:updated", "success", "110110", "U", "0", None),
    ("audit:trail:verified", "success", "110101", "R", "0", None),
    ("future:thing:happened", "success", "110100", "E", "0", None),
    ("future:thing:refused", "refused", "110113", "E", "4", "110132"),
]


def _event_fields(action: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"actor_type": "user", "actor": "alice", "source_address": "10.1.2.3"}
    if action.startswith(("dicom:", "transfer:", "share:", "index:")):
        fields.update(patient_ref="SEG778899", study_ref="1.2.826.0.1.3680043.2.1")
    if action.startswith("dicom:"):
        fields.update(
            actor_type="gateway",
            actor="gw1",
            detail={"calling_ae_title": "MODALITY1", "called_ae_title": "IB_RVH"},
        )
    if action.startswith("transfer:"):
        fields.update(transfer_ref="a" * 32)
    if action == "dicomweb:query:performed":
        fields.update(detail={"query": {"PatientID": "SEG778899"}})
    return fields


def parse_frame(frame: bytes) -> tuple[re.Match[bytes], ET.Element]:
    match = FRAME.match(frame)
    assert match, frame[:200]
    assert int(match["pri"]) in (84, 85)  # facility 10 (security), notice or warning
    stamp = datetime.fromisoformat(match["time"].decode().replace("Z", "+00:00"))
    assert stamp.tzinfo is not None
    assert match["app"] == b"imagebridge"
    assert match["msgid"] == b"IHE+RFC-3881"
    return match, ET.fromstring(match["msg"])


def check_message(root: ET.Element) -> ET.Element:
    """The parts PS3.15 A.5.1 requires, in its order; returns EventIdentification."""
    assert root.tag == "AuditMessage"
    order = [child.tag for child in root]
    assert order[0] == "EventIdentification"
    source_at = order.index("AuditSourceIdentification")
    assert order[1:source_at] and set(order[1:source_at]) == {"ActiveParticipant"}
    assert set(order[source_at + 1 :]) <= {"ParticipantObjectIdentification"}
    ident = root[0]
    assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert ident.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert datetime.fromisoformat(ident.get("EventDateTime", "")).tzinfo is not None
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("codeSystemName") == "DCM"
    for coded in root.iter():
        if coded.get("csd-code") is not None:
            assert coded.get("codeSystemName") and coded.get("originalText"), coded.attrib
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in {"true", "false"}
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "test-hub"
    assert source.find("AuditSourceTypeCode") is not None
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        assert obj[0].tag == "ParticipantObjectIDTypeCode"
    return ident


def _objects(root: ET.Element) -> dict[str, str]:
    """ParticipantObjectIDTypeCode -> ParticipantObjectID."""
    return {
        obj[0].get("csd-code", ""): obj.get("ParticipantObjectID", "")
        for obj in root.findall("ParticipantObjectIdentification")
    }


# -- the tests -------------------------------------------------------------------------------


def test_every_event_type_reaches_a_tls_repository_as_atna_xml(
    tmp_path: Path, audited_hub: Callable[[dict[str, Any]], AuditedHub]
) -> None:
    pki = make_pki(tmp_path / "pki")
    receiver = TlsReceiver(free_port(), pki)
    receiver.start()
    try:
        hub = audited_hub(_tls_settings(receiver.port, pki, relative=True))
        hub.net.add_institution("SEG", "St Elsewhere General")  # events from the hub itself
        assert httpx.get(f"{hub.net.hub_url}/api/v1/audit").status_code == 401
        for action, outcome, *_ in EXPECTED:
            hub.record(action, outcome, **_event_fields(action))
        head = hub.head()
        receiver.wait_for(lambda frames: len(frames) >= head)
        assert receiver.errors == []
        assert receiver.sequence_ids() == list(range(1, head + 1))

        actions = hub.actions()
        by_action: dict[str, ET.Element] = {}  # the last message of each tag: ours
        first: dict[str, ET.Element] = {}  # the first: the hub's own, before ours
        for frame in receiver.frames:
            _, root = parse_frame(frame)
            ident = check_message(root)
            ours = [
                c.get("csd-code")
                for c in ident.findall("EventTypeCode")
                if c.get("codeSystemName") == "99IMAGEBRIDGE"
            ]
            assert ours == [actions[_sequence_id(frame)]]
            by_action[actions[_sequence_id(frame)]] = root
            first.setdefault(actions[_sequence_id(frame)], root)
        assert "http:request:refused" in actions.values()

        for action, _outcome, event_id, action_code, indicator, type_code in EXPECTED:
            root = by_action[action]
            ident = root[0]
            assert ident.find("EventID").get("csd-code") == event_id, action  # type: ignore[union-attr]
            assert ident.get("EventActionCode") == action_code, action
            assert ident.get("EventOutcomeIndicator") == indicator, action
            if type_code:
                assert type_code in [c.get("csd-code") for c in ident.findall("EventTypeCode")]
            fields = _event_fields(action)
            objects = _objects(root)
            if fields.get("patient_ref"):
                assert objects["2"] == "SEG778899", action  # RFC-3881 Patient Number
                assert objects["110180"] == "1.2.826.0.1.3680043.2.1", action
            else:
                assert "2" not in objects and "110180" not in objects
            requestors = [
                p.get("UserID")
                for p in root.findall("ActiveParticipant")
                if p.get("UserIsRequestor") == "true"
            ]
            assert requestors == (["MODALITY1"] if action.startswith("dicom:") else ["alice"])

        received = by_action["dicom:instances:received"]
        roles = {
            p.get("UserID"): p.find("RoleIDCode").get("csd-code")  # type: ignore[union-attr]
            for p in received.findall("ActiveParticipant")
        }
        assert roles == {"MODALITY1": "110153", "gw1": "110152", "test-hub": "110150"}
        query = by_action["dicomweb:query:performed"].find(
            "ParticipantObjectIdentification/ParticipantObjectQuery"
        )
        assert query is not None and query.text
        created = first["directory:institution:created"]
        assert [c.get("csd-code") for c in created[0]][:2] == ["110113", "110128"]
        site = created.find("AuditSourceIdentification")
        assert site is not None and site.get("AuditEnterpriseSiteID") == "SEG"
        refused = first["http:request:refused"]
        assert refused[0].get("EventOutcomeIndicator") == "4"
        assert "/api/v1/audit" in _objects(refused).values()  # RFC-3881 URI
    finally:
        receiver.stop()


def test_events_wait_for_a_repository_that_is_down_and_then_arrive_in_order_once(
    tmp_path: Path, audited_hub: Callable[[dict[str, Any]], AuditedHub]
) -> None:
    pki = make_pki(tmp_path / "pki")
    receiver = TlsReceiver(free_port(), pki)  # not listening yet
    hub = audited_hub(_tls_settings(receiver.port, pki))
    try:
        # The work goes on while the repository is down; its events are kept.
        hub.net.add_institution("SEG", "St Elsewhere General")
        hub.net.add_institution("RVH", "Riverside Hospital")
        for n in range(30):
            hub.record("test:event:recorded", detail={"n": n})
        assert httpx.get(f"{hub.net.hub_url}/api/v1/audit").status_code == 401
        head = hub.head()
        assert head >= 33 and hub.cursor() == 0

        receiver.start()
        receiver.wait_for(lambda frames: len(frames) >= head)
        hub.record("test:event:recorded", detail={"n": "after"})
        receiver.wait_for(lambda frames: len(frames) > head)
        assert receiver.sequence_ids() == list(range(1, head + 2))

        # The repository restarts: the hub notices the closed connection and sends again.
        receiver.stop()
        hub.record("test:event:recorded", detail={"n": "while restarting"})
        receiver.start()
        hub.record("test:event:recorded", detail={"n": "restarted"})
        receiver.wait_for(lambda frames: len(frames) >= head + 3)
        assert receiver.sequence_ids() == list(range(1, head + 4))
        assert receiver.errors == []
        eventually(lambda: hub.cursor() == head + 3)
    finally:
        receiver.stop()


def test_events_reach_a_udp_repository(
    tmp_path: Path, audited_hub: Callable[[dict[str, Any]], AuditedHub]
) -> None:
    receiver = UdpReceiver(free_port())
    receiver.start()
    try:
        hub = audited_hub({"url": f"syslog+udp://127.0.0.1:{receiver.port}"})
        hub.net.add_institution("SEG", "St Elsewhere General")
        hub.record("user:login:failure", "failure", actor="alice", source_address="10.9.8.7")
        head = hub.head()
        receiver.wait_for(lambda frames: len(frames) >= head)
        assert sorted(receiver.sequence_ids()) == list(range(1, head + 1))
        for frame in receiver.frames:
            _, root = parse_frame(frame)
            check_message(root)
        _, last = parse_frame(next(f for f in receiver.frames if _sequence_id(f) == head))
        assert last[0].find("EventID").get("csd-code") == "110114"  # type: ignore[union-attr]
        point = last.find("ActiveParticipant")
        assert point is not None and point.get("NetworkAccessPointID") == "10.9.8.7"
        assert point.get("NetworkAccessPointTypeCode") == "2"
    finally:
        receiver.stop()


def test_a_hub_refuses_an_audit_repository_it_cannot_use(tmp_path: Path) -> None:
    net = Network(tmp_path / "net")
    try:
        with pytest.raises(RuntimeError, match="exited"):
            net.start_hub(audit_repository={"url": "http://127.0.0.1:6514"})
    finally:
        net.stop()
    log = (net.root / "hub.log").read_text()
    assert "syslog+tls://" in log


def test_odd_content_still_makes_a_well_formed_message() -> None:
    source = AuditSource("test-hub", "ImageBridge", "1")
    hostile = {
        "id": 1,
        "at": None,
        "action": "brand:new:thing",
        "outcome": "weird",
        "actor_type": None,
        "actor": "eve\x00\x1b]",
        "institution_id": None,
        "patient_ref": "P\x01<&>\"'",
        "study_ref": "",
        "transfer_ref": "",
        "source_address": "not an address",
        "detail": ["not", "a", "dict"],
    }
    root = ET.fromstring(audit_message(hostile, source))
    assert root[0].find("EventID").get("csd-code") == "110100"  # type: ignore[union-attr]
    assert root[0].get("EventOutcomeIndicator") == "4"
    patient = root.find("ParticipantObjectIdentification")
    assert patient is not None and patient.get("ParticipantObjectID") == "P\ufffd<&>\"'"
    point = root.find("ActiveParticipant")
    assert point is not None and point.get("NetworkAccessPointTypeCode") == "1"
    assert root.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "ImageBridge"  # type: ignore[union-attr]
    assert spec_for("", "success").event_id.value == "110100"


def test_one_forwarder_sends_for_hubs_sharing_postgresql(postgres_url: str) -> None:
    receiver = UdpReceiver(free_port())
    receiver.start()
    engines = [make_engine(postgres_url) for _ in range(2)]
    upgrade(engines[0])
    settings = AuditRepository(
        url=f"syslog+udp://127.0.0.1:{receiver.port}", poll_seconds=0.1, audit_source_id="test-hub"
    )
    forwarders = [AuditForwarder(settings, e, make_sessionmaker(e)) for e in engines]
    try:
        for f in forwarders:
            f.start()
        for n in range(40):
            with transaction(make_sessionmaker(engines[n % 2])) as session:
                record(session, "test:event:recorded", detail={"n": n})
        receiver.wait_for(lambda frames: len(frames) >= 40)
        forwarders[0].stop()  # the other hub's forwarder takes over
        with transaction(make_sessionmaker(engines[1])) as session:
            record(session, "test:event:recorded", detail={"n": "after"})
        receiver.wait_for(lambda frames: len(frames) >= 41)
        assert sorted(receiver.sequence_ids()) == list(range(1, 42))
    finally:
        for f in forwarders:
            f.stop()
        for e in engines:
            e.dispose()
        receiver.stop()

"""The network's certificate authority, kept in one folder.

The folder holds the CA's private key (mode 0600; it is read there and never written
anywhere else), its certificate, a record of every certificate issued and revoked
(``state.json``), a copy of each issued certificate, and the CRL the hub reads. Every file
is replaced atomically (temporary file, fsync, rename, fsync of the folder), and commands
that change the folder hold a lock on it, so two operators cannot interleave.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imagebridge.fsutil import fsync_path
from imagebridge.institutions.services import CODE_PATTERN
from imagebridge.pki.names import GatewayName, gateway_subject

KEY_FILE = "ca.key"
CERT_FILE = "ca.pem"
CRL_FILE = "crl.pem"
STATE_FILE = "state.json"
ISSUED_DIR = "issued"

CA_DAYS = 3650
LEAF_DAYS = 825
# A CRL past its next update makes every verifier refuse every certificate, so it is long
# lived; `imagebridge ca crl` signs a fresh one, and every revocation does too.
CRL_DAYS = 365
# Leaves are RSA: the key type every PACS that speaks DICOM TLS accepts.
CA_KEY_BITS = 3072
LEAF_KEY_BITS = 2048
# Certificates are valid from a little before now: clocks of peers differ.
BACKDATE = timedelta(minutes=5)

REASONS = (
    "unspecified",
    "keyCompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
)
KINDS = ("gateway", "server", "node")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")

Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


class CAError(Exception):
    """Bad input or a CA folder that cannot be used: the message says what to do."""


@dataclass(frozen=True)
class IssuedCertificate:
    """What the CA remembers of a certificate it issued."""

    serial: str  # upper-case hexadecimal, as `openssl x509 -serial` prints it
    kind: str
    subject: str
    issued_at: str
    not_after: str
    revoked_at: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Credentials:
    """A newly issued certificate with its private key, to hand to its holder."""

    record: IssuedCertificate
    certificate_pem: bytes
    key_pem: bytes


def parse_serial(text: str) -> int:
    """A serial as `ca list` prints it (hex; colons and a 0x prefix are allowed)."""
    cleaned = text.strip().replace(":", "").lower().removeprefix("0x")
    try:
        serial = int(cleaned, 16)
    except ValueError:
        raise CAError(f"{text!r} is no serial number: give it in hex, as `ca list` shows") from None
    if serial <= 0:
        raise CAError("a serial number is positive")
    return serial


def serial_hex(serial: int) -> str:
    return f"{serial:X}"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace path with data: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an older temporary file may have had other permissions
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_NAME.match(host):
                raise CAError(f"{host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host.lower()))
    return names


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs handshakes and (RSA) receives keys."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _common_name(value: str, what: str) -> x509.NameAttribute[str]:
    try:
        return x509.NameAttribute(NameOID.COMMON_NAME, value)
    except ValueError:
        raise CAError(f"{what} must be 1 to 64 characters") from None


class CertificateAuthority:
    """The CA in a folder. Use `create` for a new one and `open` for an existing one."""

    def __init__(
        self, folder: Path, key: rsa.RSAPrivateKey, certificate: x509.Certificate, clock: Clock
    ) -> None:
        self.folder = folder
        self._key = key
        self.certificate = certificate
        self._clock = clock

    @property
    def crl_path(self) -> Path:
        return self.folder / CRL_FILE

    @property
    def certificate_path(self) -> Path:
        return self.folder / CERT_FILE

    @classmethod
    def create(
        cls,
        folder: Path,
        name: str = "ImageBridge network CA",
        days: int = CA_DAYS,
        clock: Clock = _now,
    ) -> CertificateAuthority:
        if (folder / KEY_FILE).exists() or (folder / CERT_FILE).exists():
            raise CAError(f"{folder} already holds a CA; it is kept as it is")
        _check_days(days)
        subject = x509.Name([_common_name(name, "the CA's name")])
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        key = rsa.generate_private_key(public_exponent=65537, key_size=CA_KEY_BITS)
        now = clock()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(folder, key, certificate, clock)
        with ca._locked():
            write_atomic(
                folder / KEY_FILE,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
            write_atomic(folder / CERT_FILE, _pem(certificate))
            (folder / ISSUED_DIR).mkdir(exist_ok=True)
            state: dict[str, Any] = {"crl_number": 0, "certificates": []}
            ca._write_crl(state)
        return ca

    @classmethod
    def open(cls, folder: Path, clock: Clock = _now) -> CertificateAuthority:
        key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
        if not key_path.is_file() or not cert_path.is_file():
            raise CAError(f"no CA in {folder} (create one with `imagebridge ca init --dir ...`)")
        if key_path.stat().st_mode & 0o077:
            raise CAError(f"{key_path} may be read by others: `chmod 600` it first")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (ValueError, TypeError) as exc:
            raise CAError(f"the CA in {folder} cannot be read: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CAError(f"{key_path} is not an RSA key")
        return cls(folder, key, certificate, clock)

    # -- issuing -----------------------------------------------------------------------------

    def issue_gateway(self, institution: str, name: str, days: int = LEAF_DAYS) -> Credentials:
        """A gateway's client certificate for the hub's mutual-TLS listener."""
        if not CODE_PATTERN.match(institution):
            raise CAError("the institution code is 2-8 capital letters or digits")
        _common_name(name, "the gateway's name")
        return self._issue(
            "gateway",
            gateway_subject(GatewayName(institution, name)),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            [],
            days,
        )

    def issue_server(self, hosts: Sequence[str], days: int = LEAF_DAYS) -> Credentials:
        """A server certificate (the hub, or a gateway's DICOM TLS listener) for its hosts."""
        if not hosts:
            raise CAError("name at least one host (DNS name or IP address) the server answers on")
        sans = _subject_alt_names(hosts)
        subject = x509.Name([_common_name(hosts[0], "the first host")])
        return self._issue("server", subject, [ExtendedKeyUsageOID.SERVER_AUTH], sans, days)

    def issue_node(
        self, name: str, hosts: Sequence[str] = (), days: int = LEAF_DAYS
    ) -> Credentials:
        """A local DICOM node (PACS, modality) that calls, or is called by, a gateway over TLS."""
        subject = x509.Name([_common_name(name, "the node's name")])
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        return self._issue("node", subject, usages, _subject_alt_names(hosts), days)

    def _issue(
        self,
        kind: str,
        subject: x509.Name,
        usages: list[x509.ObjectIdentifier],
        sans: list[x509.GeneralName],
        days: int,
    ) -> Credentials:
        _check_days(days)
        key = rsa.generate_private_key(public_exponent=65537, key_size=LEAF_KEY_BITS)
        now = self._clock()
        # Never beyond the CA itself: verifiers would refuse the tail end anyway.
        not_after = min(now + timedelta(days=days), self.certificate.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        record = IssuedCertificate(
            serial=serial_hex(certificate.serial_number),
            kind=kind,
            subject=certificate.subject.rfc4514_string(),
            issued_at=now.isoformat(timespec="seconds"),
            not_after=not_after.isoformat(timespec="seconds"),
        )
        with self._locked():
            # Recorded before it is handed out: the CA never forgets a certificate it issued.
            state = self._read_state()
            state["certificates"].append(asdict(record))
            self._write_state(state)
            write_atomic(self.folder / ISSUED_DIR / f"{record.serial}.pem", _pem(certificate))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Credentials(record, _pem(certificate), key_pem)

    def export(self, credentials: Credentials, out: Path) -> tuple[Path, Path, Path]:
        """Write cert.pem, key.pem (mode 0600) and the CA's ca.pem into out."""
        out.mkdir(parents=True, exist_ok=True)
        cert_path, key_path, ca_path = out / "cert.pem", out / "key.pem", out / "ca.pem"
        for path in (cert_path, key_path):
            if path.exists():
                raise CAError(f"{path} exists; give an empty folder with --out")
        write_atomic(key_path, credentials.key_pem, 0o600)
        write_atomic(cert_path, credentials.certificate_pem)
        write_atomic(ca_path, _pem(self.certificate))
        return cert_path, key_path, ca_path

    # -- revoking ----------------------------------------------------------------------------

    def revoke(self, serial: int, reason: str = "unspecified") -> IssuedCertificate:
        """Mark a certificate revoked and sign a new CRL that lists it."""
        if reason not in REASONS:
            raise CAError(f"the reason is one of {', '.join(REASONS)}")
        wanted = serial_hex(serial)
        with self._locked():
            state = self._read_state()
            for index, entry in enumerate(state["certificates"]):
                if entry["serial"] != wanted:
                    continue
                if entry.get("revoked_at"):
                    raise CAError(f"{wanted} was already revoked on {entry['revoked_at']}")
                entry["revoked_at"] = self._clock().isoformat(timespec="seconds")
                entry["reason"] = reason
                state["certificates"][index] = entry
                # The CRL first: the state never shows a revocation the CRL lacks.
                self._write_crl(state)
                self._write_state(state)
                return IssuedCertificate(**entry)
        raise CAError(f"this CA issued no certificate with serial {wanted}")

    def serial_of(self, path: Path) -> int:
        """The serial of a certificate file, if this CA signed it."""
        try:
            data = path.read_bytes()
            certificate = (
                x509.load_pem_x509_certificate(data)
                if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data)
            )
        except (OSError, ValueError) as exc:
            raise CAError(f"{path} is no readable certificate: {exc}") from None
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise CAError(f"{path} was not issued by this CA") from None
        return certificate.serial_number

    def certificates(self) -> list[IssuedCertificate]:
        return [IssuedCertificate(**entry) for entry in self._read_state()["certificates"]]

    def refresh_crl(self) -> Path:
        """Sign the CRL again with a new next-update date (before the old one passes)."""
        with self._locked():
            state = self._read_state()
            self._write_crl(state)
            self._write_state(state)
        return self.crl_path

    def crl_next_update(self) -> datetime:
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        next_update = crl.next_update_utc
        assert next_update is not None  # we always set it
        return next_update

    def _crl_number(self) -> int:
        if not self.crl_path.exists():
            return 0
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        number: int = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        return number

    # -- the folder --------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.folder / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_state(self) -> dict[str, Any]:
        path = self.folder / STATE_FILE
        if not path.exists():
            return {"crl_number": 0, "certificates": []}
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except ValueError:
            raise CAError(f"{path} is damaged; restore it from a backup") from None
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.folder / STATE_FILE, json.dumps(state, indent=1).encode(), 0o600)

    def _write_crl(self, state: dict[str, Any]) -> None:
        now = self._clock()
        # Never reuse a CRL number, even if a crash left the state behind the CRL on disk.
        state["crl_number"] = max(int(state.get("crl_number", 0)), self._crl_number()) + 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(state["crl_number"]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        for entry in state["certificates"]:
            if not entry.get("revoked_at"):
                continue
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
            )
            if entry.get("reason", "unspecified") != "unspecified":
                revoked = revoked.add_extension(
                    x509.CRLReason(x509.ReasonFlags(entry["reason"])), critical=False
                )
            builder = builder.add_revoked_certificate(revoked.build())
        crl = builder.sign(self._key, hashes.SHA256())
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _check_days(days: int) -> None:
    if not 1 <= days <= 36500:
        raise CAError("validity is 1 to 36500 days")

"""The network's certificate authority as operators use it: `imagebridge ca ...`.

Certificates are checked with OpenSSL's own `openssl verify`, the reference verifier.
"""

from __future__ import annotations

import json
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import require_tool
from imagebridge.cli import main
from imagebridge.pki.ca import CAError, CertificateAuthority, parse_serial
from imagebridge.pki.names import GatewayName, gateway_of


def ca_cmd(*args: str) -> Result:
    return CliRunner().invoke(main, ["ca", *args])


def ok(*args: str) -> Result:
    result = ca_cmd(*args)
    assert result.exit_code == 0, result.output
    return result


def refused(*args: str) -> str:
    """A command that must fail with a message, not a traceback."""
    result = ca_cmd(*args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.output


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def openssl_verify(
    ca: Path, cert: Path, crl: Path | None = None
) -> subprocess.CompletedProcess[str]:
    args = [require_tool("/usr/bin/openssl"), "verify", "-CAfile", str(ca)]
    if crl is not None:
        args += ["-crl_check", "-CRLfile", str(crl)]
    return subprocess.run([*args, str(cert)], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "ca"
    result = ok("init", "--dir", str(folder))
    assert "SHA-256 fingerprint" in result.output
    return folder


def test_init_keeps_the_key_private_and_refuses_to_overwrite(ca_dir: Path) -> None:
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    cert = load(ca_dir / "ca.pem")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    key = (ca_dir / "ca.key").read_bytes()
    assert "already holds a CA" in refused("init", "--dir", str(ca_dir))
    assert (ca_dir / "ca.key").read_bytes() == key
    assert not list(ca_dir.glob(".*.tmp"))  # every write was renamed into place


def test_gateway_certificate_names_institution_and_gateway(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    result = ok(
        "issue-gateway", "--dir", str(ca_dir), "--institution", "SEG", "--name", "gw1",
        "--out", str(out),
    )  # fmt: skip
    cert = load(out / "cert.pem")
    assert gateway_of(cert) == GatewayName("SEG", "gw1")
    assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert f"{cert.serial_number:X}" in result.output
    checked = openssl_verify(ca_dir / "ca.pem", out / "cert.pem", ca_dir / "crl.pem")
    assert checked.returncode == 0 and ": OK" in checked.stdout, checked.stdout + checked.stderr
    # The folder keeps a copy of what it issued, under its serial.
    assert (ca_dir / "issued" / f"{cert.serial_number:X}.pem").read_bytes() == (
        out / "cert.pem"
    ).read_bytes()


def test_server_and_node_certificates(ca_dir: Path, tmp_path: Path) -> None:
    ok(
        "issue-server", "--dir", str(ca_dir), "--host", "127.0.0.1", "--host", "hub.example.nhs.uk",
        "--out", str(tmp_path / "hub"),
    )  # fmt: skip
    server = load(tmp_path / "hub" / "cert.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["hub.example.nhs.uk"]
    assert usages(server) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert gateway_of(server) is None
    ok("issue-node", "--dir", str(ca_dir), "--name", "PACS_SEG", "--out", str(tmp_path / "node"))
    node = load(tmp_path / "node" / "cert.pem")
    assert usages(node) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "PACS_SEG"


def test_revoke_by_serial_or_file_rewrites_the_crl(ca_dir: Path, tmp_path: Path) -> None:
    issue = ["issue-gateway", "--dir", str(ca_dir), "--institution", "RVH"]
    ok(*issue, "--name", "old", "--out", str(tmp_path / "a"))
    ok(*issue, "--name", "lost", "--out", str(tmp_path / "b"))
    a, b = load(tmp_path / "a" / "cert.pem"), load(tmp_path / "b" / "cert.pem")
    number_before = _crl_number(ca_dir)

    result = ok("revoke", "--dir", str(ca_dir), "--serial", f"{a.serial_number:x}")
    assert "CRL rewritten" in result.output
    ok("revoke", "--dir", str(ca_dir), "--cert", str(tmp_path / "b" / "cert.pem"), "--reason",
       "keyCompromise")  # fmt: skip

    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(a.serial_number) is not None
    entry = crl.get_revoked_certificate_by_serial_number(b.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    assert _crl_number(ca_dir) == number_before + 2
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - datetime.now(UTC) > timedelta(days=300)
    checked = openssl_verify(ca_dir / "ca.pem", tmp_path / "a" / "cert.pem", ca_dir / "crl.pem")
    assert checked.returncode != 0 and "certificate revoked" in checked.stdout + checked.stderr

    listing = ok("list", "--dir", str(ca_dir)).output
    line = next(x for x in listing.splitlines() if x.startswith(f"{a.serial_number:X}"))
    assert "revoked" in line and "CN=old" in line
    state = json.loads((ca_dir / "state.json").read_text())
    assert {c["serial"] for c in state["certificates"] if c["revoked_at"]} >= {
        f"{a.serial_number:X}",
        f"{b.serial_number:X}",
    }


def test_crl_can_be_signed_again(ca_dir: Path) -> None:
    before = _crl_number(ca_dir)
    assert "valid until" in ok("crl", "--dir", str(ca_dir)).output
    assert _crl_number(ca_dir) == before + 1


def _crl_number(ca_dir: Path) -> int:
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    number: int = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return number


def test_bad_input_is_refused_with_its_reason(ca_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert "no CA in" in refused("list", "--dir", str(missing))
    assert "no CA in" in refused(
        "issue-gateway", "--dir", str(missing), "--institution", "SEG", "--name", "x",
        "--out", str(tmp_path / "x"),
    )  # fmt: skip
    issue = ["issue-gateway", "--dir", str(ca_dir), "--out", str(tmp_path / "g")]
    assert "institution code" in refused(*issue, "--institution", "seg!", "--name", "gw")
    assert "1 to 64" in refused(*issue, "--institution", "SEG", "--name", "x" * 65)
    assert "neither an IP address nor a DNS name" in refused(
        "issue-server", "--dir", str(ca_dir), "--host", "not a host", "--out", str(tmp_path / "s")
    )
    assert "1 to 36500 days" in refused(
        *issue, "--institution", "SEG", "--name", "gw", "--days", "0"
    )
    # A folder that already holds credentials is never overwritten.
    ok(*issue, "--institution", "SEG", "--name", "gw")
    key = (tmp_path / "g" / "key.pem").read_bytes()
    assert "give an empty folder" in refused(*issue, "--institution", "SEG", "--name", "gw2")
    assert (tmp_path / "g" / "key.pem").read_bytes() == key

    revoke = ["revoke", "--dir", str(ca_dir)]
    assert "issued no certificate with serial ABCDEF" in refused(*revoke, "--serial", "abcdef")
    assert "no serial number" in refused(*revoke, "--serial", "xyz")
    assert "either --serial or --cert" in refused(*revoke)
    serial = f"{load(tmp_path / 'g' / 'cert.pem').serial_number:X}"
    ok(*revoke, "--serial", serial)
    assert "already revoked" in refused(*revoke, "--serial", serial)
    # A certificate of another CA cannot be revoked here.
    other = tmp_path / "other-ca"
    ok("init", "--dir", str(other))
    ok("issue-node", "--dir", str(other), "--name", "N", "--out", str(tmp_path / "n"))
    assert "not issued by this CA" in refused(*revoke, "--cert", str(tmp_path / "n" / "cert.pem"))
    assert "no readable certificate" in refused(*revoke, "--cert", str(tmp_path / "nothing.pem"))


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").chmod(0o644)
    with pytest.raises(CAError, match="chmod 600"):
        CertificateAuthority.open(tmp_path / "ca")
    assert ca.certificates() == []


def test_serials_are_read_as_openssl_prints_them() -> None:
    assert parse_serial("0x1F") == parse_serial("1f") == parse_serial("1F") == 31
    assert parse_serial("01:F0") == 0x1F0
    with pytest.raises(CAError):
        parse_serial("0")

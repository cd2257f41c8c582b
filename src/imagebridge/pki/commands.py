"""`imagebridge ca ...`: the network's certificate authority for operators."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography.hazmat.primitives import hashes

from imagebridge.pki.ca import (
    LEAF_DAYS,
    REASONS,
    CAError,
    CertificateAuthority,
    Credentials,
    IssuedCertificate,
    parse_serial,
)

CA_DIR = click.option(
    "--dir",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The CA's folder (its key never leaves it).",
)
OUT = click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for cert.pem, key.pem and ca.pem (must not hold them yet).",
)
DAYS = click.option("--days", default=LEAF_DAYS, show_default=True, help="Validity in days.")


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Bad input ends with its reason, never a traceback."""
    try:
        yield
    except CAError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror}") from None


def _issued(ca: CertificateAuthority, credentials: Credentials, out: Path) -> None:
    cert, key, ca_cert = ca.export(credentials, out)
    record = credentials.record
    click.echo(f"issued {record.kind} certificate {record.serial}: {record.subject}")
    click.echo(f"  until {record.not_after}")
    click.echo(f"  {cert}\n  {key} (keep it private)\n  {ca_cert} (the network CA)")


@click.group()
def ca() -> None:
    """The network's certificate authority: issue and revoke TLS certificates."""


@ca.command()
@CA_DIR
@click.option("--name", default="ImageBridge network CA", show_default=True)
@click.option("--days", default=3650, show_default=True, help="Validity in days.")
def init(folder: Path, name: str, days: int) -> None:
    """Create the CA: its key (mode 0600), its certificate and an empty CRL."""
    with _clear_errors():
        authority = CertificateAuthority.create(folder, name, days)
    fingerprint = authority.certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    click.echo(f"CA created in {folder}")
    click.echo(f"  certificate {authority.certificate_path} (give it to the hub and gateways)")
    click.echo(f"  CRL {authority.crl_path} (the hub's tls_crl)")
    click.echo(f"  SHA-256 fingerprint {fingerprint}")


@ca.command("issue-gateway")
@CA_DIR
@click.option("--institution", required=True, help="The institution's code, e.g. SEG.")
@click.option("--name", required=True, help="The gateway's name, as registered at the hub.")
@OUT
@DAYS
def issue_gateway(folder: Path, institution: str, name: str, out: Path, days: int) -> None:
    """Issue a gateway's client certificate for the hub's mutual-TLS listener."""
    with _clear_errors():
        authority = CertificateAuthority.open(folder)
        _issued(authority, authority.issue_gateway(institution, name, days), out)


@ca.command("issue-server")
@CA_DIR
@click.option(
    "--host", "hosts", multiple=True, required=True, help="DNS name or IP address; repeatable."
)
@OUT
@DAYS
def issue_server(folder: Path, hosts: tuple[str, ...], out: Path, days: int) -> None:
    """Issue a server certificate: the hub's, or a gateway's DICOM TLS listener's."""
    with _clear_errors():
        authority = CertificateAuthority.open(folder)
        _issued(authority, authority.issue_server(list(hosts), days), out)


@ca.command("issue-node")
@CA_DIR
@click.option("--name", required=True, help="The node's name, e.g. its AE title.")
@click.option("--host", "hosts", multiple=True, help="DNS name or IP address; repeatable.")
@OUT
@DAYS
def issue_node(folder: Path, name: str, hosts: tuple[str, ...], out: Path, days: int) -> None:
    """Issue a certificate for a local DICOM node (PACS, modality) speaking DICOM TLS."""
    with _clear_errors():
        authority = CertificateAuthority.open(folder)
        _issued(authority, authority.issue_node(name, list(hosts), days), out)


@ca.command()
@CA_DIR
@click.option("--serial", help="Serial number in hex, as `ca list` shows it.")
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Or the certificate file itself.",
)
@click.option("--reason", type=click.Choice(REASONS), default="unspecified", show_default=True)
def revoke(folder: Path, serial: str | None, cert_file: Path | None, reason: str) -> None:
    """Revoke a certificate and rewrite the CRL (the hub picks it up at once)."""
    if (serial is None) == (cert_file is None):
        raise click.UsageError("give either --serial or --cert")
    with _clear_errors():
        authority = CertificateAuthority.open(folder)
        if cert_file is not None:
            number = authority.serial_of(cert_file)
        else:
            assert serial is not None
            number = parse_serial(serial)
        record = authority.revoke(number, reason)
    click.echo(f"revoked {record.serial}: {record.subject}")
    click.echo(f"  CRL rewritten: {authority.crl_path}")


@ca.command("list")
@CA_DIR
def list_certificates(folder: Path) -> None:
    """List every certificate the CA issued, with its state."""
    with _clear_errors():
        authority = CertificateAuthority.open(folder)
        records = authority.certificates()
    if not records:
        click.echo("no certificates issued yet")
    now = datetime.now(UTC)
    for record in records:
        state = _state(record, now)
        click.echo(f"{record.serial}  {record.kind:<7}  {state:<28}  {record.subject}")


def _state(record: IssuedCertificate, now: datetime) -> str:
    if record.revoked_at:
        return f"revoked {record.revoked_at[:10]}"
    if datetime.fromisoformat(record.not_after) <= now:
        return f"expired {record.not_after[:10]}"
    return f"valid until {record.not_after[:10]}"


@ca.command()
@CA_DIR
def crl(folder: Path) -> None:
    """Sign the CRL again, with a new next-update date; run it well before that date."""
    with _clear_errors():
        authority = CertificateAuthority.open(folder)
        path = authority.refresh_crl()
        click.echo(f"CRL {path} valid until {authority.crl_next_update().date()}")

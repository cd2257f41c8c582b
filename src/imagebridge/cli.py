"""The `imagebridge` command."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from imagebridge import __version__
from imagebridge.pki.commands import ca
from imagebridge.settings import GatewaySettings, HubSettings, SettingsError

CONFIG = click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file; environment variables override it.",
)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs dataset contents at debug level: keep patient data out of the log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingsError as exc:  # a bad settings file: its reason, not a traceback
            raise click.ClickException(str(exc)) from None


def _settle_heap() -> None:
    """Leave what start-up built (modules, the app, settings) out of the garbage collector's
    full passes: each would walk it all again, a pause of many milliseconds in the middle of
    a request, for objects that live as long as the process."""
    gc.collect()
    gc.freeze()


@click.group(cls=_Commands)
@click.version_option(__version__)
def main() -> None:
    """ImageBridge: send studies and reports between hospitals through a hub."""


@main.command()
@CONFIG
@click.option("--host", help="Listen address (overrides the settings).")
@click.option("--port", type=int, help="Listen port (overrides the settings).")
@click.option("-v", "--verbose", is_flag=True)
def hub(config: Path | None, host: str | None, port: int | None, verbose: bool) -> None:
    """Run the hub: HTTP API, directory, index, blob store, transfers and audit."""
    from imagebridge.hub.server import make_server
    from imagebridge.pki.tls import TLSConfigError
    from imagebridge.sealing import SealingError
    from imagebridge.storage.blobs import BlobStoreError

    _logging(verbose)
    overrides: dict[str, Any] = {}
    if host:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = HubSettings.load(config, **overrides)
    try:
        server = make_server(settings)
    except (TLSConfigError, BlobStoreError, SealingError) as exc:
        raise click.ClickException(str(exc)) from None
    scheme = "https" if settings.tls_cert else "http"
    click.echo(f"hub on {scheme}://{settings.host}:{settings.port} (API docs at /docs)", err=True)
    if settings.gateway_port is not None:
        click.echo(f"gateways (mutual TLS) on port {settings.gateway_port}", err=True)
    _settle_heap()
    server.run()


@main.command()
@CONFIG
@click.option("--once", is_flag=True, help="Run the jobs due now, then exit.")
@click.option("-v", "--verbose", is_flag=True)
def worker(config: Path | None, once: bool, verbose: bool) -> None:
    """Run the hub's queued jobs (arrival notices, retention...), beside any number of hubs
    and other workers on the same database and blob store."""
    from imagebridge.hub.state import Hub
    from imagebridge.jobs.worker import Worker
    from imagebridge.sealing import SealingError
    from imagebridge.storage.blobs import BlobStoreError

    _logging(verbose)
    try:
        hub = Hub.open(HubSettings.load(config))
    except (BlobStoreError, SealingError) as exc:
        raise click.ClickException(str(exc)) from None
    jobs = Worker(hub)
    if once:
        click.echo(f"{jobs.run_until_idle()} jobs run")
        return
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    _settle_heap()
    jobs.start()
    click.echo(f"worker {jobs.name} running", err=True)
    stopped.wait()
    jobs.stop()
    hub.engine.dispose()


@main.command()
@CONFIG
@click.option("-v", "--verbose", is_flag=True)
def gateway(config: Path | None, verbose: bool) -> None:
    """Run an institution's gateway: DICOM to the local PACS, HTTPS to the hub."""
    from imagebridge.gateway.service import Gateway
    from imagebridge.pki.tls import TLSConfigError

    _logging(verbose)
    settings = GatewaySettings.load(config)
    try:
        gw = Gateway(settings)
    except TLSConfigError as exc:
        raise click.ClickException(str(exc)) from None
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    gw.start()
    _settle_heap()
    stopped.wait()
    gw.stop()


@main.group()
def directory() -> None:
    """Manage the hub's directory directly in its database (run beside the hub)."""


@directory.command("add-institution")
@CONFIG
@click.argument("code")
@click.argument("name")
@click.option("--routing-ae", help="Called AE title that routes here (default IB_<CODE>).")
@click.option("--urgent-ae", help="Called AE title that routes here urgently.")
def add_institution(
    config: Path | None, code: str, name: str, routing_ae: str | None, urgent_ae: str | None
) -> None:
    """Add an institution with its routing AE titles."""
    from imagebridge.audit.services import record
    from imagebridge.hub.state import Hub
    from imagebridge.institutions.services import DirectoryError, create_institution

    hub = Hub.open(HubSettings.load(config))
    with hub.sessions() as session, session.begin():
        try:
            i = create_institution(session, code, name, routing_ae, urgent_ae)
        except DirectoryError as exc:
            raise click.ClickException(str(exc)) from exc
        record(
            session,
            "directory:institution:created",
            actor_type="admin",
            actor="cli",
            institution_id=i.id,
            detail={"code": code},
        )
        click.echo(f"{i.code}: routine AE {i.routing_ae_title}, urgent AE {i.urgent_ae_title}")


@directory.command("add-gateway")
@CONFIG
@click.argument("code")
@click.argument("name")
def add_gateway(config: Path | None, code: str, name: str) -> None:
    """Register a gateway for an institution and print its secret token (shown once)."""
    from imagebridge.audit.services import record
    from imagebridge.hub.state import Hub
    from imagebridge.institutions.services import get_institution, issue_gateway

    hub = Hub.open(HubSettings.load(config))
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None:
            raise click.ClickException(f"no institution {code}")
        gw, token = issue_gateway(session, institution, name)
        record(
            session,
            "directory:gateway:issued",
            actor_type="admin",
            actor="cli",
            institution_id=institution.id,
            detail={"gateway_id": gw.id},
        )
    click.echo(token)


@directory.command("add-user")
@CONFIG
@click.argument("code")
@click.argument("username")
@click.option("--role", "roles", multiple=True, help="A role name; repeat for several.")
@click.option("--external", is_flag=True, help="An external user (a solicitor): no roles.")
@click.option("--display-name", default="")
@click.option("--email", default="")
@click.password_option(envvar="IMAGEBRIDGE_NEW_PASSWORD", help="Asked for if not given.")
def add_user(
    config: Path | None,
    code: str,
    username: str,
    roles: tuple[str, ...],
    external: bool,
    display_name: str,
    email: str,
    password: str,
) -> None:
    """Add a user to an institution (the first network administrator is made this way)."""
    from imagebridge.accounts.services import AccountError, create_user
    from imagebridge.audit.services import record
    from imagebridge.hub.state import Hub
    from imagebridge.institutions.services import get_institution

    hub = Hub.open(HubSettings.load(config))
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None:
            raise click.ClickException(f"no institution {code}")
        try:
            user = create_user(
                session,
                institution=institution,
                username=username,
                password=password,
                role_names=list(roles),
                kind="external" if external else "staff",
                display_name=display_name,
                email=email,
            )
        except AccountError as exc:
            raise click.ClickException(exc.reason) from exc
        record(
            session,
            "user:account:created",
            actor_type="admin",
            actor="cli",
            institution_id=institution.id,
            detail={"user": user.username, "roles": list(roles)},
        )
    click.echo(f"{user.username} added to {code}")


@directory.command("sign-agreement")
@CONFIG
@click.argument("code")
@click.option("--version", "version", required=True, help="The agreement's version.")
@click.option(
    "--text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The signed agreement's text (its SHA-256 is recorded).",
)
@click.option("--signatory", required=True, help="Name of who signed.")
@click.option("--signatory-role", required=True, help="Their role, e.g. Caldicott Guardian.")
@click.option("--signed-on", type=click.DateTime(["%Y-%m-%d"]), required=True)
@click.option("--consent-party", type=click.Choice(["sender", "receiver"]), required=True)
def sign_agreement(
    config: Path | None,
    code: str,
    version: str,
    text: Path,
    signatory: str,
    signatory_role: str,
    signed_on: Any,
    consent_party: str,
) -> None:
    """Record an institution's signed data sharing agreement."""
    import hashlib

    from imagebridge.agreements.services import record_agreement
    from imagebridge.audit.services import record
    from imagebridge.hub.state import Hub
    from imagebridge.institutions.services import get_institution

    hub = Hub.open(HubSettings.load(config))
    with hub.sessions() as session, session.begin():
        institution = get_institution(session, code)
        if institution is None:
            raise click.ClickException(f"no institution {code}")
        record_agreement(
            session,
            institution,
            version=version,
            text_sha256=hashlib.sha256(text.read_bytes()).hexdigest(),
            signatory_name=signatory,
            signatory_role=signatory_role,
            signed_on=signed_on.date(),
            consent_party=consent_party,
            recorded_by="cli",
        )
        record(
            session,
            "agreement:agreement:recorded",
            actor_type="admin",
            actor="cli",
            institution_id=institution.id,
            detail={"version": version, "consent_party": consent_party},
        )
    click.echo(f"agreement {version} of {code} recorded")


@main.group()
def audit() -> None:
    """The audit trail: check that it is intact."""


@audit.command("verify")
@CONFIG
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="ID[:HASH]",
    help="An event known to exist, e.g. a head printed by an earlier run (repeatable).",
)
def audit_verify(config: Path | None, anchors: tuple[str, ...]) -> None:
    """Walk the hash chain; exit 1 at the first altered, inserted or deleted event."""
    from imagebridge.audit.services import VerifyError, verify_database

    try:
        report = verify_database(HubSettings.load(config).resolved_database_url, anchors)
    except VerifyError as exc:
        raise click.ClickException(str(exc)) from exc
    if report.fault is None:
        click.echo(f"intact: {report.events} events; head {report.head_id} {report.head_hash}")
        return
    fault = report.fault
    click.echo(f"NOT intact: event {fault.event_id} {fault.kind}: {fault.reason}")
    click.echo(f"{report.events} events verified before it; last good {report.head_id}")
    sys.exit(1)


@main.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for all the demo's data (default: a new one under ./demo-data).",
)
@click.option("--slices", default=300, show_default=True, help="Slices in the synthetic CT.")
@click.option("--keep-running", is_flag=True, help="Keep the network up for exploration.")
def demo(folder: Path | None, slices: int, keep_running: bool) -> None:
    """Send a synthetic CT with its report from one hospital's PACS to another's."""
    from imagebridge.demo.run import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_demo(folder, slices=slices, keep_running=keep_running))


main.add_command(ca)

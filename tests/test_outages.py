"""Outages: a receiving PACS down for long, the hub out of a gateway's reach, a gateway's spool
disk full, the hub's database away for a while. Real processes on loopback throughout: the
transfer waits (and says so when it is urgent), nothing is lost, and the work resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import TEST_DATABASE, audit_events
from imagebridge.demo.network import Network, free_port, wait_for_port
from imagebridge.dicom.store_scu import Node, store_files
from pg import PostgresServer
from test_exchange import (
    SENDER_AE,
    HubLink,
    MiniPacsFactory,
    assert_arrived_intact,
    assert_no_tracebacks,
    delivered,
    make_study,
    send,
    start_receiver,
    start_sender,
    to_send,
    transfers_of,
    wait_until,
)
from test_portal_notifications import Hooks

LATE_SECONDS = 3.0


def start_network(root: Path, **hub_settings: Any) -> Network:
    network = Network(root)
    # The job worker runs in the hub on either database: the lateness sweep is a job.
    network.start_hub(inbox_wait_seconds=1.0, jobs={"in_process_worker": True}, **hub_settings)
    network.add_institution("SEG", "St Elsewhere General Hospital")
    network.add_institution("RVH", "Riverside Hospital")
    return network


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    network = start_network(tmp_path / "net")
    try:
        yield network
    finally:
        network.stop()
    assert_no_tracebacks(network)


@pytest.fixture
def webhooks() -> Iterator[tuple[list[tuple[str, dict[str, str], bytes]], int]]:
    """An HTTP server on loopback keeping every notice POSTed to it."""
    Hooks.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Hooks.received, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# -- the receiving PACS down for a long time ------------------------------------------------


def test_an_urgent_transfer_waiting_for_a_pacs_that_is_down_raises_one_alert(
    tmp_path: Path,
    mini_pacs: MiniPacsFactory,
    webhooks: tuple[list[tuple[str, dict[str, str], bytes]], int],
) -> None:
    hooks, hook_port = webhooks
    net = start_network(
        tmp_path / "net",
        urgent_late_seconds=LATE_SECONDS,
        notifications={"webhooks": {"RVH": f"http://127.0.0.1:{hook_port}/rvh"}},
    )
    try:
        pacs_port = free_port()  # the PACS is down: nothing listens here yet
        seg = start_sender(net)
        start_receiver(net, "RVH", pacs_port, retry_max_seconds=1.0)
        urgent = make_study(tmp_path / "urgent", slices=4, accession_number="ACCU")
        routine = make_study(tmp_path / "routine", slices=4, accession_number="ACCR")
        send(seg, "IB_RVH_URG", urgent)
        send(seg, "IB_RVH", routine)
        (t_urgent,) = wait_until(
            "the urgent transfer", lambda: transfers_of(net, urgent.study_instance_uid)
        )
        (t_routine,) = wait_until(
            "the routine transfer", lambda: transfers_of(net, routine.study_instance_uid)
        )

        def late() -> list[dict[str, Any]]:
            return audit_events(net, "transfer:transfer:late")

        (event,) = wait_until("the lateness alert", late, timeout=60)
        assert event["transfer_ref"] == t_urgent["id"]  # the routine one waits without alarm
        assert event["outcome"] == "failure"
        assert event["detail"]["instances_delivered"] == 0
        (notice_path, _, body) = wait_until("the late notice", lambda: hooks and hooks[0])
        notice = json.loads(body)
        assert notice_path == "/rvh"
        assert notice["event"] == "transfer.late" and notice["transfer_id"] == t_urgent["id"]
        assert notice["priority"] == "urgent" and notice["instances_delivered"] == 0
        assert b"SEG778899" not in body and b"DEMO" not in body  # never the patient
        with net.admin() as admin:
            assert admin.get(f"/api/v1/transfers/{t_urgent['id']}").json()["status"] != "delivered"

        pacs = mini_pacs("PACS_RVH", pacs_port)  # the PACS is back
        delivered(net, urgent.study_instance_uid)
        delivered(net, routine.study_instance_uid)
        assert_arrived_intact(pacs, urgent)
        assert_arrived_intact(pacs, routine)
        time.sleep(2 * LATE_SECONDS)
        assert len(late()) == 1  # raised once, not on every sweep
        assert t_routine["id"] not in {e["transfer_ref"] for e in late()}
    finally:
        net.stop()
    assert_no_tracebacks(net)


# -- the hub out of a gateway's reach ---------------------------------------------------------


def test_a_gateway_cut_off_from_the_hub_keeps_accepting_and_catches_up(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    link = HubLink(net.hub_port)
    try:
        pacs = mini_pacs("PACS_RVH")
        seg = start_sender(net, hub_url=link.url)
        start_receiver(net, "RVH", pacs.port)
        link.block()
        studies = [
            make_study(tmp_path / f"study{i}", slices=8, accession_number=f"ACC{i}")
            for i in range(2)
        ]
        for study in studies:
            send(seg, "IB_RVH", study)  # every C-STORE answered with success
        spool = net.root / "gateway-SEG" / "data" / "spool" / "out"
        time.sleep(3.0)  # the uploader tries, backs off, and tries again
        assert len(list(spool.glob("*/*.dcm"))) == 16
        assert all(not transfers_of(net, s.study_instance_uid) for s in studies)

        link.unblock()
        for study in studies:
            (t,) = delivered(net, study.study_instance_uid)
            assert t["instances_declared"] == t["instances_confirmed"] == 8
            assert_arrived_intact(pacs, study)
        wait_until("the spool emptied", lambda: not list(spool.glob("*/*.dcm")))
    finally:
        link.close()


# -- the spool disk full ----------------------------------------------------------------------


def small_filesystem(folder: Path, size: str) -> bool:
    """A tmpfs of ``size`` mounted on ``folder`` (needs root, as under CI); False if it
    cannot be had, and the test simulates a full disk with spool_min_free_bytes instead."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
    )
    return done.returncode == 0


def test_a_full_spool_disk_refuses_new_stores_with_a700_and_keeps_what_it_holds(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    link = HubLink(net.hub_port)
    spool = net.root / "gateway-SEG" / "data" / "spool"
    real = small_filesystem(spool, "1m")
    print("spool on", "a 1 MiB tmpfs" if real else "the disk, spool_min_free_bytes simulating")
    try:
        pacs = mini_pacs("PACS_RVH")
        # On the small filesystem the guard is off: the disk itself runs out (ENOSPC).
        seg = start_sender(net, hub_url=link.url, spool_min_free_bytes=0)
        start_receiver(net, "RVH", pacs.port)
        link.block()  # nothing leaves the spool
        first = make_study(tmp_path / "first", slices=4, accession_number="ACC1")
        send(seg, "IB_RVH", first)
        if not real:  # from now on the disk counts as full
            net.stop_gateway("SEG")
            seg = start_sender(net, hub_url=link.url, spool_min_free_bytes=2**60)
        second = make_study(tmp_path / "second", slices=60, accession_number="ACC2")
        results = store_files(Node("IB_RVH", "127.0.0.1", seg.port), SENDER_AE, to_send(second))
        refused = [r for r in results if r.outcome != "delivered"]
        assert refused, "the spool never filled up"
        assert all("0xA700" in r.detail for r in refused), refused[:3]
        events = audit_events_when(net, link, "dicom:instance:refused")
        assert {e["detail"]["status"] for e in events} == {"0xA700"}
        # Nothing half written: every spooled file is whole under its digest.
        assert not list((spool / "tmp").iterdir())

        link.unblock()
        (t,) = delivered(net, first.study_instance_uid)
        assert t["instances_confirmed"] == 4
        assert_arrived_intact(pacs, first)
        # The PACS sends again what was refused until all is taken (a small disk may refuse
        # some again while the spool drains): the study is whole.
        rest = [
            f for f, r in zip(to_send(second), results, strict=True) if r.outcome != "delivered"
        ]
        if not real:
            net.stop_gateway("SEG")
            seg = start_sender(net, hub_url=link.url, spool_min_free_bytes=0)
        deadline = time.monotonic() + 60
        while rest and time.monotonic() < deadline:
            again = store_files(Node("IB_RVH", "127.0.0.1", seg.port), SENDER_AE, rest)
            rest = [f for f, r in zip(rest, again, strict=True) if r.outcome != "delivered"]
            time.sleep(0.5 if rest else 0)
        assert not rest
        (t,) = delivered(net, second.study_instance_uid)
        assert t["instances_declared"] == t["instances_confirmed"] == 60
        assert_arrived_intact(pacs, second)
    finally:
        link.close()
        net.stop_gateway("SEG")
        if real:
            subprocess.run(["umount", "-l", str(spool)], check=False)


def audit_events_when(net: Network, link: HubLink, action: str) -> list[dict[str, Any]]:
    """The gateway's journal reaches the hub once the hub is reachable again."""
    link.unblock()
    return list(wait_until(action, lambda: audit_events(net, action)))


# -- the hub's database away for a while ------------------------------------------------------


def hold_sqlite_lock(database: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process holds the database's write lock, as a backup tool or a DBA's shell
    might; readers carry on (WAL), writers wait for the busy timeout, then fail."""
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "c.execute('ROLLBACK')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(database), str(seconds)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None and process.stdout.readline() == b"locked\n"
    return process


@pytest.mark.skipif(TEST_DATABASE != "sqlite", reason="the hub's database is PostgreSQL")
def test_a_locked_database_answers_503_and_the_work_resumes(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path
) -> None:
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=8)
    # Longer than SQLite's busy timeout (30 s): writers give up, cleanly.
    locker = hold_sqlite_lock(net.root / "hub" / "hub.db", 40)
    try:
        send(seg, "IB_RVH", study)  # the gateway takes the study all the same
        with net.admin() as admin:
            r = admin.post("/api/v1/institutions", json={"code": "NTH", "name": "Northern"})
        assert r.status_code == 503, r.text
        assert "database is locked" in r.json()["detail"]
        assert r.headers["Retry-After"] == "5"
    finally:
        locker.wait()
    (t,) = delivered(net, study.study_instance_uid)
    assert t["instances_declared"] == t["instances_confirmed"] == 8
    assert_arrived_intact(pacs, study)


def stop_postgres(server: PostgresServer) -> list[str]:
    """A fast shutdown: every session ended. The command line, to start it again."""
    process = server.process
    assert process is not None
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    return [str(a) for a in process.args]  # type: ignore[union-attr]


def start_postgres_again(server: PostgresServer, command: list[str]) -> None:
    user = "postgres" if os.geteuid() == 0 else None
    with open(server.folder / "postgres.log", "ab") as log:
        server.process = subprocess.Popen(command, user=user, stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(server.port, server.process)


@pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="the hub's database is SQLite")
def test_a_restarted_postgresql_answers_503_and_the_work_resumes(
    net: Network, mini_pacs: MiniPacsFactory, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    pacs = mini_pacs("PACS_RVH")
    seg = start_sender(net)
    start_receiver(net, "RVH", pacs.port)
    study = make_study(tmp_path / "study", slices=8)
    command = stop_postgres(postgres_server)
    try:
        send(seg, "IB_RVH", study)  # the gateway takes the study all the same
        with net.admin() as admin:
            r = admin.get("/api/v1/transfers")
        assert r.status_code == 503, r.text
        assert "database is unavailable" in r.json()["detail"]
    finally:
        start_postgres_again(postgres_server, command)
    (t,) = delivered(net, study.study_instance_uid)
    assert t["instances_declared"] == t["instances_confirmed"] == 8
    assert_arrived_intact(pacs, study)
    with httpx.Client(base_url=net.hub_url) as c:
        assert c.get("/api/v1/health").status_code == 200

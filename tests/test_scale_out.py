"""Scale-out: two hub processes and two workers on one PostgreSQL database and one blob store,
SEG's gateway talking to one hub and RVH's to the other, DCMTK as both PACS.

A burst of studies sent by SEG's PACS reaches RVH's PACS with every instance exactly once;
every delivered transfer is announced exactly once by one of the workers; a worker killed
(SIGKILL) while it holds a notice to a slow webhook receiver loses nothing: its lease runs
out and the other worker sends it. Work queued through one hub wakes a gateway long-polling
the other at once. Both hubs answer /ready, and /metrics says the same from either.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from conftest import hub_query, require_tool, wait_until, whole_dataset
from imagebridge.demo.network import Network, free_port, stop_process, wait_for_port
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study

SCRAPE_TOKEN = "scrape-token-for-tests"
NOTICE = "notification.arrival"
SLICES = 3
BURST = 6
FAST = {"study_stable_seconds": 0.5, "retry_initial_seconds": 0.2, "retry_max_seconds": 0.5}


class WebhookReceiver:
    """Arrival notices' webhook receiver; while ``holding`` it keeps each request waiting
    until ``release`` (a slow receiver), so a worker can be caught mid-job."""

    def __init__(self) -> None:
        self.posts: list[str] = []  # the transfer of each request, answered or not
        self.holding = threading.Event()
        self.arrived = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                notice = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.posts.append(notice["transfer_id"])
                if receiver.holding.is_set():
                    receiver.arrived.set()
                    receiver.release.wait(60)
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:
                    pass  # the worker that asked is gone

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/rvh"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class ScaledNetwork:
    def __init__(self, root: Path, database_url: str, webhook: str, pacs_port: int) -> None:
        settings: dict[str, Any] = {
            "database_url": database_url,
            "blob_dir": str(root / "blobs"),  # one store for both hubs
            "inbox_wait_seconds": 10,
            "jobs": {
                "in_process_worker": False,
                "lease_seconds": 3,
                "poll_seconds": 0.2,
                "retry_seconds": 0.5,
            },
            # (Scalars before tables: write_toml writes them in this order.)
            "notifications": {"timeout_seconds": 60, "webhooks": {"RVH": webhook}},
            "metrics": {"cache_seconds": 0},
        }
        self.hubs = [Network(root / "hub-one"), Network(root / "hub-two")]
        self.workers: list[subprocess.Popen[bytes]] = []
        self.root = root
        for hub in self.hubs:
            hub.database_url = database_url
            # The scrape token from the environment, as a deployment would give it.
            hub.env = {"IMAGEBRIDGE_HUB_METRICS__SCRAPE_TOKEN": SCRAPE_TOKEN}
            if hub is not self.hubs[0]:  # one network: one key for the secrets kept
                hub.env["IMAGEBRIDGE_HUB_SECRET_KEY"] = self.hubs[0].secret_key()
            hub.start_hub(**settings)
        one, two = self.hubs
        one.add_institution("SEG", "St Elsewhere General Hospital")
        one.add_institution("RVH", "Riverside Hospital")
        for n in range(2):
            self.workers.append(self.start_worker(n))
        # SEG's gateway talks to the first hub, RVH's to the second.
        one.start_gateway(
            "SEG", calling_aes=[{"ae_title": "PACS_SEG", "host": "127.0.0.1"}], **FAST
        )
        two.start_gateway(
            "RVH",
            calling_aes=[{"ae_title": "PACS_RVH", "host": "127.0.0.1"}],
            pacs=[{"ae_title": "PACS_RVH", "host": "127.0.0.1", "port": pacs_port}],
            **FAST,
        )

    def start_worker(self, n: int) -> subprocess.Popen[bytes]:
        config = self.hubs[0].root / "hub.toml"
        with open(self.root / f"worker-{n}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "imagebridge", "worker", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker)
        one, two = self.hubs
        two.database_url = ""  # the first drops the database, once both have stopped
        two.stop()
        one.stop()


@pytest.fixture
def scaled(
    tmp_path: Path, postgres_url: str
) -> Iterator[tuple[ScaledNetwork, Path, WebhookReceiver]]:
    storescp = require_tool("/usr/bin/storescp")
    received = tmp_path / "pacs-rvh"
    received.mkdir()
    pacs_port = free_port()
    # Unique file names: an instance stored twice leaves two files.
    pacs = subprocess.Popen(
        [
            storescp,
            "--aetitle",
            "PACS_RVH",
            "--output-directory",
            str(received),
            "+uf",
            str(pacs_port),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    receiver = WebhookReceiver()
    network: ScaledNetwork | None = None
    try:
        wait_for_port(pacs_port, pacs)
        network = ScaledNetwork(tmp_path / "net", postgres_url, receiver.url, pacs_port)
        yield network, received, receiver
    finally:
        receiver.stop()
        if network is not None:
            network.stop()
        stop_process(pacs)
    crashed = [p.name for p in tmp_path.rglob("*.log") if "Traceback" in p.read_text()]
    assert not crashed, f"tracebacks in {crashed}"


def storescu(gateway_port: int, files: StudyFiles) -> None:
    subprocess.run(
        [
            require_tool("/usr/bin/storescu"),
            "--aetitle",
            "PACS_SEG",
            "--call",
            "IB_RVH",
            "127.0.0.1",
            str(gateway_port),
            *map(str, files.paths),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
    )


def delivered(net: Network, count: int) -> list[dict[str, Any]]:
    with net.admin() as admin:
        found = [
            t
            for t in admin.get("/api/v1/transfers", params={"status": "delivered"}).json()
            if t["receiver"] == "RVH"
        ]
    return found if len(found) >= count else []


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def in_pacs(folder: Path, at_least: int) -> Counter[str]:
    """How many times RVH's PACS stored each SOP Instance UID, once it holds ``at_least``
    files (an empty Counter before)."""
    files = list(folder.iterdir())
    if len(files) < at_least:
        return Counter()
    found = [whole_dataset(p, stop_before_pixels=True) for p in files]
    if any(ds is None for ds in found):  # one still being written: look again
        return Counter()
    return Counter(str(ds.SOPInstanceUID) for ds in found if ds is not None)


def notices_sent(net: Network, transfer: str) -> int:
    with net.admin() as admin:
        r = admin.get(
            "/api/v1/audit", params={"action": "notification:webhook:sent", "transfer": transfer}
        )
        return len(r.json())


def running_notices(net: Network) -> list[tuple[Any, ...]]:
    query = f"SELECT leased_by FROM jobs WHERE kind = '{NOTICE}' AND status = 'running'"
    return hub_query(net, query)


def scrape(net: Network) -> dict[str, str]:
    r = httpx.get(f"{net.hub_url}/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
    assert r.status_code == 200, r.text
    return {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in r.text.splitlines()
        if line and not line.startswith("#")
    }


def test_two_hubs_and_two_workers_deliver_and_announce_each_transfer_once(
    scaled: tuple[ScaledNetwork, Path, WebhookReceiver], tmp_path: Path
) -> None:
    network, received, receiver = scaled
    one, two = network.hubs
    studies = [
        generate_ct_study(
            tmp_path / f"study-{n}",
            slices=SLICES,
            rows=32,
            columns=32,
            patient_id=f"SEG{n:04d}",
            accession_number=f"ACC{n}",
            seed=n,
        )
        for n in range(BURST + 1)
    ]
    uids = [{sop_uid(p) for p in s.paths} for s in studies]
    seg_port = one.gateways["SEG"].port

    # A burst: the studies at once, from several associations.
    with ThreadPoolExecutor(BURST) as pool:
        list(pool.map(lambda s: storescu(seg_port, s), studies[:BURST]))
    transfers = wait_until("the burst delivered", lambda: delivered(two, BURST), 120)
    assert len(transfers) == BURST
    stored = wait_until("RVH's PACS to hold them", lambda: in_pacs(received, BURST * SLICES))
    assert set(stored) == set().union(*uids[:BURST]) and set(stored.values()) == {1}
    # Each delivered transfer announced once, by one worker or the other.
    wait_until("every notice", lambda: len(receiver.posts) >= BURST)
    assert Counter(receiver.posts) == Counter({t["id"]: 1 for t in transfers})
    assert all(notices_sent(one, t["id"]) == 1 for t in transfers)

    # Both hubs are ready, and say the same of the network.
    for hub in network.hubs:
        assert httpx.get(f"{hub.hub_url}/ready").json() == {
            "status": "ready",
            "database": "ok",
            "blob_store": "ok",
        }
        assert httpx.get(f"{hub.hub_url}/metrics").status_code == 401
    figures = [scrape(hub) for hub in network.hubs]
    shared = ("imagebridge_transfers", "imagebridge_delivery")
    same = [k for k in figures[0] if k.startswith(shared)]
    assert figures[0]['imagebridge_transfers_finished{status="delivered"}'] == f"{BURST}.0"
    assert {k: figures[0][k] for k in same} == {k: figures[1][k] for k in same}

    # Work queued through one hub wakes a gateway long-polling the other at once (their
    # own look at the database comes only every 5 s).
    listening = "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN imagebridge_inbox'"
    assert hub_query(one, listening) == [(2,)]  # each hub process
    one.add_institution("NTH", "North Hospital")
    nth = {"Authorization": f"Bearer {two.issue_token('NTH')}"}
    answered: list[tuple[float, Any]] = []

    def poll() -> None:
        url = f"{two.hub_url}/api/v1/gateway/work"
        r = httpx.get(url, params={"wait": 10}, headers=nth, timeout=30)
        answered.append((time.monotonic(), r.json()["transfer"]))

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(1.0)  # the poll is waiting
    study = transfers[0]["studies"][0]["study_instance_uid"]
    with one.admin() as admin:
        body = {"sender": "SEG", "receiver": "NTH", "study_instance_uids": [study]}
        r = admin.post("/api/v1/transfers", json=body)
        assert r.status_code == 201, r.text
    queued = time.monotonic()
    poller.join(15)
    [(at, work)] = answered
    assert work is not None and work["id"] == r.json()["id"] and at - queued < 2.0

    # A worker killed while a slow receiver holds its notice: the other sends it.
    receiver.holding.set()
    storescu(seg_port, studies[BURST])
    assert receiver.arrived.wait(60)
    [(holder,)] = wait_until("the notice's worker", lambda: running_notices(one))
    pid = int(holder.split(":")[1])
    [victim] = [w for w in network.workers if w.pid == pid]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    receiver.holding.clear()
    receiver.release.set()
    [last] = [t for t in delivered(two, BURST + 1) if t["id"] not in {x["id"] for x in transfers}]
    wait_until(
        "the notice sent by the other worker", lambda: notices_sent(one, last["id"]) == 1, 60
    )

    def notice_job() -> list[tuple[Any, ...]]:
        return [
            (status, attempts, by)
            for status, attempts, by, payload in hub_query(
                one,
                f"SELECT status, attempts, leased_by, payload FROM jobs WHERE kind = '{NOTICE}'",
            )
            if last["id"] in str(payload)
        ]

    # The send is audited in its own transaction, just before the job is marked done.
    [(status, attempts, by)] = wait_until(
        "the notice's job done", lambda: [j for j in notice_job() if j[0] != "running"]
    )
    assert (status, attempts) == ("done", 2) and by != holder
    assert receiver.posts.count(last["id"]) == 2  # the first cut off with its worker
    # Nothing lost, nothing twice, in RVH's PACS.
    everything = (BURST + 1) * SLICES
    final = wait_until("the last study in RVH's PACS", lambda: in_pacs(received, everything))
    assert set(final) == set().union(*uids) and set(final.values()) == {1}
    assert notices_sent(one, last["id"]) == 1

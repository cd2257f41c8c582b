"""Benchmark: the hub's ingest, on each database and blob store, beside Orthanc's STOW-RS.

The hub is driven as gateways drive it with a study complete in the spool (the gateway's own
HubClient: open a transfer and ask which of the first batch's blobs are missing, upload framed
batches, the last closing the transfer), with newly generated studies, so every byte is new
to the store. Measured in the same run, on the same data:

  - Orthanc STOW-RS:                 one POST /dicom-web/studies per study
  - SQLite + folder, 1 hub
  - PostgreSQL + SeaweedFS, 1 hub    (PostgreSQL with its durable defaults, fsync on)
  - PostgreSQL + SeaweedFS, 2 hubs   (the same database and bucket; the senders split)

Two loads: the 300-slice CT (one sender; with 2 hubs, one CT to each at once), and a burst
of small studies from many simulated gateways at once. Then delivery: a simulated
receiving gateway leases the work, downloads the blobs and reports them delivered. Each
figure is the median of ``--runs``; CPU is what the hub process(es), PostgreSQL and
SeaweedFS spent, per 1,000 instances. Last, the national load from the measured figures.

Usage: python bench/ingest.py [--runs 3] [--slices 300] [--burst-gateways 8]
                              [--burst-studies 5] [--skip-orthanc] [--skip-postgresql]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway PostgreSQL and SeaweedFS servers

from dicomweb import start_orthanc  # noqa: E402
from exchange import cpu_seconds  # noqa: E402
from imagebridge.demo.network import Network, stop_process  # noqa: E402
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study  # noqa: E402
from imagebridge.gateway import delivery  # noqa: E402
from imagebridge.gateway.hubclient import HubClient  # noqa: E402
from imagebridge.settings import GatewaySettings  # noqa: E402
from pg import DEPLOYED_SERVER_OPTIONS, PostgresServer, postgres_binaries  # noqa: E402
from seaweed import SeaweedServer, weed_path  # noqa: E402

BATCH_INSTANCES = GatewaySettings.model_fields["upload_batch_instances"].default
BATCH_BYTES = GatewaySettings.model_fields["upload_batch_bytes"].default
RECEIVER = "RCV"
DELIVERY_BATCH, DELIVERY_BYTES = delivery.BATCH, delivery.BATCH_BYTES  # as gateways lease
# The national load, as the issue states it; the rest are stated assumptions, printed.
STUDIES_PER_YEAR = 12_000_000
INSTITUTIONS = 400


# -- the systems under test ------------------------------------------------------------------


@dataclass
class Hubs:
    """One or two hub processes sharing a database and a blob store."""

    name: str
    nets: list[Network]
    extra_pids: list[int] = field(default_factory=list)  # PostgreSQL, SeaweedFS
    tokens: dict[str, str] = field(default_factory=dict)  # gateway code -> token

    def pids(self) -> list[int]:
        return self.hub_pids() + self.extra_pids

    def hub_pids(self) -> list[int]:
        return [n.hub_process.pid for n in self.nets if n.hub_process]

    def client(self, code: str, hub: int = 0) -> HubClient:
        return HubClient(self.nets[hub % len(self.nets)].hub_url, self.tokens[code])

    def gateway(self, code: str) -> None:
        """An institution with an agreement in force and a gateway token."""
        if code not in self.tokens:
            self.nets[0].add_institution(code, f"Hospital {code}")
            self.tokens[code] = self.nets[0].issue_token(code)


@contextmanager
def sqlite_hub(root: Path) -> Iterator[Hubs]:
    net = Network(root / "sqlite")
    try:
        net.start_hub()
        hubs = Hubs("SQLite + folder, 1 hub", [net])
        hubs.gateway(RECEIVER)
        yield hubs
    finally:
        net.stop()


@contextmanager
def postgres_hubs(root: Path, count: int) -> Iterator[Hubs]:
    # The product's durable settings: commits wait for the disk (the tests' server does not).
    server = PostgresServer(
        *postgres_binaries(), options={**DEPLOYED_SERVER_OPTIONS, "max_connections": "200"}
    )
    weed = SeaweedServer(weed_path())
    nets: list[Network] = []
    try:
        server.start()
        weed.start()
        url = server.create()
        bucket = weed.create_bucket()
        settings: dict[str, Any] = {
            "database_url": url,
            "blob_store": weed.blob_store(bucket),
        }
        for n in range(count):
            net = Network(root / f"pg-hub-{n}")
            net.database_url = url
            net.env = {"IMAGEBRIDGE_HUB_BLOB_STORE__SECRET_ACCESS_KEY": weed.secret_key}
            if nets:  # one network: one key for the secrets its hubs keep
                net.env["IMAGEBRIDGE_HUB_SECRET_KEY"] = nets[0].secret_key()
            net.start_hub(**settings)
            nets.append(net)
        assert server.process is not None and weed.process is not None
        plural = "s" if count > 1 else ""
        hubs = Hubs(
            f"PostgreSQL + SeaweedFS, {count} hub{plural}",
            nets,
            [server.process.pid, weed.process.pid],
        )
        # The admin token of the first hub is the network's; the second shares its database.
        for net in nets[1:]:
            net.admin_token = nets[0].admin_token
        hubs.gateway(RECEIVER)
        yield hubs
    finally:
        for net in reversed(nets):
            net.database_url = ""  # the server and its databases go with it
            net.stop()
        weed.stop()
        server.stop()


# -- the loads -------------------------------------------------------------------------------


@dataclass
class Measure:
    seconds: float
    instances: int
    nbytes: int
    cpu: float  # seconds, hub(s) and their servers
    hub_cpu: float

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with suppress(FileNotFoundError):
            total += cpu_seconds(pid)
    return total


def settle(pids: list[int], quiet: float = 0.05, longest: float = 30.0) -> None:
    """Wait until the processes are idle: their jobs after an answer count as ingest."""
    deadline = time.monotonic() + longest
    before = cpu_of(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_of(pids)
        if now - before < quiet:
            return
        before = now


_DIGESTS: dict[Path, str] = {}


def digests(study: StudyFiles) -> list[str]:
    """The SHA-256 of each file, as the gateway's spool names it (before the clock runs)."""
    for path in study.paths:
        if path not in _DIGESTS:
            _DIGESTS[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return [_DIGESTS[path] for path in study.paths]


def send_study(client: HubClient, study: StudyFiles) -> None:
    """As the gateway's uploader does with a study complete in its spool: open with the first
    batch's digests (the answer says which blobs the hub lacks), upload the missing bytes in
    batches, the last of which closes the transfer."""
    batches: list[list[tuple[str, Path]]] = [[]]
    size = 0
    for path, sha in zip(study.paths, digests(study), strict=True):
        if len(batches[-1]) >= BATCH_INSTANCES or size >= BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append((sha, path))
        size += path.stat().st_size
    made = client.create_transfer(
        receiver=RECEIVER,
        priority="routine",
        origin="dicom",
        calling_ae_title="BENCH",
        idempotency_key=uuid.uuid4().hex,
        reason="benchmark",
        sha256=[sha for sha, _ in batches[0]],
    )
    missing: set[str] | None = set(made["missing"])
    declared = {"instances_declared": len(study.paths), "declared_by": "gateway"}
    for n, batch in enumerate(batches, 1):
        if missing is None:
            missing = client.missing([sha for sha, _ in batch])
        result = client.upload(
            made["id"],
            [(sha, path if sha in missing else None) for sha, path in batch],
            close=n == len(batches),  # the study is complete: the last batch closes it
            declared=declared,
        )
        if result["refused"]:
            raise RuntimeError(f"the hub refused {result['refused'][:1]}")
        missing = None


def measured(hubs: Hubs, work: Callable[[], tuple[int, int]]) -> Measure:
    settle(hubs.pids())
    cpu0, hub0 = cpu_of(hubs.pids()), cpu_of(hubs.hub_pids())
    started = time.perf_counter()
    instances, nbytes = work()
    seconds = time.perf_counter() - started
    settle(hubs.pids())
    return Measure(
        seconds, instances, nbytes, cpu_of(hubs.pids()) - cpu0, cpu_of(hubs.hub_pids()) - hub0
    )


def ingest(hubs: Hubs, prefix: str, per_gateway: list[list[StudyFiles]]) -> Measure:
    """Gateways at once, each sending its studies one after another; the gateways spread
    over the hub processes as a load balancer would."""
    codes = [f"{prefix}{n:02d}" for n in range(len(per_gateway))]
    for code in codes:
        hubs.gateway(code)
    clients = [hubs.client(code, hub=n) for n, code in enumerate(codes)]
    every = [s for studies in per_gateway for s in studies]
    for study in every:
        digests(study)

    def one_gateway(client: HubClient, studies: list[StudyFiles]) -> None:
        for study in studies:
            send_study(client, study)

    def work() -> tuple[int, int]:
        with ThreadPoolExecutor(len(per_gateway)) as pool:
            list(pool.map(one_gateway, clients, per_gateway))
        return sum(len(s.paths) for s in every), sum(s.total_bytes for s in every)

    try:
        return measured(hubs, work)
    finally:
        for c in clients:
            c.close()


def deliver_all(hubs: Hubs, folder: Path) -> Measure:
    """The receiving gateway (one per hub process, at once): lease work, download the
    blobs, report them delivered, until nothing is left."""
    totals = {"instances": 0, "bytes": 0}
    lock = threading.Lock()

    def receiver(hub: int) -> None:
        client = hubs.client(RECEIVER, hub=hub)
        cache = folder / f"cache-{hub}"
        cache.mkdir(parents=True, exist_ok=True)
        try:
            while True:
                work = client.work(DELIVERY_BATCH, 0, DELIVERY_BYTES)
                if work["transfer"] is None:
                    return
                digests = sorted({i["sha256"] for i in work["instances"]})
                paths = client.download(digests, cache)
                size = sum(p.stat().st_size for p in paths.values())
                client.deliveries(
                    work["transfer"]["id"],
                    [
                        {"id": i["id"], "outcome": "delivered", "detail": ""}
                        for i in work["instances"]
                    ],
                    [
                        {
                            "id": r["id"],
                            "outcome": "delivered",
                            "detail": "",
                            "sop_instance_uid": "",
                        }
                        for r in work["reports"]
                    ],
                )
                for p in paths.values():
                    p.unlink()
                with lock:
                    totals["instances"] += len(work["instances"])
                    totals["bytes"] += size
        finally:
            client.close()

    def work() -> tuple[int, int]:
        with ThreadPoolExecutor(len(hubs.nets)) as pool:
            list(pool.map(receiver, range(len(hubs.nets))))
        return totals["instances"], totals["bytes"]

    return measured(hubs, work)


# -- Orthanc ---------------------------------------------------------------------------------


def stow_body(study: StudyFiles, boundary: str) -> Iterator[bytes]:
    for path in study.paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield path.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def stow(port: int, study: StudyFiles) -> None:
    boundary = uuid.uuid4().hex
    response = httpx.post(
        f"http://127.0.0.1:{port}/dicom-web/studies",
        content=stow_body(study, boundary),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=600,
    )
    response.raise_for_status()


def orthanc_measure(pid: int, port: int, per_sender: list[list[StudyFiles]]) -> Measure:
    def one_sender(studies: list[StudyFiles]) -> None:
        for study in studies:
            stow(port, study)

    settle([pid])
    cpu0 = cpu_of([pid])
    started = time.perf_counter()
    with ThreadPoolExecutor(len(per_sender)) as pool:
        list(pool.map(one_sender, per_sender))
    seconds = time.perf_counter() - started
    settle([pid])
    every = [s for studies in per_sender for s in studies]
    cpu = cpu_of([pid]) - cpu0
    return Measure(
        seconds, sum(len(s.paths) for s in every), sum(s.total_bytes for s in every), cpu, cpu
    )


# -- the run ---------------------------------------------------------------------------------


class Studies:
    """Newly generated studies (new UIDs, so new bytes) for each run."""

    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        self.folder = folder
        self.args = args
        self.made = 0

    def ct(self) -> StudyFiles:
        self.made += 1
        return generate_ct_study(
            self.folder / f"ct-{self.made}",
            slices=self.args.slices,
            patient_id=f"CT{self.made:06d}",
            nhs_number=None,
            accession_number=f"BCT{self.made:05d}",
            seed=1,
        )

    def small(self, gateway: int) -> StudyFiles:
        """A small study: a few 256x256 slices (a plain film series or a short MR)."""
        self.made += 1
        return generate_ct_study(
            self.folder / f"small-{self.made}",
            slices=self.args.burst_slices,
            rows=256,
            columns=256,
            patient_id=f"P{gateway:02d}{self.made:06d}",
            nhs_number=None,
            accession_number=f"BSM{self.made:05d}",
            seed=2,
        )

    def burst(self) -> list[list[StudyFiles]]:
        return [
            [self.small(g) for _ in range(self.args.burst_studies)]
            for g in range(self.args.burst_gateways)
        ]

    def drop(self, studies: list[StudyFiles]) -> None:
        for s in studies:
            shutil.rmtree(s.paths[0].parent, ignore_errors=True)


@dataclass
class Results:
    ct: dict[str, list[Measure]] = field(default_factory=dict)
    burst: dict[str, list[Measure]] = field(default_factory=dict)
    delivery: dict[str, list[Measure]] = field(default_factory=dict)

    def add(self, table: dict[str, list[Measure]], name: str, m: Measure) -> None:
        table.setdefault(name, []).append(m)


def median(measures: list[Measure], value: Callable[[Measure], float]) -> float:
    return statistics.median(value(m) for m in measures)


def print_table(title: str, table: dict[str, list[Measure]], baseline: str | None) -> None:
    print(f"\n{title} (median of {max(len(v) for v in table.values())} runs)")
    print(
        f"  {'':34} {'seconds':>8} {'inst/s':>8} {'MB/s':>7} {'x Orthanc':>9} "
        f"{'CPU s/1000 (hub)':>17}"
    )
    base = median(table[baseline], lambda m: m.rate) if baseline in table else None
    for name, measures in table.items():
        rate = median(measures, lambda m: m.rate)
        ratio = f"{rate / base:9.2f}" if base else f"{'':>9}"
        per_k = median(measures, lambda m: m.cpu / m.instances * 1000)
        hub_k = median(measures, lambda m: m.hub_cpu / m.instances * 1000)
        print(
            f"  {name:34} {median(measures, lambda m: m.seconds):8.2f} {rate:8.0f} "
            f"{median(measures, lambda m: m.mb_s):7.1f} {ratio} {per_k:8.2f} ({hub_k:5.2f})"
        )


def national(results: Results, args: argparse.Namespace) -> None:
    """How many hub processes and workers the national load needs, from what was measured."""
    name = "PostgreSQL + SeaweedFS, 1 hub"
    if name not in results.burst:
        name = "SQLite + folder, 1 hub"
    per_day = STUDIES_PER_YEAR / 365
    peak_hour = per_day * args.peak_hour_share
    instances_per_s = peak_hour * args.instances_per_study / 3600
    mb_per_s = instances_per_s * args.mb_per_instance
    ingest = median(results.burst[name], lambda m: m.rate)
    ingest_ct_mb = median(results.ct[name], lambda m: m.mb_s)
    deliver = median(results.delivery[name], lambda m: m.rate)
    # Each instance is received once and delivered once (more for a study sent to several).
    ingest_share = instances_per_s / ingest + mb_per_s / ingest_ct_mb
    need_ingest = instances_per_s / (0.5 * ingest)
    need_bytes = mb_per_s / (0.5 * ingest_ct_mb)
    need_delivery = instances_per_s / (0.5 * deliver)
    hubs = max(2, math.ceil(max(need_ingest, need_bytes) + need_delivery))
    workers = max(2, math.ceil(hubs / 2))
    print(f"\nNational load ({INSTITUTIONS} institutions), from the figures of '{name}'")
    print(f"  studies a year                 {STUDIES_PER_YEAR:,}")
    print(
        f"  studies in the peak hour       {peak_hour:,.0f}  "
        f"({args.peak_hour_share:.0%} of a day's {per_day:,.0f})"
    )
    print(
        f"  instances/s at peak            {instances_per_s:,.0f}  "
        f"({args.instances_per_study} per study on average), {mb_per_s:,.0f} MB/s"
    )
    print(
        f"  urgent share                   {args.urgent_share:.0%} "
        "(urgent goes first; the capacity is the same)"
    )
    print(f"  one hub process: ingest        {ingest:,.0f} inst/s, {ingest_ct_mb:,.0f} MB/s")
    print(f"  one hub process: delivery      {deliver:,.0f} inst/s")
    print(f"  load on one process at peak    {ingest_share:.1f}x its ingest capacity")
    print(
        f"  hub processes needed           {hubs} (at 50% of measured capacity, "
        "2 at least for availability)"
    )
    print(f"  workers needed                 {workers} (jobs are light beside ingest; 2 at least)")
    print(f"  PostgreSQL connections         {hubs * 31 + workers * 6} (31 a hub, 6 a worker)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--burst-gateways", type=int, default=8)
    parser.add_argument("--burst-studies", type=int, default=5, help="studies per gateway")
    parser.add_argument("--burst-slices", type=int, default=4, help="instances per study")
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument("--skip-postgresql", action="store_true")
    # The national load's assumptions, printed with the answer.
    parser.add_argument("--instances-per-study", type=int, default=250)
    parser.add_argument("--mb-per-instance", type=float, default=0.5)
    parser.add_argument("--peak-hour-share", type=float, default=0.12)
    parser.add_argument("--urgent-share", type=float, default=0.15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ib-bench-ingest-"))
    studies = Studies(work / "studies", args)
    results = Results()
    # Each run starts every system afresh, in a folder of its own.
    setups: list[Callable[[Path], Any]] = [sqlite_hub]
    if not args.skip_postgresql:
        setups += [lambda root: postgres_hubs(root, 1), lambda root: postgres_hubs(root, 2)]
    orthanc = None
    try:
        if not args.skip_orthanc:
            orthanc = start_orthanc(work / "orthanc")
        for run in range(1, args.runs + 1):
            cts = [studies.ct(), studies.ct()]
            burst = studies.burst()
            print(
                f"run {run}: {cts[0].total_bytes / 1e6:.0f} MB CT, {len(burst)} gateways",
                flush=True,
            )
            if orthanc is not None:
                process, port = orthanc
                results.add(
                    results.ct, "Orthanc STOW-RS", orthanc_measure(process.pid, port, [[cts[0]]])
                )
                results.add(
                    results.burst, "Orthanc STOW-RS", orthanc_measure(process.pid, port, burst)
                )
            for n, setup in enumerate(setups):
                with setup(work / f"run-{run}-{n}") as hubs:
                    # The CT: one per hub process, each from its own gateway, at once.
                    ct = ingest(hubs, "CT", [[study] for study in cts[: len(hubs.nets)]])
                    results.add(results.ct, hubs.name, ct)
                    results.add(results.burst, hubs.name, ingest(hubs, "GW", burst))
                    results.add(results.delivery, hubs.name, deliver_all(hubs, work / "recv"))
                    print(f"  {hubs.name}: CT {ct.seconds:.2f} s", flush=True)
            studies.drop(cts + [s for g in burst for s in g])
    finally:
        if orthanc is not None:
            stop_process(orthanc[0])
        shutil.rmtree(work, ignore_errors=True)
    cpus = os.cpu_count()
    print(
        f"\nMachine: {cpus} cores. CPU columns: hub(s) with PostgreSQL and SeaweedFS (hub alone)."
    )
    baseline = "Orthanc STOW-RS" if not args.skip_orthanc else None
    print_table(
        f"Ingest: {args.slices}-slice CT (2 hubs: one CT each, at once)", results.ct, baseline
    )
    print_table(
        f"Ingest: burst of {args.burst_gateways} gateways x {args.burst_studies} studies "
        f"x {args.burst_slices} instances",
        results.burst,
        baseline,
    )
    print_table("Delivery to gateways (lease, download, confirm)", results.delivery, None)
    national(results, args)


if __name__ == "__main__":
    main()

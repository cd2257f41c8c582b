"""Benchmark: load on one gateway and one hub, with their memory watched.

(a) DICOM: concurrent associations into one gateway, each a study of its own sent by a DCMTK
    storescu process (TCP_NODELAY=1), or by our own C-STORE requestor in threads (`--scu ul`,
    which also times each C-STORE). Then every instance must reach the hub.
(b) HTTP: concurrent clients on the hub, each with its own connection and an API token of a
    radiologist, in a mix: QIDO-RS /dicomweb/studies searches, WADO-RS retrieves of an
    instance, and the JSON API's GET /api/v1/transfers.

Prints the latency of each kind (median, p95, p99), the throughput, every failure, and the
peak memory (VmHWM) of the hub and the gateway.

Usage: python bench/load.py [--associations 20] [--instances 100] [--clients 100]
       [--requests 20] [--rows 128] [--scu dcmtk|ul]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from exchange import cpu_seconds, peak_rss_mb
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.dicom.part10 import read_meta
from imagebridge.dicom.ul import Association

STORESCU = "/usr/bin/storescu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CALLING = "PACS_SEG"
ROUTE = "IB_RVH"
SCOPES = ["view_studies", "query_network", "download", "track_transfers"]
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# The mix of the HTTP clients' requests: kind -> weight.
MIX = {"QIDO-RS": 4, "WADO-RS": 3, "API": 3}


@dataclass
class Figures:
    """What a run measured."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per instance or request

    def add(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def make_studies(folder: Path, count: int, instances: int, rows: int) -> list[StudyFiles]:
    return [
        generate_ct_study(
            folder / f"study{n:03d}",
            slices=instances,
            rows=rows,
            columns=rows,
            patient_id=f"LOAD{n:04d}",
            patient_name=f"LOAD^PATIENT{n}",
            nhs_number=None,
            accession_number=f"LOAD{n:04d}",
            seed=n,
        )
        for n in range(count)
    ]


# -- (a) DICOM ---------------------------------------------------------------------------------


def send_dcmtk(port: int, study: StudyFiles, figures: Figures, lock: threading.Lock) -> None:
    """One association of storescu; its duration (a C-STORE each is not visible from here)."""
    started = time.perf_counter()
    result = subprocess.run(
        [STORESCU, "-aet", CALLING, "-aec", ROUTE, "127.0.0.1", str(port)]
        + [str(p) for p in study.paths],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    with lock:
        figures.add("association", elapsed)
        # storescu reports a refused C-STORE on stderr ("E: Store SCU Failed") yet exits 0.
        if result.returncode != 0 or "E:" in result.stderr:
            figures.failures.append(f"storescu: {result.stderr.strip()[:300]}")


def send_ul(port: int, study: StudyFiles, figures: Figures, lock: threading.Lock) -> None:
    """One association of our own requestor, each C-STORE timed."""
    started = time.perf_counter()
    times: list[float] = []
    failures: list[str] = []
    try:
        files = []
        for path in study.paths:
            data = path.read_bytes()
            meta = read_meta(io.BytesIO(data))
            files.append((meta, data[meta.dataset_offset :]))
        syntax = files[0][0].transfer_syntax_uid
        sop_class = str(files[0][0].sop_class_uid)
        assoc = Association.open("127.0.0.1", port, ROUTE, CALLING, [(sop_class, [syntax])])
        context = assoc.context_for(sop_class, syntax)
        assert context is not None
        for meta, dataset in files:
            t0 = time.perf_counter()
            response = assoc.c_store(context, sop_class, meta.sop_instance_uid, [dataset])
            times.append(time.perf_counter() - t0)
            if response.status != 0:
                failures.append(f"C-STORE 0x{response.status:04X}: {response.error_comment}")
        assoc.release()
    except Exception as exc:  # a failed association is a figure to report, not a crash
        failures.append(f"association: {exc}")
    with lock:
        figures.latencies.setdefault("C-STORE", []).extend(times)
        figures.add("association", time.perf_counter() - started)
        figures.failures += failures


def dicom_load(net: Network, studies: list[StudyFiles], scu: str, figures: Figures) -> None:
    port = net.gateways["SEG"].port
    send: Callable[[int, StudyFiles, Figures, threading.Lock], None]
    send = send_dcmtk if scu == "dcmtk" else send_ul
    lock = threading.Lock()
    threads = [threading.Thread(target=send, args=(port, s, figures, lock)) for s in studies]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    figures.seconds["DICOM in"] = time.perf_counter() - started
    figures.counts["instances"] = sum(len(s.paths) for s in studies)


def wait_until_indexed(net: Network, expected: int, figures: Figures, timeout: float) -> None:
    """Every acknowledged instance reaches the hub: the transfers' counts add up."""
    started = time.perf_counter()
    held = 0
    with net.admin() as admin:
        while time.perf_counter() - started < timeout:
            transfers = admin.get("/api/v1/transfers", params={"limit": 1000}).json()
            held = sum(t["instances_total"] for t in transfers)
            if held >= expected:
                break
            time.sleep(0.25)
    figures.seconds["at the hub"] = figures.seconds["DICOM in"] + time.perf_counter() - started
    if held != expected:
        figures.failures.append(f"the hub holds {held} of {expected} instances")


# -- (b) HTTP ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """What the HTTP clients ask for: patients to search, instances to retrieve."""

    patients: list[str]
    instances: list[str]  # /dicomweb/studies/.../instances/... paths


def targets_of(studies: list[StudyFiles], net: Network, token: str) -> Targets:
    with httpx.Client(base_url=net.hub_url, timeout=60) as c:
        r = c.get(
            "/dicomweb/instances",
            params={"limit": 1000},
            headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"},
        )
        r.raise_for_status()
        paths = [
            f"/dicomweb/studies/{i['0020000D']['Value'][0]}/series/{i['0020000E']['Value'][0]}"
            f"/instances/{i['00080018']['Value'][0]}"
            for i in r.json()
        ]
    return Targets([f"LOAD{n:04d}" for n in range(len(studies))], paths)


async def http_client(
    n: int, net: Network, token: str, targets: Targets, requests: int, figures: Figures
) -> None:
    rng = random.Random(n)
    headers = {"Authorization": f"Bearer {token}"}
    kinds = [k for k, weight in MIX.items() for _ in range(weight)]
    async with httpx.AsyncClient(base_url=net.hub_url, headers=headers, timeout=120) as c:
        for _ in range(requests):
            kind = rng.choice(kinds)
            if kind == "QIDO-RS":
                call = c.get(
                    "/dicomweb/studies",
                    params={"PatientID": rng.choice(targets.patients)},
                    headers={"Accept": "application/dicom+json"},
                )
            elif kind == "WADO-RS":
                call = c.get(rng.choice(targets.instances), headers={"Accept": WADO_ACCEPT})
            else:
                call = c.get("/api/v1/transfers", params={"box": "outbox", "limit": 50})
            started = time.perf_counter()
            try:
                r = await call
                await r.aread()
                ok = r.status_code == 200 and r.content
                detail = f"{r.status_code} {r.text[:120]}" if not ok else ""
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            figures.add(kind, time.perf_counter() - started)
            if not ok:
                figures.failures.append(f"{kind}: {detail}")


def http_load(
    net: Network, token: str, targets: Targets, clients: int, requests: int, figures: Figures
) -> None:
    async def everyone() -> None:
        await asyncio.gather(
            *(http_client(n, net, token, targets, requests, figures) for n in range(clients))
        )

    started = time.perf_counter()
    asyncio.run(everyone())
    figures.seconds["HTTP"] = time.perf_counter() - started
    figures.counts["requests"] = clients * requests


# -- the run -----------------------------------------------------------------------------------


def run(
    root: Path,
    *,
    associations: int = 20,
    instances: int = 100,
    clients: int = 100,
    requests: int = 20,
    rows: int = 128,
    scu: str = "dcmtk",
) -> Figures:
    figures = Figures()
    studies = make_studies(root / "studies", associations, instances, rows)
    net = Network(root / "net")
    try:
        net.start_hub()
        net.add_institution("SEG", "St Elsewhere General Hospital")
        net.add_institution("RVH", "Riverside Hospital")
        net.start_gateway(
            "SEG", calling_aes=[{"ae_title": CALLING, "host": "127.0.0.1"}], study_stable_seconds=2
        )
        token = net.user_token("SEG", "radiologist", ["radiologist"], SCOPES)
        assert net.hub_process is not None
        hub, gateway = net.hub_process.pid, net.gateways["SEG"].process.pid
        cpu = {"gateway": cpu_seconds(gateway), "hub": cpu_seconds(hub)}
        dicom_load(net, studies, scu, figures)
        wait_until_indexed(net, figures.counts["instances"], figures, timeout=600)
        n = figures.counts["instances"]
        figures.cpu_ms["gateway per instance"] = (cpu_seconds(gateway) - cpu["gateway"]) / n
        figures.cpu_ms["hub per instance"] = (cpu_seconds(hub) - cpu["hub"]) / n
        figures.peak_rss_mb["gateway"] = peak_rss_mb(gateway)
        figures.peak_rss_mb["hub after DICOM"] = peak_rss_mb(hub)
        targets = targets_of(studies, net, token)
        cpu = {"hub": cpu_seconds(hub), "clients": time.process_time()}
        http_load(net, token, targets, clients, requests, figures)
        n = figures.counts["requests"]
        figures.cpu_ms["hub per request"] = (cpu_seconds(hub) - cpu["hub"]) / n
        # The clients share the machine's cores with the hub: what they cost is said too.
        figures.cpu_ms["clients per request"] = (time.process_time() - cpu["clients"]) / n
        figures.peak_rss_mb["hub after HTTP"] = peak_rss_mb(hub)
    finally:
        net.stop()
    return figures


def report(figures: Figures, args: argparse.Namespace) -> str:
    lines = [
        f"load: {args.associations} associations x {args.instances} instances "
        f"({args.rows}x{args.rows} CT, {args.scu}) into one gateway; "
        f"{args.clients} HTTP clients x {args.requests} requests on the hub",
        f"{'kind':<14}{'count':>8}{'median':>11}{'p95':>11}{'p99':>11}",
    ]
    for kind, values in figures.latencies.items():
        cells = [statistics.median(values), percentile(values, 95), percentile(values, 99)]
        lines.append(f"{kind:<14}{len(values):>8}" + "".join(f"{v * 1000:>8.1f} ms" for v in cells))
    dicom_in, at_hub = figures.seconds["DICOM in"], figures.seconds["at the hub"]
    n = figures.counts["instances"]
    lines.append(
        f"throughput    DICOM {n / dicom_in:.0f} instances/s acknowledged ({dicom_in:.1f} s), "
        f"{n / at_hub:.0f} instances/s at the hub ({at_hub:.1f} s)"
    )
    lines.append(
        f"throughput    HTTP {figures.counts['requests'] / figures.seconds['HTTP']:.0f} "
        f"requests/s ({figures.seconds['HTTP']:.1f} s)"
    )
    lines.append(
        "peak memory   " + ", ".join(f"{k} {v:.0f} MB" for k, v in figures.peak_rss_mb.items())
    )
    lines.append(
        "CPU           " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in figures.cpu_ms.items())
    )
    lines.append(f"failures      {len(figures.failures)}")
    lines += [f"  {f}" for f in figures.failures[:20]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=20, help="per HTTP client")
    parser.add_argument("--rows", type=int, default=128, help="rows and columns of each slice")
    parser.add_argument("--scu", choices=["dcmtk", "ul"], default="dcmtk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ib-load-") as folder:
        figures = run(
            Path(folder),
            associations=args.associations,
            instances=args.instances,
            clients=args.clients,
            requests=args.requests,
            rows=args.rows,
            scu=args.scu,
        )
    print(report(figures, args))
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())

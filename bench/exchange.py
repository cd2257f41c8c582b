"""Benchmark: a CT from DCMTK storescu through gateway A -> hub -> gateway B into storescp.

Prints, measured in the same run on this machine, beside the peers:
  - DCMTK direct:  storescu -> storescp
  - Orthanc relay: storescu -> Orthanc -> storescp (REST /modalities/<storescp>/store)
  - ImageBridge:   storescu -> gateway A -> hub -> gateway B -> storescp
with medians over repeated runs, the ratios, the CPU time each of our processes spends
on a send, and their peak memory (VmHWM). `--slices 4000` makes a ~2 GB study for the
memory check.

Each ImageBridge run sends a newly generated study: the hub stores content once, so sending
the same files again would only send references and measure far less than a real send.

Usage: python bench/exchange.py [--slices 300] [--runs 3] [--skip-orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from imagebridge.demo.network import Network, free_port, stop_process, wait_for_port
from imagebridge.demo.synthetic import generate_ct_study

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"


def start_storescp(folder: Path, ae: str = "STORESCP") -> tuple[subprocess.Popen[bytes], int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "-aet", ae, "-od", str(folder), "+B", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, None)
    return proc, port


def storescu(files: list[Path], port: int, called: str, calling: str = "PACS_A") -> None:
    subprocess.run(
        [STORESCU, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def wait_files(folder: Path, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for _ in folder.iterdir()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(1 for _ in folder.iterdir())} of {count} arrived")
        time.sleep(0.005)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_direct(files: list[Path], work: Path) -> float:
    out = work / "direct"
    proc, port = start_storescp(out)
    try:
        t0 = time.perf_counter()
        storescu(files, port, "STORESCP")
        wait_files(out, len(files))
        return time.perf_counter() - t0
    finally:
        stop_process(proc)
        shutil.rmtree(out, ignore_errors=True)


def run_orthanc(files: list[Path], work: Path) -> float:
    out = work / "orthanc-out"
    scp, scp_port = start_storescp(out)
    folder = work / "orthanc"
    folder.mkdir()
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "DicomModalities": {"storescp": ["STORESCP", "127.0.0.1", scp_port]},
        "Plugins": [],
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    # Orthanc is built on DCMTK: it needs TCP_NODELAY as much as the DCMTK tools do.
    orthanc = subprocess.Popen(
        [ORTHANC, str(folder / "orthanc.json")],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(http_port, orthanc)
        wait_for_port(dicom_port, orthanc)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as rest:
            t0 = time.perf_counter()
            storescu(files, dicom_port, "ORTHANC")
            studies = rest.get("/studies").json()
            rest.post(
                "/modalities/storescp/store",
                json={"Resources": studies, "Synchronous": True},
            ).raise_for_status()
            wait_files(out, len(files))
            return time.perf_counter() - t0
    finally:
        stop_process(orthanc)
        stop_process(scp)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


class ImageBridge:
    """One network kept up across runs, as in production; each run is a new study send."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.out = work / "ib-out"
        self.scp, scp_port = start_storescp(self.out)
        self.net = Network(work / "net")
        self.net.start_hub()
        self.net.add_institution("SEG", "Sender")
        self.net.add_institution("RVH", "Receiver")
        self.gw_a = self.net.start_gateway(
            "SEG", calling_aes=[{"ae_title": "PACS_A", "host": "127.0.0.1"}]
        )
        self.net.start_gateway(
            "RVH",
            calling_aes=[{"ae_title": "PACS_B"}],
            pacs=[{"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port}],
        )
        self.cpu: list[dict[str, float]] = []  # CPU seconds of each process, per run

    def run(self, slices: int) -> float:
        """Send a new study (new UIDs, so new bytes); its generation is not timed."""
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        folder = self.work / "ib-study"
        shutil.rmtree(folder, ignore_errors=True)
        files = generate_ct_study(folder, slices=slices).paths
        before = {name: cpu_seconds(pid) for name, pid in self.pids().items()}
        t0 = time.perf_counter()
        storescu(files, self.gw_a.port, "IB_RVH")
        self.sent_at = time.perf_counter() - t0
        wait_files(self.out, len(files))
        elapsed = time.perf_counter() - t0
        self.cpu.append(
            {name: cpu_seconds(pid) - before[name] for name, pid in self.pids().items()}
        )
        shutil.rmtree(folder, ignore_errors=True)
        return elapsed

    def pids(self) -> dict[str, int]:
        assert self.net.hub_process is not None
        pids = {"hub": self.net.hub_process.pid}
        for code, gw in self.net.gateways.items():
            pids[f"gateway {code}"] = gw.process.pid
        return pids

    def cpu_medians(self) -> dict[str, float]:
        return {name: statistics.median(run[name] for run in self.cpu) for name in self.cpu[0]}

    def peaks(self) -> dict[str, float]:
        return {name: peak_rss_mb(pid) for name, pid in self.pids().items()}

    def close(self) -> None:
        self.net.stop()
        stop_process(self.scp)


def median_of(runs: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    times = [fn() for _ in range(runs)]
    return statistics.median(times), times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    for tool in (STORESCU, STORESCP) + (() if args.skip_orthanc else (ORTHANC,)):
        if not Path(tool).exists():
            print(f"missing {tool}: apt-get install dcmtk orthanc", file=sys.stderr)
            return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ib-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    study = generate_ct_study(work / "study", slices=args.slices)
    files = study.paths
    mb = study.total_bytes / 1e6
    print(f"study: {len(files)} slices 512x512, {mb:.0f} MB; {args.runs} runs each, median")

    direct, d_all = median_of(args.runs, lambda: run_direct(files, work))
    _row("DCMTK direct", "storescu -> storescp", direct, d_all)
    orthanc = None
    if not args.skip_orthanc:
        orthanc, o_all = median_of(args.runs, lambda: run_orthanc(files, work))
        _row("Orthanc relay", "storescu -> Orthanc -> storescp", orthanc, o_all)
    ib = ImageBridge(work)
    try:
        ours, i_all = median_of(args.runs, lambda: ib.run(args.slices))
        peaks = ib.peaks()
        cpu = ib.cpu_medians()
    finally:
        ib.close()
    _row("ImageBridge", "storescu -> gw A -> hub -> gw B -> storescp", ours, i_all)
    print(f"throughput     ImageBridge {mb / ours:6.1f} MB/s, {len(files) / ours:6.1f} instances/s")
    print(f"ratio          ImageBridge / DCMTK direct = {ours / direct:.2f}")
    if orthanc is not None:
        print(f"ratio          ImageBridge / Orthanc relay = {ours / orthanc:.2f} (target <= 1.0)")
    print("cpu per send   " + ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items()))
    print("peak memory    " + ", ".join(f"{k} {v:.0f} MB" for k, v in peaks.items()))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _row(name: str, path: str, median: float, times: list[float]) -> None:
    runs = ", ".join(f"{t:.2f}" for t in times)
    print(f"{name:14} {path:45} {median:6.2f} s  ({runs})")


if __name__ == "__main__":
    sys.exit(main())

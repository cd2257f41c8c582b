"""Load, quickly: 20 concurrent DCMTK associations into one gateway, then 100 concurrent HTTP
clients on the hub (QIDO-RS, WADO-RS and the JSON API, with API tokens). No request fails,
every instance reaches the hub, and the peak memory of both stays bounded. How fast is the
benchmark's business (bench/load.py), not this test's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from conftest import require_tool

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load.py"
# Peak RSS at rest is about 130 MB for the gateway and 150 MB for the hub; a process that
# held what passes through it would grow with the data, far past these.
GATEWAY_PEAK_MB = 300
HUB_PEAK_MB = 400


def bench_load() -> ModuleType:
    sys.path.insert(0, str(BENCH.parent))  # it uses the exchange benchmark's helpers
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_concurrent_associations_and_clients_all_succeed_in_bounded_memory(
    tmp_path: Path,
) -> None:
    load = bench_load()
    require_tool(load.STORESCU)
    figures = load.run(
        tmp_path, associations=20, instances=10, clients=100, requests=3, rows=64, scu="dcmtk"
    )
    assert figures.failures == []
    assert len(figures.latencies["association"]) == 20
    assert figures.counts["instances"] == 200
    assert sum(len(figures.latencies[kind]) for kind in load.MIX) == 300
    assert all(len(figures.latencies[kind]) > 0 for kind in load.MIX)
    assert figures.peak_rss_mb["gateway"] < GATEWAY_PEAK_MB, figures.peak_rss_mb
    assert figures.peak_rss_mb["hub after HTTP"] < HUB_PEAK_MB, figures.peak_rss_mb

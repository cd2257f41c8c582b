"""The quick variant of the fault-injection suite, as CI runs it: a few seeded trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import fault_network, run_trials

SEED = 20261201


@pytest.mark.timeout(600)
def test_no_instance_is_lost_or_misfiled_when_processes_are_killed(tmp_path: Path) -> None:
    with fault_network(tmp_path / "faults") as network:
        figures = run_trials(network, trials=len(network.targets()), seed=SEED, report=print)
    print(figures.summary())
    assert set(figures.kills) == set(network.targets())  # every process killed at least once
    assert figures.lost == 0
    assert figures.duplicated == 0
    assert figures.misfiled == 0
    assert figures.corrupted == 0
    assert not figures.problems, figures.summary()

"""The quick variant of the fault-injection suite, as CI runs it: a few seeded trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import Figures, fault_network, run_trials

SEED = 20261201


@pytest.mark.timeout(600)
def test_no_instance_is_lost_or_misfiled_when_processes_are_killed(tmp_path: Path) -> None:
    with fault_network(tmp_path / "faults") as network:
        figures = run_trials(network, trials=len(network.targets()), seed=SEED, report=print)
    assert_nothing_lost(figures, network.targets())


@pytest.mark.timeout(600)
def test_sigterm_finishes_or_hands_back_what_each_process_holds(tmp_path: Path) -> None:
    """As an operator stops a process for maintenance: each, sent SIGTERM mid-study, ends
    within the tools' wait, and what it held arrives all the same, once."""
    with fault_network(tmp_path / "faults") as network:
        figures = run_trials(
            network, trials=len(network.targets()), seed=SEED + 1, report=print, how="term"
        )
    assert_nothing_lost(figures, network.targets())


@pytest.mark.timeout(600)
def test_an_upgrade_of_the_hub_while_studies_cross_loses_nothing(tmp_path: Path) -> None:
    """A new version on a running network: the hub stopped mid-study, its database at the
    revision before, the hub started again upgrades it while the gateways wait, and the
    study arrives whole."""
    with fault_network(tmp_path / "faults") as network:
        figures = run_trials(
            network, trials=2, seed=SEED + 2, report=print, how="upgrade", kills_per_trial=(1, 1)
        )
    assert figures.kills["hub"] >= 1
    assert_nothing_lost(figures, [])


def assert_nothing_lost(figures: Figures, killed: list[str]) -> None:
    print(figures.summary())
    assert set(figures.kills) >= set(killed)  # every process stopped at least once
    assert figures.lost == 0
    assert figures.duplicated == 0
    assert figures.misfiled == 0
    assert figures.corrupted == 0
    assert not figures.problems, figures.summary()

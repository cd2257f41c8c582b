"""The budget of a run (cases per property) and its figures (cases run and failures per input
path), printed at the end of a pytest session when this module is loaded as a plugin
(``pytest -p fuzz.figures``, as the fuzz harness does)."""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

CASES_ENV = "IMAGEBRIDGE_FUZZ_CASES"
CASES: Counter[str] = Counter()
FAILED: Counter[str] = Counter()
_PATH_OF_TEST: dict[str, str] = {}

F = TypeVar("F", bound=Callable[..., Any])


def budget(cases: int, share: int = 1) -> settings:
    """Hypothesis settings: ``cases`` examples under pytest, or the harness's number (divided
    by ``share`` where one budget is spread over many targets).

    No deadline (the peers are real processes on a shared machine) and no example database
    (nothing written into the source tree); a failure prints its reproduction either way.
    """
    harness = int(os.environ.get(CASES_ENV) or 0)
    wanted = max(1, harness // share) if harness else cases
    return settings(
        max_examples=wanted,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


def input_path(name: str) -> Callable[[F], F]:
    """Count each case a property test runs under the input path it exercises."""

    def decorate(test: F) -> F:
        @functools.wraps(test)
        def counted(*args: Any, **kwargs: Any) -> Any:
            current = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            _PATH_OF_TEST[current] = name
            CASES[name] += 1
            return test(*args, **kwargs)

        return counted  # type: ignore[return-value]

    return decorate


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.failed:
        FAILED[_PATH_OF_TEST.get(report.nodeid, report.nodeid)] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    write = terminalreporter.write_line
    write("")
    write("hostile input: cases run per input path")
    for name, count in sorted(CASES.items()):
        write(f"  {name:<44} {count:>7} cases   {FAILED.get(name, 0)} failed")
    others = {k: v for k, v in FAILED.items() if k not in CASES}
    for nodeid, count in sorted(others.items()):
        write(f"  {nodeid:<44} {'':>7}         {count} failed")
    write(f"  {'total':<44} {sum(CASES.values()):>7} cases   {sum(FAILED.values())} failed")

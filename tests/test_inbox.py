"""Nudges between hub processes: the payload names the topic, and work keeps the bare
institution id that every hub version reads."""

from __future__ import annotations

import pytest

from imagebridge.hub.inbox import REVOKED, TASKS, WORK, _key, _payload


@pytest.mark.parametrize("key", [(WORK, 7), (TASKS, 7), (WORK, 123456), (REVOKED, 0)])
def test_a_nudge_crosses_as_it_was_sent(key: tuple[str, int]) -> None:
    assert _key(_payload(key)) == key


def test_work_is_a_bare_id() -> None:
    assert _payload((WORK, 42)) == "42"


@pytest.mark.parametrize("payload", ["", "x", "tasks:", "other:3", "tasks:-1", "3.5"])
def test_anything_else_is_ignored(payload: str) -> None:
    assert _key(payload) is None

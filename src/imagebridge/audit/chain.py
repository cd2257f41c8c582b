"""The audit hash chain: each event's hash covers every stored field and the previous hash.

The serialisation is part of the evidence: changing it would make every stored chain look
tampered with, so it is fixed here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The chain's first event links to this.
GENESIS = "0" * 64

# Every stored field of an event except its own hash; a test checks this against the table.
FIELDS = (
    "id",
    "at",
    "actor_type",
    "actor",
    "institution_id",
    "action",
    "outcome",
    "patient_ref",
    "study_ref",
    "transfer_ref",
    "source_address",
    "detail",
    "prev_hash",
)


def canonical(values: Mapping[str, Any]) -> bytes:
    """The bytes hashed for one event: sorted compact JSON, times in UTC to the microsecond."""
    document = {name: _plain(values[name]) for name in FIELDS}
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def event_hash(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(values)).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in an audit event")
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, dict | list | tuple):
        # Hash the value as the JSON column gives it back (tuples become lists, keys strings).
        return json.loads(json.dumps(value, allow_nan=False))
    return value


@dataclass(frozen=True)
class Anchor:
    """An event known from outside the chain to exist, with its hash if known."""

    event_id: int
    hash: str = ""
    source: str = "anchor"

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """`ID` or `ID:HASH`, as printed by `audit verify`."""
        event_id, _, digest = text.partition(":")
        if not event_id.isdigit() or (digest and len(digest) != 64):
            raise ValueError("an anchor is ID or ID:HASH (64 hex digits)")
        return cls(int(event_id), digest.lower())


@dataclass(frozen=True)
class Fault:
    """The first place where the stored trail differs from what was written."""

    event_id: int
    kind: str  # altered | inserted | deleted
    reason: str


@dataclass(frozen=True)
class ChainReport:
    intact: bool
    events: int  # events checked before the fault, or all of them
    head_id: int
    head_hash: str
    fault: Fault | None = None


Row = Mapping[str, Any]


def walk(
    rows: Iterable[Row],
    anchors: Iterable[Anchor] = (),
    find_hash: Callable[[str], int | None] = lambda _digest: None,
) -> ChainReport:
    """Check events in id order against their hashes, their links and the anchors.

    `find_hash` names the event holding a given hash; it is asked only once a link is broken,
    to tell a forged branch from a deletion.
    """
    by_id = {a.event_id: a for a in anchors}
    before: list[Row] = []  # the last two good events, oldest first
    count = 0
    stream = iter(rows)
    row = next(stream, None)
    while row is not None:
        following = next(stream, None)
        fault = _check(before, row, following, find_hash) or _check_anchor(
            by_id.get(row["id"]), row
        )
        if fault is not None:
            return _report(before, count, fault)
        before = [*before[-1:], row]
        count += 1
        row = following
    head_id = before[-1]["id"] if before else 0
    for anchor in sorted(by_id.values(), key=lambda a: a.event_id):
        if anchor.event_id > head_id:
            fault = Fault(
                head_id + 1,
                "deleted",
                f"{_span(head_id + 1, anchor.event_id)}: the {anchor.source} "
                f"holds event {anchor.event_id}, the trail ends at {head_id}",
            )
            return _report(before, count, fault)
    return _report(before, count, None)


def _report(before: list[Row], count: int, fault: Fault | None) -> ChainReport:
    head = before[-1] if before else None
    return ChainReport(
        intact=fault is None,
        events=count,
        head_id=head["id"] if head else 0,
        head_hash=head["hash"] if head else GENESIS,
        fault=fault,
    )


def _check(
    before: list[Row], row: Row, following: Row | None, find_hash: Callable[[str], int | None]
) -> Fault | None:
    prev = before[-1] if before else None
    expected = prev["hash"] if prev else GENESIS
    whole = event_hash(row) == row["hash"]
    linked = row["prev_hash"] == expected
    if whole and linked:
        return None
    event_id = row["id"]
    if prev is not None:
        grand = before[0]["hash"] if len(before) == 2 else GENESIS
        if row["prev_hash"] == grand:
            return Fault(
                prev["id"],
                "inserted",
                f"event {prev['id']} is not part of the chain: event {event_id} "
                "links to the event before it",
            )
    if following is not None and following["prev_hash"] == expected:
        return Fault(
            event_id,
            "inserted",
            f"event {event_id} is not part of the chain: event {following['id']} "
            f"links to {'event ' + str(prev['id']) if prev else 'the start'}",
        )
    if not whole and linked:
        return Fault(event_id, "altered", "its stored fields no longer match its hash")
    if not whole:
        return Fault(
            event_id,
            "inserted",
            "neither its hash nor its link to the event before it fits: the hub did not write it",
        )
    other = find_hash(row["prev_hash"])
    if other is not None:
        return Fault(
            event_id,
            "inserted",
            f"it links to event {other}, which another event already follows",
        )
    first_missing = prev["id"] + 1 if prev else 1
    if event_id > first_missing:
        return Fault(
            first_missing,
            "deleted",
            f"{_span(first_missing, event_id - 1)}: "
            f"event {event_id} links to an event that is not stored",
        )
    if prev is None:
        return Fault(
            event_id, "deleted", "it does not start the chain: the events before it were deleted"
        )
    return Fault(
        prev["id"],
        "altered",
        f"event {event_id} was chained to a different hash: event {prev['id']} was altered "
        "and its hash recomputed (or events were deleted and the later ones renumbered)",
    )


def _check_anchor(anchor: Anchor | None, row: Row) -> Fault | None:
    if anchor is None or not anchor.hash or anchor.hash == row["hash"]:
        return None
    return Fault(
        row["id"], "altered", f"its hash differs from the one the {anchor.source} recorded"
    )


def _span(first: int, last: int) -> str:
    return f"event {first} is missing" if first == last else f"events {first} to {last} are missing"

"""The audit hash chain: each event's hash covers every stored field and the previous hash.

The serialisation is part of the evidence: changing it would make every stored chain look
tampered with, so it is fixed here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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

"""Gateway tokens verified moments ago, remembered briefly by one hub process.

A gateway calls many times a second; remembering a verified token keeps the database out of
the hot path. A revocation makes every process forget them all (hub/inbox.py carries it
across). A lookup that read the database before a revocation and comes back after it must
not put back what it read: each forget starts a new generation, and only a lookup begun in
the current one may remember.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

# How long a verified token is remembered: a revocation whose notice were lost (the channel
# down) takes effect within this time.
TOKEN_CACHE_SECONDS = 5.0


class Verified(NamedTuple):
    name: str  # institution code / gateway name
    institution_id: int
    until: float  # time.monotonic()


class TokenCache:
    def __init__(self) -> None:
        self._entries: dict[str, Verified] = {}
        self._lock = threading.Lock()
        self.generation = 0  # read before a lookup, handed back to `remember`

    def get(self, key: str) -> Verified | None:
        found = self._entries.get(key)
        return found if found is not None and found.until >= time.monotonic() else None

    def remember(self, key: str, name: str, institution_id: int, generation: int) -> Verified:
        verified = Verified(name, institution_id, time.monotonic() + TOKEN_CACHE_SECONDS)
        with self._lock:
            if generation == self.generation:  # no revocation since the lookup began
                self._entries[key] = verified
        return verified

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def forget(self) -> None:
        with self._lock:
            self.generation += 1
            self._entries.clear()

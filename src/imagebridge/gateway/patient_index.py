"""The receiving gateway's MRN lookup: its institution's local ID for an NHS number from the
hub's patient index, then the static ``mrn_map``.

Answers are kept briefly, so that a study of hundreds of instances asks the hub once. While
the hub cannot answer, the static map alone decides, as before the index existed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from imagebridge.gateway.hubclient import HubClient, HubError, HubUnavailable
from imagebridge.gateway.reconcile import LocalPatient

log = logging.getLogger(__name__)
CACHE_SECONDS = 60.0
CACHE_SIZE = 10_000
PREFETCH_BATCH = 1000  # the hub's limit per request


class IndexedMrnLookup:
    """Callable as reconcile's ``mrn_lookup``: NHS number -> local MRN, or None."""

    def __init__(
        self,
        hub: HubClient,
        mrn_map: Mapping[str, str],
        *,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self._map = mrn_map
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def __call__(self, nhs_number: str) -> str | LocalPatient | None:
        answer = self._answer(nhs_number)
        if answer is None:
            return self._map.get(nhs_number)
        if answer.get("patient_id"):
            return LocalPatient(
                str(answer["patient_id"]),
                str(answer.get("issuer") or ""),
                str(answer.get("birth_date") or ""),
                str(answer.get("sex") or ""),
            )
        if answer.get("conflict"):
            # The institution's own records disagree: no MRN, not even the static map's.
            log.warning("patient index: conflicting local identities; delivering a foreign ID")
            return None
        return self._map.get(nhs_number)

    def prefetch(self, nhs_numbers: Iterable[str]) -> None:
        """Ask the hub at once for every number not already known: the matches of one
        query name many patients, and one request beats one each."""
        now = self._clock()
        with self._lock:
            wanted = sorted(
                {n for n in nhs_numbers if (c := self._cache.get(n)) is None or c[0] <= now}
            )
        for start in range(0, len(wanted), PREFETCH_BATCH):
            try:
                answers = self._hub.local_patient_ids(wanted[start : start + PREFETCH_BATCH])
            except (HubUnavailable, HubError) as exc:
                log.warning("patient index not available (%s); asking number by number", exc)
                return
            for number, answer in answers.items():
                self._keep(number, answer, now)

    def learn(self, answers: Mapping[str, dict[str, Any]]) -> None:
        """Keep answers the hub gave with something else (a query's matches)."""
        now = self._clock()
        for number, answer in answers.items():
            self._keep(number, answer, now)

    def _answer(self, nhs_number: str) -> dict[str, Any] | None:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(nhs_number)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            answer = self._hub.local_patient_id(nhs_number)
        except (HubUnavailable, HubError) as exc:
            log.warning("patient index not available (%s); using the static map", exc)
            return None
        self._keep(nhs_number, answer, now)
        return answer

    def _keep(self, nhs_number: str, answer: dict[str, Any], now: float) -> None:
        with self._lock:
            if len(self._cache) >= CACHE_SIZE:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
            self._cache[nhs_number] = (now + self._cache_seconds, answer)

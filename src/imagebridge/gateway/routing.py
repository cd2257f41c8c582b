"""The routing table: a called AE title names a destination institution and a priority."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    ae_title: str
    institution: str
    priority: str
    # Why the hub would refuse this destination now (no agreement in force), or "".
    refusal: str = ""


class RoutingTable:
    """Held by the hub's directory; cached on disk so the gateway routes while the hub is away."""

    def __init__(self, cache_file: Path) -> None:
        self._cache_file = cache_file
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self.institution = ""
        # Why this institution may not exchange now (its agreement), or "".
        self.refusal = ""
        if cache_file.exists():
            self._apply(json.loads(cache_file.read_text()))

    def _apply(self, config: dict[str, Any]) -> None:
        routes = {
            r["ae_title"]: Route(
                r["ae_title"], r["institution"], r["priority"], r.get("refusal", "")
            )
            for r in config["routes"]
        }
        with self._lock:
            self._routes = routes
            self.institution = config["institution"]
            self.refusal = config.get("refusal", "")

    def update(self, config: dict[str, Any]) -> None:
        self._apply(config)
        tmp = self._cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        tmp.replace(self._cache_file)

    def lookup(self, called_ae_title: str) -> Route | None:
        with self._lock:
            return self._routes.get(called_ae_title.strip())

    def __len__(self) -> int:
        with self._lock:
            return len(self._routes)

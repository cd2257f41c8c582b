"""The gateway's audit journal: events written to disk first, forwarded to the hub later.

Events must survive a hub outage and a gateway restart, so each is appended and fsync'd
before the action it records is answered; the forwarder moves a whole file at a time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._current = folder / "journal.jsonl"

    def write(
        self,
        action: str,
        outcome: str = "success",
        *,
        patient_ref: str = "",
        study_ref: str = "",
        source_address: str = "",
        **detail: Any,
    ) -> None:
        event = {
            "at": datetime.now(UTC).isoformat(),
            "action": action,
            "outcome": outcome,
            "patient_ref": patient_ref,
            "study_ref": study_ref,
            "source_address": source_address,
            "detail": detail,
        }
        line = (json.dumps(event, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self._current, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info("audit %s %s", action, outcome)

    def pending_batches(self) -> list[Path]:
        """Seal the current file and list every sealed file, oldest first."""
        with self._lock:
            if self._current.exists() and self._current.stat().st_size:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
                os.replace(self._current, self.folder / f"sealed-{stamp}.jsonl")
        return sorted(self.folder.glob("sealed-*.jsonl"))

    def set_aside(self, path: Path) -> Path:
        """Keep a sealed file the hub refused, for a person to look at, out of the queue."""
        refused = self.folder / "refused"
        refused.mkdir(exist_ok=True)
        target = refused / path.name
        os.replace(path, target)
        return target

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("skipping a damaged journal line in %s", path.name)
        return events

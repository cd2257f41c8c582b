"""Whether a study cut off by an aborted association has arrived in full after all.

The sending PACS is asked for its own count of the study's instances (C-FIND at STUDY
level, NumberOfStudyRelatedInstances) when the gateway can query it (``[pacs_qr]``). Once
the gateway holds that many, the transfer need not wait for a resend: it closes, declaring
the PACS's count. The asking runs in its own thread, so a slow PACS never holds up uploads.
"""

from __future__ import annotations

import logging
import threading
import time

from pydicom.dataset import Dataset

from imagebridge.gateway.pacs_scu import PacsError, find
from imagebridge.gateway.spool import Spool
from imagebridge.settings import GatewaySettings, PacsQueryRetrieve

log = logging.getLogger(__name__)
# A PACS still filing a study answers a lower count: ask again, not too often.
ASK_EVERY_SECONDS = 5.0


def study_instance_count(
    node: PacsQueryRetrieve, calling_ae_title: str, study_instance_uid: str
) -> int | None:
    """The PACS's count of a study's instances; None if it does not say."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_instance_uid
    identifier.NumberOfStudyRelatedInstances = None
    matches = find(node, calling_ae_title, identifier, limit=1)
    if not matches:
        return None
    value = matches[0].get("NumberOfStudyRelatedInstances")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class StudyCounts:
    """Asks the PACS about transfers waiting for a resend, and tells the spool."""

    def __init__(self, settings: GatewaySettings, node: PacsQueryRetrieve, spool: Spool) -> None:
        self.settings = settings
        self.node = node
        self.spool = spool
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="study-counts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.node.timeout_seconds)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.step()

    def step(self) -> None:
        due = time.monotonic() - ASK_EVERY_SECONDS
        for t in self.spool.awaiting_resend(self.settings.study_stable_seconds):
            if t.pacs_asked_at > due:
                continue
            try:
                count = study_instance_count(
                    self.node, self.settings.ae_title, t.study_instance_uid
                )
            except PacsError as exc:
                log.warning("could not ask the PACS how many instances a study has: %s", exc)
                count = t.pacs_count
            self.spool.counted_by_pacs(t, count)

"""What a job's handler is given: the hub's settings, database, blob store and clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from imagebridge.jobs.services import Claimed
from imagebridge.settings import HubSettings
from imagebridge.storage.blobs import BlobStore


class JobContext(Protocol):
    """A hub (`imagebridge.hub.state.Hub`) is one; so is anything with the same parts."""

    @property
    def settings(self) -> HubSettings: ...

    @property
    def sessions(self) -> sessionmaker[Session]: ...

    @property
    def blobs(self) -> BlobStore: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...


# A handler does one job. It may run again after a crash or a lost lease, so each of its
# steps must do no harm when repeated (`Claimed.done` / `Claimed.step_done` help).
Handler = Callable[[JobContext, Claimed], None]

"""What a hub process holds: settings, database, blob store and the inbox notifier."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from imagebridge.accounts.services import ensure_builtin_roles
from imagebridge.db import make_engine, make_sessionmaker, utcnow
from imagebridge.migrate import upgrade
from imagebridge.settings import HubSettings
from imagebridge.storage.blobs import BlobStore, LocalBlobStore


class InboxNotifier:
    """Wakes a gateway's long poll when work for its institution may have arrived.

    A nudge is only a hint: pollers also recheck the database on a short timer, so work
    queued by another hub process is found too.
    """

    def __init__(self) -> None:
        self._events: dict[int, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def event(self, institution_id: int) -> asyncio.Event:
        return self._events.setdefault(institution_id, asyncio.Event())

    def nudge(self, institution_id: int) -> None:
        """Callable from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set, institution_id)

    def _set(self, institution_id: int) -> None:
        self.event(institution_id).set()
        self._events.pop(institution_id, None)


@dataclass
class Hub:
    settings: HubSettings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    admin_token: str
    notifier: InboxNotifier = field(default_factory=InboxNotifier)
    token_cache: dict[str, tuple[str, int, float]] = field(default_factory=dict)
    # The hub's clock, replaceable so that tests of expiry and lockout need not sleep.
    clock: Callable[[], datetime] = utcnow

    @classmethod
    def open(cls, settings: HubSettings) -> Hub:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url)
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        with sessions() as session, session.begin():
            ensure_builtin_roles(session)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            blobs=open_blob_store(settings),
            admin_token=settings.admin_token or _admin_token(settings.data_dir),
        )


def open_blob_store(settings: HubSettings) -> BlobStore:
    """The blob store the settings choose; an unreachable bucket fails here, with the reason."""
    if settings.blob_store.kind == "s3":
        from imagebridge.storage.s3 import S3BlobStore  # boto3 only where it is used

        # Uploads are staged beside where a local store would keep its blobs.
        store = S3BlobStore.from_settings(settings.blob_store, settings.resolved_blob_dir / "tmp")
        store.check()
        return store
    return LocalBlobStore(settings.resolved_blob_dir)


def _admin_token(data_dir: Path) -> str:
    """The network administrator's token: generated on first start, readable by root only."""
    path = data_dir / "admin-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("iba_" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()

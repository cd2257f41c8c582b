"""What a hub process holds: settings, database, blob store, the inbox notifier and, when
the settings ask, a worker of the job queue.

Nothing here is needed by another hub process: what they share lives in the database and
the blob store. The notifier's wake-ups reach the other processes through the database
(hub/inbox.py); the gateway token cache (hub/auth.py) only spares lookups, for a few
seconds, and a revocation reaches every process through the same channel (or, were the
channel down, when the few seconds are up).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from imagebridge.accounts.services import ensure_builtin_roles, seal_second_factors
from imagebridge.db import make_engine, make_sessionmaker, utcnow
from imagebridge.fsutil import private_text
from imagebridge.hub.inbox import InboxNotifier
from imagebridge.hub.tokens import TokenCache
from imagebridge.jobs.worker import Worker, start_in_process
from imagebridge.migrate import upgrade
from imagebridge.sealing import Sealer, claim_key, key_from_file, parse_key
from imagebridge.settings import HubSettings
from imagebridge.storage.blobs import BlobStore, LocalBlobStore


@dataclass
class Hub:
    settings: HubSettings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    admin_token: str
    sealer: Sealer  # seals and opens the secrets kept in the database
    notifier: InboxNotifier = field(default_factory=InboxNotifier)
    token_cache: TokenCache = field(default_factory=TokenCache)
    # The hub's clock, replaceable so that tests of expiry and lockout need not sleep.
    clock: Callable[[], datetime] = utcnow
    worker: Worker | None = None
    # Uploaded blobs checked and made ready to store as they arrive (transfers/routes.py).
    intake: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(16, thread_name_prefix="intake")
    )

    def __post_init__(self) -> None:
        self.notifier.on_revoked(self.token_cache.forget)

    def start_background(self, loop: asyncio.AbstractEventLoop) -> None:
        """With the web application: wake-ups across processes, and the in-process worker."""
        self.notifier.bind(loop)
        self.notifier.connect(self.engine)
        self.worker = start_in_process(self)

    def stop_background(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.notifier.close()

    @classmethod
    def open(cls, settings: HubSettings) -> Hub:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url)
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        secret_key = settings.secret_key.get_secret_value()
        sealer = Sealer(parse_key(secret_key) if secret_key else key_from_file(settings.data_dir))
        with sessions() as session, session.begin():
            ensure_builtin_roles(session)
            claim_key(session, sealer)
            seal_second_factors(session, sealer)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            blobs=open_blob_store(settings),
            admin_token=settings.admin_token or _admin_token(settings.data_dir),
            sealer=sealer,
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
    return private_text(data_dir / "admin-token", lambda: "iba_" + secrets.token_urlsafe(32))

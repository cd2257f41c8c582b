"""Whether a hub process can serve: its database reachable and migrated to the newest
schema, its blob store reachable. The answer names the parts, never addresses or errors."""

from __future__ import annotations

import logging
import os
from functools import cache

from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from imagebridge.migrate import alembic_config
from imagebridge.storage.blobs import BlobStore, LocalBlobStore

log = logging.getLogger(__name__)


@cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def database_state(engine: Engine) -> str:
    """``ok``, ``unreachable`` or ``not migrated``."""
    try:
        with engine.connect() as connection:
            revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as exc:  # any driver's error: the reason goes to the log only
        log.warning("readiness: the database cannot be read: %s", type(exc).__name__)
        return "unreachable"
    return "ok" if revision == head_revision() else "not migrated"


def blob_store_state(blobs: BlobStore) -> str:
    """``ok`` or ``unreachable``."""
    try:
        if isinstance(blobs, LocalBlobStore):
            ok = blobs.root.is_dir() and os.access(blobs.root, os.W_OK | os.X_OK)
        else:
            check = getattr(blobs, "check", None)
            if check is not None:
                check()
            ok = True
    except OSError as exc:
        log.warning("readiness: the blob store cannot be reached: %s", exc)
        ok = False
    return "ok" if ok else "unreachable"

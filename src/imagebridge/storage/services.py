"""The blob table kept beside the blob store."""

from __future__ import annotations

from sqlalchemy.orm import Session

from imagebridge.db import insert_missing
from imagebridge.storage.models import Blob


def ensure_blob_rows(session: Session, sizes: dict[str, int]) -> None:
    """A row for every stored blob (digest: size) that has none; another request may be
    adding the same blob at the same moment."""
    insert_missing(session, Blob, [{"sha256": sha, "size": size} for sha, size in sizes.items()])

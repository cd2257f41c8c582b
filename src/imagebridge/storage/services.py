"""The blob table kept beside the blob store."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.db import insert_missing
from imagebridge.storage.blobs import BlobStore, is_digest
from imagebridge.storage.models import Blob


def held_blobs(session: Session, digests: Iterable[str]) -> set[str]:
    """Which of these blobs the blob table lists."""
    wanted = [d for d in dict.fromkeys(digests) if is_digest(d)]
    return set(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(wanted))))


def missing_blobs(blobs: BlobStore, digests: Iterable[str], held: set[str]) -> list[str]:
    """Which of these blobs the hub does not hold (only those need uploading), in the order
    given, each once; what is not a digest is left out. ``held``: held_blobs(), read first;
    the store is asked afterwards, outside the transaction (an S3 request each)."""
    wanted = [d for d in dict.fromkeys(digests) if is_digest(d)]
    return [d for d in wanted if d not in held or not blobs.exists(d)]


def ensure_blob_rows(session: Session, sizes: dict[str, int]) -> None:
    """A row for every stored blob (digest: size) that has none; another request may be
    adding the same blob at the same moment."""
    insert_missing(session, Blob, [{"sha256": sha, "size": size} for sha, size in sizes.items()])

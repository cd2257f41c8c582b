"""The blob table kept beside the blob store."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.db import insert_missing
from imagebridge.storage.blobs import BlobStore, is_digest
from imagebridge.storage.models import Blob


def _digests(values: Iterable[str]) -> list[str]:
    """The digests among these values, each once, in order."""
    return [d for d in dict.fromkeys(values) if is_digest(d)]


def held_blobs(session: Session, digests: Iterable[str]) -> set[str]:
    """Which of these blobs the blob table lists."""
    return set(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(_digests(digests)))))


def missing_blobs(blobs: BlobStore, digests: Iterable[str], held: set[str]) -> list[str]:
    """Which of these blobs the hub does not hold (only those need uploading), in the order
    given, each once; what is not a digest is left out. ``held``: held_blobs(), read first;
    the store is asked afterwards, outside the transaction (an S3 request each)."""
    return [d for d in _digests(digests) if d not in held or not blobs.exists(d)]


def ensure_blob_rows(session: Session, sizes: dict[str, int]) -> None:
    """A row for every stored blob (digest: size) that has none; another request may be
    adding the same blob at the same moment."""
    insert_missing(session, Blob, [{"sha256": sha, "size": size} for sha, size in sizes.items()])

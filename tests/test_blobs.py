"""The hub's local blob store on a real filesystem: a batch committed at once, each blob
under its digest, stored once, and nothing left of what was refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imagebridge.storage.blobs import BlobMismatch, BlobWriter, LocalBlobStore


def staged(store: LocalBlobStore, data: bytes) -> BlobWriter:
    writer = store.writer()
    for start in range(0, len(data), 1000):
        writer.write(memoryview(data)[start : start + 1000])
    return writer


def test_a_batch_is_stored_once_under_its_digests(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    held = os.urandom(3000)
    [first] = store.commit_batch([(staged(store, held), None)])
    assert not isinstance(first, BlobMismatch)
    sha_held = first[0]
    new = [os.urandom(n) for n in (10, 5000, 70000)]
    batch: list[tuple[BlobWriter, str | None]] = [
        (staged(store, new[0]), hashlib.sha256(new[0]).hexdigest()),
        (staged(store, new[1]), None),
        (staged(store, new[1]), None),  # the same content twice in one batch
        (staged(store, held), sha_held),  # already held
        (staged(store, new[2]), "0" * 64),  # announced with another digest
    ]
    results = store.commit_batch(batch)
    digests = [hashlib.sha256(d).hexdigest() for d in new]
    assert results[:4] == [
        (digests[0], 10),
        (digests[1], 5000),
        (digests[1], 5000),
        (sha_held, 3000),
    ]
    assert isinstance(results[4], BlobMismatch)
    for sha, data in [*zip(digests[:2], new[:2], strict=True), (sha_held, held)]:
        assert store.exists(sha)
        assert store.path_for(sha).read_bytes() == data
    assert not store.exists(digests[2])
    assert not list(store.tmp_dir.iterdir())  # nothing staged is left behind
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(files) == 3

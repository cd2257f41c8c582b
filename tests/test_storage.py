"""The hub's blob stores behind one interface, each on a real backend: the local folder, and
a real S3 server (SeaweedFS). A blob appears under its digest only whole and checked, is
stored once, and a refused, aborted or failed write leaves nothing behind, staging included.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from imagebridge.demo.network import write_toml
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.hub.state import open_blob_store
from imagebridge.settings import HubSettings
from imagebridge.storage.blobs import (
    STALE_STAGED_SECONDS,
    BlobMismatch,
    BlobStore,
    BlobWriter,
    LocalBlobStore,
    blob_name,
)
from imagebridge.storage.s3 import S3BlobStore
from seaweed import SeaweedServer

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part S3 allows: large objects stay quick to make
LARGE = 3 * PART + 12345  # four parts, the last one short


@dataclass
class Backend:
    """A store, and what its backend really holds, looked at without the store's help."""

    store: BlobStore
    names: Callable[[], set[str]]  # blob names (ab/cd/<sha>) stored
    leftovers: Callable[[], list[str]]  # staged files and unfinished uploads
    parts_of: Callable[[str], int]  # how many parts a stored blob was uploaded in


def local_backend(root: Path) -> Backend:
    store = LocalBlobStore(root)

    def names() -> set[str]:
        return {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and store.tmp_dir not in p.parents
        }

    return Backend(store, names, lambda: [p.name for p in store.tmp_dir.iterdir()], lambda _sha: 1)


def s3_store(server: SeaweedServer, bucket: str, staging: Path) -> S3BlobStore:
    return S3BlobStore(
        server.client(),
        bucket,
        staging,
        prefix="hub/blobs",
        multipart_threshold=PART,
        part_size=PART,
        max_connections=4,
    )


def s3_backend(server: SeaweedServer, staging: Path) -> Backend:
    bucket = server.create_bucket()
    store = s3_store(server, bucket, staging)
    client = server.client()

    def names() -> set[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
        assert all(k.startswith("hub/blobs/") for k in keys), keys
        return {k.removeprefix("hub/blobs/") for k in keys}

    def leftovers() -> list[str]:
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return [u["Key"] for u in uploads] + [p.name for p in staging.iterdir()]

    def parts_of(sha: str) -> int:
        etag = client.head_object(Bucket=bucket, Key=store.key_for(sha))["ETag"].strip('"')
        # A multipart object's ETag ends in -<number of parts>.
        return int(etag.rpartition("-")[2]) if "-" in etag else 1

    return Backend(store, names, leftovers, parts_of)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path / "blobs")
    return s3_backend(request.getfixturevalue("seaweedfs"), tmp_path / "staging")


def staged(store: BlobStore, data: bytes, chunk: int = 64 * 1024) -> BlobWriter:
    writer = store.writer()
    for start in range(0, len(data), chunk):
        writer.write(memoryview(data)[start : start + chunk])
    return writer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_under_the_content_address(backend: Backend) -> None:
    store, data = backend.store, os.urandom(200_000)
    assert not store.exists(sha(data))
    assert staged(store, data).commit(sha(data)) == (sha(data), len(data))
    assert store.exists(sha(data))
    assert backend.names() == {blob_name(sha(data))}  # the same names as the local folder
    with store.open(sha(data)) as fh:
        assert fh.read(10) == data[:10]
        fh.seek(150_000)  # a reader of DICOM jumps about
        assert fh.read(1000) == data[150_000:151_000]
        fh.seek(-5, os.SEEK_END)
        assert fh.read() == data[-5:]
        fh.seek(0)
        assert fh.read() == data
    with pytest.raises(FileNotFoundError):
        store.open(sha(b"never stored"))
    assert backend.leftovers() == []


def test_the_same_content_is_stored_once(backend: Backend) -> None:
    store = backend.store
    held, new = os.urandom(3000), [os.urandom(n) for n in (10, 5000)]
    staged(store, held).commit()
    batch: list[tuple[BlobWriter, str | None]] = [
        (staged(store, new[0]), sha(new[0])),
        (staged(store, new[1]), None),
        (staged(store, new[1]), None),  # the same content twice in one batch
        (staged(store, held), sha(held)),  # already held
    ]
    results = store.commit_batch(batch)
    assert results == [
        (sha(new[0]), 10),
        (sha(new[1]), 5000),
        (sha(new[1]), 5000),
        (sha(held), 3000),
    ]
    assert staged(store, held).commit() == (sha(held), 3000)
    assert backend.names() == {blob_name(sha(d)) for d in (held, *new)}
    assert backend.leftovers() == []


def test_a_digest_mismatch_is_refused_and_leaves_nothing(backend: Backend) -> None:
    store = backend.store
    small, large = os.urandom(5000), os.urandom(LARGE)
    for data in (small, large):
        with pytest.raises(BlobMismatch):
            staged(store, data).commit("0" * 64)
    good = os.urandom(100)
    results = store.commit_batch(
        [
            (staged(store, small), "1" * 64),
            (staged(store, good), sha(good)),
            (staged(store, large), "2" * 64),
        ]
    )
    assert isinstance(results[0], BlobMismatch) and isinstance(results[2], BlobMismatch)
    assert results[1] == (sha(good), 100)
    assert backend.names() == {blob_name(sha(good))}
    assert not store.exists(sha(small)) and not store.exists(sha(large))
    assert backend.leftovers() == []


def test_an_aborted_write_leaves_nothing(backend: Backend) -> None:
    store = backend.store
    writer = staged(store, os.urandom(LARGE))
    assert writer.staged_path().stat().st_size == LARGE  # checkable before commit
    writer.abort()
    assert backend.names() == set()
    assert backend.leftovers() == []


def test_a_large_object_goes_in_parts(backend: Backend) -> None:
    store, data = backend.store, os.urandom(LARGE)
    [result] = store.commit_batch([(staged(store, data, chunk=MiB), sha(data))])
    assert result == (sha(data), LARGE)
    if isinstance(store, S3BlobStore):
        assert backend.parts_of(sha(data)) == 4
    with store.open(sha(data)) as fh:
        assert hashlib.file_digest(fh, "sha256").hexdigest() == sha(data)
    assert backend.leftovers() == []


def test_concurrent_writers_of_the_same_blob(backend: Backend) -> None:
    store = backend.store
    large, small = os.urandom(PART + 1000), os.urandom(20_000)
    start = threading.Barrier(8)
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            writer = staged(store, data)
            start.wait()
            results.append(writer.commit(sha(data)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(d,)) for d in [large, small] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == sorted([(sha(large), len(large)), (sha(small), len(small))] * 4)
    assert backend.names() == {blob_name(sha(large)), blob_name(sha(small))}
    for data in (large, small):
        with store.open(sha(data)) as fh:
            assert fh.read() == data
    assert backend.leftovers() == []


def test_a_large_blob_is_read_as_a_stream(backend: Backend) -> None:
    store, size = backend.store, 40 * MiB
    writer = store.writer()
    block = os.urandom(MiB)
    for n in range(40):
        writer.write(block[n:] + block[:n])
    digest, _ = writer.commit()
    tracemalloc.start()
    try:
        with store.open(digest) as fh:
            total = hashlib.sha256()
            while chunk := fh.read(256 * 1024):
                total.update(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total.hexdigest() == digest
    assert peak < 8 * MiB, f"{peak} bytes held to read {size}"


def test_a_committed_batch_is_there_for_another_process(backend: Backend, tmp_path: Path) -> None:
    """commit_batch returns once the blobs are durable: a store opened afresh (as another hub
    process would) finds every one, whole."""
    store = backend.store
    blobs = [os.urandom(n) for n in (1, 70_000, PART + 1)]
    store.commit_batch([(staged(store, d), None) for d in blobs])
    if isinstance(store, S3BlobStore):
        other: BlobStore = S3BlobStore(
            store.client, store.bucket, tmp_path / "other", prefix=store.prefix
        )
    else:
        assert isinstance(store, LocalBlobStore)
        other = LocalBlobStore(store.root)
    for data in blobs:
        assert other.exists(sha(data))
        with other.open(sha(data)) as fh:
            assert fh.read() == data


def test_staged_files_left_by_a_stopped_process_go_when_a_store_opens(backend: Backend) -> None:
    """A process killed mid-upload leaves its staged file; the next store to open on the
    folder removes it, once a day old, and leaves alone the uploads still under way (another
    process may share the folder)."""
    store = backend.store
    folder = store.staging_dir if isinstance(store, S3BlobStore) else store.tmp_dir
    left = folder / "blob-0123456789abcdef"
    left.write_bytes(b"half a blob")
    day_ago = time.time() - STALE_STAGED_SECONDS - 60
    os.utime(left, (day_ago, day_ago))
    data = os.urandom(70_000)
    under_way = staged(store, data)  # another process's upload, still arriving
    if isinstance(store, S3BlobStore):
        S3BlobStore(store.client, store.bucket, folder, prefix=store.prefix)
    else:
        LocalBlobStore(store.root)
    assert not left.exists()
    assert under_way.commit(sha(data)) == (sha(data), len(data))
    assert backend.leftovers() == []


# -- S3 only --------------------------------------------------------------------------------


@pytest.fixture
def s3(seaweedfs: SeaweedServer, tmp_path: Path) -> Backend:
    return s3_backend(seaweedfs, tmp_path / "staging")


@pytest.mark.parametrize("size", [5000, LARGE])
def test_staged_bytes_changed_before_upload_store_nothing(s3: Backend, size: int) -> None:
    """The bytes sent are checked against the digest on the way (by the server for one PUT,
    before completing for parts): a staging file damaged after it was hashed is refused, and
    a multipart upload cut short leaves no parts behind."""
    data = os.urandom(size)
    writer = staged(s3.store, data)
    with open(writer.staged_path(), "r+b") as fh:
        fh.seek(size - 100)
        fh.write(b"\xff" * 10)
    with pytest.raises(BlobMismatch):
        writer.commit(sha(data))
    assert s3.names() == set()
    assert s3.leftovers() == []


def test_open_blob_store_from_settings(
    seaweedfs: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[blob_store] in the hub's file, the secret from the environment."""
    bucket = seaweedfs.create_bucket()
    config = tmp_path / "hub.toml"
    write_toml(config, {"data_dir": "hub", "blob_store": seaweedfs.blob_store(bucket)})
    monkeypatch.setenv("IMAGEBRIDGE_HUB_BLOB_STORE__SECRET_ACCESS_KEY", seaweedfs.secret_key)
    store = open_blob_store(HubSettings.load(config))
    assert isinstance(store, S3BlobStore) and store.bucket == bucket
    staged(store, b"hello").commit()
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"blobs/{blob_name(sha(b'hello'))}"]
    assert list((tmp_path / "hub" / "blobs" / "tmp").iterdir()) == []  # staged there

    with pytest.raises(ValueError, match="needs a bucket"):
        HubSettings(blob_store={"kind": "s3"})  # type: ignore[arg-type]


def test_the_local_folder_stays_the_default(tmp_path: Path) -> None:
    store = open_blob_store(HubSettings(data_dir=tmp_path))
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "blobs"


def test_pydicom_reads_a_blob_with_values_deferred(backend: Backend, tmp_path: Path) -> None:
    """WADO-RS reads instances with large values deferred, fetched when asked for."""
    study = generate_ct_study(tmp_path / "ct", slices=1, rows=256, columns=256)
    data = study.paths[0].read_bytes()
    digest, _ = staged(backend.store, data).commit()
    with backend.store.open(digest) as fh:
        ds = dcmread(fh, defer_size=1024)
        assert ds.PixelData == dcmread(study.paths[0]).PixelData


@pytest.mark.parametrize(
    ("case", "reason"),
    [("wrong secret", "access refused"), ("no bucket", "no such bucket")],
)
def test_the_hub_will_not_start_on_a_bucket_it_cannot_use(
    seaweedfs: SeaweedServer, tmp_path: Path, case: str, reason: str
) -> None:
    """It stops at once, saying why, instead of failing on the first blob."""
    bucket = seaweedfs.create_bucket() if case == "wrong secret" else "ib-never-made"
    config = tmp_path / "hub.toml"
    write_toml(config, {"data_dir": "hub", "blob_store": seaweedfs.blob_store(bucket)})
    secret = "wrong" if case == "wrong secret" else seaweedfs.secret_key
    done = subprocess.run(
        [sys.executable, "-m", "imagebridge", "hub", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "IMAGEBRIDGE_HUB_BLOB_STORE__SECRET_ACCESS_KEY": secret},
    )
    assert done.returncode != 0
    assert f"S3 bucket '{bucket}' at {seaweedfs.endpoint_url}: {reason}" in done.stderr
    assert "Traceback" not in done.stderr and secret not in done.stderr

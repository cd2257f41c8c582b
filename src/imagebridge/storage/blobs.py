"""The blob store: content-addressed (SHA-256) objects, each stored once.

Implementations are chosen by a setting; the local folder is the embedded default.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from imagebridge.fsutil import fsync_path

log = logging.getLogger(__name__)

DIGEST_LENGTH = 64
CHUNK = 1 << 20
# A staged file untouched this long belongs to no request: a process that stopped in the
# middle of an upload left it (another process may share the folder, so not all of them).
STALE_STAGED_SECONDS = 24 * 3600.0
STAGED_PREFIX = "blob-"


_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(value: str) -> bool:
    return _DIGEST.fullmatch(value) is not None


def blob_name(sha256: str) -> str:
    """Where a blob lives below a store's root, whichever the store: ab/cd/abcd..."""
    if not is_digest(sha256):
        raise ValueError("not a SHA-256 digest")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


class BlobMismatch(ValueError):
    """The bytes received do not hash to the digest they were announced with."""


class BlobStoreError(OSError):
    """The store could not be reached, or refused an operation (an object store's error)."""


class BlobWriter(Protocol):
    def write(self, chunk: bytes | memoryview) -> None: ...

    @property
    def size(self) -> int:
        """The bytes written so far."""
        ...

    def finish(self) -> None:
        """Every byte is written: let go of the open file until commit (a batch of many
        small blobs must not hold a file descriptor each)."""
        ...

    def staged_path(self) -> Path:
        """The bytes written so far, in a local file, to check them before commit."""
        ...

    def prepare(self, expected_sha256: str | None = None) -> None:
        """The bytes are complete and have passed the caller's checks: do now, while the rest
        of a batch arrives, the slow part of a commit (the file synced and its folder made,
        or the object uploaded), leaving the commit little to do. Nothing if the bytes do not
        hash to ``expected_sha256``: the commit refuses them. From any one thread at a time."""
        ...

    def commit(self, expected_sha256: str | None = None) -> tuple[str, int]:
        """Make the object durable under its digest; return (sha256, size)."""
        ...

    def abort(self) -> None: ...


class BlobStore(Protocol):
    def exists(self, sha256: str) -> bool: ...

    def writer(self) -> BlobWriter: ...

    def commit_batch(
        self, items: list[tuple[BlobWriter, str | None]]
    ) -> list[tuple[str, int] | BlobMismatch]:
        """Commit several writers at once (cheaper than one by one); a result per item."""
        ...

    def open(self, sha256: str) -> BinaryIO: ...

    def local_path(self, sha256: str) -> Path | None:
        """A filesystem path for the object, if this store has one (lets callers stream it)."""
        ...

    # Removal by the retention policy, in two steps: a blob is first set aside (out of
    # reach: `exists` says no, so a new upload sends its bytes again), and discarded only
    # once nothing has come to need it; until then it can be put back.
    def set_aside(self, sha256: str) -> bool:
        """Move the blob out of reach, keeping its bytes; False if the store lacks it."""
        ...

    def put_back(self, sha256: str) -> None:
        """Undo `set_aside`; a copy stored again meanwhile is kept instead."""
        ...

    def discard(self, sha256: str) -> None:
        """Remove a blob set aside, for good (nothing if there is none)."""
        ...


def clear_stale(folder: Path) -> int:
    """Remove the staged files in ``folder`` left by a process that stopped mid-upload;
    how many were removed."""
    cutoff = time.time() - STALE_STAGED_SECONDS
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith(STAGED_PREFIX):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # its request finished meanwhile
    if removed:
        log.warning("blob store: removed %d staged files left by a stopped process", removed)
    return removed


class StagedBlob:
    """Bytes being received, in a local file, hashed as they arrive."""

    def __init__(self, tmp_dir: Path) -> None:
        # A random name, created exclusively: mkstemp's way, at a fraction of its cost (one
        # is made for every instance received).
        self._tmp = tmp_dir / f"{STAGED_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, chunk: bytes | memoryview) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    def finish(self) -> None:
        self._file.close()

    def staged_path(self) -> Path:
        if not self._file.closed:
            self._file.flush()
        return self._tmp

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        return self._size

    def matches(self, expected_sha256: str | None) -> bool:
        """Whether the bytes may be stored under ``expected_sha256`` (None: under any)."""
        return expected_sha256 is None or expected_sha256 == self.digest

    def mismatch(self, expected_sha256: str | None) -> BlobMismatch | None:
        """Why the bytes cannot be stored under ``expected_sha256`` (then they are dropped)."""
        digest = self.digest
        if self.matches(expected_sha256):
            return None
        self.abort()
        return BlobMismatch(f"content hashes to {digest}, not {expected_sha256}")

    def close(self) -> Path:
        self._file.close()
        return self._tmp

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class LocalBlobWriter(StagedBlob):
    def __init__(self, store: LocalBlobStore) -> None:
        super().__init__(store.tmp_dir)
        self._store = store
        self.is_ready = False

    def prepare(self, expected_sha256: str | None = None) -> None:
        final = self._store.path_for(self.digest)
        # Not for bytes the commit will refuse, nor for a copy of a blob held already.
        if self.matches(expected_sha256) and not final.exists():
            self.ready()

    def ready(self) -> None:
        """The bytes synced and the blob's folder made: all but its name."""
        if not self.is_ready:
            self._file.close()
            fsync_path(self._tmp)
            self._store.make_folders(self._store.path_for(self.digest).parent)
            self.is_ready = True

    def commit(self, expected_sha256: str | None = None) -> tuple[str, int]:
        if refused := self.mismatch(expected_sha256):
            raise refused
        digest = self.digest
        final = self._store.path_for(digest)
        if final.exists():
            self.abort()  # single source: the same content is already stored
        else:
            self.ready()
            os.replace(self._tmp, final)
        fsync_path(final.parent)  # its name durable, whoever gave it
        return digest, self._size


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        clear_stale(self.tmp_dir)
        self._sync_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync")
        self._folders: set[Path] = set()  # made, and their entries synced

    def path_for(self, sha256: str) -> Path:
        return Path(f"{self.root}/{blob_name(sha256)}")

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    def writer(self) -> LocalBlobWriter:
        return LocalBlobWriter(self)

    def commit_batch(
        self, items: list[tuple[BlobWriter, str | None]]
    ) -> list[tuple[str, int] | BlobMismatch]:
        """Commit a batch with its fsyncs issued together: the filesystem's journal then
        commits them as a group instead of one after another (those of a prepared writer
        were issued as it arrived).

        Contents are durable before any blob gets its final name, and names before
        returning: a file under its digest is always complete, which is what lets a
        commit skip content already held.
        """
        results: list[tuple[str, int] | BlobMismatch] = []
        moves: dict[Path, LocalBlobWriter] = {}  # final name -> staged
        held: set[Path] = set()  # the folders of blobs found already stored
        for writer, expected in items:
            assert isinstance(writer, LocalBlobWriter)
            if refused := writer.mismatch(expected):
                results.append(refused)
                continue
            digest, size = writer.digest, writer.size
            final = self.path_for(digest)
            if final in moves or final.exists():
                writer.abort()
                held.add(final.parent)
            else:
                moves[final] = writer
            results.append((digest, size))
        unready = [w for w in moves.values() if not w.is_ready]
        list(self._sync_pool.map(LocalBlobWriter.ready, unready))
        for final, writer in moves.items():
            os.replace(writer.close(), final)
        # The names made, and those found: another batch may have given a blob its name a
        # moment ago and not yet synced it, and this one must not answer before it is.
        list(self._sync_pool.map(fsync_path, {final.parent for final in moves} | held))
        return results

    def make_folders(self, folder: Path) -> None:
        """Make ``folder`` and its missing parents, each entry synced before it is counted
        as made (so that no blob is answered stored in a folder whose name could be lost)."""
        if folder in self._folders or folder == self.root:
            return
        self.make_folders(folder.parent)
        folder.mkdir(exist_ok=True)
        fsync_path(folder.parent)
        self._folders.add(folder)

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path_for(sha256), "rb")

    def local_path(self, sha256: str) -> Path | None:
        return self.path_for(sha256)

    def _aside(self, sha256: str) -> Path:
        return Path(f"{self.root}/set-aside/{blob_name(sha256)}")

    def set_aside(self, sha256: str) -> bool:
        aside = self._aside(sha256)
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path_for(sha256), aside)
        except FileNotFoundError:
            return False
        return True

    def put_back(self, sha256: str) -> None:
        aside, final = self._aside(sha256), self.path_for(sha256)
        if final.exists():
            aside.unlink(missing_ok=True)
            return
        self.make_folders(final.parent)
        try:
            os.replace(aside, final)
        except FileNotFoundError:
            return
        fsync_path(final.parent)

    def discard(self, sha256: str) -> None:
        self._aside(sha256).unlink(missing_ok=True)


def read_chunks(store: BlobStore, sha256: str) -> Iterator[bytes]:
    """A blob's bytes a chunk at a time, for a streamed answer."""
    with store.open(sha256) as fh:
        while chunk := fh.read(CHUNK):
            yield chunk

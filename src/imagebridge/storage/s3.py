"""Blobs in an S3-compatible object store (SeaweedFS, MinIO, Ceph, AWS S3), through boto3.

Bytes are staged in a local file while they arrive, as with the local store, because callers
read a blob's header before committing it. Only a blob whose digest has been checked is sent,
straight to its final key, and S3 shows an object only once its PUT or its multipart upload
has completed, so a key always holds a whole blob:

- below ``multipart_threshold``, one PUT carrying the SHA-256 checksum, which the server
  verifies: the content address itself;
- above it, a multipart upload whose parts each carry their checksum, completed only once the
  parts read back from the staging file hash to the digest, and aborted (its parts removed)
  on any failure.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from imagebridge.settings import BlobStoreSettings
from imagebridge.storage.blobs import (
    CHUNK,
    BlobMismatch,
    BlobStoreError,
    BlobWriter,
    StagedBlob,
    blob_name,
    clear_stale,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_BUCKET_ERRORS = {
    "403": "access refused (check the access key and secret)",
    "404": "no such bucket (it is made beforehand)",
}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """The object store's failures as the store's own error, saying what was being done."""
    try:
        yield
    except ClientError as exc:
        raise BlobStoreError(f"{what}: {_code(exc) or exc}") from exc
    except BotoCoreError as exc:
        raise BlobStoreError(f"{what}: {exc}") from exc


def _checksum(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class S3BlobWriter(StagedBlob):
    def __init__(self, store: S3BlobStore) -> None:
        super().__init__(store.staging_dir)
        self._store = store
        self.uploaded = False

    def prepare(self, expected_sha256: str | None = None) -> None:
        if self.matches(expected_sha256):
            self._store.upload(self.digest, self.close(), self.size)
            self.uploaded = True

    def commit(self, expected_sha256: str | None = None) -> tuple[str, int]:
        if refused := self.mismatch(expected_sha256):
            raise refused
        try:
            self._store.upload(self.digest, self.close(), self.size)
        finally:
            self.abort()
        return self.digest, self.size


class S3BlobStore:
    def __init__(
        self,
        client: S3Client,
        bucket: str,
        staging_dir: Path,
        *,
        prefix: str = "blobs",
        multipart_threshold: int = 16 * 1024 * 1024,
        part_size: int = 8 * 1024 * 1024,
        max_connections: int = 16,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.staging_dir = staging_dir
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        clear_stale(self.staging_dir)
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        # Blobs and parts in separate pools: a blob's upload waits on its parts.
        self._uploads = ThreadPoolExecutor(max_connections, thread_name_prefix="s3-put")
        self._parts = ThreadPoolExecutor(max_connections, thread_name_prefix="s3-part")
        self._parts_in_flight = max(2, max_connections // 2)

    @classmethod
    def from_settings(cls, settings: BlobStoreSettings, staging_dir: Path) -> S3BlobStore:
        config = Config(
            region_name=settings.region,
            s3={"addressing_style": settings.addressing_style},
            # Whole blobs from the hub's intake and from commits, and parts, side by side.
            max_pool_connections=3 * settings.max_connections,
            retries={"max_attempts": 5, "mode": "standard"},
            # The SHA-256 checksums are sent by this store; no second checksum on top.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        secret = settings.secret_access_key.get_secret_value()
        client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url or None,
            aws_access_key_id=settings.access_key_id or None,
            aws_secret_access_key=secret or None,
            config=config,
        )
        return cls(
            client,
            settings.bucket,
            staging_dir,
            prefix=settings.prefix,
            multipart_threshold=settings.multipart_threshold,
            part_size=settings.multipart_part_size,
            max_connections=settings.max_connections,
        )

    def check(self) -> None:
        """Fail now, with the reason, if the bucket cannot be reached with these credentials."""
        where = f"S3 bucket {self.bucket!r} at {self.client.meta.endpoint_url}"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            why = _BUCKET_ERRORS.get(_code(exc), _code(exc))
            raise BlobStoreError(f"{where}: {why}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"{where}: {exc}") from exc

    def key_for(self, sha256: str) -> str:
        name = blob_name(sha256)
        return f"{self.prefix}/{name}" if self.prefix else name

    def exists(self, sha256: str) -> bool:
        return self._holds(self.key_for(sha256))

    def _holds(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return False
            raise BlobStoreError(f"looking for a blob: {_code(exc) or exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"looking for a blob: {exc}") from exc
        return True

    def writer(self) -> S3BlobWriter:
        return S3BlobWriter(self)

    def commit_batch(
        self, items: list[tuple[BlobWriter, str | None]]
    ) -> list[tuple[str, int] | BlobMismatch]:
        """Upload the batch's new blobs side by side (those not uploaded as they arrived);
        every one is stored when this returns, before the index commit that refers to them."""
        results: list[tuple[str, int] | BlobMismatch] = []
        staged: dict[str, tuple[Path, int]] = {}
        futures: dict[str, Future[None]] = {}
        try:
            for writer, expected in items:
                assert isinstance(writer, S3BlobWriter)
                if refused := writer.mismatch(expected):
                    results.append(refused)
                    continue
                if writer.digest not in staged and not writer.uploaded:
                    staged[writer.digest] = (writer.close(), writer.size)
                results.append((writer.digest, writer.size))
            for digest, (path, size) in staged.items():
                futures[digest] = self._uploads.submit(self.upload, digest, path, size)
            wait(futures.values())
        finally:
            for writer, _ in items:
                writer.abort()  # the staged copies are no longer needed, stored or not
        changed: dict[str, BlobMismatch] = {}
        for digest, future in futures.items():
            error = future.exception()
            if isinstance(error, BlobMismatch):
                changed[digest] = error
            elif error is not None:
                raise error
        return [changed.get(r[0], r) if isinstance(r, tuple) else r for r in results]

    def upload(self, digest: str, path: Path, size: int) -> None:
        """Store the staged file under its digest unless already held; BlobMismatch if the
        file no longer holds those bytes (nothing is then stored)."""
        key = self.key_for(digest)
        if size < self.multipart_threshold:
            # Bytes reach the hub for blobs it said it lacks, so the object is nearly always
            # new: asking first would cost almost what the PUT does. Sent again, the same
            # bytes under the same key change nothing.
            self._put(key, digest, path, size)
        elif not self._holds(key):  # single source: the same content is already stored
            self._put_in_parts(key, digest, path)

    def _put(self, key: str, digest: str, path: Path, size: int) -> None:
        try:
            with open(path, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentLength=size,
                    ChecksumSHA256=_checksum(bytes.fromhex(digest)),
                )
        except ClientError as exc:
            if _code(exc) in {"BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"}:
                raise BlobMismatch(f"the staged bytes no longer hash to {digest}") from exc
            raise BlobStoreError(f"storing a blob: {_code(exc) or exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"storing a blob: {exc}") from exc

    def _put_in_parts(self, key: str, digest: str, path: Path) -> None:
        with _s3_errors("starting a multipart upload"):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256"
            )["UploadId"]
        pending: deque[Future[CompletedPartTypeDef]] = deque()
        done: list[CompletedPartTypeDef] = []
        try:
            whole = hashlib.sha256()
            with open(path, "rb") as fh:
                number = 0
                while data := fh.read(self.part_size):
                    number += 1
                    whole.update(data)
                    if len(pending) >= self._parts_in_flight:
                        done.append(pending.popleft().result())
                    pending.append(self._parts.submit(self._put_part, key, upload_id, number, data))
            done += [f.result() for f in pending]
            if whole.hexdigest() != digest:
                raise BlobMismatch(f"the staged bytes no longer hash to {digest}")
            with _s3_errors("completing a multipart upload"):
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": done},
                )
        except BaseException:
            # No part may land after the abort, or the server would keep it.
            wait(pending)
            with suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _put_part(self, key: str, upload_id: str, number: int, data: bytes) -> CompletedPartTypeDef:
        checksum = _checksum(hashlib.sha256(data).digest())
        with _s3_errors(f"storing part {number} of a blob"):
            answer = self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}

    def open(self, sha256: str) -> BinaryIO:
        """A seekable stream of the blob, fetched as it is read (never all in memory);
        FileNotFoundError if the store does not hold it."""
        # Not wrapped in io.BufferedReader: pydicom takes one for a named file on disk and
        # would reopen it by name; this reader buffers by itself.
        return cast(BinaryIO, S3ObjectReader(self.client, self.bucket, self.key_for(sha256)))

    def local_path(self, sha256: str) -> Path | None:
        return None

    def _aside_key(self, sha256: str) -> str:
        name = f"set-aside/{blob_name(sha256)}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _move(self, source: str, target: str) -> bool:
        """Copy within the bucket (the server copies; nothing passes through the hub), then
        delete the source; False if there is no source."""
        with _s3_errors("moving a blob"):
            try:
                self.client.copy_object(
                    Bucket=self.bucket, Key=target, CopySource=f"{self.bucket}/{source}"
                )
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return False
                raise
            self.client.delete_object(Bucket=self.bucket, Key=source)
        return True

    def set_aside(self, sha256: str) -> bool:
        return self._move(self.key_for(sha256), self._aside_key(sha256))

    def put_back(self, sha256: str) -> None:
        if self.exists(sha256):
            self.discard(sha256)
        else:
            self._move(self._aside_key(sha256), self.key_for(sha256))

    def discard(self, sha256: str) -> None:
        with _s3_errors("removing a blob"):
            self.client.delete_object(Bucket=self.bucket, Key=self._aside_key(sha256))


class S3ObjectReader(io.RawIOBase):
    """An object read through one GET that streams from the current position, a chunk
    ahead; a seek outside that chunk starts a ranged GET there on the next read. DICOM
    readers seek little and mostly forward, so most reads cost no request at all."""

    def __init__(self, client: S3Client, bucket: str, key: str) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._pos = 0  # the reader's position
        self._ahead = b""  # bytes from the body not read yet, from _pos on
        self._used = 0  # how much of _ahead was read
        self._body: Any = None
        self._size = 0
        self._open_body()  # sizes the object, and finds it missing, with the first request

    def _open_body(self) -> None:
        try:
            if self._pos:
                answer = self._client.get_object(
                    Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-"
                )
            else:  # no range: an empty object has none to satisfy
                answer = self._client.get_object(Bucket=self._bucket, Key=self._key)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise FileNotFoundError(f"no blob under {self._key}") from exc
            raise BlobStoreError(f"reading a blob: {_code(exc) or exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"reading a blob: {exc}") from exc
        if not self._pos:
            self._size = answer["ContentLength"]
        self._body = answer["Body"]

    def _drop_body(self) -> None:
        self._ahead, self._used = b"", 0
        if self._body is not None:
            self._body.close()
            self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        position = base + offset
        if position < 0:
            raise ValueError("negative seek position")
        skip = position - self._pos
        if 0 <= skip <= len(self._ahead) - self._used:
            self._used += skip  # within what was read ahead
        else:
            self._drop_body()
        self._pos = position
        return position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._used == len(self._ahead):
            want = min(max(len(view), CHUNK), self._size - self._pos)
            if want <= 0:
                return 0
            self._ahead, self._used = self._read_body(want), 0
        n = min(len(view), len(self._ahead) - self._used)
        view[:n] = self._ahead[self._used : self._used + n]
        self._used += n
        self._pos += n
        return n

    def _read_body(self, want: int) -> bytes:
        for attempt in (1, 2):
            if self._body is None:
                self._open_body()
            try:
                data: bytes = self._body.read(want)
            except BotoCoreError as exc:
                # A connection dropped while the reader paused: pick up where it was, once.
                self._drop_body()
                if attempt == 2:
                    raise BlobStoreError(f"reading a blob: {exc}") from exc
                continue
            if data:
                return data
            self._drop_body()
        raise BlobStoreError(f"{self._key} ended before its {self._size} bytes")

    def close(self) -> None:
        self._drop_body()
        super().close()

"""The gateway's outbound spool: what the local PACS sent, durable before it is acknowledged.

Layout under ``<data_dir>/spool``::

    tmp/                       files being written
    out/<local id>/meta.json   one folder per outbound transfer (destination, priority, study)
    out/<local id>/<sha>.dcm   instances not yet confirmed by the hub, named by SHA-256
    out/<local id>/instances   "<sha> <SOP Instance UID>" of every instance acknowledged
    refused/<sha>.dcm + .json  instances the hub refused, kept for a human, with the reason
    free/                      files of uploaded instances, kept to be written over

An instance is acknowledged only once its file and folder entry are fsync'd, so it survives
a crash; a file cut short by one (never acknowledged) no longer hashes to its name, and is
removed when the spool is recovered.

A transfer closes once the study is complete as far as the gateway can tell: its associations
have ended and it has been quiet for ``study_stable_seconds``. An association that was aborted
(or cut by a crash of the gateway) means more may be coming: the sending PACS sends again what
got no success answer. Such a transfer waits longer, until a later association is released
normally, the PACS's own count of the study is reached, or the wait for a resend is over.
It then declares how many instances it carries: the hub delivers it as complete only once
the receiver confirms that many.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebridge.dicom.part10 import BadDataset, file_meta, read_header
from imagebridge.dicom.received import Received
from imagebridge.fsutil import fsync_path

log = logging.getLogger(__name__)


class SpoolFull(OSError):
    """Too little disk left to accept more without risking what is already stored."""


@dataclass
class Outbound:
    local_id: str
    destination: str
    priority: str
    study_instance_uid: str
    calling_ae_title: str
    created_at: float
    hub_id: str | None = None
    closed: bool = False
    # Associations that touched the transfer and have not ended; kept on disk, so that those
    # a crash cut off are known after it.
    active_associations: int = 0
    interrupted: bool = False  # an association was aborted: a resend may follow
    declared: int | None = None  # set at close: the instances the study is said to have
    declared_by: str = ""
    # In memory only:
    pending: dict[str, Path] = field(default_factory=dict)
    acknowledged: dict[str, str] = field(default_factory=dict)  # digest -> SOP Instance UID
    pacs_count: int | None = None  # the sending PACS's count of the study, when asked
    pacs_asked_at: float = -1e9
    in_flight: set[str] = field(default_factory=set)
    last_instance_at: float = field(default_factory=time.monotonic)

    def meta(self) -> dict[str, Any]:
        return {
            "local_id": self.local_id,
            "destination": self.destination,
            "priority": self.priority,
            "study_instance_uid": self.study_instance_uid,
            "calling_ae_title": self.calling_ae_title,
            "created_at": self.created_at,
            "hub_id": self.hub_id,
            "closed": self.closed,
            "active_associations": self.active_associations,
            "interrupted": self.interrupted,
            "declared": self.declared,
            "declared_by": self.declared_by,
        }

    @property
    def instance_count(self) -> int:
        """Distinct instances acknowledged to the PACS: one SOP Instance UID sent twice is one."""
        return len(set(self.acknowledged.values()))


def _intact(path: Path) -> bool:
    """A spooled file is whole if its content still hashes to its name; else it goes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() == path.stem:
        return True
    path.unlink()
    return False


def _append(path: Path, line: str) -> None:
    """One line at the end of a file (O_APPEND: whole, even with several writers)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | list[bytes], tmp_dir: Path) -> None:
    tmp = tmp_dir / f"{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            for part in data if isinstance(data, list) else [data]:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves nothing half written behind
        raise
    fsync_path(path.parent)


def _write_instance(final: Path, meta: bytes, dataset: Received, reuse: Path | None) -> None:
    """Write straight to the final name, then fsync: one journal commit, not two.

    ``reuse``, a spent spool file, is renamed to the final name and written over: a new
    file costs the filesystem several times more than rewriting an old one's blocks. The
    name is the content's SHA-256, so a file cut short by a crash before its fsync (and so
    never acknowledged) is recognised and removed when the spool is recovered.
    """
    if reuse is not None:  # the caller holds the name, and nothing is under it yet
        os.rename(reuse, final)
        fd = os.open(final, os.O_WRONLY)
    else:
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # The same instance again: make sure the copy we already hold is durable.
            fsync_path(final)
            return
    try:
        data = dataset.data
        if isinstance(data, Path):  # a large instance, received into a file
            parts = [memoryview(meta)]
        else:
            parts = [memoryview(meta), memoryview(data)]
        while parts:  # one system call, unless the kernel takes only part
            written = os.writev(fd, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts.pop(0))
            if parts:
                parts[0] = parts[0][written:]
        if isinstance(data, Path):
            dataset.write_to(fd)
        if reuse is not None:
            os.ftruncate(fd, len(meta) + dataset.size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        final.unlink(missing_ok=True)
        raise
    os.close(fd)
    fsync_path(final.parent)


# Spent files kept for reuse: enough for the instances in flight to the hub, bounded in
# disk space; a large file is not kept (writing a small one over it frees most blocks).
REUSE_FILES = 256
REUSE_BYTES = 64 * 1024**2
REUSE_FILE_BYTES = 4 * 1024**2
# Free space is checked this often, and meanwhile counted down by what is written.
SPACE_CHECK_SECONDS = 1.0


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class Spool:
    def __init__(
        self, root: Path, min_free_bytes: int, disk_free: Callable[[Path], int] = _disk_free
    ) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.out = root / "out"
        self.refused = root / "refused"
        self.free = root / "free"
        for d in (self.tmp, self.out, self.refused, self.free):
            d.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self._disk_free = disk_free
        self._reusable = {p: p.stat().st_size for p in self.free.iterdir()}
        self._space: tuple[float, int] = (-SPACE_CHECK_SECONDS, 0)  # (checked at, free)
        self.changed = threading.Condition()
        self._transfers: dict[str, Outbound] = {}
        self._open: dict[tuple[str, str, str, str], str] = {}
        self._file_locks: dict[Path, tuple[threading.Lock, int]] = {}
        self._unsaved = False  # state kept in memory for want of disk space
        self._recover()

    def _recover(self) -> None:
        for leftover in self.tmp.iterdir():
            leftover.unlink()
        for folder in sorted(self.out.iterdir()):
            meta_path = folder / "meta.json"
            if not meta_path.exists():
                shutil.rmtree(folder)  # created but never held an acknowledged instance
                continue
            meta = json.loads(meta_path.read_text())
            t = Outbound(**meta)
            t.pending = {p.stem: p for p in folder.glob("*.dcm") if _intact(p)}
            t.acknowledged = self._read_acknowledged(folder, t.pending)
            self._transfers[t.local_id] = t
            if not t.closed:
                self._open[self._key(t)] = t.local_id
            if t.active_associations:
                # Associations the crash cut off: their PACS sends again what got no answer.
                t.active_associations, t.interrupted = 0, True
                self._keep(t)

    def _read_acknowledged(self, folder: Path, pending: dict[str, Path]) -> dict[str, str]:
        """The list of acknowledged instances; one written without fsync may lack the last
        few lines after a power cut: those whose file is still here are added again."""
        listed: dict[str, str] = {}
        path = folder / "instances"
        if path.exists():
            for line in path.read_text().splitlines():
                digest, _, uid = line.partition(" ")
                if uid:
                    listed[digest] = uid
        for digest, spooled in pending.items():
            if digest not in listed:
                try:
                    listed[digest] = read_header(spooled).sop_instance_uid
                except BadDataset:
                    continue
                _append(path, f"{digest} {listed[digest]}\n")
        return listed

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """One holder per file: two associations may deliver the same instance at once,
        and an upload may end while they do. A lock lives while anyone holds or awaits it
        (counted), so that a late comer never gets a fresh one beside it."""
        with self.changed:
            lock, users = self._file_locks.get(path, (threading.Lock(), 0))
            self._file_locks[path] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self.changed:
                lock, users = self._file_locks[path]
                if users == 1:
                    del self._file_locks[path]
                else:
                    self._file_locks[path] = (lock, users - 1)

    def _file(self, t: Outbound, sha: str) -> Path:
        """Where a transfer's instance is spooled: named by its content's SHA-256."""
        return self.out / t.local_id / f"{sha}.dcm"

    @staticmethod
    def _key(t: Outbound) -> tuple[str, str, str, str]:
        return (t.destination, t.priority, t.study_instance_uid, t.calling_ae_title)

    def check_space(self, incoming: int = 0) -> None:
        """Refuse what would leave less than ``min_free_bytes`` free; the disk is asked at
        most every SPACE_CHECK_SECONDS, what was accepted since counted in between."""
        with self.changed:
            checked_at, free = self._space
            now = time.monotonic()
            if now - checked_at >= SPACE_CHECK_SECONDS or free - incoming < self.min_free_bytes:
                checked_at, free = now, self._disk_free(self.root)
            if free - incoming < self.min_free_bytes and self._drop_reusable():
                # Spent files kept for reuse must not hold the disk full: they go first.
                checked_at, free = now, self._disk_free(self.root)
            if free - incoming < self.min_free_bytes:
                self._space = (checked_at, free)
                raise SpoolFull("spool disk nearly full")
            self._space = (checked_at, free - incoming)

    def _take_reusable(self) -> Path | None:
        with self.changed:
            if not self._reusable:
                return None
            path = next(iter(self._reusable))
            del self._reusable[path]
            return path

    def _spent(self, path: Path) -> None:
        """An uploaded instance's file: kept for reuse while there is room, else removed."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        with self.changed:
            keep = (
                size <= REUSE_FILE_BYTES
                and len(self._reusable) < REUSE_FILES
                and sum(self._reusable.values()) + size <= REUSE_BYTES
            )
            if keep:
                spare = self.free / uuid.uuid4().hex
                os.rename(path, spare)
                self._reusable[spare] = size
                return
        path.unlink(missing_ok=True)

    def accept(
        self,
        dataset: bytes | bytearray | Received,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        destination: str,
        priority: str,
        study_instance_uid: str,
        calling_ae_title: str,
        association: set[str],
    ) -> tuple[str, str]:
        """Store one received instance durably; returns (its SHA-256, its transfer's local id).

        ``association`` is the set of transfers the calling association has touched; a
        transfer stays open while any association that touched it is open.
        """
        if not isinstance(dataset, Received):
            dataset = Received.whole(dataset)
        meta = file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        self.check_space(len(meta) + dataset.size)
        sha = hashlib.sha256(meta)
        dataset.update(sha)
        digest = sha.hexdigest()
        t = self._transfer_for(
            destination, priority, study_instance_uid, calling_ae_title, association
        )
        final = self._file(t, digest)
        # Under the file's lock until it is pending: an upload of the same bytes that ends
        # meanwhile must not take the file away from under the entry (see ``_consume``).
        with self._writing(final):
            reuse = None if final.exists() else self._take_reusable()
            _write_instance(final, meta, dataset, reuse)
            if digest not in t.acknowledged:
                # The count the transfer declares; a line survives a crash of the process.
                _append(self.out / t.local_id / "instances", f"{digest} {sop_instance_uid}\n")
            with self.changed:
                t.acknowledged[digest] = sop_instance_uid
                t.pending[digest] = final
                t.last_instance_at = time.monotonic()
                self.changed.notify_all()
        return digest, t.local_id

    def _transfer_for(
        self,
        destination: str,
        priority: str,
        study_uid: str,
        calling_ae: str,
        association: set[str],
    ) -> Outbound:
        key = (destination, priority, study_uid, calling_ae)
        with self.changed:
            local_id = self._open.get(key)
            if local_id is not None:
                t = self._transfers[local_id]
                if local_id not in association:
                    association.add(local_id)
                    t.active_associations += 1
                    self._keep(t)
                return t
            t = Outbound(
                local_id=uuid.uuid4().hex,
                destination=destination,
                priority=priority,
                study_instance_uid=study_uid,
                calling_ae_title=calling_ae,
                created_at=time.time(),
                active_associations=1,
            )
            folder = self.out / t.local_id
            folder.mkdir()
            write_durably(folder / "meta.json", json.dumps(t.meta()).encode(), self.tmp)
            fsync_path(self.out)
            self._transfers[t.local_id] = t
            self._open[key] = t.local_id
            association.add(t.local_id)
            return t

    def association_ended(self, local_ids: set[str], aborted: bool = False) -> None:
        """An association ended: released normally, or ``aborted`` (then more may come)."""
        with self.changed:
            for local_id in local_ids:
                t = self._transfers.get(local_id)
                if t is not None:
                    t.active_associations -= 1
                    t.last_instance_at = time.monotonic()
                    if aborted:
                        t.interrupted = True
                    elif t.active_associations <= 0:
                        # The sender finished a later association: it has sent again.
                        t.interrupted = False
                    self._keep(t)
            self.changed.notify_all()

    def awaiting_resend(self, stable_seconds: float) -> list[Outbound]:
        """Open transfers cut off by an aborted association, quiet for ``stable_seconds``."""
        now = time.monotonic()
        with self.changed:
            return [
                t
                for t in (self._transfers[i] for i in self._open.values())
                if t.interrupted
                and t.active_associations <= 0
                and now - t.last_instance_at >= stable_seconds
            ]

    def counted_by_pacs(self, t: Outbound, count: int | None) -> None:
        """The sending PACS's own count of the study: reached, nothing more is coming."""
        with self.changed:
            t.pacs_count, t.pacs_asked_at = count, time.monotonic()
            if count is not None and t.instance_count >= count:
                t.interrupted = False

    def close_stable(self, stable_seconds: float, resend_seconds: float | None = None) -> None:
        """Close transfers whose study has been quiet long enough: later arrivals start anew.

        One cut off by an aborted association waits ``resend_seconds`` for the PACS to send
        again; it then closes as interrupted, unless the PACS's count shows it complete.
        """
        now = time.monotonic()
        with self.changed:
            for key, local_id in list(self._open.items()):
                t = self._transfers[local_id]
                quiet = stable_seconds
                if t.interrupted and resend_seconds is not None:
                    quiet = max(stable_seconds, resend_seconds)
                if t.active_associations <= 0 and now - t.last_instance_at >= quiet:
                    t.closed = True
                    t.declared = max(t.instance_count, t.pacs_count or 0)
                    t.declared_by = "pacs" if t.pacs_count is not None else "gateway"
                    if not self._keep(t):  # closed only once that is on disk
                        t.closed, t.declared, t.declared_by = False, None, ""
                        continue
                    del self._open[key]

    def _save(self, t: Outbound) -> None:
        write_durably(self.out / t.local_id / "meta.json", json.dumps(t.meta()).encode(), self.tmp)

    def _keep(self, t: Outbound) -> bool:
        """Save, but a full disk must not fail the caller: the state stays in memory, and
        one left behind on disk errs on the safe side (an association still counted open
        makes a restart wait for a resend). Spent files kept for reuse give way first."""
        for attempt in (1, 2):
            try:
                self._save(t)
                self._unsaved = False
                return True
            except OSError as exc:
                if attempt == 1 and self._drop_reusable():
                    continue
                if not self._unsaved:
                    log.warning("spool state not saved (%s); kept in memory", exc.strerror)
                self._unsaved = True
        return False

    def _drop_reusable(self) -> bool:
        """Give back the space of the spent files kept for reuse; False if there were none."""
        with self.changed:
            spare, self._reusable = list(self._reusable), {}
        for path in spare:
            path.unlink(missing_ok=True)
        return bool(spare)

    def set_hub_id(self, t: Outbound, hub_id: str) -> None:
        with self.changed:
            t.hub_id = hub_id
            # Unsaved, a restart asks the hub again: the transfer's key makes that harmless.
            self._keep(t)

    def by_priority(self) -> list[Outbound]:
        with self.changed:
            return sorted(
                self._transfers.values(), key=lambda t: (t.priority != "urgent", t.created_at)
            )

    def take_batch(
        self, t: Outbound, max_items: int, max_bytes: int, min_items: int = 1, settle: float = 0.0
    ) -> list[tuple[str, Path]]:
        """Instances to upload next. While they are still arriving, fewer than ``min_items``
        wait, unless the sender has paused for ``settle`` seconds: each batch costs the
        gateway and the hub a few requests, and a fast sender fills one in a moment."""
        batch: list[tuple[str, Path]] = []
        size = 0
        with self.changed:
            if t.active_associations > 0 and time.monotonic() - t.last_instance_at < settle:
                waiting = sum(1 for sha in t.pending if sha not in t.in_flight)
                if waiting < min(min_items, max_items):
                    return batch
            for sha, path in t.pending.items():
                if sha in t.in_flight:
                    continue
                try:
                    size += path.stat().st_size
                except FileNotFoundError:
                    # Cannot happen while the file locks hold; were it to, the transfer
                    # must stay open and say so, not take the entry as sent.
                    log.error("a spooled instance's file is missing; its transfer waits")
                    continue
                batch.append((sha, path))
                t.in_flight.add(sha)
                if len(batch) >= max_items or size >= max_bytes:
                    break
        return batch

    def release(self, t: Outbound, shas: list[str]) -> None:
        with self.changed:
            t.in_flight.difference_update(shas)

    @contextmanager
    def _consume(self, t: Outbound, sha: str) -> Iterator[Path | None]:
        """Take one instance out of the pending set, with its file's lock held while the
        caller moves the file away: the same bytes accepted again meanwhile either come
        before (and are covered by what the caller does) or after (and are written anew)."""
        path = self._file(t, sha)
        with self._writing(path):
            with self.changed:
                found = t.pending.pop(sha, None)
                t.in_flight.discard(sha)
            yield found

    def uploaded(self, t: Outbound, shas: list[str]) -> None:
        """The hub has these durably: the spool copy can go."""
        for sha in shas:
            with self._consume(t, sha) as path:
                if path is not None:
                    self._spent(path)

    def refuse(self, t: Outbound, sha: str, reason: str) -> None:
        """Keep a refused instance aside with its reason; it is not sent again."""
        with self._consume(t, sha) as path:
            if path is not None and path.exists():
                os.replace(path, self.refused / path.name)
                write_durably(
                    self.refused / f"{sha}.json",
                    json.dumps({"reason": reason, "destination": t.destination}).encode(),
                    self.tmp,
                )

    def is_last_batch(self, t: Outbound, batch: list[tuple[str, Path]]) -> bool:
        """Whether the transfer is closed and this batch (taken) is all it still holds."""
        with self.changed:
            return t.closed and len(t.pending) == len(batch)

    def ready_to_finish(self, t: Outbound) -> bool:
        with self.changed:
            return t.closed and not t.pending

    def finish(self, t: Outbound) -> None:
        with self.changed:
            self._transfers.pop(t.local_id, None)
        shutil.rmtree(self.out / t.local_id, ignore_errors=True)

    def pending_count(self) -> int:
        with self.changed:
            return sum(len(t.pending) for t in self._transfers.values())

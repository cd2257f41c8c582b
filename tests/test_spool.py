"""The gateway's outbound spool on a real filesystem: what an acknowledged instance leaves on
disk, the reuse of uploaded instances' files, recovery, and the free-space guard."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from imagebridge.dicom.part10 import file_meta
from imagebridge.gateway.spool import Spool, SpoolFull

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY = "1.2.3.4"


def accept(spool: Spool, uid: str, dataset: bytes, association: set[str]) -> tuple[str, str]:
    return spool.accept(
        dataset,
        sop_class_uid=CT,
        sop_instance_uid=uid,
        transfer_syntax_uid=EXPLICIT_LE,
        destination="RVH",
        priority="routine",
        study_instance_uid=STUDY,
        calling_ae_title="PACS",
        association=association,
    )


def stored(spool: Spool) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in spool.out.glob("*/*.dcm")}


def test_an_instance_is_stored_whole_under_its_digest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0)
    dataset = os.urandom(5000)
    sha, _ = accept(spool, "1.2.3.4.1", dataset, set())
    expected = file_meta(CT, "1.2.3.4.1", EXPLICIT_LE) + dataset
    assert sha == hashlib.sha256(expected).hexdigest()
    assert stored(spool) == {sha: expected}
    assert not list(spool.tmp.iterdir())


def test_files_of_uploaded_instances_are_written_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0)
    association: set[str] = set()
    big = [accept(spool, f"1.2.3.4.{i}", os.urandom(9000), association) for i in range(3)]
    [t] = spool.by_priority()
    spool.uploaded(t, [sha for sha, _ in big])
    spent = {p: p.stat().st_ino for p in spool.free.iterdir()}
    assert len(spent) == 3 and not stored(spool)

    # Shorter and longer than the files they reuse: each ends up exactly its own bytes.
    sizes = [100, 4000, 20000, 300]
    datasets = [os.urandom(n) for n in sizes]
    shas = [accept(spool, f"1.2.3.5.{i}", d, association)[0] for i, d in enumerate(datasets)]
    expected = {
        sha: file_meta(CT, f"1.2.3.5.{i}", EXPLICIT_LE) + d
        for i, (sha, d) in enumerate(zip(shas, datasets, strict=True))
    }
    assert stored(spool) == expected
    for sha, content in expected.items():
        assert sha == hashlib.sha256(content).hexdigest()
    reused = {p.stat().st_ino for p in spool.out.glob("*/*.dcm")} & set(spent.values())
    assert len(reused) == 3  # three files written over, one created
    assert not list(spool.free.iterdir())


def test_recovery_keeps_whole_instances_and_drops_one_cut_short(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0)
    association: set[str] = set()
    whole, _ = accept(spool, "1.2.3.4.1", os.urandom(3000), association)
    cut, _ = accept(spool, "1.2.3.4.2", os.urandom(3000), association)
    [t] = spool.by_priority()
    spare, _ = accept(spool, "1.2.3.4.3", os.urandom(3000), association)
    spool.uploaded(t, [spare])
    # A crash while a reused file was being written over: its name, old bytes.
    path = next(spool.out.glob(f"*/{cut}.dcm"))
    path.write_bytes(path.read_bytes()[:1000])

    again = Spool(tmp_path, min_free_bytes=0)
    [t] = again.by_priority()
    assert set(t.pending) == {whole}
    assert set(stored(again)) == {whole}
    assert len(list(again.free.iterdir())) == 1  # the spare file is still there to reuse
    sha, _ = accept(again, "1.2.3.4.9", os.urandom(100), set())
    assert not list(again.free.iterdir())
    assert set(stored(again)) == {whole, sha}


def test_too_little_disk_is_refused_and_what_is_accepted_is_counted(tmp_path: Path) -> None:
    checks: list[Path] = []

    def disk_free(path: Path) -> int:
        """A 10 MB disk holding only the spool."""
        checks.append(path)
        return 10_000_000 - sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())

    spool = Spool(tmp_path, min_free_bytes=9_000_000, disk_free=disk_free)
    association: set[str] = set()
    accept(spool, "1.2.3.4.1", os.urandom(600_000), association)
    assert len(checks) == 1
    # About 400 kB above the minimum now: the disk is asked again before refusing.
    with pytest.raises(SpoolFull):
        accept(spool, "1.2.3.4.2", os.urandom(600_000), association)
    assert len(checks) == 2
    # What still fits is taken on the count, without asking the disk.
    accept(spool, "1.2.3.4.3", os.urandom(300_000), association)
    assert len(checks) == 2
    assert len(stored(spool)) == 2


def test_a_batch_waits_for_more_while_the_study_arrives(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=0)
    association: set[str] = set()
    for i in range(3):
        accept(spool, f"1.2.3.4.{i}", os.urandom(100), association)
    [t] = spool.by_priority()
    assert spool.take_batch(t, 32, 1 << 30, min_items=8, settle=60) == []
    # A sender that has paused (settle elapsed), or a batch that is full, goes now.
    assert len(spool.take_batch(t, 2, 1 << 30, min_items=8, settle=60)) == 2
    spool.release(t, list(t.in_flight))
    assert len(spool.take_batch(t, 32, 1 << 30, min_items=8, settle=0)) == 3
    spool.release(t, list(t.in_flight))
    # Once the association has ended, whatever is there goes.
    spool.association_ended(association)
    assert len(spool.take_batch(t, 32, 1 << 30, min_items=8, settle=60)) == 3


def test_an_instance_sent_again_as_its_upload_ends_keeps_its_file(tmp_path: Path) -> None:
    """A PACS resends what got no answer; the same bytes may arrive just as the uploader
    hands their file back. The resend waits for the file, then writes it anew: an entry
    left pending without its file would hold the transfer open for ever."""
    spool = Spool(tmp_path, min_free_bytes=0)
    association: set[str] = set()
    data = os.urandom(1000)
    accept(spool, "1.2.3.4.1", data, association)
    [t] = spool.by_priority()
    batch = spool.take_batch(t, 32, 1 << 30)
    resend = threading.Thread(target=accept, args=(spool, "1.2.3.4.1", data, association))
    hand_back = spool._spent

    def spent(path: Path) -> None:
        resend.start()
        resend.join(0.3)
        assert resend.is_alive(), "the resend did not wait for the file"
        hand_back(path)

    spool._spent = spent  # type: ignore[method-assign]
    spool.uploaded(t, [sha for sha, _ in batch])
    resend.join()
    assert list(t.pending) == [sha for sha, _ in batch]
    assert all(path.exists() for path in t.pending.values())
    assert spool.take_batch(t, 32, 1 << 30) == list(t.pending.items())
    assert not t.in_flight - set(t.pending)

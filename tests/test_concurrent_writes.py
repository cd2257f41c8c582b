"""Requests that write the same rows at the same moment, as several hub processes sharing one
PostgreSQL do: each worker has its own engine, and they start together. SQLite lets one
writer in at a time; on PostgreSQL (IMAGEBRIDGE_TEST_DATABASE=postgresql) only the hub's own
locks keep them from inserting a row twice, losing a count or leasing an item twice."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from imagebridge.actors import Actor
from imagebridge.agreements.services import record_agreement
from imagebridge.audit.models import AuditEvent
from imagebridge.db import make_engine, make_sessionmaker, transaction
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.part10 import Header, read_header
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.index.services import index_instances
from imagebridge.institutions.models import Institution
from imagebridge.institutions.services import create_institution
from imagebridge.migrate import upgrade
from imagebridge.storage.models import Blob
from imagebridge.storage.services import ensure_blob_rows
from imagebridge.transfers import services
from imagebridge.transfers.models import Transfer, TransferStatus

WORKERS = 4
T = TypeVar("T")


@dataclass
class Hub:
    url: str
    sessions: sessionmaker[Session]
    seg: int
    rvh: int
    items: list[tuple[Header, str, int]]  # one study of 8 instances, as indexing takes them
    paths: list[Path]  # their files

    def gateway(self, institution_id: int) -> Actor:
        return Actor("gateway", "gw", institution_id)

    def at_once(self, work: Callable[[int, Session], T]) -> list[T]:
        """Run work(worker, session) in WORKERS threads, each with its own engine and one
        transaction, released together; every worker's error fails the test."""
        results: list[Any] = [None] * WORKERS
        errors: list[BaseException] = []
        start = threading.Barrier(WORKERS)

        def run(worker: int) -> None:
            engine = make_engine(self.url)
            try:
                with engine.connect():  # connected before the start, not after it
                    pass
                start.wait()
                with transaction(make_sessionmaker(engine)) as session:
                    results[worker] = work(worker, session)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)
            finally:
                engine.dispose()

        threads = [threading.Thread(target=run, args=(n,)) for n in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        return results

    def count(self, entity: Any) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(entity)) or 0)


@pytest.fixture
def hub(tmp_path: Path, database_url: str) -> Iterator[Hub]:
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    ids = []
    with transaction(sessions) as session:
        for code in ("SEG", "RVH"):
            institution = create_institution(session, code, code)
            record_agreement(
                session,
                institution,
                version="1",
                text_sha256="0" * 64,
                signatory_name="A Guardian",
                signatory_role="Caldicott Guardian",
                signed_on=date(2026, 1, 1),
                consent_party="sender",
                recorded_by="test",
            )
            ids.append(institution.id)
    study = generate_ct_study(tmp_path / "ct", slices=2 * WORKERS, rows=16, columns=16)
    items = [
        (read_header(p), hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
        for p in study.paths
    ]
    yield Hub(database_url, sessions, ids[0], ids[1], items, study.paths)
    engine.dispose()


def test_the_same_blobs_recorded_at_once_make_one_row_each(hub: Hub) -> None:
    sizes = {sha: size for _, sha, size in hub.items}
    hub.at_once(lambda _, session: ensure_blob_rows(session, sizes))
    assert hub.count(Blob) == len(sizes)


def test_one_study_indexed_at_once_in_parts_is_filed_once(hub: Hub) -> None:
    with transaction(hub.sessions) as session:
        ensure_blob_rows(session, {sha: size for _, sha, size in hub.items})
    hub.at_once(lambda n, session: index_instances(session, hub.seg, hub.items[n::WORKERS]))
    assert (hub.count(Patient), hub.count(Study), hub.count(Series)) == (1, 1, 1)
    assert hub.count(Instance) == len(hub.items)
    # The counts queries return, kept by each part: none lost to another.
    assert _counts(hub) == (1, len(hub.items), "CT", [len(hub.items)])


def _counts(hub: Hub) -> tuple[int, int, str, list[int]]:
    with hub.sessions() as session:
        study = session.scalars(select(Study)).one()
        series = session.scalars(select(Series.number_of_instances).order_by(Series.id)).all()
        return (
            study.number_of_series,
            study.number_of_instances,
            study.modalities_in_study,
            list(series),
        )


def test_the_counts_a_query_returns_follow_each_batch_indexed(hub: Hub, tmp_path: Path) -> None:
    # Two instances of a second series of the study, of another modality.
    other_series = generate_uid()
    others = []
    for n, path in enumerate(hub.paths[:2]):
        ds = dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.Modality = other_series, generate_uid(), "SR"
        ds.save_as(tmp_path / f"sr{n}.dcm")
        data = (tmp_path / f"sr{n}.dcm").read_bytes()
        others.append(
            (read_header(tmp_path / f"sr{n}.dcm"), hashlib.sha256(data).hexdigest(), len(data))
        )
    with transaction(hub.sessions) as session:
        ensure_blob_rows(session, {sha: size for _, sha, size in hub.items + others})
    batches = [hub.items[:3], hub.items[3:] + others[:1], hub.items[:2], others]
    expected = [
        (1, 3, "CT", [3]),
        (2, 9, "CT\\SR", [8, 1]),
        (2, 9, "CT\\SR", [8, 1]),
        (2, 10, "CT\\SR", [8, 2]),
    ]
    for batch, counts in zip(batches, expected, strict=True):
        # (The third and fourth send instances again: they are counted once.)
        with transaction(hub.sessions) as session:
            index_instances(session, hub.seg, batch)
        assert _counts(hub) == counts


def _queued_transfer(hub: Hub) -> str:
    """A transfer from SEG to RVH with the study, uploaded in parts at once, then closed."""
    with transaction(hub.sessions) as session:
        ensure_blob_rows(session, {sha: size for _, sha, size in hub.items})
        sender, receiver = (session.get_one(Institution, i) for i in (hub.seg, hub.rvh))
        transfer, _ = services.create_transfer(
            session, sender=sender, receiver=receiver, actor=hub.gateway(hub.seg), origin="dicom"
        )
        transfer_id = transfer.id

    def upload(n: int, session: Session) -> None:
        transfer = session.get_one(Transfer, transfer_id)
        services.add_instances(session, transfer, hub.items[n::WORKERS], hub.gateway(hub.seg))

    hub.at_once(upload)
    with transaction(hub.sessions) as session:
        transfer = session.get_one(Transfer, transfer_id)
        assert transfer.instances_total == len(hub.items)
        assert transfer.bytes_total == sum(size for _, _, size in hub.items)
        services.close_transfer(session, transfer, hub.gateway(hub.seg))
        assert transfer.status == TransferStatus.queued
    return transfer_id


def test_uploads_to_one_transfer_at_once_are_all_counted(hub: Hub) -> None:
    _queued_transfer(hub)
    assert hub.count(Study) == 1


def test_work_is_leased_to_one_taker_only_and_every_delivery_counts(hub: Hub) -> None:
    transfer_id = _queued_transfer(hub)

    def take(_: int, session: Session) -> list[int]:
        batch = services.next_work(session, hub.rvh, 2, 60)
        assert batch is not None and batch.transfer.id == transfer_id
        return [item.id for item in batch.instances]

    leased = hub.at_once(take)
    assert sorted(i for batch in leased for i in batch) == sorted(set().union(*leased))
    assert sum(map(len, leased)) == len(hub.items)

    def deliver(n: int, session: Session) -> None:
        transfer = session.get_one(Transfer, transfer_id)
        outcomes = [services.Outcome(i, "delivered") for i in leased[n]]
        services.record_deliveries(session, transfer, outcomes, [], hub.gateway(hub.rvh))

    hub.at_once(deliver)
    with hub.sessions() as session:
        transfer = session.get_one(Transfer, transfer_id)
        assert transfer.instances_delivered == len(hub.items)
        assert transfer.status == TransferStatus.delivered
        done = select(func.count()).where(AuditEvent.action == "transfer:transfer:delivered")
        assert session.scalar(done) == 1


def test_a_lease_stays_within_its_bytes_and_always_holds_one(hub: Hub) -> None:
    _queued_transfer(hub)
    largest = max(size for _, _, size in hub.items)
    with transaction(hub.sessions) as session:
        batch = services.next_work(session, hub.rvh, 100, 60, max_bytes=largest * 3)
        assert batch is not None and 3 <= len(batch.instances) < len(hub.items)
        assert sum(i.size for i in batch.instances) <= largest * 3
        batch = services.next_work(session, hub.rvh, 100, 60, max_bytes=1)
        assert batch is not None and len(batch.instances) == 1  # larger than asked, still one


def test_a_transfer_is_held_for_its_parties_only(hub: Hub) -> None:
    """A caller whose transfer it is not neither reads it nor holds its row: it cannot hold
    up the sender's uploads, even for the moment its refusal takes."""
    with transaction(hub.sessions) as session:
        sender, receiver = (session.get_one(Institution, i) for i in (hub.seg, hub.rvh))
        transfer, _ = services.create_transfer(
            session, sender=sender, receiver=receiver, actor=hub.gateway(hub.seg), origin="dicom"
        )
        transfer_id = transfer.id
    stranger = Transfer.sender_institution_id == hub.rvh  # the receiver, as a sender
    with transaction(hub.sessions) as session:
        assert services.hold(session, transfer_id, stranger) is None
        if session.get_bind().dialect.name == "postgresql":  # SQLite has no row locks
            # Another transaction takes the row at once: nothing holds it.
            with transaction(hub.sessions) as other:
                taken = select(Transfer.id).where(Transfer.id == transfer_id)
                assert other.scalars(taken.with_for_update(nowait=True)).one() == transfer_id
        held = services.hold(session, transfer_id, Transfer.sender_institution_id == hub.seg)
        assert held is not None and held.id == transfer_id

"""The database layer gives the same answers on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError

from hubapp import InProcessHub
from imagebridge import db
from imagebridge.db import make_engine, make_sessionmaker, transaction
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.migrate import upgrade
from imagebridge.storage.models import Blob
from imagebridge.transfers.framing import MEDIA_TYPE, encode_files


def test_times_come_back_in_utc_whatever_the_session_zone(database_url: str) -> None:
    # The tests' PostgreSQL answers in Asia/Kolkata; a hub in any zone must read UTC.
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        written = datetime(2026, 6, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
        with transaction(sessions) as session:
            session.add(Blob(sha256="a" * 64, size=1, created_at=written))
        with sessions() as session:
            read = session.scalars(select(Blob.created_at)).one()
        assert read == written and read.tzinfo == UTC
        assert read.isoformat() == "2026-06-02T04:30:00+00:00"
    finally:
        engine.dispose()


def test_text_the_database_cannot_hold_is_refused_with_the_reason(tmp_path: Path) -> None:
    """PostgreSQL holds no NUL character in text (SQLite does): a search or a retrieve that
    carries one is answered 400 with the reason, and audited, never with a crash."""
    hub = InProcessHub(tmp_path / "hub")
    try:
        hub.add_institution("SEG")
        for url, path, params in (
            ("/api/v1/audit", "/api/v1/audit", {"patient": "P\x001", "study": "1.2\x00"}),
            ("/dicomweb/studies/1.2%00.3", "/dicomweb/studies/1.2\x00.3", {}),
            ("/api/v1/transfers", "/api/v1/transfers", {"status": "queued\x00"}),
        ):
            r = hub.client().get(url, params=params, headers=hub.admin_headers)
            assert r.status_code in (200, 400, 404), (url, r.status_code, r.text)
            if r.status_code == 400:
                assert r.json()["detail"] == "text may not contain NUL characters"
                events = hub.admin("GET", "/api/v1/audit", params={"action": "http:request:"})
                assert [e["detail"]["status"] for e in events.json()][-1] == 400
                assert [e["detail"]["path"] for e in events.json()][-1] == path
    finally:
        hub.close()


def test_an_instance_with_a_nul_in_its_text_is_refused_on_its_own(tmp_path: Path) -> None:
    """NUL pads only UIDs in DICOM, and PostgreSQL stores none: the instance is refused with
    the reason on either database, and the rest of its batch is filed."""
    study = generate_ct_study(tmp_path / "ct", slices=2, rows=16, columns=16)
    damaged = dcmread(study.paths[0])
    damaged.PatientName = "DOE^A\x00NNE"
    damaged.save_as(study.paths[0])
    hub = InProcessHub(tmp_path / "hub")
    try:
        hub.add_institution("SEG")
        hub.add_institution("RVH")
        headers = {"Authorization": f"Bearer {hub.gateway_token('SEG')}"}
        client = hub.client()
        r = client.post(
            "/api/v1/transfers", headers=headers, json={"receiver": "RVH", "origin": "dicom"}
        )
        items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in study.paths]
        r = client.post(
            f"/api/v1/transfers/{r.json()['id']}/instances",
            headers={**headers, "Content-Type": MEDIA_TYPE},
            content=b"".join(encode_files(items)),
        )
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == [items[1][0]]
        assert r.json()["refused"] == [
            {"sha256": items[0][0], "reason": "a text value of the instance holds a NUL character"}
        ]
    finally:
        hub.close()


def _no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
    # SQLite's own wait for its lock turned off: a writer that met a taken lock would fail.
    dbapi_connection.execute("PRAGMA busy_timeout=0")


def test_sqlite_writers_in_one_process_take_turns_without_sqlite_busy_waits(
    tmp_path: Path,
) -> None:
    """The process's writers queue for SQLite's write lock among themselves and go as soon
    as it is free; with SQLite's own waiting turned off, none meets the lock taken. The turn
    passes on however a transaction ends: commit, rollback, an error, a connection given
    back or dropped mid-transaction, a BEGIN that fails."""
    engine = make_engine(f"sqlite:///{tmp_path / 'turns.db'}")
    event.listen(engine, "connect", _no_busy_wait)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE counter (n INTEGER)"))
            conn.execute(text("INSERT INTO counter VALUES (0)"))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.rollback()
        with pytest.raises(RuntimeError), engine.begin() as conn:
            conn.execute(text("UPDATE counter SET n = n + 1"))
            raise RuntimeError
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))  # begun, then given back without an end
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.invalidate()

        # A BEGIN that fails (another engine, as another process would, holds SQLite's
        # lock, and SQLite is not to wait) is SQLAlchemy's error, and leaves the turn free.
        other = make_engine(f"sqlite:///{tmp_path / 'turns.db'}")
        try:
            with other.begin() as holding:
                holding.execute(text("SELECT 1"))
                with pytest.raises(OperationalError, match="locked"), engine.begin():
                    pass
        finally:
            other.dispose()

        def add(times: int) -> None:
            for _ in range(times):
                with engine.begin() as conn:
                    n = conn.execute(text("SELECT n FROM counter")).scalar_one()
                    conn.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(add, [50] * 8))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT n FROM counter")).scalar_one() == 400
    finally:
        engine.dispose()


def test_a_sqlite_writer_that_waits_too_long_for_its_turn_gets_the_database_s_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered as the database being unavailable (the hub's 503), not as a crash."""
    monkeypatch.setattr(db, "BUSY_SECONDS", 0.2)
    engine = make_engine(f"sqlite:///{tmp_path / 'wait.db'}")
    try:
        with engine.begin() as holding:
            holding.execute(text("SELECT 1"))
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(lambda: engine.begin().__enter__())
                with pytest.raises(OperationalError, match="waited for this process"):
                    waiting.result()
        with engine.begin() as conn:  # and the turn is free again
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()

"""The database layer gives the same answers on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import select

from imagebridge.db import make_engine, make_sessionmaker, transaction
from imagebridge.migrate import upgrade
from imagebridge.storage.models import Blob


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

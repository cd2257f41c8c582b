"""Database engine, sessions and the declarative base shared by every area's models."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    DateTime,
    Engine,
    MetaData,
    any_,
    bindparam,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# How long a transaction waits for SQLite's write lock before it fails.
BUSY_SECONDS = 30


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        # PostgreSQL answers in the session's time zone, which need not be UTC.
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": BUSY_SECONDS},
            pool_use_lifo=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        _WriterTurns(engine)
        return engine
    # pool_use_lifo (both backends): the most recently used connection first. It has this
    # process's statements prepared (psycopg prepares one after its fifth use on a
    # connection; SQLite caches them per connection); handed out in turn, all stay cold.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_use_lifo=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, decide when transactions begin.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
    # The query planner needs statistics to pick the search indexes; this gathers them for
    # tables that have none or changed much, cheaply (SQLite's advice for new connections).
    cursor.execute("PRAGMA optimize=0x10002")
    cursor.close()


class _WriterTurns:
    """SQLite's write lock, taken up front (BEGIN IMMEDIATE: a read that later writes would
    otherwise deadlock-fail), and queued for within the process.

    A transaction that finds the lock taken is otherwise left to SQLite's busy handler,
    which sleeps and tries again (1, 2, 5, 10... ms): the lock then stands idle while the
    next writer sleeps. Here the process's own writers wait on a lock of its own, and the
    next goes as soon as the last has committed; SQLite's handler is left to settle turns
    with other processes (a worker, a command) only.

    The engine's own dialect begins and ends the transactions, so that a failure to begin
    is SQLAlchemy's like any other (an OperationalError: the hub answers 503).
    """

    def __init__(self, engine: Engine) -> None:
        self._lock = threading.Lock()
        self._guard = threading.Lock()  # over _holder
        self._holder: Any = None  # the DBAPI connection whose transaction has the turn
        # Dropped mid-transaction (invalidated), a connection ends without a rollback.
        event.listen(engine.pool, "invalidate", self._release)
        dialect = engine.dialect
        commit, rollback = dialect.do_commit, dialect.do_rollback

        def do_begin(connection: Any) -> None:
            if not self._lock.acquire(timeout=BUSY_SECONDS):
                raise sqlite3.OperationalError("database is locked (waited for this process)")
            raw = connection.dbapi_connection
            with self._guard:
                self._holder = raw
            try:
                connection.execute("BEGIN IMMEDIATE")
            except BaseException:
                self._release(raw)
                raise

        def do_commit(connection: Any) -> None:
            try:
                commit(connection)
            finally:
                self._release(connection)

        def do_rollback(connection: Any) -> None:
            try:
                rollback(connection)
            finally:
                self._release(connection)

        for name, method in (("begin", do_begin), ("commit", do_commit), ("rollback", do_rollback)):
            setattr(dialect, f"do_{name}", method)

    def _release(self, connection: Any, *_: Any) -> None:
        # Any connection ending anything (a rollback on its return to the pool, say): only
        # the holder's end passes the turn on.
        raw = getattr(connection, "dbapi_connection", connection)
        with self._guard:
            if raw is None or raw is not self._holder:
                return
            self._holder = None
        self._lock.release()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def take_turns(session: Session, area: int, key: int) -> None:
    """Make the transactions that write under the same (area, key) run one after another,
    each holding its turn until it ends.

    SQLite runs one writer at a time already (BEGIN IMMEDIATE). PostgreSQL runs them together,
    and two transactions that each look for a row, find none and insert it would both insert;
    a transaction-scoped advisory lock makes the second look after the first has committed.
    Both keys are 32-bit integers, `area` naming what the lock guards.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:area, :key)"), {"area": area, "key": key}
        )


def insert_missing(session: Session, entity: Any, rows: list[dict[str, Any]]) -> None:
    """Insert the rows whose key is not taken yet; leave the others as they are.

    ON CONFLICT DO NOTHING, where looking first and then inserting would fail on PostgreSQL
    when another transaction inserts the same key in between.
    """
    if not rows:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(dialect.insert(entity).on_conflict_do_nothing(), rows)


def one_of(session: Session, column: Any, values: Collection[Any]) -> ColumnElement[bool]:
    """``column IN values`` for a list that may be hundreds long.

    On PostgreSQL the list is one array parameter (``= ANY``): an IN list is rendered as one
    placeholder per value, and rendering and parsing hundreds of them costs more than the
    query. SQLite has no arrays; its IN list is cheap to parse.
    """
    condition: ColumnElement[bool]
    if session.get_bind().dialect.name == "postgresql":
        condition = column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    else:
        condition = column.in_(list(values))
    return condition


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session

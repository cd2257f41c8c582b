"""Bring a database to the newest schema with the packaged Alembic migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text

HERE = Path(__file__).parent / "migrations"
LOCK_KEY = 0x49424D4947524154  # pg_advisory_xact_lock key ("IBMIGRAT")


def alembic_config() -> Config:
    config = Config(str(HERE / "alembic.ini"))
    config.set_main_option("script_location", str(HERE))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # SQLite alters a column by copying the table and dropping the old one, which
            # foreign keys pointing at its rows would refuse: off for the migration (only
            # outside a transaction does SQLite take it), and checked before the commit.
            _driver(connection).execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if not sqlite:
                    # Hubs and workers starting together: one migrates, the others wait,
                    # then find nothing left to do (the lock lasts as long as the migration).
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY}
                    )
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise RuntimeError("a migration left rows whose foreign keys match nothing")
        finally:
            if sqlite:
                _driver(connection).execute("PRAGMA foreign_keys=ON")


def _driver(connection: Connection) -> Any:
    """The driver's own connection: its statements run outside SQLAlchemy's transaction."""
    return connection.connection.dbapi_connection

"""The migrations build exactly the schema the models describe, and the audit is append-only."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DatabaseError

from imagebridge.db import make_engine
from imagebridge.migrate import alembic_config, upgrade
from imagebridge.models import Base


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_migrations_match_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        assert _differences(engine) == [], "models and migrations differ"
    finally:
        engine.dispose()


def test_every_migration_downgrades_and_upgrades_again(database_url: str) -> None:
    engine = make_engine(database_url)
    config = alembic_config()
    try:
        upgrade(engine)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_the_audit_trail_refuses_change(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_events (at, actor_type, actor, action, outcome, patient_ref,"
                " study_ref, transfer_ref, source_address, detail)"
                " VALUES ('2026-01-01', 'system', '', 'a:b:c', 'success', '', '', '', '', '{}')"
            )
        )
    for statement in ("UPDATE audit_events SET outcome = 'failure'", "DELETE FROM audit_events"):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))

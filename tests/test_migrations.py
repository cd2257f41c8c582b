"""The migrations build exactly the schema the models describe, and the audit is append-only."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from imagebridge.db import make_engine
from imagebridge.migrate import upgrade
from imagebridge.models import Base


def test_migrations_match_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"


def test_the_audit_trail_refuses_change(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
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

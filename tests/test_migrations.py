"""The migrations build exactly the schema the models describe, and the audit is append-only."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from imagebridge.accounts import services as accounts
from imagebridge.accounts.models import User, WebSession
from imagebridge.db import make_engine, make_sessionmaker, transaction
from imagebridge.index.models import Patient
from imagebridge.institutions.services import create_institution
from imagebridge.migrate import alembic_config, upgrade
from imagebridge.models import Base
from imagebridge.storage.services import ensure_blob_rows


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
        # A patient it names among several: as evidence as the event itself.
        connection.execute(
            text("INSERT INTO audit_event_patients (event_id, patient_ref) VALUES (1, 'P1')")
        )
    for statement in (
        "UPDATE audit_events SET outcome = 'failure'",
        "DELETE FROM audit_events",
        "UPDATE audit_event_patients SET patient_ref = 'P2'",
        "DELETE FROM audit_event_patients",
    ):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))


def test_the_counts_of_studies_indexed_before_they_were_kept_are_counted(
    database_url: str,
) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0009")
        # Tables 0010 leaves alone are written with the models, the others as they were.
        with transaction(make_sessionmaker(engine)) as session:
            create_institution(session, "SEG", "SEG")
            session.add(Patient(id=1, institution_id=1, patient_id="P1"))
            ensure_blob_rows(session, {"a": 1})
        with engine.begin() as connection:
            for study in (1, 2):
                connection.execute(
                    text(
                        "INSERT INTO studies (id, institution_id, patient_ref, study_instance_uid,"
                        " study_date, study_time, accession_number, study_description,"
                        " created_at) VALUES (:id, 1, 1, :uid, '', '', '', '', '2026-01-01')"
                    ),
                    {"id": study, "uid": f"1.{study}"},
                )
            # Study 1: a CT series of 3 and an SR of 1 and an MR of none; study 2: nothing.
            for series, modality, instances in ((1, "CT", 3), (2, "SR", 1), (3, "MR", 0)):
                connection.execute(
                    text(
                        "INSERT INTO series (id, study_id, series_instance_uid, modality,"
                        " series_number, series_description) VALUES (:id, 1, :uid, :m, '', '')"
                    ),
                    {"id": series, "uid": f"1.1.{series}", "m": modality},
                )
                for n in range(instances):
                    connection.execute(
                        text(
                            "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid,"
                            " transfer_syntax_uid, instance_number, blob_sha256, size,"
                            " created_at) VALUES (:s, :uid, '1', '1', '', 'a', 1, '2026-01-01')"
                        ),
                        {"s": series, "uid": f"1.1.{series}.{n}"},
                    )
        upgrade(engine)
        with engine.connect() as connection:
            studies = connection.execute(
                text(
                    "SELECT number_of_series, number_of_instances, modalities_in_study"
                    " FROM studies ORDER BY id"
                )
            ).all()
            series = connection.execute(
                text("SELECT number_of_instances FROM series ORDER BY id")
            ).scalars()
            assert [tuple(s) for s in studies] == [(3, 4, "CT\\MR\\SR"), (0, 0, "")]
            assert list(series) == [3, 1, 0]
        # And back, with the rows there (instances refer to series, series to studies).
        config = alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0009")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM instances")).scalar() == 4
    finally:
        engine.dispose()


def test_lookups_audited_before_patients_were_indexed_are_found_by_patient(
    database_url: str,
) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0011")
        with engine.begin() as connection:
            for n, (patient, detail) in enumerate(
                (
                    ("", '{"operation": "local-ids", "nhs_numbers": ["9434765919", "9434765870"]}'),
                    ("9434765919", '{"operation": "local-id", "nhs_numbers": ["9434765919"]}'),
                    ("", '{"operation": "pix"}'),
                    # Forwarded by a gateway, whose events say what it says: nothing to index.
                    ("", '{"nhs_numbers": null}'),
                    ("", '{"nhs_numbers": "9434765919"}'),
                    ("", '{"nhs_numbers": [42, null, "9434765919"]}'),
                ),
                1,
            ):
                connection.execute(
                    text(
                        "INSERT INTO audit_events (at, actor_type, actor, action, outcome,"
                        " patient_ref, study_ref, transfer_ref, source_address, detail,"
                        " prev_hash, hash) VALUES ('2026-01-01', 'gateway', 'g',"
                        " 'patient:identity:lookup', 'success', :p, '', '', '', :d, :n, '')"
                    ),
                    {"p": patient, "d": detail, "n": str(n)},
                )
        upgrade(engine)
        with engine.connect() as connection:
            named = connection.execute(
                text("SELECT event_id, patient_ref FROM audit_event_patients ORDER BY 2, 1")
            ).all()
        # The batch's two numbers; the lookup of one patient has its patient_ref already.
        assert [tuple(row) for row in named] == [
            (1, "9434765870"),
            (1, "9434765919"),
            (6, "9434765919"),
        ]
    finally:
        engine.dispose()


def _clerk(session: Session) -> User:
    """A user with a role, in an institution of their own."""
    accounts.ensure_builtin_roles(session)
    return accounts.create_user(
        session,
        institution=create_institution(session, "SEG", "SEG"),
        username="clerk",
        password="a long enough passphrase 1",
        role_names=["clerk"],
    )


def test_an_upgrade_keeps_users_their_roles_and_sessions(database_url: str) -> None:
    """0011 alters the users table, which SQLite does by copying it: rows pointing at users
    (their roles, sessions) must not stop it, and come through whole."""
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0010")
        # Tables 0011 leaves alone, and users but for a column's length: written with the models.
        with transaction(make_sessionmaker(engine)) as session:
            user = _clerk(session)
            user.totp_secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
            session.add(WebSession(user=user, token_sha256="a", source_address="127.0.0.1"))
        upgrade(engine)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT username, totp_secret FROM users")).all() == [
                ("clerk", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
            ]
            assert connection.execute(text("SELECT count(*) FROM user_roles")).scalar() == 1
            assert connection.execute(text("SELECT count(*) FROM web_sessions")).scalar() == 1
            if engine.dialect.name == "sqlite":  # on again for the hub's transactions
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_going_back_past_sealed_second_factors_is_refused(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        with transaction(make_sessionmaker(engine)) as session:
            user = _clerk(session)
            user.totp_secret = "s1.0123456789abcdef.c2VhbGVk"
        config = alembic_config()
        with (
            pytest.raises(RuntimeError, match="second factors are sealed"),
            engine.begin() as connection,
        ):
            config.attributes["connection"] = connection
            command.downgrade(config, "0010")
    finally:
        engine.dispose()

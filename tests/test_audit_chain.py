"""The audit trail's hash chain: written in order under concurrency, and any tampering found."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from imagebridge.audit.chain import FIELDS, GENESIS, Anchor, event_hash
from imagebridge.audit.models import AuditEvent
from imagebridge.audit.services import record, verify_chain
from imagebridge.db import make_engine, make_sessionmaker, transaction
from imagebridge.demo.network import Network, write_toml
from imagebridge.migrate import upgrade


@dataclass
class Trail:
    folder: Path
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @property
    def config(self) -> Path:
        path = self.folder / "hub.toml"
        if not path.exists():
            url = self.engine.url.render_as_string(hide_password=False)
            write_toml(path, {"data_dir": ".", "database_url": url})
        return path

    def add(self, count: int, **fields: Any) -> None:
        with transaction(self.sessions) as session:
            for i in range(count):
                record(session, "test:event:recorded", detail={"i": i}, **fields)

    def rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            table = AuditEvent.__table__
            return [dict(r) for r in c.execute(select(table).order_by(table.c.id)).mappings()]

    def tamper(self, *statements: str, **params: Any) -> None:
        """What an intruder with the database file does: lift the guard, then write."""
        with self.engine.begin() as c:
            if self.postgresql:
                c.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            else:
                c.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
                c.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
            for statement in statements:
                c.execute(text(statement), params)

    def forge(self, values: dict[str, Any]) -> None:
        values = {**values, "detail": json.dumps(values["detail"])}
        if not self.postgresql:  # stored as SQLAlchemy stores it there: text, no zone
            values["at"] = values["at"].strftime("%Y-%m-%d %H:%M:%S.%f")
        columns = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        self.tamper(f"INSERT INTO audit_events ({columns}) VALUES ({marks})", **values)

    def verify_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "imagebridge",
                "audit",
                "verify",
                "--config",
                str(self.config),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def trail(tmp_path: Path, database_url: str) -> Iterator[Trail]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield Trail(tmp_path, engine, make_sessionmaker(engine))
    engine.dispose()


def _forged(row: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A row as a careful forger writes it: fields changed and the hash made to fit."""
    values = {**row, **changes}
    values["hash"] = event_hash(values)
    return values


def test_the_hash_covers_every_stored_field() -> None:
    columns = {c.name for c in AuditEvent.__table__.columns}
    assert set(FIELDS) | {"hash"} == columns


def test_events_chain_in_id_order_within_and_across_transactions(trail: Trail) -> None:
    later = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    with transaction(trail.sessions) as session:
        first = record(session, "test:event:one")
        second = record(session, "test:event:two")
        session.flush()
        third = record(session, "test:event:three", patient_ref="P1", study_ref="1.2.3")
        # Callers may still set fields before the flush (the gateway journal's own times).
        third.at = later
    trail.add(2)
    rows = trail.rows()
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["action"] for r in rows[:3]] == [
        "test:event:one",
        "test:event:two",
        "test:event:three",
    ]
    assert (first.id, second.id, third.id) == (1, 2, 3)
    assert rows[0]["prev_hash"] == GENESIS
    for before, after in itertools.pairwise(rows):
        assert after["prev_hash"] == before["hash"]
    assert all(event_hash(r) == r["hash"] for r in rows)
    assert rows[2]["at"] == later
    report = verify_chain(trail.sessions)
    assert report.intact and report.events == 5 and report.head_hash == rows[-1]["hash"]


def test_concurrent_transactions_never_fork_the_chain(trail: Trail) -> None:
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            for _ in range(10):
                with transaction(trail.sessions) as session:
                    record(session, "test:event:recorded", actor=f"w{worker}")
                    record(session, "test:event:recorded", actor=f"w{worker}")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = verify_chain(trail.sessions)
    assert report.intact and report.events == 120
    rows = trail.rows()
    # The two events of one transaction are neighbours: nothing came between them.
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        assert a["actor"] == b["actor"]


def test_a_second_event_after_the_same_head_is_refused(trail: Trail) -> None:
    trail.add(2)
    row = trail.rows()[0]
    with pytest.raises(IntegrityError), trail.engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO audit_events (id, at, actor_type, actor, action, outcome, patient_ref,"
                " study_ref, transfer_ref, source_address, detail, prev_hash, hash) VALUES (9,"
                " '2026-01-01', 'system', '', 'a:b:c', 'success', '', '', '', '', '{}', :p, :h)"
            ),
            {"p": row["prev_hash"], "h": "0" * 64},
        )


def test_an_altered_event_is_found_by_the_command(trail: Trail) -> None:
    trail.add(5)
    intact = trail.verify_cli()
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.startswith("intact: 5 events; head 5 ")

    trail.tamper("UPDATE audit_events SET outcome = 'failure' WHERE id = 3")
    broken = trail.verify_cli()
    assert broken.returncode == 1
    assert "event 3 altered" in broken.stdout
    assert "2 events verified before it" in broken.stdout


@pytest.mark.parametrize("column", ["id", "at", "detail", "prev_hash"])
def test_every_stored_field_is_covered(trail: Trail, column: str) -> None:
    trail.add(3)
    changes = {
        "id": "UPDATE audit_events SET id = 7 WHERE id = 3",
        "at": "UPDATE audit_events SET at = '2020-01-01 00:00:00.000000' WHERE id = 2",
        "detail": """UPDATE audit_events SET detail = '{"i": 5}' WHERE id = 2""",
        # Another first digit, whatever the hash's was.
        "prev_hash": "UPDATE audit_events SET prev_hash = CASE WHEN prev_hash LIKE 'a%'"
        " THEN 'b' ELSE 'a' END || substr(prev_hash, 2) WHERE id = 2",
    }
    trail.tamper(changes[column])
    report = verify_chain(trail.sessions)
    assert not report.intact and report.fault is not None
    assert report.fault.event_id == (7 if column == "id" else 2)


def test_an_altered_event_with_its_hash_recomputed_is_found(trail: Trail) -> None:
    trail.add(5)
    row = trail.rows()[2]
    forged = _forged(row, outcome="failure")
    trail.tamper("DELETE FROM audit_events WHERE id = 3")
    trail.forge(forged)
    report = verify_chain(trail.sessions)
    assert report.fault is not None
    assert (report.fault.event_id, report.fault.kind) == (3, "altered")


def test_a_forged_event_inserted_in_the_middle_is_found(trail: Trail) -> None:
    trail.add(5)
    rows = trail.rows()
    # Make room at id 3 by renumbering the later events, then slip in a well-formed event.
    for n in (5, 4, 3):
        trail.tamper(f"UPDATE audit_events SET id = {n + 1} WHERE id = {n}")
    trail.tamper("DROP INDEX ix_audit_events_prev_hash")
    trail.forge(_forged(rows[2], actor="intruder"))
    report = verify_chain(trail.sessions)
    assert report.fault is not None
    assert (report.fault.event_id, report.fault.kind) == (3, "inserted")


def test_a_forged_event_appended_as_a_branch_is_found(trail: Trail) -> None:
    trail.add(5)
    rows = trail.rows()
    trail.tamper("DROP INDEX ix_audit_events_prev_hash")
    # Well-formed, but it follows event 2, which event 3 already follows.
    trail.forge(_forged(rows[2], id=6, actor="intruder"))
    report = verify_chain(trail.sessions)
    assert report.fault is not None
    assert (report.fault.event_id, report.fault.kind) == (6, "inserted")


def test_a_crude_forgery_is_found_by_the_command(trail: Trail) -> None:
    trail.add(3)
    row = trail.rows()[-1]
    trail.forge(_forged(row, id=4, prev_hash="f" * 64) | {"hash": "e" * 64})
    result = trail.verify_cli()
    assert result.returncode == 1
    assert "event 4 inserted" in result.stdout


def test_a_deleted_event_is_found_by_the_command(trail: Trail) -> None:
    trail.add(5)
    trail.tamper("DELETE FROM audit_events WHERE id = 3")
    result = trail.verify_cli()
    assert result.returncode == 1
    assert "event 3 deleted: event 3 is missing" in result.stdout


def test_deleting_the_first_event_is_found(trail: Trail) -> None:
    trail.add(3)
    trail.tamper("DELETE FROM audit_events WHERE id = 1")
    report = verify_chain(trail.sessions)
    assert report.fault is not None
    assert (report.fault.event_id, report.fault.kind) == (1, "deleted")


def test_deleting_the_last_events_is_found_against_an_anchor(trail: Trail) -> None:
    trail.add(5)
    head = trail.verify_cli().stdout.split()[-2:]  # "head 5 <hash>" as printed
    anchor = ":".join(head)
    trail.tamper("DELETE FROM audit_events WHERE id >= 4")
    # Without an anchor the shorter chain is consistent; with one it is not.
    assert trail.verify_cli().returncode == 0
    result = trail.verify_cli("--anchor", anchor)
    assert result.returncode == 1
    assert "event 4 deleted: events 4 to 5 are missing" in result.stdout
    # Rewriting the tail to fit is no better: the anchored hash is gone.
    trail.add(2)
    result = trail.verify_cli("--anchor", anchor)
    assert result.returncode == 1
    assert "event 5 altered" in result.stdout


def test_the_forwarding_cursor_anchors_the_tail_and_moves_only_forward(trail: Trail) -> None:
    trail.add(5)
    head = trail.rows()[-1]
    with trail.engine.begin() as c:
        c.execute(
            text("UPDATE audit_forwarding SET event_id = 5, event_hash = :h WHERE id = 1"),
            {"h": head["hash"]},
        )
    for statement in (
        "UPDATE audit_forwarding SET event_id = 3 WHERE id = 1",
        "UPDATE audit_forwarding SET event_hash = 'x' WHERE id = 1",
        "DELETE FROM audit_forwarding",
    ):
        with pytest.raises(DatabaseError, match="only moves forward"), trail.engine.begin() as c:
            c.execute(text(statement))
    trail.tamper("DELETE FROM audit_events WHERE id = 5")
    report = verify_chain(trail.sessions)
    assert report.fault is not None
    assert (report.fault.event_id, report.fault.kind) == (5, "deleted")
    assert "audit repository" in report.fault.reason


def test_verify_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    write_toml(config, {"data_dir": "nowhere"})
    result = subprocess.run(
        [sys.executable, "-m", "imagebridge", "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "no database at" in result.stderr
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ValueError):
        Anchor.parse("5:abc")


def _hub_trail(net: Network) -> Trail:
    engine = make_engine(net.hub_database_url)
    return Trail(net.root / "hub", engine, make_sessionmaker(engine))


def test_the_auditor_verifies_and_searches_over_http(network: Network) -> None:
    trail = _hub_trail(network)
    try:
        with trail.engine.connect() as c:
            seg = c.execute(text("SELECT id FROM institutions WHERE code = 'SEG'")).scalar_one()
        now = datetime.now(UTC)
        trail.add(2, patient_ref="SEG778899", actor="alice", institution_id=seg)
        trail.add(1, patient_ref="RVH0042", actor="bob")
        with network.admin() as admin:
            ok = admin.get("/api/v1/audit/verify").json()
            assert ok["intact"] is True and ok["fault"] is None
            assert ok["head"]["id"] == ok["events"] >= 3

            def ids(**params: Any) -> list[int]:
                r = admin.get("/api/v1/audit", params=params)
                assert r.status_code == 200, r.text
                return [e["id"] for e in r.json()]

            mine = ids(patient="SEG778899")
            assert len(mine) == 2
            assert ids(user="alice") == mine
            assert ids(institution="seg", action="test:") == mine
            assert ids(user="bob", patient="SEG778899") == []
            since = (now - timedelta(seconds=1)).isoformat()
            assert len(ids(since=since, action="test:event:recorded")) == 3
            assert ids(until=(now - timedelta(hours=1)).isoformat(), action="test:") == []
            naive = admin.get("/api/v1/audit", params={"since": "2026-01-01T00:00:00"})
            assert naive.status_code == 422 and "time zone" in naive.text

            trail.tamper("UPDATE audit_events SET actor = 'mallory' WHERE actor = 'alice'")
            broken = admin.get("/api/v1/audit/verify").json()
            assert broken["intact"] is False
            assert broken["fault"]["event_id"] == mine[0]
            assert broken["fault"]["kind"] == "altered"
            anchored = admin.get("/api/v1/audit/verify", params={"anchor": "bad"})
            assert anchored.status_code == 422
            verified = admin.get("/api/v1/audit", params={"action": "audit:trail:verified"})
            assert [e["outcome"] for e in verified.json()] == ["success", "failure"]
        assert httpx.get(f"{network.hub_url}/api/v1/audit/verify").status_code == 401
    finally:
        trail.engine.dispose()


# -- PostgreSQL: several hub processes append at once ---------------------------------------


def test_postgresql_appenders_take_turns_on_the_chain(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def append(worker: int) -> None:
            # Each worker its own engine, as separate hub processes would have.
            own = make_engine(postgres_url)
            try:
                start.wait()
                for _ in range(15):
                    with transaction(make_sessionmaker(own)) as session:
                        record(session, "test:event:recorded", actor=f"w{worker}")
                        session.flush()
                        record(session, "test:event:recorded", actor=f"w{worker}")
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)
            finally:
                own.dispose()

        threads = [threading.Thread(target=append, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        report = verify_chain(sessions)
        assert report.intact and report.events == 240

        with engine.begin() as c:
            c.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            c.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = 100"))
        report = verify_chain(sessions)
        assert report.fault is not None
        assert (report.fault.event_id, report.fault.kind) == (100, "altered")
    finally:
        engine.dispose()

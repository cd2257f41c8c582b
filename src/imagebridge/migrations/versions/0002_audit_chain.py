"""audit hash chain and forwarding cursor

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import imagebridge.db
from imagebridge.audit.chain import GENESIS, event_hash

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The audit table as this revision knows it, for chaining the events already stored.
_events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer()),
    sa.column("at", imagebridge.db.UTCDateTime(timezone=True)),
    sa.column("actor_type", sa.String()),
    sa.column("actor", sa.String()),
    sa.column("institution_id", sa.Integer()),
    sa.column("action", sa.String()),
    sa.column("outcome", sa.String()),
    sa.column("patient_ref", sa.String()),
    sa.column("study_ref", sa.String()),
    sa.column("transfer_ref", sa.String()),
    sa.column("source_address", sa.String()),
    sa.column("detail", sa.JSON()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)


def upgrade() -> None:
    op.create_table(
        "audit_forwarding",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("event_hash", sa.String(length=64), nullable=False),
        sa.Column("updated_at", imagebridge.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_forwarding")),
    )
    op.execute("INSERT INTO audit_forwarding (id, event_id, event_hash) VALUES (1, 0, '')")
    _forward_only_cursor()

    # ADD COLUMN and CREATE INDEX only: SQLite keeps the table, and so its triggers.
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("prev_hash", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("hash", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.create_index(batch_op.f("ix_audit_events_actor"), ["actor"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_audit_events_patient_ref"), ["patient_ref"], unique=False
        )
    _chain_stored_events()
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_prev_hash"), ["prev_hash"], unique=True)


def _chain_stored_events() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(_events).order_by(_events.c.id)).mappings().all()
    if not rows:
        return
    # The one sanctioned rewrite of the trail: give the events stored before the chain existed
    # their hashes, with the append-only guard lifted for this transaction only.
    _append_only(False)
    prev = GENESIS
    for row in rows:
        values = dict(row, prev_hash=prev)
        prev = event_hash(values)
        bind.execute(
            _events.update()
            .where(_events.c.id == row["id"])
            .values(prev_hash=values["prev_hash"], hash=prev)
        )
    _append_only(True)


def _append_only(on: bool) -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            name = f"audit_events_no_{verb.lower()}"
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {verb} ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
                if on
                else f"DROP TRIGGER {name}"
            )
    elif dialect == "postgresql":
        verb = "ENABLE" if on else "DISABLE"
        op.execute(f"ALTER TABLE audit_events {verb} TRIGGER audit_events_append_only")


def _forward_only_cursor() -> None:
    # The cursor is an anchor of the chain: moving it back or rewriting it would hide deletions.
    message = "the audit forwarding cursor only moves forward"
    backwards = (
        "NEW.event_id < OLD.event_id"
        " OR (NEW.event_id = OLD.event_id AND NEW.event_hash <> OLD.event_hash)"
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute(
            "CREATE TRIGGER audit_forwarding_forward_only BEFORE UPDATE ON audit_forwarding "
            f"WHEN {backwards} BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )
        op.execute(
            "CREATE TRIGGER audit_forwarding_no_delete BEFORE DELETE ON audit_forwarding "
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_forwarding_forward_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN IF TG_OP = 'DELETE' OR {backwards} THEN RAISE EXCEPTION '{message}'; "
            "END IF; RETURN NEW; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_forwarding_forward_only BEFORE UPDATE OR DELETE "
            "ON audit_forwarding FOR EACH ROW EXECUTE FUNCTION audit_forwarding_forward_only()"
        )


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_prev_hash"))
        batch_op.drop_index(batch_op.f("ix_audit_events_patient_ref"))
        batch_op.drop_index(batch_op.f("ix_audit_events_actor"))
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite dropped the columns by rebuilding the table, and its triggers with it.
        _append_only(True)
    elif op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_forwarding_forward_only ON audit_forwarding")
        op.execute("DROP FUNCTION audit_forwarding_forward_only()")
    op.drop_table("audit_forwarding")

"""audit event patients

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29 04:30:00.000000

The patients an audit event names among several (a batch of local-ID lookups, a query's
matches), so that a search by patient finds the event: append-only, like the events. The
lookups stored before are indexed from their chained detail.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer()),
    sa.column("action", sa.String()),
    sa.column("patient_ref", sa.String()),
    sa.column("detail", sa.JSON()),
)
_named = sa.table(
    "audit_event_patients",
    sa.column("event_id", sa.Integer()),
    sa.column("patient_ref", sa.String()),
)
_BATCH = 1000
_MESSAGE = "audit_event_patients is append-only"


def upgrade() -> None:
    op.create_table(
        "audit_event_patients",
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("patient_ref", sa.String(length=130), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
            name=op.f("fk_audit_event_patients_event_id_audit_events"),
        ),
        sa.PrimaryKeyConstraint("event_id", "patient_ref", name=op.f("pk_audit_event_patients")),
    )
    with op.batch_alter_table("audit_event_patients", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_audit_event_patients_patient_ref"), ["patient_ref"], unique=False
        )
    _index_stored_lookups()
    _append_only()


def _index_stored_lookups() -> None:
    bind = op.get_bind()
    last = 0
    while True:
        rows = bind.execute(
            sa.select(_events.c.id, _events.c.detail)
            .where(
                _events.c.id > last,
                _events.c.action == "patient:identity:lookup",
                _events.c.patient_ref == "",
            )
            .order_by(_events.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        named = [
            {"event_id": event_id, "patient_ref": n[:130]}
            for event_id, detail in rows
            for n in sorted(_numbers(detail))
        ]
        if named:
            bind.execute(sa.insert(_named), named)
        last = rows[-1][0]


def _numbers(detail: object) -> set[str]:
    """The NHS numbers an event's detail names: a list of strings, or nothing (a gateway
    forwards events of its own, whose detail is what it says)."""
    numbers = detail.get("nhs_numbers") if isinstance(detail, dict) else None
    if not isinstance(numbers, list):
        return set()
    return {n for n in numbers if isinstance(n, str) and n}


def _append_only() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_event_patients_no_{verb.lower()} BEFORE {verb} "
                f"ON audit_event_patients BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END"
            )
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_event_patients_append_only() RETURNS trigger "
            f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{_MESSAGE}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_event_patients_append_only BEFORE UPDATE OR DELETE "
            "ON audit_event_patients FOR EACH ROW "
            "EXECUTE FUNCTION audit_event_patients_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_event_patients_append_only ON audit_event_patients")
        op.execute("DROP FUNCTION audit_event_patients_append_only()")
    with op.batch_alter_table("audit_event_patients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_event_patients_patient_ref"))
    op.drop_table("audit_event_patients")

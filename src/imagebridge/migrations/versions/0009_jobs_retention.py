"""jobs and retention

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 01:16:47.723001

The durable job queue and its periodic schedules; legal holds, the retention sweep's marks
on transfers and its record of blobs removed; an index of transfers by status and finish
time for the metrics and the sweep.
"""

import sqlalchemy as sa
from alembic import op

import imagebridge.db

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_removals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("transfer_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("set_aside_at", imagebridge.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("settled_at", imagebridge.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_removals")),
    )
    with op.batch_alter_table("blob_removals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_blob_removals_sha256"), ["sha256"], unique=False)
        batch_op.create_index("ix_blob_removals_state", ["state", "set_aside_at"], unique=False)

    op.create_table(
        "job_schedules",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_run_at", imagebridge.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_schedules")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("available_at", imagebridge.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("leased_by", sa.String(length=100), nullable=False),
        sa.Column("lease_token", sa.String(length=32), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", imagebridge.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", imagebridge.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_available", ["status", "available_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)

    op.create_table(
        "legal_holds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("institution_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("placed_by", sa.String(length=100), nullable=False),
        sa.Column("placed_at", imagebridge.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("released_at", imagebridge.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(length=100), nullable=False),
        sa.Column("release_reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"],
            ["institutions.id"],
            name=op.f("fk_legal_holds_institution_id_institutions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_legal_holds")),
    )
    with op.batch_alter_table("legal_holds", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_legal_holds_institution_id"), ["institution_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_legal_holds_study_instance_uid"), ["study_instance_uid"], unique=False
        )

    op.create_table(
        "retention_marks",
        sa.Column("transfer_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("examined_at", imagebridge.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("recheck_after", imagebridge.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["transfer_id"], ["transfers.id"], name=op.f("fk_retention_marks_transfer_id_transfers")
        ),
        sa.PrimaryKeyConstraint("transfer_id", name=op.f("pk_retention_marks")),
    )
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.create_index(
            "ix_transfers_status_finished_at", ["status", "finished_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_index("ix_transfers_status_finished_at")

    op.drop_table("retention_marks")
    with op.batch_alter_table("legal_holds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_legal_holds_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_legal_holds_institution_id"))

    op.drop_table("legal_holds")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))
        batch_op.drop_index("ix_jobs_available")

    op.drop_table("jobs")
    op.drop_table("job_schedules")
    with op.batch_alter_table("blob_removals", schema=None) as batch_op:
        batch_op.drop_index("ix_blob_removals_state")
        batch_op.drop_index(batch_op.f("ix_blob_removals_sha256"))

    op.drop_table("blob_removals")

"""transfer completeness

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 02:00:00.000000

How many instances the sender declared for a transfer and who counted them, whether its
sending association was aborted, and when an urgent transfer raised its lateness alert.
Transfers made before this have no declared count: theirs is what the hub received.
"""

import sqlalchemy as sa
from alembic import op

import imagebridge.db

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instances_declared", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("declared_by", sa.String(length=8), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("interrupted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("late_alerted_at", imagebridge.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    # In place, not by batch mode's copy of the table: dropping the old copy of a table that
    # other rows refer to fails SQLite's foreign keys (SQLite 3.35 and later drop a column).
    op.drop_column("transfers", "late_alerted_at")
    op.drop_column("transfers", "interrupted")
    op.drop_column("transfers", "declared_by")
    op.drop_column("transfers", "instances_declared")

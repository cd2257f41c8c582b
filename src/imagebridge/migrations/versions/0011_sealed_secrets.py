"""sealed secrets

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 04:00:00.000000

Second-factor secrets are kept sealed (imagebridge.sealing): the column grows to hold the
sealed form, and a table records which key the database's sealed values are sealed with.
The secrets already stored are sealed by the hub as it starts (the key is not the
migration's to know).
"""

import sqlalchemy as sa
from alembic import op

import imagebridge.db

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealing_keys",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("created_at", imagebridge.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_sealing_keys")),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column(
            "totp_secret",
            existing_type=sa.String(length=64),
            type_=sa.String(length=255),
            existing_nullable=True,
        )


def downgrade() -> None:
    # The code of the revision before cannot open sealed secrets, and they do not fit its
    # column: refuse, saying what to do, rather than leave second factors nobody can check.
    sealed = (
        op.get_bind()
        .execute(sa.text("SELECT count(*) FROM users WHERE totp_secret LIKE 's1.%'"))
        .scalar()
    )
    if sealed:
        raise RuntimeError(
            f"{sealed} second factors are sealed: reset them "
            "(POST /api/v1/users/{id}/second-factor/reset) before going back past 0011"
        )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column(
            "totp_secret",
            existing_type=sa.String(length=255),
            type_=sa.String(length=64),
            existing_nullable=True,
        )
    op.drop_table("sealing_keys")

"""query indexes

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 00:40:00.000000

Indexes for searching the index by patient ID, by name prefix and by date range. ANALYZE
then gives SQLite's planner the statistics it needs to drive a search by its most selective
key rather than by institution.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_patients_patient_id"), ["patient_id"], unique=False)
    op.create_index("ix_patients_patient_name_lower", "patients", [sa.text("lower(patient_name)")])
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(
            "ix_studies_study_date_study_time", ["study_date", "study_time"], unique=False
        )
    op.execute("ANALYZE")


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_study_date_study_time")
    op.drop_index("ix_patients_patient_name_lower", table_name="patients")
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patients_patient_id"))

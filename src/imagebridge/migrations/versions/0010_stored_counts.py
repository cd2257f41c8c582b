"""stored counts

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 14:30:00.000000

The counts a study-level and a series-level match return (series, instances, modalities in
study), kept on the study and series rows as instances are indexed, and counted here once
for the rows already indexed.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_series = sa.table(
    "series",
    sa.column("id", sa.Integer),
    sa.column("study_id", sa.Integer),
    sa.column("modality", sa.String),
    sa.column("number_of_instances", sa.Integer),
)
_studies = sa.table(
    "studies",
    sa.column("id", sa.Integer),
    sa.column("number_of_series", sa.Integer),
    sa.column("number_of_instances", sa.Integer),
    sa.column("modalities_in_study", sa.String),
)
_instances = sa.table("instances", sa.column("series_id", sa.Integer))
_ROOM = 255  # the column's length: whole modalities only, as many as fit
_BATCH = 5000


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("number_of_instances", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("number_of_series", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("number_of_instances", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column(
                "modalities_in_study", sa.String(length=255), server_default="", nullable=False
            )
        )
    _count_existing()


def _count_existing() -> None:
    bind = op.get_bind()
    counted = (
        sa.select(sa.func.count()).where(_instances.c.series_id == _series.c.id).scalar_subquery()
    )
    bind.execute(sa.update(_series).values(number_of_instances=counted))
    in_study_order = (
        sa.select(_series.c.study_id, _series.c.modality, _series.c.number_of_instances)
        .order_by(_series.c.study_id)
        .execution_options(stream_results=True, yield_per=_BATCH)
    )
    rows = bind.execute(in_study_order)
    pending: dict[int, list[tuple[str, int]]] = {}
    for study_id, modality, count in rows:
        # In study order: a study not seen yet means those pending have all their series.
        if study_id not in pending and len(pending) >= _BATCH:
            _write(bind, pending)
            pending = {}
        pending.setdefault(study_id, []).append((modality or "", count))
    _write(bind, pending)


def _write(bind: sa.Connection, per_study: dict[int, list[tuple[str, int]]]) -> None:
    values = []
    for study_id, series in per_study.items():
        modalities = ""
        for modality in sorted({m for m, _ in series if m}):
            joined = f"{modalities}\\{modality}" if modalities else modality
            if len(joined) > _ROOM:
                break
            modalities = joined
        values.append(
            {
                "study": study_id,
                "series": len(series),
                "instances": sum(count for _, count in series),
                "modalities": modalities,
            }
        )
    if values:
        bind.execute(
            sa.update(_studies)
            .where(_studies.c.id == sa.bindparam("study"))
            .values(
                number_of_series=sa.bindparam("series"),
                number_of_instances=sa.bindparam("instances"),
                modalities_in_study=sa.bindparam("modalities"),
            ),
            values,
        )


def downgrade() -> None:
    # Dropped in place, not by batch mode's copy of the table: SQLite (3.35 and later) drops
    # a plain column itself, where dropping the old copy of a table that other rows refer
    # to fails its foreign keys.
    op.drop_column("studies", "modalities_in_study")
    op.drop_column("studies", "number_of_instances")
    op.drop_column("studies", "number_of_series")
    op.drop_column("series", "number_of_instances")

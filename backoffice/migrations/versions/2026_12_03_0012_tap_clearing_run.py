"""Each stored tap names the clearing run that took it (``tap.clearing_run_id``, NULL until a run claims it), so
that every tap is in exactly one run however ingest's commits and a run interleave (backoffice.clearing_runs).

Taps of runs stored before this revision are given to their runs by the rule those runs used: received before the
run's ``as_of``, and of its day, or of an earlier day and received at or after the previous run's ``as_of``, runs
taken oldest first. A tap that had fallen between two runs before this revision (committed after the run whose
window it was received in) cannot be told apart from the ones that run took; it is given to that run, and
re-clearing that day then reports the difference (``ClearingMismatch``) instead of leaving the tap unpaid unseen.

Revision ID: 2026_12_03_0012
Revises: 2026_11_22_0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from clearing.service_day import day_bounds

revision = "2026_12_03_0012"
down_revision = "2026_11_22_0010"
branch_labels = None
depends_on = None

INDEX = "ix_tap_clearing_run_id"


UTC = sa.DateTime(timezone=True)
FK = "fk_tap_clearing_run"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a nullable column with a reference in place; batch mode would copy the whole tap table.
        op.execute("ALTER TABLE tap ADD COLUMN clearing_run_id BIGINT REFERENCES clearing_run (id)")
    else:
        op.add_column("tap", sa.Column("clearing_run_id", sa.BigInteger, nullable=True))
        op.create_foreign_key(FK, "tap", "clearing_run", ["clearing_run_id"], ["id"])
    op.create_index(INDEX, "tap", ["clearing_run_id"])
    _backfill(op.get_bind())


def _backfill(conn) -> None:
    tap = sa.table("tap", sa.column("clearing_run_id", sa.BigInteger), sa.column("operator", sa.String),
                   sa.column("occurred_at", UTC), sa.column("received_at", UTC))
    run_t = sa.table("clearing_run", *(sa.column(n, t) for n, t in (
        ("id", sa.BigInteger), ("operator", sa.String), ("service_day", sa.Date), ("as_of", UTC),
        ("carried_from", UTC), ("tz", sa.String), ("cutoff_hour", sa.Integer))))
    runs = conn.execute(sa.select(run_t).order_by(run_t.c.operator, run_t.c.service_day)).all()
    for run in runs:
        start, end = day_bounds(run.service_day, run.tz, run.cutoff_hour)
        late = tap.c.occurred_at < start
        if run.carried_from is not None:
            late = sa.and_(late, tap.c.received_at >= run.carried_from)
        conn.execute(sa.update(tap).where(
            tap.c.clearing_run_id.is_(None), tap.c.operator == run.operator, tap.c.received_at < run.as_of,
            sa.or_(sa.and_(tap.c.occurred_at >= start, tap.c.occurred_at < end), late))
            .values(clearing_run_id=run.id))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="tap")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("tap") as batch:  # a column with a reference: SQLite needs the table copied
            batch.drop_column("clearing_run_id")
    else:
        op.drop_constraint(FK, "tap", type_="foreignkey")
        op.drop_column("tap", "clearing_run_id")

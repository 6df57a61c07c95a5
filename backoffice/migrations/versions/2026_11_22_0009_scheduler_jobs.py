"""The scheduler's job table, made by a migration instead of by APScheduler at start.

APScheduler's SQLAlchemyJobStore creates ``apscheduler_jobs`` itself when it starts ("create if missing"): two
schedulers starting at the same instant on a fresh PostgreSQL database both find it missing and one fails on the
duplicate. Made here, once, under Alembic's lock, the job store finds it and creates nothing. The layout is
APScheduler 3's own (``apscheduler/jobstores/sqlalchemy.py``); a database where the job store already made the
table keeps it.

Revision ID: 2026_11_22_0009
Revises: 2026_11_22_0008
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0009"
down_revision = "2026_11_22_0008"
branch_labels = None
depends_on = None

TABLE = "apscheduler_jobs"  # backoffice.scheduler.JOB_TABLE (a revision does not import the code it migrates)


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table(TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("id", sa.Unicode(191), primary_key=True),
        sa.Column("next_run_time", sa.Float(25), nullable=True),
        sa.Column("job_state", sa.LargeBinary, nullable=False),
    )
    op.create_index(f"ix_{TABLE}_next_run_time", TABLE, ["next_run_time"])


def downgrade() -> None:
    op.drop_index(f"ix_{TABLE}_next_run_time", table_name=TABLE)
    op.drop_table(TABLE)

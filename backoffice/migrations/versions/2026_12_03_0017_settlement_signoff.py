"""A clerk's sign-off of a service day's settlement: who approved which clearing run, when, and the figures they
saw (the run's fingerprint, gross and what was payable). One per (operator, service day); a signed-off day is
locked: backoffice.clearing_runs refuses to clear it again (backoffice.signoff).

Revision ID: 2026_12_03_0017
Revises: 2026_11_22_0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0017"
down_revision = "2026_11_22_0010"  # clearing_run (0004) is there; the other heads of 2026-12-03 touch other tables
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer, "sqlite")
    op.create_table(
        "settlement_signoff",
        sa.Column("id", big, primary_key=True, autoincrement=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("service_day", sa.Date, nullable=False),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("clearing_run.id"), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("day_gross", sa.BigInteger, nullable=False),
        sa.Column("payable_net", sa.BigInteger, nullable=False),
        sa.Column("approved_by", sa.String(64), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.String(500), nullable=False, server_default=""),
        sa.UniqueConstraint("operator", "service_day", name="uq_settlement_signoff_day"),
    )


def downgrade() -> None:
    op.drop_table("settlement_signoff")

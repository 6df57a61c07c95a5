"""Ticket revenue in the books (issue 11): the operator's revenue rule of each ticket product, and the ledger of
ticket revenue recognised by the clearing runs.

- ``ticket_revenue_rule``: per product, how a pass is recognised: ``per_ride`` (each use at ``ride_value_fen``) or
  ``spread`` (the price spread over the service days of validity). Products without a row follow the default rule
  (``backoffice.tickets.revenue``): single rides and coach trips at use at the price paid, passes spread.
- ``ticket_revenue``: one line per recognition (a use, a pass's day, breakage of an unused expired ticket), with the
  run that recognised it. ``ref`` is unique: a use, a pass's day or a ticket's breakage is recognised once, by the
  run that claimed it (a late use goes to the next run, as a late tap does).

Revision ID: 2026_12_03_0024
Revises: 2026_12_03_0020
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0024"
down_revision = "2026_12_03_0020"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "ticket_revenue_rule",
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("product.id"), primary_key=True, autoincrement=False),
        sa.Column("rule", sa.String(16), nullable=False),  # per_ride | spread
        sa.Column("ride_value_fen", sa.BigInteger, nullable=False, server_default="0"),  # per_ride only
        sa.Column("set_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("rule IN ('per_ride', 'spread')", name="ck_ticket_revenue_rule"),
        sa.CheckConstraint("ride_value_fen >= 0", name="ck_ticket_revenue_ride_value"),
    )
    op.create_table(
        "ticket_revenue",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("clearing_run.id"), nullable=False, index=True),
        sa.Column("operator", sa.String(32), nullable=False),
        sa.Column("ref", sa.String(80), nullable=False, unique=True),  # use:<id> | day:<ticket>:<date> | ...
        sa.Column("source", sa.String(16), nullable=False),  # use | pass_day | breakage
        sa.Column("ticket_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("use_id", sa.BigInteger, nullable=True),  # the stored ticket use (source use)
        sa.Column("for_day", sa.Date, nullable=False),  # the service day it belongs to
        sa.Column("route", sa.String(32), nullable=False, server_default=""),
        sa.Column("vehicle", sa.String(32), nullable=False, server_default=""),
        sa.Column("driver", sa.String(32), nullable=False, server_default=""),
        sa.Column("product", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),  # fen; negative only for a breakage reversal
    )


def downgrade() -> None:
    op.drop_table("ticket_revenue")
    op.drop_table("ticket_revenue_rule")

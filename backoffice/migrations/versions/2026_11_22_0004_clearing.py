"""Clearing and reconciliation: fleets (vehicles assigned from a service day on), the card issuer's commission
rate per operator, clearing runs with their rows, and reconciliation items a clerk acts on.

Revision ID: 2026_11_22_0004
Revises: 2026_11_22_0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0004"
down_revision = "2026_11_22_0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)
MONEY = sa.BigInteger  # fen


def upgrade() -> None:
    op.create_table(
        "fleet",
        sa.Column("code", sa.String(32), primary_key=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
    )
    # A vehicle belongs to one fleet from a service day on; the history stays, so an old day re-cleared names the
    # fleet it had then.
    op.create_table(
        "fleet_vehicle",
        sa.Column("vehicle", sa.String(32), sa.ForeignKey("vehicle.code"), primary_key=True),
        sa.Column("valid_from", sa.Date, primary_key=True),
        sa.Column("fleet", sa.String(32), sa.ForeignKey("fleet.code"), nullable=False),
    )
    op.create_table(
        "commission_rate",
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), primary_key=True),
        sa.Column("valid_from", sa.Date, primary_key=True),
        sa.Column("rate_bp", sa.Integer, nullable=False),  # basis points of gross, 0..10000
    )
    op.create_table(
        "clearing_run",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("service_day", sa.Date, nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("as_of", UTC, nullable=False),  # taps received before this count
        sa.Column("carried_from", UTC, nullable=True),  # the previous run's as_of (late taps window start)
        sa.Column("rate_bp", sa.Integer, nullable=False),
        sa.Column("tz", sa.String(64), nullable=False),
        sa.Column("cutoff_hour", sa.Integer, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),  # SHA-256 hex of the inputs (clearing.runs)
        sa.Column("day_taps", sa.BigInteger, nullable=False),
        sa.Column("day_gross", MONEY, nullable=False),
        sa.Column("day_commission", MONEY, nullable=False),
        sa.Column("day_net", MONEY, nullable=False),
        sa.Column("late_taps", sa.BigInteger, nullable=False),
        sa.Column("late_gross", MONEY, nullable=False),
        sa.Column("late_commission", MONEY, nullable=False),
        sa.Column("late_net", MONEY, nullable=False),
        sa.Column("reconciliation_gross", MONEY, nullable=False),
        sa.Column("reconciliation_commission", MONEY, nullable=False),
        sa.Column("reconciliation_net", MONEY, nullable=False),
        sa.UniqueConstraint("operator", "service_day", name="uq_clearing_run_day"),
    )
    op.create_table(
        "clearing_row",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("clearing_run.id"), nullable=False, index=True),
        sa.Column("section", sa.String(16), nullable=False),  # day | late | reconciliation
        sa.Column("dimension", sa.String(16), nullable=False),  # operator | fleet | route | vehicle | driver ...
        sa.Column("key", sa.String(40), nullable=False),
        sa.Column("for_day", sa.Date, nullable=False),  # the service day the money belongs to
        sa.Column("taps", sa.BigInteger, nullable=False),
        sa.Column("gross", MONEY, nullable=False),
        sa.Column("commission", MONEY, nullable=False),
        sa.Column("net", MONEY, nullable=False),
    )
    op.create_table(
        "recon_item",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # shift | issuer | payment
        sa.Column("service_day", sa.Date, nullable=False),
        sa.Column("ref", sa.String(80), nullable=False),
        sa.Column("problem", sa.String(32), nullable=False),
        sa.Column("ours", MONEY, nullable=True),
        sa.Column("theirs", MONEY, nullable=True),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("adjustment", MONEY, nullable=True),  # signed fen carried into the next run when adjusted
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("resolved_by", sa.String(64), nullable=True),
        sa.Column("resolved_at", UTC, nullable=True),
        sa.Column("note", sa.String(500), nullable=False, server_default=""),
        sa.Column("carried_run_id", sa.BigInteger, sa.ForeignKey("clearing_run.id"), nullable=True),
        sa.UniqueConstraint("operator", "kind", "ref", "problem", name="uq_recon_item"),
    )
    op.create_index("ix_recon_item_status", "recon_item", ["operator", "status"])


def downgrade() -> None:
    op.drop_index("ix_recon_item_status", table_name="recon_item")
    for table in ("recon_item", "clearing_row", "clearing_run", "commission_rate", "fleet_vehicle", "fleet"):
        op.drop_table(table)

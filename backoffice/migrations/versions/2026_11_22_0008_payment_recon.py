"""Payment platform reconciliation: differences between the platform's daily file and the over-the-air top-up
orders, one item per (order, problem), for mobile-operator staff to settle.

Revision ID: 2026_11_22_0008
Revises: 2026_11_22_0007
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0008"
down_revision = "2026_11_22_0007"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)
MONEY = sa.BigInteger  # fen


def upgrade() -> None:
    op.create_table(
        "payment_recon_item",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("day", sa.Date, nullable=False),
        # no foreign key: the platform may name an order farebox never had (that is one of the problems)
        sa.Column("order_id", sa.String(40), nullable=False),
        sa.Column("problem", sa.String(32), nullable=False),
        sa.Column("ours", MONEY, nullable=True),
        sa.Column("theirs", MONEY, nullable=True),
        sa.Column("detail", sa.String(500), nullable=False),
        # open | accepted | refunded | retried | disputed
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("resolved_by", sa.String(64), nullable=True),
        sa.Column("resolved_at", UTC, nullable=True),
        sa.Column("note", sa.String(500), nullable=False, server_default=""),
        sa.UniqueConstraint("order_id", "problem", name="uq_payment_recon_item"),
    )
    op.create_index("ix_payment_recon_item_status", "payment_recon_item", ["status"])


def downgrade() -> None:
    op.drop_index("ix_payment_recon_item_status", table_name="payment_recon_item")
    op.drop_table("payment_recon_item")

"""Cards and money: card accounts (issuance, deposit, frozen balance), over-the-air top-up orders and the payment
platform's webhooks, every load the host authorised (counter and over the air), ledger entries (adjustments,
refunds), cases for review and the audit trail.

Revision ID: 2026_11_22_0005
Revises: 2026_11_22_0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0005"
down_revision = "2026_11_22_0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)
MONEY = sa.BigInteger  # fen


def upgrade() -> None:
    op.create_table(
        "card_account",
        sa.Column("asn", sa.String(20), sa.ForeignKey("card.asn"), primary_key=True),
        sa.Column("algorithm", sa.Integer, nullable=False),
        sa.Column("issuer", sa.String(16), nullable=False),
        sa.Column("valid_from", sa.Date, nullable=False),
        sa.Column("valid_to", sa.Date, nullable=False),
        sa.Column("deposit", MONEY, nullable=False),
        sa.Column("opening_balance", MONEY, nullable=False),
        sa.Column("proof", sa.String(200), nullable=False, server_default=""),
        sa.Column("holder", sa.String(200), nullable=False, server_default=""),
        sa.Column("issued_at", UTC, nullable=False),
        sa.Column("issued_by", sa.String(64), nullable=False),
        sa.Column("frozen_balance", MONEY, nullable=True),
        sa.Column("frozen_at", UTC, nullable=True),
    )
    op.create_table(
        "topup_order",
        sa.Column("order_id", sa.String(40), primary_key=True),
        sa.Column("asn", sa.String(20), sa.ForeignKey("card.asn"), nullable=False, index=True),
        sa.Column("rider", sa.String(64), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        # created | paid | authorized | unconfirmed | loaded | refunded
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("payment_ref", sa.String(64), nullable=True, unique=True),
        sa.Column("paid_at", UTC, nullable=True),
    )
    op.create_table(
        "payment_event",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("order_id", sa.String(40), nullable=False, index=True),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("outcome", sa.String(200), nullable=False),
        sa.Column("body", sa.String(2000), nullable=False),
    )
    op.create_table(
        "card_load",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("asn", sa.String(20), sa.ForeignKey("card.asn"), nullable=False, index=True),
        sa.Column("channel", sa.String(8), nullable=False),
        sa.Column("order_id", sa.String(40), sa.ForeignKey("topup_order.order_id"), nullable=True, index=True),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("balance_before", MONEY, nullable=False),
        sa.Column("online_ttc", sa.Integer, nullable=False),
        sa.Column("algorithm", sa.Integer, nullable=False),
        sa.Column("card_random", sa.String(8), nullable=False),
        sa.Column("mac1", sa.String(8), nullable=False),
        sa.Column("terminal_id", sa.String(12), nullable=False),
        sa.Column("tx_date", sa.String(8), nullable=False),
        sa.Column("tx_time", sa.String(6), nullable=False),
        sa.Column("mac2", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),  # authorized | loaded | void
        sa.Column("tac", sa.String(8), nullable=True),
        sa.Column("confirmed_by", sa.String(16), nullable=True),
        sa.Column("staff", sa.String(64), nullable=False),
        sa.Column("authorized_at", UTC, nullable=False),
        sa.Column("settled_at", UTC, nullable=True),
    )
    # The card's online counter names each load: two loaded rows for one counter would count money twice.
    op.create_index("uq_card_load_loaded", "card_load", ["asn", "online_ttc"], unique=True,
                    sqlite_where=sa.text("status = 'loaded'"), postgresql_where=sa.text("status = 'loaded'"))
    op.create_table(
        "card_entry",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("asn", sa.String(20), sa.ForeignKey("card.asn"), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),  # adjustment | refund
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("at", UTC, nullable=False),
        sa.Column("who", sa.String(64), nullable=False),
        sa.Column("why", sa.String(500), nullable=False),
    )
    op.create_table(
        "card_case",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("asn", sa.String(20), sa.ForeignKey("card.asn"), nullable=False, index=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("opened_at", UTC, nullable=False),
        sa.Column("closed_at", UTC, nullable=True),
        sa.Column("closed_by", sa.String(64), nullable=True),
        sa.Column("resolution", sa.String(500), nullable=False, server_default=""),
        sa.UniqueConstraint("asn", "kind", "key", name="uq_card_case"),
    )
    op.create_table(
        "card_audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", UTC, nullable=False, index=True),
        sa.Column("who", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("asn", sa.String(20), nullable=True, index=True),
        sa.Column("order_id", sa.String(40), nullable=True),
        sa.Column("amount", MONEY, nullable=True),
        sa.Column("why", sa.String(500), nullable=False),
        sa.Column("detail", sa.String(1000), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("card_audit")
    op.drop_table("card_case")
    op.drop_table("card_entry")
    op.drop_index("uq_card_load_loaded", table_name="card_load")
    op.drop_table("card_load")
    op.drop_table("payment_event")
    op.drop_table("topup_order")
    op.drop_table("card_account")

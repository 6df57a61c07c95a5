"""The payment platform, both ways (issue 11): refunds sent to the platform exactly once, and the platform's daily
statements stored once with their lines (backoffice.payments).

``payment_refund``: one row per refund farebox asks of the platform, committed before the platform is called; its
``refund_id`` is the idempotency key resent on every retry; ``state`` pending -> succeeded | failed, the answer
recorded once (a conditional UPDATE on ``state = 'pending'``). ``payment_statement``: one row per distinct file
(unique day + SHA-256: the same file fetched twice is stored once); ``payment_statement_line``: its lines.

Revision ID: 2026_12_03_0022
Revises: 2026_12_03_0020
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0022"
down_revision = "2026_12_03_0020"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "payment_refund",
        sa.Column("refund_id", sa.String(40), primary_key=True),
        sa.Column("order_kind", sa.String(8), nullable=False),  # ticket | topup
        sa.Column("order_id", sa.String(40), nullable=False),
        sa.Column("payment_ref", sa.String(64), nullable=False),  # the platform's payment being refunded
        sa.Column("amount", sa.BigInteger, nullable=False),  # fen
        sa.Column("ticket_ids", sa.String(1000), nullable=False, server_default=""),  # space-separated
        sa.Column("state", sa.String(16), nullable=False),  # pending | succeeded | failed
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("platform_ref", sa.String(64), nullable=True, unique=True),
        sa.Column("answer", sa.String(500), nullable=False, server_default=""),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.Column("why", sa.String(500), nullable=False, server_default=""),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("answered_at", UTC, nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_payment_refund_amount"),
    )
    op.create_index("ix_payment_refund_order", "payment_refund", ["order_id"])
    op.create_index("ix_payment_refund_state", "payment_refund", ["state", "created_at"])
    op.create_table(
        "payment_statement",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("day", sa.Date, nullable=False),  # the platform's day (its local midnight to midnight)
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("fetched_at", UTC, nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.UniqueConstraint("day", "sha256", name="uq_payment_statement_file"),
    )
    op.create_table(
        "payment_statement_line",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("statement_id", sa.BigInteger, sa.ForeignKey("payment_statement.id"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),  # payment | refund
        sa.Column("order_id", sa.String(40), nullable=False),
        sa.Column("ref", sa.String(64), nullable=False),  # payment: the platform's payment_ref; refund: our refund id
        sa.Column("amount", sa.BigInteger, nullable=False),  # fen, positive
        sa.Column("fee", sa.BigInteger, nullable=False),  # fen the platform keeps (payments); 0 for refunds
        sa.Column("at", UTC, nullable=False),
    )
    op.create_index("ix_payment_statement_line_statement", "payment_statement_line", ["statement_id"])


def downgrade() -> None:
    op.drop_index("ix_payment_statement_line_statement", table_name="payment_statement_line")
    op.drop_table("payment_statement_line")
    op.drop_table("payment_statement")
    op.drop_index("ix_payment_refund_state", table_name="payment_refund")
    op.drop_index("ix_payment_refund_order", table_name="payment_refund")
    op.drop_table("payment_refund")

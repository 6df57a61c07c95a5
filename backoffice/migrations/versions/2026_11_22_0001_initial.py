"""Initial schema: registry (operator, route, vehicle, driver, device, card), tap and quarantine.

Revision ID: 2026_11_22_0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # SQLite autoincrements only INTEGER keys
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "operator",
        sa.Column("code", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("cutoff_hour", sa.Integer, nullable=False),
    )
    op.create_table(
        "route",
        sa.Column("code", sa.String(32), primary_key=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("flat_fare", sa.Integer, nullable=False),
    )
    op.create_table(
        "vehicle",
        sa.Column("code", sa.String(32), primary_key=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("plate", sa.String(32), nullable=False),
    )
    op.create_table(
        "driver",
        sa.Column("staff_no", sa.String(32), primary_key=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("card_asn", sa.String(20), nullable=False, unique=True),
    )
    op.create_table(
        "device",
        sa.Column("device_id", sa.String(32), primary_key=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("vehicle", sa.String(32), sa.ForeignKey("vehicle.code"), nullable=True),
        sa.Column("terminal_id", sa.String(12), nullable=False),
    )
    op.create_table(
        "card",
        sa.Column("asn", sa.String(20), primary_key=True),
        sa.Column("card_type", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
    )
    op.create_table(
        "tap",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("device_seq", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("occurred_at", UTC, nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("operator", sa.String(32), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("vehicle", sa.String(32), nullable=False),
        sa.Column("driver", sa.String(32), nullable=False),
        sa.Column("shift_no", sa.Integer, nullable=False),
        sa.Column("card_asn", sa.String(20), nullable=False),
        sa.Column("card_type", sa.Integer, nullable=False),
        sa.Column("card_ttc", sa.Integer, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("balance_after", sa.BigInteger, nullable=False),
        sa.Column("terminal_id", sa.String(12), nullable=False),
        sa.Column("terminal_seq", sa.BigInteger, nullable=False),
        sa.Column("tac", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.UniqueConstraint("device_id", "device_seq", name="uq_tap_device_seq"),
    )
    op.create_index("ix_tap_occurred_at", "tap", ["occurred_at"])
    op.create_table(
        "quarantine",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("device_seq", sa.BigInteger, nullable=True),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("device_id", "device_seq", "reason", name="uq_quarantine_record_reason"),
    )
    op.create_index("ix_quarantine_received_at", "quarantine", ["received_at"])


def downgrade() -> None:
    for table in ("quarantine", "tap", "card", "device", "driver", "vehicle", "route", "operator"):
        op.drop_table(table)

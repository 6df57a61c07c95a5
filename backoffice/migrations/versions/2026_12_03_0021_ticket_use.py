"""Ticket uses (issue 11): every ``ticket_use`` a validator uploads, stored once by (device_id, epoch, device_seq)
like taps, and every pickup code redeemed at a station counter (device_seq NULL); (ticket_id, use_no) unique so a
use is counted once, and a use beyond what the ticket allows is kept with revenue false and its flag
(backoffice.tickets.uses).

Revision ID: 2026_12_03_0021
Revises: 2026_12_03_0020
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0021"
down_revision = "2026_12_03_0020"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ticket_use",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("device_seq", sa.BigInteger, nullable=True),
        sa.Column("operator", sa.String(32), nullable=False),
        sa.Column("ticket_id", sa.BigInteger, nullable=False),
        sa.Column("use_no", sa.Integer, nullable=True),
        sa.Column("device_use", sa.Integer, nullable=False, server_default="0"),
        sa.Column("presented_by", sa.String(8), nullable=False),
        sa.Column("route", sa.String(64), nullable=False, server_default=""),
        sa.Column("vehicle", sa.String(64), nullable=False, server_default=""),
        sa.Column("driver", sa.String(64), nullable=False, server_default=""),
        sa.Column("shift_no", sa.Integer, nullable=False, server_default="0"),
        sa.Column("staff", sa.String(64), nullable=False, server_default=""),
        sa.Column("occurred_at", UTC, nullable=False),
        sa.Column("service_day", sa.Date, nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("revenue", sa.Boolean, nullable=False),
        sa.Column("flag", sa.String(16), nullable=True),
        sa.Column("reason", sa.String(500), nullable=False, server_default=""),
        sa.UniqueConstraint("device_id", "epoch", "device_seq", name="uq_ticket_use_record"),
        sa.UniqueConstraint("ticket_id", "use_no", name="uq_ticket_use_number"),
    )
    op.create_index("ix_ticket_use_ticket", "ticket_use", ["ticket_id"])
    op.create_index("ix_ticket_use_day", "ticket_use", ["operator", "service_day"])
    op.create_index("ix_ticket_use_flag", "ticket_use", ["flag"])  # the deny list asks for flagged uses each minute


def downgrade() -> None:
    op.drop_index("ix_ticket_use_flag", table_name="ticket_use")
    op.drop_index("ix_ticket_use_day", table_name="ticket_use")
    op.drop_index("ix_ticket_use_ticket", table_name="ticket_use")
    op.drop_table("ticket_use")

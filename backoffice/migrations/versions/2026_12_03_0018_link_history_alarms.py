"""Operations: each validator's link history (one row per connection, from its births, heartbeats, goodbyes and last
wills: the gaps between rows are when the bus was off the air) and the alarms list (grey purchases, stale deny
lists, journals filling, quarantine growing) with who acknowledged each and when.

Revision ID: 2026_12_03_0018
Revises: 2026_11_22_0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0018"
down_revision = "2026_11_22_0010"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "device_link",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("device.device_id"), nullable=False),
        sa.Column("connected_at", UTC, nullable=False),  # the birth's time (or the first heartbeat heard)
        sa.Column("last_heard", UTC, nullable=False),  # the newest birth / heartbeat / goodbye of this connection
        sa.Column("ended_at", UTC, nullable=True),  # None: still connected, as far as the back office knows
        sa.Column("ended_by", sa.String(16), nullable=True),  # goodbye | lost
    )
    op.create_index("ix_device_link_device", "device_link", ["device_id", "connected_at"])
    op.create_table(
        "alarm",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("operator", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(32), nullable=True),  # None: the operator's (e.g. its quarantine)
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("text", sa.String(500), nullable=False),
        sa.Column("measure", sa.Integer, nullable=False, server_default="0"),  # what grew (records, percent)
        sa.Column("raised_at", UTC, nullable=False),
        sa.Column("last_seen", UTC, nullable=False),
        sa.Column("cleared_at", UTC, nullable=True),
        sa.Column("acked_by", sa.String(100), nullable=True),
        sa.Column("acked_at", UTC, nullable=True),
    )
    op.create_index("ix_alarm_open", "alarm", ["operator", "cleared_at"])


def downgrade() -> None:
    op.drop_index("ix_alarm_open", table_name="alarm")
    op.drop_table("alarm")
    op.drop_index("ix_device_link_device", table_name="device_link")
    op.drop_table("device_link")

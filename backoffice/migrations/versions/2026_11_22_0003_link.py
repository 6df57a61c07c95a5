"""The link at city scale: device status (birth, heartbeat, death), fraud flags, deny-list versions and the
parameter / software packages sent to the fleet.

Revision ID: 2026_11_22_0003
Revises: 2026_11_22_0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0003"
down_revision = "2026_11_22_0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "device_status",
        sa.Column("device_id", sa.String(32), sa.ForeignKey("device.device_id"), primary_key=True),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("last_seen", UTC, nullable=False),
        sa.Column("last_birth", UTC, nullable=True),
        sa.Column("software", sa.String(64), nullable=False, server_default=""),
        sa.Column("params_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("denylist_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("backlog", sa.Integer, nullable=False, server_default="0"),
        sa.Column("oldest_unsent", UTC, nullable=True),
        sa.Column("psam", sa.String(12), nullable=False, server_default=""),
        sa.Column("last_tap", UTC, nullable=True),
        sa.Column("alarms", sa.String(500), nullable=False, server_default=""),
    )
    op.create_table(
        "fraud_flag",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("detected_at", UTC, nullable=False),
        sa.Column("card_asn", sa.String(20), nullable=False, index=True),
        sa.Column("card_ttc", sa.Integer, nullable=False),
        sa.Column("first_device_id", sa.String(32), nullable=False),
        sa.Column("first_device_seq", sa.BigInteger, nullable=False),
        sa.Column("second_device_id", sa.String(32), nullable=False),
        sa.Column("second_device_seq", sa.BigInteger, nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.UniqueConstraint("card_asn", "card_ttc", "second_device_id", "second_device_seq",
                            name="uq_fraud_flag_record"),
    )
    # The fraud check looks a purchase up by the card's own transaction counter.
    op.create_index("ix_tap_card_ttc", "tap", ["card_asn", "card_ttc"])
    op.create_table(
        "denylist_version",
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),  # SHA-256 of the list content, hex
        sa.Column("body", sa.LargeBinary, nullable=False),  # the list file (blacklist.denylist format)
    )
    op.create_table(
        "package",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),  # params | software
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("target", sa.String(40), nullable=False),  # _fleet, or a device id
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("activate_at", UTC, nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),  # the signed package as sent (wire.packages)
        sa.UniqueConstraint("kind", "operator", "target", "version", name="uq_package_version"),
    )


def downgrade() -> None:
    op.drop_table("package")
    op.drop_table("denylist_version")
    op.drop_index("ix_tap_card_ttc", table_name="tap")
    op.drop_table("fraud_flag")
    op.drop_table("device_status")

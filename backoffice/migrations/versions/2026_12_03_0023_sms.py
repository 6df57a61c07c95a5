"""The SMS channel (issue 11, seed 000's command dialogue; backoffice.sms).

``sms_message``: every text in and out, one row each. Inbound rows carry the gateway's message id, unique per
direction, so a duplicate delivery of the same webhook is stored (and acted on) once; outbound rows are written
``pending`` in the same transaction as the dialogue step that says them and sent after the commit under a
client reference made from the row id (a retry sends once), then marked ``sent``. ``sms_conversation``: one row
per phone number: where its dialogue stands (idle, quoted, paying, done), the order it is about and until when the
step is open.

Revision ID: 2026_12_03_0023
Revises: 2026_12_03_0020
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0023"
down_revision = "2026_12_03_0020"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sms_message",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("direction", sa.String(3), nullable=False),  # in | out
        sa.Column("gateway_id", sa.String(64), nullable=True),  # inbound: the gateway's message id
        sa.Column("phone", sa.String(24), nullable=False),
        sa.Column("text", sa.String(500), nullable=False),
        sa.Column("at", UTC, nullable=False),
        sa.Column("order_id", sa.String(40), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),  # in: received | limited; out: pending | sent
        sa.Column("outcome", sa.String(200), nullable=False, server_default=""),
        sa.Column("sent_at", UTC, nullable=True),
        sa.UniqueConstraint("direction", "gateway_id", name="uq_sms_message_gateway_id"),
        sa.CheckConstraint("direction IN ('in', 'out')", name="ck_sms_message_direction"),
    )
    op.create_index("ix_sms_message_phone", "sms_message", ["phone", "direction", "at"])
    op.create_index("ix_sms_message_state", "sms_message", ["direction", "state"])
    op.create_table(
        "sms_conversation",
        sa.Column("phone", sa.String(24), primary_key=True),
        sa.Column("operator", sa.String(32), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),  # idle | quoted | paying | done
        sa.Column("order_id", sa.String(40), nullable=True),
        sa.Column("expires_at", UTC, nullable=True),  # quoted: the Y deadline; paying: the payment deadline
        sa.Column("updated_at", UTC, nullable=False),
    )
    op.create_index("ix_sms_conversation_state", "sms_conversation", ["state", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_sms_conversation_state", table_name="sms_conversation")
    op.drop_table("sms_conversation")
    op.drop_index("ix_sms_message_state", table_name="sms_message")
    op.drop_index("ix_sms_message_phone", table_name="sms_message")
    op.drop_table("sms_message")

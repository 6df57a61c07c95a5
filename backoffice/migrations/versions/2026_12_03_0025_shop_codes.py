"""The web shop's one-time codes and rate counters in the database (backoffice.web.shop_service), so several
``farebox serve`` processes on one database share them: a code asked from one is checked by another, and a limit
counts the requests all of them took.

``shop_code``: one open code per phone number, kept as an HMAC of phone and code (never the code), until when it
works and how many wrong tries it has left. ``shop_rate_event``: one row per counted request (key such as
``otp-phone:<number>``, when); a limit counts the key's rows inside its window.

Revision ID: 2026_12_03_0025
Revises: 2026_12_03_0023
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0025"
down_revision = "2026_12_03_0023"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "shop_code",
        sa.Column("phone", sa.String(24), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),  # hex HMAC-SHA256(pepper, phone | code)
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("attempts_left", sa.Integer, nullable=False),
        sa.Column("created_at", UTC, nullable=False),
    )
    op.create_table(
        "shop_rate_event",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("at", UTC, nullable=False),
    )
    op.create_index("ix_shop_rate_event_key", "shop_rate_event", ["key", "at"])
    op.create_index("ix_shop_rate_event_at", "shop_rate_event", ["at"])


def downgrade() -> None:
    op.drop_index("ix_shop_rate_event_at", table_name="shop_rate_event")
    op.drop_index("ix_shop_rate_event_key", table_name="shop_rate_event")
    op.drop_table("shop_rate_event")
    op.drop_table("shop_code")

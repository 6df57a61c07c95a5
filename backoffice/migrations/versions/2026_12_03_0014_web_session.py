"""Web page sessions: the login form opens one (its id in the HttpOnly cookie, only the id's SHA-256 kept here),
logout ends it, and it lasts a fixed time (12 h by default). A session names the API token it was opened with, so
a token that is revoked or expires ends its sessions at once.

Revision ID: 2026_12_03_0014
Revises: 2026_11_22_0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0014"
down_revision = "2026_11_22_0010"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "web_session",
        sa.Column("id_sha256", sa.String(64), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("ended_at", UTC, nullable=True),
    )
    op.create_index("ix_web_session_expires_at", "web_session", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_web_session_expires_at", table_name="web_session")
    op.drop_table("web_session")

"""Taps keep what the card transaction was: type (06 / 09) and algorithm for the TAC check, the full fare before
discounts (concession claims), and entry / exit stops of distance-fare routes.

Revision ID: 2026_11_22_0002
Revises: 2026_11_22_0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0002"
down_revision = "2026_11_22_0001"
branch_labels = None
depends_on = None

# Defaults fill the rows written before this revision: they were all plain 3DES purchases at the full fare.
COLUMNS = (("tx_type", "6"), ("algorithm", "0"), ("full_fare", "0"), ("entry_stop", "0"), ("exit_stop", "0"))


def upgrade() -> None:
    with op.batch_alter_table("tap") as batch:
        for name, default in COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default=default))


def downgrade() -> None:
    with op.batch_alter_table("tap") as batch:
        for name, _default in COLUMNS:
            batch.drop_column(name)

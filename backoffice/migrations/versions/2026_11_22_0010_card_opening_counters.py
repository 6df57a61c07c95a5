"""A card's transaction counters at issue: the offline (purchase) and online (load) TTC that issuance reads,
so the ledger can find a purchase or load missing before the first record it has. Cards issued before this
revision have NULL (not known), as does a card that would not tell.

Revision ID: 2026_11_22_0010
Revises: 2026_11_22_0009
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0010"
down_revision = "2026_11_22_0009"
branch_labels = None
depends_on = None

TABLE = "card_account"
COLUMNS = ("opening_purchase_ttc", "opening_load_ttc")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column(TABLE, sa.Column(name, sa.Integer, nullable=True))


def downgrade() -> None:
    for name in COLUMNS:
        if op.get_bind().dialect.name == "sqlite":
            # SQLite >= 3.35 drops a column in place, without the copy of the table Alembic's batch mode makes
            # (as revision 0006 does).
            op.execute(f"ALTER TABLE {TABLE} DROP COLUMN {name}")
        else:
            op.drop_column(TABLE, name)

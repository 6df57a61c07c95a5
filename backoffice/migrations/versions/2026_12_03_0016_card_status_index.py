"""An index on card (status, asn): the deny-list publisher asks every ``denylist_rebuild_seconds`` (default 30) which
cards are lost, blocked or fraud (backoffice.denylist_publish.denylist_changed); without the index that look reads
the whole card table, with it the index entries of the denied cards alone (the ASN is in the index).

Revision ID: 2026_12_03_0016
Revises: 2026_11_22_0010
Create Date: 2026-12-03
"""

from alembic import op

revision = "2026_12_03_0016"
down_revision = "2026_11_22_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_card_status", "card", ["status", "asn"])


def downgrade() -> None:
    op.drop_index("ix_card_status", table_name="card")

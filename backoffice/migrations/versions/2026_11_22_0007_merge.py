"""Join the two branches of the back-office schema: clearing and cards (0004, 0005) and the registry's history
(0006) were written side by side; from here on revisions follow one line again.

Revision ID: 2026_11_22_0007
Revises: 2026_11_22_0005, 2026_11_22_0006
Create Date: 2026-11-22
"""

revision = "2026_11_22_0007"
down_revision = ("2026_11_22_0005", "2026_11_22_0006")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

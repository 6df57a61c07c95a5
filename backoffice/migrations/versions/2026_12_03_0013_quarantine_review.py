"""Quarantine review: operations release a quarantined record (it goes through every ingest check again and is
stored once) or reject it, with who, when and why. Each row also says whether the message that carried it verified
with its device's key, so a release can put the record through ingest again as the same kind of message.

``signed`` of rows from before this revision is worked out from ingest's own reason texts: a row naming a record
(device_seq set) came from a batch that decoded, so it was MAC'd and verified unless ingest refused it as an
unsigned v1 batch ("unsigned v1 batch refused ..."); a row keeping a whole message (device_seq NULL) keeps the
message itself, MAC and all, and a release checks that again (``signed`` stays NULL).

Revision ID: 2026_12_03_0013
Revises: 2026_11_22_0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0013"
down_revision = "2026_11_22_0010"
branch_labels = None
depends_on = None

TABLE = "quarantine"
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("signed", sa.Boolean, nullable=True))
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="open"))
        batch.add_column(sa.Column("resolved_at", UTC, nullable=True))
        batch.add_column(sa.Column("resolved_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("resolution", sa.String(500), nullable=False, server_default=""))
        batch.add_column(sa.Column("tap_id", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("rechecked_at", UTC, nullable=True))
        batch.add_column(sa.Column("recheck_reason", sa.String(500), nullable=True))
        batch.create_index("ix_quarantine_status", ["status", "id"])
    q = sa.table(TABLE, sa.column("signed", sa.Boolean), sa.column("device_seq", sa.BigInteger),
                 sa.column("reason", sa.String))
    op.execute(q.update().where(q.c.device_seq.is_not(None), q.c.reason.not_like("unsigned v%"))
               .values(signed=True))
    op.execute(q.update().where(q.c.device_seq.is_not(None), q.c.reason.like("unsigned v%")).values(signed=False))


def downgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_index("ix_quarantine_status")
        for name in ("recheck_reason", "rechecked_at", "tap_id", "resolution", "resolved_by", "resolved_at",
                     "status", "signed"):
            batch.drop_column(name)

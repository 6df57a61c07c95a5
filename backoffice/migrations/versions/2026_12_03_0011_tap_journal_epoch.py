"""Each tap names the validator journal that wrote it (``tap.epoch``), and the dedupe key becomes (device_id, epoch,
device_seq): a bus whose journal is replaced starts its sequence again at 1 under a new epoch, and its new taps are
stored instead of being taken for duplicates of old ones. Taps stored before this revision, and those of validators
whose journals predate epochs, are epoch 0.

The route, vehicle and driver columns grow to the 64 characters the wire carries (``wire.codec.MAX_TEXT``): a
record the validator may send must fit, or its batch fails on PostgreSQL and the bus resends it forever.

Revision ID: 2026_12_03_0011
Revises: 2026_11_22_0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0011"
down_revision = "2026_11_22_0010"
branch_labels = None
depends_on = None

OLD_KEY, NEW_KEY = "uq_tap_device_seq", "uq_tap_device_epoch_seq"
TEXTS = ("route", "vehicle", "driver")


def upgrade() -> None:
    # SQLite cannot drop a table constraint in place: batch mode copies the table (the embedded default's size).
    with op.batch_alter_table("tap") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"))
        batch.drop_constraint(OLD_KEY, type_="unique")
        batch.create_unique_constraint(NEW_KEY, ["device_id", "epoch", "device_seq"])
        for name in TEXTS:
            batch.alter_column(name, type_=sa.String(64), existing_type=sa.String(32), existing_nullable=False)


def downgrade() -> None:
    # Refused while two journals of one device share a sequence: the old key could not hold both taps.
    with op.batch_alter_table("tap") as batch:
        batch.drop_constraint(NEW_KEY, type_="unique")
        batch.create_unique_constraint(OLD_KEY, ["device_id", "device_seq"])
        batch.drop_column("epoch")
        for name in TEXTS:
            batch.alter_column(name, type_=sa.String(32), existing_type=sa.String(64), existing_nullable=False)

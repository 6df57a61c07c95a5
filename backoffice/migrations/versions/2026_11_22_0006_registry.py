"""Registry history: versioned operators (with their fare rules), routes (fare, stops), vehicles, drivers and
validators; driver cards; stops; the registry's audit lines. Existing rows get a first version valid since 1970, so
reports of any past day still find a name.

Revision ID: 2026_11_22_0006
Revises: 2026_11_22_0003
Create Date: 2026-11-22
"""

from datetime import UTC as _UTC
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "2026_11_22_0006"
down_revision = "2026_11_22_0003"  # a branch of its own beside clearing's 0004; backoffice.db applies every head
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)
SINCE_EVER = datetime(1970, 1, 1, tzinfo=_UTC)
ENTITIES = ("operator", "route", "vehicle", "driver", "device")


def _versioned(name: str, key: str, target: str, *columns: sa.Column, with_operator: bool = True) -> None:
    op.create_table(
        name,
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(key, sa.String(32), sa.ForeignKey(target), nullable=False, index=True),
        *([sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False)]
          if with_operator else []),
        sa.Column("valid_from", UTC, nullable=False),
        sa.Column("valid_to", UTC, nullable=True),
        *columns,
    )


def upgrade() -> None:
    for table in ENTITIES:
        op.add_column(table, sa.Column("retired_at", UTC, nullable=True))
    _versioned("operator_version", "code", "operator.code",
               sa.Column("name", sa.String(200), nullable=False),
               sa.Column("timezone", sa.String(64), nullable=False),
               sa.Column("cutoff_hour", sa.Integer, nullable=False),
               sa.Column("transfer_window_minutes", sa.Integer, nullable=False, server_default="0"),
               sa.Column("transfer_discount", sa.Integer, nullable=False, server_default="0"),
               sa.Column("min_balance", sa.Integer, nullable=False, server_default="0"),
               with_operator=False)
    op.create_table(
        "card_type_discount",
        sa.Column("operator_version_id", sa.BigInteger, sa.ForeignKey("operator_version.id"), primary_key=True),
        sa.Column("card_type", sa.Integer, primary_key=True),
        sa.Column("percent", sa.Integer, nullable=False),
    )
    _versioned("route_version", "code", "route.code",
               sa.Column("name", sa.String(200), nullable=False),
               sa.Column("flat_fare", sa.Integer, nullable=True),
               sa.Column("max_trip_minutes", sa.Integer, nullable=False, server_default="180"))
    op.create_table(
        "route_fare_stage",
        sa.Column("route_version_id", sa.BigInteger, sa.ForeignKey("route_version.id"), primary_key=True),
        sa.Column("up_to_stops", sa.Integer, primary_key=True),
        sa.Column("fare", sa.Integer, nullable=False),
    )
    op.create_table(
        "stop",
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), primary_key=True),
        sa.Column("code", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("lat", sa.Float, nullable=True),
        sa.Column("lon", sa.Float, nullable=True),
    )
    op.create_table(
        "route_stop",
        sa.Column("route_version_id", sa.BigInteger, sa.ForeignKey("route_version.id"), primary_key=True),
        sa.Column("direction", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("stop", sa.String(64), nullable=False),
    )
    _versioned("vehicle_version", "code", "vehicle.code", sa.Column("plate", sa.String(32), nullable=False))
    _versioned("driver_version", "staff_no", "driver.staff_no",
               sa.Column("name", sa.String(200), nullable=False),
               sa.Column("card_asn", sa.String(20), nullable=False))
    op.create_table(
        "driver_card",
        sa.Column("asn", sa.String(20), primary_key=True),
        sa.Column("staff_no", sa.String(32), sa.ForeignKey("driver.staff_no"), nullable=False, index=True),
        sa.Column("issued_at", UTC, nullable=False),
        sa.Column("withdrawn_at", UTC, nullable=True),
        sa.Column("reason", sa.String(200), nullable=False, server_default=""),
    )
    _versioned("device_version", "device_id", "device.device_id",
               sa.Column("vehicle", sa.String(32), nullable=True),
               sa.Column("terminal_id", sa.String(12), nullable=False))
    op.create_table(
        "registry_audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("recorded_at", UTC, nullable=False),
        sa.Column("effective_at", UTC, nullable=False),
        sa.Column("by", sa.String(64), nullable=False),
        sa.Column("operator", sa.String(32), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(2000), nullable=False),
    )
    op.create_index("ix_registry_audit_operator", "registry_audit", ["operator", "recorded_at"])
    _first_versions()


def _first_versions() -> None:
    """Rows registered before this revision: one open version each, valid since 1970 (nobody knows since when)."""
    since = sa.bindparam("since", SINCE_EVER, type_=UTC)
    conn = op.get_bind()
    copies = {  # new table (its columns) <- the existing table's columns, :since for the time column
        "operator_version (code, valid_from, name, timezone, cutoff_hour)":
            "code, :since, name, timezone, cutoff_hour FROM operator",
        "route_version (code, operator, valid_from, name, flat_fare)":
            "code, operator, :since, name, flat_fare FROM route",
        "vehicle_version (code, operator, valid_from, plate)": "code, operator, :since, plate FROM vehicle",
        "driver_version (staff_no, operator, valid_from, name, card_asn)":
            "staff_no, operator, :since, name, card_asn FROM driver",
        "driver_card (asn, staff_no, issued_at)": "card_asn, staff_no, :since FROM driver",
        "device_version (device_id, operator, valid_from, vehicle, terminal_id)":
            "device_id, operator, :since, vehicle, terminal_id FROM device",
    }
    for target, source in copies.items():
        conn.execute(sa.text(f"INSERT INTO {target} SELECT {source}").bindparams(since))


def downgrade() -> None:
    op.drop_index("ix_registry_audit_operator", table_name="registry_audit")
    for table in ("registry_audit", "device_version", "driver_card", "driver_version", "vehicle_version",
                  "route_stop", "stop", "route_fare_stage", "route_version", "card_type_discount",
                  "operator_version"):
        op.drop_table(table)
    for table in ENTITIES:
        if op.get_bind().dialect.name == "sqlite":
            # SQLite >= 3.35 drops a column in place; Alembic's batch mode would copy and drop the table, which the
            # enforced foreign keys of the other tables refuse.
            op.execute(f"ALTER TABLE {table} DROP COLUMN retired_at")
        else:
            op.drop_column(table, "retired_at")

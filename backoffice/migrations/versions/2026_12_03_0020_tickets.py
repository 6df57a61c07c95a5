"""Tickets beside cards (issue 11): the product catalogue, coach departures with their seats, ticket orders with
their items, audit lines and seat holds, and the tickets issued.

A departure counts its seats taken (held by an unpaid order, or sold) in ``seats_taken``; an order takes seats with
one conditional UPDATE (``seats_taken + n <= seats``), so no two buyers get the last seat, on SQLite or PostgreSQL.
This revision also joins the heads of 2026-12-03 (they touch other tables).

Revision ID: 2026_12_03_0020
Revises: 2026_12_03_0011, 2026_12_03_0012, 2026_12_03_0013, 2026_12_03_0014, 2026_12_03_0016, 2026_12_03_0017,
         2026_12_03_0018
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0020"
down_revision = ("2026_12_03_0011", "2026_12_03_0012", "2026_12_03_0013", "2026_12_03_0014", "2026_12_03_0016",
                 "2026_12_03_0017", "2026_12_03_0018")
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "product",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # single | day_pass | month_pass | coach_trip
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("price_fen", sa.BigInteger, nullable=False),
        sa.Column("routes", sa.String(1000), nullable=False, server_default=""),  # route codes, space-separated; "" any
        sa.Column("validity_days", sa.Integer, nullable=False, server_default="1"),  # operator-local service days
        sa.Column("uses", sa.Integer, nullable=False, server_default="1"),  # rides allowed; 0 = unlimited
        sa.Column("rider_category", sa.Integer, nullable=False, server_default="1"),  # epurse.cardtypes
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
        sa.UniqueConstraint("operator", "code", name="uq_product_operator_code"),
    )
    op.create_table(
        "departure",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("product.id"), nullable=False),  # a coach_trip product
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("direction", sa.Integer, nullable=False, server_default="0"),  # GTFS direction_id: its stop order
        sa.Column("service_date", sa.Date, nullable=False),  # the operator's service day
        sa.Column("departs_local", sa.String(5), nullable=False),  # HH:MM on the operator's clock
        sa.Column("departs_at", UTC, nullable=False),
        sa.Column("seats", sa.Integer, nullable=False),
        sa.Column("seats_taken", sa.Integer, nullable=False, server_default="0"),  # held + sold
        sa.Column("trip_id", sa.String(64), nullable=True),  # the GTFS trip it came from
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.CheckConstraint("seats_taken >= 0 AND seats_taken <= seats", name="ck_departure_seats"),
        sa.UniqueConstraint("product_id", "route", "direction", "departs_at", name="uq_departure"),
    )
    op.create_index("ix_departure_day", "departure", ["operator", "service_date"])
    op.create_table(
        "ticket_order",
        sa.Column("order_id", sa.String(40), primary_key=True),
        sa.Column("operator", sa.String(32), sa.ForeignKey("operator.code"), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),  # web | sms | partner | counter
        sa.Column("phone", sa.String(32), nullable=False, server_default=""),
        sa.Column("state", sa.String(16), nullable=False),  # created paid issued used refunded expired
        sa.Column("total_fen", sa.BigInteger, nullable=False),
        sa.Column("paid_fen", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refunded_fen", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("payment_ref", sa.String(64), nullable=True, unique=True),
        sa.Column("idempotency_key", sa.String(64), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),  # unpaid by then: expired, seats released
        sa.Column("paid_at", UTC, nullable=True),
        sa.Column("issued_at", UTC, nullable=True),
        sa.UniqueConstraint("operator", "channel", "idempotency_key", name="uq_ticket_order_idempotency"),
    )
    op.create_index("ix_ticket_order_state", "ticket_order", ["state", "expires_at"])
    op.create_index("ix_ticket_order_phone", "ticket_order", ["phone"])
    op.create_table(
        "order_item",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.String(40), sa.ForeignKey("ticket_order.order_id"), nullable=False, index=True),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("product.id"), nullable=False),
        sa.Column("departure_id", sa.BigInteger, sa.ForeignKey("departure.id"), nullable=True),
        sa.Column("start_date", sa.Date, nullable=True),  # a pass's first service day
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("unit_fen", sa.BigInteger, nullable=False),
        sa.Column("amount_fen", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ticket",
        sa.Column("ticket_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.String(40), sa.ForeignKey("ticket_order.order_id"), nullable=False, index=True),
        sa.Column("item_id", sa.BigInteger, sa.ForeignKey("order_item.id"), nullable=False),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("product.id"), nullable=False),
        sa.Column("departure_id", sa.BigInteger, sa.ForeignKey("departure.id"), nullable=True),
        sa.Column("operator", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("routes", sa.String(1000), nullable=False, server_default=""),
        sa.Column("rider_category", sa.Integer, nullable=False),
        sa.Column("price_fen", sa.BigInteger, nullable=False),
        sa.Column("valid_from", UTC, nullable=False),
        sa.Column("valid_to", UTC, nullable=False),  # exclusive
        sa.Column("uses_allowed", sa.Integer, nullable=False),  # 0 = unlimited within validity
        sa.Column("uses_made", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pickup_serial", sa.BigInteger, nullable=False),  # ticket_id mod 10^10
        sa.Column("key_id", sa.Integer, nullable=False),
        sa.Column("token", sa.String(600), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # issued | used | refunded | expired
        sa.Column("issued_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.UniqueConstraint("operator", "pickup_serial", name="uq_ticket_pickup_serial"),
    )
    op.create_index("ix_ticket_state_valid_to", "ticket", ["state", "valid_to"])
    op.create_index("ix_ticket_departure", "ticket", ["departure_id"])
    op.create_table(
        "seat_hold",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("departure_id", sa.BigInteger, sa.ForeignKey("departure.id"), nullable=False, index=True),
        sa.Column("order_id", sa.String(40), sa.ForeignKey("ticket_order.order_id"), nullable=False, index=True),
        sa.Column("seats", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # held | sold | released
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("released_at", UTC, nullable=True),
    )
    op.create_table(
        "order_audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.String(40), sa.ForeignKey("ticket_order.order_id"), nullable=False, index=True),
        sa.Column("at", UTC, nullable=False),
        sa.Column("who", sa.String(64), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),  # None: the order was created
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("why", sa.String(500), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("order_audit")
    op.drop_table("seat_hold")
    op.drop_index("ix_ticket_departure", table_name="ticket")
    op.drop_index("ix_ticket_state_valid_to", table_name="ticket")
    op.drop_table("ticket")
    op.drop_table("order_item")
    op.drop_index("ix_ticket_order_phone", table_name="ticket_order")
    op.drop_index("ix_ticket_order_state", table_name="ticket_order")
    op.drop_table("ticket_order")
    op.drop_index("ix_departure_day", table_name="departure")
    op.drop_table("departure")
    op.drop_table("product")

"""The tables of revision 2026_12_03_0022 on the back office's metadata (as backoffice.alarms keeps its own), so
the migration-vs-models tests see them."""

from __future__ import annotations

from sqlalchemy import (BigInteger, CheckConstraint, Column, Date, DateTime, ForeignKey, Index, Integer, String,
                        Table, Text, UniqueConstraint)

from backoffice.models import Base

BigId = BigInteger().with_variant(Integer, "sqlite")
UTC = DateTime(timezone=True)

refund = Table(
    "payment_refund", Base.metadata,
    Column("refund_id", String(40), primary_key=True),
    Column("order_kind", String(8), nullable=False),
    Column("order_id", String(40), nullable=False),
    Column("payment_ref", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("ticket_ids", String(1000), nullable=False, server_default=""),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("platform_ref", String(64), nullable=True, unique=True),
    Column("answer", String(500), nullable=False, server_default=""),
    Column("requested_by", String(64), nullable=False),
    Column("why", String(500), nullable=False, server_default=""),
    Column("created_at", UTC, nullable=False),
    Column("answered_at", UTC, nullable=True),
    CheckConstraint("amount > 0", name="ck_payment_refund_amount"),
    Index("ix_payment_refund_order", "order_id"),
    Index("ix_payment_refund_state", "state", "created_at"),
)

statement = Table(
    "payment_statement", Base.metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("day", Date, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("fetched_at", UTC, nullable=False),
    Column("lines", Integer, nullable=False),
    Column("body", Text, nullable=False),
    UniqueConstraint("day", "sha256", name="uq_payment_statement_file"),
)

statement_line = Table(
    "payment_statement_line", Base.metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("statement_id", BigInteger, ForeignKey("payment_statement.id"), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("order_id", String(40), nullable=False),
    Column("ref", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("fee", BigInteger, nullable=False),
    Column("at", UTC, nullable=False),
    Index("ix_payment_statement_line_statement", "statement_id"),
)

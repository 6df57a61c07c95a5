"""The tables of revision 2026_12_03_0023 on the back office's metadata (as backoffice.payments.tables), so the
migration-vs-models tests see them."""

from __future__ import annotations

from sqlalchemy import (BigInteger, CheckConstraint, Column, DateTime, Index, Integer, String, Table,
                        UniqueConstraint)

from backoffice.models import Base

BigId = BigInteger().with_variant(Integer, "sqlite")
UTC = DateTime(timezone=True)

message = Table(
    "sms_message", Base.metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("direction", String(3), nullable=False),
    Column("gateway_id", String(64), nullable=True),
    Column("phone", String(24), nullable=False),
    Column("text", String(500), nullable=False),
    Column("at", UTC, nullable=False),
    Column("order_id", String(40), nullable=True),
    Column("state", String(16), nullable=False),
    Column("outcome", String(200), nullable=False, server_default=""),
    Column("sent_at", UTC, nullable=True),
    UniqueConstraint("direction", "gateway_id", name="uq_sms_message_gateway_id"),
    CheckConstraint("direction IN ('in', 'out')", name="ck_sms_message_direction"),
    Index("ix_sms_message_phone", "phone", "direction", "at"),
    Index("ix_sms_message_state", "direction", "state"),
)

conversation = Table(
    "sms_conversation", Base.metadata,
    Column("phone", String(24), primary_key=True),
    Column("operator", String(32), nullable=True),
    Column("state", String(16), nullable=False),
    Column("order_id", String(40), nullable=True),
    Column("expires_at", UTC, nullable=True),
    Column("updated_at", UTC, nullable=False),
    Index("ix_sms_conversation_state", "state", "expires_at"),
)

# Revision 2026_12_03_0025: the web shop's one-time codes (sent by SMS) and rate counters (backoffice.web.shop_service)
shop_code = Table(
    "shop_code", Base.metadata,
    Column("phone", String(24), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("expires_at", UTC, nullable=False),
    Column("attempts_left", Integer, nullable=False),
    Column("created_at", UTC, nullable=False),
)

shop_rate_event = Table(
    "shop_rate_event", Base.metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(80), nullable=False),
    Column("at", UTC, nullable=False),
    Index("ix_shop_rate_event_key", "key", "at"),
    Index("ix_shop_rate_event_at", "at"),
)

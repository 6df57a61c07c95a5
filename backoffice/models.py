"""The back office's tables (SQLAlchemy 2.x). The Alembic revisions in backoffice/migrations are the schema's truth;
these classes must match them (a test compares the two).

Money is integer fen; times are UTC. A tap is stored once per (device_id, device_seq), the dedupe key every device
record carries.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Operator(Base):
    """A bus company."""

    __tablename__ = "operator"
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="Asia/Shanghai")
    cutoff_hour: Mapped[int] = mapped_column(Integer, default=3)


class Route(Base):
    __tablename__ = "route"
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    name: Mapped[str] = mapped_column(String(200))
    flat_fare: Mapped[int] = mapped_column(Integer)  # fen


class Vehicle(Base):
    __tablename__ = "vehicle"
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    plate: Mapped[str] = mapped_column(String(32))


class Driver(Base):
    __tablename__ = "driver"
    staff_no: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    name: Mapped[str] = mapped_column(String(200))
    card_asn: Mapped[str] = mapped_column(String(20), unique=True)


class Device(Base):
    """A validator, mounted in a vehicle."""

    __tablename__ = "device"
    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    vehicle: Mapped[str | None] = mapped_column(ForeignKey("vehicle.code"), nullable=True)
    terminal_id: Mapped[str] = mapped_column(String(12))  # the PSAM's terminal number, hex


class Card(Base):
    __tablename__ = "card"
    asn: Mapped[str] = mapped_column(String(20), primary_key=True)
    card_type: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | lost | blocked


class Tap(Base):
    __tablename__ = "tap"
    __table_args__ = (UniqueConstraint("device_id", "device_seq", name="uq_tap_device_seq"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(32))
    device_seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    operator: Mapped[str] = mapped_column(String(32))
    route: Mapped[str] = mapped_column(String(32))
    vehicle: Mapped[str] = mapped_column(String(32))
    driver: Mapped[str] = mapped_column(String(32))
    shift_no: Mapped[int] = mapped_column(Integer)
    card_asn: Mapped[str] = mapped_column(String(20))
    card_type: Mapped[int] = mapped_column(Integer)
    card_ttc: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    terminal_id: Mapped[str] = mapped_column(String(12))
    terminal_seq: Mapped[int] = mapped_column(BigInteger)
    tac: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(200))


class Quarantine(Base):
    """What ingest could not accept, with the reason; kept, never cleared, for operations to look at."""

    __tablename__ = "quarantine"
    # A record quarantined once is not quarantined again for the same reason when its batch is resent; a forged
    # copy of a device's record (another reason) cannot take the place of the genuine one. NULL seqs stay distinct.
    __table_args__ = (UniqueConstraint("device_id", "device_seq", "reason", name="uq_quarantine_record_reason"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    topic: Mapped[str] = mapped_column(String(200))
    device_id: Mapped[str] = mapped_column(String(32))
    device_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str] = mapped_column(String(500))
    payload: Mapped[bytes] = mapped_column(LargeBinary)

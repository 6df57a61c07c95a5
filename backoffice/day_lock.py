"""A signed-off service day is locked: what clearing asks before it clears a day again.

Kept apart from backoffice.signoff (which clears the day once more before approving it), so that clearing_runs can
ask for the lock and signoff can call clearing_runs without the two importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import BigInteger, Connection, Date, DateTime, ForeignKey, Integer, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, mapped_column

from backoffice.models import Base


class SettlementSignoff(Base):
    """One operator's service day approved (revision 2026_12_03_0017)."""

    __tablename__ = "settlement_signoff"
    __table_args__ = (UniqueConstraint("operator", "service_day", name="uq_settlement_signoff_day"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    operator: Mapped[str] = mapped_column(String(32), ForeignKey("operator.code"))
    service_day: Mapped[date] = mapped_column(Date)
    run_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("clearing_run.id"))
    fingerprint: Mapped[str] = mapped_column(String(64))
    day_gross: Mapped[int] = mapped_column(BigInteger)
    payable_net: Mapped[int] = mapped_column(BigInteger)
    approved_by: Mapped[str] = mapped_column(String(64))
    approved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    note: Mapped[str] = mapped_column(String(500), server_default="")


class DayLocked(ValueError):
    """The day is signed off: it is not cleared again."""


@dataclass(frozen=True)
class SignOff:
    operator: str
    day: date
    run_id: int
    fingerprint: str
    day_gross: int
    payable_net: int
    approved_by: str
    approved_at: datetime
    note: str


def as_utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def signed_off(conn: Connection, *, operator: str, day: date) -> SignOff | None:
    row = conn.execute(select(SettlementSignoff.__table__).where(
        SettlementSignoff.operator == operator, SettlementSignoff.service_day == day)).first()
    if row is None:
        return None
    return SignOff(row.operator, row.service_day, int(row.run_id), row.fingerprint, int(row.day_gross),
                   int(row.payable_net), row.approved_by, as_utc(row.approved_at), row.note)


def locked_message(s: SignOff) -> str:
    return (f"{s.operator} {s.day} was signed off by {s.approved_by} at {s.approved_at:%Y-%m-%d %H:%M} UTC "
            f"(clearing run {s.run_id}): the day is locked and is not cleared again. A correction goes into the "
            f"next run: late taps of {s.day} are taken by the next day's clearing as late taps, and a "
            "reconciliation adjustment is carried into it. The day's reports can still be downloaded.")


def check_open(conn: Connection, *, operator: str, day: date) -> None:
    """Raise ``DayLocked`` when ``day`` is signed off (the lock ``clearing_runs.clear_day`` asks for)."""
    s = signed_off(conn, operator=operator, day=day)
    if s is not None:
        raise DayLocked(locked_message(s))

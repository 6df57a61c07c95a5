"""Settle one service day from the stored taps and write its PDF. The entry point for `farebox settle`, the demo and
(later) the nightly job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
from sqlalchemy import Connection, select

from backoffice import registry
from backoffice.models import Operator, Tap
from clearing.service_day import day_bounds
from clearing.settlement import Settlement, settle_day
from reports.settlement_pdf import write_settlement_pdf

TAP_COLUMNS = ["device_id", "device_seq", "kind", "occurred_at", "operator", "route", "vehicle", "driver",
               "card_type", "amount"]


@dataclass(frozen=True)
class DaySettlement:
    settlement: Settlement
    pdf: Path | None


def load_day_taps(conn: Connection, *, operator: str, day: date, tz: str, cutoff_hour: int) -> pd.DataFrame:
    start, end = day_bounds(day, tz, cutoff_hour)
    query = (select(*[getattr(Tap, c) for c in TAP_COLUMNS])
             .where(Tap.operator == operator, Tap.occurred_at >= start, Tap.occurred_at < end))
    frame = pd.DataFrame(conn.execute(query).all(), columns=TAP_COLUMNS)
    # SQLite hands back naive datetimes; everything stored is UTC.
    frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True)
    return frame


def settle(conn: Connection, *, operator: str, day: date, reports_dir: Path | None = None) -> DaySettlement:
    op = conn.execute(select(Operator.name, Operator.timezone, Operator.cutoff_hour)
                      .where(Operator.code == operator)).first()
    if op is None:
        raise LookupError(f"operator {operator!r} is not registered")
    taps = load_day_taps(conn, operator=operator, day=day, tz=op.timezone, cutoff_hour=op.cutoff_hour)
    result = settle_day(taps, day, operator=operator, tz=op.timezone, cutoff_hour=op.cutoff_hour)
    pdf = None
    if reports_dir is not None:
        names = registry.names(conn, operator)
        pdf = write_settlement_pdf(
            result, Path(reports_dir) / f"settlement-{operator}-{day.isoformat()}.pdf", operator_name=op.name,
            generated_at=datetime.now(UTC), route_names=names["route"], vehicle_names=names["vehicle"],
            driver_names=names["driver"])
    return DaySettlement(result, pdf)

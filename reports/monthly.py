"""The monthly settlement PDF: one operator's service days from the first to the last of a month, with a table and
a chart by day beside the breakdowns by fleet, route, vehicle and driver, and what the month's runs carry for
earlier days with the net payable (the days' net + the adjustments). Input: ``SettlementTables`` with ``by_day``;
see ``reports.settlement_doc`` for the columns."""

from __future__ import annotations

import calendar
from datetime import date
from pathlib import Path

from clearing.service_day import DEFAULT_CUTOFF_HOUR
from reports.pdf import check_aware, write_pdf
from reports.settlement_doc import SettlementTables, settlement_story

TITLE = "结算月报 Monthly settlement"


def month_bounds(year: int, month: int) -> tuple[date, date]:
    """The first and last service day of a month."""
    return date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1])


def write_monthly_pdf(tables: SettlementTables, path: str | Path, *,
                      cutoff_hour: int = DEFAULT_CUTOFF_HOUR) -> Path:
    """Write the period's settlement report to `path`, atomically. A whole month is headed "month YYYY-MM"; any
    other period by its first and last day."""
    if tables.last_day < tables.first_day:
        raise ValueError(f"the period ends ({tables.last_day}) before it starts ({tables.first_day})")
    check_aware("generated_at", tables.generated_at)
    if tables.run is not None:
        check_aware("run.at", tables.run.at)
    first, last = tables.first_day, tables.last_day
    whole_month = (first, last) == month_bounds(first.year, first.month)
    span = f"{first.isoformat()} to {last.isoformat()}"
    period = f"月份 month {first:%Y-%m} ({span})" if whole_month else f"运营日 service days {span}"
    this = ("本月", "This month") if whole_month else ("本期", "This period")
    story, header = settlement_story(tables, title=TITLE, period=period, period_word=("本期", "Period"), this=this,
                                     cutoff_hour=cutoff_hour)
    return write_pdf(path, story, header, title=f"Monthly settlement {tables.operator} {span}")

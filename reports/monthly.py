"""The monthly settlement PDF: one operator's service days from the first to the last of a month, with a table and
a chart by day beside the breakdowns by fleet, route, vehicle and driver, and what the month's runs carry for
earlier days with the net payable (the days' net + the adjustments). Input: ``SettlementTables`` with ``by_day``;
see ``reports.settlement_doc`` for the columns."""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable
from dataclasses import replace
from datetime import date
from pathlib import Path

from clearing.service_day import DEFAULT_CUTOFF_HOUR
from reports.pdf import check_aware, run_line, when_text, write_pdf
from reports.settlement_doc import SettlementTables, settlement_story

TITLE = "结算月报 Monthly settlement"
RUNS = "清分批次 Clearing runs"
RUN_IDS = re.compile(r"\d+(?:(?:-|, )\d+)*")  # what runs_label makes: "7", "1-2", "1-3, 7"


def runs_label(ids: Iterable[int]) -> str:
    """A month's clearing runs by their ids, consecutive ids as a span: [1, 2] -> "1-2", [1, 2, 3, 7] -> "1-3, 7"
    (another operator's runs fall between a company's own, so its ids need not be consecutive)."""
    spans: list[list[int]] = []
    for i in sorted(set(ids)):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def month_run_line(tables: SettlementTables) -> str:
    """The month's header line under the title: "清分批次 Clearing runs 1-2, the latest of <local time> <zone>"
    when the run's id is a ``runs_label``; "none: ..." (``settle_month`` found no day cleared) said plainly; any
    other id as every report says it."""
    run = tables.run
    if run is None or not RUN_IDS.fullmatch(run.id):
        if run is not None and run.id.startswith("none:"):
            return f"{RUNS}: none, {run.id.removeprefix('none:').strip()}"
        return run_line(run.id if run else None, run.at if run else tables.generated_at, tables.tz)
    if not any(c in run.id for c in "-,"):  # one run
        return f"清分批次 Clearing run {run.id} of {when_text(run.at, tables.tz)}"
    return f"{RUNS} {run.id}, the latest of {when_text(run.at, tables.tz)}"


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
    header = replace(header, run_line=month_run_line(tables))
    return write_pdf(path, story, header, title=f"Monthly settlement {tables.operator} {span}")

"""The daily settlement PDF: one service day of one operator, by fleet, route, vehicle and driver, with revenue by
route and taps by hour as charts, and what the day's clearing run carries for earlier days (late taps,
reconciliation adjustments) with the net payable. Input: ``SettlementTables`` (frames handed in by clearing); see
``reports.settlement_doc`` for the columns."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from clearing.service_day import DEFAULT_CUTOFF_HOUR
from reports.monthly import RUN_IDS, month_run_line
from reports.pdf import check_aware, when_text, write_pdf
from reports.settlement_doc import SettlementTables, settlement_story

TITLE = "结算日报 Daily settlement"


def clearing_line(tables: SettlementTables) -> str:
    """The header's clearing line, in both languages and plain: "清分批次 Clearing run 7 of 2026-12-03 04:07
    Asia/Shanghai" for a day, the month's "清分批次 Clearing runs 1-2, the latest of ..." (reports.monthly's
    runs_label) for a period, or a report made outside a stored run said so. The XLSX's "清分 Clearing" row too."""
    run = tables.run
    if run is None:
        return f"临时清分（无存档批次） Ad hoc clearing (no stored run) of {when_text(tables.generated_at, tables.tz)}"
    if RUN_IDS.fullmatch(run.id) or run.id.startswith("none:"):
        return month_run_line(tables)
    return f"清分批次 Clearing run {run.id} of {when_text(run.at, tables.tz)}"


def write_daily_pdf(tables: SettlementTables, path: str | Path, *, cutoff_hour: int = DEFAULT_CUTOFF_HOUR) -> Path:
    """Write the day's settlement report to `path`, atomically. `cutoff_hour` orders the hourly chart from the
    start of the service day."""
    if tables.first_day != tables.last_day:
        raise ValueError(f"a daily report covers one service day, got {tables.first_day} to {tables.last_day}; "
                         "use reports.monthly.write_monthly_pdf for a period")
    check_aware("generated_at", tables.generated_at)
    if tables.run is not None:
        check_aware("run.at", tables.run.at)
    day = tables.first_day.isoformat()
    story, header = settlement_story(tables, title=TITLE, period=f"运营日 service day {day}",
                                     period_word=("本日", "Day"), this=("本日", "This day"), cutoff_hour=cutoff_hour)
    header = replace(header, run_line=clearing_line(tables))
    return write_pdf(path, story, header, title=f"Daily settlement {tables.operator} {day}")

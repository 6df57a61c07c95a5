"""The clerk's e-ticket report page (``/tickets/report``): for a range of service days the tickets sold and
refunded by product and channel (``backoffice.tickets.revenue.sales``), the revenue the days' clearing runs
recognised on ticket uses by route, vehicle, driver, product, channel and source, and the deferred balance (sold,
not yet recognised) after the range's last cleared day (``backoffice.settle.ticket_tables``, the same figures the
settlement PDF and CSVs carry), with the tables as CSV (one table) or XLSX (every table), laid out by
``reports.tickets.export_frames`` (bilingual headings, yuan, a totals row). Reading never clears: days not
cleared are named and add nothing to the revenue tables (their sales still count)."""

from __future__ import annotations

import io
from datetime import date, timedelta
from typing import Annotated, Literal

import pandas as pd
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Connection

from backoffice import clearing_runs, taps_browser
from backoffice.settle import stored_run_id, ticket_tables
from backoffice.tickets import revenue
from backoffice.web import reads
from backoffice.web.api import reports
from backoffice.web.auth import Principal, page_of
from backoffice.web.deps import Services, connection, services
from backoffice.web.downloads import CSV_LABELS
from backoffice.web.pages import _ticket_label, render
from clearing import money
from clearing.service_day import day_bounds
from reports.tables import escape_formulas
from reports.tickets import DIMENSIONS, TicketTables, export_frames

router = APIRouter(include_in_schema=False)
Who = Annotated[Principal, Depends(page_of(*reports.OWNERS))]
Conn = Annotated[Connection, Depends(connection)]
Svc = Annotated[Services, Depends(services)]
MAX_DAYS = 92
TABLES = tuple(f"tickets_by_{d}" for d in DIMENSIONS) + ("tickets_late", "ticket_sales", "ticket_outstanding")
HEADINGS = {"route": ("按线路", "By route"), "vehicle": ("按车辆", "By vehicle"), "driver": ("按司机", "By driver"),
            "product": ("按票种", "By product"), "channel": ("按渠道", "By channel"),
            "source": ("按来源", "By source")}


def _day(text: str, what: str) -> date | None:
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise HTTPException(422, f"{what}: a day is YYYY-MM-DD, not {text!r}") from None
    if not date(2000, 1, 1) <= day <= date(2099, 12, 31):
        raise HTTPException(422, f"{what}: a service day from 2000-01-01 to 2099-12-31, not {day}")
    return day


def report(conn: Connection, svc: Services, who: Principal, operator: str, first: str, last: str) -> dict:
    """The page's figures (fen) for ``operator`` over the service days ``first`` .. ``last``."""
    codes = [o["code"] for o in reads.registry_list(conn, kind="operators", operator=who.scope(None))]
    operator = operator or who.operator or (codes[0] if codes else "")
    if not operator:
        raise HTTPException(404, "no operator is registered yet")
    op = reports.operator_of(conn, who, operator)
    first_day, last_day = _day(first, "first"), _day(last, "last")
    if first_day is None or last_day is None:  # the latest complete service day by default
        yesterday = reads.current_service_day(svc.clock(), tz=op.tz, cutoff_hour=op.cutoff_hour) - timedelta(days=1)
        latest = taps_browser.latest_day_with_data(conn, operator=op.code, tz=op.tz, cutoff_hour=op.cutoff_hour,
                                                   now=day_bounds(yesterday, op.tz, op.cutoff_hour)[0]) or yesterday
        first_day = first_day or last_day or latest
        last_day = last_day or first_day
    if last_day < first_day:
        raise HTTPException(422, f"the range ends ({last_day}) before it starts ({first_day})")
    if (last_day - first_day).days >= MAX_DAYS:
        raise HTTPException(422, f"a range of at most {MAX_DAYS} days, please")
    runs, missing = [], []
    for i in range((last_day - first_day).days + 1):
        d = first_day + timedelta(days=i)
        run_id = stored_run_id(conn, op.code, d)
        if run_id is None:
            missing.append(d)
        else:
            runs.append(clearing_runs.get_run(conn, run_id))
    sales = revenue.sales(conn, operator=op.code, day=first_day, last_day=last_day, tz=op.tz,
                          cutoff_hour=op.cutoff_hour)
    tables = ticket_tables(conn, runs, op.tz, op.cutoff_hour) if runs else None
    if tables is None:  # nothing cleared (or nothing recognised, nothing sold by then): sales alone
        empty = {d: pd.DataFrame({d: pd.Series(dtype=object), "taps": pd.Series(dtype="int64"),
                                  "gross": pd.Series(dtype="int64")}) for d in DIMENSIONS}
        tables = TicketTables(by=empty, late=pd.DataFrame(columns=["for_day", "source", "taps", "gross"]),
                              sales=sales, outstanding=pd.DataFrame(columns=list(revenue.OUTSTANDING_COLUMNS)))
        cleared = False
    else:
        tables = TicketTables(by=tables.by, late=tables.late, sales=sales, outstanding=tables.outstanding)
        cleared = True
    return {"op": op, "codes": codes, "first": first_day, "last": last_day, "runs": runs, "missing": missing,
            "tables": tables, "cleared": cleared}


def _rows(frame: pd.DataFrame, dim: str) -> list[dict]:
    return [{"key": str(k), "label": _ticket_label(dim, k), "taps": int(n), "gross": int(g)}
            for k, n, g in frame[[dim, "taps", "gross"]].itertuples(index=False)]


@router.get("/tickets/report")
def ticket_report_page(*, request: Request, who: Who, conn: Conn, svc: Svc, operator: str = "", first: str = "",
                       last: str = "") -> HTMLResponse:
    r = report(conn, svc, who, operator, first, last)
    t: TicketTables = r["tables"]
    uses = [{"key": d, "heading": HEADINGS[d], "rows": _rows(t.by[d], d)} for d in DIMENSIONS]
    sales = [{"product": s.product, "channel": _ticket_label("channel", s.channel), "tickets": int(s.tickets),
              "gross": int(s.gross), "refunded_tickets": int(s.refunded_tickets), "refunded": int(s.refunded),
              "net": int(s.net)} for s in t.sales.itertuples(index=False)]
    outstanding = [{"product": o.product, "tickets": int(o.tickets), "sold": int(o.sold),
                    "refunded": int(o.refunded), "recognised": int(o.recognised), "deferred": int(o.deferred)}
                   for o in t.outstanding.itertuples(index=False)]
    q = f"operator={r['op'].code}&first={r['first']}&last={r['last']}"
    present = [n for n in TABLES if n != "tickets_late" or not t.late.empty]
    return render(request, "tickets_report.html", who, tz=r["op"].tz, op=r["op"], codes=r["codes"],
                  first=r["first"], last=r["last"], runs=r["runs"], missing=r["missing"], cleared=r["cleared"],
                  uses=uses, sales=sales, outstanding=outstanding, revenue=t.revenue,
                  csv=[(n, f"/tickets/report.csv?{q}&table={n}") for n in present], CSV_LABELS=CSV_LABELS,
                  xlsx=f"/tickets/report.xlsx?{q}")


def _filename(r: dict, suffix: str) -> str:
    span = r["first"].isoformat() + ("" if r["last"] == r["first"] else f"_{r['last'].isoformat()}")
    return f"tickets-{r['op'].code}-{span}{suffix}"


@router.get("/tickets/report.csv")
def ticket_report_csv(*, who: Who, conn: Conn, svc: Svc, operator: str = "", first: str = "", last: str = "",
                      table: Annotated[Literal[TABLES], Query()] = "ticket_sales") -> Response:
    r = report(conn, svc, who, operator, first, last)
    frames = export_frames(r["tables"])
    if table not in frames:
        raise HTTPException(404, f"no {table} table for {r['first']} .. {r['last']}")
    body = escape_formulas(frames[table]).to_csv(index=False, lineterminator="\r\n").encode("utf-8-sig")
    name = _filename(r, f"-{table}.csv")
    return Response(body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/tickets/report.xlsx")
def ticket_report_xlsx(*, who: Who, conn: Conn, svc: Svc, operator: str = "", first: str = "",
                       last: str = "") -> Response:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    r = report(conn, svc, who, operator, first, last)
    book = Workbook()
    book.remove(book.active)
    bold = Font(bold=True)
    for name, frame in export_frames(r["tables"], to_yuan=money.yuan_decimal).items():
        sheet = book.create_sheet(name[:31])
        frame = escape_formulas(frame)
        sheet.append(list(frame.columns))
        for row in frame.itertuples(index=False):
            sheet.append([None if pd.isna(v) else v for v in row])
        for cell in (*sheet[1], *sheet[sheet.max_row]):
            cell.font = bold
    out = io.BytesIO()
    book.save(out)
    name = _filename(r, ".xlsx")
    return Response(out.getvalue(), media_type=reports.MEDIA["xlsx"],
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})

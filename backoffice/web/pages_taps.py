"""The taps browser (``/taps``): a clerk's answer to "where did this tap go" and "which bus lost its link".

One operator's stored records over a range of service days, filtered (route, vehicle, driver, card, kind, outcome,
free text), a page at a time, with the totals of everything selected. ``/taps.csv`` and ``/taps.xlsx`` export
exactly that selection (every page of it, same filters, same order, same columns as the page) with bilingual
headers that name the unit, amounts in yuan, times local to the operator's zone and a totals row. The query is
backoffice.taps_browser; a clerk sees their own operator only, operations and admins choose one.
"""

from __future__ import annotations

import csv
import io
from datetime import date
from decimal import Decimal
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Connection

from backoffice import taps_browser
from backoffice.taps_browser import KINDS, OUTCOMES, TapFilter
from backoffice.web import reads
from backoffice.web.api.types import Text
from backoffice.web.auth import Principal, page_of
from backoffice.web.deps import Services, connection, scoped, services
from clearing import money
from clearing.service_day import local_time
from epurse.cardtypes import CardType

router = APIRouter(include_in_schema=False)
READERS = ("clerk", "operations")
Who = Annotated[Principal, Depends(page_of(*READERS))]
Conn = Annotated[Connection, Depends(connection)]
Svc = Annotated[Services, Depends(services)]
Field = Annotated[Text(64), Query()]
PAGE_SIZES = (50, 100, 200, 500)
CARD_TYPES = {int(t): (t.label_zh, t.label) for t in CardType}
CSV_ENCODING = "utf-8-sig"  # Excel on a clerk's PC reads UTF-8 only with the byte-order mark
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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


def _context(conn: Connection, svc: Services, who: Principal, operator: str, first: str, last: str, **filters):
    codes = [o["code"] for o in reads.registry_list(conn, kind="operators", operator=who.scope(None))]
    operator = operator or who.operator or (codes[0] if codes else "")
    if not operator:
        raise HTTPException(404, "no operator is registered yet")
    scoped(who, operator)
    info = reads.operator_day(conn, operator=operator)
    if info is None:
        raise HTTPException(404, f"operator {operator!r} not found")
    name, tz, cutoff = info
    first_day, last_day = _day(first, "first"), _day(last, "last")
    if first_day is None or last_day is None:  # the latest day with data by default, as the dashboard
        latest = taps_browser.latest_day_with_data(conn, operator=operator, tz=tz, cutoff_hour=cutoff,
                                                   now=svc.clock()) or reads.current_service_day(
            svc.clock(), tz=tz, cutoff_hour=cutoff)
        first_day = first_day or last_day or latest
        last_day = last_day or first_day
    f = TapFilter(operator, first_day, last_day, **{k: v.strip() for k, v in filters.items()})
    try:
        f.check()
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return f, codes, name, tz, cutoff


def _query(f: TapFilter, **more) -> str:
    params = {"operator": f.operator, "first": f.first_day.isoformat(), "last": f.last_day.isoformat(),
              "route": f.route, "vehicle": f.vehicle, "driver": f.driver, "card": f.card, "kind": f.kind,
              "outcome": f.outcome, "q": f.q, **more}
    return urlencode({k: v for k, v in params.items() if v not in ("", None)})


@router.get("/taps")
def taps_page(*, request: Request, who: Who, conn: Conn, svc: Svc, operator: Field = "", first: Field = "",
              last: Field = "", route: Field = "", vehicle: Field = "", driver: Field = "", card: Field = "",
              kind: Field = "", outcome: Field = "", q: Field = "",
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> HTMLResponse:
    from backoffice.web.pages import render

    f, codes, name, tz, cutoff = _context(conn, svc, who, operator, first, last, route=route, vehicle=vehicle,
                                          driver=driver, card=card, kind=kind, outcome=outcome, q=q)
    page = taps_browser.search(conn, f, tz=tz, cutoff_hour=cutoff, limit=limit, offset=offset)
    lists = {k: reads.registry_list(conn, kind=k, operator=f.operator) for k in ("routes", "vehicles", "drivers")}
    following = offset + limit if offset + limit < page.total else None
    previous = max(0, offset - limit) if offset > 0 else None
    return render(request, "taps.html", who, f=f, codes=codes, operator_name=name, tz=tz, page=page,
                  lists=lists, kinds=KINDS, outcomes=OUTCOMES, limit=limit, sizes=PAGE_SIZES,
                  next_url=None if following is None else f"/taps?{_query(f, limit=limit, offset=following)}",
                  prev_url=None if previous is None else f"/taps?{_query(f, limit=limit, offset=previous)}",
                  csv_url=f"/taps.csv?{_query(f)}", xlsx_url=f"/taps.xlsx?{_query(f)}",
                  max_export=taps_browser.MAX_EXPORT, card_types=CARD_TYPES)


# ------------------------------------------------------------------------------------------------ export
def _card_type(value) -> str:
    try:
        t = CardType(int(value))
    except (TypeError, ValueError):
        return str(value)
    return f"{t.label_zh} {t.label}"


def _both(pair: tuple[str, str]) -> str:
    return f"{pair[0]} {pair[1]}"


def table(page: taps_browser.TapPage, tz: str) -> tuple[list[str], list[list], list]:
    """Header, rows and the totals row of an export: the page's columns, amounts as exact yuan Decimals."""
    header = [f"时间 Time ({tz})", "运营日 Service day", "类型 Kind", "去向 Outcome", "清分批次 Clearing run",
              "线路 Route", "车辆 Vehicle", "司机 Driver", "车载机 Validator", "序号 Sequence", "班次 Shift",
              "卡号 Card", "卡类 Card type", "金额（元） Amount (yuan)", "余额（元） Balance after (yuan)",
              f"接收时间 Received ({tz})", "上传延迟（分钟） Upload delay (minutes)", "原因 Reason"]
    rows = []
    for r in page.rows:
        run = "" if r["clearing_run_id"] is None else f"{r['clearing_run_id']} ({r['run_day']})"
        purchase = r["kind"] in ("purchase", taps_browser.TICKET)  # a ticket use: the revenue recognised on it
        rows.append([local_time(r["occurred_at"], tz, "%Y-%m-%d %H:%M:%S"), r["service_day"].isoformat(),
                     _both(KINDS.get(r["kind"], (r["kind"], r["kind"]))), _both(OUTCOMES[r["outcome"]]), run,
                     r["route"], r["vehicle"], r["driver"], r["device_id"],
                     None if r["device_seq"] == "" else int(r["device_seq"]), int(r["shift_no"]),
                     r["card_asn"] or (f"电子票 ticket {r['ticket_id']}" if r.get("ticket_id") else ""),
                     _card_type(r["card_type"]) if r["card_asn"] else "",
                     money.yuan_decimal(int(r["amount"])) if purchase else None,
                     money.yuan_decimal(int(r["balance_after"])) if r["kind"] == "purchase" else None,
                     local_time(r["received_at"], tz, "%Y-%m-%d %H:%M:%S"), r["upload_delay_min"],
                     " ".join(x for x in (_both(r["flag_label"]) if r.get("flag_label") else "", r["reason"]) if x)])
    totals = [f"合计 Total: {page.total} 条记录 records, {page.fares} 次乘车 fares", "", "", "", "", "", "", "", "",
              None, None, "", "", money.yuan_decimal(page.amount), None, "", None, ""]
    return header, rows, totals


def _safe(value):
    """Typed text that a spreadsheet would run as a formula gets a leading apostrophe (CSV injection)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _csv(header, rows, totals) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in [*rows, totals]:
        writer.writerow(["" if v is None else f"{v:.2f}" if isinstance(v, Decimal) else _safe(v) for v in row])
    return out.getvalue().encode(CSV_ENCODING)


def _xlsx(header, rows, totals, title: str) -> bytes:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    book = Workbook()
    sheet = book.active
    sheet.title = "taps"
    sheet.append(header)
    for row in [*rows, totals]:
        sheet.append([_safe(v) for v in row])
    bold = Font(bold=True)
    for cell in (*sheet[1], *sheet[sheet.max_row]):
        cell.font = bold
    for row in sheet.iter_rows(min_row=2, min_col=14, max_col=15):  # amount, balance: yuan
        for cell in row:
            cell.number_format = "#,##0.00"
    for column in sheet.iter_cols(min_row=1, max_row=1):
        sheet.column_dimensions[column[0].column_letter].width = max(10, min(36, len(str(column[0].value)) + 2))
    sheet.freeze_panes = "A2"
    book.properties.title = title
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def _export(conn, svc, who, fmt: str, **params) -> Response:
    f, _codes, _name, tz, cutoff = _context(conn, svc, who, **params)
    try:
        page = taps_browser.export(conn, f, tz=tz, cutoff_hour=cutoff)
    except ValueError as e:
        raise HTTPException(413, str(e)) from None
    header, rows, totals = table(page, tz)
    stem = f"taps-{f.operator}-{f.first_day}" + ("" if f.last_day == f.first_day else f"_{f.last_day}")
    if fmt == "csv":
        body, media = _csv(header, rows, totals), "text/csv; charset=utf-8"
    else:
        body = _xlsx(header, rows, totals, stem)
        media = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    return Response(body, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{stem}.{fmt}"', "X-Records": str(page.total)})


@router.get("/taps.csv")
def taps_csv(*, who: Who, conn: Conn, svc: Svc, operator: Field = "", first: Field = "", last: Field = "",
             route: Field = "", vehicle: Field = "", driver: Field = "", card: Field = "", kind: Field = "",
             outcome: Field = "", q: Field = "") -> Response:
    return _export(conn, svc, who, "csv", operator=operator, first=first, last=last, route=route, vehicle=vehicle,
                   driver=driver, card=card, kind=kind, outcome=outcome, q=q)


@router.get("/taps.xlsx")
def taps_xlsx(*, who: Who, conn: Conn, svc: Svc, operator: Field = "", first: Field = "", last: Field = "",
              route: Field = "", vehicle: Field = "", driver: Field = "", card: Field = "", kind: Field = "",
              outcome: Field = "", q: Field = "") -> Response:
    return _export(conn, svc, who, "xlsx", operator=operator, first=first, last=last, route=route, vehicle=vehicle,
                   driver=driver, card=card, kind=kind, outcome=outcome, q=q)

"""The clerk's report page: for a service day its settlement (PDF, CSV per table, XLSX), its shifts and vehicles
(PDF each), and the month's settlement (PDF, XLSX). The downloads behind the links are the API's
(backoffice.web.api.reports) under the login cookie; like them, they read stored runs and taps and never clear."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Connection

from backoffice import clearing_runs, taps_browser
from backoffice.web import reads
from backoffice.web.downloads import CSV_LABELS, day_csv_tables
from backoffice.web.api import reports
from backoffice.web.deps import Services, connection, services
from backoffice.web.auth import Principal, page_of
from backoffice.web.pages import render
from backoffice.web.api.types import ServiceDay
from clearing.service_day import day_bounds

router = APIRouter(include_in_schema=False)
Who = Annotated[Principal, Depends(page_of(*reports.OWNERS))]
Conn = Annotated[Connection, Depends(connection)]
Svc = Annotated[Services, Depends(services)]


def _operator(conn: Connection, who: Principal, operator: str | None) -> tuple[reports.OperatorDay, list[str]]:
    codes = [o["code"] for o in reads.registry_list(conn, kind="operators", operator=who.scope(None))]
    operator = operator or who.operator or (codes[0] if codes else None)
    if operator is None:
        raise HTTPException(404, "no operator is registered yet")
    return reports.operator_of(conn, who, operator), codes


@router.get("/reports")
def reports_page(*, request: Request, operator: str | None = None, day: ServiceDay | None = None,
                 month: Annotated[str, Query(pattern=r"^\d{4}-\d{2}$")] = "", who: Who, conn: Conn,
                 svc: Svc) -> HTMLResponse:
    op, codes = _operator(conn, who, operator)
    if day is None:  # the latest complete service day with data, else the last complete one
        yesterday = reads.current_service_day(svc.clock(), tz=op.tz, cutoff_hour=op.cutoff_hour) - timedelta(days=1)
        day = taps_browser.latest_day_with_data(conn, operator=op.code, tz=op.tz, cutoff_hour=op.cutoff_hour,
                                                now=day_bounds(yesterday, op.tz, op.cutoff_hour)[0]) or yesterday
    month = month or f"{day:%Y-%m}"
    index = reports.day_index(conn, op=op, day=day)
    run = clearing_runs.get_run(conn, index["run"]) if index["run"] is not None else None
    return render_page(request, who, op=op, codes=codes, day=day, month=month, index=index,
                       tables=day_csv_tables(run))


def render_page(request, who, **context) -> HTMLResponse:
    return render(request, "reports.html", who, tz=context["op"].tz, CSV_LABELS=CSV_LABELS, **context)


@router.get("/reports/day")
def day_file(*, operator: str | None = None, day: ServiceDay, who: Who, conn: Conn, svc: Svc,
             format: Literal["pdf", "csv", "xlsx"] = "pdf", table: Literal[reports.TABLES] = "route") -> Response:
    op, _ = _operator(conn, who, operator)
    return reports.day_settlement(conn, op=op, day=day, fmt=format, table=table, now=svc.clock()).response()


@router.get("/reports/month")
def month_file(*, operator: str | None = None, month: str, who: Who, conn: Conn, svc: Svc,
               format: Literal["pdf", "xlsx"] = "pdf") -> Response:
    op, _ = _operator(conn, who, operator)
    return reports.month_settlement(conn, op=op, month=month, fmt=format, now=svc.clock()).response()


@router.get("/reports/shift")
def shift_file(*, operator: str | None = None, day: ServiceDay, device_id: str, shift_no: int, who: Who, conn: Conn,
               svc: Svc) -> Response:
    op, _ = _operator(conn, who, operator)
    return reports.shift_pdf(conn, op=op, day=day, device_id=device_id, shift_no=shift_no,
                             now=svc.clock()).response()


@router.get("/reports/vehicle")
def vehicle_file(*, operator: str | None = None, day: ServiceDay, vehicle: str, who: Who, conn: Conn,
                 svc: Svc) -> Response:
    op, _ = _operator(conn, who, operator)
    return reports.vehicle_pdf(conn, op=op, day=day, vehicle=vehicle, now=svc.clock()).response()

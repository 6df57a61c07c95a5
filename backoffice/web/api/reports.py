"""Report downloads for a clerk's operator: the day's settlement (PDF, CSV, XLSX), the month's (PDF, XLSX), a
driver's shift report and a vehicle's day (PDF).

Reading never clears: the day's settlement comes from its stored clearing run (``settle(close_day=False)``; a day
with no run yet gets provisional figures, said so in the report and in the ``X-Clearing-Run`` header), the month's
from the stored runs of its days (``settle_month``; days not cleared are listed, not cleared). A shift report and a
vehicle's day are built here from the stored taps and the shift reconciliation items the day's clearing stored.
Reports are written into a private temporary folder and handed over; the nightly job keeps its own copies.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

import pandas as pd
from fastapi import APIRouter, Depends, HTTPException, Query, Response
from sqlalchemy import Connection, select

from backoffice import clearing_runs, registry
from backoffice.models import ReconItem, Tap
from backoffice.settle import settle, settle_month, stored_run_id
from backoffice.web import reads
from backoffice.web.deps import Services, connection, scoped, services
from backoffice.web.auth import Principal, owned_by
from backoffice.web.api.types import Code, OperatorCode, ServiceDay, SmallCount, Text
from clearing.reconcile import shift_totals
from clearing.runs import revenue_by
from clearing.service_day import day_bounds
from epurse.cardtypes import CardType
from reports.settlement_doc import ClearingRun
from reports.shift_slip import ShiftSlip, VehicleDay, write_shift_pdf, write_vehicle_day_pdf

router = APIRouter(tags=["reports"])
OWNERS = ("clerk",)
MEDIA = {"pdf": "application/pdf", "csv": "text/csv; charset=utf-8",
         "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}
# adjustments: late taps and reconciliation; fleet only when a vehicle is in a fleet (404 otherwise)
# e-tickets (issue 11): revenue the run recognised by route ... source, what it recognised for earlier days (only when
# it did), the day's sales by product and channel, the deferred balance; only when the operator sells tickets
TICKET_TABLES = ("tickets_by_route", "tickets_by_vehicle", "tickets_by_driver", "tickets_by_product",
                 "tickets_by_channel", "tickets_by_source", "tickets_late", "ticket_sales", "ticket_outstanding")
TABLES = ("route", "vehicle", "driver", "fleet", "card_type", "adjustments") + TICKET_TABLES
PURCHASE, SHIFT_OPEN, SHIFT_CLOSE = "purchase", "shift_open", "shift_close"
# reconciliation problems that make a shift out of balance; "not_closed" the slip shows on its own line
OUT_OF_BALANCE = ("records_missing", "no_sign_in", "out_of_balance", "shift_not_received")
CARD_TYPE_NAMES = {int(t): f"{t.label} {t.label_zh}" for t in CardType}  # reports get names, not the card app


@dataclass(frozen=True)
class Download:
    content: bytes
    filename: str
    media_type: str
    run: str  # the clearing run(s) it came from, or "provisional: <why>"

    def response(self) -> Response:
        return Response(self.content, media_type=self.media_type, headers={
            "Content-Disposition": f'attachment; filename="{self.filename}"',
            "X-Clearing-Run": self.run.encode("ascii", "replace").decode()})


@dataclass(frozen=True)
class OperatorDay:
    code: str
    name: str
    tz: str
    cutoff_hour: int


def operator_of(conn: Connection, who: Principal, operator: str) -> OperatorDay:
    scoped(who, operator)
    info = reads.operator_day(conn, operator=operator)
    if info is None:
        raise HTTPException(404, f"operator {operator!r} not found")
    return OperatorDay(operator, *info)


def _utc(value) -> datetime | None:
    return reads.utc(value)


def _run_of(conn: Connection, operator: str, day: date) -> clearing_runs.StoredRun | None:
    run_id = stored_run_id(conn, operator, day)
    return None if run_id is None else clearing_runs.get_run(conn, run_id)


# ------------------------------------------------------------------------------------------------ settlements
def day_settlement(conn: Connection, *, op: OperatorDay, day: date, fmt: str, table: str, now: datetime
                   ) -> Download:
    with tempfile.TemporaryDirectory(prefix="farebox-report-") as folder:
        result = settle(conn, operator=op.code, day=day, reports_dir=Path(folder), now=now, close_day=False)
        stem = f"settlement-{op.code}-{day.isoformat()}"
        csv_name = (f"{stem}-{table}.csv" if table == "adjustments" or table in TICKET_TABLES
                    else f"{stem}-by_{table}.csv")
        name = csv_name if fmt == "csv" else f"{stem}.{fmt}"
        path = Path(folder) / name
        if not path.exists():
            raise HTTPException(404, f"no {table} table in the settlement of {day}")
        run = f"run {result.run.id}" if result.run is not None else f"provisional: {result.provisional}"
        return Download(path.read_bytes(), name, MEDIA[fmt], run)


def month_settlement(conn: Connection, *, op: OperatorDay, month: str, fmt: str, now: datetime) -> Download:
    try:
        year, number = (int(x) for x in month.split("-"))
        date(year, number, 1)
    except ValueError:
        raise HTTPException(422, f"month {month!r} is not YYYY-MM") from None
    with tempfile.TemporaryDirectory(prefix="farebox-report-") as folder:
        result = settle_month(conn, operator=op.code, year=year, month=number, reports_dir=Path(folder), now=now)
        name = f"settlement-{op.code}-{year:04d}-{number:02d}.{fmt}"
        runs = ", ".join(str(r.id) for r in result.runs) or "none"
        missing = f"; {len(result.missing)} day(s) not cleared" if result.missing else ""
        return Download((Path(folder) / name).read_bytes(), name, MEDIA[fmt], f"runs {runs}{missing}")


# ------------------------------------------------------------------------------------------------ shifts, vehicles
_COLS = ("device_id", "device_seq", "kind", "occurred_at", "received_at", "route", "vehicle", "driver", "shift_no",
         "card_type", "amount")


def _records(conn: Connection, *where) -> list[dict]:
    rows = conn.execute(select(*[getattr(Tap, c) for c in _COLS]).where(*where)
                        .order_by(Tap.device_id, Tap.device_seq))
    return [{**r._mapping, "occurred_at": _utc(r.occurred_at), "received_at": _utc(r.received_at)} for r in rows]


def _shift_items(conn: Connection, operator: str, refs: list[str]) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    if refs:
        for r in conn.execute(select(ReconItem.ref, ReconItem.problem, ReconItem.ours, ReconItem.theirs).where(
                ReconItem.operator == operator, ReconItem.kind == "shift", ReconItem.ref.in_(refs))):
            out[r.ref].append(r)
    return out


def _balance(items: list, cleared: bool) -> bool | None:
    """Out of balance when reconciliation stored an item saying so; in balance when the day was cleared (its
    shifts were reconciled then) and none did; unknown before that."""
    if any(i.problem in OUT_OF_BALANCE for i in items):
        return True
    return False if cleared else None


def _run_header(run: clearing_runs.StoredRun | None) -> ClearingRun | None:
    return None if run is None else ClearingRun(str(run.id), run.created_at)


def shifts_of_day(conn: Connection, *, op: OperatorDay, day: date) -> list[dict]:
    """The shifts with a record in the service day: device, shift number, driver, vehicle, route, purchases and
    fen over the whole shift (also past the cut-off): shift reconciliation's own totals (``shift_totals``)."""
    totals = shift_totals(clearing_runs.load_shift_taps(conn, operator=op.code, day=day))
    out = []
    for t in totals.sort_values(["device_id", "shift_no"]).itertuples(index=False):
        device_id, shift_no = str(t.device_id), int(t.shift_no)
        recs = _records(conn, Tap.operator == op.code, Tap.device_id == device_id, Tap.shift_no == shift_no)
        first = next((r for r in recs if r["kind"] == SHIFT_OPEN), recs[0])
        out.append({"device_id": device_id, "shift_no": shift_no, "driver": first["driver"],
                    "vehicle": first["vehicle"], "route": first["route"], "taps": int(t.purchases),
                    "amount": int(t.amount)})
    return out


def vehicles_of_day(conn: Connection, *, op: OperatorDay, day: date) -> list[str]:
    start, end = day_bounds(day, op.tz, op.cutoff_hour)
    return sorted(conn.execute(select(Tap.vehicle).where(
        Tap.operator == op.code, Tap.kind == PURCHASE, Tap.occurred_at >= start, Tap.occurred_at < end)
        .distinct()).scalars())


def shift_slip(conn: Connection, *, op: OperatorDay, day: date, device_id: str, shift_no: int,
               now: datetime) -> ShiftSlip:
    start, end = day_bounds(day, op.tz, op.cutoff_hour)
    recs = _records(conn, Tap.operator == op.code, Tap.device_id == device_id, Tap.shift_no == shift_no)
    if shift_no <= 0 or not any(start <= r["occurred_at"] < end for r in recs):
        raise HTTPException(404, f"no shift {device_id}/{shift_no} in service day {day}")
    opened = next((r for r in recs if r["kind"] == SHIFT_OPEN), None)
    closed = next((r for r in reversed(recs) if r["kind"] == SHIFT_CLOSE), None)
    head = opened or recs[0]
    buys = pd.DataFrame({"kind": [r["kind"] for r in recs], "card_type": [int(r["card_type"]) for r in recs],
                         "amount": pd.Series([int(r["amount"]) for r in recs], dtype="int64")})
    frame = (revenue_by(buys, "card_type").rename(columns={"gross": "amount"})  # clearing's sums, by card type
             .astype({"card_type": "int64"}).sort_values("card_type").reset_index(drop=True))
    ref = f"{device_id}/{shift_no}"
    items = _shift_items(conn, op.code, [ref])[ref]
    declared = next((i.theirs for i in items if i.problem == "out_of_balance"), None)
    run = _run_of(conn, op.code, day)
    names = registry.names(conn, op.code, at=start)  # the names in force that day, not today's
    return ShiftSlip(
        operator_name=op.name, service_day=day, driver=head["driver"], vehicle=head["vehicle"], route=head["route"],
        device_id=device_id, shift_no=shift_no, signed_in=opened["occurred_at"] if opened else None,
        signed_out=closed["occurred_at"] if closed else None, by_card_type=frame,
        driver_name=names["driver"].get(head["driver"], ""), vehicle_name=names["vehicle"].get(head["vehicle"], ""),
        route_name=names["route"].get(head["route"], ""), declared_amount=declared,
        out_of_balance=_balance(items, run is not None), run=_run_header(run), generated_at=now, tz=op.tz,
        card_type_names=CARD_TYPE_NAMES)


def vehicle_day(conn: Connection, *, op: OperatorDay, day: date, vehicle: str, now: datetime) -> VehicleDay:
    """A vehicle's purchases of the service day, as the day's run counted them (the day's taps it claimed) when
    the day is cleared, so that the page agrees with the settlement's vehicle row."""
    start, end = day_bounds(day, op.tz, op.cutoff_hour)
    run = _run_of(conn, op.code, day)
    where = [Tap.operator == op.code, Tap.vehicle == vehicle, Tap.kind == PURCHASE, Tap.occurred_at >= start,
             Tap.occurred_at < end]
    if run is not None:
        where.append(clearing_runs.taken_by(conn, run.id))
    buys = _records(conn, *where)
    if not buys and reads.registry_item(conn, kind="vehicles", key=vehicle, operator=op.code) is None:
        raise HTTPException(404, f"vehicle {vehicle!r} not found")
    zone = ZoneInfo(op.tz)
    shifts: dict[tuple[str, int], dict] = {}
    hours = [0] * 24
    for r in buys:
        shifts.setdefault((r["device_id"], int(r["shift_no"])), {"driver": r["driver"], "route": r["route"]})
        hours[r["occurred_at"].astimezone(zone).hour] += 1
    # The money by shift and by route: clearing's sums (the run's), over the taps the run took.
    frame = pd.DataFrame({"kind": [r["kind"] for r in buys], "route": [r["route"] for r in buys],
                          "shift": [f"{r['device_id']}/{int(r['shift_no'])}" for r in buys],
                          "amount": pd.Series([int(r["amount"]) for r in buys], dtype="int64")})
    for row in revenue_by(frame, "shift").itertuples(index=False):
        device_id, _, shift_no = row.shift.rpartition("/")
        shifts[(device_id, int(shift_no))].update(taps=int(row.taps), amount=int(row.gross))
    routes = {row.route: (int(row.taps), int(row.gross)) for row in revenue_by(frame, "route").itertuples(index=False)}
    marks = {}
    for device_id, shift_no in shifts:
        if shift_no > 0:
            recs = _records(conn, Tap.operator == op.code, Tap.device_id == device_id, Tap.shift_no == shift_no,
                            Tap.kind.in_((SHIFT_OPEN, SHIFT_CLOSE)))
            marks[(device_id, shift_no)] = (
                next((r["occurred_at"] for r in recs if r["kind"] == SHIFT_OPEN), None),
                next((r["occurred_at"] for r in reversed(recs) if r["kind"] == SHIFT_CLOSE), None))
    items = _shift_items(conn, op.code, [f"{d}/{n}" for d, n in shifts])
    names = registry.names(conn, op.code, at=start)
    keys = sorted(shifts)
    frame = pd.DataFrame({
        "shift_no": pd.Series([n for _d, n in keys], dtype="int64"),
        "driver": [shifts[k]["driver"] for k in keys], "route": [shifts[k]["route"] for k in keys],
        "signed_in": pd.to_datetime([marks.get(k, (None, None))[0] for k in keys], utc=True),
        "signed_out": pd.to_datetime([marks.get(k, (None, None))[1] for k in keys], utc=True),
        "taps": pd.Series([shifts[k]["taps"] for k in keys], dtype="int64"),
        "amount": pd.Series([shifts[k]["amount"] for k in keys], dtype="int64"),
        "driver_name": [names["driver"].get(shifts[k]["driver"], "") for k in keys],
        "out_of_balance": [_balance(items[f"{d}/{n}"], run is not None) if n > 0 else None for d, n in keys]})
    by_route = pd.DataFrame({"route": sorted(routes),
                             "taps": pd.Series([routes[c][0] for c in sorted(routes)], dtype="int64"),
                             "amount": pd.Series([routes[c][1] for c in sorted(routes)], dtype="int64"),
                             "name": [names["route"].get(c, "") for c in sorted(routes)]})
    return VehicleDay(operator_name=op.name, service_day=day, vehicle=vehicle, shifts=frame, by_route=by_route,
                      taps_by_hour=pd.DataFrame({"hour": range(24), "taps": hours}, dtype="int64"),
                      vehicle_name=names["vehicle"].get(vehicle, ""), run=_run_header(run), generated_at=now,
                      tz=op.tz, cutoff_hour=op.cutoff_hour)


def shift_pdf(conn: Connection, *, op: OperatorDay, day: date, device_id: str, shift_no: int,
              now: datetime) -> Download:
    slip = shift_slip(conn, op=op, day=day, device_id=device_id, shift_no=shift_no, now=now)
    name = f"shift-{op.code}-{day.isoformat()}-{device_id}-{shift_no}.pdf"
    with tempfile.TemporaryDirectory(prefix="farebox-report-") as folder:
        path = write_shift_pdf(slip, Path(folder) / name)
        return Download(path.read_bytes(), name, MEDIA["pdf"], f"run {slip.run.id}" if slip.run else "provisional")


def vehicle_pdf(conn: Connection, *, op: OperatorDay, day: date, vehicle: str, now: datetime) -> Download:
    doc = vehicle_day(conn, op=op, day=day, vehicle=vehicle, now=now)
    name = f"vehicle-{op.code}-{day.isoformat()}-{vehicle}.pdf"
    with tempfile.TemporaryDirectory(prefix="farebox-report-") as folder:
        path = write_vehicle_day_pdf(doc, Path(folder) / name)
        return Download(path.read_bytes(), name, MEDIA["pdf"], f"run {doc.run.id}" if doc.run else "provisional")


def day_index(conn: Connection, *, op: OperatorDay, day: date) -> dict:
    run = _run_of(conn, op.code, day)
    return {"operator": op.code, "day": day, "run": None if run is None else run.id,
            "shifts": shifts_of_day(conn, op=op, day=day), "vehicles": vehicles_of_day(conn, op=op, day=day)}


# ------------------------------------------------------------------------------------------------ endpoints
Who = Annotated[Principal, Depends(owned_by(*OWNERS))]
Conn = Annotated[Connection, Depends(connection)]
Svc = Annotated[Services, Depends(services)]
_PDF = {200: {"content": {"application/pdf": {}}}}
_FILES = {200: {"content": {m.split(";")[0]: {} for m in MEDIA.values()}}}


@router.get("/operators/{operator}/reports/days/{day}")
def reports_of_day(*, operator: OperatorCode, day: ServiceDay, who: Who, conn: Conn) -> dict:
    """What can be downloaded for a service day: its clearing run (null: none yet), its shifts and vehicles."""
    return day_index(conn, op=operator_of(conn, who, operator), day=day)


@router.get("/operators/{operator}/reports/days/{day}/settlement", response_class=Response, responses=_FILES)
def day_settlement_file(*, operator: OperatorCode, day: ServiceDay, who: Who, conn: Conn, svc: Svc,
                        format: Annotated[Literal["pdf", "csv", "xlsx"], Query()] = "pdf",
                        table: Annotated[Literal[TABLES], Query(description="CSV only: which table")] = "route",
                        ) -> Response:
    """The day's settlement from its stored clearing run (provisional figures, said so, when it has none): PDF,
    one table as CSV (UTF-8 with BOM), or every table in one XLSX. Never clears the day."""
    op = operator_of(conn, who, operator)
    return day_settlement(conn, op=op, day=day, fmt=format, table=table, now=svc.clock()).response()


@router.get("/operators/{operator}/reports/months/{month}/settlement", response_class=Response, responses=_FILES)
def month_settlement_file(*, operator: OperatorCode, month: Text(7), who: Who, conn: Conn, svc: Svc,
                          format: Annotated[Literal["pdf", "xlsx"], Query()] = "pdf") -> Response:
    """The month (``YYYY-MM``) from the stored runs of its days; days not cleared are named in the report."""
    op = operator_of(conn, who, operator)
    return month_settlement(conn, op=op, month=month, fmt=format, now=svc.clock()).response()


@router.get("/operators/{operator}/reports/days/{day}/shifts/{device_id}/{shift_no}", response_class=Response,
            responses=_PDF)
def shift_report(*, operator: OperatorCode, day: ServiceDay, device_id: Code, shift_no: SmallCount, who: Who, conn: Conn,
                 svc: Svc) -> Response:
    """A driver's shift report (PDF): taps by card type, sign-in / sign-out, the reconciliation's verdict."""
    op = operator_of(conn, who, operator)
    return shift_pdf(conn, op=op, day=day, device_id=device_id, shift_no=shift_no, now=svc.clock()).response()


@router.get("/operators/{operator}/reports/days/{day}/vehicles/{vehicle}", response_class=Response,
            responses=_PDF)
def vehicle_report(*, operator: OperatorCode, day: ServiceDay, vehicle: Code, who: Who, conn: Conn, svc: Svc) -> Response:
    """A vehicle's day (PDF): its shifts, routes and taps by hour."""
    op = operator_of(conn, who, operator)
    return vehicle_pdf(conn, op=op, day=day, vehicle=vehicle, now=svc.clock()).response()


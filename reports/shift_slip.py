"""Two A4 pages a clerk prints at the depot: a driver's shift report and a vehicle's day.

The shift report: who drove which vehicle on which route, signed in and out when (operator's local time), the
shift's taps by card type with a bold total, the validator's own totals beside what the back office received, and
an out-of-balance flag that cannot be missed; signature lines for the driver and the clerk at the foot.

The vehicle's day: the day's figures, taps by hour as a chart, its shifts (driver, route, times, taps, amount,
balance) and its routes, each table with a bold total.

Inputs are plain data and pandas frames handed in (clearing's results); money in integer fen, times aware (UTC).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
from reportlab.lib import colors
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

from clearing.service_day import DEFAULT_CUTOFF_HOUR, DEFAULT_TZ
from reports import charts
from reports.pdf import (
    FRAME_WIDTH,
    LATIN_BOLD,
    Column,
    PageHeader,
    check_aware,
    count,
    data_table,
    key_text,
    markup,
    run_line,
    styles,
    write_pdf,
    yuan,
)
from reports.settlement_doc import ClearingRun

SHIFT_TITLE = "Driver's shift report"
VEHICLE_TITLE = "Vehicle's day"


def card_type_label(card_type: int, names: Mapping[int, str]) -> str:
    """The caller's name for a card type (the back office passes epurse's labels), else "card type N": reports
    know the tables handed to them, not the card application."""
    return names.get(int(card_type)) or f"card type {int(card_type)}"


def _local(moment: datetime | None, tz: str) -> str:
    if moment is None or pd.isna(moment):
        return "-"
    return pd.Timestamp(moment).tz_convert(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")


def _clock(moment, tz: str, day: date) -> str:
    """ "HH:MM" on the local clock; "+1d" after it when past midnight, still in the same service day."""
    if moment is None or pd.isna(moment):
        return "-"
    local = pd.Timestamp(moment).tz_convert(ZoneInfo(tz))
    extra = (local.date() - day).days
    return local.strftime("%H:%M") + (f" +{extra}d" if extra > 0 else "")


def _named(code, name) -> str:
    code = key_text(code)
    return f"{code} {name}" if name else code


def _facts(rows: list[tuple[str, str]], st) -> Table:
    """Label / value pairs in two columns of two, as on a paper form."""
    cells = [[Paragraph(f"<b>{label}</b>", st["body"]), Paragraph(markup(value), st["body"])] for label, value in rows]
    if len(cells) % 2:
        cells.append(["", ""])
    half = len(cells) // 2
    grid = [a + b for a, b in zip(cells[:half], cells[half:])]
    t = Table(grid, colWidths=[28 * mm, FRAME_WIDTH / 2 - 28 * mm] * 2)
    t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0),
                           ("BOTTOMPADDING", (0, 0), (-1, -1), 2), ("TOPPADDING", (0, 0), (-1, -1), 0)]))
    return t


def _flag(text: str, bad: bool, st) -> Table:
    """A boxed line: red for out of balance, green for in balance."""
    colour = colors.HexColor("#b00020") if bad else colors.HexColor("#1b6e20")
    t = Table([[Paragraph(markup(text), st["bold"])]], colWidths=[FRAME_WIDTH])
    t.setStyle(TableStyle([("BOX", (0, 0), (-1, -1), 1.2, colour), ("TEXTCOLOR", (0, 0), (-1, -1), colour),
                           ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fdecea" if bad else "#e8f5e9")),
                           ("TOPPADDING", (0, 0), (-1, -1), 5), ("BOTTOMPADDING", (0, 0), (-1, -1), 5)]))
    return t


def _signatures(st) -> Table:
    t = Table([["Driver's signature", "", "Clerk's signature", ""]],
              colWidths=[32 * mm, FRAME_WIDTH / 2 - 32 * mm] * 2, rowHeights=[14 * mm])
    t.setStyle(TableStyle([("FONTNAME", (0, 0), (-1, -1), LATIN_BOLD), ("FONTSIZE", (0, 0), (-1, -1), 9),
                           ("VALIGN", (0, 0), (-1, -1), "BOTTOM"),
                           ("LINEBELOW", (1, 0), (1, 0), 0.6, colors.black),
                           ("LINEBELOW", (3, 0), (3, 0), 0.6, colors.black)]))
    return t


def _money_frame(frame: pd.DataFrame, what: str, *cols: str) -> None:
    for c in cols:
        if c not in frame.columns:
            raise ValueError(f"{what} needs a {c!r} column; got {list(frame.columns)}")
        if len(frame) and not pd.api.types.is_integer_dtype(frame[c]):
            raise TypeError(f"{what}: column {c!r} must be integers (fen / taps), got dtype {frame[c].dtype}")


@dataclass(frozen=True)
class ShiftSlip:
    """One driver's shift as clearing saw it."""

    operator_name: str
    service_day: date
    driver: str
    vehicle: str
    route: str
    device_id: str
    shift_no: int
    signed_in: datetime | None
    signed_out: datetime | None  # None: the shift was never closed (shown as such)
    by_card_type: pd.DataFrame  # card_type, taps, amount (fen): the purchases received
    driver_name: str = ""
    vehicle_name: str = ""
    route_name: str = ""
    declared_taps: int | None = None  # the validator's own shift totals, when it reported them
    declared_amount: int | None = None
    out_of_balance: bool | None = None  # clearing's flag; None: worked out here from the declared totals if given
    run: ClearingRun | None = None
    generated_at: datetime | None = None
    tz: str = DEFAULT_TZ
    card_type_names: Mapping[int, str] = field(default_factory=dict)  # e.g. {1: "adult card 普通卡"}


def write_shift_pdf(slip: ShiftSlip, path: str | Path) -> Path:
    """The driver's shift report as one A4 page (more only for a very odd shift), written atomically."""
    for name in ("signed_in", "signed_out", "generated_at"):
        check_aware(name, getattr(slip, name))
    frame = slip.by_card_type
    _money_frame(frame, "by_card_type", "card_type", "taps", "amount")
    st = styles()
    taps, amount = int(frame["taps"].sum()), int(frame["amount"].sum())
    closed = slip.signed_out is not None
    duration = "-"
    if slip.signed_in is not None and closed:
        minutes = int((slip.signed_out - slip.signed_in).total_seconds()) // 60
        duration = f"{minutes // 60} h {minutes % 60:02d} min"
    story: list = [
        Paragraph(markup(f"{SHIFT_TITLE} — {_named(slip.driver, slip.driver_name)}"), st["title"]),
        _facts([
            ("Driver", _named(slip.driver, slip.driver_name)),
            ("Vehicle", _named(slip.vehicle, slip.vehicle_name)),
            ("Route", _named(slip.route, slip.route_name)),
            ("Validator", f"{slip.device_id}, shift no. {slip.shift_no}"),
            ("Signed in", _local(slip.signed_in, slip.tz)),
            ("Signed out", _local(slip.signed_out, slip.tz) if closed else "not signed out"),
            ("Duration", duration),
            ("Times in", slip.tz),
        ], st),
        Spacer(1, 5 * mm),
        Paragraph("Taps by card type", st["heading"]),
    ]
    names = {int(k): v for k, v in slip.card_type_names.items()}
    rows = [[card_type_label(ct, names), count(n), yuan(a)]
            for ct, n, a in zip(frame["card_type"].tolist(), frame["taps"].tolist(), frame["amount"].tolist())]
    story.append(data_table([Column("Card type", FRAME_WIDTH - 70 * mm), Column("Taps", 30 * mm, numeric=True),
                             Column("Amount (yuan)", 40 * mm, numeric=True)],
                            rows, ["Total", count(taps), yuan(amount)], size=10))
    story.append(Spacer(1, 6 * mm))
    flag = slip.out_of_balance
    if slip.declared_taps is not None or slip.declared_amount is not None:
        d_taps = slip.declared_taps if slip.declared_taps is not None else taps
        d_amount = slip.declared_amount if slip.declared_amount is not None else amount
        story.append(Paragraph(
            f"The validator reported {count(d_taps)} taps, {yuan(d_amount)} yuan; the back office received "
            f"{count(taps)} taps, {yuan(amount)} yuan (difference {count(taps - d_taps)} taps, "
            f"{yuan(amount - d_amount)} yuan).", st["body"]))
        story.append(Spacer(1, 3 * mm))
        if flag is None:
            flag = (d_taps, d_amount) != (taps, amount)
    if flag is not None:
        story.append(_flag("OUT OF BALANCE: the validator's totals and the taps received differ; "
                           "check the validator's backlog before paying out." if flag else
                           "In balance: the validator's totals equal the taps received.", flag, st))
    if not closed:
        story += [Spacer(1, 3 * mm), _flag("Shift not signed out: taps may still arrive.", True, st)]
    story += [Spacer(1, 18 * mm), _signatures(st)]
    header = PageHeader(operator_name=slip.operator_name, title=SHIFT_TITLE,
                        period=f"service day {slip.service_day.isoformat()}",
                        run_line=run_line(slip.run.id if slip.run else None,
                                          slip.run.at if slip.run else slip.generated_at),
                        footer=f"farebox — shift {slip.device_id}/{slip.shift_no}, driver {slip.driver}")
    return write_pdf(path, story, header, title=f"Shift {slip.device_id}/{slip.shift_no} {slip.driver}")


@dataclass(frozen=True)
class VehicleDay:
    """One vehicle's service day."""

    operator_name: str
    service_day: date
    vehicle: str
    shifts: pd.DataFrame  # shift_no, driver, route, signed_in, signed_out (aware or NaT), taps, amount
    #                       [, driver_name, out_of_balance]
    by_route: pd.DataFrame  # route, taps, amount [, name]
    taps_by_hour: pd.DataFrame | None = None  # hour (local 0-23), taps
    vehicle_name: str = ""
    run: ClearingRun | None = None
    generated_at: datetime | None = None
    tz: str = DEFAULT_TZ
    cutoff_hour: int = DEFAULT_CUTOFF_HOUR
    route_names: Mapping[str, str] = field(default_factory=dict)
    driver_names: Mapping[str, str] = field(default_factory=dict)


def write_vehicle_day_pdf(day: VehicleDay, path: str | Path) -> Path:
    check_aware("generated_at", day.generated_at)
    _money_frame(day.shifts, "shifts", "taps", "amount")
    _money_frame(day.by_route, "by_route", "taps", "amount")
    st = styles()
    shifts = day.shifts.sort_values(["signed_in", "shift_no"], na_position="last") if len(day.shifts) else day.shifts
    taps, amount = int(day.by_route["taps"].sum()), int(day.by_route["amount"].sum())
    title = _named(day.vehicle, day.vehicle_name)
    story: list = [
        Paragraph(markup(f"{VEHICLE_TITLE} — {title} — service day {day.service_day.isoformat()}"), st["title"]),
        Paragraph(markup(f"{count(taps)} taps, {yuan(amount)} yuan on {len(day.by_route)} route(s) in "
                         f"{len(shifts)} shift(s). Times in {day.tz}."), st["body"]),
    ]
    if (int(shifts["taps"].sum()), int(shifts["amount"].sum())) != (taps, amount):
        story.append(Paragraph("WARNING: the shifts and the routes do not add up to the same figures.", st["bold"]))
    if "out_of_balance" in shifts.columns and shifts["out_of_balance"].fillna(False).astype(bool).any():
        n = int(shifts["out_of_balance"].fillna(False).astype(bool).sum())
        story += [Spacer(1, 2 * mm), _flag(f"OUT OF BALANCE: {n} shift(s) of this vehicle, marked below.", True, st)]
    if day.taps_by_hour is not None and int(day.taps_by_hour["taps"].sum()) > 0:
        by_hour = dict.fromkeys(range(24), 0)
        for h, n in zip(day.taps_by_hour["hour"].tolist(), day.taps_by_hour["taps"].tolist()):
            by_hour[int(h)] += int(n)
        order = [(day.cutoff_hour + i) % 24 for i in range(24)]
        story += [Spacer(1, 4 * mm),
                  charts.columns([f"{h:02d}" for h in order], [by_hour[h] for h in order], title="Taps by hour",
                                 axis_title=f"hour of the day ({day.tz})")]
    rows = []
    has_flag = "out_of_balance" in shifts.columns
    for r in shifts.to_dict("records"):
        driver_name = r.get("driver_name") or day.driver_names.get(r["driver"], "")
        flag = r.get("out_of_balance") if has_flag else None
        rows.append([str(r["shift_no"]), _named(r["driver"], driver_name), key_text(r["route"]),
                     _clock(r["signed_in"], day.tz, day.service_day), _clock(r["signed_out"], day.tz, day.service_day),
                     count(r["taps"]), yuan(r["amount"]),
                     "-" if flag is None or pd.isna(flag) else "OUT" if flag else "ok"])
    story += [Spacer(1, 3 * mm), Paragraph("Shifts", st["heading"]), data_table(
        [Column("Shift", 14 * mm), Column("Driver", FRAME_WIDTH - 130 * mm), Column("Route", 22 * mm),
         Column("Signed in", 18 * mm), Column("Signed out", 20 * mm), Column("Taps", 16 * mm, numeric=True),
         Column("Amount (yuan)", 26 * mm, numeric=True), Column("Balance", 14 * mm)],
        rows, ["Total", "", "", "", "", count(int(shifts["taps"].sum())), yuan(int(shifts["amount"].sum())), ""],
        size=9)]
    route_rows = []
    for code, n, a, name in zip(day.by_route["route"].tolist(), day.by_route["taps"].tolist(),
                                day.by_route["amount"].tolist(),
                                day.by_route["name"].tolist() if "name" in day.by_route.columns
                                else [day.route_names.get(c, "") for c in day.by_route["route"].tolist()]):
        route_rows.append([key_text(code), name or "", count(n), yuan(a)])
    story += [Spacer(1, 3 * mm), Paragraph("Routes", st["heading"]), data_table(
        [Column("Route", 26 * mm), Column("Name", FRAME_WIDTH - 92 * mm), Column("Taps", 30 * mm, numeric=True),
         Column("Amount (yuan)", 36 * mm, numeric=True)],
        route_rows, ["Total", "", count(taps), yuan(amount)], size=9)]
    story += [Spacer(1, 14 * mm), _signatures(st)]
    header = PageHeader(operator_name=day.operator_name, title=VEHICLE_TITLE,
                        period=f"service day {day.service_day.isoformat()}",
                        run_line=run_line(day.run.id if day.run else None,
                                          day.run.at if day.run else day.generated_at),
                        footer=f"farebox — vehicle {day.vehicle}, service day {day.service_day.isoformat()}")
    return write_pdf(path, story, header, title=f"Vehicle {day.vehicle} {day.service_day.isoformat()}")

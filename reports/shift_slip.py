"""Two A4 pages a clerk prints at the depot: a driver's shift report and a vehicle's day.

The shift report: who drove which vehicle on which route, signed in and out when, the shift's taps by card type
with a bold total, the validator's own totals beside what the back office received, and an out-of-balance flag
that cannot be missed; signature lines for the driver and the clerk, each with a date, at the foot.

The vehicle's day: the day's figures, taps by hour as a chart, its shifts (driver, route, times, taps, amount,
balance) and its routes, each table with a bold total; the same signature lines.

Like the settlement report (``reports.settlement_doc``, whose headings, tables, chart and signature lines these
reuse), they are paper a person signs: headings in Chinese with English beside them, money in yuan, every time on
the operator's clock (``tz``) with the zone named. Inputs are plain data and pandas frames handed in (clearing's
results); money in integer fen, times aware (UTC).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
from reportlab.lib import colors
from reportlab.lib.units import mm
from reportlab.platypus import KeepTogether, Paragraph, Spacer, Table, TableStyle

from clearing.service_day import DEFAULT_CUTOFF_HOUR, DEFAULT_TZ, local_time
from reports.pdf import (
    FRAME_WIDTH,
    Column,
    PageHeader,
    check_aware,
    count,
    data_table,
    key_text,
    markup,
    run_line,
    signature_lines,
    styles,
    when_text,
    write_pdf,
    yuan,
)
from reports.settlement_doc import (
    HEADINGS,
    SECTION_HEADINGS,
    TAPS_HEADING,
    TOTAL,
    ClearingRun,
    breakdown_table,
    hour_chart,
)

SHIFT_TITLE = "司机班次报表 Driver's shift report"
VEHICLE_TITLE = "车辆日报 Vehicle's day"
SIGNATURE_ROLES = ("司机 Driver", "结算员 Clerk")
SHIFTS_HEADING = "班次 Shifts"


def _period(day: date) -> str:
    return f"运营日 service day {day.isoformat()}"


def _at(moment) -> datetime | None:
    """An aware moment, or None for a missing one (None, NaT)."""
    if moment is None or pd.isna(moment):
        return None
    return pd.Timestamp(moment).to_pydatetime()


def _local(moment, tz: str) -> str:
    """ "2024-05-02 07:31" on the operator's clock (the page names the zone once)."""
    return local_time(_at(moment), tz)


def _clock(moment, tz: str, day: date) -> str:
    """ "HH:MM" on the local clock; "+1d" after it when past midnight, still in the same service day."""
    at = _at(moment)
    if at is None:
        return "-"
    extra = (date.fromisoformat(local_time(at, tz, "%Y-%m-%d")) - day).days
    return local_time(at, tz, "%H:%M") + (f" +{extra}d" if extra > 0 else "")


def _named(code, name) -> str:
    code = key_text(code)
    return f"{code} {name}" if name else code


def _facts(rows: list[tuple[str, str]], st) -> Table:
    """Label / value pairs in two columns of two, as on a paper form."""
    cells = [[Paragraph(f"<b>{markup(label)}</b>", st["body"]), Paragraph(markup(value), st["body"])]
             for label, value in rows]
    if len(cells) % 2:
        cells.append(["", ""])
    half = len(cells) // 2
    grid = [a + b for a, b in zip(cells[:half], cells[half:])]
    t = Table(grid, colWidths=[30 * mm, FRAME_WIDTH / 2 - 30 * mm] * 2)
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


def _signatures(st) -> list:
    """The foot of the paper, as on the settlement report: who signs, a line to sign on and a date."""
    return [KeepTogether([Paragraph(markup("签字 Signatures"), st["heading"]), signature_lines(SIGNATURE_ROLES)])]


def _header(operator_name: str, title: str, day: date, run: ClearingRun | None, generated_at: datetime | None,
            tz: str, footer: str) -> PageHeader:
    return PageHeader(operator_name=operator_name, title=title, period=_period(day),
                      run_line=run_line(run.id if run else None, run.at if run else generated_at, tz),
                      footer=footer)


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
    driver = _named(slip.driver, slip.driver_name)
    story: list = [
        Paragraph(markup(f"{SHIFT_TITLE} — {driver}"), st["title"]),
        Paragraph(f"<b>{markup(_period(slip.service_day))}</b>", st["subtitle"]),
        _facts([
            ("司机 Driver", driver),
            ("车辆 Vehicle", _named(slip.vehicle, slip.vehicle_name)),
            ("线路 Route", _named(slip.route, slip.route_name)),
            ("验票机 Validator", f"{slip.device_id}, 班次 shift no. {slip.shift_no}"),
            ("签到 Signed in", _local(slip.signed_in, slip.tz)),
            ("签退 Signed out", _local(slip.signed_out, slip.tz) if closed else "未签退 not signed out"),
            ("时长 Duration", duration),
            ("时区 Time zone", slip.tz),  # of every time on the page
        ], st),
        Spacer(1, 5 * mm),
        Paragraph(markup(SECTION_HEADINGS["card_type"]), st["heading"]),
        # The settlement report's card-type table: names, not codes; taps and amount in yuan; a bold total.
        breakdown_table(frame, "card_type", slip.card_type_names),
        Spacer(1, 6 * mm),
    ]
    flag = slip.out_of_balance
    if slip.declared_taps is not None or slip.declared_amount is not None:
        d_taps = slip.declared_taps if slip.declared_taps is not None else taps
        d_amount = slip.declared_amount if slip.declared_amount is not None else amount
        story.append(Paragraph(
            f"<b>{markup('核对 Check:')}</b> "
            f"the validator reported {count(d_taps)} taps, {yuan(d_amount)} yuan; the back office received "
            f"{count(taps)} taps, {yuan(amount)} yuan (difference {count(taps - d_taps)} taps, "
            f"{yuan(amount - d_amount)} yuan).", st["body"]))
        story.append(Spacer(1, 3 * mm))
        if flag is None:
            flag = (d_taps, d_amount) != (taps, amount)
    if flag is not None:
        story.append(_flag("不平衡 OUT OF BALANCE: the validator's totals and the taps received differ; "
                           "check the validator's backlog before paying out." if flag else
                           "平衡 In balance: the validator's totals equal the taps received.", flag, st))
    if not closed:
        story += [Spacer(1, 3 * mm), _flag("未签退 Shift not signed out: taps may still arrive.", True, st)]
    story += [Spacer(1, 8 * mm), *_signatures(st)]
    header = _header(slip.operator_name, SHIFT_TITLE, slip.service_day, slip.run, slip.generated_at, slip.tz,
                     f"farebox — shift {slip.device_id}/{slip.shift_no}, driver {slip.driver}")
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
        Paragraph(markup(f"{VEHICLE_TITLE} — {title}"), st["title"]),
        Paragraph(f"<b>{markup(_period(day.service_day))}</b>", st["subtitle"]),
        Paragraph(f"<b>{markup('合计 Total:')}</b> {count(taps)} taps, {yuan(amount)} yuan on "
                  f"{len(day.by_route)} route(s) in {len(shifts)} shift(s).", st["body"]),
        Paragraph(f"<b>{markup('时间 Times:')}</b> {markup(day.tz)}, the operator's clock; \"+1d\" marks a time "
                  f"past midnight, still in the service day (it starts at {day.cutoff_hour:02d}:00). "
                  f"<b>{markup('生成时间 Generated:')}</b> {markup(when_text(day.generated_at or datetime.now(UTC), day.tz))}.", st["body"]),
    ]
    if (int(shifts["taps"].sum()), int(shifts["amount"].sum())) != (taps, amount):
        story.append(Paragraph(markup("警告 WARNING: the shifts and the routes do not add up to the same figures."),
                               st["bold"]))
    if "out_of_balance" in shifts.columns and shifts["out_of_balance"].fillna(False).astype(bool).any():
        n = int(shifts["out_of_balance"].fillna(False).astype(bool).sum())
        story += [Spacer(1, 2 * mm),
                  _flag(f"不平衡 OUT OF BALANCE: {n} shift(s) of this vehicle, marked below.", True, st)]
    chart = hour_chart(day.taps_by_hour, day.tz, day.cutoff_hour)
    if chart is not None:
        story += [Spacer(1, 4 * mm), chart]
    rows = []
    has_flag = "out_of_balance" in shifts.columns
    for r in shifts.to_dict("records"):
        driver_name = r.get("driver_name") or day.driver_names.get(r["driver"], "")
        flag = r.get("out_of_balance") if has_flag else None
        rows.append([str(r["shift_no"]), _named(r["driver"], driver_name), key_text(r["route"]),
                     _clock(r["signed_in"], day.tz, day.service_day), _clock(r["signed_out"], day.tz, day.service_day),
                     count(r["taps"]), yuan(r["amount"]),
                     "-" if flag is None or pd.isna(flag) else "OUT" if flag else "ok"])
    story += [Spacer(1, 3 * mm), Paragraph(markup(SHIFTS_HEADING), st["heading"]), data_table(
        [Column("班次\nShift", 14 * mm), Column("司机\nDriver", FRAME_WIDTH - 134 * mm),
         Column("线路\nRoute", 22 * mm), Column("签到\nSigned in", 18 * mm), Column("签退\nSigned out", 20 * mm),
         Column(TAPS_HEADING.replace(" ", "\n"), 16 * mm, numeric=True),
         Column(HEADINGS["amount"], 26 * mm, numeric=True), Column("平衡\nBalance", 18 * mm)],
        rows, [TOTAL, "", "", "", "", count(int(shifts["taps"].sum())), yuan(int(shifts["amount"].sum())), ""],
        size=9)]
    by_route = day.by_route
    if "name" not in by_route.columns:
        by_route = by_route.assign(name=[day.route_names.get(c, "") for c in by_route["route"].tolist()])
    story += [Spacer(1, 3 * mm), Paragraph(markup(SECTION_HEADINGS["route"]), st["heading"]),
              breakdown_table(by_route, "route", None)]
    story += [Spacer(1, 8 * mm), *_signatures(st)]
    header = _header(day.operator_name, VEHICLE_TITLE, day.service_day, day.run, day.generated_at, day.tz,
                     f"farebox — vehicle {day.vehicle}, service day {day.service_day.isoformat()}")
    return write_pdf(path, story, header, title=f"Vehicle {day.vehicle} {day.service_day.isoformat()}")

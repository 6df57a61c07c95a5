"""The settlement report's content, shared by the daily and the monthly PDF: what goes in (``SettlementTables``,
pandas frames handed in by clearing) and the story built from it (summary, charts, one table per breakdown).

A breakdown frame has its key column (``route``, ``vehicle``, ``driver``, ``fleet``, ``day``), ``taps``, and its
money in integer fen: either ``gross`` with, where clearing gives them, ``commission`` (the card issuer's) and
``net`` (the operator's), or a single ``amount`` (shown as "Amount"). An optional ``name`` column, or a mapping in
``names``, gives the names people know the codes by. Rows are shown in the order given.

``adjustments`` (optional) are what the clearing run(s) carry for earlier days besides the period's own taps:
one row per carried item, with ``kind`` ("late taps": purchases of an earlier service day that arrived after
that day's run, one row per (``for_day``, route), ``key`` = the route code; "reconciliation": a clerk's
adjustment on a reconciliation item, ``key`` = the item id), ``for_day`` (the service day it belongs to),
``taps``, ``gross``, ``commission`` and ``net`` in fen, and optionally ``name`` (what the key is; late taps
default to the route's name in ``names``). Given, the report adds a table "Adjustments for earlier days" and a
"Payable" line near the top: the period's net + the adjustments' net = the net payable to the operator, and
the same for gross and commission. Given but empty, the report says in one line that there are none (the run
was checked, not forgotten). ``None`` (provisional figures, no stored run) says nothing about them.


What a manager signs besides the breakdowns, each optional: ``by_card_type`` (card_type as an integer, taps,
optionally ``free``: the taps that paid nothing, such as free elderly rides, and the money columns), named by
``names["card_type"]``; ``commission_bp``, the card issuer's rate(s) the figures were cleared at, stated under the
title; ``previous``, a ``Comparison`` with the period before (printed beside the period, with the change and the
change in percent); ``tz``, the operator's zone, in which every time is printed, named; ``days_not_cleared`` for a
period (the status line then says how many of its days are cleared and which are not); ``provisional``, why the
figures are provisional. Headings carry Chinese with English beside them; signature lines close the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal

import pandas as pd
from reportlab.lib.units import mm
from reportlab.platypus import CondPageBreak, KeepTogether, Paragraph, Spacer

from reports import charts
from reports.pdf import (
    FRAME_WIDTH,
    Column,
    PageHeader,
    count,
    data_table,
    key_text,
    markup,
    run_line,
    signature_lines,
    styles,
    when_text,
    yuan,
)

MONEY_COLUMNS = ("gross", "commission", "net")
# The PDF is the paper a manager signs: its headings carry Chinese with English beside them (the pages show one
# language; the paper keeps both). Money headings take three lines: three money columns side by side leave no
# room for "Issuer commission (yuan)" on one.
HEADINGS = {"gross": "总收入(元)\nGross\n(yuan)", "commission": "发卡方佣金(元)\nIssuer commission\n(yuan)",
            "net": "运营方净收入(元)\nNet to operator\n(yuan)", "amount": "金额(元)\nAmount (yuan)"}
KEY_HEADINGS = {"route": "线路 Route", "vehicle": "车辆 Vehicle", "driver": "司机 Driver", "fleet": "车队 Fleet",
                "day": "运营日 Day", "card_type": "卡类 Card type"}
SECTION_HEADINGS = {"day": "按日 By day", "fleet": "按车队 By fleet", "route": "按线路 By route",
                    "vehicle": "按车辆 By vehicle", "driver": "按司机 By driver",
                    "card_type": "按卡类 By card type (优惠 concessions)"}
NAME_HEADING = "名称 Name"
TAPS_HEADING = "笔数 Taps"
FREE_HEADING = "免费 Free\nrides"
TOTAL = "合计 Total"
ADJUSTMENT_COLUMNS = ("kind", "for_day", "key", "taps", *MONEY_COLUMNS)
LATE = "late taps"
RECONCILIATION = "reconciliation"
ADJUSTMENT_KINDS = (LATE, RECONCILIATION)
ADJUSTMENTS_HEADING = "以前运营日调整 Adjustments for earlier days"
SIGNATURE_ROLES = ("制表 Prepared by", "审核 Checked by", "批准 Approved by")
TOP_ROUTES = 20  # bars in the revenue chart; more would not read at a glance, the table below has them all


@dataclass(frozen=True)
class ClearingRun:
    """The clearing run the figures came from, as the clearing engineer stores it."""

    id: str
    at: datetime  # when it ran (aware)


@dataclass(frozen=True)
class Comparison:
    """The figures of the period before (the previous service day, or the previous month), to print beside the
    period's own. ``totals`` has ``taps`` and the money columns in fen; None when that period has no cleared
    figures (the report says so rather than comparing with nothing)."""

    label: tuple[str, str]  # ("前一日", "previous day")
    first_day: date
    last_day: date
    totals: Mapping[str, int] | None


@dataclass(frozen=True)
class SettlementTables:
    operator: str  # the operator's code
    operator_name: str
    first_day: date  # service days covered, inclusive
    last_day: date
    by_route: pd.DataFrame
    by_vehicle: pd.DataFrame
    by_driver: pd.DataFrame
    by_fleet: pd.DataFrame | None = None  # None (or only the "not in a fleet" key ""): no fleet table
    by_day: pd.DataFrame | None = None  # for a month: one row per service day
    taps_by_hour: pd.DataFrame | None = None  # columns hour (local, 0-23) and taps
    run: ClearingRun | None = None
    generated_at: datetime | None = None  # default: now
    names: Mapping[str, Mapping] = field(default_factory=dict)  # "route" -> {code: name}, ..., "card_type" -> {1: ..}
    adjustments: pd.DataFrame | None = None  # carried for earlier days (see the module doc); None: not known
    # card_type (int), taps, optionally free (taps that paid 0), and the money columns; None: not shown
    by_card_type: pd.DataFrame | None = None
    commission_bp: tuple[int, ...] = ()  # the card issuer's rate(s) in force over the period; (): none set
    previous: Comparison | None = None  # the period before, to compare with
    tz: str | None = None  # the operator's zone: times printed in it, named; None: UTC
    days_not_cleared: tuple[date, ...] | None = None  # a period's days with no clearing run; None: not known
    provisional: str = ""  # why the figures are provisional ("" when they come from clearing runs)
    tickets: object | None = None  # reports.tickets.TicketTables: the e-ticket section; None: no tickets sold

    def breakdowns(self) -> dict[str, pd.DataFrame]:
        """The tables by their key column, in the order the report shows them; absent ones left out, and so is a
        fleet table whose only key is "" (no vehicle is in a fleet: the table would say nothing)."""
        fleet = self.by_fleet
        if fleet is not None and not any(isinstance(k, str) and k for k in fleet["fleet"].tolist()):
            fleet = None
        out = {"fleet": fleet, "route": self.by_route, "vehicle": self.by_vehicle, "driver": self.by_driver}
        return {k: v for k, v in out.items() if v is not None}


def money_columns(frame: pd.DataFrame) -> list[str]:
    """The fen columns of a breakdown, checked to be integers: a float means money was rounded somewhere."""
    cols = [c for c in MONEY_COLUMNS if c in frame.columns]
    if not cols:
        cols = ["amount"] if "amount" in frame.columns else []
    if not cols:
        raise ValueError(f"a breakdown needs 'gross' (and optionally 'commission', 'net') or 'amount' in fen; "
                         f"got columns {list(frame.columns)}")
    for c in [*cols, "taps"]:
        if c not in frame.columns:
            raise ValueError(f"a breakdown needs a {c!r} column; got {list(frame.columns)}")
        if len(frame) and not pd.api.types.is_integer_dtype(frame[c]):
            raise TypeError(f"column {c!r} must be integers (fen / taps), got dtype {frame[c].dtype}")
    return cols


def totals(frame: pd.DataFrame) -> dict[str, int]:
    return {c: int(frame[c].sum()) for c in ["taps", *money_columns(frame)]}


def check_adjustments(frame: pd.DataFrame) -> None:
    """The adjustments frame has its columns, known kinds and integer fen (see the module doc)."""
    missing = [c for c in ADJUSTMENT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"adjustments need column(s) {missing}; got {list(frame.columns)}")
    money_columns(frame)  # taps and fen are integers
    unknown = sorted(set(frame["kind"].tolist()) - set(ADJUSTMENT_KINDS))
    if unknown:
        raise ValueError(f"adjustment kind must be one of {ADJUSTMENT_KINDS}, got {unknown}")


def adjustment_names(t: SettlementTables) -> list[str]:
    """What each adjustment's key is: the frame's ``name`` where given, else a late tap's route name."""
    frame = t.adjustments
    given = frame["name"].tolist() if "name" in frame.columns else [None] * len(frame)
    routes = t.names.get("route") or {}
    out = []
    for kind, key, name in zip(frame["kind"].tolist(), frame["key"].tolist(), given, strict=True):
        if name is not None and not (isinstance(name, float) and pd.isna(name)) and str(name):
            out.append(str(name))
        else:
            out.append(str(routes.get(key, "")) if kind == LATE else "")
    return out


def payable(day: dict[str, int], adjustments: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{"gross"|"commission"|"net": {"day": .., "adjustments": .., "payable": ..}} for the money columns both
    have."""
    out = {}
    for c in MONEY_COLUMNS:
        if c in day and c in adjustments.columns:
            adj = int(adjustments[c].sum())
            out[c] = {"day": day[c], "adjustments": adj, "payable": day[c] + adj}
    return out


def _names(frame: pd.DataFrame, key: str, names: Mapping | None) -> list[str] | None:
    if "name" in frame.columns:
        return ["" if pd.isna(n) else str(n) for n in frame["name"]]
    if names is None:
        return None
    return [str(names.get(code, "")) for code in frame[key]]


def _key_cell(value) -> str:
    if isinstance(value, date):
        return value.isoformat()
    return key_text(value)


def card_type_label(card_type, names: Mapping | None) -> str:
    """The caller's name for a card type (the back office passes the card application's), else "card type N"."""
    code = int(card_type)
    return str((names or {}).get(code) or f"card type {code}")


def breakdown_table(frame: pd.DataFrame, key: str, names: Mapping | None):
    """One breakdown as a table: code, name (if any), taps (and free rides, when given), money columns; a bold
    total row. Card types show by name only (their codes mean nothing to a reader)."""
    money = money_columns(frame)
    free = "free" in frame.columns
    if free and len(frame) and not pd.api.types.is_integer_dtype(frame["free"]):
        raise TypeError(f"column 'free' must be integers (taps), got dtype {frame['free'].dtype}")
    if key == "card_type":
        keys = [card_type_label(v, names) for v in frame[key].tolist()]
        shown = None
    else:
        keys = [_key_cell(v) for v in frame[key].tolist()]
        shown = _names(frame, key, names)
    money_width = 27 * mm if len(money) > 1 else 34 * mm
    taps_width = 20 * mm
    free_width = 18 * mm if free else 0
    code_width = (26 * mm if shown is not None else
                  FRAME_WIDTH - taps_width - free_width - money_width * len(money))
    columns = [Column(KEY_HEADINGS.get(key, key.title()), code_width)]
    if shown is not None:
        columns.append(Column(NAME_HEADING, FRAME_WIDTH - code_width - taps_width - free_width
                              - money_width * len(money)))
    columns.append(Column(TAPS_HEADING, taps_width, numeric=True))
    if free:
        columns.append(Column(FREE_HEADING, free_width, numeric=True))
    columns += [Column(HEADINGS[c], money_width, numeric=True) for c in money]
    # Plain lists: iterating numpy arrays row by row is what a month's report spends its time on otherwise.
    taps = [count(v) for v in frame["taps"].tolist()]
    frees = [count(v) for v in frame["free"].tolist()] if free else []
    values = [[yuan(v) for v in frame[c].tolist()] for c in money]
    rows = []
    for i, code in enumerate(keys):
        row = [code] if shown is None else [code, shown[i]]
        row.append(taps[i])
        if free:
            row.append(frees[i])
        row += [v[i] for v in values]
        rows.append(row)
    sums = totals(frame)
    total = ([TOTAL] + ([""] if shown is not None else []) + [count(sums["taps"])]
             + ([count(int(frame["free"].sum()))] if free else []) + [yuan(sums[c]) for c in money])
    return data_table(columns, rows, total)


def adjustments_table(t: SettlementTables):
    """The adjustments carried, one row each: for day, kind, route or item (with its name), taps, money;
    a bold total row."""
    frame = t.adjustments
    money = list(MONEY_COLUMNS)
    # Day, kind and taps hold short texts: narrow columns for them leave the route or item and its name room.
    money_width, taps_width, day_width, kind_width = 27 * mm, 12 * mm, 17 * mm, 19 * mm
    key_width = FRAME_WIDTH - day_width - kind_width - taps_width - money_width * len(money)
    columns = [Column("所属日\nFor day", day_width), Column("类别\nKind", kind_width),
               Column("线路/事项\nRoute / item", key_width), Column("笔数\nTaps", taps_width, numeric=True)]
    columns += [Column(HEADINGS[c], money_width, numeric=True) for c in money]
    names = adjustment_names(t)
    rows = []
    for i, (day, kind, key) in enumerate(zip(frame["for_day"].tolist(), frame["kind"].tolist(),
                                             frame["key"].tolist(), strict=True)):
        code = key_text(key)
        shown = (f"item {code}" if kind == RECONCILIATION else code) + (f" {names[i]}" if names[i] else "")
        rows.append([_key_cell(day), str(kind), shown, count(frame["taps"].iloc[i]),
                     *[yuan(frame[c].iloc[i]) for c in money]])
    sums = totals(frame)
    total = [TOTAL, "", "", count(sums["taps"]), *[yuan(sums[c]) for c in money]]
    return data_table(columns, rows, total)


def _plus(a: int, words: str, b: int) -> str:
    """ "a + words b", or "a - words |b|" for a negative b (a subtraction reads better than "+ -")."""
    return f"{yuan(a)} + {words}{yuan(b)}" if b >= 0 else f"{yuan(a)} - {words}{yuan(-b)}"


def payable_line(t: SettlementTables, money: dict[str, int]) -> str | None:
    """The "Payable" line (after its bold lead "Payable to the operator:"): the period's own figures + the
    adjustments = what is payable, for net, gross and commission; None without adjustments or a net."""
    if t.adjustments is None:
        return None
    figures = payable(money, t.adjustments)
    if "net" not in figures:
        return None
    own = "the day" if t.first_day == t.last_day else "the period's days"
    net = figures["net"]
    text = (f"net of {own} {_plus(net['day'], 'adjustments for earlier days ', net['adjustments'])} "
            f"= {yuan(net['payable'])} yuan")
    more = []
    for c, word in (("gross", "gross"), ("commission", "issuer commission")):
        if c in figures:
            f = figures[c]
            more.append(f"{word} {_plus(f['day'], '', f['adjustments'])} = {yuan(f['payable'])}")
    return text + (f" ({'; '.join(more)})." if more else ".")


def percent(bp: int) -> str:
    """Basis points as a percentage with two decimals, by integer arithmetic: 60 -> "0.60%"."""
    return f"{bp // 100}.{bp % 100:02d}%"


def rate_text(t: SettlementTables, money: Mapping[str, int]) -> str:
    """The card issuer's commission rate in words, as the figures were cleared with it."""
    rates = list(dict.fromkeys(t.commission_bp))
    if not rates:
        if "commission" in money:
            return "not known to this report."
        return "not applied: provisional figures are gross only (no commission, no net)."
    if len(rates) == 1:
        return f"{percent(rates[0])} of gross ({rates[0]} basis points)."
    shown = ", ".join(f"{percent(r)} ({r} bp)" for r in rates)
    return f"{shown}: the rate changed within the period; each day is cleared at the rate in force that day."


def day_ranges(days) -> str:
    """Days as runs of consecutive days: "2026-04-01 to 2026-04-09, 2026-04-13"."""
    days = sorted(days)
    spans: list[list[date]] = []
    for d in days:
        if spans and (d - spans[-1][1]).days == 1:
            spans[-1][1] = d
        else:
            spans.append([d, d])
    return ", ".join(a.isoformat() if a == b else f"{a.isoformat()} to {b.isoformat()}" for a, b in spans)


def status_line(t: SettlementTables) -> str:
    """Where the figures stand, in one line: a day's clearing run (or why the figures are provisional); for a
    period, how many of its days are cleared and which are not."""
    if t.days_not_cleared is not None:
        every = [date.fromordinal(o) for o in range(t.first_day.toordinal(), t.last_day.toordinal() + 1)]
        missing = set(t.days_not_cleared)
        cleared = [d for d in every if d not in missing]
        n = len(every)
        if not cleared:
            return f"no day of the period is cleared (0 of {n} days): there are no figures yet."
        if not missing:
            return f"all {n} days cleared ({day_ranges(cleared)})."
        return (f"{len(cleared)} of {n} days cleared ({day_ranges(cleared)}); {len(missing)} not cleared and "
                f"not counted here: {day_ranges(missing)}.")
    if t.provisional:
        return f"PROVISIONAL figures, nothing stored: {t.provisional}."
    if t.run is None:
        return "ad hoc clearing: no stored clearing run."
    return f"cleared in clearing run {t.run.id} of {when_text(t.run.at, t.tz)}."


def _facts(t: SettlementTables, money: dict[str, int], period_word: tuple[str, str], st) -> list:
    made = when_text(t.generated_at or datetime.now(UTC), t.tz)
    parts = [f"{count(money['taps'])} taps"]
    if "gross" in money:
        parts.append(f"gross {yuan(money['gross'])} yuan")
        if "commission" in money:
            parts.append(f"issuer commission {yuan(money['commission'])} yuan")
        if "net" in money:
            parts.append(f"net to the operator {yuan(money['net'])} yuan")
    else:
        parts.append(f"{yuan(money['amount'])} yuan")
    zh, en = period_word
    lines = [("生成时间 Generated:", f"{made}. Operator code {t.operator}."),
             ("结算状态 Status:", status_line(t)),
             ("发卡方佣金率 Issuer commission rate:", rate_text(t, money)),
             (f"{zh} {en} total:", ", ".join(parts) + ".")]
    return [Paragraph(f"<b>{markup(label)}</b> {markup(text)}", st["body"]) for label, text in lines]


def _change(now: int, before: int, money: bool) -> tuple[str, str]:
    """(difference, difference in percent of ``before``), by integer and Decimal arithmetic."""
    diff = now - before
    shown = (yuan(diff) if money else count(diff))
    shown = f"+{shown}" if diff > 0 else shown
    if before == 0:
        return shown, "-"
    pct = (Decimal(diff) * 100 / Decimal(before)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return shown, "0.0%" if pct == 0 else f"{'+' if pct > 0 else ''}{pct}%"


COMPARED = {"taps": "笔数 Taps", "gross": "总收入(元) Gross (yuan)", "commission": "发卡方佣金(元) Commission (yuan)",
            "net": "净收入(元) Net (yuan)", "amount": "金额(元) Amount (yuan)"}


def comparison_rows(t: SettlementTables, money: dict[str, int]) -> list[tuple[str, int, int]] | None:
    """(figure, this period, the period before) for each figure both have; None when there is nothing to
    compare with."""
    prev = t.previous
    if prev is None or prev.totals is None:
        return None
    return [(c, money[c], int(prev.totals[c])) for c in ("taps", "gross", "commission", "net", "amount")
            if c in money and c in prev.totals]


def _comparison(t: SettlementTables, money: dict[str, int], this: tuple[str, str], st) -> list:
    prev = t.previous
    span = (prev.first_day.isoformat() if prev.first_day == prev.last_day
            else f"{prev.first_day:%Y-%m}" if prev.first_day.day == 1 and prev.last_day.month == prev.first_day.month
            else f"{prev.first_day.isoformat()} to {prev.last_day.isoformat()}")
    zh, en = prev.label
    heading = Paragraph(markup(f"与{zh}比较 Compared with the {en} ({span})"), st["heading"])
    rows = comparison_rows(t, money)
    if rows is None:
        return [heading, Paragraph(markup(f"The {en}, {span}, has no cleared figures: nothing to compare with."),
                                   st["body"])]
    body = []
    for c, now, before in rows:
        diff, pct = _change(now, before, c != "taps")
        fmt = count if c == "taps" else yuan
        body.append([COMPARED[c], fmt(now), fmt(before), diff, pct])
    width = (FRAME_WIDTH - 62 * mm) / 4
    columns = [Column("项目 Figure", 62 * mm), Column(f"{this[0]}\n{this[1]}", width, numeric=True),
               Column(f"{zh}\n{en.capitalize()}", width, numeric=True), Column("增减\nChange", width, numeric=True),
               Column("增减%\nChange %", width, numeric=True)]
    return [heading, data_table(columns, body)]


def _money_key(frame: pd.DataFrame) -> str:
    return "gross" if "gross" in frame.columns else "amount"


def _route_chart(t: SettlementTables):
    frame = t.by_route
    if frame.empty:
        return None
    col = _money_key(frame)
    top = frame.nlargest(TOP_ROUTES, col, keep="first")
    shown = _names(top, "route", t.names.get("route"))
    labels = [key_text(code) + (f" {shown[i]}" if shown and shown[i] else "") for i, code in enumerate(top["route"])]
    what = "gross" if col == "gross" else "amount"
    title = (f"线路收入 Revenue by route ({what}, yuan)" if len(frame) <= TOP_ROUTES else
             f"线路收入 Revenue by route: the {len(top)} biggest of {len(frame):,} ({what}, yuan)")
    return charts.revenue_bars(labels, top[col].tolist(), title=title)


def _hour_chart(t: SettlementTables, cutoff_hour: int):
    return hour_chart(t.taps_by_hour, t.tz, cutoff_hour)


def hour_chart(frame: pd.DataFrame | None, tz: str | None, cutoff_hour: int):
    """Taps by local hour (columns hour, taps) in the service day's order, from the cut-off round; None when
    there are none. Also the vehicle's day's chart (``reports.shift_slip``)."""
    if frame is None or frame.empty or int(frame["taps"].sum()) == 0:
        return None
    by_hour = dict.fromkeys(range(24), 0)
    for h, n in zip(frame["hour"].tolist(), frame["taps"].tolist()):
        by_hour[int(h)] += int(n)
    order = [(cutoff_hour + i) % 24 for i in range(24)]  # the service day's order: from the cut-off round
    return charts.columns([f"{h:02d}" for h in order], [by_hour[h] for h in order], title="分时笔数 Taps by hour",
                          axis_title=f"hour of the day ({tz or 'local time'}; the service day starts at the "
                                     f"cut-off hour, {cutoff_hour:02d}:00)")


def _day_chart(t: SettlementTables):
    frame = t.by_day
    if frame is None or frame.empty:
        return None
    days = [d.day if isinstance(d, date) else pd.Timestamp(d).day for d in frame["day"].tolist()]
    return charts.columns([f"{d:02d}" for d in days], frame["taps"].tolist(), title="每日笔数 Taps by day",
                          axis_title="day of the month")


def _payable_paragraph(t: SettlementTables, money: dict[str, int], st) -> Paragraph:
    """Near the top: what is payable (the period's net + the adjustments), or a line saying there are none."""
    if t.adjustments.empty:
        one_day = t.first_day == t.last_day
        carry = "this clearing run carries" if one_day else "the clearing runs of this period carry"
        own = "the day's" if one_day else "the period's"
        line = (f"无以前运营日调整。No adjustments for earlier days: {carry} no late taps and no reconciliation adjustments, "
                f"so the net payable to the operator is {own} net, {yuan(money['net'])} yuan.")
        return Paragraph(markup(line), st["body"])
    return Paragraph(f"<b>{markup('应付运营方')} Payable to the operator:</b> " + markup(payable_line(t, money) or ""),
                     st["body"])


def settlement_story(t: SettlementTables, *, title: str, period: str, period_word: tuple[str, str],
                     this: tuple[str, str] = ("本日", "This day"), cutoff_hour: int = 3) -> tuple[list, PageHeader]:
    """The flowables of a settlement report and the header of its pages."""
    st = styles()
    tables = t.breakdowns()
    money = totals(t.by_route)
    story: list = [
        Paragraph(markup(f"{title} — {t.operator_name}"), st["title"]),
        Paragraph(f"<b>{markup(period)}</b>", st["subtitle"]),
        *_facts(t, money, period_word, st),
    ]
    adjustments = t.adjustments
    if adjustments is not None:
        check_adjustments(adjustments)
        if "net" not in money:
            raise ValueError("adjustments need the period's gross, commission and net (figures of stored "
                             "clearing runs); provisional figures carry none: leave adjustments None")
        story.append(_payable_paragraph(t, money, st))
    # Every breakdown holds each tap once, so all must add up to the same figures; if not, the reader must
    # not trust any of them.
    checked = [*tables.values(), *([t.by_card_type] if t.by_card_type is not None else [])]
    if any(totals(frame) != money for frame in checked):
        story.append(Paragraph("WARNING: the tables below do not add up to the same figures.", st["bold"]))
    if t.previous is not None:
        story += [Spacer(1, 2 * mm), KeepTogether(_comparison(t, money, this, st))]
    if t.by_card_type is not None:
        heading = Paragraph(markup(SECTION_HEADINGS["card_type"]), st["heading"])
        story += [Spacer(1, 2 * mm), KeepTogether([heading, breakdown_table(t.by_card_type, "card_type",
                                                                             t.names.get("card_type"))])]
    for drawing in (_route_chart(t), _hour_chart(t, cutoff_hour), _day_chart(t)):
        if drawing is not None:
            story += [Spacer(1, 4 * mm), drawing]
    sections = list(tables.items())
    if t.by_day is not None:
        sections.insert(0, ("day", t.by_day))
    for key, frame in sections:
        heading = Paragraph(markup(SECTION_HEADINGS.get(key, f"By {key}")), st["heading"])
        table = breakdown_table(frame, key, t.names.get(key))
        # Keep a heading with the first rows of its table: a heading alone at the foot of a page reads as lost.
        story += [Spacer(1, 3 * mm), CondPageBreak(30 * mm), KeepTogether([heading]), table]
    if adjustments is not None and not adjustments.empty:
        heading = Paragraph(markup(ADJUSTMENTS_HEADING), st["heading"])
        story += [Spacer(1, 3 * mm), CondPageBreak(30 * mm), KeepTogether([heading]), adjustments_table(t)]
    if t.tickets is not None:  # e-tickets (issue 11): a section of their own, no issuer commission
        from reports.tickets import pdf_section

        story += pdf_section(t.tickets, st)
    # The foot of the paper: who prepared, checked and approved it, each with a date.
    story += [Spacer(1, 6 * mm), KeepTogether([Paragraph(markup("签字 Signatures"), st["heading"]),
                                               signature_lines(SIGNATURE_ROLES)])]
    header = PageHeader(
        operator_name=t.operator_name,
        title=title,
        period=period,
        run_line=run_line(t.run.id if t.run else None, t.run.at if t.run else t.generated_at, t.tz),
        footer=f"farebox — {title} {t.operator} {period}",
    )
    return story, header

"""The settlement's tables as CSV and XLSX, for the clerk who wants them in a spreadsheet.

The same frames as the PDF (``SettlementTables``), one file (CSV) or one sheet (XLSX) per table, each ending in a
totals row ("合计 Total"). Headers are for people: Chinese with English beside it and the unit where there is one
("总收入(元) Gross (yuan)"). Money is in yuan with two decimals, worked out from the integer fen with integer
arithmetic (CSV: "1234.50", no separators, so any spreadsheet parses it) or as an exact Decimal (XLSX, formatted
``#,##0.00``), never through a float. Names of routes, vehicles, drivers and card types come beside their codes.
The fleet table is left out when no vehicle is in a fleet (it would hold one row, "not in a fleet").

The XLSX starts with an "about" sheet whose first row is the status line (the day's clearing run, or why the
figures are provisional; for a month, how many days are cleared and which are not), then when it was generated
(local time of the operator's zone, named), the commission rate and the totals; a "comparison" sheet puts the
period beside the one before when that one has cleared figures.

The adjustments the clearing run(s) carry for earlier days (late taps, reconciliation adjustments), when there
are any, come as one more table, ``adjustments``: kind, for day, route or item, name, taps and the money. The
"about" sheet then also gives the adjustments' totals and what is payable (the period's totals + the
adjustments), as the PDF's "Payable" line does.

CSV is UTF-8 with a byte-order mark: Excel on a clerk's Windows PC reads a CSV without one in the local code page
and shows Chinese names as mojibake. Files are written atomically (a temp file renamed into place).

Names are typed by clerks, so a text cell that a spreadsheet would take for a formula (it starts with =, +, -, @,
a tab or a carriage return: OWASP's "CSV injection") gets a leading apostrophe, in the CSV and the XLSX alike,
by ``escape_formulas`` on the way out of both writers: ``=HYPERLINK(...)`` arrives as the text it was typed as.
Numbers stay numbers: taps are integers, yuan Decimals, and a yuan text such as ``-12.50`` is a plain number,
left as it is.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from clearing.money import yuan, yuan_decimal
from reports.daily import clearing_line
from reports.pdf import MISSING_KEY, when_text
from reports.tickets import YUAN_COLUMNS as TICKET_YUAN_COLUMNS
from reports.tickets import export_frames as export_ticket_frames
from reports.settlement_doc import (
    MONEY_COLUMNS,
    SettlementTables,
    adjustment_names,
    check_adjustments,
    comparison_rows,
    money_columns,
    payable,
    rate_text,
    status_line,
    totals,
)

CSV_ENCODING = "utf-8-sig"  # UTF-8 with BOM, see above
YUAN_FORMAT = "#,##0.00"
TOTAL = "合计 Total"
# Headers a clerk reads in a spreadsheet: Chinese with English beside it, and the unit where there is one.
HEADERS = {"route": "线路 Route", "vehicle": "车辆 Vehicle", "driver": "司机 Driver", "fleet": "车队 Fleet",
           "day": "运营日 Service day", "card_type": "卡类 Card type", "name": "名称 Name", "taps": "笔数 Taps",
           "free": "免费笔数 Free rides", "gross": "总收入(元) Gross (yuan)",
           "commission": "发卡方佣金(元) Issuer commission (yuan)", "net": "运营方净收入(元) Net to operator (yuan)",
           "amount": "金额(元) Amount (yuan)", "kind": "类别 Kind", "for_day": "所属运营日 For day",
           "key": "线路/事项 Route / item", "hour": "时段 Hour (local)"}
YUAN_HEADERS = frozenset(HEADERS[c] for c in ("gross", "commission", "net", "amount")) | TICKET_YUAN_COLUMNS


# Fen as a plain yuan number a spreadsheet parses: 123450 -> "1234.50", -5 -> "-0.05" (no separators).
yuan_text = functools.partial(yuan, grouping=False)


def _with_total(out: pd.DataFrame, label_column: str, money, to_yuan, fen_sums: dict[str, int]) -> pd.DataFrame:
    """``out`` with a totals row: ``TOTAL`` in the label column, the sums of taps (and free rides) and money."""
    row = {c: "" for c in out.columns}
    row[label_column] = TOTAL
    for c in ("taps", "free"):
        if c in out.columns:
            row[c] = int(out[c].sum())
    for c in money:
        row[c] = to_yuan(fen_sums[c])
    total = pd.DataFrame([row], columns=out.columns)
    for c in ("taps", "free"):
        if c in out.columns:
            total[c] = total[c].astype("int64")
    return pd.concat([out.astype({c: "object" for c in out.columns if c not in ("taps", "free")}),
                      total.astype({c: "object" for c in out.columns if c not in ("taps", "free")})],
                     ignore_index=True)


def export_frame(frame: pd.DataFrame, key: str, names=None, *, to_yuan: Callable[[int], object] = yuan_text,
                 headers: bool = True) -> pd.DataFrame:
    """`frame` ready to export: key, name (if any), taps (and free rides), each money column in yuan, then a
    totals row; headers bilingual with their unit (``headers=False`` keeps the plain column names)."""
    money = money_columns(frame)
    out = pd.DataFrame({key: [MISSING_KEY if pd.isna(v) else v for v in frame[key].tolist()]})
    if "name" in frame.columns:
        out["name"] = frame["name"].tolist()
    elif names is not None:
        out["name"] = [names.get(code, "") for code in frame[key].tolist()]
    out = _with_money(out, frame, money, to_yuan)
    out = _with_total(out, key, money, to_yuan, {c: int(frame[c].sum()) for c in money})
    return out.rename(columns=HEADERS) if headers else out


def export_adjustments(tables: SettlementTables, *, to_yuan: Callable[[int], object] = yuan_text,
                       headers: bool = True) -> pd.DataFrame:
    """The adjustments ready to export: kind, for_day, key, name, taps, the money in yuan, a totals row."""
    frame = tables.adjustments
    check_adjustments(frame)
    out = pd.DataFrame({"kind": frame["kind"].tolist(), "for_day": frame["for_day"].tolist(),
                        "key": [MISSING_KEY if pd.isna(v) else str(v) for v in frame["key"].tolist()],
                        "name": adjustment_names(tables)})
    out = _with_money(out, frame, MONEY_COLUMNS, to_yuan)
    out = _with_total(out, "kind", MONEY_COLUMNS, to_yuan, {c: int(frame[c].sum()) for c in MONEY_COLUMNS})
    return out.rename(columns=HEADERS) if headers else out


def _with_money(out: pd.DataFrame, frame: pd.DataFrame, money, to_yuan) -> pd.DataFrame:
    """``out`` with ``frame``'s taps (and free rides), then each fen column as yuan."""
    out["taps"] = frame["taps"].astype("int64").to_numpy()
    if "free" in frame.columns:
        out["free"] = frame["free"].astype("int64").to_numpy()
    for c in money:
        out[c] = [to_yuan(v) for v in frame[c].astype("int64").tolist()]
    return out


def export_hours(tables: SettlementTables) -> pd.DataFrame:
    """Taps by local hour of the day, with a totals row."""
    hours = tables.taps_by_hour.loc[:, ["hour", "taps"]].astype("int64").reset_index(drop=True)
    out = pd.concat([hours.astype({"hour": "object"}),
                     pd.DataFrame({"hour": [TOTAL], "taps": [int(hours["taps"].sum())]})], ignore_index=True)
    zone = f"时段 Hour ({tables.tz})" if tables.tz else HEADERS["hour"]
    return out.rename(columns={"hour": zone, "taps": HEADERS["taps"]})


def export_comparison(tables: SettlementTables) -> pd.DataFrame | None:
    """This period beside the one before (figure, this, before, change, change %), yuan for money; None when
    there is nothing to compare with."""
    money = totals(tables.by_route)
    rows = comparison_rows(tables, money)
    if rows is None:
        return None
    prev = tables.previous
    out = []
    for c, now, before in rows:
        change = now - before
        pct = (None if before == 0 else
               (Decimal(change) * 100 / Decimal(before)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))
        if c == "taps":
            out.append((HEADERS["taps"], now, before, change, pct))
        else:
            out.append((HEADERS[c], yuan_decimal(now), yuan_decimal(before), yuan_decimal(change), pct))
    span = prev.first_day.isoformat() + ("" if prev.first_day == prev.last_day else f" to {prev.last_day}")
    return pd.DataFrame(out, columns=["项目 Figure", "本期 This period", f"{prev.label[0]} {prev.label[1]} ({span})",
                                      "增减 Change", "增减% Change (%)"])


def export_frames(tables: SettlementTables, *, to_yuan: Callable[[int], object] = yuan_text
                  ) -> dict[str, pd.DataFrame]:
    """Every table of the report by its name ("by_route", ..., "adjustments", "taps_by_hour"), ready to
    export; "adjustments" only when there are any, "by_fleet" only when a vehicle is in a fleet."""
    out: dict[str, pd.DataFrame] = {}
    if tables.by_day is not None:
        out["by_day"] = export_frame(tables.by_day, "day", to_yuan=to_yuan)
    if tables.by_card_type is not None:
        out["by_card_type"] = export_frame(tables.by_card_type, "card_type", tables.names.get("card_type") or {},
                                           to_yuan=to_yuan)
    for key, frame in tables.breakdowns().items():
        out[f"by_{key}"] = export_frame(frame, key, tables.names.get(key), to_yuan=to_yuan)
    if tables.adjustments is not None and not tables.adjustments.empty:
        out["adjustments"] = export_adjustments(tables, to_yuan=to_yuan)
    if tables.taps_by_hour is not None:
        out["taps_by_hour"] = export_hours(tables)
    if tables.tickets is not None:  # e-tickets: tickets_by_route ... ticket_sales, ticket_outstanding
        out.update(export_ticket_frames(tables.tickets, to_yuan=to_yuan))
    return out


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def spreadsheet_text(value):
    """``value`` as a spreadsheet cell that shows what was typed and never runs: text that would start a formula
    gets a leading apostrophe; numbers, and texts that are plain numbers, are left alone."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def escape_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with ``spreadsheet_text`` on every text column (numeric columns untouched)."""
    out = frame.copy()
    for c in out.columns:
        if not pd.api.types.is_numeric_dtype(out[c]):
            out[c] = [spreadsheet_text(v) for v in out[c].tolist()]
    return out


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """One frame as CSV, UTF-8 with BOM, atomically."""
    safe = escape_formulas(frame)
    return _atomic(Path(path), lambda tmp: safe.to_csv(tmp, index=False, encoding=CSV_ENCODING, lineterminator="\r\n"))


def write_settlement_csv(tables: SettlementTables, directory: str | Path, *, stem: str | None = None) -> list[Path]:
    """Each table as ``<stem>-by_route.csv`` etc. in `directory`; `stem` defaults to
    ``settlement-<operator>-<first day>[_<last day>]``."""
    directory = Path(directory)
    if stem is None:
        span = tables.first_day.isoformat() + ("" if tables.last_day == tables.first_day
                                               else f"_{tables.last_day.isoformat()}")
        stem = f"settlement-{tables.operator}-{span}"
    return [write_csv(frame, directory / f"{stem}-{name}.csv") for name, frame in export_frames(tables).items()]


def _about(tables: SettlementTables) -> pd.DataFrame:
    """The first sheet: what the workbook is, where its figures stand (status), and the totals in yuan."""
    made = when_text(tables.generated_at or datetime.now(UTC), tables.tz)
    run = clearing_line(tables)
    route = tables.by_route
    money = totals(route)
    rows = [("结算状态 Status", status_line(tables)),
            ("生成时间 Generated", made),
            ("运营单位 Operator", tables.operator), ("运营单位名称 Operator name", tables.operator_name),
            ("首个运营日 First service day", tables.first_day.isoformat()),
            ("最后运营日 Last service day", tables.last_day.isoformat()),
            ("清分 Clearing", run),
            ("发卡方佣金率 Issuer commission rate", rate_text(tables, money)),
            ("合计笔数 Total taps", money["taps"])]
    for c in money_columns(route):
        rows.append((f"合计 Total {HEADERS[c]}", yuan_decimal(money[c])))
    if tables.adjustments is not None:
        figures = payable({c: money[c] for c in money_columns(route)}, tables.adjustments)
        check_adjustments(tables.adjustments)
        rows.append(("以前运营日调整(行) Adjustments for earlier days (rows)", len(tables.adjustments)))
        for what, zh in (("adjustments", "调整 Adjustments"), ("payable", "应付 Payable")):
            for c, f in figures.items():
                rows.append((f"{zh} {HEADERS[c]}", yuan_decimal(f[what])))
    return pd.DataFrame(rows, columns=["项目 Item", "值 Value"])


def _xlsx_value(value):
    """A cell's value as openpyxl takes it: None for missing, Python numbers and datetimes for numpy's."""
    if value is None or value is pd.NaT or (isinstance(value, float) and value != value):
        return None
    if value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_settlement_xlsx(tables: SettlementTables, path: str | Path) -> Path:
    """One workbook: an "about" sheet (status, operator, period, clearing run, totals), a "comparison" sheet
    when there is a period before to compare with, then one sheet per table with its totals row in bold, header
    row frozen, yuan formatted with two decimals."""
    from openpyxl.styles import Font  # imported here so that PDF-only users need not install openpyxl

    frames = export_frames(tables, to_yuan=yuan_decimal)
    comparison = export_comparison(tables)
    sheets = {"about": _about(tables), **({"comparison": comparison} if comparison is not None else {}), **frames}

    def write(tmp: Path) -> None:
        # openpyxl's write-only mode, rows streamed with their styles: a city's 10,000 vehicles and 15,000 drivers
        # took ~12 s through pandas' cell-by-cell writer and a workbook of cell objects, here a few seconds.
        from openpyxl import Workbook
        from openpyxl.cell import WriteOnlyCell
        from openpyxl.utils import get_column_letter

        book = Workbook(write_only=True)
        bold = Font(bold=True)
        for name, frame in sheets.items():
            ws = book.create_sheet(title=name)
            safe = escape_formulas(frame)
            headings = [str(c) for c in safe.columns]
            for i, heading in enumerate(headings, start=1):
                width = max(10, min(40, len(heading) + 4))
                if heading == HEADERS["name"] or (name == "about" and i == 1):
                    width = 36 if name == "about" else 24
                if name == "about" and i == 2:
                    width = 90
                ws.column_dimensions[get_column_letter(i)].width = width
            if name != "about":
                ws.freeze_panes = "A2"
            yuan = {i for i, h in enumerate(headings) if h in YUAN_HEADERS or name in ("about", "comparison")}
            percent = len(headings) - 1 if name == "comparison" else -1  # a percentage with one decimal

            def cell(value, *, strong: bool, fmt: str | None, ws=ws):
                c = WriteOnlyCell(ws, value=value)
                if strong:
                    c.font = bold
                if fmt:
                    c.number_format = fmt
                return c

            ws.append([cell(h, strong=True, fmt=None) for h in headings])
            last = len(safe) - 1
            for r, values in enumerate(safe.itertuples(index=False, name=None)):
                strong = r == last and bool(values) and values[0] == TOTAL
                row = []
                for i, value in enumerate(values):
                    value = _xlsx_value(value)
                    fmt = YUAN_FORMAT if i in yuan and isinstance(value, Decimal | float) else None
                    if i == percent:
                        fmt = "+0.0;-0.0;0.0"
                    row.append(cell(value, strong=strong, fmt=fmt) if strong or fmt else value)
                ws.append(row)
        book.save(tmp)

    return _atomic(Path(path), write)

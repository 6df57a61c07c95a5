"""The settlement's tables as CSV and XLSX, for the clerk who wants them in a spreadsheet.

The same frames as the PDF (``SettlementTables``), one file (CSV) or one sheet (XLSX) per table. Money stays in
integer fen, and beside each fen column comes the same amount in yuan with two decimals (``gross`` ->
``gross_yuan``), worked out with integer arithmetic (CSV) or as an exact Decimal (XLSX, formatted ``#,##0.00``),
never through a float. Names of routes, vehicles and drivers come beside their codes.

The adjustments the clearing run(s) carry for earlier days (late taps, reconciliation adjustments), when there
are any, come as one more table, ``adjustments``: kind, for_day, key (route code or reconciliation item id),
name, taps and the money columns. The XLSX "about" sheet then also gives the adjustments' totals and what is
payable (the period's totals + the adjustments), as the PDF's "Payable" line does.

CSV is UTF-8 with a byte-order mark: Excel on a clerk's Windows PC reads a CSV without one in the local code page
and shows Chinese names as mojibake. Files are written atomically (a temp file renamed into place).

Names are typed by clerks, so a text cell that a spreadsheet would take for a formula (it starts with =, +, -, @,
a tab or a carriage return: OWASP's "CSV injection") gets a leading apostrophe, in the CSV and the XLSX alike,
by ``escape_formulas`` on the way out of both writers: ``=HYPERLINK(...)`` arrives as the text it was typed as.
Numbers stay numbers: money columns are integers (or Decimals), and a yuan text such as ``-12.50`` is a plain
number, left as it is.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pandas as pd

from clearing.money import yuan, yuan_decimal
from reports.pdf import MISSING_KEY, run_line
from reports.settlement_doc import (
    MONEY_COLUMNS,
    SettlementTables,
    adjustment_names,
    check_adjustments,
    money_columns,
    payable,
)

CSV_ENCODING = "utf-8-sig"  # UTF-8 with BOM, see above
YUAN_FORMAT = "#,##0.00"


# Fen as a plain yuan number a spreadsheet parses: 123450 -> "1234.50", -5 -> "-0.05" (no separators).
yuan_text = functools.partial(yuan, grouping=False)


def export_frame(frame: pd.DataFrame, key: str, names=None, *, to_yuan: Callable[[int], object] = yuan_text
                 ) -> pd.DataFrame:
    """`frame` ready to export: key, name (if any), taps, then each fen column followed by its yuan column."""
    money = money_columns(frame)
    out = pd.DataFrame({key: [MISSING_KEY if pd.isna(v) else v for v in frame[key].tolist()]})
    if "name" in frame.columns:
        out["name"] = frame["name"].tolist()
    elif names is not None:
        out["name"] = [names.get(code, "") for code in frame[key].tolist()]
    return _with_money(out, frame, money, to_yuan)


def export_adjustments(tables: SettlementTables, *, to_yuan: Callable[[int], object] = yuan_text
                       ) -> pd.DataFrame:
    """The adjustments ready to export: kind, for_day, key, name, taps, then each fen column and its yuan."""
    frame = tables.adjustments
    check_adjustments(frame)
    out = pd.DataFrame({"kind": frame["kind"].tolist(), "for_day": frame["for_day"].tolist(),
                        "key": [MISSING_KEY if pd.isna(v) else str(v) for v in frame["key"].tolist()],
                        "name": adjustment_names(tables)})
    return _with_money(out, frame, MONEY_COLUMNS, to_yuan)


def _with_money(out: pd.DataFrame, frame: pd.DataFrame, money, to_yuan) -> pd.DataFrame:
    """``out`` with ``frame``'s taps, then each fen column followed by its yuan column."""
    out["taps"] = frame["taps"].astype("int64").to_numpy()
    for c in money:
        fen = frame[c].astype("int64")
        out[c] = fen.to_numpy()
        out[f"{c}_yuan"] = [to_yuan(v) for v in fen.tolist()]
    return out


def export_frames(tables: SettlementTables, *, to_yuan: Callable[[int], object] = yuan_text
                  ) -> dict[str, pd.DataFrame]:
    """Every table of the report by its name ("by_route", ..., "adjustments", "taps_by_hour"), ready to
    export; "adjustments" only when there are any."""
    out: dict[str, pd.DataFrame] = {}
    if tables.by_day is not None:
        out["by_day"] = export_frame(tables.by_day, "day", to_yuan=to_yuan)
    for key, frame in tables.breakdowns().items():
        out[f"by_{key}"] = export_frame(frame, key, tables.names.get(key), to_yuan=to_yuan)
    if tables.adjustments is not None and not tables.adjustments.empty:
        out["adjustments"] = export_adjustments(tables, to_yuan=to_yuan)
    if tables.taps_by_hour is not None:
        out["taps_by_hour"] = tables.taps_by_hour.loc[:, ["hour", "taps"]].astype("int64").reset_index(drop=True)
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
    made = (tables.generated_at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    run = run_line(tables.run.id if tables.run else None, tables.run.at if tables.run else tables.generated_at)
    rows = [("operator", tables.operator), ("operator name", tables.operator_name),
            ("first service day", tables.first_day.isoformat()), ("last service day", tables.last_day.isoformat()),
            ("clearing", run), ("generated", made)]
    route = tables.by_route
    for c in ["taps", *money_columns(route)]:
        fen = int(route[c].sum())
        rows.append((f"total {c}" + ("" if c == "taps" else " (fen)"), fen))
        if c != "taps":
            rows.append((f"total {c} (yuan)", yuan_decimal(fen)))
    if tables.adjustments is not None:
        figures = payable({c: int(route[c].sum()) for c in money_columns(route)}, tables.adjustments)
        check_adjustments(tables.adjustments)
        rows.append(("adjustments for earlier days (rows)", len(tables.adjustments)))
        for what in ("adjustments", "payable"):
            for c, f in figures.items():
                rows.append((f"{what} {c} (fen)", f[what]))
                rows.append((f"{what} {c} (yuan)", yuan_decimal(f[what])))
    return pd.DataFrame(rows, columns=["item", "value"])


def write_settlement_xlsx(tables: SettlementTables, path: str | Path) -> Path:
    """One workbook: an "about" sheet (operator, period, clearing run, totals), then one sheet per table, header
    row frozen, yuan columns formatted with two decimals."""
    from openpyxl.styles import Font  # imported here so that PDF-only users need not install openpyxl

    frames = export_frames(tables, to_yuan=yuan_decimal)

    def write(tmp: Path) -> None:
        with pd.ExcelWriter(tmp, engine="openpyxl") as xw:
            escape_formulas(_about(tables)).to_excel(xw, sheet_name="about", index=False)
            for name, frame in frames.items():
                escape_formulas(frame).to_excel(xw, sheet_name=name, index=False, freeze_panes=(1, 0))
            for ws in xw.book.worksheets:
                for cell in ws[1]:
                    cell.font = Font(bold=True)
                for i, column in enumerate(ws.iter_cols(min_row=1, max_row=1), start=1):
                    heading = str(column[0].value)
                    letter = column[0].column_letter
                    ws.column_dimensions[letter].width = max(10, min(40, len(heading) + 4))
                    if heading.endswith("_yuan") or ws.title == "about" and i == 2:
                        for (cell,) in ws.iter_rows(min_row=2, min_col=i, max_col=i):
                            if isinstance(cell.value, Decimal | float):
                                cell.number_format = YUAN_FORMAT
                    elif heading == "name":
                        ws.column_dimensions[letter].width = 24

    return _atomic(Path(path), write)

"""Formula escaping in the settlement CSV and XLSX (reports.tables.escape_formulas): text that a spreadsheet would
run gets a leading apostrophe, numbers stay numbers, negative money included."""

from __future__ import annotations

import csv
from decimal import Decimal

import pytest
from test_reports import shift_rows, tables_for

from reports.tables import spreadsheet_text, write_settlement_csv, write_settlement_xlsx

openpyxl = pytest.importorskip("openpyxl")


@pytest.mark.parametrize(("typed", "written"), [
    ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'), ("+1+1", "'+1+1"), ("-1+2", "'-1+2"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("1路 火车站", "1路 火车站"), ("", ""),
    ("-12.50", "-12.50"), ("+3", "+3"), ("-5", "-5"), (-5, -5), (Decimal("-0.05"), Decimal("-0.05"))])
def test_spreadsheet_text(typed, written):
    assert spreadsheet_text(typed) == written


def test_negative_money_stays_numbers_beside_an_escaped_name(tmp_path):
    t = tables_for(shift_rows(50))
    first = t.by_route.index[0]
    code = t.by_route.loc[first, "route"]
    t.by_route.loc[first, "net"] = -1234  # a correction can make a line negative
    t.names["route"][code] = "=1+1"
    (csv_path,) = [p for p in write_settlement_csv(t, tmp_path) if p.name.endswith("-by_route.csv")]
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["线路 Route"] == code)
    assert row["名称 Name"] == "'=1+1" and row["运营方净收入(元) Net to operator (yuan)"] == "-12.34"
    book = openpyxl.load_workbook(write_settlement_xlsx(t, tmp_path / "s.xlsx"))
    ws = book["by_route"]
    header = [c.value for c in ws[1]]
    cells = next(r for r in ws.iter_rows(min_row=2) if r[0].value == code)
    name, net_yuan = (cells[header.index(c)] for c in ("名称 Name", "运营方净收入(元) Net to operator (yuan)"))
    assert (name.data_type, name.value) == ("s", "'=1+1")
    assert net_yuan.data_type == "n" and Decimal(str(net_yuan.value)) == Decimal("-12.34")

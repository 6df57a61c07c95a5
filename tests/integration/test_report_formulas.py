"""Clerk-typed names in the settlement spreadsheets, on SQLite and PostgreSQL: a route registered as
``=HYPERLINK(...)`` (and a driver and a vehicle whose names start with the other formula characters) is settled
through ``backoffice.settle.settle``; the CSV and the XLSX it writes are read back with the csv module and openpyxl:
the names are text that starts with an apostrophe (OWASP "CSV injection"), never a formula, while the money beside
them stays numbers."""

from __future__ import annotations

import csv
from datetime import date, timedelta

import pytest
from openpyxl import load_workbook
from test_settle_reports import DAY, END, OP, START, _row, store

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.settle import settle

EVIL_ROUTE = '=HYPERLINK("http://x","y")'
EVIL_DRIVER = "@SUM(1+1)*cmd|' /C calc'!A0"
EVIL_VEHICLE = "+1+cmd|' /C calc'!A0"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
GROSS = "总收入(元) Gross (yuan)"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request):
    engine = make_engine(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url"))
    upgrade(engine)
    at = START - timedelta(days=30)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="=1+1 Bus Co", at=at)
        registry.add_route(conn, code="R1", operator=OP, name=EVIL_ROUTE, flat_fare=200, at=at)
        registry.add_vehicle(conn, code="V1", operator=OP, plate=EVIL_VEHICLE, at=at)
        registry.add_driver(conn, staff_no="D1", operator=OP, name=EVIL_DRIVER, card_asn=f"{1:020d}", at=at)
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
    yield engine
    engine.dispose()


def test_clerk_typed_names_are_text_in_the_csv_and_xlsx_and_money_stays_numbers(engine, tmp_path):
    rows = [_row("VAL1", i, "purchase", START + timedelta(hours=4, minutes=i), "V1", "R1", "D1", amount=200)
            for i in range(1, 6)]
    store(engine, rows)
    with engine.begin() as conn:
        result = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=END + timedelta(hours=1))
    gross = 5 * 200

    with open(tmp_path / f"settlement-{OP}-{DAY}-by_route.csv", encoding="utf-8-sig", newline="") as f:
        text = f.read()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("R1,")]
    name_field = next(csv.reader([line]))[1]
    assert name_field == "'" + EVIL_ROUTE  # the cell starts with an apostrophe: Excel shows it as typed
    (row,) = [r for r in csv.DictReader(text.splitlines()) if r["线路 Route"] == "R1"]
    assert row[GROSS] == f"{gross // 100}.{gross % 100:02d}" == "10.00"
    for kind, name, heading in (("driver", EVIL_DRIVER, "司机 Driver"), ("vehicle", EVIL_VEHICLE, "车辆 Vehicle")):
        with open(tmp_path / f"settlement-{OP}-{DAY}-by_{kind}.csv", encoding="utf-8-sig", newline="") as f:
            (r,) = [r for r in csv.DictReader(f) if r[heading] == f"{kind[0].upper()}1"]
        assert r["名称 Name"] == "'" + name, kind

    book = load_workbook(tmp_path / f"settlement-{OP}-{DAY}.xlsx")
    for ws in book.worksheets:
        for cells in ws.iter_rows():
            for cell in cells:
                assert cell.data_type != "f", (ws.title, cell.coordinate, cell.value)  # no formula anywhere
                if cell.data_type == "s":
                    assert not cell.value.startswith(FORMULA_START), (ws.title, cell.coordinate, cell.value)
    sheet = book["by_route"]
    header = [c.value for c in sheet[1]]
    (r1,) = [r for r in sheet.iter_rows(min_row=2) if r[0].value == "R1"]
    name = r1[header.index("名称 Name")]
    assert name.data_type == "s" and name.value == "'" + EVIL_ROUTE
    money = r1[header.index(GROSS)]
    assert money.data_type == "n" and money.value * 100 == gross
    about = {r[0].value: r[1] for r in book["about"].iter_rows(min_row=2)}
    operator_name = about["运营单位名称 Operator name"]
    assert operator_name.value == "'=1+1 Bus Co" and operator_name.data_type == "s"
    assert result.run is not None and not result.provisional  # the reports of a stored clearing run

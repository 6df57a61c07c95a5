"""CSV and XLSX of the settlement tables read back with pandas and openpyxl: sums equal loop sums over the raw rows,
the yuan columns equal the fen beside them, Chinese names survive, CSV starts with a UTF-8 BOM."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pandas as pd
import pytest
from test_reports import OPERATOR, RUN_LINE, driver_name, loop_sums, shift_rows, tables_for

from reports.tables import export_frame, write_settlement_csv, write_settlement_xlsx, yuan_decimal, yuan_text

openpyxl = pytest.importorskip("openpyxl")

MONEY = ("gross", "commission", "net")


def plain_yuan(fen: int) -> str:
    """Expected yuan text, worked out by string slicing rather than divmod."""
    digits = str(abs(fen)).rjust(3, "0")
    return ("-" if fen < 0 else "") + digits[:-2] + "." + digits[-2:]


@pytest.mark.parametrize("fen", [0, 5, 99, 100, 123450, 123456789, -5, -123450, 10**15 + 7])
def test_yuan_forms(fen):
    assert yuan_text(fen) == plain_yuan(fen)
    assert yuan_decimal(fen) == Decimal(plain_yuan(fen))
    assert str(yuan_decimal(fen)) == plain_yuan(fen)  # two places kept, no exponent


def test_csv(tmp_path):
    rows = shift_rows(400, days=3)
    t = tables_for(rows, first=date(2024, 5, 1), last=date(2024, 5, 3), with_day=True)
    files = write_settlement_csv(t, tmp_path / "out")
    names = sorted(p.name for p in files)
    stem = "settlement-BUS1-2024-05-01_2024-05-03"
    assert names == sorted(f"{stem}-{n}.csv" for n in ("by_day", "by_fleet", "by_route", "by_vehicle",
                                                       "by_driver", "taps_by_hour"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temp files left
    taps, *fen = loop_sums(rows)
    for key in ("day", "fleet", "route", "vehicle", "driver"):
        path = tmp_path / "out" / f"{stem}-by_{key}.csv"
        raw = path.read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf")  # BOM: Excel on Windows then reads UTF-8
        df = pd.read_csv(path, encoding="utf-8-sig", dtype={f"{c}_yuan": str for c in MONEY})
        expected_cols = [key] + ([] if key == "day" else ["name"]) + ["taps"]
        for c in MONEY:
            expected_cols += [c, f"{c}_yuan"]
        assert list(df.columns) == expected_cols
        assert int(df["taps"].sum()) == taps
        for c, total in zip(MONEY, fen):
            assert int(df[c].sum()) == total
            assert list(df[f"{c}_yuan"]) == [plain_yuan(int(v)) for v in df[c]]
        per_key = loop_sums(rows, key)
        assert len(df) == len(per_key)
        for rec in df.to_dict("records"):
            k = date.fromisoformat(rec[key]) if key == "day" else rec[key]
            assert [rec["taps"], rec["gross"], rec["commission"], rec["net"]] == per_key[k]
    drivers = pd.read_csv(tmp_path / "out" / f"{stem}-by_driver.csv", encoding="utf-8-sig")
    for code, name in zip(drivers["driver"], drivers["name"]):
        assert name == driver_name(int(code[1:]))
    hours = pd.read_csv(tmp_path / "out" / f"{stem}-taps_by_hour.csv", encoding="utf-8-sig")
    assert int(hours["taps"].sum()) == taps


def test_xlsx(tmp_path):
    rows = shift_rows(400)
    path = write_settlement_xlsx(tables_for(rows), tmp_path / "s.xlsx")
    wb = openpyxl.load_workbook(path)
    assert wb.sheetnames == ["about", "by_fleet", "by_route", "by_vehicle", "by_driver", "taps_by_hour"]
    taps, gross, commission, net = loop_sums(rows)
    about = {r[0]: r[1] for r in wb["about"].iter_rows(min_row=2, values_only=True)}
    assert about["operator name"] == OPERATOR
    assert about["clearing"] == RUN_LINE
    assert about["total taps"] == taps and about["total gross (fen)"] == gross
    assert about["total commission (fen)"] == commission and about["total net (fen)"] == net
    for key in ("fleet", "route", "vehicle", "driver"):
        ws = wb[f"by_{key}"]
        header = [c.value for c in ws[1]]
        assert header == [key, "name", "taps", "gross", "gross_yuan", "commission", "commission_yuan", "net",
                          "net_yuan"]
        assert ws.freeze_panes == "A2"
        body = list(ws.iter_rows(min_row=2))
        per_key = loop_sums(rows, key)
        assert len(body) == len(per_key)
        sums = [0, 0, 0, 0]
        for cells in body:
            v = [c.value for c in cells]
            assert [v[2], v[3], v[5], v[7]] == per_key[v[0]]
            for fen_cell, yuan_cell in ((cells[3], cells[4]), (cells[5], cells[6]), (cells[7], cells[8])):
                assert isinstance(fen_cell.value, int)
                assert yuan_cell.number_format == "#,##0.00"
                assert Decimal(str(yuan_cell.value)) * 100 == fen_cell.value  # the stored number is exact
            for i, col in enumerate((2, 3, 5, 7)):
                sums[i] += v[col]
        assert sums == [taps, gross, commission, net]
    names = {r[0]: r[1] for r in wb["by_driver"].iter_rows(min_row=2, values_only=True)}
    assert all(name == driver_name(int(code[1:])) for code, name in names.items())
    # pandas reads the same workbook back too
    df = pd.read_excel(path, sheet_name="by_route")
    assert int(df["gross"].sum()) == gross


def test_amount_only_tables_and_floats_refused():
    frame = pd.DataFrame({"route": ["R1", None], "taps": [3, 1], "amount": [600, 5]})
    out = export_frame(frame, "route", {"R1": "1路"})
    assert list(out.columns) == ["route", "name", "taps", "amount", "amount_yuan"]
    assert list(out["route"]) == ["R1", "(none)"] and list(out["amount_yuan"]) == ["6.00", "0.05"]
    with pytest.raises(TypeError, match="amount"):
        export_frame(frame.assign(amount=[6.0, 0.05]), "route")

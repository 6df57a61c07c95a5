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


KEY_HEADER = {"day": "运营日 Service day", "fleet": "车队 Fleet", "route": "线路 Route", "vehicle": "车辆 Vehicle",
              "driver": "司机 Driver"}
MONEY_HEADER = {"gross": "总收入(元) Gross (yuan)", "commission": "发卡方佣金(元) Issuer commission (yuan)",
                "net": "运营方净收入(元) Net to operator (yuan)"}
TOTAL = "合计 Total"


def fen_of(text) -> int:
    """Yuan as written ("1234.50", "-0.05", or a number read from a workbook) back in fen, by string slicing."""
    text = str(text)
    sign = -1 if text.startswith("-") else 1
    whole, _, cents = text.lstrip("-").partition(".")
    return sign * (int(whole) * 100 + int((cents + "00")[:2]))


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
        df = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
        expected_cols = [KEY_HEADER[key]] + ([] if key == "day" else ["名称 Name"]) + ["笔数 Taps"]
        expected_cols += [MONEY_HEADER[c] for c in MONEY]
        assert list(df.columns) == expected_cols
        body, total = df.iloc[:-1], df.iloc[-1]
        # the totals row, and the body summed here, both equal the loop sums over the raw rows
        assert total[KEY_HEADER[key]] == TOTAL
        assert int(total["笔数 Taps"]) == taps == sum(int(v) for v in body["笔数 Taps"])
        for c, expected in zip(MONEY, fen):
            assert fen_of(total[MONEY_HEADER[c]]) == expected == sum(fen_of(v) for v in body[MONEY_HEADER[c]])
            assert all(v == plain_yuan(fen_of(v)) for v in body[MONEY_HEADER[c]])  # two decimals, no separators
        per_key = loop_sums(rows, key)
        assert len(body) == len(per_key)
        for rec in body.to_dict("records"):
            k = date.fromisoformat(rec[KEY_HEADER[key]]) if key == "day" else rec[KEY_HEADER[key]]
            assert [int(rec["笔数 Taps"]), *(fen_of(rec[MONEY_HEADER[c]]) for c in MONEY)] == per_key[k]
    drivers = pd.read_csv(tmp_path / "out" / f"{stem}-by_driver.csv", encoding="utf-8-sig").iloc[:-1]
    for code, name in zip(drivers["司机 Driver"], drivers["名称 Name"]):
        assert name == driver_name(int(code[1:]))
    hours = pd.read_csv(tmp_path / "out" / f"{stem}-taps_by_hour.csv", encoding="utf-8-sig", dtype=str)
    assert list(hours.columns) == ["时段 Hour (local)", "笔数 Taps"]
    assert int(hours["笔数 Taps"].iloc[-1]) == taps == sum(int(v) for v in hours["笔数 Taps"].iloc[:-1])


def test_xlsx(tmp_path):
    rows = shift_rows(400)
    path = write_settlement_xlsx(tables_for(rows), tmp_path / "s.xlsx")
    wb = openpyxl.load_workbook(path)
    assert wb.sheetnames == ["about", "by_fleet", "by_route", "by_vehicle", "by_driver", "taps_by_hour"]
    taps, gross, commission, net = loop_sums(rows)
    about = {r[0]: r[1] for r in wb["about"].iter_rows(min_row=2, values_only=True)}
    assert about["运营单位名称 Operator name"] == OPERATOR
    assert about["清分 Clearing"] == "清分批次 Clearing" + RUN_LINE.removeprefix("clearing")  # bilingual, as the PDF
    assert about["合计笔数 Total taps"] == taps
    for c, expected in zip(MONEY, (gross, commission, net)):
        assert fen_of(about[f"合计 Total {MONEY_HEADER[c]}"]) == expected
    for key in ("fleet", "route", "vehicle", "driver"):
        ws = wb[f"by_{key}"]
        header = [c.value for c in ws[1]]
        assert header == [KEY_HEADER[key], "名称 Name", "笔数 Taps", *MONEY_HEADER.values()]
        assert ws.freeze_panes == "A2"
        body = list(ws.iter_rows(min_row=2))
        *body, total = body
        per_key = loop_sums(rows, key)
        assert len(body) == len(per_key)
        sums = [0, 0, 0, 0]
        for cells in body:
            v = [c.value for c in cells]
            assert [v[2], *(fen_of(x) for x in v[3:6])] == per_key[v[0]]
            for cell in cells[3:6]:
                assert cell.data_type == "n" and cell.number_format == "#,##0.00"
            sums = [a + b for a, b in zip(sums, [v[2], *(fen_of(x) for x in v[3:6])])]
        assert sums == [taps, gross, commission, net]
        t = [c.value for c in total]
        assert t[0] == TOTAL and [t[2], *(fen_of(x) for x in t[3:6])] == [taps, gross, commission, net]
        assert all(c.font.b for c in total)  # the totals row in bold
    names = {r[0]: r[1] for r in wb["by_driver"].iter_rows(min_row=2, values_only=True) if r[0] != TOTAL}
    assert all(name == driver_name(int(code[1:])) for code, name in names.items())
    # pandas reads the same workbook back too
    df = pd.read_excel(path, sheet_name="by_route")
    assert fen_of(df[MONEY_HEADER["gross"]].iloc[-1]) == gross


def test_amount_only_tables_and_floats_refused():
    frame = pd.DataFrame({"route": ["R1", None], "taps": [3, 1], "amount": [600, 5]})
    out = export_frame(frame, "route", {"R1": "1路"})
    assert list(out.columns) == ["线路 Route", "名称 Name", "笔数 Taps", "金额(元) Amount (yuan)"]
    assert list(out["线路 Route"]) == ["R1", "(none)", TOTAL]
    assert list(out["金额(元) Amount (yuan)"]) == ["6.00", "0.05", "6.05"]
    with pytest.raises(TypeError, match="amount"):
        export_frame(frame.assign(amount=[6.0, 0.05]), "route")

"""The PDF reports read back with pypdf: pages, the header on every page (operator, period, clearing run, page i of
n), totals against sums made here with plain loops over the raw rows, Chinese names in an embedded CJK font,
charts, and a table longer than a page repeating its header row."""

from __future__ import annotations

import dataclasses
import os
import random
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pandas as pd
import pytest
from pypdf import PdfReader

from epurse.cardtypes import CardType
from reports.daily import write_daily_pdf
from reports.monthly import write_monthly_pdf
from reports.pdf import CJK_FONT_FILES
from reports.settlement_doc import ClearingRun, SettlementTables
from reports.settlement_pdf import write_settlement_pdf
from reports.shift_slip import ShiftSlip, VehicleDay, write_shift_pdf, write_vehicle_day_pdf
from reports.tables import write_settlement_csv, write_settlement_xlsx

DAY = date(2024, 5, 2)
RUN = ClearingRun("2024-05-02/3", datetime(2024, 5, 3, 1, 15, 30, tzinfo=UTC))
RUN_LINE = "clearing run 2024-05-02/3 of 2024-05-03 01:15 UTC"  # a month's paper with a run id of another form
DAY_RUN_LINE = "清分批次 Clearing run 2024-05-02/3 of 2024-05-03 01:15 UTC"  # the daily header: both languages
LOCAL_RUN_LINE = "clearing run 2024-05-02/3 of 2024-05-03 09:15 Asia/Shanghai"  # a shift's or vehicle's paper
GENERATED = datetime(2024, 5, 3, 1, 16, tzinfo=UTC)
OPERATOR = "城市公交一公司"
SURNAMES = "王李张刘陈杨黄赵吴周"
GIVEN = "伟芳娜敏静丽强磊军洋"
HAVE_WQY = any(os.path.exists(p) for p in CJK_FONT_FILES)
HEADING = {"day": "按日 By day", "fleet": "按车队 By fleet", "route": "按线路 By route", "vehicle": "按车辆 By vehicle",
           "driver": "按司机 By driver"}


GROSS, COMMISSION, NET = ("总收入(元) Gross (yuan)", "发卡方佣金(元) Issuer commission (yuan)",
                          "运营方净收入(元) Net to operator (yuan)")


def in_fen(value) -> int:
    """A yuan amount as a spreadsheet holds it ("-12.50" in a CSV, a number in an XLSX) in fen, by string slicing."""
    text = str(value)
    sign = -1 if text.startswith("-") else 1
    whole, _, cents = text.lstrip("-").partition(".")
    return sign * (int(whole) * 100 + int((cents + "00")[:2]))


def money(fen: int) -> str:
    """The expected display, worked out differently from the code: by string slicing."""
    digits = str(abs(fen)).rjust(3, "0")
    whole, cents = digits[:-2], digits[-2:]
    groups = []
    while whole:
        groups.insert(0, whole[-3:])
        whole = whole[:-3]
    return ("-" if fen < 0 else "") + ",".join(groups) + "." + cents


def thousands(n: int) -> str:
    s = str(n)
    out = ""
    while len(s) > 3:
        out = "," + s[-3:] + out
        s = s[:-3]
    return s + out


def driver_name(i: int) -> str:
    return SURNAMES[i % 10] + GIVEN[i // 10 % 10]


def shift_rows(n: int, *, routes: int = 6, vehicles: int = 12, drivers: int = 20, days: int = 1, seed: int = 1):
    """Settlement rows as clearing would hand them over: one per (day, vehicle, driver, route, hour)."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        v = rnd.randrange(vehicles)
        taps = rnd.randint(0, 90)
        gross = taps * rnd.choice([100, 150, 200]) + rnd.randint(0, 99)
        commission = gross * 6 // 1000
        rows.append({"day": date(2024, 5, 1) + timedelta(days=rnd.randrange(days)),
                     "fleet": f"F{v % 3}", "route": f"R{rnd.randrange(routes) + 1}", "vehicle": f"V{v:03d}",
                     "driver": f"D{rnd.randrange(drivers):04d}", "hour": rnd.choice([5, 7, 8, 12, 17, 18, 23, 1]),
                     "taps": taps, "gross": gross, "commission": commission, "net": gross - commission})
    return rows


def group(rows, key):
    """The input frame for one breakdown (what clearing hands the report)."""
    df = pd.DataFrame(rows)
    return (df.groupby(key, sort=True)[["taps", "gross", "commission", "net"]].sum().reset_index()
            .astype({"taps": "int64", "gross": "int64", "commission": "int64", "net": "int64"}))


def loop_sums(rows, key=None):
    """Independent sums: {key value: [taps, gross, commission, net]} (or one list for key None)."""
    out: dict = {}
    for r in rows:
        k = r[key] if key else None
        acc = out.setdefault(k, [0, 0, 0, 0])
        acc[0] += r["taps"]
        acc[1] += r["gross"]
        acc[2] += r["commission"]
        acc[3] += r["net"]
    return out if key else out[None]


def tables_for(rows, *, first=DAY, last=DAY, with_day=False, drivers=20, run=RUN) -> SettlementTables:
    hours = pd.DataFrame(rows).groupby("hour")["taps"].sum().reset_index()
    return SettlementTables(
        operator="BUS1", operator_name=OPERATOR, first_day=first, last_day=last,
        by_route=group(rows, "route"), by_vehicle=group(rows, "vehicle"), by_driver=group(rows, "driver"),
        by_fleet=group(rows, "fleet"), by_day=group(rows, "day") if with_day else None,
        taps_by_hour=hours.astype("int64"), run=run, generated_at=GENERATED,
        names={"route": {f"R{i}": f"{i}路 环线" for i in range(1, 7)},
               "driver": {f"D{i:04d}": driver_name(i) for i in range(drivers)},
               "vehicle": {f"V{i:03d}": f"沪A-{i:05d}" for i in range(12)},
               "fleet": {"F0": "第一车队", "F1": "第二车队", "F2": "Night fleet"}})


def pages(path) -> list[str]:
    return [p.extract_text() for p in PdfReader(path).pages]


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


TOTAL = "合计 Total"


def total_rows(texts: list[str], width: int, label: str = TOTAL) -> list[list[str]]:
    """The figures after each total cell (pypdf gives one cell a line)."""
    all_lines = [ln for t in texts for ln in lines(t)]
    return [all_lines[i + 1:i + 1 + width] for i, ln in enumerate(all_lines) if ln == label]


def assert_headers(texts: list[str], period: str, run_line: str = DAY_RUN_LINE, operator: str = OPERATOR):
    n = len(texts)
    for i, text in enumerate(texts, start=1):
        flat = text.replace("\n", "")
        assert operator in flat, f"page {i}: no operator"
        assert period in flat, f"page {i}: no period"
        assert run_line in flat, f"page {i}: no clearing run"
        assert f"Page {i} of {n}" in flat, f"page {i}: no page number"


def cjk_fonts_embedded(path) -> set[str]:
    """BaseFont names of TrueType fonts with an embedded font file (FontFile2), on any page."""
    found = set()
    for page in PdfReader(path).pages:
        for font in page["/Resources"]["/Font"].values():
            font = font.get_object()
            descriptor = font.get("/FontDescriptor")
            if descriptor is not None and "/FontFile2" in descriptor.get_object():
                found.add(str(font["/BaseFont"]))
    return found


def test_daily_report(tmp_path):
    rows = shift_rows(300)
    out = write_daily_pdf(tables_for(rows), tmp_path / "d" / "daily.pdf")
    assert [p.name for p in out.parent.iterdir()] == ["daily.pdf"]  # no temp file left
    texts = pages(out)
    assert_headers(texts, "service day 2024-05-02")
    assert "结算日报 Daily settlement" in texts[0]

    taps, gross, commission, net = loop_sums(rows)
    assert commission > 0 and gross > 1_000_000  # thousands separators and three columns exercised
    expected = [thousands(taps), money(gross), money(commission), money(net)]
    totals = total_rows(texts, 4)
    assert len(totals) == 4  # fleet, route, vehicle, driver
    assert all(t == expected for t in totals), (totals, expected)
    flat = "".join(texts).replace("\n", " ")
    assert (f"{thousands(taps)} taps, gross {money(gross)} yuan, issuer commission {money(commission)} yuan, "
            f"net to the operator {money(net)} yuan") in flat
    for key in ("fleet", "route", "vehicle", "driver"):
        assert HEADING[key] in flat
        all_lines = [ln for t in texts for ln in lines(t)]
        for code, (k_taps, k_gross, k_comm, k_net) in loop_sums(rows, key).items():
            i = all_lines.index(code, all_lines.index(HEADING[key]))
            row = all_lines[i + 1:i + 6]
            assert row[-4:] == [thousands(k_taps), money(k_gross), money(k_comm), money(k_net)], (code, row)
    assert "WARNING" not in flat


def test_chinese_names_and_the_font_embedded(tmp_path):
    rows = shift_rows(200)
    out = write_daily_pdf(tables_for(rows), tmp_path / "zh.pdf")
    flat = "".join(pages(out))
    for d in {r["driver"] for r in rows}:
        assert driver_name(int(d[1:])) in flat
    assert "沪A-00003" in flat and "第一车队" in flat and "3路 环线" in flat and OPERATOR in flat
    if not HAVE_WQY:
        pytest.skip("fonts-wqy-microhei not installed: Chinese falls back to STSong-Light (not embedded)")
    embedded = cjk_fonts_embedded(out)
    assert any("WenQuanYi" in name for name in embedded), embedded


def test_charts(tmp_path):
    rows = shift_rows(300)
    out = write_daily_pdf(tables_for(rows), tmp_path / "charts.pdf")
    reader = PdfReader(out)
    first = lines(reader.pages[0].extract_text())
    assert "Revenue by route (gross, yuan)" in first and "Taps by hour" in first
    # each bar carries its route's gross at its end: all six routes, worked out here
    for _t, gross, _c, _n in loop_sums(rows, "route").values():
        assert money(gross) in first
    # the hour axis in service-day order from the 03:00 cut-off; the busiest hour's count above its column
    axis = [ln for ln in first if re.fullmatch(r"\d\d", ln)]
    assert axis[:24] == [f"{(3 + i) % 24:02d}" for i in range(24)]
    by_hour: dict[int, int] = {}
    for r in rows:
        by_hour[r["hour"]] = by_hour.get(r["hour"], 0) + r["taps"]
    assert thousands(max(by_hour.values())) in first
    content = reader.pages[0].get_contents().get_data()
    assert b".184314 .419608 .603922 rg" in content  # the bars' fill colour (#2f6b9a)
    assert content.count(b" re") >= 6 + 8  # rectangles: at least a bar per route and a column per busy hour


def test_long_table_repeats_its_header_on_every_page(tmp_path):
    drivers = 400
    rows = shift_rows(3000, drivers=drivers, seed=2)
    out = write_daily_pdf(tables_for(rows, drivers=drivers), tmp_path / "long.pdf")
    texts = pages(out)
    assert len(texts) >= 5
    assert_headers(texts, "service day 2024-05-02")
    driver_pages = [i for i, t in enumerate(texts) if re.search(r"^D\d{4}$", t, re.MULTILINE)]
    assert len(driver_pages) >= 3
    header = ["司机 Driver", "名称 Name", "笔数 Taps", "总收入(元)", "Gross", "(yuan)", "发卡方佣金(元)", "Issuer",
              "commission", "(yuan)", "运营方净收入(元)", "Net to operator", "(yuan)"]
    for i in driver_pages:
        page = lines(texts[i])
        first_code = next(j for j, ln in enumerate(page) if re.fullmatch(r"D\d{4}", ln))
        if i == driver_pages[0]:  # the heading "按司机 By driver", then the header row
            assert page[first_code - 14:first_code] == [HEADING["driver"], *header], f"page {i + 1}"
        else:  # a page the table runs onto starts with the header row again
            assert page[:first_code] == header, f"page {i + 1}"
    # every driver shows up exactly once across the pages
    codes = [ln for t in texts for ln in lines(t) if re.fullmatch(r"D\d{4}", ln)]
    assert sorted(codes) == sorted({r["driver"] for r in rows})
    taps, gross, commission, net = loop_sums(rows)
    assert total_rows(texts, 4)[-1] == [thousands(taps), money(gross), money(commission), money(net)]


def test_monthly_report(tmp_path):
    rows = shift_rows(900, days=31, seed=3)
    t = tables_for(rows, first=date(2024, 5, 1), last=date(2024, 5, 31), with_day=True)
    texts = pages(write_monthly_pdf(t, tmp_path / "m.pdf"))
    assert_headers(texts, "month 2024-05 (2024-05-01 to 2024-05-31)", RUN_LINE)
    assert "每日笔数" in texts[0] and "Taps by day" in texts[0]
    taps, gross, commission, net = loop_sums(rows)
    totals = total_rows(texts, 4)
    assert len(totals) == 5  # day, fleet, route, vehicle, driver
    assert all(row == [thousands(taps), money(gross), money(commission), money(net)] for row in totals)
    all_lines = [ln for x in texts for ln in lines(x)]
    for day, (d_taps, d_gross, d_comm, d_net) in loop_sums(rows, "day").items():
        i = all_lines.index(day.isoformat())
        assert all_lines[i + 1:i + 5] == [thousands(d_taps), money(d_gross), money(d_comm), money(d_net)]


def test_monthly_period_that_is_not_a_month_and_bad_input(tmp_path):
    rows = shift_rows(50, days=7)
    t = tables_for(rows, first=date(2024, 5, 1), last=date(2024, 5, 7), with_day=True, run=None)
    texts = pages(write_monthly_pdf(t, tmp_path / "week.pdf"))
    assert_headers(texts, "service days 2024-05-01 to 2024-05-07",
                   run_line="ad hoc clearing (no stored run) of 2024-05-03 01:16 UTC")
    with pytest.raises(ValueError, match="one service day"):
        write_daily_pdf(t, tmp_path / "x.pdf")
    bad = tables_for(rows)
    bad.by_route["gross"] = bad.by_route["gross"] / 100  # yuan as float: money rounded somewhere
    with pytest.raises(TypeError, match="gross"):
        write_daily_pdf(bad, tmp_path / "y.pdf")
    naive = SettlementTables(operator="B", operator_name="B", first_day=DAY, last_day=DAY,
                             by_route=t.by_route, by_vehicle=t.by_vehicle, by_driver=t.by_driver,
                             generated_at=datetime(2024, 5, 3))
    with pytest.raises(ValueError, match="timezone-aware"):
        write_daily_pdf(naive, tmp_path / "z.pdf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["week.pdf"]


def test_disagreeing_tables_are_flagged(tmp_path):
    rows = shift_rows(100)
    t = tables_for(rows)
    t.by_driver.loc[0, "gross"] += 1  # one fen lost somewhere
    assert "WARNING: the tables below do not add up" in "".join(pages(write_daily_pdf(t, tmp_path / "w.pdf")))


def test_empty_day(tmp_path):
    empty = pd.DataFrame({"route": pd.Series([], dtype=str), "taps": pd.Series([], dtype="int64"),
                          "gross": pd.Series([], dtype="int64")})
    t = SettlementTables(operator="B", operator_name="Quiet Bus", first_day=DAY, last_day=DAY, by_route=empty,
                         by_vehicle=empty.rename(columns={"route": "vehicle"}),
                         by_driver=empty.rename(columns={"route": "driver"}), run=RUN, generated_at=GENERATED)
    texts = pages(write_daily_pdf(t, tmp_path / "e.pdf"))
    assert_headers(texts, "service day 2024-05-02", operator="Quiet Bus")
    assert total_rows(texts, 2) == [["0", "0.00"]] * 3


# -- adjustments for earlier days and the payable line ------------------------------------------------------

# What a run carries besides its day, as clearing hands it over: late taps by (for_day, route), a clerk's
# reconciliation adjustments by item (taps 0; one negative: the issuer paid 1.50 yuan less than we counted).
ADJUSTMENT_ROWS = [
    {"kind": "late taps", "for_day": date(2024, 4, 30), "key": "R2", "taps": 2, "gross": 350, "commission": 2,
     "net": 348},
    {"kind": "late taps", "for_day": date(2024, 5, 1), "key": "R1", "taps": 5, "gross": 1_000, "commission": 6,
     "net": 994},
    {"kind": "late taps", "for_day": date(2024, 5, 1), "key": "R5", "taps": 1, "gross": 200, "commission": 1,
     "net": 199},
    {"kind": "reconciliation", "for_day": date(2024, 4, 29), "key": "17", "taps": 0, "gross": 12_345,
     "commission": 74, "net": 12_271, "name": "issuer amount differs"},
    {"kind": "reconciliation", "for_day": date(2024, 5, 1), "key": "23", "taps": 0, "gross": -150, "commission": -1,
     "net": -149, "name": "issuer missing in farebox"},
]
ADJ_COLUMNS = ["kind", "for_day", "key", "taps", "gross", "commission", "net"]


def adjustment_frame(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=[*ADJ_COLUMNS, "name"])
    return frame.astype({c: "int64" for c in ("taps", "gross", "commission", "net")})


def with_adjustments(t: SettlementTables, rows) -> SettlementTables:
    return dataclasses.replace(t, adjustments=adjustment_frame(rows))


def plus(a: int, b: int) -> str:
    return f"{money(a)} + " if b >= 0 else f"{money(a)} - "


def test_adjustments_table_and_the_payable_line_add_up(tmp_path):
    rows = shift_rows(300)
    t = with_adjustments(tables_for(rows), ADJUSTMENT_ROWS)
    texts = pages(write_daily_pdf(t, tmp_path / "adj.pdf"))
    assert_headers(texts, "service day 2024-05-02")
    flat = " ".join(texts).replace("\n", " ")

    # Sums worked out here, with plain loops over the rows handed in.
    day_taps, day_gross, day_comm, day_net = loop_sums(rows)
    adj = [0, 0, 0, 0]
    for r in ADJUSTMENT_ROWS:
        for i, c in enumerate(("taps", "gross", "commission", "net")):
            adj[i] += r[c]
    adj_taps, adj_gross, adj_comm, adj_net = adj
    assert adj_taps == 8 and adj_net == 348 + 994 + 199 + 12_271 - 149

    # The day's tables are the day's alone; the adjustments table comes last, its total the sum of its rows.
    totals = total_rows(texts, 4)
    assert len(totals) == 5
    day = [thousands(day_taps), money(day_gross), money(day_comm), money(day_net)]
    assert totals[:4] == [day] * 4
    assert totals[4] == [thousands(adj_taps), money(adj_gross), money(adj_comm), money(adj_net)]
    assert "WARNING" not in flat

    # Each carried item on its own row: day, kind, route (with its name) or item (with what it is), figures.
    all_lines = [ln for x in texts for ln in lines(x)]
    start = all_lines.index("以前运营日调整 Adjustments for earlier days")
    assert all_lines[start + 1:start + 7] == ["所属日", "For day", "类别", "Kind", "线路/事项", "Route / item"]
    body = all_lines[start:]
    route_names = t.names["route"]
    for r in ADJUSTMENT_ROWS:
        key = f"{r['key']} {route_names[r['key']]}" if r["kind"] == "late taps" else f"item {r['key']} {r['name']}"
        i = body.index(key)
        assert body[i - 2:i] == [r["for_day"].isoformat(), r["kind"]], key
        assert body[i + 1:i + 5] == [thousands(r["taps"]), money(r["gross"]), money(r["commission"]),
                                     money(r["net"])], key

    # The payable line near the top: day + adjustments = payable, the three figures each worked out here.
    assert (f"Payable to the operator: net of the day {plus(day_net, adj_net)}adjustments for earlier days "
            f"{money(abs(adj_net))} = {money(day_net + adj_net)} yuan (gross {plus(day_gross, adj_gross)}"
            f"{money(abs(adj_gross))} = {money(day_gross + adj_gross)}; issuer commission "
            f"{plus(day_comm, adj_comm)}{money(abs(adj_comm))} = {money(day_comm + adj_comm)}).") in flat
    assert flat.index("Payable to the operator") < flat.index("By fleet")
    assert "应付运营方 Payable to the operator:" in flat
    assert "No adjustments" not in flat


def test_negative_adjustments_read_as_a_subtraction(tmp_path):
    rows = shift_rows(50)
    refund = [{"kind": "reconciliation", "for_day": date(2024, 5, 1), "key": "9", "taps": 0, "gross": -1_234,
               "commission": -7, "net": -1_227, "name": ""}]
    flat = " ".join(pages(write_daily_pdf(with_adjustments(tables_for(rows), refund), tmp_path / "n.pdf")))
    flat = flat.replace("\n", " ")
    _taps, gross, comm, net = loop_sums(rows)
    assert (f"net of the day {money(net)} - adjustments for earlier days 12.27 = {money(net - 1_227)} yuan "
            f"(gross {money(gross)} - 12.34 = {money(gross - 1_234)}; issuer commission {money(comm)} - 0.07 = "
            f"{money(comm - 7)}).") in flat
    assert "item 9" in flat


def test_a_run_without_adjustments_says_so_in_one_line(tmp_path):
    rows = shift_rows(100)
    none = with_adjustments(tables_for(rows), [])
    texts = pages(write_daily_pdf(none, tmp_path / "none.pdf"))
    flat = " ".join(texts).replace("\n", " ")
    net = loop_sums(rows)[3]
    assert ("No adjustments for earlier days: this clearing run carries no late taps and no reconciliation "
            f"adjustments, so the net payable to the operator is the day's net, {money(net)} yuan.") in flat
    assert "Adjustments for earlier days" not in flat and "Payable to the operator:" not in flat
    assert len(total_rows(texts, 4)) == 4
    # Not known (provisional figures, or a caller that did not look): the report claims nothing either way.
    flat = "".join(pages(write_daily_pdf(tables_for(rows), tmp_path / "unknown.pdf")))
    assert "adjustments" not in flat.lower() and "Payable" not in flat


def test_monthly_report_shows_the_days_the_adjustments_and_the_payable(tmp_path):
    rows = shift_rows(600, days=31, seed=4)
    t = with_adjustments(tables_for(rows, first=date(2024, 5, 1), last=date(2024, 5, 31), with_day=True),
                         ADJUSTMENT_ROWS)
    texts = pages(write_monthly_pdf(t, tmp_path / "m.pdf"))
    flat = " ".join(texts).replace("\n", " ")
    taps, gross, _comm, net = loop_sums(rows)
    adj_net = sum(r["net"] for r in ADJUSTMENT_ROWS)
    adj_gross = sum(r["gross"] for r in ADJUSTMENT_ROWS)
    assert f"Period total: {thousands(taps)} taps, gross {money(gross)} yuan" in flat
    assert (f"Payable to the operator: net of the period's days {money(net)} + adjustments for earlier days "
            f"{money(adj_net)} = {money(net + adj_net)} yuan (gross {money(gross)} + {money(adj_gross)} = "
            f"{money(gross + adj_gross)};") in flat
    totals = total_rows(texts, 4)
    assert len(totals) == 6  # day, fleet, route, vehicle, driver, then the adjustments
    assert totals[-1][-1] == money(adj_net)


def test_bad_adjustments_are_refused(tmp_path):
    t = tables_for(shift_rows(20))
    with pytest.raises(ValueError, match="for_day"):
        write_daily_pdf(dataclasses.replace(t, adjustments=adjustment_frame(ADJUSTMENT_ROWS).drop(
            columns="for_day")), tmp_path / "a.pdf")
    floats = adjustment_frame(ADJUSTMENT_ROWS).astype({"net": "float64"})
    with pytest.raises(TypeError, match="net"):
        write_daily_pdf(dataclasses.replace(t, adjustments=floats), tmp_path / "b.pdf")
    odd = adjustment_frame([{**ADJUSTMENT_ROWS[0], "kind": "bonus"}])
    with pytest.raises(ValueError, match="kind"):
        write_daily_pdf(dataclasses.replace(t, adjustments=odd), tmp_path / "c.pdf")
    gross_only = dataclasses.replace(t, by_route=t.by_route[["route", "taps", "gross"]],
                                     by_vehicle=t.by_vehicle[["vehicle", "taps", "gross"]],
                                     by_driver=t.by_driver[["driver", "taps", "gross"]], by_fleet=None,
                                     adjustments=adjustment_frame(ADJUSTMENT_ROWS))
    with pytest.raises(ValueError, match="provisional"):
        write_daily_pdf(gross_only, tmp_path / "d.pdf")
    assert list(tmp_path.iterdir()) == []


def test_adjustments_in_csv_and_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    rows = shift_rows(200)
    t = with_adjustments(tables_for(rows), ADJUSTMENT_ROWS)
    files = write_settlement_csv(t, tmp_path, stem="s")
    path = tmp_path / "s-adjustments.csv"
    assert path in files and path.read_bytes().startswith(b"\xef\xbb\xbf")
    names = {"kind": "类别 Kind", "for_day": "所属运营日 For day", "key": "线路/事项 Route / item", "name": "名称 Name",
             "taps": "笔数 Taps", "gross": GROSS, "commission": COMMISSION, "net": NET}
    df = pd.read_csv(path, encoding="utf-8-sig", dtype={names[c]: str for c in ("key", "gross", "commission", "net")})
    assert list(df.columns) == list(names.values())
    df = df.rename(columns={v: k for k, v in names.items()})
    body, total = df.iloc[:-1], df.iloc[-1]
    got = [(r["kind"], r["for_day"], r["key"], int(r["taps"]), *(in_fen(r[c]) for c in ("gross", "commission", "net")))
           for r in body.to_dict("records")]
    assert got == [(r["kind"], r["for_day"].isoformat(), r["key"], r["taps"], r["gross"], r["commission"],
                    r["net"]) for r in ADJUSTMENT_ROWS]
    assert list(body["net"]) == [money(r["net"]).replace(",", "") for r in ADJUSTMENT_ROWS]
    assert total["kind"] == TOTAL and in_fen(total["net"]) == sum(r["net"] for r in ADJUSTMENT_ROWS)
    assert int(total["taps"]) == sum(r["taps"] for r in ADJUSTMENT_ROWS)
    assert df.loc[df["key"] == "R1", "name"].item() == "1路 环线"
    assert df.loc[df["key"] == "17", "name"].item() == "issuer amount differs"
    # No adjustments: no file (the PDF says so in a line).
    assert not any("adjustments" in p.name for p in write_settlement_csv(with_adjustments(t, []), tmp_path / "e"))

    book = openpyxl.load_workbook(write_settlement_xlsx(t, tmp_path / "s.xlsx"))
    assert book.sheetnames == ["about", "by_fleet", "by_route", "by_vehicle", "by_driver", "adjustments",
                               "taps_by_hour"]
    sheet = list(book["adjustments"].iter_rows(min_row=2, values_only=True))
    assert [in_fen(r[7]) for r in sheet] == [r["net"] for r in ADJUSTMENT_ROWS] + [
        sum(r["net"] for r in ADJUSTMENT_ROWS)]
    about = {r[0]: r[1] for r in book["about"].iter_rows(min_row=2, values_only=True)}
    _taps, gross, comm, net = loop_sums(rows)
    for c, day, heading in (("gross", gross, GROSS), ("commission", comm, COMMISSION), ("net", net, NET)):
        adj = sum(r[c] for r in ADJUSTMENT_ROWS)
        assert in_fen(about[f"调整 Adjustments {heading}"]) == adj
        assert Decimal(str(about[f"应付 Payable {heading}"])) == Decimal(money(day + adj).replace(",", ""))
def test_settlement_pdf_carries_the_run(tmp_path):
    from clearing.settlement import TAP_COLUMNS, settle_day

    start = datetime(2024, 5, 2, 0, 0, tzinfo=UTC)
    taps = pd.DataFrame([{"device_id": "V1", "device_seq": i, "kind": "purchase",
                          "occurred_at": start + timedelta(minutes=i), "operator": "BUS1", "route": "R1",
                          "vehicle": "V1", "driver": "D1", "card_type": 1, "amount": 200} for i in range(30)],
                        columns=list(TAP_COLUMNS))
    s = settle_day(taps, DAY, operator="BUS1")
    hours = pd.DataFrame({"hour": [8], "taps": [30]})  # 00:00-00:29 UTC is 08:00-08:29 in Shanghai
    out = write_settlement_pdf(s, tmp_path / "s.pdf", operator_name="City Bus One", generated_at=GENERATED,
                               run_id=RUN.id, run_at=RUN.at, taps_by_hour=hours)
    texts = pages(out)
    assert_headers(texts, "service day 2024-05-02", operator="City Bus One")
    first = lines(texts[0])
    assert "Taps by hour" in first and "30" in first and money(30 * 200) in first
    assert total_rows(texts, 2) == [["30", money(30 * 200)]] * 4  # card type, route, vehicle, driver


# -- the driver's shift report and the vehicle's day --------------------------------------------------------

FARES = [(1, 200), (2, 100), (1, 200), (3, 0), (2, 100), (1, 150), (4, 200), (1, 123456), (9, 300)]


def by_card_type(fares):
    df = pd.DataFrame(fares, columns=["card_type", "amount"])
    return df.groupby("card_type")["amount"].agg(taps="size", amount="sum").reset_index().astype("int64")


def slip(**kw) -> ShiftSlip:
    base = {"operator_name": OPERATOR, "service_day": DAY, "driver": "D0012", "driver_name": "张伟",
            "vehicle": "V007", "vehicle_name": "沪A-00007", "route": "R1", "route_name": "1路 环线",
            "device_id": "bus0042", "shift_no": 3,
            "signed_in": datetime(2024, 5, 1, 23, 31, tzinfo=UTC),  # 07:31 on the 2nd in Shanghai
            "signed_out": datetime(2024, 5, 2, 7, 5, tzinfo=UTC), "by_card_type": by_card_type(FARES),
            "run": RUN, "generated_at": GENERATED,
            # the back office hands reports epurse's card-type names (reports do not know the card application)
            "card_type_names": {t.value: f"{t.label} {t.label_zh}" for t in CardType}}
    return ShiftSlip(**(base | kw))


def test_shift_report(tmp_path):
    total_taps, total_fen, per_type = 0, 0, {}
    for card_type, fen in FARES:
        total_taps += 1
        total_fen += fen
        per_type[card_type] = per_type.get(card_type, 0) + fen
    texts = pages(write_shift_pdf(slip(declared_taps=total_taps, declared_amount=total_fen),
                                  tmp_path / "shift.pdf"))
    assert len(texts) == 1
    assert_headers(texts, "service day 2024-05-02", LOCAL_RUN_LINE)
    page = lines(texts[0])
    flat = texts[0].replace("\n", "")
    assert "张伟" in flat and "沪A-00007" in flat and "1路 环线" in flat
    assert "2024-05-02 07:31" in flat and "2024-05-02 15:05" in flat and "7 h 34 min" in flat
    assert total_rows(texts, 2) == [[thousands(total_taps), money(total_fen)]]
    assert "student card 学生卡" in flat and "card type 9" in flat
    for card_type, label in ((1, "adult card 普通卡"), (2, "student card 学生卡"), (3, "elderly card 老人卡")):
        i = page.index(label)
        assert page[i + 1:i + 3] == [str(sum(1 for ct, _ in FARES if ct == card_type)), money(per_type[card_type])]
    assert "In balance" in flat and "OUT OF BALANCE" not in flat


def test_shift_report_out_of_balance_and_open(tmp_path):
    received = sum(f for _, f in FARES)
    texts = pages(write_shift_pdf(slip(declared_taps=len(FARES) + 2, declared_amount=received + 400,
                                       signed_out=None), tmp_path / "oob.pdf"))
    flat = " ".join(texts).replace("\n", " ")
    assert "OUT OF BALANCE" in flat and "not signed out" in flat
    assert "difference -2 taps, -4.00 yuan" in flat
    # clearing's own flag wins when given
    flat = "".join(pages(write_shift_pdf(slip(out_of_balance=True), tmp_path / "flag.pdf")))
    assert "OUT OF BALANCE" in flat


def test_vehicle_day(tmp_path):
    t0 = datetime(2024, 5, 1, 22, 0, tzinfo=UTC)  # 06:00 local
    shifts = pd.DataFrame([
        {"shift_no": 1, "driver": "D0001", "route": "R1", "signed_in": t0, "signed_out": t0 + timedelta(hours=8),
         "taps": 412, "amount": 80_150, "out_of_balance": False},
        {"shift_no": 2, "driver": "D0002", "route": "R2", "signed_in": t0 + timedelta(hours=8, minutes=10),
         "signed_out": t0 + timedelta(hours=18, minutes=30), "taps": 388, "amount": 71_020, "out_of_balance": True},
    ])
    routes = pd.DataFrame({"route": ["R1", "R2"], "taps": [412, 388], "amount": [80_150, 71_020]})
    hours = pd.DataFrame({"hour": [6, 7, 8, 12, 17, 23, 0], "taps": [50, 180, 150, 120, 200, 70, 30]})
    day = VehicleDay(operator_name=OPERATOR, service_day=DAY, vehicle="V007", vehicle_name="沪A-00007",
                     shifts=shifts, by_route=routes, taps_by_hour=hours, run=RUN, generated_at=GENERATED,
                     route_names={"R1": "1路 环线", "R2": "2路"}, driver_names={"D0001": "张伟", "D0002": "王芳"})
    texts = pages(write_vehicle_day_pdf(day, tmp_path / "vday.pdf"))
    assert_headers(texts, "service day 2024-05-02", LOCAL_RUN_LINE)
    flat = "".join(texts)
    page = [ln for t in texts for ln in lines(t)]
    assert "Taps by hour" in flat and "张伟" in flat and "王芳" in flat and "1路 环线" in flat
    taps = 412 + 388
    fen = 80_150 + 71_020
    assert total_rows(texts, 2) == [[thousands(taps), money(fen)]] * 2
    assert "06:00" in page and "14:00" in page and "14:10" in page and "00:30 +1d" in page
    assert "OUT OF BALANCE: 1 shift(s)" in flat.replace("\n", "")
    assert ["OUT"] == [ln for ln in page if ln == "OUT"] and "ok" in page


def test_clearing_line_in_both_languages_on_the_daily_pdf_and_the_workbooks_about_sheet(tmp_path):
    """The daily header and the XLSX "清分 Clearing" row say the run plainly in Chinese and English, in the
    operator's zone: one run for a day, a span of runs for a month (reports.monthly.runs_label), an ad hoc
    report said so."""
    import openpyxl

    rows = shift_rows(60, days=2)
    seven = ClearingRun("7", datetime(2024, 5, 2, 20, 7, tzinfo=UTC))
    day = dataclasses.replace(tables_for(rows, run=seven), tz="Asia/Shanghai")
    line = "清分批次 Clearing run 7 of 2024-05-03 04:07 Asia/Shanghai"
    texts = pages(write_daily_pdf(day, tmp_path / "day.pdf"))
    assert all(line in t.replace("\n", "") for t in texts)  # the page header, on every page

    def about(t, name):
        sheet = openpyxl.load_workbook(write_settlement_xlsx(t, tmp_path / name))["about"]
        return {r[0]: r[1] for r in sheet.iter_rows(values_only=True)}["清分 Clearing"]

    assert about(day, "day.xlsx") == line
    month = dataclasses.replace(tables_for(rows, first=date(2024, 5, 1), last=date(2024, 5, 2), with_day=True,
                                           run=ClearingRun("1-2", seven.at)), tz="Asia/Shanghai")
    assert about(month, "month.xlsx") == "清分批次 Clearing runs 1-2, the latest of 2024-05-03 04:07 Asia/Shanghai"
    ad_hoc = dataclasses.replace(day, run=None)
    assert about(ad_hoc, "adhoc.xlsx") == ("临时清分（无存档批次） Ad hoc clearing (no stored run) of "
                                           "2024-05-03 09:16 Asia/Shanghai")

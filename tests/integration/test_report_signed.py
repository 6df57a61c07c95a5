"""The settlement a manager signs, on SQLite and PostgreSQL: a bus company with no fleets, 130 free elderly rides
among its day's fares, the day before cleared too. The day's PDF (downloaded through the clerk's API and written by
``farebox settle``-style ``settle``), its CSVs and its XLSX are read back with pypdf, the csv module and openpyxl and
checked against figures worked out here from the tap table (plain SQL, then Python loops): Chinese headings with
English beside them, the card-type table with the free rides, the commission rate stated, the previous day beside
the day, signature lines, times in the operator's zone named, no fleet table; totals rows and bilingual headers
with the unit. The month's workbook: one sheet per table and a status line saying how many days are cleared and
which are not."""

from __future__ import annotations

import csv
from datetime import UTC, date, datetime, timedelta
from io import BytesIO
from zoneinfo import ZoneInfo

import pytest
from openpyxl import load_workbook
from pypdf import PdfReader
from sqlalchemy import text

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Tap
from backoffice.settle import settle, settle_month

OP = "op_m"
TZ = ZoneInfo("Asia/Shanghai")
RATE_BP = 60
DAY = date(2026, 4, 10)
BEFORE = DAY - timedelta(days=1)
START = datetime(2026, 4, 10, 3, tzinfo=TZ).astimezone(UTC)  # the cut-off, 03:00 local
END = START + timedelta(days=1)
NOW = END + timedelta(hours=1, minutes=7)  # 04:07 on 2026-04-11 in Shanghai, 20:07 UTC the day before
BUSES = [("VAL1", "V1", "R1", "D1"), ("VAL2", "V2", "R2", "D2"), ("VAL3", "V3", "R1", "D3")]
ADULT, STUDENT, ELDERLY = 1, 2, 3
GROSS, COMMISSION, NET = ("总收入(元) Gross (yuan)", "发卡方佣金(元) Issuer commission (yuan)",
                          "运营方净收入(元) Net to operator (yuan)")
TOTAL = "合计 Total"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request):
    engine = make_engine(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url"))
    upgrade(engine)
    at = START - timedelta(days=30)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="示范公交 Demo Bus", at=at)
        registry.add_route(conn, code="R1", operator=OP, name="1路 火车站", flat_fare=200, at=at)
        registry.add_route(conn, code="R2", operator=OP, name="2路 大学城", flat_fare=200, at=at)
        for _dev, vehicle, _route, _driver in BUSES:
            registry.add_vehicle(conn, code=vehicle, operator=OP, plate=f"粤A-{vehicle}", at=at)
        for i, staff in enumerate(("D1", "D2", "D3")):
            registry.add_driver(conn, staff_no=staff, operator=OP, name=f"司机{i + 1}", card_asn=f"{i + 1:020d}", at=at)
        cr.set_commission_rate(conn, operator=OP, rate_bp=RATE_BP, valid_from=date(2026, 1, 1))
    yield engine
    engine.dispose()


def _tap(device, seq, at, vehicle, route, driver, card_type, amount) -> dict:
    return {"device_id": device, "device_seq": seq, "kind": "purchase", "occurred_at": at,
            "received_at": at + timedelta(minutes=2), "operator": OP, "route": route, "vehicle": vehicle,
            "driver": driver, "shift_no": 1, "card_asn": f"{seq:020d}", "card_type": card_type,
            "card_ttc": seq % 0x10000, "amount": amount, "balance_after": 5000,
            "terminal_id": f"0100000000{int(device[-1]):02d}", "terminal_seq": seq, "tac": f"{seq & 0xFFFFFFFF:08X}",
            "reason": ""}


def fares(start: datetime, *, adults: int, students: int, elderly: int, seq0: int) -> list[dict]:
    """A day's purchases spread over the three buses from 06:00 local: adults pay 2.00 (every seventh 2.50),
    students 1.00, the elderly ride free (recorded, 0 fen)."""
    kinds = [(ADULT, 200 + (50 if i % 7 == 0 else 0)) for i in range(adults)]
    kinds += [(STUDENT, 100)] * students + [(ELDERLY, 0)] * elderly
    rows = []
    for i, (card_type, amount) in enumerate(kinds):
        device, vehicle, route, driver = BUSES[i % 3]
        at = start + timedelta(hours=3, seconds=97 * i)
        rows.append(_tap(device, seq0 + i, at, vehicle, route, driver, card_type, amount))
    return rows


def purchases_of(engine, day: date) -> list[dict]:
    """The purchases of service ``day``, read with plain SQL; the 03:00 cut-off applied here."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT occurred_at, card_type, amount FROM tap WHERE operator = :op AND "
                                 "kind = 'purchase'"), {"op": OP}).mappings().all()
    out = []
    for r in rows:
        at = r["occurred_at"]
        at = datetime.fromisoformat(at) if isinstance(at, str) else at
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        if (at.astimezone(TZ) - timedelta(hours=3)).date() == day:
            out.append(dict(r))
    return out


def half_up(gross: int) -> int:
    whole, rest = divmod(gross * RATE_BP, 10_000)
    return whole + (1 if 2 * rest >= 10_000 else 0)


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def in_fen(value) -> int:
    """Yuan as a spreadsheet holds it ("1234.50", or a number read from a workbook) in fen, by string slicing."""
    shown = str(value)
    sign = -1 if shown.startswith("-") else 1
    whole, _, cents = shown.lstrip("-").partition(".")
    return sign * (int(whole) * 100 + int((cents + "00")[:2]))


def lines_of(pdf: bytes) -> list[str]:
    return [ln.strip() for p in PdfReader(BytesIO(pdf)).pages for ln in p.extract_text().splitlines() if ln.strip()]


def test_the_days_paper_for_the_manager(engine, tmp_path):
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), fares(START - timedelta(days=1), adults=150, students=40, elderly=100,
                                                   seq0=1))
        conn.execute(Tap.__table__.insert(), fares(START, adults=200, students=60, elderly=130, seq0=10_000))
    with engine.begin() as conn:  # the nightly job clears the day before, then the day
        settle(conn, operator=OP, day=BEFORE, now=START + timedelta(hours=1))
        result = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=NOW)
    assert result.run is not None and not result.provisional

    # Expected, worked out here from the tap table.
    day, before = purchases_of(engine, DAY), purchases_of(engine, BEFORE)
    by_type: dict[int, list[int]] = {}
    for p in day:
        acc = by_type.setdefault(int(p["card_type"]), [0, 0, 0])
        acc[0] += 1
        acc[1] += 1 if p["amount"] == 0 else 0
        acc[2] += p["amount"]
    assert by_type[ELDERLY][:2] == [130, 130] and by_type[ELDERLY][2] == 0  # 130 free elderly rides
    gross = sum(p["amount"] for p in day)
    commission = half_up(gross)
    taps_before, gross_before = len(before), sum(p["amount"] for p in before)
    commission_before = half_up(gross_before)

    # The PDF as the clerk downloads it through the API: the same file settle wrote.
    from fastapi.testclient import TestClient

    from backoffice.web.app import create_app
    from backoffice.web.auth import Principal, TokenStore

    app = create_app(engine, tokens=TokenStore(tokens={"fbx_c": Principal("clerk1", "clerk", OP)}),
                     clock=lambda: NOW, migrate=False)
    with TestClient(app) as client:
        got = client.get(f"/api/v1/operators/{OP}/reports/days/{DAY}/settlement?format=pdf",
                         headers={"Authorization": "Bearer fbx_c"})
        card_csv = client.get(f"/api/v1/operators/{OP}/reports/days/{DAY}/settlement?format=csv&table=card_type",
                              headers={"Authorization": "Bearer fbx_c"})
        no_fleet = client.get(f"/api/v1/operators/{OP}/reports/days/{DAY}/settlement?format=csv&table=fleet",
                              headers={"Authorization": "Bearer fbx_c"})
    assert got.status_code == 200 and got.headers["content-type"] == "application/pdf"
    lines = lines_of(got.content)
    flat = " ".join(lines)
    # Headings in Chinese with English beside them.
    for heading in ("结算日报 Daily settlement — 示范公交 Demo Bus", "按卡类 By card type (优惠 concessions)",
                    "按线路 By route", "按车辆 By vehicle", "按司机 By driver", "与前一日比较 Compared with the previous day",
                    "签字 Signatures"):
        assert heading in flat, heading
    # No fleet table: no vehicle is in a fleet (and the API says there is no such table).
    assert "By fleet" not in flat and "车队" not in flat and "not in a fleet" not in flat
    assert no_fleet.status_code == 404
    # Generated in the operator's zone, named; the run's time too.
    assert "生成时间 Generated: 2026-04-11 04:07 Asia/Shanghai." in flat
    assert f"clearing run {result.run.id} of 2026-04-11 04:07 Asia/Shanghai" in flat
    assert "UTC" not in flat
    # The commission rate, and the day's figures.
    assert "发卡方佣金率 Issuer commission rate: 0.60% of gross (60 basis points)." in flat
    assert (f"{len(day)} taps, gross {yuan(gross)} yuan, issuer commission {yuan(commission)} yuan, net to the "
            f"operator {yuan(gross - commission)} yuan") in flat
    # The card-type table: each type's taps, free rides and gross as counted here; the total row.
    start = lines.index("按卡类 By card type (优惠 concessions)")
    for card_type, label in ((ADULT, "普通卡 adult card"), (STUDENT, "学生卡 student card"),
                             (ELDERLY, "老人卡 elderly card")):
        i = lines.index(label, start)
        taps, free, fen = by_type[card_type]
        assert lines[i + 1:i + 4] == [f"{taps:,}", f"{free:,}", yuan(fen)], label
    i = lines.index(TOTAL, start)
    assert lines[i + 1:i + 4] == [f"{len(day):,}", "130", yuan(gross)]
    # The previous day beside the day: figures, change and change in percent.
    start = next(j for j, ln in enumerate(lines) if ln.startswith("与前一日比较 Compared with the previous day"))
    assert "(2026-04-09)" in lines[start]
    i = lines.index("笔数 Taps", start)
    tenths, rest = divmod((len(day) - taps_before) * 1000, taps_before)  # per mille, rounded half up
    tenths += 1 if 2 * rest >= taps_before else 0
    assert lines[i + 1:i + 5] == [f"{len(day):,}", f"{taps_before:,}", f"+{len(day) - taps_before:,}",
                                  f"+{tenths // 10}.{tenths % 10}%"]
    i = lines.index("总收入(元) Gross (yuan)", start)
    assert lines[i + 1:i + 4] == [yuan(gross), yuan(gross_before), "+" + yuan(gross - gross_before)]
    i = lines.index("发卡方佣金(元) Commission (yuan)", start)
    assert lines[i + 1:i + 3] == [yuan(commission), yuan(commission_before)]
    # Signature lines at the foot.
    for role in ("制表 Prepared by", "审核 Checked by", "批准 Approved by"):
        assert role in lines
    assert lines.count("日期 Date") == 3

    # The card-type CSV (through the API): bilingual headers with the unit, a totals row, yuan.
    assert card_csv.status_code == 200
    rows = list(csv.DictReader(card_csv.content.decode("utf-8-sig").splitlines()))
    assert list(rows[0]) == ["卡类 Card type", "名称 Name", "笔数 Taps", "免费笔数 Free rides", GROSS, COMMISSION, NET]
    *body, total = rows
    assert {int(r["卡类 Card type"]): [int(r["笔数 Taps"]), int(r["免费笔数 Free rides"]), in_fen(r[GROSS])]
            for r in body} == by_type
    assert total["卡类 Card type"] == TOTAL
    assert (int(total["笔数 Taps"]), int(total["免费笔数 Free rides"]), in_fen(total[GROSS]), in_fen(total[COMMISSION]),
            in_fen(total[NET])) == (len(day), 130, gross, commission, gross - commission)
    assert not (tmp_path / f"settlement-{OP}-{DAY}-by_fleet.csv").exists()

    # The XLSX settle wrote beside the PDF: about (status first), comparison, one sheet per table, totals in bold.
    book = load_workbook(tmp_path / f"settlement-{OP}-{DAY}.xlsx")
    assert book.sheetnames == ["about", "comparison", "by_card_type", "by_route", "by_vehicle", "by_driver",
                               "taps_by_hour"]
    about = list(book["about"].iter_rows(values_only=True))
    assert about[1] == ("结算状态 Status", f"cleared in clearing run {result.run.id} of 2026-04-11 04:07 Asia/Shanghai.")
    about = dict(about[1:])
    assert about["生成时间 Generated"] == "2026-04-11 04:07 Asia/Shanghai"
    assert in_fen(about[f"合计 Total {GROSS}"]) == gross and about["合计笔数 Total taps"] == len(day)
    comparison = {r[0]: r[1:] for r in book["comparison"].iter_rows(min_row=2, values_only=True)}
    assert comparison["笔数 Taps"][:3] == (len(day), taps_before, len(day) - taps_before)
    assert [in_fen(v) for v in comparison[GROSS][:3]] == [gross, gross_before, gross - gross_before]
    for name in ("by_card_type", "by_route", "by_vehicle", "by_driver"):
        ws = book[name]
        last = [c for c in ws[ws.max_row]]
        assert last[0].value == TOTAL and all(c.font.b for c in last), name
        header = [c.value for c in ws[1]]
        assert in_fen(last[header.index(GROSS)].value) == gross, name
        assert sum(in_fen(r[header.index(GROSS)]) for r in ws.iter_rows(min_row=2, max_row=ws.max_row - 1,
                                                                         values_only=True)) == gross, name


def test_the_months_workbook_says_which_days_are_cleared(engine, tmp_path):
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), fares(START - timedelta(days=1), adults=30, students=5, elderly=7, seq0=1))
        conn.execute(Tap.__table__.insert(), fares(START, adults=40, students=6, elderly=9, seq0=10_000))
    with engine.begin() as conn:
        settle(conn, operator=OP, day=BEFORE, now=START + timedelta(hours=1))
        settle(conn, operator=OP, day=DAY, now=NOW)
    with engine.begin() as conn:
        month = settle_month(conn, operator=OP, year=2026, month=4, reports_dir=tmp_path, now=NOW)
    gross = sum(p["amount"] for d in (BEFORE, DAY) for p in purchases_of(engine, d))
    free = sum(1 for d in (BEFORE, DAY) for p in purchases_of(engine, d) if p["amount"] == 0)
    assert free == 7 + 9

    status = ("2 of 30 days cleared (2026-04-09 to 2026-04-10); 28 not cleared and not counted here: "
              "2026-04-01 to 2026-04-08, 2026-04-11 to 2026-04-30.")
    book = load_workbook(tmp_path / f"settlement-{OP}-2026-04.xlsx")
    # No comparison sheet (March has no cleared day), no adjustments sheet (the runs carry none), no fleet sheet.
    assert book.sheetnames == ["about", "by_day", "by_card_type", "by_route", "by_vehicle", "by_driver"]
    about = list(book["about"].iter_rows(values_only=True))
    assert about[1] == ("结算状态 Status", status)
    assert dict(about[1:])["生成时间 Generated"] == "2026-04-11 04:07 Asia/Shanghai"
    days = list(book["by_day"].iter_rows(min_row=2, values_only=True))
    assert [str(r[0])[:10] for r in days] == ["2026-04-09", "2026-04-10", TOTAL]  # days as date cells
    assert in_fen(days[-1][2]) == gross  # day, taps, gross (yuan), ...
    types = {r[0]: r for r in book["by_card_type"].iter_rows(min_row=2, values_only=True)}
    assert types[ELDERLY][1:4] == ("老人卡 elderly card", 16, 16) and types[TOTAL][3] == 16

    flat = " ".join(lines_of(month.pdf.read_bytes()))
    assert "结算月报 Monthly settlement" in flat and f"结算状态 Status: {status}" in flat
    assert "与上月比较 Compared with the previous month (2026-03)" in flat
    assert "The previous month, 2026-03, has no cleared figures: nothing to compare with." in flat

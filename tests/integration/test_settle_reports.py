"""Settlement through stored clearing runs, on SQLite and PostgreSQL: a demo-like day (four buses in two fleets and
one without, shifts, student and elderly fares, a refused card, taps after midnight before the cut-off, a tap of
the day before and one of the day after) settled by ``backoffice.settle.settle`` and ``farebox settle``; its
figures, PDF, CSV and XLSX checked against plain loops over the tap table read back with SQL; a month from the
stored runs. Every expected number is worked out here, never taken from the code under test."""

from __future__ import annotations

import csv
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from openpyxl import load_workbook
from pypdf import PdfReader
from sqlalchemy import func, select, text

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import ClearingRun, Tap
from backoffice.settle import settle, settle_month
from clearing.reconcile import ISSUER_COLUMNS, write_issuer_file
from farebox.cli import main

OP = "op_s"
TZ = ZoneInfo("Asia/Shanghai")
RATE_BP = 60
DAY = date(2026, 4, 10)
START = datetime(2026, 4, 10, 3, tzinfo=TZ).astimezone(UTC)  # the cut-off, 03:00 local
END = START + timedelta(days=1)
ROUTES = {"R1": "1路 火车站", "R2": "2路 大学城", "R3": "3路"}
BUSES = [("VAL1", "V1", "R1", "D1"), ("VAL2", "V2", "R2", "D2"), ("VAL3", "V3", "R1", "D3"),
         ("VAL4", "V4", "R3", "D1")]
FLEET_OF = {"V1": "F_EAST", "V2": "F_EAST", "V3": "F_WEST"}  # V4 in no fleet: counted under ""
FARES = {1: 200, 2: 100, 3: 0}  # adult, student (half), elderly (free, still recorded)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")


@pytest.fixture
def engine(url):
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="示范公交 Demo Bus", at=START - timedelta(days=30))
        for code, name in ROUTES.items():
            registry.add_route(conn, code=code, operator=OP, name=name, flat_fare=200, at=START - timedelta(days=30))
        for _dev, vehicle, _route, _driver in BUSES:
            registry.add_vehicle(conn, code=vehicle, operator=OP, plate=f"粤A-{vehicle}",
                                 at=START - timedelta(days=30))
        for i, staff in enumerate(("D1", "D2", "D3")):
            registry.add_driver(conn, staff_no=staff, operator=OP, name=f"司机{i + 1}", card_asn=f"{i + 1:020d}",
                                at=START - timedelta(days=30))
        cr.add_fleet(conn, code="F_EAST", operator=OP, name="东站车队")
        cr.add_fleet(conn, code="F_WEST", operator=OP, name="西站车队")
        for vehicle, fleet in FLEET_OF.items():
            cr.assign_vehicle(conn, vehicle=vehicle, fleet=fleet, valid_from=date(2026, 1, 1))
        cr.set_commission_rate(conn, operator=OP, rate_bp=RATE_BP, valid_from=date(2026, 1, 1))
    yield engine
    engine.dispose()


def _row(device, seq, kind, at, vehicle, route, driver, *, card_type=1, amount=0, shift_no=1) -> dict:
    return {"device_id": device, "device_seq": seq, "kind": kind, "occurred_at": at,
            "received_at": at + timedelta(minutes=3), "operator": OP, "route": route, "vehicle": vehicle,
            "driver": driver, "shift_no": shift_no, "card_asn": f"{hash((device, seq)) & 0xFFFFFFFF:020d}",
            "card_type": card_type, "card_ttc": seq % 0x10000, "amount": amount, "balance_after": 5000,
            "terminal_id": f"0100000000{int(device[-1]):02d}", "terminal_seq": 1000 + seq, "tac": f"{seq:08X}",
            "reason": ""}


def day_rows(start: datetime, riders: int = 45) -> list[dict]:
    """One service day of the four buses: shift open, riders from 06:00 local to past midnight, a refused card,
    shift close."""
    rows = []
    for b, (device, vehicle, route, driver) in enumerate(BUSES):
        seq = int(start.timestamp()) // 86400 * 1000  # a new range of device sequences each day
        rows.append(_row(device, seq := seq + 1, "shift_open", start + timedelta(hours=2, minutes=b), vehicle,
                         route, driver))
        n = riders + 7 * b
        for i in range(n):
            card_type = (1, 1, 2, 1, 3)[(i + b) % 5]
            at = start + timedelta(hours=3, minutes=1250 * i // n + b)  # the last ones after midnight, before 03:00
            rows.append(_row(device, seq := seq + 1, "purchase", at, vehicle, route, driver, card_type=card_type,
                             amount=FARES[card_type] + (50 if i % 7 == 0 else 0)))
        rows.append(_row(device, seq := seq + 1, "denied", start + timedelta(hours=9, minutes=b), vehicle, route,
                         driver))
        rows.append(_row(device, seq + 1, "shift_close", start + timedelta(hours=23, minutes=50), vehicle, route,
                         driver))
    return rows


def store(engine, rows):
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), rows)


def stored_purchases(engine, day: date) -> list[dict]:
    """The purchases of service ``day`` from the tap table, by plain SQL and the cut-off rule worked out here."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT occurred_at, route, vehicle, driver, amount, kind FROM tap "
                                 "WHERE operator = :op"), {"op": OP}).mappings().all()
    out = []
    for r in rows:
        at = r["occurred_at"]
        at = datetime.fromisoformat(at) if isinstance(at, str) else at  # SQLite hands back text
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        if r["kind"] == "purchase" and (at.astimezone(TZ) - timedelta(hours=3)).date() == day:
            out.append({**r, "occurred_at": at, "fleet": FLEET_OF.get(r["vehicle"], "")})
    return out


def sums(purchases, key) -> dict:
    out = {}
    for p in purchases:
        out[p[key]] = out.get(p[key], 0) + p["amount"]
    return out


def half_up_commission(gross: int) -> int:
    whole, rest = divmod(gross * RATE_BP, 10_000)
    return whole + (1 if 2 * rest >= 10_000 else 0)


def yuan(fen: int) -> str:
    return f"{fen // 100:,}.{fen % 100:02d}"


GROSS, COMMISSION, NET = ("总收入(元) Gross (yuan)", "发卡方佣金(元) Issuer commission (yuan)",
                          "运营方净收入(元) Net to operator (yuan)")
TOTAL = "合计 Total"


def in_fen(value) -> int:
    """A yuan amount as a spreadsheet holds it ("1234.50" in a CSV, a number in an XLSX) back in fen, by string
    slicing: "-0.05" -> -5."""
    text = str(value)
    sign = -1 if text.startswith("-") else 1
    whole, _, cents = text.lstrip("-").partition(".")
    return sign * (int(whole) * 100 + int((cents + "00")[:2]))


def read_csv(path) -> tuple[list[dict], dict]:
    """The rows of a report CSV and its totals row (the last one, labelled "合计 Total")."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert next(iter(rows[-1].values())) == TOTAL, rows[-1]
    return rows[:-1], rows[-1]


def test_a_demo_like_day_is_settled_from_its_stored_run_with_reports_naming_it(engine, tmp_path):
    rows = day_rows(START)
    rows.append(_row("VAL9", 1, "purchase", START - timedelta(minutes=10), "V1", "R1", "D1", amount=300))  # day before
    rows.append(_row("VAL9", 2, "purchase", END + timedelta(minutes=10), "V1", "R1", "D1", amount=400))  # day after
    store(engine, rows)
    purchases = stored_purchases(engine, DAY)
    gross = sum(p["amount"] for p in purchases)
    commission = half_up_commission(gross)
    assert gross > 0 and len(purchases) == sum(1 for r in rows if r["kind"] == "purchase") - 2

    with engine.begin() as conn:
        result = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=END + timedelta(hours=1))
    run = result.run
    assert run is not None and not result.provisional
    s = result.settlement
    assert (s.amount, s.taps) == (gross, len(purchases)) and s.totals_agree()
    assert (run.totals["day_gross"], run.totals["day_commission"], run.totals["day_net"]) == \
        (gross, commission, gross - commission)
    for key in ("route", "vehicle", "driver"):
        table = getattr(s, f"by_{key}")
        assert dict(zip(table[key], table["amount"], strict=True)) == sums(purchases, key), key
    for key in ("route", "vehicle", "driver", "fleet"):
        table = run.table(key)
        assert dict(zip(table[key], table["gross"], strict=True)) == sums(purchases, key), key
        assert int(table["commission"].sum()) == commission, key
        for g, c, n in zip(table["gross"], table["commission"], table["net"], strict=True):
            assert c + n == g
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ClearingRun)).scalar_one() == 1

    # The PDF: the run on every page, the money in the summary, the charts' titles, Chinese names.
    assert result.pdf == tmp_path / f"settlement-{OP}-{DAY}.pdf"
    pages = [p.extract_text() for p in PdfReader(result.pdf).pages]
    for page in pages:
        assert f"清分批次 Clearing run {run.id} of" in page.replace("\n", "")
    whole = "".join(pages)
    for fen in (gross, commission, gross - commission):
        assert yuan(fen) in whole
    for words in ("Taps by hour", "Revenue by route", "按车队 By fleet", "按线路 By route", "按车辆 By vehicle",
                  "按司机 By driver", "东站车队", "按卡类 By card type"):
        assert words in whole
    # CSV beside it: the route table, names with codes, yuan columns summing to the loop sums, a totals row.
    lines, total = read_csv(tmp_path / f"settlement-{OP}-{DAY}-by_route.csv")
    assert {r["线路 Route"]: in_fen(r[GROSS]) for r in lines} == sums(purchases, "route")
    assert {r["线路 Route"]: r["名称 Name"] for r in lines} == {k: ROUTES[k] for k in sums(purchases, "route")}
    assert sum(in_fen(r[COMMISSION]) for r in lines) == commission
    assert (in_fen(total[GROSS]), in_fen(total[COMMISSION]), in_fen(total[NET]), int(total["笔数 Taps"])) == \
        (gross, commission, gross - commission, len(purchases))
    hours, hours_total = read_csv(tmp_path / f"settlement-{OP}-{DAY}-taps_by_hour.csv")
    by_hour = {int(r["时段 Hour (Asia/Shanghai)"]): int(r["笔数 Taps"]) for r in hours}
    expected_hours = {}
    for p in purchases:
        h = p["occurred_at"].astimezone(TZ).hour
        expected_hours[h] = expected_hours.get(h, 0) + 1
    assert {h: n for h, n in by_hour.items() if n} == expected_hours
    assert int(hours_total["笔数 Taps"]) == len(purchases)
    # XLSX: the about sheet names the run and says where the day stands, the fleet sheet the fleets.
    book = load_workbook(tmp_path / f"settlement-{OP}-{DAY}.xlsx")
    about = {r[0]: r[1] for r in book["about"].iter_rows(min_row=2, values_only=True)}
    assert about["清分 Clearing"].startswith(f"清分批次 Clearing run {run.id} of")
    assert about["结算状态 Status"].startswith(f"cleared in clearing run {run.id} of")
    assert in_fen(about[f"合计 Total {GROSS}"]) == gross and in_fen(about[f"合计 Total {COMMISSION}"]) == commission
    body = [r for r in book["by_fleet"].iter_rows(min_row=2, values_only=True)]
    assert body[-1][0] == TOTAL and in_fen(body[-1][3]) == gross
    fleets = {r[0] or "": in_fen(r[3]) for r in body[:-1]}  # "" reads None
    assert fleets == sums(purchases, "fleet")
    assert [r[1] for r in body[:-1] if not r[0]] == ["不属车队 not in a fleet"]
    assert set(result.files) >= {result.pdf, tmp_path / f"settlement-{OP}-{DAY}.xlsx"}

    # Settled again (a clerk asks for the report a week later): the same run, checked, nothing new stored.
    with engine.begin() as conn:
        again = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path / "again", now=END + timedelta(days=7))
        runs = conn.execute(select(func.count()).select_from(ClearingRun)).scalar_one()
    assert again.run.id == run.id and again.run.recleared and runs == 1
    assert again.settlement.amount == gross


def test_late_taps_and_a_clerks_adjustment_are_printed_with_what_is_payable(engine, tmp_path):
    """The day before is cleared; then the issuer's file for it shows one purchase 1.50 yuan dearer, a clerk
    adjusts the item, and a bus offline since the day before uploads two of its purchases. The day's run carries
    both: its reports list them and print day + adjustments = payable, each figure worked out here."""
    before, before_start = DAY - timedelta(days=1), START - timedelta(days=1)
    yesterday = day_rows(before_start, riders=20)
    store(engine, yesterday)
    with engine.begin() as conn:
        first = settle(conn, operator=OP, day=before, reports_dir=tmp_path / "before", now=START + timedelta(hours=1))
    text_ = " ".join(p.extract_text() for p in PdfReader(first.pdf).pages).replace("\n", " ")
    assert "this clearing run carries no late taps and no reconciliation adjustments" in text_

    # The issuer's file for the day before: every purchase as we stored it, one of them 150 fen dearer.
    file = pd.DataFrame([{c: r[c] for c in ISSUER_COLUMNS} for r in yesterday if r["kind"] == "purchase"],
                        columns=list(ISSUER_COLUMNS))
    file.loc[3, "amount"] += 150
    with engine.begin() as conn:
        found, new = cr.import_issuer_file(conn, operator=OP, day=before, source=write_issuer_file(file),
                                           now=START + timedelta(hours=2))
        assert [i.problem for i in found] == ["amount_differs"] and len(new) == 1
        cr.resolve_item(conn, item_id=new[0], status="adjusted", by="clerk1", now=START + timedelta(hours=3))
    adjustment = 150  # the item's suggestion: theirs - ours
    item = new[0]

    # Two purchases of the day before, uploaded in the morning of the day (after the day before was cleared).
    late = [{**_row("VAL9", 11, "purchase", before_start + timedelta(hours=10), "V2", "R2", "D2", amount=250),
             "received_at": START + timedelta(hours=6)},
            {**_row("VAL9", 12, "purchase", before_start + timedelta(hours=11), "V4", "R3", "D1", amount=180),
             "received_at": START + timedelta(hours=6)}]
    store(engine, [*late, *day_rows(START)])
    with engine.begin() as conn:
        result = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=END + timedelta(hours=1))
    run = result.run

    # Expected, from the stored taps and the rows inserted here: each section's commission is one figure
    # rounded half up (the day's gross, the late taps' gross of their day, the adjustment).
    day_gross = sum(p["amount"] for p in stored_purchases(engine, DAY))
    day_net = day_gross - half_up_commission(day_gross)
    late_gross = 0
    for r in late:
        late_gross += r["amount"]
    late_commission = half_up_commission(late_gross)
    adj_commission = half_up_commission(adjustment)
    assert adj_commission == 1  # 0.9 fen rounds up: the adjustment's commission is not forgotten
    adj_gross = late_gross + adjustment
    adj_commission_all = late_commission + adj_commission
    adj_net = adj_gross - adj_commission_all
    payable_net = day_net + adj_net
    assert run.totals["payable_net"] == payable_net
    assert (run.totals["late_gross"], run.totals["reconciliation_gross"]) == (late_gross, adjustment)

    # The PDF: the payable line near the top, the adjustments table with one row per route and the item.
    pages = [p.extract_text() for p in PdfReader(result.pdf).pages]
    whole = " ".join(pages).replace("\n", " ")
    assert (f"Payable to the operator: net of the day {yuan(day_net)} + adjustments for earlier days "
            f"{yuan(adj_net)} = {yuan(payable_net)} yuan (gross {yuan(day_gross)} + {yuan(adj_gross)} = "
            f"{yuan(day_gross + adj_gross)}; issuer commission {yuan(day_gross - day_net)} + "
            f"{yuan(adj_commission_all)} = {yuan(day_gross - day_net + adj_commission_all)}).") in whole
    all_lines = [ln.strip() for p in pages for ln in p.splitlines() if ln.strip()]
    table = all_lines[all_lines.index("以前运营日调整 Adjustments for earlier days"):]
    total = table.index(TOTAL)
    assert table[total + 1:total + 5] == [str(len(late)), yuan(adj_gross), yuan(adj_commission_all), yuan(adj_net)]
    for r in late:
        i = table.index(f"{r['route']} {ROUTES[r['route']]}")
        assert table[i - 2:i] == [before.isoformat(), "late taps"] and table[i + 2] == yuan(r["amount"])
    i = table.index(f"item {item} issuer amount differs")
    assert table[i - 2:i + 3] == [before.isoformat(), "reconciliation", f"item {item} issuer amount differs", "0",
                                  yuan(adjustment)]

    # The CSV beside it: the same rows in yuan; the XLSX's about sheet: what is payable.
    rows, total = read_csv(tmp_path / f"settlement-{OP}-{DAY}-adjustments.csv")
    assert [(r["类别 Kind"], r["所属运营日 For day"], r["线路/事项 Route / item"], in_fen(r[GROSS])) for r in rows] == [
        ("late taps", before.isoformat(), "R2", 250), ("late taps", before.isoformat(), "R3", 180),
        ("reconciliation", before.isoformat(), str(item), adjustment)]
    assert sum(in_fen(r[NET]) for r in rows) == adj_net == in_fen(total[NET])
    assert all(in_fen(r[COMMISSION]) + in_fen(r[NET]) == in_fen(r[GROSS]) for r in rows)
    about = {r[0]: r[1] for r in load_workbook(tmp_path / f"settlement-{OP}-{DAY}.xlsx")["about"]
             .iter_rows(min_row=2, values_only=True)}
    assert in_fen(about[f"应付 Payable {NET}"]) == payable_net and in_fen(about[f"调整 Adjustments {NET}"]) == adj_net

    # The clerk downloads the same adjustments table through the API.
    from fastapi.testclient import TestClient

    from backoffice.web.app import create_app
    from backoffice.web.auth import Principal, TokenStore

    app = create_app(engine, tokens=TokenStore(tokens={"fbx_c": Principal("clerk1", "clerk", OP)}),
                     clock=lambda: END + timedelta(hours=2), migrate=False)
    with TestClient(app) as client:
        got = client.get(f"/api/v1/operators/{OP}/reports/days/{DAY}/settlement?format=csv&table=adjustments",
                         headers={"Authorization": "Bearer fbx_c"})
    assert got.status_code == 200, got.text
    served = list(csv.DictReader(got.content.decode("utf-8-sig").splitlines()))
    key = ("类别 Kind", "线路/事项 Route / item", NET)
    assert [tuple(r[k] for k in key) for r in served] == [tuple(r[k] for k in key) for r in [*rows, total]]

    # The month: both days' own figures, what the runs carry, and what is payable.
    with engine.begin() as conn:
        month = settle_month(conn, operator=OP, year=2026, month=4, reports_dir=tmp_path / "month",
                             now=END + timedelta(hours=2))
    before_gross = sum(p["amount"] for p in stored_purchases(engine, before)) - late_gross  # counted late
    days_net = day_net + before_gross - half_up_commission(before_gross)
    assert first.run.totals["day_gross"] == before_gross
    assert int(month.tables.adjustments["net"].sum()) == adj_net
    whole = " ".join(p.extract_text() for p in PdfReader(month.pdf).pages).replace("\n", " ")
    assert (f"Payable to the operator: net of the period's days {yuan(days_net)} + adjustments for earlier days "
            f"{yuan(adj_net)} = {yuan(days_net + adj_net)} yuan") in whole
    assert days_net + adj_net == sum(r.totals["payable_net"] for r in month.runs)


def test_reports_and_the_vehicle_page_show_the_taps_the_run_took_not_a_time_window(engine, tmp_path):
    """A purchase of the day received before the run's moment but committed after the run read the table (here:
    stored after the run, with such a ``received_at``) is not the run's: it goes to the next run as a late tap.
    The day's hour chart and the vehicle's page must agree with the run, not with "received before as_of"."""
    from backoffice.web.api.reports import OperatorDay, vehicle_day

    store(engine, day_rows(START))
    as_of = END + timedelta(hours=1)
    with engine.begin() as conn:
        run = settle(conn, operator=OP, day=DAY, now=as_of).run
    straddler = {**_row("VAL1", 999_999, "purchase", START + timedelta(hours=20), "V1", "R1", "D1", amount=370),
                 "received_at": as_of - timedelta(minutes=1)}
    store(engine, [straddler])
    v1 = dict(zip(run.table("vehicle")["vehicle"], run.table("vehicle")["gross"], strict=True))["V1"]
    with engine.connect() as conn:
        look = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=as_of, close_day=False)
        page = vehicle_day(conn, op=OperatorDay(OP, "Demo", "Asia/Shanghai", 3), day=DAY, vehicle="V1", now=as_of)
    hours, _total = read_csv(tmp_path / f"settlement-{OP}-{DAY}-taps_by_hour.csv")
    assert sum(int(r["笔数 Taps"]) for r in hours) == run.totals["day_taps"] == look.settlement.taps
    assert int(page.shifts["amount"].sum()) == int(page.by_route["amount"].sum()) == v1
    with engine.begin() as conn:
        following = settle(conn, operator=OP, day=DAY + timedelta(days=1), now=as_of + timedelta(days=1)).run
    assert (following.totals["late_taps"], following.totals["late_gross"]) == (1, 370)


def test_a_running_day_or_a_read_only_look_gives_provisional_figures_and_stores_nothing(engine, tmp_path):
    store(engine, day_rows(START))
    purchases = stored_purchases(engine, DAY)
    with engine.begin() as conn:
        running = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=START + timedelta(hours=20))
        look = settle(conn, operator=OP, day=DAY, now=END + timedelta(hours=1), close_day=False)
        runs = conn.execute(select(func.count()).select_from(ClearingRun)).scalar_one()
    assert runs == 0
    # The running day counts what is stored so far (here the whole day, stored ahead of the clock).
    assert running.run is None and "still running" in running.provisional
    assert running.settlement.amount == sum(p["amount"] for p in purchases) > 0
    assert look.run is None and look.settlement.amount == sum(p["amount"] for p in purchases)
    text_ = "".join(p.extract_text() for p in PdfReader(running.pdf).pages)
    assert "no stored run" in text_ and "clearing run" not in text_.replace("ad hoc clearing", "")


def test_a_month_from_its_stored_runs(engine, tmp_path):
    days = [DAY, DAY + timedelta(days=1), DAY + timedelta(days=2)]
    for d in days:
        store(engine, day_rows(START + timedelta(days=(d - DAY).days), riders=30 + (d - DAY).days * 5))
    with engine.begin() as conn:
        settle(conn, operator=OP, day=days[0], now=END + timedelta(hours=1))
    with engine.begin() as conn:
        # The second day was skipped: clearing the third clears it first (catch-up), each with its own run.
        settle(conn, operator=OP, day=days[2], now=END + timedelta(days=2, hours=1))
    with engine.begin() as conn:
        month = settle_month(conn, operator=OP, year=2026, month=4, reports_dir=tmp_path,
                             now=END + timedelta(days=3))
    assert [r.day for r in month.runs] == days
    assert len(month.missing) == 30 - 3 and DAY not in month.missing
    by_day = dict(zip(month.tables.by_day["day"], month.tables.by_day["gross"], strict=True))
    expected = {d: sum(p["amount"] for p in stored_purchases(engine, d)) for d in days}
    assert by_day == expected
    every = [p for d in days for p in stored_purchases(engine, d)]
    for key in ("route", "vehicle", "driver", "fleet"):
        table = getattr(month.tables, f"by_{key}")
        assert dict(zip(table[key], table["gross"], strict=True)) == sums(every, key), key
        assert int(table["commission"].sum()) == sum(half_up_commission(v) for v in expected.values())
    text_ = "".join(p.extract_text() for p in PdfReader(month.pdf).pages)
    assert "month 2026-04" in text_ and yuan(sum(expected.values())) in text_
    ids = [r.id for r in month.runs]
    label = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[0] + 3)) else ", ".join(map(str, ids))
    flat = text_.replace("\n", "")  # pypdf breaks the line where Chinese meets English
    assert f"清分批次 Clearing runs {label}, the latest of" in flat and " runs, " not in flat


def test_farebox_settle_writes_the_day_and_the_month(url, engine, tmp_path, monkeypatch, capsys):
    store(engine, day_rows(START))
    gross = sum(p["amount"] for p in stored_purchases(engine, DAY))
    monkeypatch.setenv("FAREBOX_DATABASE_URL", url)
    monkeypatch.setenv("FAREBOX_VAR_DIR", str(tmp_path / "var"))
    assert main(["settle", "--operator", OP, "--day", DAY.isoformat(), "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    with engine.connect() as conn:
        run_id = conn.execute(select(ClearingRun.id).where(ClearingRun.service_day == DAY)).scalar_one()
    assert f"clearing run {run_id}" in said and f"gross ¥{yuan(gross)}" in said
    assert (tmp_path / "out" / f"settlement-{OP}-{DAY}.pdf").exists()
    assert (tmp_path / "out" / f"settlement-{OP}-{DAY}.xlsx").exists()
    assert main(["settle", "--operator", OP, "--month", "2026-04", "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert (tmp_path / "out" / f"settlement-{OP}-2026-04.pdf").exists() and "1 day(s) cleared" in said
    assert main(["settle", "--operator", OP, "--out", str(tmp_path / "out")]) == 2  # neither --day nor --month

"""A driver's shift report and a vehicle's day as a clerk downloads them (HTTP, the clerk's token), on SQLite and
PostgreSQL, read back with pypdf: headings in Chinese with English beside them, every time on the operator's own
clock with its zone named (a company in Asia/Kathmandu, UTC+05:45, so that neither UTC nor the Shanghai default
can pass), money in yuan, signature lines with dates. The figures are worked out here from the tap table read with
plain SQL. The month's paper from the same API names its clearing runs plainly ("清分批次 Clearing runs 2, 4" when
another company's runs fall between them)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from io import BytesIO
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from pypdf import PdfReader
from sqlalchemy import text

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Tap
from backoffice.settle import settle
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from reports.monthly import runs_label

OP, OTHER = "op_k", "op_o"
ZONE = "Asia/Kathmandu"
TZ = ZoneInfo(ZONE)
DAY = date(2026, 4, 10)
START = datetime(2026, 4, 10, 3, tzinfo=TZ).astimezone(UTC)  # the cut-off, 03:00 local
NOW = START + timedelta(days=2, hours=2)
AUTH = {"Authorization": "Bearer fbx_c"}
PLATE = "粤A-K0001"
DRIVERS = {"D1": "司机甲", "D2": "司机乙"}
LABELS = {1: "adult card 普通卡", 2: "student card 学生卡", 3: "elderly card 老人卡"}
# (shift, driver, sign-in and sign-out as hours after the cut-off, riders): shift 2 signs out at 00:50 local,
# past midnight but still in the service day.
SHIFTS = [(1, "D1", 3.0, 10.5, 23), (2, "D2", 11.0, 21 + 5 / 6, 31)]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request):
    engine = make_engine(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url"))
    upgrade(engine)
    at = START - timedelta(days=30)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="加德满都公交 Kathmandu Bus", timezone=ZONE, at=at)
        registry.add_operator(conn, code=OTHER, name="Other Bus", at=at)
        registry.add_route(conn, code="R1", operator=OP, name="1路 火车站", flat_fare=200, at=at)
        registry.add_vehicle(conn, code="V1", operator=OP, plate=PLATE, at=at)
        for i, (staff, name) in enumerate(DRIVERS.items()):
            registry.add_driver(conn, staff_no=staff, operator=OP, name=name, card_asn=f"{i + 1:020d}", at=at)
        for code in (OP, OTHER):
            cr.set_commission_rate(conn, operator=code, rate_bp=60, valid_from=date(2026, 1, 1))
    yield engine
    engine.dispose()


def _row(operator, device, seq, kind, at, driver, shift_no, *, card_type=1, amount=0) -> dict:
    return {"device_id": device, "device_seq": seq, "kind": kind, "occurred_at": at,
            "received_at": at + timedelta(minutes=2), "operator": operator, "route": "R1", "vehicle": "V1",
            "driver": driver, "shift_no": shift_no, "card_asn": f"{seq:020d}", "card_type": card_type,
            "card_ttc": seq % 0x10000, "amount": amount, "balance_after": 5000, "terminal_id": "010000000001",
            "terminal_seq": seq, "tac": f"{seq & 0xFFFFFFFF:08X}", "reason": ""}


def day_rows(operator: str, start: datetime, seq0: int, day_no: int) -> list[dict]:
    """Two shifts of bus V1: sign in, riders (adult 2.00, every fifth 2.50; student 1.00; elderly free), sign out.
    A validator numbers its shifts on and on: the next day's are 3 and 4."""
    rows, seq = [], seq0
    for n, driver, on, off, riders in SHIFTS:
        shift_no = n + len(SHIFTS) * day_no
        signed_in, signed_out = start + timedelta(hours=on), start + timedelta(hours=off)
        rows.append(_row(operator, "VALK", seq := seq + 1, "shift_open", signed_in, driver, shift_no))
        for i in range(riders):
            card_type = (1, 2, 1, 3)[i % 4]
            amount = {1: 200 + (50 if i % 5 == 0 else 0), 2: 100, 3: 0}[card_type]
            at = signed_in + (signed_out - signed_in) * (i + 1) / (riders + 1)
            rows.append(_row(operator, "VALK", seq := seq + 1, "purchase", at, driver, shift_no,
                             card_type=card_type, amount=amount))
        rows.append(_row(operator, "VALK", seq := seq + 1, "shift_close", signed_out, driver, shift_no))
    return rows


def _utc(value) -> datetime:
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def stored(engine, sql: str, **params) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings()]


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def local(at: datetime, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return at.astimezone(TZ).strftime(fmt)


def pdf_lines(content: bytes) -> list[str]:
    return [ln.strip() for p in PdfReader(BytesIO(content)).pages for ln in p.extract_text().splitlines()
            if ln.strip()]


def flat(lines: list[str]) -> str:
    """pypdf breaks a line where Chinese meets English: joined, "签到\\n Signed in" reads "签到 Signed in"."""
    return "".join(lines)


def after(lines: list[str], label: str, n: int) -> list[str]:
    i = lines.index(label)
    return lines[i + 1:i + 1 + n]


@pytest.fixture
def cleared(engine):
    """The company's day and the day after cleared, each after the other company's (its runs interleave)."""
    with engine.begin() as conn:
        for d in range(2):
            start = START + timedelta(days=d)
            conn.execute(Tap.__table__.insert(), day_rows(OTHER, start, 500_000 + 1000 * d, d))
            conn.execute(Tap.__table__.insert(), day_rows(OP, start, 1000 * d, d))
    for d in range(2):
        for code in (OTHER, OP):
            with engine.begin() as conn:
                assert settle(conn, operator=code, day=DAY + timedelta(days=d), now=NOW).run is not None
    return engine


def download(engine, path: str) -> bytes:
    app = create_app(engine, tokens=TokenStore(tokens={"fbx_c": Principal("clerk1", "clerk", OP)}),
                     clock=lambda: NOW, migrate=False)
    with TestClient(app) as client:
        got = client.get(f"/api/v1/operators/{OP}{path}", headers=AUTH)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "application/pdf"
    return got.content


def test_the_drivers_shift_report_in_chinese_and_english_on_the_companys_clock(cleared):
    engine = cleared
    run = stored(engine, "SELECT id, created_at FROM clearing_run WHERE operator = :op AND service_day = :d",
                 op=OP, d=DAY)[0]
    for shift_no, driver, *_ in SHIFTS:
        taps = stored(engine, "SELECT kind, occurred_at, card_type, amount FROM tap WHERE operator = :op AND "
                      "device_id = 'VALK' AND shift_no = :n ORDER BY device_seq", op=OP, n=shift_no)
        taps = [t for t in taps if (_utc(t["occurred_at"]).astimezone(TZ) - timedelta(hours=3)).date() == DAY]
        buys = [t for t in taps if t["kind"] == "purchase"]
        by_type: dict[int, list[int]] = {}
        for b in buys:
            acc = by_type.setdefault(int(b["card_type"]), [0, 0])
            acc[0] += 1
            acc[1] += int(b["amount"])
        signed_in = next(_utc(t["occurred_at"]) for t in taps if t["kind"] == "shift_open")
        signed_out = next(_utc(t["occurred_at"]) for t in taps if t["kind"] == "shift_close")

        lines = pdf_lines(download(engine, f"/reports/days/{DAY}/shifts/VALK/{shift_no}"))
        whole = flat(lines)
        assert f"司机班次报表 Driver's shift report — {driver} {DRIVERS[driver]}" in whole
        assert f"运营日 service day {DAY}" in whole and f"V1 {PLATE}" in whole and "R1 1路 火车站" in whole
        for label in ("司机 Driver", "车辆 Vehicle", "线路 Route", "验票机 Validator", "签到 Signed in",
                      "签退 Signed out", "时长 Duration", "按卡类 By card type", "卡类 Card type", "笔数 Taps",
                      "金额(元)Amount (yuan)"):
            assert label in whole, label
        # Times on the company's clock, the zone named: signed in, signed out, the clearing run in the header.
        assert after(lines, "签到 Signed in", 1) == [local(signed_in)]
        assert after(lines, "签退 Signed out", 1) == [local(signed_out)]
        assert after(lines, "时区 Time zone", 1) == [ZONE]
        assert f"clearing run {run['id']} of {local(_utc(run['created_at']))} {ZONE}" in whole
        assert "UTC" not in whole
        for card_type, (n, fen) in by_type.items():
            assert after(lines, LABELS[card_type], 2) == [str(n), yuan(fen)], card_type
        assert after(lines, "合计 Total", 2) == [str(len(buys)), yuan(sum(b["amount"] for b in buys))]
        assert "平衡 In balance" in whole and "OUT OF BALANCE" not in whole
        # The signature lines: the driver and the clerk, each with a date.
        assert after(lines, "签字 Signatures", 4) == ["司机 Driver", "日期 Date", "结算员 Clerk", "日期 Date"]


def test_the_vehicles_day_in_chinese_and_english_on_the_companys_clock(cleared):
    engine = cleared
    run = stored(engine, "SELECT id, created_at FROM clearing_run WHERE operator = :op AND service_day = :d",
                 op=OP, d=DAY)[0]
    taps = stored(engine, "SELECT kind, occurred_at, shift_no, amount FROM tap WHERE operator = :op AND "
                  "vehicle = 'V1' ORDER BY device_seq", op=OP)
    taps = [t for t in taps if (_utc(t["occurred_at"]).astimezone(TZ) - timedelta(hours=3)).date() == DAY]
    buys = [t for t in taps if t["kind"] == "purchase"]

    lines = pdf_lines(download(engine, f"/reports/days/{DAY}/vehicles/V1"))
    whole = flat(lines)
    assert f"车辆日报 Vehicle's day — V1 {PLATE}" in whole and f"运营日 service day {DAY}" in whole
    # The chart: the count above each hour that has taps, hours in the service day's order from the cut-off.
    by_hour = [0] * 24
    for b in buys:
        by_hour[_utc(b["occurred_at"]).astimezone(TZ).hour] += 1
    order = [(3 + i) % 24 for i in range(24)]
    counts = [str(by_hour[h]) for h in order if by_hour[h]]
    assert after(lines, "分时笔数", 1 + len(counts) + 24) == ["Taps by hour", *counts, *[f"{h:02d}" for h in order]]
    for label in ("班次 Shifts", "按线路 By route", "签到Signed in", "签退Signed out",
                  "平衡Balance", "名称 Name"):
        assert label in whole, label
    assert f"hour of the day ({ZONE};" in whole and f"时间 Times: {ZONE}, the operator's clock" in whole
    assert f"clearing run {run['id']} of {local(_utc(run['created_at']))} {ZONE}" in whole and "UTC" not in whole
    for shift_no, driver, *_ in SHIFTS:
        mine = [t for t in taps if t["shift_no"] == shift_no]
        on = next(_utc(t["occurred_at"]) for t in mine if t["kind"] == "shift_open")
        off = next(_utc(t["occurred_at"]) for t in mine if t["kind"] == "shift_close")
        past_midnight = (off.astimezone(TZ).date() - DAY).days
        row = [str(shift_no), f"{driver} {DRIVERS[driver]}", "R1", local(on, "%H:%M"),
               local(off, "%H:%M") + (f" +{past_midnight}d" if past_midnight else ""),
               str(sum(1 for t in mine if t["kind"] == "purchase")),
               yuan(sum(t["amount"] for t in mine if t["kind"] == "purchase")), "ok"]
        assert after(lines[lines.index("Balance"):], str(shift_no), 7) == row[1:], shift_no
    assert "00:50 +1d" in lines  # the second shift signs out after midnight, in the same service day
    total = [f"{len(buys):,}", yuan(sum(b["amount"] for b in buys))]
    # the shifts' total, then the route's (its total row has an empty name cell pypdf drops)
    assert [lines[i + 1:i + 3] for i, ln in enumerate(lines) if ln == "合计 Total"] == [total, total]
    assert after(lines[lines.index("按线路 By route"):], "R1", 3) == ["1路 火车站", *total]
    assert after(lines, "签字 Signatures", 4) == ["司机 Driver", "日期 Date", "结算员 Clerk", "日期 Date"]


def test_the_months_paper_names_its_clearing_runs_plainly(cleared):
    engine = cleared
    ids = [r["id"] for r in stored(engine, "SELECT id FROM clearing_run WHERE operator = :op ORDER BY id", op=OP)]
    assert len(ids) == 2 and ids[1] - ids[0] == 2  # the other company's run falls between them
    lines = pdf_lines(download(engine, "/reports/months/2026-04/settlement"))
    latest = stored(engine, "SELECT created_at FROM clearing_run WHERE id = :i", i=ids[1])[0]["created_at"]
    header = [lines[i + 1] for i, ln in enumerate(lines) if ln == "清分批次"]  # on every page
    assert header and set(header) == {f"Clearing runs {ids[0]}, {ids[1]}, the latest of "
                                      f"{local(_utc(latest))} {ZONE}"}
    assert " runs, " not in flat(lines)


def test_runs_label():
    assert runs_label([]) == ""
    assert runs_label([7]) == "7"
    assert runs_label([2, 1]) == "1-2"
    assert runs_label([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"

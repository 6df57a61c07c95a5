"""Ticket revenue in the clearing runs, on SQLite and PostgreSQL: tickets sold through the order use cases
(backoffice.tickets.orders), their uses stored by ingest's own storage (backoffice.tickets.uses.store_records), the
day cleared (backoffice.clearing_runs.clear_day), and every ticket figure of the runs (by route, vehicle, driver,
product, channel and source; the deferred balance; breakage; a late use moving its value out of breakage; a fraud
second use earning nothing; a refunded ticket earning nothing) checked against plain SQL over ticket_use / ticket /
product / ticket_order with the rules written out in the test. The auditor agrees, and notices a changed line."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text

from backoffice import audit_runs, registry
from backoffice import clearing_runs as cr
from backoffice.db import make_engine, upgrade
from backoffice.tickets import catalogue, orders, revenue
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest
from backoffice.tickets.uses import store_records
from wire.records import RecordKind, TapRecord

OP = "tkop"
DAY = date(2026, 12, 3)
NEXT_DAY = DAY + timedelta(days=1)
LOCAL0 = datetime(2026, 12, 2, 19, 0, tzinfo=UTC)  # 03:00 in Shanghai: DAY's first moment
NOW = LOCAL0 + timedelta(hours=7)  # 10:00 local
RUN1 = LOCAL0 + timedelta(days=1, hours=1)  # DAY's run, 04:00 local on the next morning
RUN2 = RUN1 + timedelta(days=1)
KEYS = published_test_keys()
RIDE, COACH, DAY3, MONTH = 200, 3000, 1500, 6000
RIDE_VALUE = 250  # the month pass's stated value of a ride


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Ticket Bus", at=NOW - timedelta(days=30))
        for r in ("R1", "R2"):
            registry.add_route(conn, code=r, operator=OP, name=f"Route {r}", flat_fare=200,
                               at=NOW - timedelta(days=30))
        for v in ("V1", "V2"):
            registry.add_vehicle(conn, code=v, operator=OP, plate=f"A-{v}", at=NOW - timedelta(days=30))
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=RIDE,
                              by="clerk", now=NOW - timedelta(days=1))
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Airport coach",
                              price_fen=COACH, by="clerk", now=NOW - timedelta(days=1))
        catalogue.add_product(conn, operator=OP, code="day3", kind="day_pass", name="Three days", price_fen=DAY3,
                              validity_days=3, uses=0, by="clerk", now=NOW - timedelta(days=1))
        catalogue.add_product(conn, operator=OP, code="month", kind="month_pass", name="Month", price_fen=MONTH,
                              validity_days=30, uses=0, by="clerk", now=NOW - timedelta(days=1))
        revenue.set_rule(conn, operator=OP, product="month", rule="per_ride", ride_value_fen=RIDE_VALUE,
                         by="clerk", now=NOW - timedelta(days=1))
        catalogue.add_departure(conn, operator=OP, product="coach", route="R2", service_date=DAY, departs="18:30",
                                seats=40)
    yield engine
    engine.dispose()


def sell(engine, channel: str, items: list[ItemRequest]) -> list[int]:
    with engine.begin() as conn:
        order = orders.create_order(conn, operator=OP, channel=channel, phone="13800000000", items=items,
                                    who="rider", now=NOW)
        total = conn.execute(text("SELECT total_fen FROM ticket_order WHERE order_id = :o"), {"o": order}).scalar()
        orders.mark_paid(conn, order, amount_fen=int(total), payment_ref=f"pay-{order}", who="platform", now=NOW)
        return [t.ticket_id for t in orders.issue_tickets(conn, order, keys=KEYS, who="shop", now=NOW)]


_seq = iter(range(1, 10_000))


def use(engine, ticket_id: int, *, at: datetime, received: datetime, route: str, vehicle: str, driver: str,
        presented: str = "qr"):
    record = TapRecord(device_id=f"VAL-{vehicle}", device_seq=next(_seq), kind=RecordKind.TICKET_USE,
                       occurred_at=at, operator=OP, route=route, vehicle=vehicle, driver=driver, shift_no=1,
                       ticket_id=ticket_id if presented == "qr" else ticket_id % 10**10, ticket_use=1,
                       presented=presented)
    with engine.begin() as conn:
        (outcome,) = store_records(conn, [record], now=received)
    assert outcome.status == "stored", outcome
    return outcome


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def run_rows(engine, day: date, section: str) -> dict:
    rows = sql(engine, "SELECT w.dimension, w.key, w.taps, w.gross, w.commission, w.net FROM clearing_row w "
                       "JOIN clearing_run r ON r.id = w.run_id WHERE r.operator = :op AND r.service_day = :d "
                       "AND w.section = :s", op=OP, d=day, s=section)
    assert all(int(r.commission) == 0 and int(r.net) == int(r.gross) for r in rows)  # no issuer commission
    out = defaultdict(dict)
    for r in rows:
        out[r.dimension][r.key] = (int(r.taps), int(r.gross))
    return out


# The rules, written out for the check: single ride and coach at the price paid; the month pass 250 a ride; the
# three-day pass nothing per ride (spread over its days).
USE_VALUE = (f"CASE p.code WHEN 'ride' THEN t.price_fen WHEN 'coach' THEN t.price_fen "
             f"WHEN 'month' THEN {RIDE_VALUE} ELSE 0 END")
DIM_SQL = {"route": "u.route", "vehicle": "u.vehicle", "driver": "u.driver", "product": "p.code",
           "channel": "o.channel"}


def expected_uses(engine, *, for_day: date, received_from: datetime | None, received_before: datetime) -> dict:
    """(uses, fen) by dimension and key of the counting uses of ``for_day`` received in the window, in plain SQL."""
    out = defaultdict(dict)
    since = "AND u.received_at >= :since" if received_from else ""
    for dim, col in DIM_SQL.items():
        for key, n, fen in sql(engine, f"SELECT {col}, COUNT(*), SUM({USE_VALUE}) FROM ticket_use u "
                                       "JOIN ticket t ON t.ticket_id = u.ticket_id "
                                       "JOIN product p ON p.id = t.product_id "
                                       "JOIN ticket_order o ON o.order_id = t.order_id "
                                       f"WHERE u.operator = :op AND u.revenue = :yes AND u.service_day = :d "
                                       f"AND u.received_at < :before {since} GROUP BY {col}",
                               op=OP, yes=True, d=for_day, before=received_before, since=received_from):
            out[dim][key] = (int(n), int(fen))
    return out


def add(table: dict, dim: str, key: str, uses: int, fen: int) -> None:
    n, f = table[dim].get(key, (0, 0))
    table[dim][key] = (n + uses, f + fen)


def with_totals(table: dict) -> dict:
    uses = sum(n for n, _ in table["product"].values())
    fen = sum(f for _, f in table["product"].values())
    table["operator"] = {OP: (uses, fen)}
    return table


def ticket_meta(engine, ticket_id: int) -> tuple[str, str, int]:
    ((product, channel, price),) = sql(engine, "SELECT p.code, o.channel, t.price_fen FROM ticket t "
                                               "JOIN product p ON p.id = t.product_id "
                                               "JOIN ticket_order o ON o.order_id = t.order_id "
                                               "WHERE t.ticket_id = :t", t=ticket_id)
    return product, channel, int(price)


def non_use(table: dict, engine, ticket_id: int, fen: int, source: str) -> None:
    """A line that is no ride (a pass's day, breakage): route / vehicle / driver "", its product and channel."""
    product, channel, _ = ticket_meta(engine, ticket_id)
    for dim in ("route", "vehicle", "driver"):
        add(table, dim, "", 0, fen)
    add(table, "product", product, 0, fen)
    add(table, "channel", channel, 0, fen)
    add(table, "source", source, 0, fen)


def test_ticket_revenue_is_cleared_by_route_vehicle_driver_product_and_channel(engine):
    rides = sell(engine, "web", [ItemRequest("ride", 3)])
    (coach,) = sell(engine, "sms", [ItemRequest("coach", 1, departure_id=1)])
    (day3,) = sell(engine, "partner", [ItemRequest("day3", 1, start_date=DAY)])
    (month,) = sell(engine, "counter", [ItemRequest("month", 1, start_date=DAY)])
    (refunded,) = sell(engine, "web", [ItemRequest("ride", 1)])
    with engine.begin() as conn:
        refund_order = conn.execute(text("SELECT order_id FROM ticket WHERE ticket_id = :t"),
                                    {"t": refunded}).scalar()
        orders.refund(conn, refund_order, who="clerk", why="changed plans", now=NOW + timedelta(minutes=5))

    h = timedelta(hours=1)
    use(engine, rides[0], at=NOW + h, received=NOW + 2 * h, route="R1", vehicle="V1", driver="D1")
    fraud = use(engine, rides[0], at=NOW + 2 * h, received=NOW + 3 * h, route="R2", vehicle="V2", driver="D2")
    assert fraud.flag == "second_use"  # the same single ride on another bus: stored, flagged, never revenue
    use(engine, rides[1], at=NOW + 2 * h, received=NOW + 3 * h, route="R2", vehicle="V2", driver="D2",
        presented="pickup")
    use(engine, coach, at=LOCAL0 + timedelta(hours=15, minutes=20), received=NOW + 9 * h, route="R2",
        vehicle="V2", driver="D2")
    for k in (3, 4):
        use(engine, day3, at=NOW + k * h, received=NOW + 5 * h, route="R1", vehicle="V1", driver="D1")
    use(engine, month, at=NOW + 5 * h, received=NOW + 6 * h, route="R1", vehicle="V1", driver="D1")
    use(engine, month, at=NOW + 6 * h, received=NOW + 7 * h, route="R2", vehicle="V2", driver="D2")
    # rides[2] is used at 23:00 on DAY but reaches the back office after DAY's run: it lands in the next run.
    late_at = LOCAL0 + timedelta(hours=20)
    use(engine, rides[2], at=late_at, received=RUN1 + timedelta(minutes=30), route="R2", vehicle="V1",
        driver="D3")

    with engine.begin() as conn:
        run1 = cr.clear_day(conn, operator=OP, day=DAY, now=RUN1)

    # ---- DAY's run: the uses received before it, the pass's first day, breakage of the single ride not yet seen
    want = expected_uses(engine, for_day=DAY, received_from=None, received_before=RUN1)
    uses_n = sum(n for n, _ in want["product"].values())
    uses_fen = sum(f for _, f in want["product"].values())
    want["source"] = {"use": (uses_n, uses_fen)}
    non_use(want, engine, day3, DAY3 // 3, "pass_day")  # day 1 of 3: 500 fen
    non_use(want, engine, rides[2], RIDE, "breakage")  # unused when its validity ended (DAY's end)
    with_totals(want)
    got = run_rows(engine, DAY, "ticket")
    assert dict(got) == dict(want)
    assert got["operator"][OP] == (7, RIDE + RIDE + COACH + 2 * RIDE_VALUE + DAY3 // 3 + RIDE)  # 4600 fen
    assert got["route"]["R1"] == (4, RIDE + RIDE_VALUE) and got["route"]["R2"] == (3, RIDE + COACH + RIDE_VALUE)
    assert run1.totals["ticket_day_gross"] == 4600 and run1.totals["ticket_day_uses"] == 7
    assert run1.totals["payable_net"] == 0  # ticket money is not paid by the card issuer
    assert "ticket_late" not in set(run1.rows["section"])

    # the fraud use and the refunded ticket earn nothing: in no ledger line at all
    assert sql(engine, "SELECT COUNT(*) FROM ticket_revenue l JOIN ticket_use u ON u.id = l.use_id "
                       "WHERE u.revenue = :no", no=False) == [(0,)]
    assert sql(engine, "SELECT COUNT(*) FROM ticket_revenue WHERE ticket_id = :t", t=refunded) == [(0,)]

    # ---- the deferred balance after DAY's run: sold - refunded - recognised, sold and refunded in plain SQL
    (sold,), = sql(engine, "SELECT SUM(price_fen) FROM ticket WHERE operator = :op", op=OP)
    (back,), = sql(engine, "SELECT SUM(price_fen) FROM ticket WHERE operator = :op AND state = 'refunded'", op=OP)
    assert (int(sold), int(back)) == (3 * RIDE + COACH + DAY3 + MONTH + RIDE, RIDE)
    with engine.connect() as conn:
        owed = revenue.outstanding(conn, operator=OP, run_id=run1.id, as_of=run1.as_of)
    assert int(owed["deferred"].sum()) == int(sold) - int(back) - 4600
    by_product = dict(zip(owed["product"], owed["deferred"].astype(int), strict=True))
    assert by_product == {"ride": 0, "coach": 0, "day3": DAY3 - DAY3 // 3, "month": MONTH - 2 * RIDE_VALUE}

    # ---- sales of the day by product and channel
    with engine.connect() as conn:
        sales = revenue.sales(conn, operator=OP, day=DAY, tz="Asia/Shanghai", cutoff_hour=3)
    want_sales = {(p, c): (int(n), int(f)) for p, c, n, f in sql(
        engine, "SELECT p.code, o.channel, COUNT(*), SUM(t.price_fen) FROM ticket t "
                "JOIN product p ON p.id = t.product_id JOIN ticket_order o ON o.order_id = t.order_id "
                "WHERE t.operator = :op GROUP BY p.code, o.channel", op=OP)}
    assert {(r.product, r.channel): (int(r.tickets), int(r.gross)) for r in sales.itertuples()} == want_sales
    assert int(sales["refunded"].sum()) == RIDE and int(sales["net"].sum()) == int(sold) - RIDE

    # ---- the next day: one more month ride, the pass's second day; the late single ride moves out of breakage
    use(engine, month, at=RUN1 + 6 * h, received=RUN1 + 7 * h, route="R1", vehicle="V2", driver="D3")
    with engine.begin() as conn:
        run2 = cr.clear_day(conn, operator=OP, day=NEXT_DAY, now=RUN2)
    want2 = expected_uses(engine, for_day=NEXT_DAY, received_from=None, received_before=RUN2)
    want2["source"] = {"use": (1, RIDE_VALUE)}
    non_use(want2, engine, day3, DAY3 * 2 // 3 - DAY3 // 3, "pass_day")
    assert dict(run_rows(engine, NEXT_DAY, "ticket")) == dict(with_totals(want2))
    late = expected_uses(engine, for_day=DAY, received_from=RUN1, received_before=RUN2)
    late["source"] = {"use": (1, RIDE)}
    non_use(late, engine, rides[2], -RIDE, "breakage")  # the breakage of DAY given back to the use
    late = with_totals(late)
    assert dict(run_rows(engine, NEXT_DAY, "ticket_late")) == dict(late)
    assert late["route"] == {"R2": (1, RIDE), "": (0, -RIDE)} and late["operator"][OP] == (1, 0)
    assert run2.totals["ticket_late_uses"] == 1 and run2.totals["ticket_late_gross"] == 0

    # each counting use is in exactly one line; the whole ledger = what the rules give, ticket by ticket
    (in_two,), = sql(engine, "SELECT COUNT(*) FROM (SELECT use_id FROM ticket_revenue WHERE use_id IS NOT NULL "
                             "GROUP BY use_id HAVING COUNT(*) > 1) x")
    (counting,), = sql(engine, "SELECT COUNT(*) FROM ticket_use WHERE revenue = :yes", yes=True)
    (lined,), = sql(engine, "SELECT COUNT(*) FROM ticket_revenue WHERE source = 'use'")
    assert in_two == 0 and int(counting) == int(lined) == 9
    held = dict(sql(engine, "SELECT ticket_id, SUM(amount) FROM ticket_revenue GROUP BY ticket_id"))
    assert {t: int(v) for t, v in held.items()} == {
        rides[0]: RIDE, rides[1]: RIDE, rides[2]: RIDE, coach: COACH, day3: DAY3 * 2 // 3, month: 3 * RIDE_VALUE}
    with engine.connect() as conn:
        owed2 = revenue.outstanding(conn, operator=OP, run_id=run2.id, as_of=run2.as_of)
    assert int(owed2["deferred"].sum()) == int(sold) - int(back) - sum(int(v) for v in held.values())

    # clearing a closed day again re-sums its ticket rows from its own lines: same rows
    with engine.begin() as conn:
        again = cr.clear_day(conn, operator=OP, day=DAY, now=RUN2)
    assert again.recleared and again.totals["ticket_day_gross"] == 4600

    # ---- the auditor re-derives all of it with its own SQL, and notices a changed line
    with engine.connect() as conn:
        result = audit_runs.audit(conn, operator=OP)
    assert result.clean, [d.line() for d in result.differences]
    with engine.begin() as conn:
        conn.execute(text("UPDATE ticket_revenue SET amount = amount + 1 WHERE source = 'use' AND ticket_id = :t"),
                     {"t": coach})
    with engine.connect() as conn:
        found = [d.line() for d in audit_runs.audit(conn, operator=OP).differences]
    assert any("use:" in line and str(COACH + 1) in line for line in found), found
    assert any("ticket" in line and "route 'R2'" in line for line in found), found


def test_a_day_pass_left_unridden_is_spread_over_its_days_and_an_unused_coach_ticket_breaks(engine):
    (day3,) = sell(engine, "web", [ItemRequest("day3", 1, start_date=DAY)])
    (coach,) = sell(engine, "sms", [ItemRequest("coach", 1, departure_id=1)])
    for n in range(3):
        with engine.begin() as conn:
            cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=n), now=RUN1 + timedelta(days=n))
    lines = sql(engine, "SELECT source, ticket_id, for_day, amount FROM ticket_revenue ORDER BY for_day, source")
    got = [(s, int(t), str(d)[:10], int(a)) for s, t, d, a in lines]
    assert got == [("breakage", coach, "2026-12-03", COACH), ("pass_day", day3, "2026-12-03", 500),
                   ("pass_day", day3, "2026-12-04", 500), ("pass_day", day3, "2026-12-05", 500)]
    with engine.connect() as conn:
        assert audit_runs.audit(conn, operator=OP).clean


def read_csv(path) -> tuple[list[dict], dict]:
    """Rows and the totals row of an exported table (UTF-8 with BOM)."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1][next(iter(rows[-1]))] == "合计 Total"
    return rows[:-1], rows[-1]


def fen(text_: str) -> int:
    whole, _, part = text_.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole or "0")) * 100 + int((part + "00")[:2]))


def test_the_settlement_reports_carry_a_ticket_section(engine, tmp_path):
    from openpyxl import load_workbook
    from pypdf import PdfReader

    from backoffice.settle import settle

    (ride, unused) = sell(engine, "web", [ItemRequest("ride", 2)])
    (month,) = sell(engine, "sms", [ItemRequest("month", 1, start_date=DAY)])
    h = timedelta(hours=1)
    use(engine, ride, at=NOW + h, received=NOW + 2 * h, route="R1", vehicle="V1", driver="D1")
    use(engine, month, at=NOW + 2 * h, received=NOW + 3 * h, route="R2", vehicle="V2", driver="D2")
    with engine.begin() as conn:
        result = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=RUN1)
    # by route from plain SQL: the uses at the stated values, and the unused ride's breakage under no route
    want = {k: (int(n), int(f)) for k, n, f in sql(
        engine, f"SELECT u.route, COUNT(*), SUM({USE_VALUE}) FROM ticket_use u JOIN ticket t "
                "ON t.ticket_id = u.ticket_id JOIN product p ON p.id = t.product_id WHERE u.revenue = :yes "
                "GROUP BY u.route", yes=True)}
    want["(无 none)"] = (0, RIDE)
    rows, total = read_csv(tmp_path / f"settlement-{OP}-{DAY}-tickets_by_route.csv")
    got = {r["线路 Route"]: (int(r["使用次数 Uses"]), fen(r["确认收入(元) Revenue recognised (yuan)"]))
           for r in rows}
    assert got == want == {"R1": (1, RIDE), "R2": (1, RIDE_VALUE), "(无 none)": (0, RIDE)}
    assert fen(total["确认收入(元) Revenue recognised (yuan)"]) == 2 * RIDE + RIDE_VALUE
    sales, sales_total = read_csv(tmp_path / f"settlement-{OP}-{DAY}-ticket_sales.csv")
    (sold,), = sql(engine, "SELECT SUM(price_fen) FROM ticket WHERE operator = :op", op=OP)
    assert fen(sales_total["售票款(元) Sales (yuan)"]) == int(sold) == 2 * RIDE + MONTH
    owed, owed_total = read_csv(tmp_path / f"settlement-{OP}-{DAY}-ticket_outstanding.csv")
    assert fen(owed_total["递延余额(元) Deferred (yuan)"]) == int(sold) - (2 * RIDE + RIDE_VALUE)
    assert {r["票种 Product"]: fen(r["递延余额(元) Deferred (yuan)"]) for r in owed} == {
        "ride": 0, "month": MONTH - RIDE_VALUE}
    book = load_workbook(tmp_path / f"settlement-{OP}-{DAY}.xlsx")
    assert {"tickets_by_route", "tickets_by_product", "tickets_by_channel", "ticket_sales",
            "ticket_outstanding"} <= set(book.sheetnames)
    sheet = book["tickets_by_channel"]
    assert sheet.cell(sheet.max_row, 1).value == "合计 Total"
    text_ = " ".join(p.extract_text() for p in PdfReader(result.pdf).pages).replace("\n", " ")
    for words in ("E-tickets", "By route", "By product", "By channel", "Outstanding: sold, not yet recognised",
                  "does not apply to ticket revenue", f"{(2 * RIDE + RIDE_VALUE) / 100:.2f}"):
        assert words in text_, words


def test_the_command_line_states_the_rule_audits_and_prints_the_deferred_balance(tmp_path):
    """``farebox ticket-revenue rule`` (yuan typed, fen stored), ``farebox audit`` (clean, then the difference of a
    changed line, exit 1) and ``farebox ticket-revenue outstanding`` through subprocess on a SQLite file."""
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/cli.db"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Ticket Bus", at=NOW - timedelta(days=30))
        registry.add_route(conn, code="R1", operator=OP, name="Route R1", flat_fare=200, at=NOW - timedelta(days=30))
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
        catalogue.add_product(conn, operator=OP, code="week", kind="day_pass", name="Week", price_fen=2000,
                              validity_days=7, uses=0, by="clerk", now=NOW - timedelta(days=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env.update(FAREBOX_VAR_DIR=str(tmp_path / "var"), FAREBOX_DATABASE_URL=url)

    def farebox(*args):
        return subprocess.run([sys.executable, "-m", "farebox.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    refused = farebox("ticket-revenue", "rule", "--operator", OP, "--product", "week", "--per-ride", "2.505",
                      "--by", "clerk")
    assert refused.returncode == 2
    done = farebox("ticket-revenue", "rule", "--operator", OP, "--product", "week", "--per-ride", "2.50",
                   "--by", "clerk")
    assert done.returncode == 0, done.stderr
    assert "¥2.50" in done.stdout
    assert sql(engine, "SELECT rule, ride_value_fen FROM ticket_revenue_rule") == [("per_ride", 250)]
    (week,) = sell(engine, "web", [ItemRequest("week", 1, start_date=DAY)])
    use(engine, week, at=NOW + timedelta(hours=1), received=NOW + timedelta(hours=2), route="R1", vehicle="V1",
        driver="D1")
    with engine.begin() as conn:
        cr.clear_day(conn, operator=OP, day=DAY, now=RUN1)
    audited = farebox("audit", "--operator", OP)
    assert audited.returncode == 0 and "no differences" in audited.stdout, audited.stdout + audited.stderr
    owed = farebox("ticket-revenue", "outstanding", "--operator", OP)
    assert owed.returncode == 0, owed.stderr
    assert "¥17.50" in owed.stdout  # 20.00 sold - 2.50 for the one ride
    with engine.begin() as conn:
        conn.execute(text("UPDATE ticket_revenue SET route = 'R9' WHERE source = 'use'"))
    audited = farebox("audit", "--operator", OP)
    assert audited.returncode == 1 and "ticket line use:" in audited.stdout, audited.stdout
    engine.dispose()


def test_the_month_report_sums_the_runs_ticket_figures(engine, tmp_path):
    from backoffice.settle import settle_month

    (ride,) = sell(engine, "web", [ItemRequest("ride", 1)])
    (day3,) = sell(engine, "partner", [ItemRequest("day3", 1, start_date=DAY)])
    use(engine, ride, at=NOW + timedelta(hours=1), received=NOW + timedelta(hours=2), route="R1", vehicle="V1",
        driver="D1")
    for n in range(2):
        with engine.begin() as conn:
            cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=n), now=RUN1 + timedelta(days=n))
    with engine.begin() as conn:
        month = settle_month(conn, operator=OP, year=2026, month=12, reports_dir=tmp_path, now=RUN2)
    rows, total = read_csv(tmp_path / f"settlement-{OP}-2026-12-tickets_by_product.csv")
    got = {r["票种 Product"]: fen(r["确认收入(元) Revenue recognised (yuan)"]) for r in rows}
    want = {p: int(f) for p, f in sql(engine, "SELECT p.code, SUM(CASE p.code WHEN 'ride' THEN t.price_fen "
                                              "ELSE t.price_fen / 3 END) FROM ticket t JOIN product p "
                                              "ON p.id = t.product_id GROUP BY p.code")}
    want["day3"] *= 2  # two of its three days cleared
    assert got == want == {"ride": RIDE, "day3": 2 * (DAY3 // 3)}
    assert month.tables.tickets is not None and month.tables.tickets.revenue == RIDE + 2 * (DAY3 // 3)
    _rows, owed = read_csv(tmp_path / f"settlement-{OP}-2026-12-ticket_outstanding.csv")
    assert fen(owed["递延余额(元) Deferred (yuan)"]) == DAY3 // 3


def test_a_pass_refunded_in_its_validity_gives_back_what_was_recognised(engine):
    (day3,) = sell(engine, "web", [ItemRequest("day3", 1, start_date=DAY)])
    with engine.begin() as conn:
        cr.clear_day(conn, operator=OP, day=DAY, now=RUN1)
        order = conn.execute(text("SELECT order_id FROM ticket WHERE ticket_id = :t"), {"t": day3}).scalar()
        orders.refund(conn, order, who="clerk", why="rider moved away", now=RUN1 + timedelta(hours=2))
    with engine.begin() as conn:
        run2 = cr.clear_day(conn, operator=OP, day=NEXT_DAY, now=RUN2)
    lines = [(s, str(d)[:10], int(a)) for s, d, a in sql(
        engine, "SELECT source, for_day, amount FROM ticket_revenue WHERE ticket_id = :t ORDER BY id", t=day3)]
    assert lines == [("pass_day", "2026-12-03", DAY3 // 3), ("refund", "2026-12-04", -(DAY3 // 3))]
    assert run2.totals["ticket_day_gross"] == -(DAY3 // 3)
    with engine.connect() as conn:
        owed = revenue.outstanding(conn, operator=OP, run_id=run2.id, as_of=run2.as_of)
        assert int(owed["deferred"].sum()) == 0 and int(owed["refunded"].sum()) == DAY3
        assert audit_runs.audit(conn, operator=OP).clean


def test_clearing_a_closed_day_again_notices_a_changed_ticket_use(engine):
    (ride,) = sell(engine, "web", [ItemRequest("ride", 1)])
    use(engine, ride, at=NOW + timedelta(hours=1), received=NOW + timedelta(hours=2), route="R1", vehicle="V1",
        driver="D1")
    with engine.begin() as conn:
        cr.clear_day(conn, operator=OP, day=DAY, now=RUN1)
    with engine.begin() as conn:
        assert cr.clear_day(conn, operator=OP, day=DAY, now=RUN2).recleared
    with engine.begin() as conn:
        conn.execute(text("UPDATE ticket_use SET route = 'R2'"))
    with engine.begin() as conn, pytest.raises(cr.ClearingMismatch, match="ticket use"):
        cr.clear_day(conn, operator=OP, day=DAY, now=RUN2)


def test_a_use_committed_just_after_a_run_started_lands_in_the_next_run(pg_schema_url):
    """The claim's hole, for ticket uses (PostgreSQL, READ COMMITTED): ingest stamps received_at, the run reads the
    uses, ingest commits. The run did not see the use; the next run takes it, as a late use, once."""
    engine = make_engine(pg_schema_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Ticket Bus", at=NOW - timedelta(days=30))
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=RIDE,
                              validity_days=2, by="clerk", now=NOW - timedelta(days=1))
    (ride,) = sell(engine, "web", [ItemRequest("ride", 1)])
    record = TapRecord(device_id="VAL-V1", device_seq=1, kind=RecordKind.TICKET_USE, occurred_at=NOW,
                       operator=OP, route="R1", vehicle="V1", driver="D1", shift_no=1, ticket_id=ride, ticket_use=1,
                       presented="qr")
    ingest = engine.connect()
    try:
        tx = ingest.begin()
        assert store_records(ingest, [record], now=RUN1 - timedelta(seconds=1))[0].status == "stored"
        with engine.begin() as conn:  # the run, while ingest has not committed
            run1 = cr.clear_day(conn, operator=OP, day=DAY, now=RUN1)
        tx.commit()
    finally:
        ingest.close()
    assert run1.totals["ticket_gross"] == 0
    with engine.begin() as conn:
        run2 = cr.clear_day(conn, operator=OP, day=NEXT_DAY, now=RUN2)
    assert (run2.totals["ticket_late_uses"], run2.totals["ticket_late_gross"]) == (1, RIDE)
    assert sql(engine, "SELECT run_id, COUNT(*) FROM ticket_revenue GROUP BY run_id") == [(run2.id, 1)]
    with engine.connect() as conn:
        assert audit_runs.audit(conn, operator=OP).clean
    engine.dispose()

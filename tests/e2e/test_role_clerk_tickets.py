"""A clerk reads the e-ticket revenue of a day, through the pages: `farebox serve` on a SQLite file holding the
small city of tests/web_city.py (three days back), real headless Chromium. Tickets are sold with the order use
cases (backoffice.tickets.orders: create, pay, issue), their uses stored by ingest's own storage
(backoffice.tickets.uses.store_records), one of them a second use of a single ride on another bus (fraud: flagged,
earns nothing); the clerk clears the day on the settlement page and reads the ticket figures beside the card
fares (the day's total apart from the issuer's commission, by route, breakage, the deferred balance, the day's
sales), downloads the ticket CSVs, finds the flagged use in the taps browser (kind "ticket"), and reads the sales /
outstanding report page with its CSV. Every figure is checked against plain SQL over the database file (sqlite3),
with the rules written out here (a single ride earns its price at its use; unused, it is breakage at the end of its
validity; a pass starting tomorrow is deferred). Screenshots in var/test-artefacts/screenshots/clerk-tickets-*.png.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import urllib.request
from datetime import date, datetime, timedelta

import pytest
from test_role_clerk import SQL_DAY, _click_and_wait, _downloaded, _shot, _wait_for, _yuan
from test_role_clerk import browser, server  # noqa: F401  (the fixtures: Chromium, farebox serve on the city)
from web_city import A

from backoffice.db import make_engine
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest
from backoffice.tickets.uses import store_records
from clearing.service_day import day_bounds
from wire.records import RecordKind, TapRecord

pytestmark = pytest.mark.slow

TZ, CUTOFF = "Asia/Shanghai", 3
RIDE, AIRPORT, PASS = 200, 1000, 1500


def _sell(engine, channel: str, items: list[ItemRequest], at: datetime) -> list[int]:
    with engine.begin() as conn:
        order = orders.create_order(conn, operator=A, channel=channel, phone="13800000000", items=items,
                                    who="rider", now=at)
        total = conn.execute(orders.TicketOrder.__table__.select().where(
            orders.TicketOrder.order_id == order)).first().total_fen
        orders.mark_paid(conn, order, amount_fen=int(total), payment_ref=f"pay-{order}", who="platform", now=at)
        return [t.ticket_id for t in orders.issue_tickets(conn, order, keys=published_test_keys(), who="shop",
                                                          now=at)]


def _use(engine, seq: int, ticket_id: int, *, at: datetime, device: str, route: str, vehicle: str, driver: str):
    record = TapRecord(device_id=device, device_seq=90_000 + seq, kind=RecordKind.TICKET_USE, occurred_at=at, operator=A,
                       route=route, vehicle=vehicle, driver=driver, shift_no=1, ticket_id=ticket_id, ticket_use=1,
                       presented="qr")
    with engine.begin() as conn:
        (outcome,) = store_records(conn, [record], now=at + timedelta(minutes=2))
    assert outcome.status == "stored", outcome
    return outcome


def _money(text: str) -> int:
    """Fen from a yuan cell of a CSV ("12.00")."""
    whole, _, cents = text.replace(",", "").partition(".")
    return int(whole) * 100 + int(cents or 0)


def test_a_clerk_reads_the_day_s_ticket_revenue(server, browser):
    from selenium.webdriver.common.by import By

    base, token, db = server
    driver = browser
    sql = sqlite3.connect(db)

    def one(query: str, *args):
        return sql.execute(query, args).fetchone()

    (latest,) = one(f"SELECT MAX({SQL_DAY}) FROM tap WHERE operator = ?", A)
    day = date.fromisoformat(latest)
    start, end = day_bounds(day, TZ, CUTOFF)
    noon = start + timedelta(hours=9)  # 12:00 local

    # ---- the company sells tickets on the day (use cases), riders use them on the buses (ingest's storage)
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        catalogue.add_product(conn, operator=A, code="ride", kind="single", name="One ride", price_fen=RIDE,
                              by="clerk", now=start - timedelta(days=1))
        catalogue.add_product(conn, operator=A, code="airport", kind="single", name="Airport ride",
                              price_fen=AIRPORT, by="clerk", now=start - timedelta(days=1))
        catalogue.add_product(conn, operator=A, code="day1", kind="day_pass", name="Day pass", price_fen=PASS,
                              by="clerk", now=start - timedelta(days=1))
    web = _sell(engine, "web", [ItemRequest("ride", 4), ItemRequest("airport", 1)], noon)
    partner = _sell(engine, "partner", [ItemRequest("ride", 2), ItemRequest("day1", 1, start_date=day + timedelta(1))],
                    noon + timedelta(minutes=5))
    rides = [t for t in web + partner if one("SELECT p.code FROM ticket t JOIN product p ON p.id = t.product_id "
                                             "WHERE t.ticket_id = ?", t)[0] == "ride"]
    (airport,) = [t for t in web if t not in rides]
    t0 = noon + timedelta(hours=1)
    _use(engine, 1, rides[0], at=t0, device="cb_001", route="c1", vehicle="cv1", driver="cd1")
    _use(engine, 2, rides[1], at=t0 + timedelta(minutes=3), device="cb_001", route="c1", vehicle="cv1", driver="cd1")
    _use(engine, 1, rides[2], at=t0 + timedelta(minutes=9), device="cb_002", route="c2", vehicle="cv2", driver="cd1")
    _use(engine, 2, airport, at=t0 + timedelta(minutes=12), device="cb_002", route="c2", vehicle="cv2", driver="cd1")
    fraud = _use(engine, 3, rides[0], at=t0 + timedelta(minutes=20), device="cb_002", route="c2", vehicle="cv2",
                 driver="cd1")  # the same single ride again, on another bus
    assert fraud.flag
    engine.dispose()

    # ---- log in, clear the day on the settlement page
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    _wait_for(driver, "header form.who")
    driver.get(f"{base}/settlement?operator={A}&day={day}")
    _click_and_wait(driver, driver.find_element(By.ID, "clear"), "#done")
    _wait_for(driver, "#tickets")

    # ---- plain SQL: what the day must show
    day_end = end.strftime("%Y-%m-%d %H:%M:%S")
    counting = ("SELECT u.route, COUNT(*), SUM(t.price_fen) FROM ticket_use u JOIN ticket t ON t.ticket_id = "
                "u.ticket_id WHERE u.operator = ? AND u.revenue = 1 AND u.service_day = ? GROUP BY u.route")
    by_route = {r: (int(n), int(f)) for r, n, f in sql.execute(counting, (A, str(day)))}
    uses_fen = sum(f for _, f in by_route.values())
    uses_n = sum(n for n, _ in by_route.values())
    (breakage,) = one("SELECT COALESCE(SUM(t.price_fen), 0) FROM ticket t WHERE t.operator = ? AND t.uses_allowed "
                      "> 0 AND substr(t.valid_to, 1, 19) <= ? AND NOT EXISTS (SELECT 1 FROM ticket_use u WHERE "
                      "u.ticket_id = t.ticket_id AND u.revenue = 1)", A, day_end)
    (deferred,) = one("SELECT SUM(price_fen) FROM ticket WHERE operator = ? AND substr(valid_from, 1, 19) >= ?",
                      A, day_end)
    (card_gross,) = one(f"SELECT SUM(amount) FROM tap WHERE operator = ? AND kind = 'purchase' AND {SQL_DAY} = ?",
                        A, str(day))
    (commission,) = one("SELECT day_commission FROM clearing_run WHERE operator = ? AND service_day = ?", A, str(day))
    assert uses_n == 4 and breakage == 3 * RIDE and deferred == PASS  # the set-up did what it meant to
    ticket_gross = uses_fen + breakage

    assert driver.find_element(By.ID, "ticket-day-gross").text == _yuan(ticket_gross)
    assert driver.find_element(By.ID, "day-total").text == _yuan(card_gross + ticket_gross)
    assert driver.find_element(By.ID, "sum-total-gross").text == _yuan(card_gross + ticket_gross)
    assert driver.find_element(By.ID, "total-commission").text == _yuan(commission)  # on card fares only
    assert driver.find_element(By.ID, "ticket-breakage").text == _yuan(breakage)
    assert driver.find_element(By.ID, "ticket-deferred").text == _yuan(deferred)
    shown = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#tickets-by-route tbody tr[data-key]"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        shown[row.get_attribute("data-key")] = (int(cells[1]), cells[2])
    assert shown == {**{r: (n, _yuan(f)) for r, (n, f) in by_route.items()}, "": (0, _yuan(breakage))}
    sales = {(p, c): (int(n), int(f)) for p, c, n, f in sql.execute(
        "SELECT p.code, o.channel, COUNT(*), SUM(t.price_fen) FROM ticket t JOIN product p ON p.id = t.product_id "
        "JOIN ticket_order o ON o.order_id = t.order_id WHERE t.operator = ? GROUP BY p.code, o.channel", (A,))}
    assert driver.find_element(By.ID, "ticket-sales-gross").text == _yuan(sum(f for _, f in sales.values()))
    _shot(driver, "clerk-tickets-settlement")

    # ---- the ticket CSVs from the settlement page's downloads
    seen = {p.name for p in driver.downloads.iterdir()}
    driver.find_element(By.ID, "dl-csv-tickets_by_route").click()
    rows = list(csv.reader(io.StringIO(_downloaded(driver, "tickets_by_route.csv", seen)
                                       .read_text(encoding="utf-8-sig"))))
    got = {r[0]: (int(r[1]), _money(r[2])) for r in rows[1:-1]}
    assert got == {**by_route, "(无 none)": (0, breakage)}
    assert _money(rows[-1][2]) == ticket_gross
    seen = {p.name for p in driver.downloads.iterdir()}
    driver.find_element(By.ID, "dl-csv-ticket_sales").click()
    rows = list(csv.reader(io.StringIO(_downloaded(driver, "ticket_sales.csv", seen).read_text(encoding="utf-8-sig"))))
    money = rows[0].index("售票款(元) Sales (yuan)")
    assert {(r[0], r[1].split(" ")[0]): (int(r[2]), _money(r[money])) for r in rows[1:-1]} == {
        (p, {"web": "网上商城", "partner": "小程序/合作方"}[c]): v for (p, c), v in sales.items()}

    # ---- over HTTP with the API token: the same CSV, and a table the API does not know is refused
    def get(path: str):
        req = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()

    status, body = get(f"/api/v1/operators/{A}/reports/days/{day}/settlement?format=csv&table=ticket_outstanding")
    rows = list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))
    assert status == 200 and _money(rows[-1][-1]) == deferred
    try:
        get(f"/api/v1/operators/{A}/reports/days/{day}/settlement?format=csv&table=tickets_by_nothing")
        raise AssertionError("an unknown table was served")
    except urllib.error.HTTPError as e:
        assert e.code == 422

    # ---- the taps browser, kind "ticket": the day's ticket uses, the fraud one flagged with its reason
    driver.get(f"{base}/taps?operator={A}&first={day}&last={day}&kind=ticket")
    _wait_for(driver, "#taps")
    (n_uses,) = one("SELECT COUNT(*) FROM ticket_use WHERE operator = ? AND service_day = ?", A, str(day))
    assert driver.find_element(By.ID, "total").text == str(n_uses) == "5"
    assert driver.find_element(By.ID, "fares").text == str(uses_n)
    assert driver.find_element(By.ID, "amount").text == _yuan(uses_fen)  # what the run recognised on them
    flag, reason = one("SELECT flag, reason FROM ticket_use WHERE operator = ? AND revenue = 0", A)
    flagged = driver.find_elements(By.CSS_SELECTOR, "#taps tbody tr.outcome-flagged")
    assert len(flagged) == 1
    assert str(rides[0]) in flagged[0].text and reason in flagged[0].find_element(By.CSS_SELECTOR, "td.reason").text
    _shot(driver, "clerk-tickets-taps-browser")
    driver.get(f"{base}/taps?operator={A}&first={day}&last={day}&kind=ticket&outcome=flagged")
    _wait_for(driver, "#taps")
    assert driver.find_element(By.ID, "total").text == "1"
    seen = {p.name for p in driver.downloads.iterdir()}
    driver.find_element(By.ID, "export-csv").click()
    rows = list(csv.reader(io.StringIO(_downloaded(driver, ".csv", seen).read_text(encoding="utf-8-sig"))))
    assert len(rows) == 3 and str(rides[0]) in rows[1][11] and reason in rows[1][-1]
    assert flag == "second_use"

    # ---- the ticket report page: the day and the day after (not cleared: named, adds no revenue)
    driver.get(f"{base}/dashboard")
    driver.find_element(By.CSS_SELECTOR, "nav a[href='/tickets/report'], header a[href='/tickets/report']").click()
    _wait_for(driver, "#range-form")
    driver.get(f"{base}/tickets/report?operator={A}&first={day}&last={day + timedelta(days=1)}")
    _wait_for(driver, "#sales")
    assert driver.find_element(By.ID, "missing").text.endswith(str(day + timedelta(days=1)))
    assert driver.find_element(By.ID, "sales-gross").text == _yuan(sum(f for _, f in sales.values()))
    assert driver.find_element(By.ID, "recognised").text == _yuan(ticket_gross)
    assert driver.find_element(By.ID, "deferred").text == _yuan(deferred)
    shown = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#uses-by-route tbody tr[data-key]"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        shown[row.get_attribute("data-key")] = (int(cells[1]), cells[2])
    assert shown == {**{r: (n, _yuan(f)) for r, (n, f) in by_route.items()}, "": (0, _yuan(breakage))}
    by_product = {}
    for (p, _c), (n, f) in sales.items():
        by_product[p] = (by_product.get(p, (0, 0))[0] + n, by_product.get(p, (0, 0))[1] + f)
    outstanding = {row.get_attribute("data-product"): [c.text for c in row.find_elements(By.TAG_NAME, "td")]
                   for row in driver.find_elements(By.CSS_SELECTOR, "#outstanding tbody tr")}
    assert {p: (int(c[1]), c[2]) for p, c in outstanding.items()} == {
        p: (n, _yuan(f)) for p, (n, f) in by_product.items()}
    assert outstanding["day1"][5] == _yuan(PASS) and outstanding["ride"][5] == _yuan(0)
    _shot(driver, "clerk-tickets-report")
    seen = {p.name for p in driver.downloads.iterdir()}
    driver.find_element(By.ID, "dl-csv-ticket_sales").click()
    rows = list(csv.reader(io.StringIO(_downloaded(driver, "-ticket_sales.csv", seen).read_text(encoding="utf-8-sig"))))
    money = rows[0].index("售票款(元) Sales (yuan)")
    assert {(r[0], r[1].split(" ")[0]): (int(r[2]), _money(r[money])) for r in rows[1:-1]} == {
        (p, {"web": "网上商城", "partner": "小程序/合作方"}[c]): v for (p, c), v in sales.items()}
    seen = {p.name for p in driver.downloads.iterdir()}
    driver.find_element(By.ID, "dl-xlsx").click()
    from openpyxl import load_workbook

    book = load_workbook(_downloaded(driver, ".xlsx", seen))
    sheet = book["ticket_outstanding"]
    values = list(sheet.iter_rows(values_only=True))
    assert float(values[-1][-1]) * 100 == deferred
    assert "tickets_by_route" in book.sheetnames

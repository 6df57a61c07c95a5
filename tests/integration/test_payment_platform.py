"""The payment platform, both ways, on SQLite and PostgreSQL: hardware_sim.payment.PlatformSimulator as a real HTTP
server, the back office's web app served by uvicorn on a loopback port (the simulator posts its notifications to
``/ota/webhook`` over HTTP), and backoffice.payments.platform.HttpPlatform calling the simulator.

Faults: lost answers (the platform did the work, the reply never came), duplicate, late and lost notifications,
a refund answered twice (its answer plus two notifications), the same statement twice, a statement with an extra and
a missing order. Every result is checked with plain SQL and against the simulator's own ledger (what money really
moved); the close report's figures against plain SQL sums, read back from the CSV and XLSX written.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import uvicorn
from sqlalchemy import text
from test_topup import KEYS, Clock, issued_card

from backoffice import registry
from backoffice.cards import topup
from backoffice.cards.payments import WebhookRefused
from backoffice.db import make_engine, upgrade
from backoffice.payments.close import close_figures
from backoffice.payments.platform import HttpPlatform, PlatformRefused, PlatformUnavailable
from backoffice.payments.service import (RefundError, fetch_statement, query_open_orders, refund,
                                         retry_pending_refunds, start_payment)
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest
from backoffice.web.api.ota import configure_ota
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from clearing.money import yuan
from hardware_sim.payment import TEST_MERCHANT_SECRET, PlatformSimulator
from reports.payments_close import TOTAL, write_close_report

START = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
DAY = date(2026, 12, 3)  # the platform's day (Asia/Shanghai)
OP = "coachco"
TICKET_KEYS = published_test_keys()
STAFF_TOKEN = "staff-token-for-payment-tests-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    def __init__(self, engine, url, clock, sim, platform, notify_url, card, app):
        self.engine, self.url, self.clock, self.sim, self.platform = engine, url, clock, sim, platform
        self.notify_url, self.card, self.app = notify_url, card, app
        self.api = notify_url.rsplit("/ota/", 1)[0]

    def buy(self, product="ride", quantity=1, channel="web") -> tuple[str, int]:
        with self.engine.begin() as conn:
            order_id = orders.create_order(conn, operator=OP, channel=channel, phone="13800000000",
                                           items=[ItemRequest(product, quantity)], who="rider", now=self.clock())
        (total,), = sql(self.engine, "SELECT total_fen FROM ticket_order WHERE order_id = :o", o=order_id)
        return order_id, total

    def topup(self, amount: int) -> str:
        with self.engine.begin() as conn:
            return topup.create_order(conn, asn=self.card.asn.hex(), rider="rider:13800000000", amount=amount,
                                      now=self.clock()).order_id

    def checkout(self, order_id: str, amount: int) -> str:
        """The rider goes to the platform's payment page and pays: the payment reference."""
        payment = start_payment(self.engine, self.platform, order_id=order_id, notify_url=self.notify_url)
        assert payment.amount == amount and payment.status == "created"
        return self.sim.rider_pays(order_id)

    def issue(self, order_id: str) -> list[int]:
        with self.engine.begin() as conn:
            return [t.ticket_id for t in orders.issue_tickets(conn, order_id, keys=TICKET_KEYS, who="shop",
                                                              now=self.clock())]


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    clock = Clock(START)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=START)
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=START)
        catalogue.add_product(conn, operator=OP, code="day", kind="day_pass", name="Day pass", price_fen=1500,
                              by="clerk", now=START)
        registry.add_route(conn, code="C1", operator=OP, name="City - Airport", flat_fare=200, at=START)
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Airport coach",
                              price_fen=3000, by="clerk", now=START)
    card = issued_card(engine, tmp_path, clock)
    sim = PlatformSimulator(clock=clock).start()
    app = create_app(engine, tokens=TokenStore(tokens={STAFF_TOKEN: Principal("carol", "operator_staff")}),
                     clock=clock, migrate=False)
    configure_ota(app, keys=KEYS, webhook_key=sim.public_key)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    platform = HttpPlatform(sim.url, merchant_id="farebox", secret=TEST_MERCHANT_SECRET, public_key=sim.public_key,
                            clock=clock)
    yield World(engine, url, clock, sim, platform, f"http://127.0.0.1:{port}/api/v1/ota/webhook", card, app)
    platform.close()
    server.should_exit = True
    thread.join(10)
    sim.stop()
    engine.dispose()


def paid_lines(engine, order_id: str) -> int:
    (n,), = sql(engine, "SELECT COUNT(*) FROM order_audit WHERE order_id = :o AND to_state = 'paid'", o=order_id)
    return n


def test_duplicate_and_late_notifications_and_the_query_pay_once(world):
    w = world
    a, a_fen = w.buy("ride", 2)
    w.sim.faults.lose_answers["payments"] = 1
    with pytest.raises(PlatformUnavailable):
        w.platform.create_payment(order_id=a, amount=a_fen, description="x", notify_url=w.notify_url)
    # asked again for the same order: the same payment (the platform made it once)
    assert w.platform.create_payment(order_id=a, amount=a_fen, description="x", notify_url=w.notify_url).status \
        == "created"
    w.sim.faults.notify = "duplicate"
    ref_a = w.sim.rider_pays(a)
    assert w.sim.delivered == [("payment", 200), ("payment", 200)]

    b, b_fen = w.buy("day")
    w.sim.faults.notify = "late"
    ref_b = w.checkout(b, b_fen)
    w.clock.tick(180)
    done = query_open_orders(w.engine, w.platform, now=w.clock())
    assert done.settled == [b] and done.asked == 1  # a was paid by its notification: not asked about
    assert w.sim.deliver_held() == 1  # the late notification after the query settled it
    assert w.sim.delivered[-1] == ("payment", 200)

    rows = sql(w.engine, "SELECT order_id, state, paid_fen, payment_ref FROM ticket_order ORDER BY paid_fen")
    assert [tuple(r) for r in rows] == [(a, "paid", a_fen, ref_a), (b, "paid", b_fen, ref_b)]
    assert paid_lines(w.engine, a) == 1 and paid_lines(w.engine, b) == 1
    # the platform collected each once: its own ledger
    assert sorted((e["order_id"], e["amount"]) for e in w.sim.ledger) == sorted([(a, a_fen), (b, b_fen)])
    events = sql(w.engine, "SELECT order_id, outcome FROM payment_event ORDER BY received_at, event_id")
    assert [e.order_id for e in events].count(a) == 1  # the duplicate delivery was the same event: seen
    (late,) = [e.outcome for e in events if e.order_id == b]
    assert "already_paid" in late


def test_a_lost_notification_is_settled_by_the_order_query_also_for_a_top_up(world):
    w = world
    w.sim.faults.notify = "drop"
    t = w.topup(3000)
    ref_t = w.checkout(t, 3000)
    k, k_fen = w.buy("ride")
    ref_k = w.checkout(k, k_fen)
    w.clock.tick(60)
    assert query_open_orders(w.engine, w.platform, now=w.clock()).asked == 0  # within the grace: not yet
    w.clock.tick(120)
    w.sim.faults.lose_answers["query"] = 1
    first = query_open_orders(w.engine, w.platform, now=w.clock())
    assert first.asked == 2 and first.unavailable == 1 and len(first.settled) == 1
    second = query_open_orders(w.engine, w.platform, now=w.clock())
    assert second.asked == 1 and len(second.settled) == 1
    assert set(first.settled + second.settled) == {t, k}
    assert query_open_orders(w.engine, w.platform, now=w.clock()).asked == 0
    assert [tuple(r) for r in sql(w.engine, "SELECT status, amount, payment_ref FROM topup_order "
                                            "WHERE order_id = :o", o=t)] == [("paid", 3000, ref_t)]
    assert [tuple(r) for r in sql(w.engine, "SELECT state, paid_fen, payment_ref FROM ticket_order "
                                            "WHERE order_id = :o", o=k)] == [("paid", k_fen, ref_k)]
    assert w.sim.delivered == []  # nothing was ever notified


def test_a_payment_after_the_order_expired_and_its_seat_was_sold_is_refunded_once(world):
    w = world
    with w.engine.begin() as conn:
        dep = catalogue.add_departure(conn, operator=OP, product="coach", route="C1", service_date=DAY,
                                      departs="18:30", seats=1).id

    def coach_order() -> str:
        with w.engine.begin() as conn:
            return orders.create_order(conn, operator=OP, channel="web", phone="13800000000",
                                       items=[ItemRequest("coach", 1, departure_id=dep)], who="rider", now=w.clock())

    a = coach_order()
    w.sim.faults.notify = "late"
    ref_a = w.checkout(a, 3000)  # paid at the last moment; the notification is held up
    w.clock.tick(16 * 60)
    with w.engine.begin() as conn:
        assert orders.expire_unpaid(conn, now=w.clock()) == [a]
    b = coach_order()  # the seat given back is sold to another rider
    w.sim.faults.notify = "normal"
    w.checkout(b, 3000)
    assert w.sim.deliver_held() == 1
    (pending,) = sql(w.engine, "SELECT refund_id, order_id, payment_ref, amount, state FROM payment_refund")
    assert (pending.order_id, pending.payment_ref, pending.amount, pending.state) == (a, ref_a, 3000, "pending")
    assert refunds_in_ledger(w.sim) == []  # queued with the payment, sent by the refund job
    w.clock.tick(60)
    (sent,) = retry_pending_refunds(w.engine, w.platform, now=w.clock())
    assert sent["refund_id"] == pending.refund_id and sent["state"] == "succeeded"
    assert refunds_in_ledger(w.sim) == [(a, 3000)]
    w.clock.tick(300)
    assert query_open_orders(w.engine, w.platform, now=w.clock()).asked == 0  # a's payment is known: not asked
    assert [tuple(r) for r in sql(w.engine, "SELECT state, paid_fen, refunded_fen FROM ticket_order "
                                            "WHERE order_id = :o", o=a)] == [("expired", 3000, 3000)]
    assert [tuple(r) for r in sql(w.engine, "SELECT seats_taken FROM departure WHERE id = :d", d=dep)] == [(1,)]


def refunds_in_ledger(sim) -> list[tuple[str, int]]:
    return sorted((e["order_id"], e["amount"]) for e in sim.ledger if e["kind"] == "refund")


def test_refunds_exactly_once_under_a_lost_answer_and_an_answer_given_twice(world):
    w = world
    k, k_fen = w.buy("ride", 3)
    w.checkout(k, k_fen)
    tickets = w.issue(k)
    with w.engine.begin() as conn:
        assert orders.record_use(conn, tickets[0], who="bus 7", at=w.clock()) == 1

    # the platform refunds, and its answer is lost: the row stays pending, the money moved once
    w.sim.faults.lose_answers["refunds"] = 1
    row = refund(w.engine, w.platform, order_id=k, who="clerk", why="rider asked", now=w.clock())
    assert row["state"] == "pending" and row["attempts"] == 1 and row["amount"] == 400
    assert refunds_in_ledger(w.sim) == [(k, 400)]
    assert retry_pending_refunds(w.engine, w.platform, now=w.clock()) == []  # too soon to send again
    w.clock.tick(60)
    (again,) = retry_pending_refunds(w.engine, w.platform, now=w.clock())
    assert again["refund_id"] == row["refund_id"] and again["state"] == "succeeded" and again["attempts"] == 2
    assert retry_pending_refunds(w.engine, w.platform, now=w.clock()) == []
    assert refunds_in_ledger(w.sim) == [(k, 400)]
    assert list(w.sim.refunds) == [row["refund_id"]]

    # the used ticket is not refundable: no row, no call to the platform
    calls = len(w.sim.calls)
    with pytest.raises(RefundError) as refused:
        refund(w.engine, w.platform, order_id=k, who="clerk", why="again", ticket_ids=[tickets[0]], now=w.clock())
    assert refused.value.code == "not_refundable" and len(w.sim.calls) == calls

    # answered twice (the call's answer and two notifications of it): recorded once
    d, d_fen = w.buy("day")
    w.checkout(d, d_fen)
    w.issue(d)
    w.sim.faults.refund_twice = True
    row2 = refund(w.engine, w.platform, order_id=d, who="clerk", why="rider asked", now=w.clock())
    assert row2["state"] == "succeeded"
    assert [s for kind, s in w.sim.delivered if kind == "refund"] == [200, 200]

    # a paid, unloaded top-up is refunded; an unpaid one is not (nothing to refund, no call)
    t = w.topup(2500)
    w.checkout(t, 2500)
    assert refund(w.engine, w.platform, order_id=t, who="staff", why="rider asked", now=w.clock())["state"] \
        == "succeeded"
    unpaid = w.topup(800)
    calls = len(w.sim.calls)
    with pytest.raises(RefundError):
        refund(w.engine, w.platform, order_id=unpaid, who="staff", why="x", now=w.clock())
    assert len(w.sim.calls) == calls

    rows = sql(w.engine, "SELECT refund_id, order_id, amount, state, platform_ref FROM payment_refund "
                         "ORDER BY amount")
    assert [(r.order_id, r.amount, r.state) for r in rows] == [(k, 400, "succeeded"), (d, 1500, "succeeded"),
                                                               (t, 2500, "succeeded")]
    assert {r.refund_id: r.platform_ref for r in rows} == {rid: v["refund_ref"] for rid, v in w.sim.refunds.items()}
    assert refunds_in_ledger(w.sim) == sorted([(k, 400), (d, 1500), (t, 2500)])
    assert [tuple(r) for r in sql(w.engine, "SELECT state, COUNT(*) FROM ticket WHERE order_id = :o "
                                            "GROUP BY state ORDER BY state", o=k)] == [("refunded", 2), ("used", 1)]
    assert [tuple(r) for r in sql(w.engine, "SELECT refunded_fen FROM ticket_order WHERE order_id = :o", o=k)] \
        == [(400,)]
    assert [tuple(r) for r in sql(w.engine, "SELECT status FROM topup_order WHERE order_id = :o", o=t)] \
        == [("refunded",)]


def test_staff_refund_a_top_up_over_http_through_the_platform_once(world):
    import httpx

    w = world
    t = w.topup(4000)
    w.checkout(t, 4000)
    w.app.state.payment_platform = w.platform  # as farebox serve does with FAREBOX_PAYMENT_URL set
    w.sim.faults.lose_answers["refunds"] = 1
    staff = {"Authorization": f"Bearer {STAFF_TOKEN}"}
    r = httpx.post(f"{w.api}/topups/orders/{t}/refund", json={"why": "rider asked"}, headers=staff)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "refunded" and r.json()["refund"]["state"] == "pending"
    again = httpx.post(f"{w.api}/topups/orders/{t}/refund", json={"why": "clicked again"}, headers=staff)
    assert again.status_code == 409 and again.json()["detail"]["reason"] == "bad_state"
    w.clock.tick(60)
    (sent,) = retry_pending_refunds(w.engine, w.platform, now=w.clock())
    assert sent["state"] == "succeeded" and sent["refund_id"] == r.json()["refund"]["refund_id"]
    assert refunds_in_ledger(w.sim) == [(t, 4000)]
    assert [tuple(x) for x in sql(w.engine, "SELECT order_id, amount, state FROM payment_refund")] == [
        (t, 4000, "succeeded")]


def test_a_refund_the_platform_refuses_goes_to_the_work_list(world):
    w = world
    k, k_fen = w.buy("day")
    w.checkout(k, k_fen)
    w.issue(k)
    w.sim.faults.refuse_refunds = 1
    row = refund(w.engine, w.platform, order_id=k, who="clerk", why="rider asked", now=w.clock())
    assert row["state"] == "failed" and "refund_refused" in row["answer"]
    assert refunds_in_ledger(w.sim) == []
    w.clock.tick(60)
    assert retry_pending_refunds(w.engine, w.platform, now=w.clock()) == []  # refused is an answer: not resent
    assert [tuple(r) for r in sql(w.engine, "SELECT order_id, problem, ours, theirs, status FROM payment_recon_item")] \
        == [(row["refund_id"], "refund_refused", k_fen, None, "open")]


def day_of_sales(w) -> dict:
    """A day: ticket sales on three channels and a top-up, a part refund and a top-up refund."""
    web, web_fen = w.buy("ride", 2, channel="web")
    w.checkout(web, web_fen)
    sms, sms_fen = w.buy("day", channel="sms")
    w.checkout(sms, sms_fen)
    counter, counter_fen = w.buy("ride", channel="counter")
    w.checkout(counter, counter_fen)
    t = w.topup(5000)
    w.checkout(t, 5000)
    t2 = w.topup(2000)
    w.checkout(t2, 2000)
    first, _ = w.issue(web)
    refund(w.engine, w.platform, order_id=web, who="clerk", why="one rider fewer", ticket_ids=[first],
           now=w.clock())
    refund(w.engine, w.platform, order_id=t2, who="staff", why="rider asked", now=w.clock())
    return {"web": web, "sms": sms, "counter": counter, "topup": t}


def fen(text_yuan) -> int:
    d = Decimal(str(text_yuan)) * 100
    assert d == d.to_integral_value()
    return int(d)


def test_the_statement_is_stored_once_reconciled_and_the_close_ties_to_the_fen(world, tmp_path):
    w = world
    ids = day_of_sales(w)
    w.sim.faults.statement_extra = [{"kind": "payment", "order_id": "TKGHOST0001", "ref": "pay_ghost",
                                     "amount": 990, "fee": 6, "at": w.clock()}]
    w.sim.faults.statement_omit = {ids["counter"]}
    stored, items = fetch_statement(w.engine, w.platform, day=DAY, now=w.clock())
    again, items_again = fetch_statement(w.engine, w.platform, day=DAY, now=w.clock())
    assert stored.new and not again.new and again.statement_id == stored.statement_id and items_again == []
    assert sql(w.engine, "SELECT COUNT(*) FROM payment_statement") == [(1,)]
    body = w.sim.statement(DAY)
    assert sql(w.engine, "SELECT COUNT(*) FROM payment_statement_line") == [(len(body.strip().splitlines()) - 1,)]
    work = sql(w.engine, "SELECT order_id, problem, ours, theirs, status FROM payment_recon_item ORDER BY problem")
    counter_fen = 200
    assert [tuple(r) for r in work] == [(ids["counter"], "payment_missing_in_statement", counter_fen, None, "open"),
                                        ("TKGHOST0001", "payment_not_in_farebox", None, 990, "open")]
    assert {(i.ref, i.problem) for i in items} == {(r.order_id, r.problem) for r in work}

    with w.engine.connect() as conn:
        close = close_figures(conn, day=DAY)
    paths = write_close_report(close, tmp_path / "reports", generated_at=w.clock())
    assert [p.name for p in paths] == ["payments-close-2026-12-03.pdf", "payments-close-2026-12-03-by_channel.csv",
                                       "payments-close-2026-12-03-tie_out.csv", "payments-close-2026-12-03.xlsx"]
    assert paths[0].read_bytes().startswith(b"%PDF")

    # the books in plain SQL (every time of this test is inside DAY)
    (tickets_fen,), = sql(w.engine, "SELECT SUM(paid_fen) FROM ticket_order WHERE payment_ref IS NOT NULL")
    (topups_fen,), = sql(w.engine, "SELECT SUM(amount) FROM topup_order WHERE payment_ref IS NOT NULL")
    (refunds_fen,), = sql(w.engine, "SELECT SUM(amount) FROM payment_refund WHERE state = 'succeeded'")
    (fees_fen,), = sql(w.engine, "SELECT SUM(fee) FROM payment_statement_line WHERE kind = 'payment'")
    sales = tickets_fen + topups_fen
    assert (sales, refunds_fen) == (400 + 1500 + 200 + 5000 + 2000, 200 + 2000)
    # the fees: what the simulator's ledger says it kept, the omitted order's fee out, the extra line's in
    assert fees_fen == sum(e["fee"] for e in w.sim.ledger if e["kind"] == "payment"
                           and e["order_id"] != ids["counter"]) + 6

    with (tmp_path / "reports" / "payments-close-2026-12-03-by_channel.csv").open(encoding="utf-8-sig") as f:
        table = list(csv.DictReader(f))
    total = table[-1]
    assert total["渠道 Channel"] == TOTAL
    assert fen(total["销售(元) Sales (yuan)"]) == sales
    assert fen(total["退款(元) Refunds (yuan)"]) == refunds_fen
    assert fen(total["手续费(元) Fees (yuan)"]) == fees_fen
    assert fen(total["净额(元) Net (yuan)"]) == sales - refunds_fen - fees_fen
    assert int(total["笔数 Payments"]) == 5 and int(total["退款笔数 Refunds"]) == 2
    channels = {r["渠道 Channel"]: r for r in table[:-1]}
    assert fen(channels["空中充值 Over-the-air top-up"]["销售(元) Sales (yuan)"]) == topups_fen
    assert fen(channels["短信 SMS"]["销售(元) Sales (yuan)"]) == 1500

    import openpyxl

    ws = openpyxl.load_workbook(paths[3])["by_channel"]
    last = [c.value for c in ws[ws.max_row]]
    assert last[0] == TOTAL and [fen(v) for v in (last[2], last[4], last[5], last[6])] == [
        sales, refunds_fen, fees_fen, sales - refunds_fen - fees_fen]
    with (tmp_path / "reports" / "payments-close-2026-12-03-tie_out.csv").open(encoding="utf-8-sig") as f:
        tie = {r["项目 Item"]: r for r in csv.DictReader(f)}
    # the statement's sales: the books' less the omitted order, plus the extra one
    assert fen(tie["销售 Sales"]["差额(元) Difference (yuan)"]) == 990 - counter_fen
    assert fen(tie["退款 Refunds"]["差额(元) Difference (yuan)"]) == 0
    assert fen(tie["结算净额 Net settled"]["差额(元) Difference (yuan)"]) == 990 - counter_fen
    if shutil.which("pdftotext"):  # the paper says the same totals
        words = subprocess.run(["pdftotext", "-layout", str(paths[0]), "-"], capture_output=True, text=True).stdout
        (line,) = [ln for ln in words.splitlines() if ln.strip().startswith(TOTAL)]
        assert line.split()[2:] == ["5", yuan(sales), "2", yuan(refunds_fen), yuan(fees_fen),
                                    yuan(sales - refunds_fen - fees_fen)]

    # the platform sends a corrected file: stored beside the first, the close now reads it and ties to the fen
    w.sim.faults.statement_extra, w.sim.faults.statement_omit = [], set()
    corrected, new_items = fetch_statement(w.engine, w.platform, day=DAY, now=w.clock())
    assert corrected.new and corrected.statement_id != stored.statement_id and new_items == []
    with w.engine.connect() as conn:
        close = close_figures(conn, day=DAY)
    assert close.statement_id == corrected.statement_id
    assert (close.statement_sales, close.statement_refunds) == (sales, refunds_fen)


@pytest.mark.parametrize("world", ["sqlite"], indirect=True)  # the same use cases run on PostgreSQL above
def test_farebox_payments_at_the_command_line(world, tmp_path):
    w = world
    w.clock.now = datetime.now(UTC).replace(microsecond=0)  # the CLI signs and checks with the real clock
    w.sim.faults.notify = "drop"
    k, k_fen = w.buy("day")
    ref = w.checkout(k, k_fen)
    env = {key: v for key, v in os.environ.items() if not key.startswith("FAREBOX_")}
    env.update(FAREBOX_VAR_DIR=str(tmp_path / "var"), FAREBOX_INSECURE_TEST_KEYS="1", FAREBOX_DATABASE_URL=w.url,
               FAREBOX_PAYMENT_URL=w.sim.url, FAREBOX_PAYMENT_MERCHANT="farebox",
               FAREBOX_PAYMENT_SECRET=TEST_MERCHANT_SECRET.hex())

    def farebox(*args):
        return subprocess.run([sys.executable, "-m", "farebox.cli", "payments", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    q = farebox("query", k)
    assert q.returncode == 0, q.stderr
    assert "settled 1" in q.stdout and f"{k}: paid" in q.stdout
    assert [tuple(r) for r in sql(w.engine, "SELECT state, payment_ref FROM ticket_order WHERE order_id = :o",
                                  o=k)] == [("paid", ref)]
    r = farebox("refund", k, "--by", "clerk", "--why", "rider asked")
    assert r.returncode == 0, r.stderr
    assert "¥15.00, succeeded" in r.stdout
    day = w.clock().astimezone(__import__("zoneinfo").ZoneInfo("Asia/Shanghai")).date()
    for _ in range(2):
        s = farebox("statement", "fetch", "--day", day.isoformat())
        assert s.returncode == 0, s.stderr
    assert "stored already" in s.stdout
    assert sql(w.engine, "SELECT COUNT(*) FROM payment_statement") == [(1,)]
    c = farebox("close-report", "--day", day.isoformat(), "--out", str(tmp_path / "out"))
    assert c.returncode == 0, c.stderr
    fee = sum(e["fee"] for e in w.sim.ledger if e["kind"] == "payment")
    assert f"sales ¥15.00, refunds ¥15.00, fees ¥{fee // 100}.{fee % 100:02d}" in c.stdout
    assert (tmp_path / "out" / f"payments-close-{day.isoformat()}.xlsx").exists()


def test_the_scheduler_fetches_the_last_days_statements_once(world, tmp_path):
    from backoffice import jobs
    from backoffice.scheduler import add_payment_jobs, make_scheduler, stop_scheduler

    w = world
    scheduler = make_scheduler(w.engine)
    scheduler.start(paused=True)
    try:
        jobs.bind(w.engine, reports_dir=tmp_path / "reports")
        assert sorted(add_payment_jobs(scheduler, w.platform)) == ["payments:query", "payments:refunds",
                                                                   "payments:statements"]
    finally:
        stop_scheduler(scheduler, wait=False)
    k, k_fen = w.buy("day")
    w.checkout(k, k_fen)
    r, r_fen = w.buy("ride", 2, channel="sms")
    w.checkout(r, r_fen)
    w.issue(r)
    w.sim.faults.lose_answers["refunds"] = 1  # answered on the retry: still one refund on the statement
    refund(w.engine, w.platform, order_id=r, who="clerk", why="rider asked", now=w.clock())
    w.clock.tick(60)
    retry_pending_refunds(w.engine, w.platform, now=w.clock())
    t = w.topup(1000)
    w.checkout(t, 1000)
    w.clock.now = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)  # 11:00 the next morning in Shanghai
    done = jobs.payments_statements(now=w.clock())
    assert [(s.day, s.new, s.lines) for s, _ in done] == [(date(2026, 12, 1), True, 0), (date(2026, 12, 2), True, 0),
                                                         (DAY, True, 4)]
    assert [items for _, items in done] == [[], [], []]  # a clean day reconciles to zero differences
    assert (tmp_path / "reports" / "payments" / "payments-close-2026-12-03.pdf").exists()
    again = jobs.payments_statements(now=w.clock())  # the same files again (a second scheduler, a rerun)
    assert [s.new for s, _ in again] == [False, False, False]
    assert sql(w.engine, "SELECT day, lines FROM payment_statement ORDER BY day")[-1][1] == 4
    assert sql(w.engine, "SELECT COUNT(*) FROM payment_statement") == [(3,)]
    assert sql(w.engine, "SELECT COUNT(*) FROM payment_recon_item") == [(0,)]


def test_forged_notifications_and_answers_are_not_believed(world):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from hardware_sim.payment import PaymentPlatform

    w = world
    k, k_fen = w.buy("day")
    w.sim.faults.notify = "drop"
    start_payment(w.engine, w.platform, order_id=k, notify_url=w.notify_url)
    forger = PaymentPlatform(Ed25519PrivateKey.generate().private_bytes_raw(), clock=w.clock)
    import httpx

    forged = forger.pay(k, k_fen)
    r = httpx.post(w.notify_url, content=forged.body, headers={"X-Payment-Signature": forged.signature})
    assert r.status_code == 401
    with pytest.raises(WebhookRefused):  # the adapter's own check says the same
        w.platform.verify_notification(forged.body, forged.signature, now=w.clock())
    genuine = w.sim.pay(k, k_fen)
    assert w.platform.verify_notification(genuine.body, genuine.signature, now=w.clock())["order_id"] == k
    # genuinely signed, but for another amount than the order's (a notification of another order, replayed here)
    other = w.sim.pay(k, 1)
    r = httpx.post(w.notify_url, content=other.body, headers={"X-Payment-Signature": other.signature})
    assert r.status_code == 200 and "amount_mismatch" in r.json()["outcome"]
    # the platform's answers seen through a key that is not the platform's: nothing settled, nothing refunded
    w.sim.rider_pays(k)
    w.clock.tick(180)
    wrong = HttpPlatform(w.sim.url, merchant_id="farebox", secret=TEST_MERCHANT_SECRET,
                         public_key=forger.public_key, clock=w.clock)
    done = query_open_orders(w.engine, wrong, now=w.clock())
    assert (done.asked, done.unavailable, done.settled) == (1, 1, [])
    # a merchant signature made with another secret: the platform refuses to answer anything
    stranger = HttpPlatform(w.sim.url, merchant_id="farebox", secret=b"not-the-merchant-secret-0000",
                            public_key=w.sim.public_key, clock=w.clock)
    with pytest.raises(PlatformRefused) as refused:
        stranger.query_order(k)
    assert refused.value.status == 401
    assert [tuple(r) for r in sql(w.engine, "SELECT state, payment_ref FROM ticket_order WHERE order_id = :o",
                                  o=k)] == [("created", None)]
    assert query_open_orders(w.engine, w.platform, now=w.clock()).settled == [k]


def test_at_the_same_moment_a_notification_and_a_query_pay_once_and_two_refund_jobs_refund_once(world):
    w = world
    k, k_fen = w.buy("day")
    w.sim.faults.notify = "late"
    ref = w.checkout(k, k_fen)
    w.clock.tick(180)
    barrier = threading.Barrier(2)
    results = {}

    def notify():
        barrier.wait()
        results["notify"] = w.sim.deliver_held()

    def query():
        barrier.wait()
        results["query"] = query_open_orders(w.engine, w.platform, now=w.clock())

    threads = [threading.Thread(target=notify), threading.Thread(target=query)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["notify"] == 1 and w.sim.delivered == [("payment", 200)]
    assert [tuple(r) for r in sql(w.engine, "SELECT state, paid_fen, payment_ref FROM ticket_order "
                                            "WHERE order_id = :o", o=k)] == [("paid", k_fen, ref)]
    assert paid_lines(w.engine, k) == 1

    # two back-office processes' refund jobs pick the same pending refund at once: one refund on the platform
    w.issue(k)
    w.sim.faults.lose_answers["refunds"] = 1
    row = refund(w.engine, w.platform, order_id=k, who="clerk", why="rider asked", now=w.clock())
    assert row["state"] == "pending"
    w.clock.tick(60)
    answers = []

    def job():
        barrier.wait()
        answers.extend(retry_pending_refunds(w.engine, w.platform, now=w.clock()))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers and all(a["refund_id"] == row["refund_id"] for a in answers)
    assert refunds_in_ledger(w.sim) == [(k, k_fen)]
    assert [tuple(r) for r in sql(w.engine, "SELECT refund_id, state, amount FROM payment_refund")] == [
        (row["refund_id"], "succeeded", k_fen)]


def test_revision_0022_builds_what_the_tables_describe_and_downgrades_alone_and_back(tmp_path, request):
    from alembic import command
    from sqlalchemy import MetaData

    from backoffice.db import alembic_config
    from backoffice.payments import tables

    for url in (f"sqlite:///{tmp_path}/m.db", request.getfixturevalue("pg_schema_url")):
        engine = make_engine(url)
        upgrade(engine)
        reflected = MetaData()
        reflected.reflect(engine)
        for table in (tables.refund, tables.statement, tables.statement_line):
            got = reflected.tables[table.name]
            assert set(got.columns.keys()) == set(table.columns.keys()), table.name
            for column in table.columns:
                assert got.columns[column.name].nullable == column.nullable, f"{table.name}.{column.name}"
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "2026_12_03_0022@-1")  # this revision alone; other heads on 0020 stay
        reflected = MetaData()
        reflected.reflect(engine)
        assert "payment_refund" not in reflected.tables and "ticket_order" in reflected.tables
        upgrade(engine)
        reflected = MetaData()
        reflected.reflect(engine)
        assert {"payment_refund", "payment_statement", "payment_statement_line"} <= set(reflected.tables)
        engine.dispose()

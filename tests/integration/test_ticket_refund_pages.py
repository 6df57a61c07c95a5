"""Refunds of tickets over HTTP, on SQLite and PostgreSQL: the counter staff's ticket order page
(backoffice.web.pages_ticket_orders: /tickets/orders/{id}, its refund and "send again" buttons) and the partner API's
refund, both through backoffice.payments.service.refund, against the payment platform simulator as a real HTTP
server that loses the refund's answer once. The rider pays on the simulator's own payment page (a form post, as the
browser does); one ticket is used at the counter by its pickup code. What must hold, read back in plain SQL and in
the simulator's own ledger: only unused tickets are refunded, for the sum of their prices; one refund row, one refund
id, one payout on the platform however often the button is pressed or the refund sent again; a used ticket stays
used; the platform's reference is recorded once the answer comes."""

from __future__ import annotations

import re
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from sqlalchemy import text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.keyservice import LocalKeyService
from backoffice.payments import service as payments
from backoffice.payments.platform import HttpPlatform
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.web.api.ota import configure_ota
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from backoffice.web.shop_service import configure_shop
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.payment import TEST_MERCHANT_SECRET, PlatformSimulator

START = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
OP = "coachco"
KEYS = published_test_keys()
TOKENS = {"t-partner": Principal("coach-app", "partner", OP), "t-staff": Principal("dora", "operator_staff", None),
          "t-clerk": Principal("alice", "clerk", OP)}


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def make_world(url: str, start: datetime = START):
    """(world dict, stop()): the back office on uvicorn, the platform simulator, a coach and a ride product, a coach
    departure the next service day; the clock stands at ``start``."""
    engine = make_engine(url)
    upgrade(engine)
    clock = Clock(start)
    tomorrow = orders.service_day_of(start, "Asia/Shanghai", 3) + timedelta(days=1)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=start - timedelta(days=9))
        registry.add_route(conn, code="C1", operator=OP, name="City - Airport", flat_fare=200,
                           at=start - timedelta(days=9))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=start)
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Airport coach",
                              price_fen=3000, by="clerk", now=start)
        dep = catalogue.add_departure(conn, operator=OP, product="coach", route="C1", service_date=tomorrow,
                                      departs="08:30", seats=3).id
    sim = PlatformSimulator(clock=clock).start()
    app = create_app(engine, tokens=TokenStore(tokens=TOKENS), clock=clock, migrate=False)
    port = free_port()
    configure_ota(app, keys=LocalKeyService(TEST_ISSUER_KEYS, source="test keys"), webhook_key=sim.public_key)
    platform = HttpPlatform(sim.url, merchant_id="farebox", secret=TEST_MERCHANT_SECRET, public_key=sim.public_key,
                            clock=clock)
    configure_shop(app, ticket_keys=KEYS, platform=platform, notify_url=f"http://127.0.0.1:{port}/api/v1/ota/webhook")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{port}"
    partner = httpx.Client(base_url=f"{base}/api/v1/partner", timeout=30, headers={"Authorization": "Bearer t-partner"})
    world = {"engine": engine, "sim": sim, "dep": dep, "base": base, "partner": partner, "platform": platform,
             "clock": clock}

    def stop():
        partner.close()
        platform.close()
        server.should_exit = True
        thread.join(10)
        sim.stop()
        engine.dispose()

    return world, stop


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    w, stop = make_world(url)
    yield w
    stop()


def paid_order(world, number: str, *, rides: int = 2) -> tuple[str, list[dict]]:
    """A partner order of one coach seat and ``rides`` rides, paid on the simulator's payment page (the rider's
    form post; the page sends the browser back to the shop's return URL), its tickets issued."""
    made = world["partner"].post("/orders", json={"partner_order_no": number, "phone": "13800138000", "items": [
        {"product": "coach", "quantity": 1, "departure_id": world["dep"]},
        {"product": "ride", "quantity": rides}]})
    assert made.status_code == 201, made.text
    order_id, pay_url = made.json()["order_id"], made.json()["pay_url"]
    back = f"{world['base']}/shop/{OP}/orders/{order_id}"
    page = httpx.get(pay_url, params={"return_url": back})
    total = 3000 + 200 * rides
    assert page.status_code == 200 and f'id="amount">¥{total // 100}.{total % 100:02d}<' in page.text, page.text
    paid = httpx.post(pay_url, data={"action": "pay", "return_url": back})
    assert paid.status_code == 303 and paid.headers["location"] == back
    tickets = world["partner"].get(f"/orders/{number}/tickets").json()["tickets"]
    assert len(tickets) == 1 + rides
    return order_id, tickets


def staff_session(world, token: str = "t-staff") -> httpx.Client:
    c = httpx.Client(base_url=world["base"], timeout=30, headers={"Accept-Language": "en"})
    r = c.post("/login", data={"token": token, "next": "/tickets/orders"})
    assert r.status_code == 303, r.text
    return c


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def refundable_in_sql(engine, order_id: str) -> int:
    """Independently: unused tickets still valid (the coach has not left: the clock is before it)."""
    return sql(engine, "SELECT COALESCE(SUM(price_fen), 0) FROM ticket WHERE order_id = :o AND state = 'issued' "
                       "AND uses_made = 0", o=order_id)[0][0]


def test_staff_refund_an_order_once_though_the_platform_loses_the_answer(world):
    engine, sim = world["engine"], world["sim"]
    order_id, tickets = paid_order(world, "P-1")
    ride = next(t for t in tickets if t["kind"] == "single")
    used = httpx.post(f"{world['base']}/api/v1/tickets/redeem", headers={"Authorization": "Bearer t-staff"},
                      json={"operator": OP, "code": ride["pickup_code"], "station": "Airport"}, timeout=30)
    assert used.status_code == 200, used.text

    staff = staff_session(world)
    page = staff.get(f"/tickets/orders/{order_id}")
    assert page.status_code == 200
    refundable = refundable_in_sql(engine, order_id)
    assert refundable == 3000 + 200  # the coach seat and the unused ride; the used ride is not refundable
    assert re.search(r'id="refundable">[^<]*<strong>¥32\.00</strong>', page.text)
    assert "Airport" in page.text and f"<code>{ride['ticket_id']}</code>" in page.text  # its use is shown
    assert f"{ride['ticket_id']}: the ticket is used" in page.text

    # the platform pays the refund out but its answer never arrives
    sim.faults.lose_answers["refunds"] = 1
    r = staff.post(f"/tickets/orders/{order_id}/refund", data={"csrf": csrf_of(page.text), "why": "trip cancelled"})
    assert r.status_code == 200, r.text
    assert 'id="done-state">waiting for the platform' in r.text
    (refund_id, amount, state, attempts, tickets_voided), = sql(
        engine, "SELECT refund_id, amount, state, attempts, ticket_ids FROM payment_refund WHERE order_id = :o",
        o=order_id)
    assert (amount, state, attempts) == (refundable, "pending", 1)
    assert sorted(int(t) for t in tickets_voided.split()) == sorted(
        t["ticket_id"] for t in tickets if t["ticket_id"] != ride["ticket_id"])
    assert sql(engine, "SELECT state, uses_made FROM ticket WHERE ticket_id = :t", t=ride["ticket_id"]) == [
        ("used", 1)]
    assert [(e["kind"], e["ref"], e["amount"]) for e in sim.ledger if e["kind"] == "refund"] == [
        ("refund", refund_id, refundable)]  # paid out once already

    # pressed again: nothing left to refund, no second row
    again = staff.post(f"/tickets/orders/{order_id}/refund", data={"csrf": csrf_of(r.text), "why": "again"})
    assert again.status_code == 409 and 'id="form-error"' in again.text
    # sent again: the same refund id; the platform answers the refund it made, no second payout
    sent = staff.post(f"/tickets/orders/{order_id}/refunds/{refund_id}/send", data={"csrf": csrf_of(r.text)})
    assert sent.status_code == 200 and 'id="done-state">paid back' in sent.text
    assert sql(engine, "SELECT refund_id, state, attempts, platform_ref FROM payment_refund WHERE order_id = :o",
               o=order_id) == [(refund_id, "succeeded", 2, sim.refunds[refund_id]["refund_ref"])]
    assert len(sim.refunds) == 1
    assert sum(e["amount"] for e in sim.ledger if e["kind"] == "refund") == refundable
    assert sql(engine, "SELECT paid_fen, refunded_fen FROM ticket_order WHERE order_id = :o", o=order_id) == [
        (3400, refundable)]
    # the coach seat is free again
    assert sql(engine, "SELECT seats_taken FROM departure WHERE id = :d", d=world["dep"]) == [(0,)]
    # the page shows the refund answered and the audit line with the staff's reason
    final = staff.get(f"/tickets/orders/{order_id}").text
    assert f'id="refund-{refund_id}"' in final and "trip cancelled" in final and "send-again" not in final
    # a clerk does not own the page; an unknown order is 404
    clerk = staff_session(world, "t-clerk")
    assert clerk.get(f"/tickets/orders/{order_id}").status_code == 403
    assert staff.get("/tickets/orders/TO-nope").status_code == 404
    assert staff.get("/tickets/orders", params={"q": order_id}).headers.get("location") == \
        f"/tickets/orders/{order_id}"
    staff.close()
    clerk.close()


def test_the_partner_refund_under_a_lost_answer_is_sent_again_by_the_job_with_the_same_id(world):
    engine, sim, partner, clock = world["engine"], world["sim"], world["partner"], world["clock"]
    order_id, tickets = paid_order(world, "P-2", rides=1)
    sim.faults.lose_answers["refunds"] = 1
    r = partner.post("/orders/P-2/refund", json={"reason": "rider changed plans"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["state"] == "pending" and answer["amount_fen"] == 3200
    assert sorted(answer["ticket_ids"]) == sorted(t["ticket_id"] for t in tickets)
    assert partner.post("/orders/P-2/refund", json={"reason": "again"}).status_code == 409
    clock.now += timedelta(minutes=1)
    done = payments.retry_pending_refunds(engine, world["platform"], now=clock.now)
    assert [(d["refund_id"], d["state"]) for d in done] == [(answer["refund_id"], "succeeded")]
    assert sql(engine, "SELECT COUNT(*), SUM(amount) FROM payment_refund WHERE order_id = :o", o=order_id) == [
        (1, 3200)]
    assert [(e["ref"], e["amount"]) for e in sim.ledger if e["kind"] == "refund"] == [(answer["refund_id"], 3200)]
    assert partner.get("/orders/P-2").json()["state"] == "refunded"


def test_the_platforms_payment_page_cancel_and_a_return_url_it_will_not_follow():
    """The simulator's rider page on its own: cancel sends the browser back and collects nothing; a return URL that
    is not http(s) is not followed; an unknown payment is 404; paying twice collects once."""
    with PlatformSimulator() as sim:
        platform = HttpPlatform(sim.url, merchant_id="farebox", secret=TEST_MERCHANT_SECRET, public_key=sim.public_key)
        pay_url = platform.create_payment(order_id="TK-page", amount=1234, description="two rides",
                                          notify_url="").pay_url
        assert pay_url == f"{sim.url}/pay/TK-page"
        page = httpx.get(pay_url, params={"return_url": "https://shop.example/orders/TK-page"})
        assert 'id="amount">¥12.34<' in page.text and 'value="https://shop.example/orders/TK-page"' in page.text
        back = httpx.post(pay_url, data={"action": "cancel", "return_url": "https://shop.example/orders/TK-page"})
        assert back.status_code == 303 and back.headers["location"] == "https://shop.example/orders/TK-page"
        assert sim.ledger == [] and platform.query_order("TK-page").status == "created"
        odd = httpx.post(pay_url, data={"action": "pay", "return_url": "javascript:alert(1)"})
        assert odd.status_code == 200 and 'id="paid"' in odd.text and "javascript" not in odd.text
        httpx.post(pay_url, data={"action": "pay"})
        assert [(e["kind"], e["amount"]) for e in sim.ledger] == [("payment", 1234)]
        assert platform.query_order("TK-page").status == "paid"
        assert httpx.get(f"{sim.url}/pay/TK-nope").status_code == 404
        platform.close()

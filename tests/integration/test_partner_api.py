"""The partner API (backoffice.web.api.partner) over HTTP, on SQLite and PostgreSQL: the back office served by
uvicorn on a loopback port, the payment platform simulator (hardware_sim.payment.PlatformSimulator) as a real HTTP
server posting its notifications there, and a partner token bound to one operator. The partner's order number is
the idempotency key: sent again, also by eight clients at once, it makes one order and holds one set of seats; the
rider pays on the simulator, the tickets come back as tokens that verify with wire.ticket and pickup codes whose
check digits hold; a refund goes through the platform once. Every figure is read back with plain SQL."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
import uvicorn
from sqlalchemy import text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.keyservice import LocalKeyService
from backoffice.payments.platform import HttpPlatform
from backoffice.tickets import catalogue
from backoffice.tickets.keys import published_test_keys
from backoffice.web.api.ota import configure_ota
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from backoffice.web.shop_service import configure_shop
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.payment import TEST_MERCHANT_SECRET, PlatformSimulator
from wire.ticket import check_pickup_code, decode_ticket

START = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai, service day 2026-12-03
TOMORROW = date(2026, 12, 4)
OP, OTHER = "coachco", "otherco"
KEYS = published_test_keys()
TOKENS = {"t-partner": Principal("coach-app", "partner", OP), "t-other": Principal("other-app", "partner", OTHER),
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


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    clock = Clock(START)
    with engine.begin() as conn:
        for code in (OP, OTHER):
            registry.add_operator(conn, code=code, name=code.title(), at=START - timedelta(days=9))
        registry.add_route(conn, code="C1", operator=OP, name="City - Airport", flat_fare=200,
                           at=START - timedelta(days=9))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=START)
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Airport coach",
                              price_fen=3000, by="clerk", now=START)
        catalogue.add_product(conn, operator=OTHER, code="ride", kind="single", name="Other ride", price_fen=300,
                              by="clerk", now=START)
        dep = catalogue.add_departure(conn, operator=OP, product="coach", route="C1", service_date=TOMORROW,
                                      departs="08:30", seats=3).id
    sim = PlatformSimulator(clock=clock).start()
    app = create_app(engine, tokens=TokenStore(tokens=TOKENS), clock=clock, migrate=False)
    port = free_port()
    notify = f"http://127.0.0.1:{port}/api/v1/ota/webhook"
    configure_ota(app, keys=LocalKeyService(TEST_ISSUER_KEYS, source="test keys"), webhook_key=sim.public_key)
    platform = HttpPlatform(sim.url, merchant_id="farebox", secret=TEST_MERCHANT_SECRET, public_key=sim.public_key,
                            clock=clock)
    configure_shop(app, ticket_keys=KEYS, platform=platform, notify_url=notify)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1/partner", timeout=30,
                          headers={"Authorization": "Bearer t-partner"})
    yield {"engine": engine, "sim": sim, "client": client, "dep": dep, "base": f"http://127.0.0.1:{port}"}
    client.close()
    platform.close()
    server.should_exit = True
    thread.join(10)
    sim.stop()
    engine.dispose()


def order_body(number: str, dep: int, coach: int = 1, ride: int = 1) -> dict:
    items = [{"product": "coach", "quantity": coach, "departure_id": dep}]
    if ride:
        items.append({"product": "ride", "quantity": ride})
    return {"partner_order_no": number, "phone": "13800138000", "items": items}


def test_the_catalogue_and_the_seats_left_are_the_books(world):
    c, engine, dep = world["client"], world["engine"], world["dep"]
    products = c.get("/products").json()
    assert {(p["code"], p["kind"], p["price_fen"]) for p in products} == {
        tuple(r) for r in sql(engine, "SELECT code, kind, price_fen FROM product WHERE operator = :o AND active",
                              o=OP)}
    assert c.post("/orders", json=order_body("P-seats", dep, coach=2, ride=0)).status_code == 201
    (seats, taken), = sql(engine, "SELECT seats, seats_taken FROM departure WHERE id = :d", d=dep)
    listed = c.get("/departures", params={"day": str(TOMORROW)}).json()
    assert [(d["departure_id"], d["seats"], d["seats_free"]) for d in listed] == [(dep, seats, seats - taken)]
    assert seats - taken == 1
    # one operator's partner sees nothing of another's; other roles are refused at the door
    assert c.get("/products", params={"operator": OTHER}).status_code == 404
    assert c.get("/products", headers={"Authorization": "Bearer t-clerk"}).status_code == 403
    assert c.get("/products", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_the_partner_order_number_makes_one_order_however_often_it_is_sent(world):
    c, engine, dep = world["client"], world["engine"], world["dep"]
    body = order_body("P-1001", dep)
    with ThreadPoolExecutor(8) as pool:  # a double tap times eight, at once
        answers = list(pool.map(lambda _: c.post("/orders", json=body), range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201], [a.text for a in answers]
    assert len({a.json()["order_id"] for a in answers}) == 1
    first = next(a.json() for a in answers if a.status_code == 201)
    assert first["total_fen"] == 3000 + 200 and first["state"] == "created" and first["pay_url"]
    # plain SQL: one order for the number, one seat held, one audit line
    rows = sql(engine, "SELECT order_id, channel, total_fen FROM ticket_order WHERE idempotency_key = 'P-1001'")
    assert rows == [(first["order_id"], "partner", 3200)]
    assert sql(engine, "SELECT seats_taken FROM departure WHERE id = :d", d=dep) == [(1,)]
    assert sql(engine, "SELECT COALESCE(SUM(seats), 0) FROM seat_hold WHERE order_id = :o",
               o=first["order_id"]) == [(1,)]
    assert sql(engine, "SELECT COUNT(*) FROM order_audit WHERE order_id = :o", o=first["order_id"]) == [(1,)]
    # the same number from another operator's partner is another order of that operator's
    other = c.post("/orders", json={"partner_order_no": "P-1001", "items": [{"product": "ride"}]},
                   headers={"Authorization": "Bearer t-other"})
    assert other.status_code == 201 and other.json()["operator"] == OTHER
    # no overselling: 2 seats left, 3 asked
    sold_out = c.post("/orders", json=order_body("P-1002", dep, coach=3, ride=0))
    assert sold_out.status_code == 409 and sold_out.json()["detail"]["reason"] == "sold_out"
    assert sql(engine, "SELECT seats_taken FROM departure WHERE id = :d", d=dep) == [(1,)]
    # money and counts are JSON whole numbers, nothing else
    for bad in ({"product": "ride", "quantity": 1.0}, {"product": "ride", "quantity": "2"},
                {"product": "ride", "quantity": True}, {"product": "ride", "quantity": 11}):
        r = c.post("/orders", json={"partner_order_no": "P-bad", "items": [bad]})
        assert r.status_code == 422, (bad, r.text)
    assert sql(engine, "SELECT COUNT(*) FROM ticket_order WHERE idempotency_key = 'P-bad'") == [(0,)]


def test_paid_on_the_platform_tickets_verify_and_a_refund_goes_through_once(world):
    c, engine, dep, sim = world["client"], world["engine"], world["dep"], world["sim"]
    made = c.post("/orders", json=order_body("P-2001", dep, coach=1, ride=2)).json()
    assert c.get("/orders/P-2001/tickets").json() == {"partner_order_no": "P-2001", "state": "created",
                                                      "tickets": []}
    sim.rider_pays(made["order_id"])  # the rider pays in the wallet; the platform notifies the back office
    assert sim.delivered == [("payment", 200)]
    status = c.get("/orders/P-2001").json()  # paid: its tickets are issued on this first read
    assert (status["state"], status["paid_fen"]) == ("issued", 3400)
    assert sql(engine, "SELECT from_state, to_state FROM order_audit WHERE order_id = :o ORDER BY id",
               o=made["order_id"]) == [(None, "created"), ("created", "paid"), ("paid", "issued")]
    got = c.get("/orders/P-2001/tickets").json()
    assert got["state"] == "issued" and len(got["tickets"]) == 3
    assert c.get("/orders/P-2001/tickets").json() == got  # asked again: the same tickets, none made twice
    pickup_key = KEYS.pickup_key(OP)
    for t in got["tickets"]:
        token = decode_ticket(t["token"], {KEYS.key_id: KEYS.public_key()})
        assert token.ticket_id == t["ticket_id"] and token.operator == OP
        assert check_pickup_code(t["pickup_code"], pickup_key) == t["ticket_id"] % 10**10
    rows = sql(engine, "SELECT ticket_id, kind, price_fen, state FROM ticket WHERE order_id = :o ORDER BY ticket_id",
               o=made["order_id"])
    assert sorted((t["ticket_id"], t["kind"]) for t in got["tickets"]) == [(r[0], r[1]) for r in rows]
    assert sorted(r[2] for r in rows) == [200, 200, 3000]
    (paid_fen, state), = sql(engine, "SELECT paid_fen, state FROM ticket_order WHERE order_id = :o",
                             o=made["order_id"])
    assert (paid_fen, state) == (3400, "issued")

    coach = next(t["ticket_id"] for t in got["tickets"] if t["kind"] == "coach_trip")
    r = c.post("/orders/P-2001/refund", json={"ticket_ids": [coach], "reason": "rider changed plans"})
    assert r.status_code == 200, r.text
    assert r.json()["amount_fen"] == 3000 and r.json()["state"] == "succeeded" and r.json()["ticket_ids"] == [coach]
    again = c.post("/orders/P-2001/refund", json={"ticket_ids": [coach]})
    assert again.status_code == 409 and again.json()["detail"]["reason"] == "not_refundable"
    # plain SQL and the platform's own ledger: one refund of 30.00, the seat back, the rides still good
    assert sql(engine, "SELECT amount, state FROM payment_refund WHERE order_id = :o", o=made["order_id"]) == [
        (3000, "succeeded")]
    assert [(e["kind"], e["amount"]) for e in sim.ledger if e["order_id"] == made["order_id"]] == [
        ("payment", 3400), ("refund", 3000)]
    assert sql(engine, "SELECT state FROM ticket WHERE ticket_id = :t", t=coach) == [("refunded",)]
    assert sql(engine, "SELECT seats_taken FROM departure WHERE id = :d", d=dep) == [(0,)]
    assert sql(engine, "SELECT refunded_fen, state FROM ticket_order WHERE order_id = :o", o=made["order_id"]) == [
        (3000, "issued")]
    # another partner cannot read or refund this order
    other = {"Authorization": "Bearer t-other"}
    assert c.get("/orders/P-2001/tickets", headers=other).status_code == 404
    assert c.post("/orders/P-2001/refund", json={}, headers=other).status_code == 404


def test_the_partner_api_is_in_the_openapi_schema(world):
    spec = httpx.get(world["base"] + "/openapi.json").json()
    for path in ("/api/v1/partner/products", "/api/v1/partner/departures", "/api/v1/partner/orders",
                 "/api/v1/partner/orders/{partner_order_no}", "/api/v1/partner/orders/{partner_order_no}/tickets",
                 "/api/v1/partner/orders/{partner_order_no}/refund"):
        assert path in spec["paths"], path
    assert not any(p.startswith("/shop") for p in spec["paths"])  # the shop's pages are pages, not API


def test_a_partner_token_from_the_command_line_is_bound_to_its_operator(tmp_path):
    import os
    import subprocess
    import sys

    from backoffice.web.auth import TokenStore as Store

    path = tmp_path / "tokens.toml"
    env = {**os.environ, "FAREBOX_API_TOKENS": str(path), "FAREBOX_VAR_DIR": str(tmp_path)}
    env.pop("FAREBOX_DATABASE_URL", None)
    engine = make_engine(f"sqlite:///{tmp_path}/backoffice.db")  # the operator is checked against the registry
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=START)
    engine.dispose()

    def farebox(*args):
        return subprocess.run([sys.executable, "-m", "farebox.cli", "token", "add", "--file", str(path), *args],
                              env=env, capture_output=True, text=True, timeout=60)

    unbound = farebox("--role", "partner", "--name", "app")
    assert unbound.returncode != 0 and "one operator" in unbound.stdout + unbound.stderr
    made = farebox("--role", "partner", "--name", "coach-app", "--operator", OP)
    assert made.returncode == 0, made.stderr
    assert Store(path).lookup(made.stdout.strip()) == Principal("coach-app", "partner", OP)

"""The SMS channel end to end, on SQLite and PostgreSQL: hardware_sim.sms.SmsGatewaySimulator as a real HTTP server
posts riders' texts to the back office's web app served by uvicorn on a loopback port (``/api/v1/sms/inbound``),
the back office answers through backoffice.sms.gateway.HttpSmsGateway into the simulator's outbox (what the rider's
phone shows), and the payment platform simulator (hardware_sim.payment) takes the payment and notifies
``/api/v1/ota/webhook``.

The seed's dialogue to a pickup code; a duplicate inbound delivery and a lost send answer acted on once; a quote
left unconfirmed giving its seat back; N; a forged, stale or unsigned webhook refused; another number unable to
confirm; the rate limit. Prices, seats and states are checked with plain SQL, the yuan in the texts computed here.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
import uvicorn
from sqlalchemy import text
from test_topup import KEYS, Clock

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.payments.platform import HttpPlatform
from backoffice.sms.gateway import TEST_SMS_SECRET, HttpSmsGateway
from backoffice.tickets import catalogue
from backoffice.tickets.keys import published_test_keys
from backoffice.web.api.ota import configure_ota
from backoffice.web.api.sms import configure_sms_channel
from backoffice.web.app import create_app
from backoffice.web.auth import TokenStore
from hardware_sim.payment import TEST_MERCHANT_SECRET, PlatformSimulator
from hardware_sim.sms import SmsGatewaySimulator

START = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
OP = "coachco"
PRICE = 4550  # fen
SEATS = 3
RIDER, OTHER = "13800000001", "13900000002"
ASK = "C#上海#苏州#2026-12-05#08:30"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(query), params)]


def as_yuan(fen: int) -> str:  # the way people read money, worked out here rather than by clearing.money
    return f"¥{fen // 100}.{fen % 100:02d}"


def wait_for(what, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what.__doc__ or what}")


class World:
    def __init__(self, engine, clock, sms, pay, base):
        self.engine, self.clock, self.sms, self.pay, self.base = engine, clock, sms, pay, base

    def text(self, phone: str, words: str, expect_replies: int = 1) -> list[str]:
        """The rider texts ``words``; the replies that reached the phone because of it."""
        before = len(self.sms.texts_to(phone))
        self.sms.rider_texts(phone, words)
        return wait_for(lambda: self.sms.texts_to(phone)[before:] if len(self.sms.texts_to(phone)) >= before + \
                        expect_replies else None)

    def seats_taken(self) -> int:
        (n,), = sql(self.engine, "SELECT seats_taken FROM departure")
        return n

    def orders_of(self, phone: str) -> list[tuple]:
        return sql(self.engine, "SELECT order_id, state, total_fen, paid_fen, channel FROM ticket_order "
                   "WHERE phone = :p ORDER BY created_at", p=phone)


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    clock = Clock(START)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=START - timedelta(days=30))
        registry.set_stop(conn, operator=OP, code="SH", name="上海", by="clerk")
        registry.set_stop(conn, operator=OP, code="SZ", name="苏州", by="clerk")
        registry.add_route(conn, code="G2", operator=OP, name="上海-苏州", flat_fare=200,
                           at=START - timedelta(days=30), stops={0: ["SH", "SZ"], 1: ["SZ", "SH"]})
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="上海-苏州 coach",
                              price_fen=PRICE, by="clerk", now=START)
        catalogue.add_departure(conn, operator=OP, product="coach", route="G2", service_date=date(2026, 12, 5),
                                departs="08:30", seats=SEATS)
    port = free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    pay = PlatformSimulator(clock=clock).start()
    sms = SmsGatewaySimulator(inbound_url=f"{base}/sms/inbound", clock=clock).start()
    app = create_app(engine, tokens=TokenStore(tokens={}), clock=clock, migrate=False)
    configure_ota(app, keys=KEYS, webhook_key=pay.public_key)
    platform = HttpPlatform(pay.url, merchant_id="farebox", secret=TEST_MERCHANT_SECRET, public_key=pay.public_key,
                            clock=clock)
    gateway = HttpSmsGateway(sms.url, account="farebox", secret=TEST_SMS_SECRET, clock=clock)
    configure_sms_channel(app, gateway=gateway, secret=TEST_SMS_SECRET, ticket_keys=published_test_keys(),
                          platform=platform, notify_url=f"{base}/ota/webhook", sweep_every=0.1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield World(engine, clock, sms, pay, base)
    app.state.sms_sweep.stop()
    server.should_exit = True
    thread.join(10)
    gateway.close()
    platform.close()
    sms.stop()
    pay.stop()
    engine.dispose()


def test_the_whole_dialogue_ends_in_a_pickup_code(world):
    w = world
    (help_,) = w.text(RIDER, "你好")
    assert "C#出发地#目的地#日期#时间" in help_ and "reply Y to confirm" in help_

    (quote,) = w.text(RIDER, ASK)
    (seats, taken, price), = sql(w.engine, "SELECT d.seats, d.seats_taken, p.price_fen FROM departure d "
                                 "JOIN product p ON p.id = d.product_id")
    assert (seats, taken, price) == (SEATS, 1, PRICE)  # one seat held for the quote
    assert "2026-12-05 08:30" in quote and "上海→苏州" in quote
    assert as_yuan(price) in quote and "¥45.50" in quote
    assert f"余座 {seats - taken}" in quote and f"{seats - taken} seats left" in quote
    assert "reply Y within 10 minutes" in quote
    [(order_id, state, total, paid, channel)] = w.orders_of(RIDER)
    assert (state, total, paid, channel) == ("created", PRICE, 0, "sms")

    # another number cannot confirm the rider's quote
    (nope,) = w.text(OTHER, "Y")
    assert "no quote to confirm" in nope
    assert w.orders_of(OTHER) == [] and w.orders_of(RIDER)[0][1] == "created"

    (link,) = w.text(RIDER, "y")
    assert f"{w.pay.url}/pay/{order_id}" in link and as_yuan(PRICE) in link
    assert w.sms.texts_to(RIDER).count(link) == 1
    (expires,), = sql(w.engine, "SELECT expires_at FROM ticket_order WHERE order_id = :o", o=order_id)
    expires = datetime.fromisoformat(expires) if isinstance(expires, str) else expires  # SQLite: text
    assert (expires if expires.tzinfo else expires.replace(tzinfo=UTC)) == START + timedelta(minutes=15)

    # the rider opens the link and pays on the platform (the simulator's wallet): its notification reaches the
    # back office over HTTP, and the pickup code comes by SMS
    payment_ref = w.pay.rider_pays(re.search(r"/pay/(\w+)", link).group(1))
    code_text = wait_for(lambda: next((t for t in w.sms.texts_to(RIDER) if "取票码" in t), None))
    code = re.search(r"Pickup code (\d+)", code_text).group(1)
    assert len(code) == 16
    [(ticket_id, serial, t_state, t_price)] = sql(w.engine, "SELECT ticket_id, pickup_serial, state, price_fen "
                                                  "FROM ticket WHERE order_id = :o", o=order_id)
    assert int(code[:10]) == serial == ticket_id % 10**10 and t_state == "issued" and t_price == PRICE
    assert sql(w.engine, "SELECT state, paid_fen, payment_ref FROM ticket_order WHERE order_id = :o",
               o=order_id) == [("issued", PRICE, payment_ref)]
    assert w.seats_taken() == 1
    assert sql(w.engine, "SELECT state FROM seat_hold WHERE order_id = :o", o=order_id) == [("sold",)]

    # Q shows it again; the pickup code went out once
    (mine,) = w.text(RIDER, "Q")
    assert order_id in mine and code in mine and "issued" in mine
    time.sleep(0.3)  # a few more sweeps: nothing is texted twice
    assert sum("取票码" in t and "Paid" in t for t in w.sms.texts_to(RIDER)) == 1
    assert sql(w.engine, "SELECT COUNT(*) FROM sms_message WHERE direction = 'out' AND state <> 'sent'") == [(0,)]
    assert sql(w.engine, "SELECT direction, COUNT(*) FROM sms_message WHERE phone = :p GROUP BY direction "
               "ORDER BY direction", p=RIDER) == [("in", 4), ("out", 5)]


def test_a_duplicate_delivery_and_a_lost_answer_act_once(world):
    w = world
    w.sms.faults.inbound = "duplicate"
    w.sms.faults.lose_answers = 1  # the quote reaches the phone; the gateway's answer is lost; the adapter resends
    replies = w.text(RIDER, ASK)
    assert len(replies) == 1, replies
    quote = replies[0]
    assert "seats left" in quote
    wait_for(lambda: len(w.sms.deliveries) == 2)
    first, second = w.sms.deliveries
    assert first.message_id == second.message_id and (first.status, second.status) == (200, 200)
    assert json.loads(first.answer)["outcome"].startswith("quoted ")
    assert json.loads(second.answer)["outcome"] == "duplicate"
    time.sleep(0.3)
    assert w.sms.texts_to(RIDER) == [quote]  # one reply, however often the text came or the answer got lost
    assert len(w.orders_of(RIDER)) == 1 and w.seats_taken() == 1
    assert sql(w.engine, "SELECT COUNT(*) FROM sms_message WHERE direction = 'in'") == [(1,)]


def test_an_unconfirmed_quote_gives_its_seat_back(world):
    w = world
    w.text(RIDER, ASK)
    [(order_id, *_)] = w.orders_of(RIDER)
    assert w.seats_taken() == 1
    w.clock.tick(11 * 60)  # past "reply Y within 10 minutes"
    gone = wait_for(lambda: next((t for t in w.sms.texts_to(RIDER) if "seat released" in t), None))
    assert order_id in gone
    assert w.seats_taken() == 0
    assert sql(w.engine, "SELECT state FROM ticket_order WHERE order_id = :o", o=order_id) == [("expired",)]
    assert sql(w.engine, "SELECT state FROM seat_hold WHERE order_id = :o", o=order_id) == [("released",)]
    (late,) = w.text(RIDER, "Y")
    assert "no quote to confirm" in late and w.seats_taken() == 0

    # N gives a seat back at once; a second quote replaces the first (one held seat per number)
    w.text(RIDER, ASK)
    w.text(RIDER, ASK)
    assert w.seats_taken() == 1
    (cancelled,) = w.text(RIDER, "N")
    assert "cancelled" in cancelled and w.seats_taken() == 0
    assert [s for _o, s, *_ in w.orders_of(RIDER)] == ["expired"] * 3


def test_forged_stale_and_unsigned_webhooks_are_refused(world):
    w = world
    w.sms.faults.sign_with = b"not-the-gateway-secret-at-all!!!"
    w.sms.rider_texts(RIDER, ASK)
    assert w.sms.deliveries[-1].status == 401 and "bad_signature" in w.sms.deliveries[-1].answer
    w.sms.faults.sign_with = None
    body = json.dumps({"message_id": "m-raw", "from": RIDER, "to": "1069", "text": ASK}).encode()
    r = httpx.post(f"{w.base}/sms/inbound", content=body)
    assert r.status_code == 401
    stale = int((START - timedelta(minutes=30)).timestamp())
    from backoffice.sms.gateway import sign
    r = httpx.post(f"{w.base}/sms/inbound", content=body,
                   headers={"X-Sms-Signature": sign(TEST_SMS_SECRET, body, stale)})
    assert r.status_code == 401 and "stale" in r.text
    r = httpx.post(f"{w.base}/sms/inbound", content=b"{}", headers={"X-Sms-Signature": sign(
        TEST_SMS_SECRET, b"{}", int(START.timestamp()))})
    assert r.status_code == 422
    assert w.sms.texts_to(RIDER) == [] and w.seats_taken() == 0
    assert sql(w.engine, "SELECT COUNT(*) FROM sms_message") == [(0,)]
    assert sql(w.engine, "SELECT COUNT(*) FROM ticket_order") == [(0,)]


def test_a_number_texting_too_often_is_told_once_then_ignored(world):
    from backoffice.sms.dialogue import RATE_LIMIT

    w = world
    limit = RATE_LIMIT[0]
    for _ in range(limit):
        w.text(RIDER, "?")
    (notice,) = w.text(RIDER, ASK)
    assert "Too many messages" in notice
    w.sms.rider_texts(RIDER, ASK)
    time.sleep(0.3)
    assert len(w.sms.texts_to(RIDER)) == limit + 1 and w.seats_taken() == 0
    assert sql(w.engine, "SELECT state, COUNT(*) FROM sms_message WHERE direction = 'in' GROUP BY state "
               "ORDER BY state") == [("limited", 2), ("received", limit)]
    w.clock.tick(RATE_LIMIT[1].total_seconds() + 1)  # the window passes: served again
    (quote,) = w.text(RIDER, ASK)
    assert "seats left" in quote


def test_a_server_without_the_gateway_secret_refuses_every_inbound_text(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from backoffice.sms.gateway import SECRET_ENV, sign

    monkeypatch.delenv(SECRET_ENV, raising=False)
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    app = create_app(engine, tokens=TokenStore(tokens={}), migrate=False)
    body = json.dumps({"message_id": "m1", "from": RIDER, "to": "1069", "text": "Q"}).encode()
    with TestClient(app) as client:
        r = client.post("/api/v1/sms/inbound", content=body, headers={
            "X-Sms-Signature": sign(TEST_SMS_SECRET, body, int(time.time()))})
    assert r.status_code == 401 and r.json()["detail"]["reason"] == "not_configured"
    assert sql(engine, "SELECT COUNT(*) FROM sms_message") == [(0,)]
    engine.dispose()


def test_farebox_serve_answers_texts_and_sends_the_pickup_code_by_itself(tmp_path):
    """The same dialogue against a real ``farebox serve`` process wired only by its settings (the gateway and its
    secret in the TOML file, the payment platform and notify URL in the environment): its scheduler's SMS sweep texts
    the pickup code after the payment lands, and the web shop's one-time code goes out through the same gateway."""
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/bo.db"
    engine = make_engine(url)
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=now - timedelta(days=30))
        registry.set_stop(conn, operator=OP, code="SH", name="上海", by="clerk")
        registry.set_stop(conn, operator=OP, code="SZ", name="苏州", by="clerk")
        registry.add_route(conn, code="G2", operator=OP, name="上海-苏州", flat_fare=200,
                           at=now - timedelta(days=30), stops={0: ["SH", "SZ"]})
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="上海-苏州 coach",
                              price_fen=PRICE, by="clerk", now=now)
        day = (now + timedelta(days=2)).date()
        catalogue.add_departure(conn, operator=OP, product="coach", route="G2", service_date=day, departs="08:30",
                                seats=SEATS)
    port = free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    pay = PlatformSimulator().start()
    sms = SmsGatewaySimulator(inbound_url=f"{base}/sms/inbound").start()
    ready, log_path = tmp_path / "serve.ready", tmp_path / "serve.log"
    config = tmp_path / "farebox.toml"  # the SMS gateway from the settings file, not the environment
    config.write_text(f'sms_url = "{sms.url}"\nsms_account = "farebox"\nsms_secret = "{TEST_SMS_SECRET.hex()}"\n')
    env = {**os.environ, "FAREBOX_DATABASE_URL": url, "FAREBOX_VAR_DIR": str(tmp_path / "var"),
           "FAREBOX_API_TOKENS": str(tmp_path / "tokens.toml"), "FAREBOX_INSECURE_TEST_KEYS": "1",
           "FAREBOX_CONFIG": str(config),
           "FAREBOX_PAYMENT_URL": pay.url, "FAREBOX_PAYMENT_SECRET": TEST_MERCHANT_SECRET.hex(),
           "FAREBOX_PAYMENT_MERCHANT": "farebox", "FAREBOX_PAYMENT_NOTIFY_URL": f"{base}/ota/webhook"}
    for name in ("FAREBOX_MQTT_URL", "FAREBOX_PAYMENT_PUBLIC_KEY", "FAREBOX_SMS_URL", "FAREBOX_SMS_SECRET",
                 "FAREBOX_SMS_ACCOUNT"):
        env.pop(name, None)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "farebox.cli", "serve", "--port", str(port), "--no-ingest",
                                 "--no-status", "--no-publisher", "--ready-file", str(ready)],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        w = World(engine, None, sms, pay, base)
        (quote,) = w.text(RIDER, f"C#上海#苏州#{day}#08:00")
        assert f"{day} 08:30" in quote and as_yuan(PRICE) in quote and f"{SEATS - w.seats_taken()} seats left" in quote
        (link,) = w.text(RIDER, "Y")
        [(order_id, *_)] = w.orders_of(RIDER)
        assert f"{pay.url}/pay/{order_id}" in link
        pay.rider_pays(order_id)
        code_text = wait_for(lambda: next((t for t in sms.texts_to(RIDER) if "Pickup code" in t), None), timeout=30)
        code = re.search(r"Pickup code (\d{16})", code_text).group(1)
        [(serial, state)] = sql(engine, "SELECT t.pickup_serial, o.state FROM ticket t JOIN ticket_order o "
                                "ON o.order_id = t.order_id WHERE o.order_id = :o", o=order_id)
        assert int(code[:10]) == serial and state == "issued" and w.seats_taken() == 1
        # the web shop's one-time code goes out through the same gateway (the simulator's outbox has it)
        [(dep_id,)] = sql(engine, "SELECT id FROM departure")
        shop = f"http://127.0.0.1:{port}/shop/{OP}/code"
        r = httpx.post(shop, data={"phone": OTHER, "product": "coach", "departure": str(dep_id), "quantity": "1"})
        assert r.status_code == 200, r.text[-500:]
        assert any("ticket code" in t for t in wait_for(lambda: sms.texts_to(OTHER), timeout=10))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        sms.stop()
        pay.stop()
        engine.dispose()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_revisions_0025_and_0023_downgrade_alone_and_back(db, request, tmp_path):
    from alembic import command
    from sqlalchemy import MetaData

    from backoffice.db import alembic_config

    url = f"sqlite:///{tmp_path}/bo.db" if db == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        # the shop's codes (0025, on top of 0023) and what came after them on that line (0026 partitions, 0027 claims)
        command.downgrade(cfg, "2026_12_03_0023")
    reflected = MetaData()
    reflected.reflect(engine)
    assert not {"shop_code", "shop_rate_event"} & set(reflected.tables)
    assert {"sms_message", "sms_conversation"} <= set(reflected.tables)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "2026_12_03_0023@-1")  # then this branch's step: back to 0020, others untouched
    reflected = MetaData()
    reflected.reflect(engine)
    assert not {"sms_message", "sms_conversation"} & set(reflected.tables)
    assert {"ticket_order", "departure", "payment_refund"} <= set(reflected.tables)
    upgrade(engine)
    reflected = MetaData()
    reflected.reflect(engine)
    assert {"sms_message", "sms_conversation", "shop_code", "shop_rate_event"} <= set(reflected.tables)
    engine.dispose()


def test_an_order_not_paid_in_time_gives_its_seat_back_and_a_late_payment_is_not_lost(world):
    w = world
    w.text(RIDER, ASK)
    w.text(RIDER, "Y")
    [(order_id, *_)] = w.orders_of(RIDER)
    (busy,) = w.text(RIDER, ASK)  # one open order per number: pay or cancel it first
    assert "waiting for payment" in busy and len(w.orders_of(RIDER)) == 1 and w.seats_taken() == 1
    w.clock.tick(16 * 60)  # past "pay within 15 minutes"
    gone = wait_for(lambda: next((t for t in w.sms.texts_to(RIDER) if "time to pay ran out" in t), None))
    assert order_id in gone and w.seats_taken() == 0
    assert sql(w.engine, "SELECT state, paid_fen FROM ticket_order WHERE order_id = :o", o=order_id) == [
        ("expired", 0)]
    # the rider pays the old link anyway: the books keep the money (the order revives while the seat is free)
    w.pay.rider_pays(order_id)
    (state, paid), = wait_for(lambda: [r for r in sql(w.engine, "SELECT state, paid_fen FROM ticket_order "
                                                      "WHERE order_id = :o", o=order_id) if r[1]])
    assert paid == PRICE and state in ("paid", "issued")
    code_text = wait_for(lambda: next((t for t in w.sms.texts_to(RIDER) if "Pickup code" in t), None))
    [(serial,)] = sql(w.engine, "SELECT pickup_serial FROM ticket WHERE order_id = :o", o=order_id)
    assert re.search(r"Pickup code (\d{10})\d{6}", code_text).group(1) == f"{serial:010d}"
    time.sleep(0.3)
    assert sum("Pickup code" in t for t in w.sms.texts_to(RIDER)) == 1

"""The web shop's one-time codes and rate limits over HTTP (FastAPI's TestClient on a SQLite file, a fixed clock
moved by hand): a code works once, dies after five wrong tries and after five minutes; codes per phone and orders
per phone are rate-limited (429 with Retry-After); an order page opens only for the phone that bought it; the
shop's pages carry the site's security headers (no script allowed). Orders counted with plain SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.tickets import catalogue
from backoffice.tickets.keys import published_test_keys
from backoffice.web import shop_service
from backoffice.web.app import create_app
from backoffice.web.auth import TokenStore
from backoffice.web.shop_service import OutboxSender, configure_shop

NOW = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
OP = "coachco"
PHONE = "13900001111"
ITEM = {"product": "ride", "quantity": "1"}


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self):
        return self.now


@pytest.fixture
def shop(sqlite_url):
    engine = make_engine(sqlite_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=NOW - timedelta(days=3))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=NOW)
    clock = Clock()
    app = create_app(engine, tokens=TokenStore(tokens={}), clock=clock, migrate=False)
    sms = OutboxSender()
    configure_shop(app, ticket_keys=published_test_keys(), platform=None, otp_sender=sms)
    with TestClient(app, follow_redirects=False) as client:
        yield client, engine, sms, clock
    engine.dispose()


def orders_made(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM ticket_order")).scalar()


def ask_code(client, phone=PHONE):
    return client.post(f"/shop/{OP}/code", data={"phone": phone, **ITEM})


def order(client, code, phone=PHONE):
    return client.post(f"/shop/{OP}/order", data={"phone": phone, "code": code, **ITEM})


def test_a_code_works_once_and_not_after_five_wrong_tries_or_five_minutes(shop):
    client, engine, sms, clock = shop
    assert ask_code(client).status_code == 200
    code = sms.last_code(PHONE)
    assert code not in client.get(f"/shop/{OP}/buy", params={"product": "ride"}).text
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(shop_service.OTP_ATTEMPTS):
        assert order(client, wrong).status_code == 400
    assert order(client, code).status_code == 400  # the right code, too late: the code died with the 5th miss
    assert orders_made(engine) == 0

    clock.now += timedelta(minutes=1)
    ask_code(client)
    code = sms.last_code(PHONE)
    clock.now += shop_service.OTP_LIFETIME
    assert order(client, code).status_code == 400  # expired
    assert orders_made(engine) == 0

    ask_code(client)
    code = sms.last_code(PHONE)
    client.cookies.clear()
    made = order(client, code)
    assert made.status_code == 303 and made.headers["location"].startswith(f"/shop/{OP}/orders/TK")
    assert orders_made(engine) == 1
    client.cookies.clear()
    assert order(client, code).status_code == 400  # used once
    assert orders_made(engine) == 1


def test_codes_and_orders_are_rate_limited_per_phone(shop):
    client, engine, sms, clock = shop
    limit, _window = shop_service.OTP_PER_PHONE
    for _ in range(limit):
        assert ask_code(client).status_code == 200
    refused = ask_code(client)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert len(sms.outbox) == limit  # no SMS for the refused request
    assert ask_code(client, "13900002222").status_code == 200  # another phone is not held up

    code = sms.last_code(PHONE)
    assert order(client, code).status_code == 303  # the cookie now proves the phone: more orders need no code
    limit, _window = shop_service.ORDERS_PER_PHONE
    for _ in range(limit - 1):
        assert order(client, "").status_code == 303
    assert order(client, "").status_code == 429
    assert orders_made(engine) == limit


def test_an_order_page_opens_only_for_its_phone_and_the_pages_carry_the_headers(shop):
    client, engine, sms, clock = shop
    ask_code(client)
    page = order(client, sms.last_code(PHONE)).headers["location"]
    mine = client.get(page)
    assert mine.status_code == 200 and "¥2.00" in mine.text
    csp = mine.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and mine.headers["cache-control"] == "no-store"
    client.cookies.clear()
    assert client.get(page).status_code == 404
    client.cookies.set("farebox_rider", f"{PHONE}.{int(NOW.timestamp()) + 999}.forged", path="/shop")
    assert client.get(page).status_code == 404


def test_odd_addresses_and_forms_are_refused_not_crashed(shop):
    client, engine, sms, clock = shop
    for url in ("/shop/%00", f"/shop/{OP}/buy?product=%00", f"/shop/{OP}/buy?product=ride&departure=%C2%B2",
                f"/shop/{OP}/buy?product=ride&quantity=99", f"/shop/{OP}/orders/%00", f"/shop/{OP}/orders/x/qr/1.png"):
        assert client.get(url).status_code in (200, 404), url
    r = client.post(f"/shop/{OP}/code", data={"phone": "12\x00", "product": "ride\x00"})
    assert r.status_code == 404
    assert client.post(f"/shop/{OP}/code", data={"phone": "not a phone", **ITEM}).status_code == 400
    assert sms.outbox == [] and orders_made(engine) == 0

"""Two back-office app instances on one database (as two ``farebox serve`` processes behind one address) share the
web shop's one-time codes, its phone cookie and its rate counters (revision 2026_12_03_0025, tables shop_code and
shop_rate_event): a code asked from one is taken by the other, once; a limit counts requests to both. SQLite and
PostgreSQL; counted with plain SQL."""

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
PHONE = "13900003333"
ITEM = {"product": "ride", "quantity": "1"}


@pytest.fixture(params=["sqlite", "postgresql"])
def two_shops(request, tmp_path):
    url = (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_schema_url"))
    setup = make_engine(url)
    upgrade(setup)
    with setup.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=NOW - timedelta(days=3))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=NOW)
    engines, clients, outboxes = [], [], []
    for _ in range(2):  # each its own engine, app, shop wiring and SMS outbox: nothing shared but the database
        engine = make_engine(url)
        app = create_app(engine, tokens=TokenStore(tokens={}), clock=lambda: NOW, migrate=False)
        outbox = OutboxSender()
        configure_shop(app, ticket_keys=published_test_keys(), platform=None, otp_sender=outbox)
        engines.append(engine)
        outboxes.append(outbox)
        clients.append(TestClient(app, follow_redirects=False).__enter__())
    yield clients, outboxes, setup
    for c in clients:
        c.__exit__(None, None, None)
    for e in [*engines, setup]:
        e.dispose()


def sql(engine, query: str):
    with engine.connect() as conn:
        return conn.execute(text(query)).scalar()


def test_a_code_from_one_server_is_taken_once_by_the_other_and_limits_count_both(two_shops):
    (a, b), (out_a, out_b), engine = two_shops
    assert a.post(f"/shop/{OP}/code", data={"phone": PHONE, **ITEM}).status_code == 200
    code = out_a.last_code(PHONE)
    assert out_b.outbox == [] and sql(engine, "SELECT COUNT(*) FROM shop_code") == 1
    assert code not in sql(engine, "SELECT digest FROM shop_code")  # kept as an HMAC, not the code
    r = b.post(f"/shop/{OP}/order", data={"phone": PHONE, "code": code, **ITEM})
    assert r.status_code == 303, r.text[-500:]
    assert sql(engine, "SELECT COUNT(*) FROM shop_code") == 0  # used up
    # the same code again at the first server: gone (a fresh client, so no phone cookie)
    fresh = TestClient(a.app, follow_redirects=False)
    again = fresh.post(f"/shop/{OP}/order", data={"phone": PHONE, "code": code, **ITEM})
    assert again.status_code == 400
    assert sql(engine, "SELECT COUNT(*) FROM ticket_order") == 1
    # the phone cookie server b set is good at server a too (a key derived from the ticket keys, not per process)
    a.cookies.update(b.cookies)
    assert a.post(f"/shop/{OP}/order", data={"phone": PHONE, "code": "", **ITEM}).status_code == 303
    assert sql(engine, "SELECT COUNT(*) FROM ticket_order") == 2

    # codes per phone: the limit counts requests to both servers together
    other = "13900004444"
    limit, _window = shop_service.OTP_PER_PHONE
    for i in range(limit):
        assert (a, b)[i % 2].post(f"/shop/{OP}/code", data={"phone": other, **ITEM}).status_code == 200
    for server in (a, b):
        assert server.post(f"/shop/{OP}/code", data={"phone": other, **ITEM}).status_code == 429
    sent = [t for to, t in out_a.outbox + out_b.outbox if to == other]
    assert len(sent) == limit
    assert sql(engine, f"SELECT COUNT(*) FROM shop_rate_event WHERE key = 'otp-phone:{other}'") == limit

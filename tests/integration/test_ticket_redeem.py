"""A pickup code redeemed at the station counter, over HTTP (the back office served by uvicorn on a loopback port)
with the counter's ESC/POS printer a pty (hardware_sim.printer decodes what arrives): the code counts as the
ticket's use (plain SQL: uses_made, state, one ticket_use row presented_by counter) and the paper ticket is read off
the printer; the same code again is refused and prints nothing; a staff member guessing codes is locked out after
five wrong ones (so is their address), and the right code is refused until the lockout ends; a code that is not 16
digits is a slip, not a guess; a clerk may not redeem. Then the same through the page in headless Chromium."""

from __future__ import annotations

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
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest
from backoffice.tickets.redeem import Guard, configure_counter
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from backoffice.web.shop_service import configure_shop
from hardware_sim.printer import SimPrinter
from wire.ticket import pickup_code

START = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai, service day 2026-12-03
OP = "coachco"
KEYS = published_test_keys()
TOKENS = {"t-desk1": Principal("desk-1", "operator_staff"), "t-desk2": Principal("desk-2", "operator_staff"),
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
        return [tuple(r) for r in conn.execute(text(query), params).all()]


def issue(engine, product: str) -> int:
    with engine.begin() as conn:
        order = orders.create_order(conn, operator=OP, channel="counter", phone="", items=[ItemRequest(product)],
                                    who="desk", now=START)
        total = conn.execute(text("SELECT total_fen FROM ticket_order WHERE order_id = :o"), {"o": order}).scalar()
        orders.mark_paid(conn, order, amount_fen=total, payment_ref=f"cash-{order}", who="desk", now=START)
        (ticket,) = orders.issue_tickets(conn, order, keys=KEYS, who="desk", now=START)
        return ticket.ticket_id


@pytest.fixture(params=["sqlite", "postgresql"])
def counter(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=START - timedelta(days=9))
        registry.add_route(conn, code="C1", operator=OP, name="City - Airport", flat_fare=200,
                           at=START - timedelta(days=9))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="Airport ride", price_fen=200,
                              routes=["C1"], by="clerk", now=START)
        catalogue.add_product(conn, operator=OP, code="day", kind="day_pass", name="Day pass", price_fen=1500,
                              by="clerk", now=START)
    clock = Clock(START + timedelta(minutes=5))
    app = create_app(engine, tokens=TokenStore(tokens=TOKENS), clock=clock, migrate=False)
    configure_shop(app, ticket_keys=KEYS)
    printer = SimPrinter()
    configure_counter(app, printer=f"serial:{printer.path}", guard=Guard())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield engine, f"http://127.0.0.1:{port}", clock, printer
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.counter.printer.close()
        printer.close()
        engine.dispose()


def redeem(base: str, token: str, code: str, station: str = "North gate") -> httpx.Response:
    return httpx.post(f"{base}/api/v1/tickets/redeem", json={"operator": OP, "code": code, "station": station},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)


def wrong_code(right: str) -> str:
    """Right serial, other check digits: what a guesser types."""
    return right[:10] + f"{(int(right[10:]) + 1) % 10**6:06d}"


def test_a_pickup_code_redeemed_at_the_counter_counts_once_prints_a_ticket_and_guessing_locks_out(counter):
    engine, base, clock, printer = counter
    ride, day_pass = issue(engine, "ride"), issue(engine, "day")
    ride_code, pass_code = pickup_code(ride, KEYS.pickup_key(OP)), pickup_code(day_pass, KEYS.pickup_key(OP))

    r = redeem(base, "t-desk1", f"{ride_code[:4]} {ride_code[4:8]}-{ride_code[8:]}")  # as a person types it
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["ticket_id"], body["use_no"], body["uses_allowed"], body["printed"]) == (ride, 1, 1, True)
    (slip,) = printer.wait_for_slips(1)
    assert f"票号 No.: {ride}" in slip and "单程票 Single ride" in slip and "Airport ride" in slip
    assert "线路 Route: C1" in slip and "次数 Use: 1/1" in slip and "柜台 Counter: North gate" in slip
    assert "兑换 Redeemed: 2026-12-03 10:05" in slip  # the operator's clock (UTC+8)
    assert "经办 Staff: desk-1" in slip and not printer.unknown
    assert sql(engine, "SELECT uses_made, state FROM ticket WHERE ticket_id = :t", t=ride) == [(1, "used")]
    assert sql(engine, "SELECT device_id, device_seq, presented_by, use_no, revenue, staff, vehicle FROM ticket_use "
                       "WHERE ticket_id = :t", t=ride) == [("counter", None, "counter", 1, True, "desk-1",
                                                           "North gate")]

    again = redeem(base, "t-desk1", ride_code)  # the same code a second time: used, nothing printed
    assert again.status_code == 409 and again.json()["detail"]["reason"] == "used_up"
    assert sql(engine, "SELECT COUNT(*) FROM ticket_use") == [(1,)]

    malformed = redeem(base, "t-desk2", "12345")  # a slip of the finger: refused, not counted as a guess
    assert malformed.status_code == 422 and malformed.json()["detail"]["reason"] == "malformed_code"
    for _ in range(4):  # desk 2 guesses: four wrong codes are told so ...
        r = redeem(base, "t-desk2", wrong_code(pass_code))
        assert r.status_code == 404 and r.json()["detail"]["reason"] == "wrong_code", r.text
    fifth = redeem(base, "t-desk2", wrong_code(pass_code))  # ... the fifth locks desk 2 (and its address) out
    assert fifth.status_code == 429 and fifth.json()["detail"]["reason"] == "locked_out"
    assert int(fifth.headers["Retry-After"]) == 15 * 60
    for token in ("t-desk2", "t-desk1"):  # the right code now is refused too, from the token and the address
        locked = redeem(base, token, pass_code)
        assert locked.status_code == 429 and locked.json()["detail"]["reason"] == "locked_out"
    assert sql(engine, "SELECT uses_made FROM ticket WHERE ticket_id = :t", t=day_pass) == [(0,)]
    clerk = redeem(base, "t-clerk", pass_code)
    assert clerk.status_code == 403

    clock.now += timedelta(minutes=16)  # the lockout is over
    r = redeem(base, "t-desk2", pass_code, station="South hall")
    assert r.status_code == 200 and (r.json()["ticket_id"], r.json()["use_no"], r.json()["uses_allowed"]) == \
        (day_pass, 1, 0)
    first, second = printer.wait_for_slips(2)  # the refused code printed nothing in between
    assert f"票号 No.: {ride}" in first and f"票号 No.: {day_pass}" in second
    assert "日票 Day pass" in second and "线路 Route: 不限 any" in second and "次数 Use: 1" in second
    assert sql(engine, "SELECT uses_made, state FROM ticket WHERE ticket_id = :t", t=day_pass) == [(1, "issued")]
    assert sql(engine, "SELECT ticket_id, use_no, revenue, staff FROM ticket_use ORDER BY occurred_at") == [
        (ride, 1, True, "desk-1"), (day_pass, 1, True, "desk-2")]

"""The station counter's pickup-code page as counter staff use it, in headless Chromium (Chinese, as a desk's
browser asks): log in with the staff token, follow the header's link, choose the operator, type the rider's code;
the page shows the ticket and the paper ticket's text, and the counter's printer (a pty, hardware_sim.printer)
prints the same text; a mistyped code is refused on the page with its reason and counts nothing (plain SQL).
Screenshots: ticket-counter-redeemed.png, ticket-counter-wrong-code.png."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn
from sqlalchemy import text
from test_web_pages import _login, _nav, _shot, _wait_for, browser  # noqa: F401 (browser: a fixture)

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest
from backoffice.tickets.redeem import configure_counter
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from backoffice.web.shop_service import configure_shop
from hardware_sim.printer import SimPrinter
from wire.ticket import pickup_code

pytestmark = pytest.mark.slow
OP = "coachco"
KEYS = published_test_keys()


@pytest.fixture
def counter_world(tmp_path):
    """The back office on uvicorn (real clock), one single ride issued, the counter printer on a pty."""
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=now - timedelta(days=9))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=now)
        order = orders.create_order(conn, operator=OP, channel="counter", phone="", items=[ItemRequest("ride")],
                                    who="desk", now=now)
        orders.mark_paid(conn, order, amount_fen=200, payment_ref="cash-1", who="desk", now=now)
        (ticket,) = orders.issue_tickets(conn, order, keys=KEYS, who="desk", now=now)
    app = create_app(engine, tokens=TokenStore(tokens={"t-desk1": Principal("desk-1", "operator_staff")}),
                     migrate=False)
    configure_shop(app, ticket_keys=KEYS)
    printer = SimPrinter()
    configure_counter(app, printer=f"serial:{printer.path}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)

    def sql(query: str, **params):
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params).all()]

    try:
        yield f"http://127.0.0.1:{port}", sql, printer, ticket.ticket_id, pickup_code(ticket.ticket_id,
                                                                                       KEYS.pickup_key(OP))
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.counter.printer.close()
        printer.close()
        engine.dispose()


def test_counter_staff_redeem_a_pickup_code_on_the_page(counter_world, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, sql, printer, ride, code = counter_world
    _login(browser, base, "t-desk1")
    _nav(browser, "/tickets/redeem")
    _wait_for(browser, "#redeem-form")
    assert "取票码兑换" in browser.page_source
    Select(browser.find_element(By.ID, "redeem-operator")).select_by_value(OP)
    browser.find_element(By.ID, "redeem-code").send_keys(code[:10] + "000000" if code[10:] != "000000"
                                                         else code[:10] + "000001")
    browser.find_element(By.ID, "redeem-station").send_keys("North gate")
    browser.find_element(By.ID, "redeem-submit").click()
    _wait_for(browser, "#redeem-error")
    assert "取票码不正确" in browser.find_element(By.ID, "redeem-error").text
    browser.execute_script("window.scrollTo(0, 0)")
    _shot(browser, "ticket-counter-wrong-code")
    assert sql("SELECT uses_made FROM ticket WHERE ticket_id = :t", t=ride) == [(0,)]

    browser.find_element(By.ID, "redeem-code").send_keys(code)
    browser.find_element(By.ID, "redeem-submit").click()
    _wait_for(browser, "#redeemed")
    assert browser.find_element(By.ID, "redeemed-ticket").text == str(ride)
    assert "已打印" in browser.find_element(By.ID, "redeemed-printed").text
    shown = browser.find_element(By.ID, "paper-ticket").text
    browser.execute_script("window.scrollTo(0, 0)")
    _shot(browser, "ticket-counter-redeemed")
    (slip,) = printer.wait_for_slips(1)
    assert slip.strip() == shown.strip() and f"票号 No.: {ride}" in slip and "柜台 Counter: North gate" in slip
    assert sql("SELECT uses_made, state FROM ticket WHERE ticket_id = :t", t=ride) == [(1, "used")]
    assert sql("SELECT presented_by, staff FROM ticket_use WHERE ticket_id = :t", t=ride) == [("counter", "desk-1")]

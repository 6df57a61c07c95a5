"""The counter staff's ticket order page in headless Chromium (the world of
tests/integration/test_ticket_refund_pages.py on the real clock: the back office on uvicorn, the payment platform
simulator over HTTP). A partner order of a coach seat and two rides is paid on the simulator's payment page and one
ride is used at the counter; staff log in, open the order from the header's link and the search, read it (tickets,
the use, the payment), refund it while the platform loses its answer (pending), then send the refund again (paid
back). One payout in the simulator's ledger, one refund row in plain SQL. Screenshots: ticket-order-*.png."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from test_web_pages import SHOTS, _login, _nav, _wait_for, chrome  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_ticket_refund_pages import OP, make_world, paid_order, refundable_in_sql, sql  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def world(tmp_path):
    w, stop = make_world(f"sqlite:///{tmp_path}/bo.db", start=datetime.now(UTC))
    yield w
    stop()


def _shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(900, min(height + 40, 4000)))
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 5_000, f"{path} looks empty"


def test_staff_read_a_ticket_order_and_refund_it_once_in_the_browser(world):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine, sim = world["engine"], world["sim"]
    order_id, tickets = paid_order(world, "P-web")
    ride = next(t for t in tickets if t["kind"] == "single")
    used = httpx.post(f"{world['base']}/api/v1/tickets/redeem", headers={"Authorization": "Bearer t-staff"},
                      json={"operator": OP, "code": ride["pickup_code"], "station": "Airport"}, timeout=30)
    assert used.status_code == 200, used.text
    refundable = refundable_in_sql(engine, order_id)

    with chrome() as driver:
        driver.set_window_size(1280, 900)
        _login(driver, world["base"], "t-staff")
        _nav(driver, "/tickets/orders")
        _wait_for(driver, "#find-q")
        driver.find_element(By.ID, "find-q").send_keys(order_id)
        driver.find_element(By.ID, "find").click()
        _wait_for(driver, "#refund-form")
        assert driver.find_element(By.ID, "order-id").text == order_id
        amount = f"{refundable // 100}.{refundable % 100:02d}"
        assert amount in driver.find_element(By.ID, "refundable").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#tickets tbody tr")) == len(tickets)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#uses tbody tr")) == 1
        _shot(driver, "ticket-order-page")

        sim.faults.lose_answers["refunds"] = 1  # paid out, the answer lost
        driver.find_element(By.ID, "refund-why").send_keys("coach cancelled")
        driver.find_element(By.ID, "refund").click()
        _wait_for(driver, "#done")
        (refund_id, state), = sql(engine, "SELECT refund_id, state FROM payment_refund WHERE order_id = :o",
                                  o=order_id)
        assert state == "pending" and driver.find_element(By.ID, "done-refund").text == refund_id
        _shot(driver, "ticket-order-refund-pending")

        driver.find_element(By.CSS_SELECTOR, f"#refund-{refund_id} .send-again").click()
        WebDriverWait(driver, 30).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".send-again"))
        assert driver.find_element(By.ID, "done-refund").text == refund_id
        _shot(driver, "ticket-order-refunded")

    assert sql(engine, "SELECT refund_id, state, amount FROM payment_refund WHERE order_id = :o", o=order_id) == [
        (refund_id, "succeeded", refundable)]
    assert [(e["ref"], e["amount"]) for e in sim.ledger if e["kind"] == "refund"] == [(refund_id, refundable)]

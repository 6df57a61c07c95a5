"""The rider's web shop as a rider uses it, on a phone-sized headless Chromium: the back office served by uvicorn on
a loopback port (the shop wired as `configure_shop` does: the published test ticket keys, the payment platform
simulator as a real HTTP server posting its notifications to /api/v1/ota/webhook), on the real clock.

A rider buys a single ride (phone number, one-time code sent through the SMS gateway adapter to the gateway
simulator (hardware_sim.sms) and read there as the rider's phone would, pay on the simulator, the page refreshes
itself to the ticket), then a coach seat for tomorrow (the proven phone is remembered: no second code).
Each ticket's QR code is cut out of the page's screenshot and decoded independently with zbar (`zbarimg`, Debian
zbar-tools; without it the QR text shown under the code is used) and verified with wire.ticket; the pickup code's
check digits hold and map to the ticket in plain SQL; the seats left are the books'. Screenshots are kept in
var/test-artefacts/screenshots/ (shop-*.png).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn
from sqlalchemy import text
from test_web_pages import SHOTS, chrome  # noqa: F401  (chrome: the same Chromium as the other page tests)

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.keyservice import LocalKeyService
from backoffice.payments.platform import HttpPlatform
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.web import shop_service
from backoffice.web.api.ota import configure_ota
from backoffice.web.app import create_app
from backoffice.web.auth import TokenStore
from backoffice.sms.gateway import TEST_SMS_SECRET, HttpSmsGateway
from backoffice.web.shop_service import configure_shop
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.payment import TEST_MERCHANT_SECRET, PlatformSimulator
from hardware_sim.sms import SmsGatewaySimulator
from wire.ticket import check_pickup_code, decode_ticket

pytestmark = pytest.mark.slow

OP = "coachco"
PHONE = "13912345678"
KEYS = published_test_keys()
PHONE_SIZE = (412, 915)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


@pytest.fixture
def shop(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    now = datetime.now(UTC)
    tomorrow = orders.service_day_of(now, "Asia/Shanghai", 3) + timedelta(days=1)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="城际客运 Coach Co", at=now - timedelta(days=9))
        registry.add_route(conn, code="C1", operator=OP, name="City - Airport", flat_fare=200,
                           at=now - timedelta(days=9))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="市内单程 City ride",
                              price_fen=200, by="clerk", now=now)
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="机场大巴 Airport coach",
                              price_fen=3000, by="clerk", now=now)
        dep = catalogue.add_departure(conn, operator=OP, product="coach", route="C1", service_date=tomorrow,
                                      departs="08:30", seats=2).id
    sim = PlatformSimulator().start()
    app = create_app(engine, tokens=TokenStore(tokens={}), migrate=False)
    port = free_port()
    configure_ota(app, keys=LocalKeyService(TEST_ISSUER_KEYS, source="test keys"), webhook_key=sim.public_key)
    platform = HttpPlatform(sim.url, merchant_id="farebox", secret=TEST_MERCHANT_SECRET, public_key=sim.public_key)
    sms = SmsGatewaySimulator().start()
    gateway = HttpSmsGateway(sms.url, account="farebox", secret=TEST_SMS_SECRET)
    configure_shop(app, ticket_keys=KEYS, platform=platform, notify_url=f"http://127.0.0.1:{port}/api/v1/ota/webhook",
                   otp_sender=gateway)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield {"base": f"http://127.0.0.1:{port}", "engine": engine, "sim": sim, "sms": sms, "dep": dep,
           "tomorrow": tomorrow}
    server.should_exit = True
    thread.join(10)
    platform.close()
    gateway.close()
    sms.stop()
    sim.stop()
    engine.dispose()


@pytest.fixture
def phone():
    with chrome() as driver:
        driver.set_window_size(*PHONE_SIZE)
        yield driver


def _shot(driver, name: str):
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(PHONE_SIZE[0], max(PHONE_SIZE[1], min(height + 40, 4000)))
    driver.save_screenshot(str(path))
    driver.set_window_size(*PHONE_SIZE)
    assert path.stat().st_size > 5_000, f"{path} looks empty"
    return path


def _wait(driver, css: str, timeout: float = 40):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def _click(driver, css: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def _pay_and_see_ticket(driver, world, shot: str) -> tuple[str, str]:
    """The order page: unpaid with a pay link; the rider follows it to the platform's page (the simulator), pays
    there and is sent back to the order page, which shows the ticket. (order id, page's pickup code)."""
    from selenium.webdriver.common.by import By

    order_id = _wait(driver, "#order-id").text
    state = driver.find_element(By.ID, "state").get_attribute("class")
    assert "shop-created" in state
    back, total = driver.current_url, driver.find_element(By.ID, "total").text
    pay = driver.find_element(By.ID, "pay").get_attribute("href")
    assert pay.startswith(f"{world['sim'].url}/pay/{order_id}?return_url=")
    _click(driver, "#pay")  # the platform's own page: the amount, then pay; it sends the browser back to the shop
    assert _wait(driver, "#amount").text == total
    _shot(driver, shot + "-platform")
    _click(driver, "#pay")
    _wait(driver, "#qr-1")
    assert driver.current_url == back
    assert "shop-issued" in driver.find_element(By.ID, "state").get_attribute("class")
    _shot(driver, shot)
    return order_id, driver.find_element(By.ID, "pickup-1").text


def _qr_text(driver, tmp_path, name: str) -> str:
    """The QR code as the rider's screen shows it, decoded by zbar; the text under it when zbar is missing."""
    from selenium.webdriver.common.by import By

    img = driver.find_element(By.ID, "qr-1")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
    png = tmp_path / f"{name}.png"
    png.write_bytes(img.screenshot_as_png)
    shutil.copy(png, SHOTS / f"{name}.png")
    if shutil.which("zbarimg") is None:
        driver.find_element(By.CSS_SELECTOR, "details summary").click()
        return driver.find_element(By.ID, "token-1").text
    out = subprocess.run(["zbarimg", "--quiet", "--raw", str(png)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _check_ticket(world, order_id: str, qr: str, pickup: str, kind: str) -> int:
    engine = world["engine"]
    ticket = decode_ticket(qr, {KEYS.key_id: KEYS.public_key()})  # signed with the ticket key, unaltered
    rows = sql(engine, "SELECT ticket_id, kind, pickup_serial, valid_from, valid_to FROM ticket WHERE order_id = :o",
               o=order_id)
    assert [(r[0], r[1]) for r in rows] == [(ticket.ticket_id, kind)]
    assert ticket.operator == OP
    assert check_pickup_code(pickup, KEYS.pickup_key(OP)) == rows[0][2] == ticket.ticket_id % 10**10
    assert sql(engine, "SELECT phone, channel, state, paid_fen FROM ticket_order WHERE order_id = :o",
               o=order_id)[0][:3] == (PHONE, "web", "issued")
    return ticket.ticket_id


def test_a_rider_buys_a_ride_and_a_coach_seat_on_a_phone(shop, phone, tmp_path):
    from selenium.webdriver.common.by import By

    base, engine, driver = shop["base"], shop["engine"], phone
    driver.get(f"{base}/shop")
    _shot(driver, "shop-home")
    _click(driver, f"#op-{OP}")
    _wait(driver, "#product-ride")
    _shot(driver, "shop-products")

    # 1. a single ride: phone number, one-time code, order, pay, ticket
    _click(driver, "#product-ride")
    _wait(driver, "#phone").send_keys(PHONE)
    assert "2.00" in driver.find_element(By.ID, "total").text
    _click(driver, "#send-code")
    code_box = _wait(driver, "#code")
    texts = shop["sms"].texts_to(PHONE)  # the rider reads the SMS
    assert len(texts) == 1
    code = re.search(r"\b(\d{6})\b", texts[0]).group(1)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    code_box.send_keys(wrong)
    _click(driver, "#confirm")
    assert _wait(driver, ".shop-error").is_displayed()  # a wrong code: told so, nothing ordered
    assert sql(engine, "SELECT COUNT(*) FROM ticket_order") == [(0,)]
    # the open code is in the database (any serve process can check it), as an HMAC with one wrong try spent
    [(digest, tries)] = sql(engine, "SELECT digest, attempts_left FROM shop_code WHERE phone = :p", p=PHONE)
    assert code not in digest and tries == shop_service.OTP_ATTEMPTS - 1
    _wait(driver, "#code").send_keys(code)
    _shot(driver, "shop-code")
    _click(driver, "#confirm")
    _wait(driver, "#pay")
    _shot(driver, "shop-order-unpaid")
    ride_order, ride_pickup = _pay_and_see_ticket(driver, shop, "shop-ticket-ride")
    ride_qr = _qr_text(driver, tmp_path, "shop-qr-ride")
    ride_ticket = _check_ticket(shop, ride_order, ride_qr, ride_pickup, "single")

    # 2. a coach seat tomorrow: the phone proven a minute ago needs no second code
    driver.get(f"{base}/shop/{OP}?day={shop['tomorrow']}")
    seats = _wait(driver, f"#departure-{shop['dep']} .shop-seats").text
    assert seats.endswith(" 2")
    _shot(driver, "shop-coaches")
    _click(driver, f"#departure-{shop['dep']}")
    _wait(driver, "#buy")
    assert "30.00" in driver.find_element(By.ID, "total").text
    _click(driver, "#buy")
    coach_order, coach_pickup = _pay_and_see_ticket(driver, shop, "shop-ticket-coach")
    coach_qr = _qr_text(driver, tmp_path, "shop-qr-coach")
    coach_ticket = _check_ticket(shop, coach_order, coach_qr, coach_pickup, "coach_trip")
    assert coach_ticket != ride_ticket
    assert len(shop["sms"].texts_to(PHONE)) == 1  # one code sent in all

    # the same page in English, one language at a time
    _click(driver, "#lang-en")
    _wait(driver, "#lang-zh")
    assert "give the driver the pickup code" in driver.page_source and "取票码" not in driver.page_source
    _shot(driver, "shop-ticket-coach-en")

    # the books in plain SQL: one seat sold of two, what the page now says; two payments on the platform
    assert sql(engine, "SELECT seats, seats_taken FROM departure WHERE id = :d", d=shop["dep"]) == [(2, 1)]
    driver.get(f"{base}/shop/{OP}?day={shop['tomorrow']}")
    assert _wait(driver, f"#departure-{shop['dep']} .shop-seats").text.endswith(" 1")
    assert sorted((e["order_id"], e["amount"]) for e in shop["sim"].ledger) == sorted(
        [(ride_order, 200), (coach_order, 3000)])
    assert sql(engine, "SELECT SUM(paid_fen) FROM ticket_order") == [(3200,)]

    # another browser (another person) cannot open the rider's order
    with chrome() as other:
        other.get(f"{base}/shop/{OP}/orders/{ride_order}")
        assert "#qr-1" not in other.page_source and "qr-1" not in other.page_source

"""E-tickets end to end, on PostgreSQL and the machine's Mosquitto (issue 11, "Tests and figures"):

1. a rider buys a single ride on the web shop (HTTP form posts: phone number, one-time code read from the SMS
   gateway simulator, order), another a coach seat by SMS (the seed's dialogue C#origin#destination#date#time, Y),
   and the first rider a second single ride; each pays on the payment platform simulator (a real HTTP server that
   notifies the back office's webhook);
2. a real `farebox validator run` process receives the ticket keys in its params package (published by
   backoffice.packages_publish, signed, retained on the fleet topic), its driver signs in with a driver card on the
   simulated RFID-SIM module (pty), the web ticket's QR text comes from the simulated 2D scanner (pty) and the
   driver keys the SMS rider's pickup code on the simulated keypad (pty);
3. the uses travel over Mosquitto to a real `farebox ingest` process and are stored once (plain SQL);
4. the unused second single ride is refunded with `farebox payments refund` while the platform loses its answer:
   pending, then `--retry` sends the same refund id, and the platform paid out once (its own ledger);
5. the clearing run puts the uses' revenue on the bus's route, vehicle and driver at the prices paid (plain SQL);
6. `farebox payments statement fetch` stores the day's file and reconciles it: no differences, and its money is
   the books' (plain SQL).

The back office is `farebox serve` (pages, API, the SMS and payment webhooks, its scheduler sweeping the SMS dialogue)
and `farebox ingest`, each its own process configured by its FAREBOX_* settings (the published test keys, with
--insecure-test-keys); the payment platform and the SMS gateway are simulators serving HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import text

from backoffice import clearing_runs, packages_publish, registry
from backoffice.db import make_engine, upgrade
from backoffice.sms.gateway import TEST_SMS_SECRET
from backoffice.tickets import catalogue
from backoffice.tickets.keys import published_test_keys
from epurse.cardtypes import CardType
from farebox.broker import free_port
from hardware_sim.card import SimCard
from hardware_sim.keypad import SimKeypad
from hardware_sim.payment import PLATFORM_TZ, TEST_MERCHANT_SECRET, PlatformSimulator
from hardware_sim.rfid24_module import Rfid24Module
from hardware_sim.scanner import SimScanner
from hardware_sim.sms import SmsGatewaySimulator
from wire import status, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.packages import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, params_body

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TZ = "Asia/Shanghai"
KEYS = published_test_keys()
WEB_RIDER, SMS_RIDER = "13911112222", "13833334444"
RIDE, COACH = 200, 4550  # fen
DRIVER_ASN = "59990000000000000077"


def sql(engine, query: str, **params) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(query), params)]


def wait_for(what, message: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out: {message}")


class Screen:
    """The validator's screen: its standard output, line by line."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, words: str, after: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if words in self.lines[i]:
                        return i + 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{words!r} not shown; screen:\n" + "\n".join(self.lines[after:]))
                self._cond.wait(left)


class Statuses:
    """The bus's status messages as the back office reads them (decoded with its MAC key)."""

    def __init__(self, target, operator: str, device: str, key: bytes, uid: str):
        self.seen: list = []
        self.topic = topics.status(operator, device)
        ready = threading.Event()
        self.client = new_client(target, f"e2e_st_{uid}", persistent=False)
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, 1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = lambda c, u, m: m.payload and self.seen.append(status.decode_status(m.payload,
                                                                                                     key=key))
        self.client.connect(target.host, target.port)
        self.client.loop_start()
        assert ready.wait(10)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self, *retained: str) -> None:
        for topic in (self.topic, *retained):  # the shared broker keeps nothing of this test
            self.publish(topic, b"", True)
        self.client.disconnect()
        self.client.loop_stop()


def farebox(env, *args, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "farebox.cli", "--insecure-test-keys", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def world(tmp_path, pg_schema_url, mosquitto_url, uid):
    engine = make_engine(pg_schema_url)
    upgrade(engine)
    op, device = f"tk{uid[:8]}", f"tb_{uid}"
    now = datetime.now(UTC)
    departs = (now + timedelta(minutes=30)).astimezone(ZoneInfo(TZ))
    with engine.begin() as conn:
        long_ago = now - timedelta(days=30)
        registry.add_operator(conn, code=op, name="城际公交 Intercity Bus", timezone=TZ, at=long_ago)
        registry.set_stop(conn, operator=op, code="SH", name="上海", by="clerk")
        registry.set_stop(conn, operator=op, code="SZ", name="苏州", by="clerk")
        registry.add_route(conn, code="G2", operator=op, name="上海-苏州", flat_fare=RIDE, at=long_ago,
                           stops={0: ["SH", "SZ"], 1: ["SZ", "SH"]})
        registry.add_vehicle(conn, code="v1", operator=op, plate="沪B-20001", at=long_ago)
        registry.add_driver(conn, staff_no="D77", operator=op, name="王师傅", card_asn=DRIVER_ASN, at=long_ago)
        registry.add_device(conn, device_id=device, operator=op, vehicle="v1", terminal_id="010000000777",
                            at=long_ago)
        clearing_runs.set_commission_rate(conn, operator=op, rate_bp=60, valid_from=long_ago.date())
        catalogue.add_product(conn, operator=op, code="ride", kind="single", name="市内单程 City ride",
                              price_fen=RIDE, by="clerk", now=now)
        catalogue.add_product(conn, operator=op, code="coach", kind="coach_trip", name="上海-苏州 coach",
                              price_fen=COACH, by="clerk", now=now)
        catalogue.add_departure(conn, operator=op, product="coach", route="G2", service_date=departs.date(),
                                departs=departs.strftime("%H:%M"), seats=5)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    pay = PlatformSimulator().start()
    sms = SmsGatewaySimulator(inbound_url=f"{api}/sms/inbound").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env.update(FAREBOX_DATABASE_URL=pg_schema_url, FAREBOX_MQTT_URL=mosquitto_url, FAREBOX_VAR_DIR=str(tmp_path),
               FAREBOX_PAYMENT_URL=pay.url, FAREBOX_PAYMENT_MERCHANT="farebox",
               FAREBOX_PAYMENT_SECRET=TEST_MERCHANT_SECRET.hex(), FAREBOX_PAYMENT_NOTIFY_URL=f"{api}/ota/webhook",
               FAREBOX_PAYMENT_PUBLIC_KEY=pay.public_key.hex(), FAREBOX_SMS_URL=sms.url,
               FAREBOX_SMS_ACCOUNT="farebox", FAREBOX_SMS_SECRET=TEST_SMS_SECRET.hex(), PYTHONUNBUFFERED="1",
               # as well as --insecure-test-keys: serve's SMS and payment jobs read the settings again from the
               # environment, where the command-line flag is not (farebox/sms_cmd.py, farebox/payments_cmd.py)
               FAREBOX_INSECURE_TEST_KEYS="1")
    # the back office: `farebox serve` (pages, API, webhooks, scheduler: the SMS sweep, the payment jobs) and
    # `farebox ingest`, each its own process, as in production
    procs = []
    for name, args in (("serve", ["serve", "--no-ingest", "--no-status", "--no-publisher", "--port", str(port)]),
                       ("ingest", ["ingest", "--client-id", f"ingest_{uid}", "--operator", op])):
        ready = tmp_path / f"{name}.ready"
        with open(tmp_path / f"{name}.log", "w") as log:
            procs.append((name, ready, subprocess.Popen(
                [sys.executable, "-m", "farebox.cli", "--insecure-test-keys", *args, "--ready-file", str(ready)],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
    try:
        for name, ready, proc in procs:
            wait_for(lambda: ready.exists() or proc.poll() is not None, f"{name} to start", 90)
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
        yield dict(engine=engine, op=op, device=device, base=f"http://127.0.0.1:{port}", pay=pay, sms=sms, env=env,
                   departs=departs, mqtt=mosquitto_url, tmp=tmp_path, uid=uid)
    finally:
        for _name, _ready, proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        sms.stop()
        pay.stop()
        engine.dispose()


def _text_after(sms, phone: str, before: int, pattern: str) -> re.Match:
    def found():
        for t in sms.texts_to(phone)[before:]:
            m = re.search(pattern, t)
            if m:
                return m
        return None
    return wait_for(found, f"a text to {phone} matching {pattern!r}")


def _shop_ticket(http, w, *, first: bool) -> tuple[str, str, str]:
    """A single ride bought on the web shop's forms and paid on the platform: (order id, QR text, pickup code)."""
    op, item = w["op"], {"product": "ride", "departure": "", "quantity": "1"}
    data = {"phone": WEB_RIDER, **item}
    if first:  # the phone number is proven with a one-time code sent by SMS; the shop remembers it after
        before = len(w["sms"].texts_to(WEB_RIDER))
        assert http.post(f"/shop/{op}/code", data=data).status_code == 200
        data["code"] = _text_after(w["sms"], WEB_RIDER, before, r"\b(\d{6})\b").group(1)
    r = http.post(f"/shop/{op}/order", data=data)
    assert r.status_code == 303, r.text[:500]
    order_id = r.headers["location"].rsplit("/", 1)[1]
    page = http.get(r.headers["location"]).text
    assert f'href="{w["pay"].url}/pay/{order_id}?return_url=' in page  # the platform's page, then back here
    w["pay"].rider_pays(order_id)  # in the wallet app; the platform notifies the back office

    def issued():
        html = http.get(f"/shop/{op}/orders/{order_id}").text
        return html if 'id="token-1"' in html else None
    html = wait_for(issued, "the shop's ticket")
    token = re.search(r'id="token-1">([^<]+)<', html).group(1).strip()
    pickup = re.sub(r"\s", "", re.search(r'id="pickup-1">([^<]+)<', html).group(1))
    return order_id, token, pickup


def test_a_ticket_bought_on_the_web_and_one_by_sms_ride_a_bus_and_reach_the_books(world):
    w = world
    engine, op, device, pay, sms = w["engine"], w["op"], w["device"], w["pay"], w["sms"]

    # 1. sales: the web shop, SMS, and a second web ticket the rider will not use
    with httpx.Client(base_url=w["base"], timeout=30) as http:
        web_order, web_token, _ = _shop_ticket(http, w, first=True)
        spare_order, _, _ = _shop_ticket(http, w, first=False)
    departs = w["departs"]
    before = len(sms.texts_to(SMS_RIDER))
    sms.rider_texts(SMS_RIDER, f"C#上海#苏州#{departs:%Y-%m-%d}#{departs:%H:%M}")
    _text_after(sms, SMS_RIDER, before, r"reply Y")
    before = len(sms.texts_to(SMS_RIDER))
    sms.rider_texts(SMS_RIDER, "Y")
    sms_order = _text_after(sms, SMS_RIDER, before, rf"{re.escape(pay.url)}/pay/(\w+)").group(1)
    pay.rider_pays(sms_order)
    pickup = _text_after(sms, SMS_RIDER, before, r"Pickup code (\d{16})").group(1)
    orders = dict(((o, (s, c, t, p)) for o, s, c, t, p in sql(
        engine, "SELECT order_id, state, channel, total_fen, paid_fen FROM ticket_order WHERE operator = :op",
        op=op)))
    assert orders == {web_order: ("issued", "web", RIDE, RIDE), spare_order: ("issued", "web", RIDE, RIDE),
                      sms_order: ("issued", "sms", COACH, COACH)}

    # 2. the bus: ticket keys over the air, the driver signs in, a QR scanned, a pickup code keyed
    key = mac_key(TEST_DEVICE_MASTER, device)
    target = parse_mqtt_url(w["mqtt"])
    office = Statuses(target, op, device, key, w["uid"])
    with engine.begin() as conn:
        out = packages_publish.publish(conn, "params", op, topics.FLEET, 1, params_body(route="G2"),
                                       seed=TEST_SIGNING_SEED, ticket_keys=KEYS)
    assert json.loads(out[0].payload[out[0].payload.index(b"{"):-64])["tickets"]["keys"] == {
        str(KEYS.key_id): KEYS.public_key().hex()}
    for m in out:
        office.publish(m.topic, m.payload, m.retain)
    tmp = w["tmp"]
    (tmp / "mac.key").write_text(key.hex())
    (tmp / "fares.json").write_text(json.dumps({"version": 1, "flat": {"G2": RIDE}}))
    module, scanner, keypad = Rfid24Module(), SimScanner(), SimKeypad()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "--insecure-test-keys", "validator", "run", "--device", device,
         "--operator", op, "--route", "G2", "--vehicle", "v1", "--reader", f"rfid24:{module.path}",
         "--scanner", f"qr:{scanner.path}?baud=9600", "--keypad", f"serial:{keypad.path}",
         "--psam", "sim:010000000777", "--journal", str(tmp / "journal.db"), "--fares", str(tmp / "fares.json"),
         "--mqtt", w["mqtt"], "--mac-key", f"@{tmp / 'mac.key'}", "--signing-public-key", TEST_PUBLIC_KEY.hex(),
         "--heartbeat-seconds", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=w["env"], cwd=ROOT)
    screen = Screen(proc)
    try:
        wait_for(lambda: any(s.params_version == 1 for s in office.seen), "the params package applied")
        now = datetime.now(UTC)
        driver = SimCard(bytes.fromhex(DRIVER_ASN), CardType.DRIVER, 0, staff_no="D77",
                         start=(now - timedelta(days=9)).date(), end=(now + timedelta(days=9)).date())
        module.present(driver)
        at = screen.wait_for("签到成功", 0)
        module.remove()
        scanner.scan(web_token)
        at = screen.wait_for("验票成功 Ticket accepted", at)
        keypad.press("5" + pickup + "#")
        at = screen.wait_for("验票成功 Ticket accepted", at)
        scanner.scan(web_token)  # shown again: the bus refuses it and records nothing
        screen.wait_for("车票已使用", at)

        # 3. stored once by the real ingest, off the real broker
        uses = wait_for(lambda: (rows := sql(
            engine, "SELECT device_id, device_seq, ticket_id, use_no, presented_by, route, vehicle, driver, revenue "
            "FROM ticket_use WHERE operator = :op ORDER BY device_seq", op=op)) and len(rows) >= 2 and rows,
            "two ticket uses stored")
        time.sleep(1.0)  # the validator's retries and heartbeats would add a second copy now, if anything did
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        office.close(topics.fleet_topic(op, "params"))
        module.close()
        scanner.close()
        keypad.close()
    assert proc.returncode == 0, "\n".join(screen.lines[-40:])
    tickets = dict(sql(engine, "SELECT order_id, ticket_id FROM ticket WHERE operator = :op", op=op))
    assert sql(engine, "SELECT COUNT(*) FROM ticket_use WHERE operator = :op", op=op) == [(2,)]
    assert [(u[2], u[3], u[4], u[5], u[6], u[7], u[8]) for u in uses] == [
        (tickets[web_order], 1, "qr", "G2", "v1", "D77", True),
        (tickets[sms_order], 1, "pickup", "G2", "v1", "D77", True)]
    assert sql(engine, "SELECT COUNT(*) FROM quarantine") == [(0,)]
    assert dict(sql(engine, "SELECT order_id, state FROM ticket_order WHERE operator = :op", op=op))[web_order] \
        == "used"

    # 4. a refund of the unused ticket, through the platform once although its first answer is lost
    pay.faults.lose_answers["refunds"] = 1
    done = farebox(w["env"], "payments", "refund", spare_order, "--by", "clerk_li", "--why", "rider changed plans")
    assert done.returncode == 1 and "pending" in done.stdout, done.stdout + done.stderr
    done = farebox(w["env"], "payments", "refund", "--retry")
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout + done.stderr
    assert [r["order_id"] for r in pay.refunds.values()] == [spare_order]
    assert [(e["order_id"], e["amount"]) for e in pay.ledger if e["kind"] == "refund"] == [(spare_order, RIDE)]
    assert sql(engine, "SELECT COUNT(*), MIN(state), MIN(attempts) FROM payment_refund") == [(1, "succeeded", 2)]
    assert sql(engine, "SELECT refunded_fen FROM ticket_order WHERE order_id = :o", o=spare_order) == [(RIDE,)]
    assert sql(engine, "SELECT state FROM ticket WHERE order_id = :o", o=spare_order) == [("refunded",)]
    refused = farebox(w["env"], "payments", "refund", web_order, "--by", "clerk_li", "--why", "used ticket")
    assert refused.returncode == 1 and "refused" in refused.stderr  # a used ticket's money stays earned

    # 5. clearing: the revenue of the two uses on the bus's route, vehicle and driver, at the prices paid; the
    # refunded ticket earns nothing (not even when its validity ends)
    from backoffice.clearing_runs import clear_day
    from backoffice.tickets.orders import service_day_of

    day = service_day_of(datetime.now(UTC), TZ, 3)
    with engine.begin() as conn:
        clear_day(conn, operator=op, day=day, now=datetime.now(UTC) + timedelta(seconds=1))
    expected = sql(engine, "SELECT u.route, u.vehicle, u.driver, SUM(t.price_fen) FROM ticket_use u JOIN ticket t "
                   "ON t.ticket_id = u.ticket_id WHERE u.operator = :op AND u.revenue GROUP BY u.route, u.vehicle, "
                   "u.driver", op=op)
    assert expected == [("G2", "v1", "D77", RIDE + COACH)]
    assert sql(engine, "SELECT route, vehicle, driver, SUM(amount) FROM ticket_revenue WHERE operator = :op "
               "AND source = 'use' GROUP BY route, vehicle, driver", op=op) == expected
    others = sql(engine, "SELECT source, ticket_id, amount FROM ticket_revenue WHERE operator = :op AND "
                 "source <> 'use'", op=op)
    assert others == [], others

    # 6. the day's statement: stored once, reconciled to zero differences, and its money is the books'
    platform_day = datetime.now(UTC).astimezone(ZoneInfo(PLATFORM_TZ)).date()
    done = farebox(w["env"], "payments", "statement", "fetch", "--day", platform_day.isoformat())
    assert done.returncode == 0 and "0 new work-list item(s)" in done.stdout, done.stdout + done.stderr
    assert sql(engine, "SELECT COUNT(*) FROM payment_recon_item") == [(0,)]
    (paid, refunded), = sql(engine, "SELECT SUM(paid_fen), SUM(refunded_fen) FROM ticket_order WHERE operator = :op",
                            op=op)
    assert (paid, refunded) == (2 * RIDE + COACH, RIDE)
    assert sum(e["amount"] for e in pay.ledger if e["kind"] == "payment") == paid
    assert sum(e["amount"] for e in pay.ledger if e["kind"] == "refund") == refunded
    again = farebox(w["env"], "payments", "statement", "fetch", "--day", platform_day.isoformat())
    assert again.returncode == 0 and "stored already" in again.stdout

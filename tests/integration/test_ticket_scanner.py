"""E-tickets on a bus, end to end on the validator's side: `farebox validator run` as a real process with a
simulated RFID-SIM module (the driver's card) and a simulated 2D scanner, each on its own pty, a simulated driver
keypad on a third, and its link to the machine's Mosquitto.

The back office's side is played by a plain paho client: it sends a params package signed with the published TEST
key carrying the ticket public key and the pickup key, and listens on the bus's taps topic. Tickets and pickup codes
are made by the tests' own reference (tests/reference_ticket.py). What is checked comes from outside the process:
the screen text, the batches on the broker decoded with wire.codec and the device's key, and the journal read with
plain sqlite3 after the process stopped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta

from reference_ticket import ref_body, ref_keypair, ref_pickup_code, ref_sign, ref_text

from epurse.cardtypes import CardType
from hardware_sim.card import SimCard
from hardware_sim.keypad import SimKeypad
from hardware_sim.scanner import SimScanner
from wire import codec, status, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.packages import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, Package, params_body, sign_package

SEED = bytes(range(100, 132))
_, PUB = ref_keypair(SEED)
PICKUP_KEY = bytes(range(32))


def ticket(ticket_id: int, operator: str, *, routes=("r1",), hours=(-1, 23), uses=1) -> str:
    now = int(time.time())
    body = ref_body(key_id=4, ticket_id=ticket_id, operator=operator, product=1, routes=list(routes),
                    valid_from=now + hours[0] * 3600, valid_to=now + hours[1] * 3600, uses=uses, category=1)
    return ref_text(body, ref_sign(body, SEED))


class Screen:
    def __init__(self, proc):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, after: int, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if text in self.lines[i]:
                        return i + 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{text!r} not shown; screen was:\n" + "\n".join(self.lines[after:]))
                self._cond.wait(left)


class BackOffice:
    """Sends packages to the bus, keeps its statuses and the records of the batches it sends (no acks)."""

    def __init__(self, target, operator, device, key, uid):
        self.operator, self.device, self.key = operator, device, key
        self.statuses, self.records, self.batches = [], {}, 0
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = new_client(target, f"bo_t_{uid}", persistent=False)
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(topics.status(operator, device), 1), (topics.taps(operator, device), 1)])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(target.host, target.port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client, userdata, message):
        if not message.payload:
            return
        with self._lock:
            if message.topic == topics.status(self.operator, self.device):
                self.statuses.append(status.decode_status(message.payload, key=self.key))
            else:
                batch = codec.decode_batch(message.payload, key=self.key)
                self.batches += 1
                for r in batch.records:  # resent until acked: keep each record once, by its key
                    self.records[r.key] = r

    def wait(self, predicate, what: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                value = predicate(self)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def send(self, message, pkg):
        topic = topics.device_topic(self.operator, self.device, message)
        self.client.publish(topic, sign_package(pkg, TEST_SIGNING_SEED), qos=1).wait_for_publish(10)

    def close(self):
        self.client.publish(topics.status(self.operator, self.device), b"", qos=1, retain=True).wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()


def test_bus_scans_tickets_and_keys_a_pickup_code(tmp_path, rfid24_module, mosquitto_url, uid):
    operator, device = f"op_{uid}", f"t_{uid}"
    key = mac_key(TEST_DEVICE_MASTER, device)
    (tmp_path / "mac.key").write_text(key.hex())
    fares = tmp_path / "fares.json"
    fares.write_text(json.dumps({"version": 1, "flat": {"r1": 200}}))
    journal = tmp_path / "journal.db"
    office = BackOffice(parse_mqtt_url(mosquitto_url), operator, device, key, uid)
    scanner, keypad = SimScanner(), SimKeypad()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "validator", "run", "--device", device, "--operator", operator,
         "--route", "r1", "--vehicle", "b1", "--reader", f"rfid24:{rfid24_module.path}",
         "--scanner", f"qr:{scanner.path}?baud=9600", "--keypad", f"serial:{keypad.path}",
         "--psam", "sim:010000000999", "--journal", str(journal), "--fares", str(fares), "--mqtt", mosquitto_url,
         "--mac-key", f"@{tmp_path / 'mac.key'}", "--signing-public-key", TEST_PUBLIC_KEY.hex(),
         "--heartbeat-seconds", "0.5", "--pickup-max-wrong", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    screen = Screen(proc)
    try:
        at = screen.wait_for("r1", 0)
        office.wait(lambda o: o.statuses, "the validator's birth")
        tickets = {"keys": {"4": PUB.hex()}, "pickup_key": PICKUP_KEY.hex()}
        office.send("params", Package("params", 1, device, datetime.now(UTC), params_body(tickets=tickets)))
        office.wait(lambda o: any(s.params_version == 1 for s in o.statuses), "params 1 applied")

        driver = SimCard(bytes.fromhex("59990000000000000009"), CardType.DRIVER, 0, staff_no="D0999",
                         start=date.today() - timedelta(days=9), end=date.today() + timedelta(days=9))
        rfid24_module.present(driver)
        at = screen.wait_for("签到成功", at)
        rfid24_module.remove()

        good = ticket(7_000_000_001, operator)
        for code, expect in [
            (good, "验票成功 Ticket accepted"),
            (ticket(7_000_000_002, operator, hours=(-48, -24)), "车票已过期 Ticket expired"),
            (ticket(7_000_000_003, operator, hours=(2, 26)), "车票尚未生效 Ticket not valid yet"),
            (ticket(7_000_000_004, operator, routes=("r9",)), "车票不适用本线路"),
            (ticket(7_000_000_005, "another_op"), "非本公司车票"),
            (good, "车票已使用 Ticket already used"),  # replayed
            (good[:-8] + ("AAAAAAAA" if not good.endswith("AAAAAAAA") else "BBBBBBBB"), "无效车票 Invalid ticket"),
        ]:
            scanner.scan(code)
            at = screen.wait_for(expect, at)
        scanner.send(os.urandom(2048).replace(b"\r", b"x").replace(b"\n", b"x") + b"\r")
        at = screen.wait_for("无法识别此票", at)

        code = ref_pickup_code(8_123_456_789_012, PICKUP_KEY)
        keypad.press("5" + code + "#")
        at = screen.wait_for("验票成功 Ticket accepted", at)
        keypad.press("5" + code + "#")
        at = screen.wait_for("车票已使用", at)

        uses = office.wait(lambda o: [r for r in o.records.values() if r.kind.value == "ticket_use"]
                           if sum(r.kind.value == "ticket_use" for r in o.records.values()) >= 2 else None,
                           "two ticket_use records on the broker")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        office.close()
        scanner.close()
        keypad.close()
    assert proc.returncode == 0, "\n".join(screen.lines)

    on_air = sorted((r.ticket_id, r.ticket_use, r.presented, r.route, r.vehicle, r.driver) for r in uses)
    assert on_air == [(8_123_456_789_012 % 10**10, 1, "pickup", "r1", "b1", "D0999"),
                      (7_000_000_001, 1, "qr", "r1", "b1", "D0999")]

    db = sqlite3.connect(journal)
    rows = db.execute("SELECT device_seq, json_extract(body, '$.ticket_id'), json_extract(body, '$.presented') "
                      "FROM record WHERE state = 'done' AND json_extract(body, '$.kind') = 'ticket_use' "
                      "ORDER BY device_seq").fetchall()
    used = db.execute("SELECT serial, uses FROM ticket_used ORDER BY serial").fetchall()
    db.close()
    assert [(tid, how) for _, tid, how in rows] == [(7_000_000_001, "qr"), (8_123_456_789_012 % 10**10, "pickup")]
    assert {seq for seq, _, _ in rows} == {r.device_seq for r in uses}  # the same records, exactly once each
    assert used == [(8_123_456_789_012 % 10**10, 1), (7_000_000_001, 1)]

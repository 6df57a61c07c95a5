"""A card reported lost at the counter, and a retired driver's card, reach a running bus by themselves (issue 9,
hole 7), all from outside: `farebox serve` (a real process; ingest, status consumer, publisher, scheduler and the
pages) on a SQLite file, on the embedded amqtt broker and on Mosquitto; a running `farebox validator run` with the
riders' RFID-SIM module on a pty; staff using the web pages with their own tokens. Nobody runs `farebox denylist
publish`: the back office must build and send the new version itself (FAREBOX_DENYLIST_REBUILD_SECONDS=1 here, so
the test takes seconds; the rule is within a minute, and the default is 30 s).

Checked from outside the processes: the screen text, the cards themselves (blocked, balances), the deny-list file the
validator wrote, and its journal read with plain sqlite3 after it stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from test_validator_process import Screen

from backoffice import registry
from backoffice.cards import issuance
from backoffice.db import make_engine, upgrade
from blacklist.denylist import DenyList, DenyListError
from epurse.cardtypes import CardType
from farebox.broker import free_port
from hardware_sim.card import SimCard
from wire import topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.packages import TEST_PUBLIC_KEY

ROOT = Path(__file__).resolve().parents[2]
TODAY = date.today()
TERMINAL = "010000000771"
DEADLINE = 60.0  # the rule: on the bus within a minute of the change


class Direct:
    """The counter's desk reader straight onto a SimCard (issuance reads the card as the desk would)."""

    def __init__(self, card):
        self.exchange = card.transmit


def card(prefix: str, n: int, card_type=CardType.ADULT, balance=1000, **kw) -> SimCard:
    return SimCard(bytes.fromhex(f"{prefix}{n:016d}"), int(card_type), balance, start=TODAY - timedelta(days=30),
                   end=TODAY + timedelta(days=300), **kw)


def farebox(*args: str) -> list[str]:
    return [sys.executable, "-m", "farebox.cli", *args]


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def login(base: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=30)
    r = client.post("/login", data={"token": token, "next": "/"}, follow_redirects=False)
    assert r.status_code in (302, 303), r.text
    return client


def wait_listed(deny_file: Path, asn: str, since: float, timeout: float = DEADLINE) -> float:
    """Seconds from ``since`` until the validator's deny-list file lists ``asn`` (the file is written atomically)."""
    while True:
        try:
            if asn in DenyList.load(deny_file):
                return time.monotonic() - since
        except (OSError, DenyListError):
            pass
        if time.monotonic() - since > timeout:
            raise AssertionError(f"card {asn} not on the bus's deny list {timeout:.0f} s after the change")
        time.sleep(0.1)


@pytest.fixture
def city(tmp_path, uid):
    """A SQLite back office with one operator, a flat route, a bus with its validator, two drivers and an issued
    rider card; tokens for the counter staff and the operator's clerk."""
    var = tmp_path / "var"
    var.mkdir()
    operator, device = f"op_{uid}", f"bus{uid}"
    riders = {"rider": card("5101", 1), "other": card("5101", 2)}
    drivers = {"D1": card("5102", 1, CardType.DRIVER, 0, staff_no="D1"),
               "D2": card("5102", 2, CardType.DRIVER, 0, staff_no="D2")}
    engine = make_engine(f"sqlite:///{(var / 'backoffice.db').resolve()}")
    upgrade(engine)
    then = datetime.now(UTC) - timedelta(days=1)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Deny List Bus", at=then)
        registry.add_route(conn, code="r1", operator=operator, name="Route 1", flat_fare=200, at=then)
        registry.add_vehicle(conn, code=f"v{uid}", operator=operator, plate="A-12345", at=then)
        registry.add_device(conn, device_id=device, operator=operator, vehicle=f"v{uid}", terminal_id=TERMINAL,
                            at=then)
        for staff_no, c in drivers.items():
            registry.add_driver(conn, staff_no=staff_no, operator=operator, name=f"driver {staff_no}",
                                card_asn=c.asn.hex(), at=then)
        for c in riders.values():
            issuance.issue_card(conn, card=issuance.read_card(Direct(c)), deposit=2000, who="staff:li", now=then)
    engine.dispose()
    env = {**os.environ, "FAREBOX_VAR_DIR": str(var), "FAREBOX_API_TOKENS": str(var / "api-tokens.toml"),
           "FAREBOX_INSECURE_TEST_KEYS": "1", "FAREBOX_DENYLIST_REBUILD_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("FAREBOX_DATABASE_URL", "FAREBOX_MQTT_URL", "FAREBOX_CONFIG"):
        env.pop(name, None)
    tokens = {}
    for role, extra in (("operator_staff", []), ("clerk", ["--operator", operator])):
        out = subprocess.run(farebox("token", "add", "--role", role, "--name", f"t {role}", *extra), env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        tokens[role] = out.stdout.strip().splitlines()[-1]
    return type("City", (), {"var": var, "operator": operator, "device": device, "vehicle": f"v{uid}", "riders": riders,
                             "drivers": drivers, "env": env, "tokens": tokens})


def start_serve(city, url: str, tmp_path: Path):
    port, ready = free_port(), tmp_path / "serve.ready"
    log = (tmp_path / "serve.log").open("w")
    env = {**city.env, "FAREBOX_MQTT_URL": url} if url else dict(city.env)  # no URL: serve starts its own broker
    proc = subprocess.Popen(farebox("serve", "--port", str(port), "--ready-file", str(ready), "--operator",
                                    city.operator), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"farebox serve did not come up: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, log, f"http://127.0.0.1:{port}"


def test_a_card_lost_at_the_counter_and_a_retired_drivers_card_are_refused_by_a_running_bus(
        tmp_path, city, broker_url, rfid24_module):
    serve, serve_log, base = start_serve(city, broker_url, tmp_path)
    key = mac_key(TEST_DEVICE_MASTER, city.device)
    fares, deny, journal = tmp_path / "fares.json", tmp_path / "denylist.bin", tmp_path / "journal.db"
    fares.write_text(json.dumps({"version": 1, "flat": {"r1": 200}}))
    bus = subprocess.Popen(
        farebox("validator", "run", "--device", city.device, "--operator", city.operator, "--route", "r1",
                "--vehicle", city.vehicle, "--reader", f"rfid24:{rfid24_module.path}", "--psam", f"sim:{TERMINAL}",
                "--journal", str(journal), "--fares", str(fares), "--deny-list", str(deny), "--mqtt", broker_url,
                "--mac-key", key.hex(), "--signing-public-key", TEST_PUBLIC_KEY.hex(), "--heartbeat-seconds", "2"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=city.env, cwd=ROOT)
    screen = Screen(bus)
    rider, other, d1, d2 = city.riders["rider"], city.riders["other"], city.drivers["D1"], city.drivers["D2"]
    figures = {}
    try:
        def tap(c: SimCard, expect: str, after: int) -> int:
            rfid24_module.present(c)
            at = screen.wait_for(expect, after)
            rfid24_module.remove()
            return at + 1

        at = screen.wait_for("r1", 0)
        at = tap(d1, "签到成功", at)  # shift opened
        at = tap(rider, "扣款成功", at)  # paid
        assert rider.balance == 800

        # The counter: the rider phones in, staff report the card lost on its page.
        staff = login(base, city.tokens["operator_staff"])
        asn = rider.asn.hex()
        page = staff.get(f"/cards/{asn}")
        assert page.status_code == 200, page.text
        started = time.monotonic()
        r = staff.post(f"/cards/{asn}/lost", data={"why": "rider phoned: phone stolen", "confirmed": "yes", "csrf": csrf_of(page.text)},
                       follow_redirects=False)
        assert r.status_code == 303, r.text
        figures["lost"] = wait_listed(deny, asn, started)
        time.sleep(0.5)  # the main loop swaps the list in between taps
        at = tap(rider, "此卡已停用", at)  # card blocked
        assert rider.blocked and rider.balance == 800
        at = tap(other, "扣款成功", at)  # the others still ride
        assert other.balance == 800

        # The clerk retires driver D2 on the registry page; their card must not open a shift any more.
        clerk = login(base, city.tokens["clerk"])
        page = clerk.get("/manage/drivers/D2")
        assert page.status_code == 200, page.text
        started = time.monotonic()
        r = clerk.post("/manage/drivers/D2/retire", data={"reason": "left the company", "csrf": csrf_of(page.text)},
                       follow_redirects=False)
        assert r.status_code == 303, r.text
        figures["retired"] = wait_listed(deny, d2.asn.hex(), started)
        time.sleep(0.5)
        at = tap(d2, "此卡已停用", at)
        assert d2.blocked
        at = tap(d1, "签退成功", at)  # D1's shift is still D1's: D2 opened nothing
    finally:
        bus.send_signal(signal.SIGTERM)
        bus.wait(timeout=20)
        serve.terminate()
        serve.wait(timeout=30)
        serve_log.close()
        _clear_retained(broker_url, city.operator)
    print(f"deny list on the bus: lost card {figures.get('lost', -1):.1f} s, retired driver's card "
          f"{figures.get('retired', -1):.1f} s after the page's POST (rebuild every 1 s)")
    assert bus.returncode == 0, "\n".join(screen.lines[-30:])

    db = sqlite3.connect(journal)
    rows = [json.loads(body) for (body,) in db.execute("SELECT body FROM record ORDER BY device_seq")]
    db.close()
    seen = [(r["kind"], r["card_asn"][-2:], r.get("driver") or "") for r in rows]
    assert seen == [("shift_open", "01", "D1"), ("purchase", "01", "D1"), ("denied", "01", "D1"),
                    ("purchase", "02", "D1"), ("denied", "02", "D1"), ("shift_close", "01", "D1")], seen
    assert all(r["reason"] == "on deny list; application blocked" for r in rows if r["kind"] == "denied")


def test_the_default_serve_with_its_own_broker_builds_the_version_by_itself(tmp_path, city):
    """`farebox serve` as it comes (no FAREBOX_MQTT_URL: it starts the embedded broker itself): a card reported lost on
    the counter page is in a stored, announced deny-list version within seconds, nobody publishing by hand."""
    serve, serve_log, base = start_serve(city, None, tmp_path)
    asn = city.riders["rider"].asn.hex()
    try:
        staff = login(base, city.tokens["operator_staff"])
        page = staff.get(f"/cards/{asn}")
        started = time.monotonic()
        r = staff.post(f"/cards/{asn}/lost", data={"why": "rider phoned", "confirmed": "yes", "csrf": csrf_of(page.text)},
                       follow_redirects=False)
        assert r.status_code == 303, r.text
        db = sqlite3.connect(city.var / "backoffice.db")
        try:
            while True:
                row = db.execute("SELECT version, body FROM denylist_version ORDER BY version DESC LIMIT 1").fetchone()
                if row is not None and asn in DenyList.from_bytes(row[1]):
                    break
                assert time.monotonic() - started < DEADLINE, "no deny-list version lists the lost card"
                time.sleep(0.2)
        finally:
            db.close()
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        serve_log.close()
    log = (tmp_path / "serve.log").read_text()
    assert f"deny list changed: version {row[0]}" in log and "deny-list announcement" in log, log[-3000:]


def _clear_retained(url: str, operator: str) -> None:
    """Retained announcements outlive the test on the shared Mosquitto."""
    target = parse_mqtt_url(url)
    client = new_client(target, f"clean_{operator}", persistent=False)
    client.connect(target.host, target.port, keepalive=30)
    client.loop_start()
    for m in topics.FLEET_MESSAGES:
        client.publish(topics.fleet_topic(operator, m), b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()

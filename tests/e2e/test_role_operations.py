"""Operations' day through the pages only: `farebox serve` (its ingest, status consumer and deny-list publisher on a
broker this test starts, so a simulated validator can log in with its own password), the small two-company city of
tests/web_city.py, an operations token from `farebox token add`, and headless Chromium.

A real validator uplink (validator.uplink.Uplink, with its own journal and its own clock, as a bus's GPS sets it)
is born, heard an hour later, has a purchase left grey by a card pulled away, loses its link for two hours (the
link is stopped) and comes back. Operations then read, in the browser: the validators page with that bus's gap in
its link history and the filters; the deny-list page (latest version, what it changed, which bus runs which); the
alarms list, where they acknowledge the grey-purchase alarm. Last, the bus is switched off cleanly and the
validators page says so (the demo's "every validator still online with a backlog" is gone).

Every figure is checked against plain SQL on the database file or against the times the test itself gave the bus.
Screenshots in var/test-artefacts/screenshots/: ops-validators-link-gap, ops-validators-stale-filter,
ops-denylist, ops-alarms-before-ack, ops-alarms-acknowledged, ops-validators-switched-off.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from test_web_pages import _shot, _wait_for, browser  # noqa: F401  (browser is a fixture)
from web_city import A, A_NAME, CARDS, DEVICES, seed

from backoffice.db import make_engine, upgrade
from farebox.broker import EmbeddedBroker
from validator.journal import Journal
from validator.uplink import Uplink
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key, mqtt_password
from wire.mqtt_url import parse_mqtt_url
from wire.records import RecordKind, TapRecord

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUS = "cb_002"  # never heard in the seeded city: its whole story is this test's
SHANGHAI = ZoneInfo("Asia/Shanghai")


def _farebox(*args: str) -> list[str]:
    return [sys.executable, "-m", "farebox.cli", *args]


def _sql(db: Path, query: str, *params):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def _until(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def _utc(text: str) -> datetime:
    """A time SQLite holds (naive UTC text) as aware UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def ops_server(tmp_path):
    broker = EmbeddedBroker(tmp_path / "broker", devices={BUS: mqtt_password(TEST_DEVICE_MASTER, BUS)})
    url = broker.start()
    var = tmp_path / "var"
    env = {**os.environ, "FAREBOX_VAR_DIR": str(var), "FAREBOX_API_TOKENS": str(var / "api-tokens.toml"),
           "FAREBOX_MQTT_URL": url, "FAREBOX_INSECURE_TEST_KEYS": "1"}
    for name in ("FAREBOX_DATABASE_URL", "FAREBOX_CONFIG"):
        env.pop(name, None)
    db = (var / "backoffice.db").resolve()
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    seed(engine, now=datetime.now(UTC))
    engine.dispose()
    token = subprocess.run(_farebox("token", "add", "--role", "operations", "--name", "e2e operations"), env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    port, ready = _free_port(), tmp_path / "serve.ready"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(_farebox("serve", "--port", str(port), "--ready-file", str(ready)), env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            broker.stop()
            pytest.fail(f"farebox serve did not come up: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.1)
    device_url = f"mqtt://{BUS}:{mqtt_password(TEST_DEVICE_MASTER, BUS)}@127.0.0.1:{broker.port}"
    try:
        yield f"http://127.0.0.1:{port}", token, device_url, db
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        broker.stop()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _free_port() -> int:
    from farebox.broker import free_port

    return free_port()


def _login(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    _wait_for(driver, "header form.who")


def _hm(at: datetime) -> str:
    return at.astimezone(SHANGHAI).strftime("%H:%M")


def test_operations_day_through_the_pages(ops_server, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, token, device_url, db = ops_server
    driver = browser
    operator, vehicle, route, driver_no, _terminal = DEVICES[BUS]

    # --- the bus's day, on its own clock (whole seconds, as a status carries them) ---------------------------
    now = datetime.now(UTC).replace(microsecond=0)
    born, last_heard, back = now - timedelta(hours=4), now - timedelta(hours=3), now - timedelta(hours=1)
    clock = [born]
    journal = Journal(tmp_path / "bus.journal")
    uplink = Uplink(journal, parse_mqtt_url(device_url), device_id=BUS, operator=A,
                    mac_key=mac_key(TEST_DEVICE_MASTER, BUS), software="2.4.1", heartbeat_seconds=3600,
                    clock=lambda: clock[0])

    def status_row():
        rows = _sql(db, "SELECT online, last_seen, backlog FROM device_status WHERE device_id = ?", BUS)
        return rows[0] if rows else None

    try:
        uplink.start()
        _until(lambda: status_row() and _utc(status_row()[1]) == born, "the birth stored")
        clock[0] = last_heard
        # a rider pulled the card away mid-purchase 20 minutes ago: the grey record stays in the journal
        journal.begin_purchase(TapRecord(device_id=BUS, device_seq=0, kind=RecordKind.PURCHASE,
                                         occurred_at=last_heard - timedelta(minutes=20), operator=operator,
                                         route=route, vehicle=vehicle, driver=driver_no, shift_no=1,
                                         card_asn=CARDS[1], card_type=1, card_ttc=7, amount=200, balance_after=800,
                                         terminal_id=_terminal, terminal_seq=1, tac="00000000", full_fare=200))
        uplink.send_status_now()
        _until(lambda: _utc(status_row()[1]) == last_heard, "the heartbeat an hour later")
        uplink.go_offline()  # the link stops (a dead zone): nothing more is heard
        clock[0] = back
        uplink.go_online()
        _until(lambda: _utc(status_row()[1]) == back and status_row()[0] == 1, "the birth after the gap")

        # --- validators page: the gap, the operator column, the filters -------------------------------------
        _login(driver, base, token)
        driver.find_element(By.PARTIAL_LINK_TEXT, "车载机").click()
        _wait_for(driver, "#fleet")
        heard = [_utc(r[0]) for r in _sql(db, "SELECT last_seen FROM device_status")]
        shown_day = max(heard).astimezone(SHANGHAI).date()
        if last_heard.astimezone(SHANGHAI).date() != shown_day:  # the test ran just after midnight
            driver.find_element(By.ID, "previous-day").click()
            _wait_for(driver, "#links")
        row = driver.find_element(By.ID, f"dev-{BUS}")
        assert row.find_element(By.CSS_SELECTOR, "td.operator").text == A_NAME
        assert row.get_attribute("data-state") == "online"
        gaps = driver.find_elements(By.CSS_SELECTOR, f"#link-{BUS} li.gap")
        assert [(g.get_attribute("data-since"), g.get_attribute("data-until")) for g in gaps] == \
            [(_hm(last_heard), _hm(back))]
        assert "120" in gaps[0].text  # minutes off the air
        _shot(driver, "ops-validators-link-gap")

        Select(driver.find_element(By.ID, "f-stale")).select_by_value("yes")
        driver.find_element(By.ID, "apply").click()
        _wait_for(driver, "#fleet")
        shown = {r.get_attribute("id")[4:] for r in driver.find_elements(By.CSS_SELECTOR, "#fleet tbody tr[id]")}
        cutoff = (datetime.now(UTC) - timedelta(minutes=5)).replace(tzinfo=None).isoformat(sep=" ")
        stale = {d for (d,) in _sql(db, "SELECT d.device_id FROM device d LEFT JOIN device_status s "
                                        "ON s.device_id = d.device_id WHERE s.last_seen IS NULL "
                                        "OR s.last_seen < ?", cutoff)}
        assert shown == stale and BUS in shown and "cb_001" not in shown
        _shot(driver, "ops-validators-stale-filter")

        # --- deny-list page: latest version, what it changed, which bus runs which -------------------------
        latest = _until(lambda: _sql(db, "SELECT max(version), count(*) FROM denylist_version")[0][0],
                        "the publisher's first deny list")
        driver.find_element(By.PARTIAL_LINK_TEXT, "黑名单").click()
        _wait_for(driver, "#versions")
        assert driver.find_element(By.ID, "latest-version").text == f"v{latest}"
        lost = {a for (a,) in _sql(db, "SELECT asn FROM card WHERE status IN ('lost', 'blocked', 'fraud')")}
        added = {td.text for td in driver.find_elements(By.CSS_SELECTOR, "#added tbody td code")}
        assert added == lost == {CARDS[3]}
        assert "落后 %d 版" % latest in driver.find_element(By.ID, f"bus-{BUS}").text  # it reports v0
        _shot(driver, "ops-denylist")

        # --- alarms: the grey purchase, acknowledged ------------------------------------------------------
        driver.find_element(By.PARTIAL_LINK_TEXT, "告警").click()
        _wait_for(driver, "#alarms")
        (alarm_id, text), = _sql(db, "SELECT id, text FROM alarm WHERE device_id = ? AND kind = 'grey_purchases' "
                                     "AND cleared_at IS NULL", BUS)
        assert text == f"1 grey purchase since {last_heard - timedelta(minutes=20):%Y-%m-%d %H:%M}Z"
        row = driver.find_element(By.ID, f"alarm-{alarm_id}")
        assert f"自 {last_heard - timedelta(minutes=20):%Y-%m-%d %H:%M}Z 起 1 笔未完成扣款" in row.text  # zh page
        # open quarantined records of the operator's validators, and of unregistered ones on its topics
        quarantined = _sql(db, "SELECT count(*) FROM quarantine q LEFT JOIN device d ON d.device_id = q.device_id "
                               "WHERE q.status = 'open' AND (d.operator = ? OR (d.device_id IS NULL AND "
                               "q.topic LIKE 'farebox/v1/' || ? || '/%'))", A, A)[0][0]
        assert any(f"{quarantined} 条隔离记录待复核" in r.text
                   for r in driver.find_elements(By.CSS_SELECTOR, "#alarms tr[data-kind=quarantine_growing]"))
        _shot(driver, "ops-alarms-before-ack")
        driver.find_element(By.ID, f"ack-{alarm_id}").click()
        _wait_for(driver, "#done")
        assert "e2e operations" in driver.find_element(By.ID, f"alarm-{alarm_id}").text
        (by, at), = _sql(db, "SELECT acked_by, acked_at FROM alarm WHERE id = ?", alarm_id)
        assert by == "e2e operations" and abs(_utc(at) - datetime.now(UTC)) < timedelta(minutes=5)
        _shot(driver, "ops-alarms-acknowledged")

        # --- end of service: the bus is switched off, and the page says so --------------------------------
        assert uplink.stop() is True
        _until(lambda: status_row()[0] == 0, "the goodbye stored")
        driver.find_element(By.PARTIAL_LINK_TEXT, "车载机").click()
        _wait_for(driver, "#fleet")
        row = driver.find_element(By.ID, f"dev-{BUS}")
        assert row.get_attribute("data-state") == "offline" and "已正常关机" in row.text
        assert "STALE" not in row.text and "失联" not in row.find_element(By.CSS_SELECTOR, "td.state").text
        assert row.find_element(By.CSS_SELECTOR, "td.backlog").text.startswith(str(status_row()[2]))
        _shot(driver, "ops-validators-switched-off")
    finally:
        uplink.stop()
        journal.close()

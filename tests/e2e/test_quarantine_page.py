"""Operations review the quarantine in a real browser (issue 9, hole 6): `farebox serve` on the small city of
tests/web_city.py, plus a genuine purchase from cb_002 signed by a PSAM the registry did not know yet (the workshop
swapped it; the clerk recorded the swap afterwards through the API, dated when it was made). An operations login
opens the quarantine list, releases that record (stored, the page says by whom and the tap's id, the day's fares
grow by its amount), tries to release a forged-TAC record (it stays, with the reason found now) and rejects it.
Headless Debian Chromium through selenium, as tests/e2e/test_web_pages.py; screenshots in var/test-artefacts.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest
from reference_crypto import ref_purchase_tac
from sqlalchemy import func, select
from test_web_pages import ROOT, _farebox, _login, _shot, _wait_for, browser  # noqa: F401 (browser: a fixture)
from web_city import CARDS, _purchase, _send, seed

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Quarantine, Tap
from epurse.keys import TEST_ISSUER_KEYS
from farebox.broker import free_port

pytestmark = pytest.mark.slow

NEW_PSAM = "0100000000c2"


@pytest.fixture
def ops_server(tmp_path):
    var = tmp_path / "var"
    env = {**os.environ, "FAREBOX_VAR_DIR": str(var), "FAREBOX_API_TOKENS": str(var / "api-tokens.toml"),
           "FAREBOX_INSECURE_TEST_KEYS": "1"}
    for name in ("FAREBOX_DATABASE_URL", "FAREBOX_MQTT_URL", "FAREBOX_CONFIG"):
        env.pop(name, None)
    engine = make_engine(f"sqlite:///{(var / 'backoffice.db').resolve()}")
    upgrade(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    seed(engine, now=now)
    # the city's validators are registered on the real clock (seed); the workshop swaps cb_002's PSAM just after
    swapped = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    when = swapped + timedelta(seconds=1)
    time.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()) + 0.2)  # the tap is made, then uploaded
    genuine = dataclasses.replace(_purchase("cb_002", 50, when, CARDS[2], 77, 150, 9000), terminal_id=NEW_PSAM)
    genuine = dataclasses.replace(genuine, tac=ref_purchase_tac(
        TEST_ISSUER_KEYS.tac, bytes.fromhex(genuine.card_asn), genuine.amount, bytes.fromhex(NEW_PSAM),
        genuine.terminal_seq, when).hex())
    with engine.begin() as conn:
        assert _send(conn, "cb_002", [genuine]).quarantined == 1  # the registry still names the old PSAM
        registry.edit_device(conn, device_id="cb_002", by="clerk_li", terminal_id=NEW_PSAM, at=swapped)
    engine_url = engine.url
    engine.dispose()
    out = subprocess.run(_farebox("token", "add", "--role", "operations", "--name", "e2e ops", env=env), env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    token = out.stdout.strip()
    port, ready = free_port(), tmp_path / "serve.ready"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(_farebox("serve", "--port", str(port), "--ready-file", str(ready), env=env), env=env,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"farebox serve did not come up: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", token, engine_url, genuine
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _row_id(engine_url, **where) -> int:
    engine = make_engine(engine_url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            return conn.execute(select(Quarantine.id).where(*[getattr(Quarantine, k) == v for k, v in where.items()])
                                .order_by(Quarantine.id)).scalars().first()
    finally:
        engine.dispose()


def test_operations_release_a_swapped_psams_tap_and_reject_a_forgery_in_the_browser(ops_server, browser):
    from selenium.webdriver.common.by import By

    base, token, engine_url, genuine = ops_server
    driver = browser
    _login(driver, base, token)
    driver.get(f"{base}/quarantine")
    assert "不是该车载机在" in driver.page_source and "TAC 用发卡方密钥验证不通过" in driver.page_source  # Chinese page
    _shot(driver, "quarantine-review-list")

    swapped_row = _row_id(engine_url, device_id="cb_002", device_seq=genuine.device_seq)
    driver.find_element(By.CSS_SELECTOR, f'a[href="/quarantine/{swapped_row}"]').click()
    _wait_for(driver, "#release-form")
    assert NEW_PSAM in driver.find_element(By.ID, "psams").text  # the registry's history, the swap included
    driver.find_element(By.ID, "release-why").send_keys("PSAM swapped in the workshop; registry corrected")
    driver.find_element(By.ID, "release").click()
    _wait_for(driver, "#decided")
    assert driver.find_element(By.ID, "status").text == "已放行"  # released (the browser asks for Chinese)
    assert "e2e ops" in driver.find_element(By.ID, "decided").text
    _shot(driver, "quarantine-review-released")

    forged_row = _row_id(engine_url, device_id="cb_001", status="open")
    driver.get(f"{base}/quarantine/{forged_row}")
    driver.find_element(By.ID, "release-why").send_keys("looks fine")
    driver.find_element(By.ID, "release").click()
    _wait_for(driver, "#recheck")
    assert "TAC 用发卡方密钥验证不通过" in driver.find_element(By.ID, "recheck").text
    assert driver.find_element(By.ID, "status").text == "待处理"  # still open
    driver.find_element(By.ID, "reject-why").send_keys("forged TAC")
    driver.find_element(By.ID, "reject").click()
    _wait_for(driver, "#decided")
    assert driver.find_element(By.ID, "status").text == "已驳回"

    engine = make_engine(engine_url.render_as_string(hide_password=False))
    with engine.connect() as conn:
        stored = conn.execute(select(func.count(), func.sum(Tap.amount)).where(
            Tap.device_id == "cb_002", Tap.device_seq == genuine.device_seq)).one()
        statuses = dict(conn.execute(select(Quarantine.id, Quarantine.status)
                                     .where(Quarantine.id.in_([swapped_row, forged_row]))).all())
    engine.dispose()
    assert tuple(stored) == (1, genuine.amount)
    assert statuses == {swapped_row: "released", forged_row: "rejected"}

"""The web pages as a person uses them: `farebox serve` (embedded broker, ingest, status consumer, publisher and the
pages, one process) on a SQLite file holding a small city (tests/web_city.py, on the real clock), tokens made with
`farebox token add`, and real headless Chromium (Debian's chromium + chromedriver, through selenium) logging in
and reading the dashboard, validators, quarantine, registry, settlement and card lookup pages.

A screenshot of each main page is kept in var/test-artefacts/screenshots/ (FAREBOX_TEST_ARTEFACTS to move it).
Without chromium the test is skipped with the reason (failed under FAREBOX_REQUIRE_SERVICES=1, as in CI);
scripts/ensure-services.sh installs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from web_city import A_NAME, CARDS, SHARED_CARD, A, seed

from backoffice.db import make_engine, upgrade
from farebox.broker import free_port
from wire.records import RecordKind

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("FAREBOX_TEST_ARTEFACTS", ROOT / "var" / "test-artefacts")) / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _service_missing(reason: str):
    """As tests/conftest.py: skip, or fail when CI requires every service (FAREBOX_REQUIRE_SERVICES=1)."""
    if os.environ.get("FAREBOX_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (CI requires it)", pytrace=False)
    pytest.skip(reason)


def _farebox(*args: str, env: dict) -> list[str]:
    return [sys.executable, "-m", "farebox.cli", *args]


@contextlib.contextmanager
def chrome():
    """A headless Chromium of its own (a second one is another person's browser: its own cookies)."""
    chromium = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    driver_bin = shutil.which("chromedriver") or (CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else None)
    if chromium is None or driver_bin is None:
        _service_missing("Debian's chromium and chromium-driver are not installed: run scripts/ensure-services.sh "
                         "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,900",
                "--lang=zh-CN"):
        options.add_argument(arg)
    # headless Chromium asks for en-US whatever --lang says; a Chinese desk's browser asks for Chinese
    options.add_experimental_option("prefs", {"intl.accept_languages": "zh-CN,zh"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser():
    with chrome() as driver:
        yield driver


@pytest.fixture
def server(tmp_path):
    var = tmp_path / "var"
    env = {**os.environ, "FAREBOX_VAR_DIR": str(var), "FAREBOX_API_TOKENS": str(var / "api-tokens.toml")}
    for name in ("FAREBOX_DATABASE_URL", "FAREBOX_MQTT_URL", "FAREBOX_CONFIG"):
        env.pop(name, None)
    engine = make_engine(f"sqlite:///{(var / 'backoffice.db').resolve()}")
    upgrade(engine)
    city = seed(engine, now=datetime.now(UTC))
    engine.dispose()
    tokens = {}
    for role, extra in (("clerk", ["--operator", A]), ("operator_staff", []), ("admin", [])):
        out = subprocess.run(_farebox("token", "add", "--role", role, "--name", f"e2e {role}", *extra, env=env),
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        tokens[role] = out.stdout.strip()
        assert tokens[role].startswith("fbx_") and tokens[role] not in (var / "api-tokens.toml").read_text()
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
        yield f"http://127.0.0.1:{port}", tokens, city
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    # the whole page, not only the window: widen/lengthen to the document before the shot
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1360, max(900, min(height + 40, 4000)))
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def _login(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/login")
    assert "访问令牌" in driver.page_source or "Access token" in driver.page_source  # one language, the browser's
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    _wait_for(driver, "header form.who")  # the page after login (a form submit does not wait for it by itself)


def _nav(driver, path: str) -> None:
    """Follow the header's link to ``path`` (its words are in the page's language; the address is not)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'header nav a[href="{path}"]').click()


def _wait_for(driver, css: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


def test_a_clerk_and_counter_staff_use_the_pages(server, browser):
    from selenium.webdriver.common.by import By

    base, tokens, city = server
    driver = browser
    bad = {(r.device_id, r.device_seq) for r in city.quarantined}
    purchases = [r for r in city.sent if r.kind == RecordKind.PURCHASE and (r.device_id, r.device_seq) not in bad]

    def service_day(at):  # Shanghai, no daylight saving, cut-off 03:00
        return (at + timedelta(hours=8) - timedelta(hours=3)).date()

    today = service_day(datetime.now(UTC))
    driver.get(f"{base}/dashboard")
    assert "请先登录" in driver.page_source  # not logged in: the login form

    _login(driver, base, tokens["clerk"])
    assert driver.current_url.endswith("/dashboard")
    fares = sum(1 for r in purchases if r.operator == A and service_day(r.occurred_at) == today)
    revenue = sum(r.amount for r in purchases if r.operator == A and service_day(r.occurred_at) == today)
    assert A_NAME in driver.page_source
    assert driver.find_element(By.ID, f"fares-{A}").text == str(fares)
    assert driver.find_element(By.ID, f"revenue-{A}").text == _yuan(revenue)
    assert driver.find_element(By.ID, f"quarantined-{A}").text == "2"
    _shot(driver, "dashboard")

    _nav(driver, "/devices")
    assert "车载机状态" in driver.page_source and "cb_001" in driver.page_source
    stale_rows = driver.find_elements(By.CSS_SELECTOR, "#fleet tr.stale")
    assert [row.find_element(By.TAG_NAME, "td").text for row in stale_rows] == ["cb_002"]  # never heard from
    assert "mb_001" not in driver.page_source  # another company's validator
    _shot(driver, "devices")

    _nav(driver, "/quarantine")
    assert "TAC 用发卡方密钥验证不通过" in driver.page_source
    assert len(driver.find_elements(By.CSS_SELECTOR, "#quarantine tbody tr")) == 2
    _shot(driver, "quarantine")

    driver.get(f"{base}/registry/routes")
    assert "1路 火车站—大学城" in driver.page_source and "9路" not in driver.page_source
    _shot(driver, "registry-routes")

    yesterday = today - timedelta(days=1)
    _nav(driver, "/settlement")
    assert f'value="{yesterday}"' in driver.page_source  # the last complete service day by default
    total = sum(r.amount for r in purchases if r.operator == A and service_day(r.occurred_at) == yesterday)
    assert driver.find_element(By.ID, "total-amount").text == _yuan(total)
    assert "按线路" in driver.page_source and "张伟" in driver.page_source
    pdf_link = driver.find_element(By.ID, "pdf").get_attribute("href")
    assert pdf_link.startswith(f"{base}/settlement.pdf?operator={A}&day={yesterday}")
    _shot(driver, "settlement")

    driver.find_element(By.CSS_SELECTOR, "form.who button").click()  # log out
    _wait_for(driver, "#token")
    assert "访问令牌" in driver.page_source
    _login(driver, base, tokens["operator_staff"])
    assert driver.current_url.endswith("/cards")
    driver.find_element(By.ID, "asn").send_keys(SHARED_CARD)
    driver.find_element(By.ID, "lookup").click()
    _wait_for(driver, "#balance")
    mine = [r for r in purchases if r.card_asn == SHARED_CARD]
    latest = max(mine, key=lambda r: (r.occurred_at, r.card_ttc))
    assert driver.find_element(By.ID, "balance").text.startswith(_yuan(latest.balance_after))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#records tbody tr")) == len(mine)
    assert "普通卡" in driver.page_source
    _shot(driver, "card-lookup")
    driver.get(f"{base}/cards?asn={CARDS[3]}")
    assert "挂失" in driver.page_source
    driver.get(f"{base}/dashboard")  # counter staff do not see the bus companies' money
    assert "无权访问" in driver.page_source


def test_counter_staff_and_a_clerk_use_the_money_pages(server, browser, tmp_path):
    """Card ledger with the adjustment form, top-up orders with a refund, the clerk's reconciliation with the
    issuer CSV uploaded through the file input and an item adjusted: each against sums written here."""
    from selenium.webdriver.common.by import By

    from backoffice.cards import issuance, topup
    from clearing.reconcile import ISSUER_COLUMNS

    base, tokens, city = server
    driver = browser
    bad = {(r.device_id, r.device_seq) for r in city.quarantined}
    purchases = [r for r in city.sent if r.kind == RecordKind.PURCHASE and (r.device_id, r.device_seq) not in bad]
    now = datetime.now(UTC)
    engine = make_engine(f"sqlite:///{(tmp_path / 'var' / 'backoffice.db').resolve()}")
    asn = CARDS[0]
    with engine.begin() as conn:  # the seeded rides started from 100 yuan; the card is issued with that
        issuance.issue_card(conn, card=issuance.CardFacts(asn, "0102030405060708", 1, 0, now.date(), now.date(),
                                                          10_000), deposit=2000, who="e2e", now=now)
        order = topup.create_order(conn, asn=asn, rider="13800000000", amount=3000, now=now).order_id
        topup.mark_paid(conn, order_id=order, amount=3000, payment_ref="pay_e2e", now=now)
    engine.dispose()

    _login(driver, base, tokens["operator_staff"])
    driver.get(f"{base}/cards/{asn}")
    _wait_for(driver, "#ledger")
    fares = 0
    for r in purchases:
        if r.card_asn == asn:
            fares += r.amount
    assert driver.find_element(By.ID, "ledger-balance").text == _yuan(10_000 - fares)
    driver.find_element(By.ID, "adjust-amount").send_keys("-1.20")
    driver.find_element(By.ID, "adjust-why").send_keys("刷卡记录丢失 tap record lost")
    driver.find_element(By.ID, "adjust").click()
    _wait_for(driver, "#done")
    assert driver.find_element(By.ID, "ledger-balance").text == _yuan(10_000 - fares - 120)
    assert "刷卡记录丢失" in driver.find_element(By.ID, "trail").text
    _shot(driver, "card-ledger")

    _nav(driver, "/topups")
    _wait_for(driver, f"#order-{order}")
    row = driver.find_element(By.ID, f"order-{order}")
    assert "¥30.00" in row.text and "已支付" in row.text
    _shot(driver, "topups")
    row.find_element(By.NAME, "why").send_keys("乘客申请退款 rider asked")
    row.find_element(By.CSS_SELECTOR, "form.refund button").click()
    _wait_for(driver, "#done")
    assert "已退款" in driver.find_element(By.ID, f"order-{order}").text

    driver.find_element(By.CSS_SELECTOR, "form.who button").click()
    _wait_for(driver, "#token")
    _login(driver, base, tokens["clerk"])

    def service_day(at):
        return (at + timedelta(hours=8) - timedelta(hours=3)).date()

    yesterday = service_day(now) - timedelta(days=1)
    mine = sorted((r for r in purchases if r.operator == A and service_day(r.occurred_at) == yesterday),
                  key=lambda r: (r.card_asn, r.card_ttc))
    assert len(mine) >= 2
    lines = [",".join(ISSUER_COLUMNS)]
    for i, r in enumerate(mine):
        amount = r.amount + 50 if i == 0 else r.amount  # the issuer cleared 0.50 yuan more on the first
        lines.append(f"{r.card_asn},{r.card_ttc},{amount},{r.terminal_id},{r.terminal_seq},{r.tac},"
                     f"{r.occurred_at:%Y-%m-%dT%H:%M:%SZ}")
    csv = tmp_path / "issuer.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _nav(driver, "/reconciliation")
    _wait_for(driver, "#upload-form")
    day = driver.find_element(By.ID, "upload-day")
    assert day.get_attribute("value") == str(yesterday)
    driver.find_element(By.ID, "upload-file").send_keys(str(csv))
    driver.find_element(By.ID, "upload").click()
    _wait_for(driver, "#done")
    rows = driver.find_elements(By.CSS_SELECTOR, "#items tbody tr")
    assert len(rows) == 1 and "金额不符" in rows[0].text
    assert _yuan(mine[0].amount) in rows[0].text and _yuan(mine[0].amount + 50) in rows[0].text
    _shot(driver, "reconciliation")
    rows[0].find_element(By.CSS_SELECTOR, "button[value=adjusted]").click()
    _wait_for(driver, "#done")
    assert "无待处理项" in driver.page_source  # nothing open any more
    driver.get(f"{base}/reconciliation?status=adjusted")
    row = driver.find_element(By.CSS_SELECTOR, "#items tbody tr")
    assert "adjusted ¥0.50" in row.text and "e2e clerk" in row.text


def test_a_clerk_edits_a_route_and_downloads_reports(server, browser):
    """The registry edit form (a route renamed: two versions and two audit lines on its page) and the reports page
    (its day XLSX, fetched with the clerk's token, against a loop over the seeded rides)."""
    import urllib.request
    from io import BytesIO

    from openpyxl import load_workbook
    from selenium.webdriver.common.by import By

    base, tokens, city = server
    driver = browser
    bad = {(r.device_id, r.device_seq) for r in city.quarantined}
    purchases = [r for r in city.sent if r.kind == RecordKind.PURCHASE and (r.device_id, r.device_seq) not in bad]

    def service_day(at):
        return (at + timedelta(hours=8) - timedelta(hours=3)).date()

    yesterday = service_day(datetime.now(UTC)) - timedelta(days=1)
    _login(driver, base, tokens["clerk"])
    _nav(driver, "/manage/routes")
    _wait_for(driver, "#entries")
    assert "m9" not in driver.find_element(By.ID, "entries").text  # another company's route
    driver.find_element(By.LINK_TEXT, "c1").click()
    _wait_for(driver, "#edit-form")
    driver.find_element(By.ID, "name").send_keys("1路 火车站—新大学城")
    driver.find_element(By.ID, "save").click()
    _wait_for(driver, "#done")
    versions = driver.find_elements(By.CSS_SELECTOR, "#versions tbody tr")
    assert len(versions) == 2 and "1路 火车站—大学城" in versions[0].text and "新大学城" in versions[1].text
    audit = driver.find_element(By.ID, "audit").text
    assert "e2e clerk" in audit and "修改" in audit  # the browser asks for Chinese: the page is Chinese only
    _shot(driver, "registry-edit")

    _nav(driver, "/reports")
    _wait_for(driver, "#day-reports")
    assert f'value="{yesterday}"' in driver.page_source
    shifts = driver.find_elements(By.CSS_SELECTOR, "#shifts tbody tr")
    assert shifts and "cb_001" in driver.find_element(By.ID, "shifts").text
    _shot(driver, "reports")
    href = driver.find_element(By.ID, "day-xlsx").get_attribute("href")
    request = urllib.request.Request(href, headers={"Authorization": f"Bearer {tokens['clerk']}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        book = load_workbook(BytesIO(answer.read()))
    rows = list(book["by_route"].iter_rows(values_only=True))
    got = {dict(zip(rows[0], r))["线路 Route"]: round(dict(zip(rows[0], r))["总收入(元) Gross (yuan)"] * 100)
           for r in rows[1:-1]}  # the last row: totals
    expected: dict[str, int] = {}
    for r in purchases:
        if r.operator == A and service_day(r.occurred_at) == yesterday:
            expected[r.route] = expected.get(r.route, 0) + r.amount
    assert got == expected

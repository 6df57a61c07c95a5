"""A bus-company clerk's day, through the pages only: `farebox serve` on a SQLite file holding the small city of
tests/web_city.py placed three days back (as after `make demo`: the data is on an earlier day, today is empty), real
headless Chromium.

The clerk logs in; the dashboard opens on the latest service day with data (not the empty today) and a future day
says "not started"; in the taps browser they filter (route, kind; a plate typed in the search) and download the CSV
and XLSX of what is shown; on the settlement page they clear the day, read gross, commission (rate stated), net,
card types with the free elderly rides, the previous day and the month to date, follow every download link, sign
the day off, and a second clearing of the day is refused; the taps browser then says where the earlier day's taps
went (late, into this day's run). Every figure is checked against plain SQL over the database file (sqlite3, no
project code). Screenshots in var/test-artefacts/screenshots/clerk-*.png.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from web_city import A, seed

from backoffice import clearing_runs
from backoffice.db import make_engine, upgrade
from farebox.broker import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("FAREBOX_TEST_ARTEFACTS", ROOT / "var" / "test-artefacts")) / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
RATE_BP = 600  # 6.00 %: a commission big enough to see on a small day
DAYS_BACK = 3
# Shanghai has no daylight saving: a service day (cut-off 03:00) is the date of occurred_at + 8 h - 3 h, in SQL too
SQL_DAY = "date(occurred_at, '+5 hours')"


def _service_missing(reason: str):
    if os.environ.get("FAREBOX_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (CI requires it)", pytrace=False)
    pytest.skip(reason)


def _service_day(at: datetime) -> date:
    return (at + timedelta(hours=5)).date()


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    driver_bin = shutil.which("chromedriver") or (CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else None)
    if chromium is None or driver_bin is None:
        _service_missing("Debian's chromium and chromium-driver are not installed: run scripts/ensure-services.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,900",
                "--lang=zh-CN"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    driver.set_page_load_timeout(60)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path):
    var = tmp_path / "var"
    env = {**os.environ, "FAREBOX_VAR_DIR": str(var), "FAREBOX_API_TOKENS": str(var / "api-tokens.toml")}
    for name in ("FAREBOX_DATABASE_URL", "FAREBOX_MQTT_URL", "FAREBOX_CONFIG"):
        env.pop(name, None)
    db = (var / "backoffice.db").resolve()
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    seed(engine, now=datetime.now(UTC) - timedelta(days=DAYS_BACK))
    with engine.begin() as conn:  # the company's first hour (tested elsewhere): its issuer's commission
        clearing_runs.set_commission_rate(conn, operator=A, rate_bp=RATE_BP, valid_from=date(2020, 1, 1))
    engine.dispose()
    out = subprocess.run([sys.executable, "-m", "farebox.cli", "token", "add", "--role", "clerk", "--name",
                          "e2e clerk", "--operator", A], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    token = out.stdout.strip()
    port, ready = free_port(), tmp_path / "serve.ready"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "farebox.cli", "serve", "--port", str(port), "--ready-file",
                             str(ready)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"farebox serve did not come up: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", token, db
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1360, max(900, min(height + 40, 4000)))
    driver.save_screenshot(str(path))
    driver.set_window_size(1360, 900)
    assert path.stat().st_size > 10_000, f"{path} looks empty"


def _wait_for(driver, css: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def _click_and_wait(driver, element, css: str) -> None:
    """Submit a form and wait for the next page (the old page's element goes stale first)."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    element.click()
    WebDriverWait(driver, 30).until(ec.staleness_of(element))
    _wait_for(driver, css)


def _downloaded(driver, suffix: str, before: set[str]) -> Path:
    """The file the browser saved after a click on a download link, once it is whole: seen under its final name
    with the same non-zero size twice 0.2 s apart (CI once read an XLSX that was still being written: BadZipFile)."""
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        new = [p for p in driver.downloads.iterdir() if p.name not in before and p.name.endswith(suffix)]
        if new:
            size = new[0].stat().st_size
            if size and size == last:
                return new[0]
            last = size
        time.sleep(0.2)
    raise AssertionError(f"no {suffix} download in {sorted(p.name for p in driver.downloads.iterdir())}")


def _yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}¥{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def _plain(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _commission(gross: int) -> int:
    """gross * rate rounded half away from zero (the issuer's invoice rule), written here with integers."""
    return (gross * RATE_BP * 2 + 10_000) // 20_000


def test_a_clerk_s_day_through_the_pages(server, browser):
    from openpyxl import load_workbook
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, token, db = server
    driver = browser
    sql = sqlite3.connect(db)

    def one(query: str, *args):
        return sql.execute(query, args).fetchone()

    today = _service_day(datetime.now(UTC))
    (latest,) = one(f"SELECT MAX({SQL_DAY}) FROM tap WHERE operator = ?", A)
    day = date.fromisoformat(latest)
    assert day == today - timedelta(days=DAYS_BACK)  # the city's data sits three days back; today is empty
    before_day = day - timedelta(days=1)

    # ---- login, the dashboard on the latest day with data
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    _wait_for(driver, "header form.who")
    assert driver.current_url.endswith("/dashboard")
    switch = driver.find_elements(By.ID, "lang-zh")  # this clerk reads Chinese: the header's language switch
    if switch:
        _click_and_wait(driver, switch[0], "#lang-en")
    fares, revenue = one(f"SELECT COUNT(*), SUM(amount) FROM tap WHERE operator = ? AND kind = 'purchase' "
                         f"AND {SQL_DAY} = ?", A, str(day))
    assert driver.find_element(By.ID, f"day-{A}").text == str(day)
    assert driver.find_element(By.ID, f"fares-{A}").text == str(fares)
    assert driver.find_element(By.ID, f"revenue-{A}").text == _yuan(revenue)
    assert driver.find_element(By.ID, f"latest-note-{A}").is_displayed()  # says why it is not today
    _shot(driver, "clerk-dashboard-latest-day")
    driver.get(f"{base}/dashboard?day={today + timedelta(days=5)}")
    assert driver.find_element(By.ID, f"state-{A}").text == "尚未开始"  # a future day, not "still running"
    assert driver.find_element(By.ID, f"fares-{A}").text == "0"
    _shot(driver, "clerk-dashboard-future-day")

    # ---- the taps browser: route c1 fares of the day, then its exports
    driver.get(f"{base}/dashboard")
    _click_and_wait(driver, driver.find_element(By.ID, f"taps-{A}"), "#filters")
    assert driver.find_element(By.ID, "first").get_attribute("value") == str(day)
    Select(driver.find_element(By.ID, "route")).select_by_value("c1")
    Select(driver.find_element(By.ID, "kind")).select_by_value("purchase")
    _click_and_wait(driver, driver.find_element(By.ID, "search"), "#taps")
    expected = sql.execute(f"SELECT device_id, device_seq, amount, card_asn FROM tap WHERE operator = ? AND "
                           f"route = 'c1' AND kind = 'purchase' AND {SQL_DAY} = ? ORDER BY occurred_at, id",
                           (A, str(day))).fetchall()
    assert expected
    assert driver.find_element(By.ID, "total").text == str(len(expected))
    assert driver.find_element(By.ID, "amount").text == _yuan(sum(r[2] for r in expected))
    rows = driver.find_elements(By.CSS_SELECTOR, "#taps tbody tr")
    assert [f"{r[0]} / {r[1]}" for r in expected] == [
        row.find_elements(By.TAG_NAME, "td")[6].text for row in rows]
    _shot(driver, "clerk-taps-filtered")

    seen = {p.name for p in driver.downloads.iterdir()}
    driver.find_element(By.ID, "export-csv").click()
    got = list(csv.reader(io.StringIO(_downloaded(driver, ".csv", seen).read_text(encoding="utf-8-sig"))))
    header, body, totals = got[0], got[1:-1], got[-1]
    assert "金额（元） Amount (yuan)" in header and header[0] == "时间 Time (Asia/Shanghai)"
    amount_at, device_at, seq_at = (header.index(h) for h in ("金额（元） Amount (yuan)", "车载机 Validator",
                                                                "序号 Sequence"))
    assert [(r[device_at], int(r[seq_at]), r[amount_at]) for r in body] == [
        (d, s, _plain(a)) for d, s, a, _asn in expected]
    assert totals[0].startswith("合计 Total") and totals[amount_at] == _plain(sum(r[2] for r in expected))
    seen = {p.name for p in driver.downloads.iterdir()}
    driver.find_element(By.ID, "export-xlsx").click()
    sheet = load_workbook(_downloaded(driver, ".xlsx", seen)).active
    cells = list(sheet.iter_rows(values_only=True))
    assert len(cells) == len(expected) + 2  # header, rows, totals
    assert [int(c[amount_at] * 100) for c in cells[1:-1]] == [r[2] for r in expected]
    assert int(cells[-1][amount_at] * 100) == sum(r[2] for r in expected)

    # a plate typed in the search finds that bus's taps (the registry's name, not the code on the tap)
    driver.get(f"{base}/taps?first={day}&last={day}&q=10002")
    _wait_for(driver, "#taps")
    (cv2,) = one(f"SELECT COUNT(*) FROM tap WHERE operator = ? AND vehicle = 'cv2' AND {SQL_DAY} = ?", A, str(day))
    assert driver.find_element(By.ID, "total").text == str(cv2)

    # another company's taps and exports do not exist for this clerk
    for path in ("/taps?operator=metrobus", "/taps.csv?operator=metrobus", "/settlement?operator=metrobus"):
        driver.get(base + path)
        assert "未找到" in driver.page_source and "mb_001" not in driver.page_source, path

    # ---- the settlement page: clear the day, read the figures
    driver.get(f"{base}/dashboard")
    _click_and_wait(driver, driver.find_element(By.ID, f"settlement-{A}"), "#signoff")
    assert driver.find_element(By.ID, "day").get_attribute("value") == str(day)
    assert driver.find_element(By.ID, "provisional").is_displayed()  # nothing cleared yet
    _click_and_wait(driver, driver.find_element(By.ID, "clear"), "#done")
    (run_id, fingerprint, runs) = one("SELECT id, fingerprint, (SELECT COUNT(*) FROM clearing_run) FROM clearing_run "
                                      "WHERE operator = ? AND service_day = ?", A, str(day))
    # the run took the day's taps and, as late taps, the earlier day's (no run before it)
    gross, taps = one(f"SELECT SUM(amount), COUNT(*) FROM tap_claimed WHERE clearing_run_id = ? AND kind = 'purchase' "
                      f"AND {SQL_DAY} = ?", run_id, str(day))
    late_gross, late_taps = one(f"SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM tap_claimed WHERE clearing_run_id = ? "
                                f"AND kind = 'purchase' AND {SQL_DAY} < ?", run_id, str(day))
    assert (taps, gross) == (fares, revenue)
    commission = _commission(gross)
    assert driver.find_element(By.ID, "total-taps").text == str(taps)
    assert driver.find_element(By.ID, "total-amount").text == _yuan(gross)
    assert driver.find_element(By.ID, "total-commission").text == _yuan(commission)
    assert driver.find_element(By.ID, "total-net").text == _yuan(gross - commission)
    assert driver.find_element(By.ID, "rate").text == "6.00%"
    late_net = late_gross - _commission(late_gross)
    assert driver.find_element(By.ID, "total-payable").text == _yuan(gross - commission + late_net)
    for card_type, n, amount, free in sql.execute(
            f"SELECT card_type, COUNT(*), SUM(amount), SUM(amount = 0) FROM tap_claimed WHERE clearing_run_id = ? AND "
            f"kind = 'purchase' AND {SQL_DAY} = ? GROUP BY card_type", (run_id, str(day))):
        cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, f"#card-type-{card_type} td")]
        assert cells[1:4] == [str(n), str(free), _yuan(amount)], card_type
    (free_rides,) = one(f"SELECT COUNT(*) FROM tap WHERE operator = ? AND kind = 'purchase' AND amount = 0 AND "
                        f"{SQL_DAY} = ?", A, str(day))
    assert driver.find_element(By.ID, "free-rides").text == str(free_rides)
    (prev_gross,) = one(f"SELECT COALESCE(SUM(amount), 0) FROM tap WHERE operator = ? AND kind = 'purchase' AND "
                        f"{SQL_DAY} = ?", A, str(before_day))
    prev_cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#cmp-prev td")]
    assert prev_cells[2] == _yuan(prev_gross)  # the day before: not cleared, provisional
    assert driver.find_element(By.ID, "mtd-gross").text == _yuan(gross)  # the month's only cleared day
    assert bool(driver.find_elements(By.ID, "no-adjustments")) is (late_taps == 0)
    if late_taps:  # the earlier day's taps, carried by this run as late taps
        late_rows = driver.find_elements(By.CSS_SELECTOR, "#late tbody tr")
        assert sum(int(r.find_elements(By.TAG_NAME, "td")[3].text) for r in late_rows) == late_taps
    _shot(driver, "clerk-settlement-cleared")

    # every download on the page answers with a file (fetched with the clerk's own token)
    links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a[href]")]
    names = {a.get_attribute("id") for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a[id]")}
    assert {"dl-pdf", "dl-xlsx", "dl-csv-route", "dl-csv-vehicle", "dl-csv-driver", "dl-month-pdf",
            "dl-month-xlsx", "dl-taps-csv", "dl-taps-xlsx"} <= names
    assert ("dl-csv-adjustments" in names) is (late_taps > 0)  # the link that used to 404 only when it has a file
    assert driver.find_elements(By.CSS_SELECTOR, "a.dl-vehicle") and driver.find_elements(By.CSS_SELECTOR, "a.dl-shift")
    for href in links:
        if "/taps?" in href:
            continue  # the browse link, a page
        request = urllib.request.Request(href, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.status == 200 and len(answer.read()) > 50, href

    # ---- sign-off, then a second clearing of the day is refused
    _click_and_wait(driver, driver.find_element(By.ID, "sign-off"), "#signed")
    assert driver.find_element(By.ID, "approved-by").text == "e2e clerk"
    signed = one("SELECT approved_by, run_id, day_gross FROM settlement_signoff WHERE operator = ? AND "
                 "service_day = ?", A, str(day))
    assert signed == ("e2e clerk", run_id, gross)
    _shot(driver, "clerk-settlement-signed-off")
    _click_and_wait(driver, driver.find_element(By.ID, "clear"), "#error")
    error = driver.find_element(By.ID, "error").text
    assert "已锁定" in error and "e2e clerk" in error and "下一个清分批次" in error
    assert one("SELECT fingerprint, (SELECT COUNT(*) FROM clearing_run) FROM clearing_run WHERE id = ?",
               run_id) == (fingerprint, runs)  # nothing was cleared again
    _shot(driver, "clerk-settlement-locked-refused")

    # ---- where did the earlier day's taps go: into this day's run, as late taps
    driver.get(f"{base}/taps?first={before_day}&last={before_day}&outcome=late")
    _wait_for(driver, "#taps")
    assert driver.find_element(By.ID, "total").text == str(late_taps)
    if late_taps:
        assert f"批次 {run_id} · {day}" in driver.find_element(By.ID, "taps").text
    _shot(driver, "clerk-taps-late")
    sql.close()

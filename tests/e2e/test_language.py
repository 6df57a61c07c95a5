"""One language per page, chosen by the person and kept with them (issue 10, Language), in a real browser.

`farebox serve` on the small city of tests/web_city.py (the fixture of tests/e2e/test_web_pages.py); an admin logs
in with headless Chromium (which asks for Chinese), switches to English in the header, and reads the pages this
part converted: registry lists, registry forms and an entry's history, the quarantine list and one row, the users
page, an error page, the login page. Their visible text holds no Chinese character apart from the data (names,
plates and routes, read here from the database with plain SQL). The choice is kept with the user: the token file
says ``lang = "en"`` and a browser that forgot every cookie gets English again at login. Switched back to Chinese,
the header's links and every heading are Chinese and no English nav label is left.
"""

from __future__ import annotations

import re
import tomllib

import pytest
from sqlalchemy import text
from test_web_pages import _login, _shot, _wait_for, browser, server  # noqa: F401 (fixtures)

from backoffice.db import make_engine

pytestmark = pytest.mark.slow

CJK = re.compile(r"[\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
# the header's links in English, as a person reads them (written here, not read from the code)
ENGLISH_NAV = ("Dashboard", "Registry", "Validators", "Quarantine", "Settlement", "Card lookup", "Top-ups",
               "Reconciliation", "Manage registry", "Reports", "Users")


def _data_words(db) -> list[str]:
    """Names people gave things (a bus company, a route, a plate, a driver): data, shown as typed in any language."""
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        words = [r[0] for table, column in (("operator", "name"), ("operator_version", "name"), ("route", "name"),
                                            ("route_version", "name"), ("vehicle", "plate"),
                                            ("vehicle_version", "plate"), ("driver", "name"),
                                            ("driver_version", "name"))
                 for r in conn.execute(text(f"SELECT {column} FROM {table}")) if r[0]]
    engine.dispose()
    return sorted(set(words), key=len, reverse=True)  # longest first: "1路 火车站—大学城" before "1路"


def _visible(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _english_only(driver, data: list[str], url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait_for(driver, "main")
    seen = _visible(driver)
    for word in data:
        seen = seen.replace(word, "")
    switch = driver.find_element(By.ID, "lang-zh").text  # the way back to Chinese names itself in Chinese
    assert switch == "中文"
    seen = seen.replace(switch, "")
    left = sorted(set(CJK.findall(seen)))
    assert not left, f"{url}: Chinese on the English page: {left} in {seen[:600]!r}"
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"


def _chinese_only(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait_for(driver, "main")
    links = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "header nav a")]
    assert links and all(CJK.search(x) for x in links), (url, links)
    headings = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "main h1, main h2, main h3")]
    assert headings and all(CJK.search(h) for h in headings), (url, headings)
    for label in ENGLISH_NAV:
        assert not any(label in x for x in links + headings), (url, label, links, headings)
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "zh-CN"


def test_an_admin_reads_the_pages_in_english_then_in_chinese(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    base, tokens, _city = server
    driver = browser
    var = tmp_path / "var"
    data = _data_words(var / "backoffice.db")
    engine = make_engine(f"sqlite:///{var / 'backoffice.db'}")
    with engine.connect() as conn:
        quarantined = conn.execute(text("SELECT min(id) FROM quarantine")).scalar_one()
    engine.dispose()
    pages = [f"{base}/registry/{k}" for k in ("operators", "routes", "vehicles", "drivers", "devices")]
    pages += [f"{base}/manage/{k}" for k in ("routes", "vehicles", "drivers", "devices")]
    pages += [f"{base}/manage/routes/c1", f"{base}/manage/drivers/cd1", f"{base}/manage/devices/cb_001",
              f"{base}/quarantine", f"{base}/quarantine/{quarantined}", f"{base}/admin/users",
              f"{base}/manage/nope", f"{base}/registry/nope"]  # the last two: error pages (404)

    _login(driver, base, tokens["admin"])
    assert "访问令牌" not in driver.page_source  # logged in; the browser asked for Chinese
    driver.find_element(By.ID, "lang-en").click()
    _wait_for(driver, "#lang-zh")
    for url in pages:
        _english_only(driver, data, url)
        if url.endswith(("/registry/routes", f"/quarantine/{quarantined}", "/manage/routes/c1", "/admin/users")):
            _shot(driver, "language-en-" + url.removeprefix(base + "/").replace("/", "-"))
    assert "Not found" in _visible(driver)

    # the choice is the user's: in the token file (read as TOML here), and brought back by a login anywhere
    entries = {e["name"]: e for e in tomllib.loads((var / "api-tokens.toml").read_text())["token"]}
    assert entries["e2e admin"].get("lang") == "en" and "lang" not in entries["e2e clerk"]
    driver.find_element(By.CSS_SELECTOR, "form.who button").click()  # log out: the login page, still English
    _wait_for(driver, "#token")
    _english_only(driver, data, f"{base}/login")
    _shot(driver, "language-en-login")
    driver.delete_all_cookies()  # another browser, as it were: it asks for Chinese and knows nobody
    driver.get(f"{base}/login")
    assert "访问令牌" in _visible(driver) and "Access token" not in _visible(driver)
    _login(driver, base, tokens["admin"])
    assert driver.find_element(By.CSS_SELECTOR, 'header nav a[href="/registry/routes"]').text == "Registry"

    driver.find_element(By.ID, "lang-zh").click()
    _wait_for(driver, "#lang-en")
    for url in pages:
        _chinese_only(driver, url)
        if url.endswith(("/registry/routes", "/admin/users")):
            _shot(driver, "language-zh-" + url.removeprefix(base + "/").replace("/", "-"))
    entries = {e["name"]: e for e in tomllib.loads((var / "api-tokens.toml").read_text())["token"]}
    assert entries["e2e admin"]["lang"] == "zh"


def _cells(driver, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def test_domain_messages_and_a_cards_rides_in_the_page_language(server, browser, tmp_path):
    """What domain code words in English (a registry refusal, quarantine reasons, an alarm) reads in Chinese on a
    Chinese page and as written on an English one, while the API keeps its English; a card's rides show route
    names and plates, each at its own company's clock, and the proof shown at issue in the page's language; the
    users page ties a partner to a bus company as it does a clerk."""
    import json
    import urllib.request
    from datetime import UTC, date, datetime
    from zoneinfo import ZoneInfo

    from selenium.webdriver.common.by import By

    from backoffice.cards import issuance
    from web_city import B, SHARED_CARD

    base, tokens, _city = server
    driver = browser
    db = tmp_path / "var" / "backoffice.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # the second company keeps Tokyo's clock: a shared card's rides show two zones
        for table in ("operator", "operator_version"):
            conn.execute(text(f"UPDATE {table} SET timezone = 'Asia/Tokyo' WHERE code = :b"), {"b": B})
        # issued at the counter with its proof, as the issue form keeps it (kind in English, then the number)
        issuance.issue_card(conn, card=issuance.CardFacts(
            asn=SHARED_CARD, issuer="test", card_type=1, algorithm=0, valid_from=date(2026, 1, 1),
            valid_to=date(2030, 12, 31), balance=10_000), deposit=2000, who="e2e admin",
            now=datetime.now(UTC), proof="ID card 110101199001011234", holder="王芳")
    with engine.connect() as conn:
        tac_rows = conn.execute(text("SELECT id FROM quarantine WHERE reason LIKE 'TAC does not verify%' "
                                     "ORDER BY id")).scalars().all()
        unknown = conn.execute(text("SELECT count(*) FROM quarantine WHERE reason LIKE 'device % is not "
                                    "registered%'")).scalar_one()
        waiting = conn.execute(text("SELECT count(*) FROM quarantine WHERE status = 'open'")).scalar_one()
        rides = conn.execute(text(
            "SELECT t.occurred_at, t.card_ttc, o.timezone, o.name AS operator_name, r.name, v.plate FROM tap t "
            "JOIN operator o ON o.code = t.operator LEFT JOIN route r ON r.code = t.route "
            "LEFT JOIN vehicle v ON v.code = t.vehicle WHERE t.card_asn = :a"), {"a": SHARED_CARD}).all()
    engine.dispose()
    assert len(tac_rows) == 3 and unknown >= 1 and waiting >= 4
    assert {r.timezone for r in rides} == {"Asia/Shanghai", "Asia/Tokyo"}  # the card rode with both companies

    def local(at, zone):  # SQLite keeps UTC without an offset
        return datetime.fromisoformat(str(at)).replace(tzinfo=UTC).astimezone(ZoneInfo(zone)).strftime(
            "%Y-%m-%d %H:%M")

    expected_rides = sorted((local(r.occurred_at, r.timezone), r.operator_name, r.name, r.plate, str(r.card_ttc))
                            for r in rides)

    def retire_cv1() -> str:
        driver.get(f"{base}/manage/vehicles/cv1")
        driver.find_element(By.ID, "reason").send_keys("sold")
        driver.find_element(By.ID, "retire").click()
        _wait_for(driver, "#form-error")
        return driver.find_element(By.ID, "form-error").text

    def rides_shown() -> list[tuple]:
        rows = driver.find_elements(By.CSS_SELECTOR, "#records tbody tr")
        shown = []
        for row in rows:
            cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
            shown.append((cells[0], cells[2], cells[3], cells[4], cells[5]))
        return sorted(shown)

    _login(driver, base, tokens["admin"])  # the browser asks for Chinese
    # a registry refusal, in Chinese (the words written here)
    refused = retire_cv1()
    assert "车辆“cv1”仍装有车载机 cb_001：请先移走或停用" in refused and "still carries" not in refused, refused
    _shot(driver, "language-zh-registry-refusal")
    # the API says it in English still
    ask = urllib.request.Request(f"{base}/api/v1/vehicles/cv1/retire", method="POST",
                                 data=json.dumps({"reason": "sold"}).encode(),
                                 headers={"Authorization": f"Bearer {tokens['admin']}",
                                          "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(ask, timeout=30)
        raise AssertionError("the API retired a vehicle that carries a validator")
    except urllib.error.HTTPError as e:
        assert e.code == 409
        assert json.loads(e.read())["detail"]["message"].startswith("vehicle 'cv1' still carries validators cb_001")

    # quarantine reasons, in Chinese on the list and on one row
    driver.get(f"{base}/quarantine")
    _wait_for(driver, "#quarantine")
    reasons = _cells(driver, "#quarantine td.reason")
    tac_zh = "TAC 用发卡方密钥验证不通过：记录被改动，或并非来自真卡"
    assert sum(r == tac_zh for r in reasons) == len(tac_rows), reasons
    assert sum(r.startswith("车载机 ") and "未登记：请用 `farebox device add` 登记后重发" in r for r in reasons) == unknown
    assert not any("does not verify" in r or "is not registered" in r for r in reasons), reasons
    driver.get(f"{base}/quarantine/{tac_rows[0]}")
    _wait_for(driver, "#row")
    assert _cells(driver, "#row td.reason") == [tac_zh]
    _shot(driver, "language-zh-quarantine-reason")

    # the alarm operations read: the open quarantined records, counted by plain SQL
    driver.get(f"{base}/alarms")
    _wait_for(driver, "#alarms")
    growing = _cells(driver, 'tr[data-kind="quarantine_growing"] td.alarms')
    assert growing and all(re.fullmatch(r"\d+ 条隔离记录待复核", g) for g in growing), growing
    assert sum(int(g.split()[0]) for g in growing) == waiting
    _shot(driver, "language-zh-alarms")

    # the card: route names and plates, each ride on its own company's clock, the proof in Chinese
    driver.get(f"{base}/cards/{SHARED_CARD}")
    _wait_for(driver, "#records")
    assert driver.find_element(By.ID, "proof").text == "身份证 110101199001011234"
    assert rides_shown() == expected_rides
    assert not any("_" in cell for ride in rides_shown() for cell in ride[1:4])  # names, not codes
    _shot(driver, "language-zh-card-rides")

    # the same in English: the domain's own words, the proof's kind as typed
    driver.find_element(By.ID, "lang-en").click()
    _wait_for(driver, "#lang-zh")
    refused = retire_cv1()
    assert "vehicle 'cv1' still carries validators cb_001: move them with move_device or retire them first" in refused
    assert not CJK.search(refused.replace("中文", ""))
    driver.get(f"{base}/quarantine/{tac_rows[0]}")
    _wait_for(driver, "#row")
    assert _cells(driver, "#row td.reason") == [
        "TAC does not verify with the issuer's key: record altered or not from a genuine card"]
    driver.get(f"{base}/alarms")
    _wait_for(driver, "#alarms")
    growing = _cells(driver, 'tr[data-kind="quarantine_growing"] td.alarms')
    assert growing and all(re.fullmatch(r"\d+ quarantined records? awaits? review", g) for g in growing), growing
    driver.get(f"{base}/cards/{SHARED_CARD}")
    _wait_for(driver, "#records")
    assert driver.find_element(By.ID, "proof").text == "ID card 110101199001011234"
    assert rides_shown() == expected_rides
    _shot(driver, "language-en-card-rides")

    # the users page: a partner is tied to a bus company like a clerk, and the operator field says so
    from selenium.webdriver.support.ui import Select

    def add_partner(operator: str) -> None:
        driver.get(f"{base}/admin/users")
        _wait_for(driver, "#add-user")
        driver.find_element(By.ID, "user-name").send_keys("ticket app")
        Select(driver.find_element(By.ID, "user-role")).select_by_value("partner")
        Select(driver.find_element(By.ID, "user-operator")).select_by_value(operator)
        driver.find_element(By.ID, "add-user-button").click()
        _wait_for(driver, "#form-error, #new-token")

    driver.get(f"{base}/admin/users")
    _wait_for(driver, "#add-user")
    assert driver.find_element(By.CSS_SELECTOR, 'label[for="user-operator"]').text == "Operator (clerks and partners)"
    add_partner("")
    assert "A partner sells for one bus company: choose the operator" in driver.find_element(By.ID, "form-error").text
    add_partner(B)
    assert driver.find_element(By.ID, "new-token").text
    kept = {e["name"]: e for e in tomllib.loads((tmp_path / "var" / "api-tokens.toml").read_text())["token"]}
    assert kept["ticket app"]["role"] == "partner" and kept["ticket app"]["operator"] == B

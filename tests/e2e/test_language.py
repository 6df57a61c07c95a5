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

"""The admin's day in a real browser (issue 10: "Staff users and their roles are managed on an admin page too").

`farebox serve` on the small city of tests/web_city.py (the fixture of tests/e2e/test_web_pages.py, tokens made
with `farebox token add`). The admin opens Users from the header, adds a clerk of City Bus who reads English; the
page shows the new token once. A second browser (another person at another desk) logs in with it and gets the
clerk's pages in English, limited to City Bus. The admin sets another user's language, then revokes the new clerk:
the clerk's next page asks for a login, the token is refused at the login form and on the API, at once, by the
running server. The token file is read here as TOML, on its own: the token never appears in it, its hash does.
A clerk for a bus company the database does not hold is refused, and nothing is written.
"""

from __future__ import annotations

import hashlib
import tomllib
import urllib.error
import urllib.parse
import urllib.request

import pytest
from test_web_pages import _login, _nav, _shot, _wait_for, browser, chrome, server  # noqa: F401 (fixtures)
from web_city import A, A_NAME, B_NAME

pytestmark = pytest.mark.slow

NEW = "王芳"


def _entries(path) -> list[dict]:
    return tomllib.loads(path.read_text(encoding="utf-8")).get("token", [])


def _status(url: str, token: str, data: dict | None = None) -> int:
    body = None if data is None else urllib.parse.urlencode(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_an_admin_adds_a_clerk_who_logs_in_and_is_revoked(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, tokens, _city = server
    token_file = tmp_path / "var" / "api-tokens.toml"
    admin = browser
    before = token_file.read_text(encoding="utf-8")

    # the CLI used to take a clerk of any name; the page (here its form posted by hand) takes none the database lacks
    assert _status(f"{base}/admin/users", tokens["admin"], {"name": "ghost", "role": "clerk",
                                                            "operator": "doesnotexist", "days": "30"}) == 409
    assert token_file.read_text(encoding="utf-8") == before
    assert _status(f"{base}/admin/users", tokens["clerk"], {"name": "ghost", "role": "admin"}) == 403

    _login(admin, base, tokens["admin"])
    _nav(admin, "/admin/users")
    _wait_for(admin, "#add-user")
    rows = admin.find_elements(By.CSS_SELECTOR, "#users tbody tr")
    names = [row.find_element(By.TAG_NAME, "td").text for row in rows]
    assert sorted(names) == ["e2e admin", "e2e clerk", "e2e operator_staff"]
    _shot(admin, "admin-users")

    admin.find_element(By.ID, "user-name").send_keys(NEW)
    Select(admin.find_element(By.ID, "user-role")).select_by_value("clerk")
    Select(admin.find_element(By.ID, "user-operator")).select_by_value(A)
    days = admin.find_element(By.ID, "user-days")
    days.clear()
    days.send_keys("30")
    Select(admin.find_element(By.ID, "user-lang")).select_by_value("en")
    admin.find_element(By.ID, "add-user-button").click()
    _wait_for(admin, "#new-token")
    token = admin.find_element(By.ID, "new-token").text
    assert token.startswith("fbx_") and len(token) > 40
    _shot(admin, "admin-user-added-token-shown-once")
    text = token_file.read_text(encoding="utf-8")
    assert token not in text
    mine = [e for e in _entries(token_file) if e["name"] == NEW]
    assert len(mine) == 1 and mine[0]["role"] == "clerk" and mine[0]["operator"] == A and mine[0]["lang"] == "en"
    assert mine[0]["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    admin.get(f"{base}/admin/users")  # shown once: not on the page again
    assert token not in admin.page_source and NEW in admin.find_element(By.ID, "users").text

    with chrome() as clerk:  # another person's browser; it asks for Chinese, the user chose English
        _login(clerk, base, token)
        who = clerk.find_element(By.CSS_SELECTOR, "header form.who span").text
        assert NEW in who and A in who
        clerk.get(f"{base}/registry/operators")
        assert clerk.find_element(By.TAG_NAME, "h1").text == "Registry"
        seen = clerk.find_element(By.TAG_NAME, "main").text
        assert A_NAME in seen and B_NAME not in seen  # one bus company's data
        assert not clerk.find_elements(By.CSS_SELECTOR, 'header nav a[href="/admin/users"]')
        clerk.get(f"{base}/admin/users")
        assert clerk.find_element(By.TAG_NAME, "h1").text == "Not allowed"
        _shot(clerk, "admin-new-clerk-logged-in-elsewhere")
        clerk.get(f"{base}/registry/routes")
        assert _status(f"{base}/api/v1/routes", token) == 200

        # the admin sets the other clerk's language, then revokes the new one
        admin.get(f"{base}/admin/users")
        rows = {r.find_element(By.TAG_NAME, "td").text: r for r in admin.find_elements(By.CSS_SELECTOR, "#users tr")
                if r.find_elements(By.TAG_NAME, "td")}
        Select(rows["e2e clerk"].find_element(By.NAME, "lang")).select_by_value("en")
        rows["e2e clerk"].find_element(By.CSS_SELECTOR, "form.user-lang button").click()
        _wait_for(admin, "#done")
        assert {e["name"]: e.get("lang") for e in _entries(token_file)}["e2e clerk"] == "en"
        rows = {r.find_element(By.TAG_NAME, "td").text: r for r in admin.find_elements(By.CSS_SELECTOR, "#users tr")
                if r.find_elements(By.TAG_NAME, "td")}
        rows[NEW].find_element(By.CSS_SELECTOR, "form.revoke button").click()
        _wait_for(admin, "#users tr.state-revoked")  # (#done is on the page already, from the language)
        row = admin.find_element(By.CSS_SELECTOR, "#users tr.state-revoked")
        assert NEW in row.text and "已吊销" in row.text and not row.find_elements(By.CSS_SELECTOR, "form.revoke")
        _shot(admin, "admin-user-revoked")
        assert [e.get("revoked_at") is not None for e in _entries(token_file) if e["name"] == NEW] == [True]

        clerk.refresh()  # the page the clerk had open: the session ended with the token
        _wait_for(clerk, "#token")
        assert "Please log in" in clerk.find_element(By.TAG_NAME, "main").text
        clerk.find_element(By.ID, "token").send_keys(token)
        clerk.find_element(By.ID, "login").click()
        # the login form posts and the page is replaced: an element found on the old one goes stale, so look again
        WebDriverWait(clerk, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: "Unknown token" in d.find_element(By.CSS_SELECTOR, "p.error").text)
        assert not clerk.find_elements(By.CSS_SELECTOR, "header form.who")
        _shot(clerk, "admin-revoked-token-refused")
    assert _status(f"{base}/api/v1/routes", token) == 401
    assert _status(f"{base}/api/v1/routes", tokens["clerk"]) == 200  # the others' tokens still work
    assert [e["name"] for e in _entries(token_file)].count(NEW) == 1  # revoked, kept in the file, not removed


# ------------------------------------------------------------------------------------------------ the token file
def _add_many(path: str, count: int) -> None:
    from backoffice.web.auth import add_token

    for i in range(count):
        add_token(path, role="operations", name=f"ops {i}", days=1)


def _toggle_lang(path: str, count: int) -> None:
    from backoffice.web.auth import set_lang

    for i in range(count):
        set_lang(path, name="root", lang=("en", "zh")[i % 2])


def test_the_token_file_keeps_every_change_when_the_cli_and_the_server_write_at_once(tmp_path):
    """`farebox token add` appends while the server rewrites the file for a language choice (two processes): no
    token is lost, the file stays TOML, and a file of the earlier format (no lang) reads as it did."""
    import multiprocessing

    from backoffice.web.auth import TokenStore, add_token

    path = tmp_path / "api-tokens.toml"
    path.write_text('[[token]]\nname = "old"\nrole = "admin"\nsha256 = "' + "ab" * 32 + '"\n\n'
                    '[[token]]\nname = "later"\nrole = "admin"\nlang = "fr"\nsha256 = "' + "cd" * 32 + '"\n',
                    encoding="utf-8")  # before languages were kept; and a language this version does not know
    store = TokenStore(path)
    assert [(e.principal.name, e.lang) for e in store.entries()] == [("old", None), ("later", None)]
    assert store.lang_of("old") is None
    add_token(path, role="admin", name="root", lang="zh")
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_add_many, args=(str(path), 25)),
               ctx.Process(target=_toggle_lang, args=(str(path), 25))]
    for w in writers:
        w.start()
    for w in writers:
        w.join(90)
    assert [w.exitcode for w in writers] == [0, 0]
    names = [e["name"] for e in _entries(path)]
    assert sorted(names) == sorted(["old", "later", "root", *(f"ops {i}" for i in range(25))])
    assert TokenStore(path).lang_of("root") == "en"  # the 25th choice (odd count: en, zh, ..., en)
    assert {e["name"]: e.get("lang") for e in _entries(path)}["old"] is None

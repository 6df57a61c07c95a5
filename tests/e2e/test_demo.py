"""The demo end to end: `farebox demo` on its embedded defaults (own broker, SQLite), and the same day on
PostgreSQL + Mosquitto with the ingest process SIGKILLed and restarted several times. The embedded run is also read
as a transit person reads it (names, yuan, 100 columns, alarms explained), and its last lines are followed: the
`farebox serve` line it prints is started, and the clerk's token it printed opens the demo day over HTTP.

Every number is checked against the sources themselves, not against the demo's own arithmetic: the validators'
journal files, the back office's tables read with plain SQL, and what the simulated cards lost.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from datetime import UTC, date, datetime
from datetime import time as dt_time
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from pypdf import PdfReader
from sqlalchemy import bindparam, create_engine, text
from test_web_pages import _login, _shot, browser  # noqa: F401 (browser: a fixture)

from farebox.broker import free_port
from farebox.config import Settings
from farebox.demo import run_demo

pytestmark = pytest.mark.slow


def journal_records(run_dir: Path, devices: list[str], *, tickets: bool = False) -> dict[tuple[str, int], dict]:
    """Completed records straight from each validator's SQLite journal: the card taps (and shifts), or with
    ``tickets`` the e-ticket uses."""
    out = {}
    for device in devices:
        db = sqlite3.connect(run_dir / f"{device}.journal")
        for seq, body in db.execute("SELECT device_seq, body FROM record WHERE state = 'done'"):
            record = json.loads(body)
            if (record["kind"] == "ticket_use") == tickets:
                out[(device, seq)] = record
        db.close()
    return out


def stored_records(url: str, devices: list[str]) -> list[dict]:
    engine = create_engine(url)
    with engine.connect() as conn:
        query = text("SELECT device_id, device_seq, kind, amount, route, vehicle, driver FROM tap "
                     "WHERE device_id IN :d").bindparams(bindparam("d", expanding=True))
        rows = conn.execute(query, {"d": devices}).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def yuan(fen: int) -> str:
    return f"{fen // 100:,}.{fen % 100:02d}"


def check_run(summary: dict, run_dir: Path, database_url: str) -> None:
    devices = summary["devices"]
    written = journal_records(run_dir, devices)
    rows = stored_records(database_url, devices)
    keys = [(r["device_id"], r["device_seq"]) for r in rows]
    assert len(keys) == len(set(keys)), "a record was stored twice"
    assert set(keys) == set(written), "stored records differ from what the validators wrote"
    lost = sum(c["initial"] - c["final"] for c in summary["cards"].values())
    purchases = [r for r in rows if r["kind"] == "purchase"]
    assert sum(r["amount"] for r in purchases) == lost > 0
    for key in ("route", "vehicle", "driver"):
        expected = defaultdict(int)
        for r in purchases:
            expected[r[key]] += r["amount"]
        got = {row[key]: row["amount"] for row in summary[f"by_{key}"]}
        assert got == dict(expected), key
        assert sum(got.values()) == lost
    assert summary["settled_amount"] == lost and summary["settled_taps"] == len(purchases)
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["shift_open"] == kinds["shift_close"] == len(devices)
    assert kinds["denied"] >= 1, "the deny-listed card was never refused"
    text_ = "".join(page.extract_text() for page in PdfReader(summary["pdf"]).pages)
    assert yuan(lost) in text_
    for section in ("By route", "By vehicle", "By driver"):
        assert section in text_
    check_tickets(summary, run_dir, database_url)


def check_tickets(summary: dict, run_dir: Path, database_url: str) -> None:
    """The e-tickets: every use a validator wrote is stored once (plain SQL on ticket_use), each counted; what the
    clearing run recognised comes to what the tickets sold for (all of them expired by the day's end); and the
    revenue at use lies on the route, vehicle and driver of the bus each use was made on, at the value computed
    here: a single ride its price, the day pass its stated ride value until its price is used up."""
    devices, operator = summary["devices"], summary["operator"]
    written = journal_records(run_dir, devices, tickets=True)
    engine = create_engine(database_url)
    with engine.connect() as conn:
        uses = [dict(r) for r in conn.execute(text(
            "SELECT u.device_id, u.device_seq, u.ticket_id, u.presented_by, u.route, u.vehicle, u.driver, "
            "u.revenue, u.occurred_at, t.kind, t.price_fen FROM ticket_use u JOIN ticket t ON t.ticket_id = "
            "u.ticket_id WHERE u.device_id IN :d ORDER BY u.occurred_at, u.id")
            .bindparams(bindparam("d", expanding=True)), {"d": devices}).mappings()]
        sold = conn.execute(text("SELECT SUM(paid_fen - refunded_fen) FROM ticket_order WHERE operator = :op"),
                            {"op": operator}).scalar()
        ledger = [dict(r) for r in conn.execute(text(
            "SELECT source, ticket_id, route, vehicle, driver, amount FROM ticket_revenue WHERE operator = :op"),
            {"op": operator}).mappings()]
    engine.dispose()
    keys = [(u["device_id"], u["device_seq"]) for u in uses]
    assert len(keys) == len(set(keys)) and set(keys) == set(written) and len(written) >= 5
    assert all(u["revenue"] for u in uses), "a genuine use was flagged"
    assert {u["presented_by"] for u in uses} == {"qr", "pickup"}, "no QR or no pickup code on the buses"
    for key, u in zip(keys, uses, strict=True):  # a pickup code names the ticket's 10-digit serial only
        ticket = u["ticket_id"] % 10**10 if u["presented_by"] == "pickup" else u["ticket_id"]
        assert (written[key]["ticket_id"], written[key]["route"]) == (ticket, u["route"])
    assert sold == summary["tickets"]["sales"] > 0
    assert sum(line["amount"] for line in ledger) == sold == summary["tickets"]["revenue"]
    earned: dict[int, int] = defaultdict(int)
    expected = defaultdict(int)
    for u in uses:
        value = u["price_fen"] if u["kind"] == "single" else min(200, u["price_fen"] - earned[u["ticket_id"]])
        earned[u["ticket_id"]] += value
        expected[(u["route"], u["vehicle"], u["driver"])] += value
    got = defaultdict(int)
    for line in ledger:
        if line["source"] == "use":
            got[(line["route"], line["vehicle"], line["driver"])] += line["amount"]
    assert dict(got) == dict(expected)


@pytest.fixture(scope="module")
def embedded_demo(tmp_path_factory):
    """`farebox demo` as `make demo` runs it: no FAREBOX_* settings, output to a pipe (so no terminal width)."""
    var = tmp_path_factory.mktemp("demo") / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_") and k != "COLUMNS"}
    env["FAREBOX_VAR_DIR"] = str(var)
    proc = subprocess.run([sys.executable, "-m", "farebox.cli", "demo"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    [run_dir] = (var / "demo").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return proc, var, env, run_dir, summary


def test_make_demo_on_embedded_defaults(embedded_demo):
    proc, var, _env, run_dir, summary = embedded_demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "agree" in proc.stdout and "DO NOT AGREE" not in proc.stdout
    tickets = summary["tickets"]
    assert f"e-tickets: {tickets['sold']} sold for {_yuan(tickets['sales'])}" in proc.stdout
    assert f"ticket revenue recognised {_yuan(tickets['revenue'])}" in proc.stdout
    assert tickets["by_pickup"] == 1 and tickets["outcomes"].get("ticket_used") == 1  # shown twice: refused once
    assert "(embedded)" in proc.stdout and "took" in proc.stdout
    assert Path(summary["pdf"]).resolve().parent == (var / "reports").resolve()
    check_run(summary, run_dir, f"sqlite:///{var / 'backoffice.db'}")
    assert summary["taps_by_outcome"]["insufficient_balance"] > 0


def display_width(line: str) -> int:
    """Terminal columns: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)


def test_demo_output_reads_plainly(embedded_demo):
    """Issue 10, "Demo output": no run tag in the names people read, "cards paid", lines that fit 100 columns
    (no cut at 80), a bus called the same everywhere (its plate), money in yuan with two decimals."""
    proc, var, _env, run_dir, summary = embedded_demo
    out, tag = proc.stdout, run_dir.name
    # Paths are the user's own (a long tmp dir here): they are not the demo's to shorten.
    places = [str(var.resolve()), str(var), str(Path(sys.executable).parent)]
    lines = out.splitlines()
    for line in lines:
        for place in places:
            line = line.replace(place, "<dir>")
        assert display_width(line) <= 100, f"wider than 100 columns: {line!r}"
        # The run tag lives inside codes only: card numbers (20 hex digits), paths, and the header's "(run tag)".
        plain = re.sub(r"\b[0-9a-f]{20}\b", "<card>", line).replace(f"(run {tag})", "")
        plain = re.sub(r"\S*/\S*", "<path>", plain)
        assert tag not in plain, f"run tag in a line people read: {line!r}"
        assert not re.search(r"_[vbr]\d\d?\b|_k3\b", plain), f"a code where a name belongs: {line!r}"
    assert "cards paid ¥" in out and "cards lost" not in out
    paid = sum(c["initial"] - c["final"] for c in summary["cards"].values())
    assert f"cards paid ¥{paid // 100:,}.{paid % 100:02d}" in out
    # Bus 3 (its plate, as on the vehicle settlement and the validators page) loses its link 09:00-13:00.
    assert re.search(r"09:00 bus 沪A-81002 loses its link", out) and re.search(r"13:00 bus 沪A-81002 is back", out)
    for table in ("By bus", "Validators"):
        block = out[out.index(table):]
        assert "沪A-81002" in block[:block.index("└")]
    # Every alarm a validator still shows is explained in a line of its own.
    fleet = out[out.index("Validators"):out.index("PDF report")]
    for row in (r for r in fleet.splitlines() if r.startswith("│")):
        alarms = [c.strip() for c in row.strip("│").split("│")][-1]
        for alarm in filter(None, alarms.split("; ")):
            assert re.search(rf"^  {re.escape(alarm.split(' since ')[0])}: \S", fleet, re.M), alarm


def check_card_books(summary: dict, url: str) -> None:
    """Every demo card was issued with the balance its chip started from, so book == card: plain SQL (the opening
    balance at issue minus the purchases stored) against what the simulated card holds at the end."""
    engine = create_engine(url)
    with engine.connect() as conn:
        asns = list(summary["cards"])
        opening = dict(conn.execute(text("SELECT asn, opening_balance FROM card_account WHERE asn IN :a")
                                    .bindparams(bindparam("a", expanding=True)), {"a": asns}).all())
        paid = dict(conn.execute(text("SELECT card_asn, SUM(amount) FROM tap WHERE kind = 'purchase' AND card_asn "
                                      "IN :a GROUP BY card_asn").bindparams(bindparam("a", expanding=True)),
                                 {"a": asns}).all())
    engine.dispose()
    for asn, card in summary["cards"].items():
        assert opening[asn] == card["initial"], asn
        assert opening[asn] - paid.get(asn, 0) == card["final"], asn


def test_demo_cards_have_their_opening_balances(embedded_demo):
    _proc, var, _env, _run_dir, summary = embedded_demo
    check_card_books(summary, f"sqlite:///{var / 'backoffice.db'}")


def _after(out: str, marker: str) -> str:
    """The line after the first line that contains ``marker``, stripped."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if marker in line)
    return lines[i + 1].strip()


@pytest.fixture(scope="module")
def demo_server(embedded_demo, tmp_path_factory):
    """`farebox serve` started by the line the demo printed, and the clerk's token it printed; tokens for counter
    staff and operations made with `farebox token add` on the same settings."""
    proc, var, env, _run_dir, summary = embedded_demo
    assert proc.returncode == 0
    line = _after(proc.stdout, "See the day in the browser")
    tokens = {"clerk": _after(proc.stdout, "with this token")}
    assert tokens["clerk"].startswith("fbx_")
    words = shlex.split(line)
    settings = dict(w.split("=", 1) for w in words if re.match(r"FAREBOX_\w+=", w))
    argv = [w for w in words if not re.match(r"FAREBOX_\w+=", w)]
    assert argv[-1] == "serve" and settings["FAREBOX_VAR_DIR"] == str(var.resolve())
    env = {**{k: v for k, v in env.items() if not k.startswith("FAREBOX_")}, **settings}
    for role in ("operator_staff", "operations"):
        tokens[role] = subprocess.run([sys.executable, "-m", "farebox.cli", "token", "add", "--role", role,
                                       "--name", f"e2e {role}"], env=env, capture_output=True, text=True,
                                      timeout=60, check=True).stdout.strip()
    tmp = tmp_path_factory.mktemp("serve")
    port, ready = free_port(), tmp / "serve.ready"
    with open(tmp / "serve.log", "w") as log:
        server = subprocess.Popen([*argv, "--port", str(port), "--ready-file", str(ready)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline, (tmp / "serve.log").read_text()[-3000:]
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", tokens, summary
    finally:
        server.terminate()
        server.wait(timeout=30)


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


def test_serve_line_opens_the_demo_day(demo_server):
    """The line the demo prints starts `farebox serve` on the same data: the clerk's token it printed opens the
    dashboard on the demo day, and the card page shows each demo card's book agreeing with the card."""
    base, tokens, summary = demo_server
    with httpx.Client(base_url=base, timeout=30) as http:
        page = http.get("/dashboard", headers={"Authorization": f"Bearer {tokens['clerk']}"})
        assert page.status_code == 200, page.text[:500]
        assert summary["day"] in page.text, "the dashboard does not open on the demo day"
        assert _yuan(summary["settled_amount"])[1:] in page.text, "the demo day's fares are not on the dashboard"
        # A sample of cards, each kind of history: rode, ran dry, deny-listed, reported lost at noon.
        cards = sorted(summary["cards"].items())
        sample = cards[:12] + [c for c in cards if c[1]["initial"] <= 700][:3] + cards[-5:]
        for asn, card in sample:
            page = http.get(f"/cards/{asn}", headers={"Authorization": f"Bearer {tokens['operator_staff']}"})
            assert page.status_code == 200, (asn, page.text[:500])
            assert "differs" not in page.text and "不一致" not in page.text, asn
            assert _yuan(card["final"]) in page.text, asn


def test_demo_day_in_the_browser(demo_server, browser):
    """What a clerk, counter staff and operations see after `make demo`, kept as screenshots: the dashboard on
    the demo day, a demo card whose book agrees with its chip, and the validators page with bus 3's gap."""
    from selenium.webdriver.common.by import By

    base, tokens, summary = demo_server
    _login(browser, base, tokens["clerk"])
    browser.get(f"{base}/dashboard")
    assert _yuan(summary["settled_amount"])[1:] in browser.page_source
    _shot(browser, "demo-dashboard-opens-on-demo-day")

    browser.delete_all_cookies()
    asn, card = next((a, c) for a, c in sorted(summary["cards"].items()) if c["final"] < c["initial"])
    _login(browser, base, tokens["operator_staff"])
    browser.get(f"{base}/cards/{asn}")
    assert browser.find_element(By.ID, "balance").text == _yuan(card["final"])
    assert "不一致" not in browser.page_source and "differs" not in browser.page_source
    _shot(browser, "demo-card-page-book-agrees-with-card")

    browser.delete_all_cookies()
    _login(browser, base, tokens["operations"])
    browser.get(f"{base}/devices?day={summary['day']}")
    row = browser.find_element(By.ID, f"link-{summary['devices'][2]}")
    assert row.is_displayed()
    _shot(browser, "demo-validators-bus3-link-gap")


def test_validators_final_status_is_true(embedded_demo):
    """After the demo every bus has signed off (not "online") with nothing left to send, on the demo day's clock,
    and the link history shows bus 3 off the air from 09:00 to 13:00 (plain SQL on the status tables)."""
    _proc, var, _env, _run_dir, summary = embedded_demo
    db = sqlite3.connect(var / "backoffice.db")
    rows = db.execute("SELECT device_id, online, backlog, last_seen FROM device_status").fetchall()
    links = db.execute("SELECT connected_at, last_heard FROM device_link WHERE device_id = ? ORDER BY connected_at",
                       (summary["devices"][2],)).fetchall()
    db.close()
    assert sorted(r[0] for r in rows) == sorted(summary["devices"])
    for device, online, backlog, last_seen in rows:
        assert (online, backlog) == (0, 0), device
        assert last_seen.startswith(summary["day"]), (device, last_seen)  # UTC 14:xx = 22:xx in Shanghai
    shanghai, day = ZoneInfo("Asia/Shanghai"), date.fromisoformat(summary["day"])

    def local(text_: str) -> datetime:
        return datetime.fromisoformat(text_).replace(tzinfo=UTC).astimezone(shanghai)

    # Heartbeats every few simulated minutes: the last one before the dead zone may be a few minutes before 09:00.
    quiet_from = datetime.combine(day, dt_time(9, 5), shanghai)
    quiet_to = datetime.combine(day, dt_time(12, 55), shanghai)
    periods = [(local(a), local(b)) for a, b in links]
    assert not [p for p in periods if p[0] < quiet_to and p[1] > quiet_from], periods
    assert any(b <= quiet_from for _a, b in periods) and any(a >= quiet_to for a, _b in periods), periods


def test_ingest_killed_mid_day_loses_nothing_and_counts_nothing_twice(tmp_path, pg_schema_url, mosquitto_url):
    settings = Settings(var_dir=tmp_path / "var", database_url=pg_schema_url, mqtt_url=mosquitto_url)
    result = run_demo(settings, kill_ingest_at=(0.15, 0.35, 0.55, 0.75, 0.9))
    assert result.ingest_kills == 5
    assert result.consistent
    summary = json.loads((result.run_dir / "summary.json").read_text())
    check_run(summary, result.run_dir, pg_schema_url)
    check_card_books(summary, pg_schema_url)

"""Issue 10 at the command line, as a person types it (subprocess, a SQLite file): money typed and printed in yuan,
stored in fen (checked with plain SQL); the company's first hour without Python (operator, commission rate with its
valid-from day, a token for a company the database does not hold refused); the commands the issue found failing
(`registry fare-table` without `--version`, `sim card --apdu A B`, `denylist publish` with no broker); times in the
operator's zone (`jobs list`), and a day that has not begun never called "still running"."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

SELECT = "00A4040008A000000632010105"
GET_BALANCE = "805C000204"


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """One back office (a SQLite file) for the module's tests, each working on entries of its own."""
    tmp_path = tmp_path_factory.mktemp("cli_units")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env.update(FAREBOX_VAR_DIR=str(tmp_path / "var"), FAREBOX_INSECURE_TEST_KEYS="1")  # simulated cards: test keys

    def farebox(*args, ok=True):
        done = subprocess.run([sys.executable, "-m", "farebox.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)
        if ok:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def sql(query, *params):
        with sqlite3.connect(tmp_path / "var" / "backoffice.db") as conn:
            return conn.execute(query, params).fetchall()

    farebox.sql = sql
    farebox.tmp = tmp_path
    farebox("db", "upgrade")
    farebox("registry", "add-operator", "--code", "zhixing", "--name", "智行公交", "--by", "li")
    return farebox


def local_day(days_back: int, tz: str = "Asia/Shanghai", cutoff: int = 3):
    return (datetime.now(UTC).astimezone(ZoneInfo(tz)) - timedelta(hours=cutoff, days=days_back)).date()


def test_fares_deposits_and_top_ups_are_typed_in_yuan_stored_in_fen_and_printed_in_yuan(cli):
    done = cli("registry", "add-route", "--operator", "zhixing", "--code", "r1", "--name", "1路", "--fare", "2.00",
               "--by", "li")
    assert done.stdout.strip() == "route r1 added (flat fare ¥2.00)"
    audit = cli("registry", "audit", "--operator", "zhixing", "--kind", "route", "--key", "r1").stdout
    assert "flat_fare=¥2.00" in audit and "flat_fare=200" not in audit  # stored in fen, read in yuan
    cli("registry", "add-route", "--operator", "zhixing", "--code", "r2", "--name", "2路", "--stages", "10:2,20:3.50",
        "--by", "li")
    refused = cli("registry", "add-route", "--operator", "zhixing", "--code", "r3", "--name", "3", "--fare", "2.001",
                  "--by", "li", ok=False)
    assert refused.returncode == 2 and "two decimals" in refused.stderr
    assert cli.sql("SELECT code, flat_fare FROM route WHERE code IN ('r1', 'r2', 'r3') ORDER BY code") == [
        ("r1", 200), ("r2", 0)]
    assert cli.sql("SELECT s.up_to_stops, s.fare FROM route_fare_stage s JOIN route_version v "
                   "ON v.id = s.route_version_id WHERE v.code = 'r2' ORDER BY 1") == [(10, 200), (20, 350)]

    card = str(cli.tmp / "cards" / "rider.json")
    issued = cli("card", "issue", "--sim-state", card, "--deposit", "20.00", "--staff", "wang")
    assert "deposit ¥20.00" in issued.stdout and "balance ¥0.00" in issued.stdout
    loaded = cli("topup", "counter", "--sim-state", card, "--amount", "50.00", "--staff", "wang")
    assert "loaded ¥50.00, balance ¥50.00" in loaded.stdout
    asn = json.loads((cli.tmp / "cards" / "rider.json").read_text())["asn"]
    assert cli.sql("SELECT deposit FROM card_account WHERE asn = ?", asn) == [(2000,)]
    assert cli.sql("SELECT amount, balance_before FROM card_load WHERE asn = ?", asn) == [(5000, 0)]
    for bad in ("50.001", "-5", "5e3", "fifty"):
        refused = cli("topup", "counter", "--sim-state", card, "--amount", bad, "--staff", "wang", ok=False)
        assert refused.returncode == 2 and "--amount" in refused.stderr, bad
    assert cli.sql("SELECT count(*) FROM card_load WHERE asn = ?", asn) == [(1,)]
    shown = cli("card", "show", "--asn", asn)
    assert "loads ¥50.00" in shown.stdout and "= ¥50.00" in shown.stdout


def test_fare_table_without_a_version_takes_the_next_one(cli):
    cli("registry", "add-route", "--operator", "zhixing", "--code", "f1", "--name", "F1", "--fare", "3", "--by", "li")
    doc = json.loads(cli("registry", "fare-table", "--operator", "zhixing").stdout)
    assert doc["version"] == 1 and doc["flat"]["f1"] == 300  # the validators' file: fen, as on the card
    assert json.loads(cli("registry", "fare-table", "--operator", "zhixing", "--version", "7").stdout)["version"] == 7


def test_sim_card_takes_several_apdus_after_one_flag_as_the_readme_writes_it(cli):
    done = cli("sim", "card", "--balance", "43.21", "--apdu", SELECT, GET_BALANCE)
    assert f"> {SELECT}" in done.stdout and f"> {GET_BALANCE}" in done.stdout
    assert "< 000010E19000" in done.stdout and "balance ¥43.21" in done.stdout


def test_a_token_for_a_company_the_database_does_not_hold_is_refused_and_none_is_written(cli):
    done = cli("token", "add", "--role", "clerk", "--operator", "doesnotexist", "--name", "bob", ok=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "operator 'doesnotexist' is not registered" in done.stderr
    assert "farebox registry add-operator" in done.stderr and "registered: zhixing" in done.stderr
    assert not (cli.tmp / "var" / "api-tokens.toml").exists()
    assert cli("token", "add", "--role", "clerk", "--operator", "zhixing", "--name", "bob").stdout.startswith("fbx_")


def test_the_commission_rate_is_a_command_and_a_cleared_day_keeps_its_rate(cli):
    # no rate: settle names the command, not Python
    before = local_day(3)
    done = cli("settle", "--operator", "zhixing", "--day", before.isoformat(), "--out", "reports")
    assert "PROVISIONAL" in done.stdout and "farebox registry set-commission" in done.stdout
    assert "backoffice." not in done.stdout + done.stderr
    bad = cli("registry", "set-commission", "--operator", "zhixing", "--percent", "0.605", "--from",
              before.isoformat(), "--by", "li", ok=False)
    assert bad.returncode == 2 and "two decimals" in bad.stderr
    cli("registry", "set-commission", "--operator", "zhixing", "--percent", "0.60", "--from", before.isoformat(),
        "--by", "li")
    day = local_day(2)
    assert "clearing run 1" in cli("settle", "--operator", "zhixing", "--day", day.isoformat(), "--out",
                                   "reports").stdout
    late = cli("registry", "set-commission", "--operator", "zhixing", "--percent", "1", "--from", day.isoformat(),
               "--by", "li", ok=False)
    assert late.returncode == 2 and "cleared already" in late.stderr
    cli("registry", "set-commission", "--operator", "zhixing", "--percent", "1", "--from",
        (day + timedelta(days=1)).isoformat(), "--by", "li")
    assert cli.sql("SELECT valid_from, rate_bp FROM commission_rate ORDER BY valid_from") == [
        (before.isoformat(), 60), ((day + timedelta(days=1)).isoformat(), 100)]
    assert "1.00%" in cli("registry", "commission", "--operator", "zhixing").stdout
    assert cli.sql("SELECT count(*) FROM registry_audit WHERE kind = 'commission'") == [(2,)]


def test_a_day_that_has_not_begun_is_not_called_still_running(cli):
    future = local_day(-30)
    done = cli("settle", "--operator", "zhixing", "--day", future.isoformat(), ok=False)
    assert done.returncode == 2 and "has not begun" in done.stderr and "Asia/Shanghai" in done.stderr
    assert "still running" not in done.stdout + done.stderr
    assert cli.sql("SELECT count(*) FROM clearing_run WHERE service_day = ?", future.isoformat()) == [(0,)]


def test_denylist_publish_without_a_broker_stores_the_version_and_says_who_sends_it(cli):
    card = str(cli.tmp / "lost.json")
    cli("card", "issue", "--sim-state", card, "--staff", "wang")
    asn = json.loads((cli.tmp / "lost.json").read_text())["asn"]
    cli("card", "lost", "--asn", asn, "--staff", "wang", "--why", "rider called")
    done = cli("denylist", "publish")
    assert "new version 1: 1 card(s)" in done.stdout and "farebox serve" in done.stdout
    assert cli.sql("SELECT version, count FROM denylist_version") == [(1, 1)]
    assert "unchanged" in cli("denylist", "publish").stdout


def test_jobs_list_says_the_next_run_in_the_operators_own_zone(cli):
    from backoffice.db import make_engine
    from backoffice.scheduler import start_scheduler, stop_scheduler
    from farebox.config import Settings

    engine = make_engine(f"sqlite:///{cli.tmp}/var/backoffice.db")
    scheduler = start_scheduler(engine, Settings(var_dir=cli.tmp / "var"), paused=True)  # stores the jobs
    stop_scheduler(scheduler, wait=False)
    engine.dispose()
    line = next(x for x in cli("jobs", "list").stdout.splitlines() if x.startswith("clearing:zhixing"))
    assert "04:00 Asia/Shanghai" in line and "UTC" not in line.split("cron")[0], line


def test_a_trial_shift_with_simulated_cards_is_dated_by_the_trial_clock_and_kept_offline(cli):
    """`validator run --reader sim: --tap ... --trial-clock`: the cards in turn, two minutes apart, from the given
    moment; read back from the journal with plain sqlite3. A real reader is refused the trial options."""
    cards = cli.tmp / "trial"
    cli("sim", "card", "--type", "driver", "--staff-no", "D9", "--state", str(cards / "driver.json"))
    cli("sim", "card", "--balance", "10.00", "--state", str(cards / "rider.json"))
    cli("registry", "add-route", "--operator", "zhixing", "--code", "t1", "--name", "T1", "--fare", "2.50",
        "--by", "li")
    (cards / "fares.json").write_text(cli("registry", "fare-table", "--operator", "zhixing").stdout)
    base = ["validator", "run", "--device", "trial1", "--operator", "zhixing", "--route", "t1", "--vehicle", "tv1",
            "--psam", "sim:0b0000000001", "--journal", str(cards / "journal.db"), "--fares", str(cards / "fares.json")]
    refused = cli(*base, "--reader", "pcsc:0", "--tap", str(cards / "rider.json"), ok=False)
    assert refused.returncode == 2 and "give --reader sim:" in refused.stderr
    start = "2026-11-30T07:30:00+08:00"
    done = cli(*base, "--reader", "sim:", "--tap", *(str(cards / f) for f in ("driver.json", "rider.json",
                                                                             "driver.json")),
               "--trial-clock", start)
    assert "all 3 card(s) tapped; offline" in done.stdout
    with sqlite3.connect(cards / "journal.db") as conn:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM record ORDER BY device_seq")]
    assert [b["kind"] for b in bodies] == ["shift_open", "purchase", "shift_close"]
    first = datetime.fromisoformat(start).timestamp()
    assert [b["occurred_at"] for b in bodies] == [first, first + 120, first + 240]
    assert bodies[1]["amount"] == 250 and bodies[1]["balance_after"] == 750
    assert json.loads((cards / "rider.json").read_text())["balance"] == 750  # the card's own word

"""``farebox ticket`` as a clerk types it (subprocess, a SQLite file): prices typed in yuan, stored in fen (plain
SQL), printed in yuan; a price with three decimals and a departure for a pass refused with the reason; departures
added by hand and from a GTFS folder, listed on the operator's clock with their free seats; an order shown with its
items, tickets and every change. Also the ticket keys' test-key rule: nothing but the demo and tests runs on the
published ticket keys."""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import pytest

from backoffice.tickets import keys as ticket_keys
from reference_ticket import ref_pickup_code
from test_ticket_catalogue import write_feed


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ticket_cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env.update(FAREBOX_VAR_DIR=str(tmp_path / "var"), FAREBOX_INSECURE_TEST_KEYS="1")

    def farebox(*args, ok=True, insecure=True, env_more=None):
        run_env = (env if insecure else env | {"FAREBOX_INSECURE_TEST_KEYS": ""}) | (env_more or {})
        done = subprocess.run([sys.executable, "-m", "farebox.cli", *args], env=run_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)
        if ok:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def sql(query, *params):
        with sqlite3.connect(tmp_path / "var" / "backoffice.db") as conn:
            return conn.execute(query, params).fetchall()

    farebox.sql, farebox.tmp = sql, tmp_path
    farebox("db", "upgrade")
    farebox("registry", "add-operator", "--code", "coachco", "--name", "Coach Co", "--by", "li")
    farebox("registry", "add-route", "--operator", "coachco", "--code", "AIR", "--name", "Airport", "--fare", "2",
            "--by", "li")
    return farebox


def test_products_are_typed_in_yuan_stored_in_fen_and_listed_in_yuan(cli):
    done = cli("ticket", "product", "add", "--operator", "coachco", "--code", "day", "--kind", "day_pass", "--name",
               "Day pass", "--price", "15.50", "--routes", "AIR", "--category", "student", "--by", "li")
    assert "¥15.50" in done.stdout and "unlimited rides" in done.stdout and "student" in done.stdout
    assert cli.sql("SELECT price_fen, routes, uses, validity_days, rider_category FROM product WHERE code = 'day'") == [
        (1550, "AIR", 0, 1, 2)]
    refused = cli("ticket", "product", "add", "--operator", "coachco", "--code", "bad", "--kind", "single", "--name",
                  "x", "--price", "1.234", "--by", "li", ok=False)
    assert refused.returncode == 2 and "two decimals" in refused.stderr
    listed = cli("ticket", "product", "list", "--operator", "coachco").stdout
    assert "¥15.50" in listed and "1550" not in listed


def test_departures_by_hand_and_from_gtfs_with_their_free_seats(cli):
    cli("ticket", "product", "add", "--operator", "coachco", "--code", "coach", "--kind", "coach_trip", "--name",
        "Airport coach", "--price", "30", "--by", "li")
    done = cli("ticket", "departure", "add", "--operator", "coachco", "--product", "coach", "--route", "AIR",
               "--date", "2026-12-24", "--time", "18:30", "--seats", "40")
    assert "leaves 2026-12-24 18:30 (Asia/Shanghai), 40 of 40 seats free" in done.stdout
    assert cli.sql("SELECT departs_at FROM departure WHERE departs_local = '18:30'")[0][0].startswith(
        "2026-12-24 10:30:00")  # stored in UTC
    cli("ticket", "product", "add", "--operator", "coachco", "--code", "one", "--kind", "single", "--name", "Ride",
        "--price", "2", "--by", "li")
    wrong = cli("ticket", "departure", "add", "--operator", "coachco", "--product", "one", "--route", "AIR",
                "--date", "2026-12-24", "--time", "18:30", "--seats", "40", ok=False)
    assert wrong.returncode == 2 and "not a coach_trip" in wrong.stderr
    feed = write_feed(cli.tmp / "feed")
    imported = cli("ticket", "departure", "import-gtfs", str(feed), "--operator", "coachco", "--product", "coach",
                   "--from", "2026-12-01", "--to", "2026-12-02", "--seats", "45")
    assert "departures: 4 added" in imported.stdout and "skipped  X1" in imported.stdout
    listed = cli("ticket", "departure", "list", "--operator", "coachco", "--date", "2026-12-01").stdout
    assert "2026-12-01 07:30" in listed and "2026-12-02 00:40" in listed and "45" in listed


def test_an_order_is_shown_with_items_tickets_and_changes(cli):
    from backoffice.db import make_engine
    from backoffice.tickets import orders

    cli("ticket", "product", "add", "--operator", "coachco", "--code", "week", "--kind", "day_pass", "--name",
        "Week pass", "--price", "15.50", "--days", "7", "--by", "li")
    engine = make_engine(f"sqlite:///{cli.tmp}/var/backoffice.db")
    now = datetime.now(UTC)
    with engine.begin() as conn:
        order_id = orders.create_order(conn, operator="coachco", channel="sms", phone="13800138000", who="sms",
                                       items=[orders.ItemRequest("week", 2)], now=now)
        orders.mark_paid(conn, order_id, amount_fen=3100, payment_ref="PAY-CLI", who="platform", now=now)
        orders.issue_tickets(conn, order_id, keys=ticket_keys.published_test_keys(), who="sms", now=now)
    engine.dispose()
    shown = cli("ticket", "order", "show", order_id).stdout
    assert f"order {order_id} (coachco, sms, phone 13800138000): issued" in shown
    assert "total ¥31.00, paid ¥31.00, refunded ¥0.00; payment PAY-CLI" in shown
    assert "2 x week (day_pass)" in shown and shown.count(" day_pass issued, 0/unlimited used") == 2
    assert "-> created" in shown and "created -> paid" in shown and "paid -> issued" in shown
    # --codes: the pickup codes and QR texts to send again, made with the ticket keys (the published ones here)
    with_codes = cli("ticket", "order", "show", order_id, "--codes")
    master = ticket_keys.TEST_PICKUP_MASTER  # the operator's key derived here, apart from the code under test
    pickup_key = hmac.new(master, b"farebox-pickup-v1|coachco", hashlib.sha256).digest()
    for (ticket_id,) in cli.sql("SELECT ticket_id FROM ticket WHERE order_id = ?", order_id):
        code = ref_pickup_code(ticket_id, pickup_key)
        assert f"pickup code {code[:4]} {code[4:8]} {code[8:12]} {code[12:]}" in with_codes.stdout
    assert with_codes.stdout.count("    QR FT1.") == 2 and "INSECURE" in with_codes.stderr
    refused = cli("ticket", "order", "show", order_id, "--codes", ok=False, insecure=False)
    assert refused.returncode == 2 and "FAREBOX_TICKET_KEY" in refused.stderr and "FT1." not in refused.stdout
    missing = cli("ticket", "order", "show", "TK-NONE", ok=False)
    assert missing.returncode == 2 and "no ticket order 'TK-NONE'" in missing.stderr


def test_the_published_ticket_keys_are_refused_outside_tests_and_labs(tmp_path):
    with pytest.raises(ticket_keys.TicketKeysRefused) as refused:
        ticket_keys.load_ticket_keys(insecure_test_keys=False, environ={})
    assert ticket_keys.TICKET_KEY_ENV in str(refused.value) and ticket_keys.PICKUP_KEY_ENV in str(refused.value)
    seed_file, pickup_file = tmp_path / "seed.hex", tmp_path / "pickup.hex"
    seed_file.write_text(ticket_keys.TEST_TICKET_SEED.hex())
    pickup_file.write_text(os.urandom(32).hex())
    env = {ticket_keys.TICKET_KEY_ENV: str(seed_file), ticket_keys.PICKUP_KEY_ENV: str(pickup_file)}
    with pytest.raises(ticket_keys.TicketKeysRefused, match="seed.hex"):  # a file holding the published seed
        ticket_keys.load_ticket_keys(insecure_test_keys=False, environ=env)
    seed = os.urandom(32)
    seed_file.write_text(seed.hex())
    fresh = ticket_keys.load_ticket_keys(insecure_test_keys=False, environ=env | {ticket_keys.TICKET_KEY_ID_ENV: "7"})
    assert fresh.key_id == 7 and not fresh.is_test and seed.hex() not in repr(fresh)
    assert fresh.pickup_key("a") != fresh.pickup_key("b") and len(fresh.public_key()) == 32
    assert ticket_keys.load_ticket_keys(insecure_test_keys=True, environ={}).is_test


def test_fresh_ticket_keys_are_made_and_shown_without_their_secrets(cli, tmp_path):
    out = tmp_path / "ticket-keys"
    made = cli("ticket", "keys", "init", "--out", str(out), "--key-id", "3", insecure=False)
    seed = bytes.fromhex((out / "ticket-seed.hex").read_text())
    assert oct((out / "ticket-seed.hex").stat().st_mode & 0o777) == "0o600" and len(seed) == 32
    from reference_ticket import ref_keypair

    public = ref_keypair(seed)[1].hex()
    assert f"key id 3, public key {public}" in made.stdout
    again = cli("ticket", "keys", "init", "--out", str(out), ok=False)
    assert again.returncode == 2 and "nothing is overwritten" in again.stderr
    shown = cli("ticket", "keys", "show", insecure=False, env_more={
        "FAREBOX_TICKET_KEY": str(out / "ticket-seed.hex"), "FAREBOX_TICKET_KEY_ID": "3",
        "FAREBOX_TICKET_PICKUP_KEY": str(out / "ticket-pickup.hex")})
    assert shown.stdout.startswith(f"ticket key id 3, public key {public}") and seed.hex() not in shown.stdout


def test_farebox_serve_schedules_the_ticket_expiry_every_minute():
    from types import SimpleNamespace

    from apscheduler.schedulers.background import BackgroundScheduler

    from farebox.cli import build_parser
    from farebox.serve import SCHEDULED_JOBS

    from farebox.tickets_cmd import ticket_expiry_job

    build_parser()  # as `farebox serve` does: every command module imported, its jobs registered
    assert ticket_expiry_job in SCHEDULED_JOBS
    scheduler = BackgroundScheduler(timezone="UTC")
    engine = object()
    ticket_expiry_job(scheduler, SimpleNamespace(engine=engine))
    job = scheduler.get_job("tickets-expiry")
    assert job is not None and job.args == (engine,) and job.trigger.interval.total_seconds() == 60

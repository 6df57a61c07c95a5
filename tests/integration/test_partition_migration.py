"""Revision 2026_12_03_0026 moves an existing unpartitioned tap (and quarantine) into day partitions without losing
a row, and back on downgrade. A copy of every row's key and amount is taken before, in a table the migration does not
touch; after upgrade and after downgrade plain SQL joins it with the table row by row. Each row's day is checked
against Python's own computation (zoneinfo, not PostgreSQL's AT TIME ZONE the migration uses), also across a
daylight-saving change, and its partition by ``tableoid``.

Default: 300,000 taps (seconds). ``FAREBOX_SOAK=1``: 3,000,000 taps (the "few million rows" copy).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from backoffice.db import alembic_config, make_engine
from backoffice.models import tap_service_day

BEFORE, REVISION = "2026_12_03_0025", "2026_12_03_0026"
TAPS = 3_000_000 if os.environ.get("FAREBOX_SOAK") == "1" else 300_000
QUARANTINED = 20_000
START = datetime(2026, 10, 10, tzinfo=UTC)
SPAN_DAYS = 30  # over Berlin's change back from summer time (2026-10-25)
RULES = {"op_sh": ("Asia/Shanghai", 3), "op_be": ("Europe/Berlin", 4), "op_unknown": ("Asia/Shanghai", 3)}


def _migrate(engine, direction: str, target: str) -> None:
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, direction)(cfg, target)


def _fill(conn) -> None:
    """TAPS taps of three operators (one not in the registry: the default rule) over SPAN_DAYS, some claimed by a run;
    QUARANTINED quarantine rows, some without a sequence. All by INSERT ... SELECT generate_series."""
    for code, (tz, cutoff) in RULES.items():
        if code != "op_unknown":
            conn.execute(text("INSERT INTO operator (code, name, timezone, cutoff_hour) VALUES (:c, :c, :t, :h)"),
                         {"c": code, "t": tz, "h": cutoff})
    run = conn.execute(text(
        "INSERT INTO clearing_run (operator, service_day, created_at, as_of, rate_bp, tz, cutoff_hour, fingerprint, "
        "day_taps, day_gross, day_commission, day_net, late_taps, late_gross, late_commission, late_net, "
        "reconciliation_gross, reconciliation_commission, reconciliation_net) VALUES ('op_sh', '2026-10-11', now(), "
        "now(), 0, 'Asia/Shanghai', 3, 'x', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) RETURNING id")).scalar()
    step = SPAN_DAYS * 86400.0 / TAPS
    conn.execute(text(
        "INSERT INTO tap (device_id, device_seq, epoch, kind, occurred_at, received_at, operator, route, vehicle, "
        "driver, shift_no, card_asn, card_type, card_ttc, amount, balance_after, terminal_id, terminal_seq, tac, "
        "reason, clearing_run_id) "
        "SELECT 'dev' || (g % 997), g, g % 3, 'purchase', :start + make_interval(secs => g * :step), "
        ":start + make_interval(secs => g * :step + 60), "
        "CASE WHEN g % 101 = 0 THEN 'op_unknown' WHEN g % 2 = 0 THEN 'op_sh' ELSE 'op_be' END, 'r' || (g % 300), "
        "'v' || (g % 1000), 'd' || (g % 1500), 1, lpad(to_hex(g % 200000), 20, '0'), 1, g, 100 + g % 400, 5000, "
        "'010000000001', g, 'abcdef01', '', CASE WHEN g % 7 = 0 THEN :run END FROM generate_series(1, :n) AS g"),
        {"start": START, "step": step, "n": TAPS, "run": run})
    conn.execute(text(
        "INSERT INTO quarantine (received_at, topic, device_id, device_seq, reason, payload, status) "
        "SELECT :start + make_interval(secs => g * :step), 'fb/op_sh/dev/taps', 'dev' || (g % 97), "
        "CASE WHEN g % 10 = 0 THEN NULL ELSE g END, 'reason ' || (g % 5), decode(lpad(to_hex(g), 8, '0'), 'hex'), "
        "'open' FROM generate_series(1, :n) AS g"),
        {"start": START, "step": SPAN_DAYS * 86400.0 / QUARANTINED, "n": QUARANTINED})
    # Copies of what must survive, in tables the migration leaves alone.
    conn.execute(text("CREATE TABLE expect_tap AS SELECT id, device_id, epoch, device_seq, amount, occurred_at, "
                      "operator, clearing_run_id FROM tap"))
    conn.execute(text("CREATE TABLE expect_quarantine AS SELECT id, device_id, device_seq, reason, payload, "
                      "received_at FROM quarantine"))


def _missing(conn) -> dict[str, int]:
    """Rows of the copies not found in the tables with the same key and content, and rows of the tables not in the
    copies (a FULL JOIN each way, plain SQL)."""
    tap = conn.execute(text(
        "SELECT count(*) FROM expect_tap e FULL JOIN tap t ON t.id = e.id AND t.device_id = e.device_id AND "
        "t.epoch = e.epoch AND t.device_seq = e.device_seq AND t.amount = e.amount AND "
        "t.occurred_at = e.occurred_at AND t.operator = e.operator AND "
        "t.clearing_run_id IS NOT DISTINCT FROM e.clearing_run_id WHERE t.id IS NULL OR e.id IS NULL")).scalar()
    quarantine = conn.execute(text(
        "SELECT count(*) FROM expect_quarantine e FULL JOIN quarantine q ON q.id = e.id AND "
        "q.device_id = e.device_id AND q.device_seq IS NOT DISTINCT FROM e.device_seq AND q.reason = e.reason AND "
        "q.payload = e.payload AND q.received_at = e.received_at WHERE q.id IS NULL OR e.id IS NULL")).scalar()
    return {"tap": tap, "quarantine": quarantine}


def _sums(conn, table: str) -> tuple:
    return tuple(conn.execute(text(f"SELECT count(*), coalesce(sum(amount), 0) FROM {table}")).one())


def test_upgrade_moves_every_row_into_day_partitions_and_downgrade_moves_them_back(pg_schema_url):
    engine = make_engine(pg_schema_url)
    try:
        _migrate(engine, "upgrade", BEFORE)
        with engine.begin() as conn:
            _fill(conn)
            max_id = conn.execute(text("SELECT max(id) FROM tap")).scalar()
        started = time.perf_counter()
        _migrate(engine, "upgrade", REVISION)
        print(f"\nupgrade of {TAPS:,} taps and {QUARANTINED:,} quarantine rows: {time.perf_counter() - started:.1f} s")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT relkind FROM pg_class WHERE relname = 'tap'")).scalar() == "p"
            assert _missing(conn) == {"tap": 0, "quarantine": 0}
            assert _sums(conn, "tap") == _sums(conn, "expect_tap") == (TAPS, sum(100 + g % 400
                                                                                 for g in range(1, TAPS + 1)))
            # each row's day as Python computes it (zoneinfo), beside what the migration stored
            want = Counter(tap_service_day(at, *RULES[op]) for at, op in conn.execute(text(
                "SELECT occurred_at, operator FROM expect_tap")))
            got = Counter({day: n for day, n in conn.execute(text(
                "SELECT service_day, count(*) FROM tap GROUP BY 1"))})
            assert got == want
            # every row in its own day's partition (none left in DEFAULT), and one partition per day present
            assert conn.execute(text(
                "SELECT count(*) FROM tap WHERE tableoid::regclass::text <> 'tap_' || to_char(service_day, "
                "'YYYY_MM_DD')")).scalar() == 0
            assert conn.execute(text("SELECT count(*) FROM tap_default")).scalar() == 0
            assert conn.execute(text(
                "SELECT count(*) FROM quarantine WHERE received_day <> (received_at AT TIME ZONE 'UTC')::date OR "
                "tableoid::regclass::text <> 'quarantine_' || to_char(received_day, 'YYYY_MM_DD')")).scalar() == 0
            keys = {r[0]: r[1] for r in conn.execute(text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'tap'::regclass"))}
            assert keys["tap_pkey"] == "PRIMARY KEY (id, service_day)"
            assert keys["uq_tap_device_epoch_seq"] == "UNIQUE (device_id, epoch, device_seq, service_day)"
            assert "fk_tap_clearing_run" in keys
            indexes = {r[0] for r in conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'tap'"))}
            assert {"ix_tap_card_ttc", "ix_tap_occurred_at", "ix_tap_clearing_run_id"} <= indexes
        with engine.begin() as conn:  # the ids go on from the same sequence
            new_id = conn.execute(text(
                "INSERT INTO tap (device_id, device_seq, kind, occurred_at, received_at, operator, route, vehicle, "
                "driver, shift_no, card_asn, card_type, card_ttc, amount, balance_after, terminal_id, terminal_seq, "
                "tac, reason, service_day) VALUES ('devx', 1, 'purchase', now(), now(), 'op_sh', 'r', 'v', 'd', 1, "
                "'00', 1, 1, 0, 0, '0', 0, '0', '', current_date) RETURNING id")).scalar()
            assert new_id > max_id
            conn.execute(text("DELETE FROM tap WHERE id = :i"), {"i": new_id})
        started = time.perf_counter()
        _migrate(engine, "downgrade", BEFORE)
        print(f"downgrade: {time.perf_counter() - started:.1f} s")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT relkind FROM pg_class WHERE relname = 'tap'")).scalar() == "r"
            assert _missing(conn) == {"tap": 0, "quarantine": 0}
            assert _sums(conn, "tap") == _sums(conn, "expect_tap")
            columns = {r[0] for r in conn.execute(text(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'tap'"))}
            assert "service_day" not in columns
            keys = {r[0]: r[1] for r in conn.execute(text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'tap'::regclass"))}
            assert keys["tap_pkey"] == "PRIMARY KEY (id)"
            assert keys["uq_tap_device_epoch_seq"] == "UNIQUE (device_id, epoch, device_seq)"
            assert conn.execute(text("SELECT count(*) FROM pg_class WHERE relname LIKE 'tap\\_2026\\_%'")).scalar() == 0
    finally:
        engine.dispose()


def test_downgrade_is_refused_while_days_are_in_the_archive(pg_schema_url):
    from backoffice import partitions

    engine = make_engine(pg_schema_url)
    try:
        _migrate(engine, "upgrade", REVISION)
        day = datetime.now(UTC).date()
        with engine.begin() as conn:
            partitions.detach(conn, "tap", day)
        with pytest.raises(RuntimeError, match="attach them first"):
            _migrate(engine, "downgrade", BEFORE)
        with engine.begin() as conn:
            partitions.attach(conn, "tap", day)
        _migrate(engine, "downgrade", BEFORE)
    finally:
        engine.dispose()


def test_sqlite_gets_the_columns_filled_and_back(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    try:
        _migrate(engine, "upgrade", BEFORE)
        start = START + timedelta(days=14, hours=20)  # around Berlin's change back (Oct 25th, 01:00 UTC)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO operator (code, name, timezone, cutoff_hour) VALUES "
                              "('op_be', 'B', 'Europe/Berlin', 4)"))
            rows = [{"s": s, "at": start + timedelta(minutes=7 * s), "op": ("op_be", "op_unknown")[s % 2]}
                    for s in range(1, 2001)]
            conn.execute(text(
                "INSERT INTO tap (device_id, device_seq, epoch, kind, occurred_at, received_at, operator, route, "
                "vehicle, driver, shift_no, card_asn, card_type, card_ttc, amount, balance_after, terminal_id, "
                "terminal_seq, tac, reason) VALUES ('dev1', :s, 0, 'purchase', :at, :at, :op, 'r', 'v', 'd', 1, "
                "'00', 1, :s, :s, 0, '0', 0, '0', '')"), rows)
            conn.execute(text("INSERT INTO quarantine (received_at, topic, device_id, device_seq, reason, payload) "
                              "VALUES (:at, 't', 'dev1', :s, 'r', x'00')"), rows[:50])
        _migrate(engine, "upgrade", REVISION)
        with engine.connect() as conn:
            got = {r[0]: r[1] for r in conn.execute(text("SELECT device_seq, service_day FROM tap"))}
            assert got == {r["s"]: tap_service_day(r["at"], *(("Europe/Berlin", 4) if r["op"] == "op_be"
                                                            else ("Asia/Shanghai", 3))).isoformat() for r in rows}
            assert conn.execute(text("SELECT count(*), sum(amount) FROM tap")).one() == (2000, sum(range(1, 2001)))
            assert conn.execute(text("SELECT count(*) FROM quarantine WHERE received_day = date(received_at)")
                                ).scalar() == 50
        _migrate(engine, "downgrade", BEFORE)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*), sum(amount) FROM tap")).one() == (2000, sum(range(1, 2001)))
            assert "service_day" not in {r[1] for r in conn.execute(text("PRAGMA table_info(tap)"))}
    finally:
        engine.dispose()

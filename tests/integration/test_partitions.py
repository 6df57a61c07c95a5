"""tap and quarantine partitioned by day on PostgreSQL (backoffice.partitions, revision 0026), through real ingest:
a batch resent (also after its day's partition was made out of DEFAULT, detached to the archive, attached again)
is stored once; a late tap lands in its own day's partition (``tableoid::regclass``); the operator's day rule is
frozen under stored taps; the card counter look-up spans partitions; detach refuses a day not cleared; the CLI
says what it did. Every figure is read back with plain SQL."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import pytest
from reference_crypto import ref_purchase_tac
from sqlalchemy import text
from sqlalchemy.engine import make_url

from backoffice import partitions, registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest import DeviceDirectory, ingest_batch
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord

OP, DEV, TERMINAL = "op_p", "dev_p1", "010000000001"
DAY = date(2026, 11, 2)  # an old day: no partition until one is made (the migration makes the days near today)
# 2026-11-02 03:00 Asia/Shanghai (the operator's cut-off) is 2026-11-01 19:00 UTC.
START = datetime(2026, 11, 1, 19, 0, tzinfo=UTC)


def purchase(seq: int, at: datetime, amount: int = 200, asn: str = "01020304050607080910", ttc: int | None = None,
             device: str = DEV) -> TapRecord:
    tseq = 1000 + seq
    return TapRecord(device_id=device, device_seq=seq, kind=RecordKind.PURCHASE, occurred_at=at, operator=OP,
                     route="r1", vehicle="b1", driver="d1", shift_no=1, card_asn=asn, card_type=1,
                     card_ttc=seq if ttc is None else ttc, amount=amount, balance_after=5000, terminal_id=TERMINAL,
                     terminal_seq=tseq, tac=ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(asn), amount,
                                                             bytes.fromhex(TERMINAL), tseq, at).hex())


def day_batch(day: date, seqs, hour: float = 2.0) -> list[TapRecord]:
    """Purchases at ``hour`` hours after the day's start (the day runs 24 h from 03:00 local)."""
    start = START + timedelta(days=(day - DAY).days, hours=hour)
    return [purchase(s, start + timedelta(seconds=s)) for s in seqs]


TEST_DB_PREFIX = "farebox_t_"  # as tests/conftest.py names them (orphans of dead runs are dropped by it)


def _libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def migrated(pg_url):
    """A database migrated once for the module, copied for each test (CREATE DATABASE ... TEMPLATE): the
    migrations take seconds, a copy a fraction of one."""
    import psycopg

    name = f"{TEST_DB_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(_libpq_url(pg_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    engine = make_engine(_with_database(pg_url, name))
    upgrade(engine)
    engine.dispose()
    yield name
    with psycopg.connect(_libpq_url(pg_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_schema_url(pg_url, migrated):
    import psycopg

    name = f"{TEST_DB_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(_libpq_url(pg_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{migrated}"')
    yield _with_database(pg_url, name)
    with psycopg.connect(_libpq_url(pg_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(pg_schema_url):
    engine = make_engine(pg_schema_url)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Partition Bus")  # Asia/Shanghai, cut-off 03:00
        registry.add_device(conn, device_id=DEV, operator=OP, vehicle=None, terminal_id=TERMINAL)
        registry.add_device(conn, device_id="dev_p2", operator=OP, vehicle=None, terminal_id="010000000002")
    yield engine
    engine.dispose()


def ingest(engine, records, now: datetime | None = None, device: str = DEV):
    payload = codec.encode_batch(records, key=mac_key(TEST_DEVICE_MASTER, device))
    with engine.begin() as conn:
        return ingest_batch(conn, topics.taps(OP, device), payload, keys=TEST_ISSUER_KEYS,
                            master=TEST_DEVICE_MASTER, devices=DeviceDirectory(), now=now)


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def read(engine, fn, *args, **kw):
    with engine.connect() as conn:  # closed at once: an open read would hold tap's locks against the next DDL
        return fn(conn, *args, **kw)


def where_stored(engine) -> dict[tuple[int, date], str]:
    """(device_seq, service_day) -> the partition holding the row, by tableoid."""
    return {(r[0], r[1]): r[2] for r in sql(engine, "SELECT device_seq, service_day, tableoid::regclass::text "
                                                    "FROM tap")}


def test_service_day_is_the_operators_day_and_a_resend_is_stored_once(engine):
    # 02:30 local on Nov 3rd is before the cut-off: service day Nov 2nd; 03:30 local: Nov 3rd.
    before_cutoff = purchase(1, datetime(2026, 11, 2, 18, 30, tzinfo=UTC))
    after_cutoff = purchase(2, datetime(2026, 11, 2, 19, 30, tzinfo=UTC))
    first = ingest(engine, [before_cutoff, after_cutoff])
    assert (first.stored, first.duplicates) == (2, 0)
    again = ingest(engine, [before_cutoff, after_cutoff])
    assert (again.stored, again.duplicates) == (0, 2)
    # the day as plain SQL computes it from the operator row, beside what ingest stored
    rows = sql(engine, "SELECT t.device_seq, t.service_day, ((t.occurred_at AT TIME ZONE o.timezone) "
                       "- make_interval(hours => o.cutoff_hour))::date FROM tap t JOIN operator o ON o.code = t.operator "
                       "ORDER BY 1")
    assert [(r[0], r[1]) for r in rows] == [(1, DAY), (2, DAY + timedelta(days=1))]
    assert all(r[1] == r[2] for r in rows)
    assert set(where_stored(engine).values()) == {"tap_default"}  # no partition for these old days yet


def test_late_tap_lands_in_its_own_days_partition(engine):
    with engine.begin() as conn:
        partitions.make_day(conn, "tap", DAY)
        partitions.make_day(conn, "tap", DAY + timedelta(days=1))
    ingest(engine, day_batch(DAY + timedelta(days=1), range(1, 4)), now=START + timedelta(days=1, hours=5))
    late = day_batch(DAY, [10], hour=23.5)  # a tap of the 2nd at 02:30 on the 3rd, uploaded on the 3rd
    result = ingest(engine, late, now=START + timedelta(days=1, hours=6))
    assert result.stored == 1
    assert where_stored(engine) == {(1, DAY + timedelta(days=1)): "tap_2026_11_03",
                                    (2, DAY + timedelta(days=1)): "tap_2026_11_03",
                                    (3, DAY + timedelta(days=1)): "tap_2026_11_03", (10, DAY): "tap_2026_11_02"}


def test_resend_after_the_days_partition_was_made_out_of_default(engine):
    batch = day_batch(DAY, range(1, 21))
    assert ingest(engine, batch).stored == 20
    assert set(where_stored(engine).values()) == {"tap_default"}
    made = partitions.make(engine, today=DAY + timedelta(days=30), ahead=1)  # DAY found in DEFAULT
    assert [m.name for m in made if m.day == DAY] == ["tap_2026_11_02"]
    assert [m.moved for m in made if m.day == DAY] == [20]
    assert set(where_stored(engine).values()) == {"tap_2026_11_02"}
    assert sql(engine, "SELECT count(*) FROM tap_default") == [(0,)]
    again = ingest(engine, batch)
    assert (again.stored, again.duplicates) == (0, 20)
    assert sql(engine, "SELECT count(*), sum(amount) FROM tap") == [(20, 20 * 200)]
    # made ahead: the day before "today" to one day after, each with its partition
    have = read(engine, partitions.attached, "tap")
    assert {DAY + timedelta(days=n) for n in (29, 30, 31)} <= set(have)


def test_detach_refuses_uncleared_then_archives_and_a_resend_is_not_stored_again(engine):
    batch = day_batch(DAY, range(1, 11))
    with engine.begin() as conn:
        partitions.make_day(conn, "tap", DAY)
    assert ingest(engine, batch).stored == 10
    with engine.begin() as conn, pytest.raises(partitions.PartitionError) as refused:
        partitions.detach(conn, "tap", DAY)
    assert "10 of the 10 taps of 2026-11-02 are not cleared" in str(refused.value)
    assert f"farebox settle --operator {OP} --day 2026-11-02" in str(refused.value)
    assert "--force" in str(refused.value)
    with engine.begin() as conn:  # cleared: a run took them (as clearing_runs would write it)
        run = conn.execute(text(
            "INSERT INTO clearing_run (operator, service_day, created_at, as_of, rate_bp, tz, cutoff_hour, "
            "fingerprint, day_taps, day_gross, day_commission, day_net, late_taps, late_gross, late_commission, "
            "late_net, reconciliation_gross, reconciliation_commission, reconciliation_net) VALUES (:o, :d, now(), "
            "now(), 0, 'Asia/Shanghai', 3, 'x', 10, 2000, 0, 2000, 0, 0, 0, 0, 0, 0, 0) RETURNING id"),
            {"o": OP, "d": DAY}).scalar()
        conn.execute(text("UPDATE tap SET clearing_run_id = :r WHERE service_day = :d"), {"r": run, "d": DAY})
    with engine.begin() as conn:
        done = partitions.detach(conn, "tap", DAY)
    assert (done.rows, done.amount, done.open, done.where) == (10, 2000, 0, "archive.tap_2026_11_02")
    assert sql(engine, "SELECT count(*) FROM tap WHERE service_day = :d", d=DAY) == [(0,)]
    assert sql(engine, "SELECT count(*), sum(amount) FROM archive.tap_2026_11_02") == [(10, 2000)]
    # the bus never got its ack and sends the batch again, after the day went to the archive
    again = ingest(engine, batch)
    assert (again.stored, again.duplicates) == (0, 10)
    assert sql(engine, "SELECT count(*) FROM tap") == [(0,)]
    # a genuinely late tap of the archived day is kept (in DEFAULT) and merged when the day comes back
    late = day_batch(DAY, [11], hour=23)
    assert ingest(engine, late).stored == 1
    assert where_stored(engine) == {(11, DAY): "tap_default"}
    listed = {(r.state, r.where): r for r in read(engine, partitions.listing, "tap", exact=True)}
    assert listed[("archived", "archive.tap_2026_11_02")].rows == 10
    assert listed[("default", "tap_default")].rows == 1
    # make leaves an archived day alone (a fresh empty partition would let resends in) and names it
    assert DAY not in {m.day for m in partitions.make(engine, today=DAY + timedelta(days=40), ahead=0)}
    with engine.begin() as conn:
        back, moved = partitions.attach(conn, "tap", DAY)
    assert (back.rows, moved, back.where) == (11, 1, "tap_2026_11_02")
    assert set(where_stored(engine).values()) == {"tap_2026_11_02"}
    assert sql(engine, "SELECT to_regclass('archive.tap_2026_11_02') IS NULL") == [(True,)]
    again = ingest(engine, batch + late)
    assert (again.stored, again.duplicates) == (0, 11)
    assert sql(engine, "SELECT count(*), sum(amount) FROM tap") == [(11, 2200)]


def test_forced_detach_of_a_range_and_errors_that_say_what_to_do(engine):
    for d in (DAY, DAY + timedelta(days=1)):
        with engine.begin() as conn:
            partitions.make_day(conn, "tap", d)
    ingest(engine, day_batch(DAY, range(1, 4)) + day_batch(DAY + timedelta(days=1), range(4, 6)))
    for d in partitions.days_between(DAY, DAY + timedelta(days=1)):
        with engine.begin() as conn:
            partitions.detach(conn, "tap", d, force=True)
    assert {r.day: (r.state, r.rows) for r in read(engine, partitions.listing, exact=True)
            if r.day in (DAY, DAY + timedelta(days=1))} == {DAY: ("archived", 3), DAY + timedelta(days=1):
                                                          ("archived", 2)}
    with engine.begin() as conn, pytest.raises(partitions.PartitionError, match="archived already"):
        partitions.detach(conn, "tap", DAY)
    with engine.begin() as conn, pytest.raises(partitions.PartitionError, match="attach it"):
        partitions.make_day(conn, "tap", DAY)
    with engine.begin() as conn, pytest.raises(partitions.PartitionError, match="is not in the archive"):
        partitions.attach(conn, "tap", DAY + timedelta(days=300))


def test_the_day_rule_is_frozen_once_the_operator_has_taps(engine):
    with engine.begin() as conn:  # no taps yet: the rule may still change
        assert registry.edit_operator(conn, code=OP, by="t", cutoff_hour=4)
        registry.edit_operator(conn, code=OP, by="t", cutoff_hour=3)
    ingest(engine, day_batch(DAY, [1]))
    for change in ({"cutoff_hour": 4}, {"timezone": "Europe/Berlin"}):
        with engine.begin() as conn, pytest.raises(registry.RegistryError, match="has stored taps"):
            registry.edit_operator(conn, code=OP, by="t", **change)
    with engine.begin() as conn:  # the name still changes, and giving the same rule is no change
        assert registry.edit_operator(conn, code=OP, by="t", name="Renamed Bus", cutoff_hour=3)
    assert sql(engine, "SELECT timezone, cutoff_hour FROM operator WHERE code = :c", c=OP) == [("Asia/Shanghai", 3)]


def test_the_day_rule_is_frozen_on_sqlite_too(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Partition Bus")
        registry.add_device(conn, device_id=DEV, operator=OP, vehicle=None, terminal_id=TERMINAL)
    batch = day_batch(DAY, [1, 2])
    assert ingest(engine, batch).stored == 2
    assert ingest(engine, batch).duplicates == 2
    assert sql(engine, "SELECT DISTINCT service_day FROM tap") == [("2026-11-02",)]
    with engine.begin() as conn, pytest.raises(registry.RegistryError, match="has stored taps"):
        registry.edit_operator(conn, code=OP, by="t", timezone="Asia/Tokyo")
    engine.dispose()


def test_card_counter_look_up_spans_partitions(engine):
    with engine.begin() as conn:
        for d in (DAY, DAY + timedelta(days=1)):
            partitions.make_day(conn, "tap", d)
    first = purchase(1, START + timedelta(hours=2), asn="0a0b0c0d0e0f10111213", ttc=77)
    assert ingest(engine, [first]).stored == 1
    # the same card counter a day later from another bus: another partition, found all the same
    clone = purchase(1, START + timedelta(days=1, hours=2), asn="0a0b0c0d0e0f10111213", ttc=77, device="dev_p2")
    clone = dataclasses.replace(clone, terminal_id="010000000002")
    clone = dataclasses.replace(clone, tac=ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(clone.card_asn),
                                                            200, bytes.fromhex("010000000002"), clone.terminal_seq,
                                                            clone.occurred_at).hex())
    result = ingest(engine, [clone], device="dev_p2")
    assert (result.stored, result.fraud) == (0, 1)
    assert sql(engine, "SELECT count(*) FROM fraud_flag WHERE card_asn = '0a0b0c0d0e0f10111213'") == [(1,)]


def test_quarantine_is_partitioned_by_received_day_and_a_resend_next_day_is_kept_once(engine):
    forged = dataclasses.replace(day_batch(DAY, [1])[0], tac="00000000")
    ingest(engine, [forged], now=datetime(2026, 11, 2, 12, tzinfo=UTC))
    ingest(engine, [forged], now=datetime(2026, 11, 3, 12, tzinfo=UTC))  # resent the next day
    rows = sql(engine, "SELECT received_day, tableoid::regclass::text FROM quarantine")
    assert rows == [(date(2026, 11, 2), "quarantine_default")]
    made = partitions.make(engine, today=date(2026, 11, 10), ahead=0, tables=("quarantine",))
    assert [m.moved for m in made if m.day == date(2026, 11, 2)] == [1]
    ingest(engine, [forged], now=datetime(2026, 11, 4, 12, tzinfo=UTC))
    assert sql(engine, "SELECT count(*), min(tableoid::regclass::text) FROM quarantine") == [(1, "quarantine_2026_11_02")]
    with engine.begin() as conn, pytest.raises(partitions.PartitionError, match="still open"):
        partitions.detach(conn, "quarantine", date(2026, 11, 2))


def test_make_names_days_it_leaves_in_default(engine, caplog):
    far = day_batch(DAY, [1])  # a bus whose clock is off by years
    far[0] = purchase(1, datetime(2019, 5, 1, 6, tzinfo=UTC))
    ingest(engine, far)
    with caplog.at_level(logging.WARNING, logger="backoffice.partitions"):
        partitions.make(engine, today=DAY, ahead=0)
    assert "tap_default holds rows of days without a partition: 2019-05-01: 1 row(s), no partition made" in caplog.text


def test_scheduler_registers_the_daily_make(engine, tmp_path):
    from backoffice.scheduler import start_scheduler, stop_scheduler
    from farebox.config import Settings

    scheduler = start_scheduler(engine, Settings(var_dir=tmp_path), paused=True)
    try:
        job = scheduler.get_job("partitions:make")
        assert job is not None and job.func is partitions.scheduled_make
    finally:
        stop_scheduler(scheduler)


def farebox(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAREBOX_DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "farebox.cli", "partitions", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_list_make_detach_attach(engine, pg_schema_url):
    ingest(engine, day_batch(DAY, range(1, 6)))
    listed = farebox(pg_schema_url, "list", "--exact")
    assert listed.returncode == 0, listed.stderr
    assert "2026-11-02  default   tap_default" in listed.stdout and "5 row(s) in tap_default over 1 day(s)" in \
        listed.stdout
    made = farebox(pg_schema_url, "make")
    assert made.returncode == 0, made.stderr
    assert "made tap_2026_11_02, 5 row(s) moved out of tap_default" in made.stdout
    refused = farebox(pg_schema_url, "detach", "2026-11-02")
    assert refused.returncode == 1 and "not cleared" in refused.stderr and "--force" in refused.stderr
    done = farebox(pg_schema_url, "detach", "2026-11-02", "--force")
    assert done.returncode == 0, done.stderr
    assert "detached 2026-11-02: 5 row(s), 10.00 yuan (5 not cleared, forced) now in archive.tap_2026_11_02" in \
        done.stdout
    back = farebox(pg_schema_url, "attach", "2026-11-02")
    assert back.returncode == 0, back.stderr
    assert "attached 2026-11-02: 5 row(s) in tap_2026_11_02" in back.stdout
    assert sql(engine, "SELECT count(*), sum(amount) FROM tap_2026_11_02") == [(5, 1000)]


def test_same_key_with_other_content_on_another_day_is_a_conflict_not_a_second_row(engine):
    with engine.begin() as conn:
        for d in (DAY, DAY + timedelta(days=1)):
            partitions.make_day(conn, "tap", d)
    original = day_batch(DAY, [5])
    assert ingest(engine, original).stored == 1
    # the same device key (journal 0, seq 5) with another time, a day later: a journal replaced without a new epoch
    replaced = day_batch(DAY + timedelta(days=1), [5])
    result = ingest(engine, replaced)
    assert (result.stored, result.duplicates, result.quarantined) == (0, 0, 1)
    assert sql(engine, "SELECT count(*) FROM tap WHERE device_id = :d AND device_seq = 5", d=DEV) == [(1,)]
    reasons = [r[0] for r in sql(engine, "SELECT reason FROM quarantine")]
    assert len(reasons) == 1 and reasons[0].startswith("conflict: device dev_p1 journal 0 seq 5") and \
        "occurred_at" in reasons[0]
    # both in one message: the first is stored, the second held
    both = ingest(engine, day_batch(DAY, [6]) + day_batch(DAY + timedelta(days=1), [6]))
    assert (both.stored, both.quarantined) == (1, 1)

"""Which taps a clearing run takes (backoffice.clearing_runs.claim_taps), on SQLite and PostgreSQL: a tap committed
just after a run started lands in the next run, a tap received exactly at a run's ``as_of`` goes to the next run, a
tap at exactly the 03:00:00 cut-off belongs to the day that starts then, and the runs stored before revision 0012
get their taps by the rule they were made with. Every check counts with plain SQL over the tap table, not with
clearing's code. The same under load, with ingest and several runs racing: tests/reliability/test_clearing_race.py.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import inspect, text

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Tap

OP = "op_claim"
DAY = date(2026, 3, 5)
START = datetime(2026, 3, 4, 19, 0, tzinfo=UTC)  # 03:00:00 Asia/Shanghai on DAY
NEXT = START + timedelta(days=1)  # 03:00:00 on DAY + 1: DAY's end, the next day's first moment


def _setup(engine) -> None:
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Claim Bus")
        registry.add_vehicle(conn, code="V1", operator=OP, plate="A-V1")
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    engine = make_engine(url)
    _setup(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_schema_url):
    engine = make_engine(pg_schema_url)
    _setup(engine)
    yield engine
    engine.dispose()


def tap(seq: int, *, at: datetime, received: datetime, amount: int = 200, kind: str = "purchase",
        device: str = "VAL1") -> dict:
    return {"device_id": device, "device_seq": seq, "kind": kind, "occurred_at": at, "received_at": received,
            "operator": OP, "route": "R1", "vehicle": "V1", "driver": "D1", "shift_no": 1,
            "card_asn": f"{seq:020X}", "card_type": 1, "card_ttc": seq, "amount": amount, "balance_after": 1000,
            "terminal_id": "010000000001", "terminal_seq": 5000 + seq, "tac": f"{seq:08X}", "reason": ""}


def store(engine, rows) -> None:
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), rows)


def counted_by_runs(engine) -> tuple[int, int]:
    """(taps, gross) over every stored run, day and late sections together."""
    with engine.connect() as conn:
        row = conn.execute(text("SELECT COALESCE(SUM(day_taps + late_taps), 0), "
                                "COALESCE(SUM(day_gross + late_gross), 0) FROM clearing_run")).one()
    return int(row[0]), int(row[1])


def purchases(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM tap WHERE kind = 'purchase'")).one()
    return int(row[0]), int(row[1])


def run_of(engine, device_seq: int) -> int | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT clearing_run_id FROM tap_claimed WHERE device_seq = :s"), {"s": device_seq}).scalar()


def test_a_tap_committed_just_after_a_run_started_lands_in_the_next_run(pg_engine):
    """The hole: ingest stamps received_at, the run reads the table, ingest commits. The run did not see the tap,
    and on 846ff19 the next run took only taps received at or after the first run's as_of: the tap was in neither."""
    engine = pg_engine
    as_of = NEXT + timedelta(hours=1)
    store(engine, [tap(1, at=START + timedelta(hours=2), received=START + timedelta(hours=2, minutes=1))])
    ingest = engine.connect()
    try:
        slow = ingest.begin()
        ingest.execute(Tap.__table__.insert(), [tap(2, at=START + timedelta(hours=23, minutes=50), amount=300,
                                                    received=as_of - timedelta(seconds=1))])
        with engine.begin() as conn:  # the run starts and commits while ingest's transaction is still open
            first = cr.clear_day(conn, operator=OP, day=DAY, now=as_of)
        slow.commit()
    finally:
        ingest.close()
    with engine.begin() as conn:
        second = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=as_of + timedelta(days=1))
    assert first.totals["day_taps"] == 1
    assert counted_by_runs(engine) == purchases(engine) == (2, 500), "a tap fell between two runs"
    assert second.totals["late_taps"] == 1 and second.totals["late_gross"] == 300
    assert (run_of(engine, 1), run_of(engine, 2)) == (first.id, second.id)


def test_a_tap_received_exactly_at_as_of_goes_to_the_next_run_only(engine):
    as_of = NEXT + timedelta(hours=1)
    store(engine, [tap(1, at=START + timedelta(hours=2), received=as_of - timedelta(microseconds=1)),
                   tap(2, at=START + timedelta(hours=3), received=as_of, amount=300)])
    with engine.begin() as conn:
        first = cr.clear_day(conn, operator=OP, day=DAY, now=as_of)
        second = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=as_of + timedelta(days=1))
    assert (first.totals["day_taps"], first.totals["day_gross"], first.totals["late_taps"]) == (1, 200, 0)
    assert (second.totals["late_taps"], second.totals["late_gross"], second.totals["day_taps"]) == (1, 300, 0)
    assert (run_of(engine, 1), run_of(engine, 2)) == (first.id, second.id)
    assert counted_by_runs(engine) == purchases(engine)


def test_a_tap_at_exactly_the_cut_off_belongs_to_the_day_that_starts_then(engine):
    store(engine, [tap(1, at=START, received=START + timedelta(minutes=1)),  # DAY's first moment
                   tap(2, at=START - timedelta(microseconds=1), received=START),  # the day before's last
                   tap(3, at=NEXT, received=NEXT + timedelta(minutes=1), amount=300),  # DAY + 1's first moment
                   tap(4, at=NEXT - timedelta(seconds=1), received=NEXT, amount=70)])  # DAY's last second
    with engine.begin() as conn:
        first = cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(hours=1))
        second = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=NEXT + timedelta(days=1, hours=1))
    assert (first.totals["day_taps"], first.totals["day_gross"]) == (2, 270)  # taps 1 and 4
    assert (first.totals["late_taps"], first.totals["late_gross"]) == (1, 200)  # tap 2: the first run's backlog
    assert (second.totals["day_taps"], second.totals["day_gross"], second.totals["late_taps"]) == (1, 300, 0)
    assert [run_of(engine, s) for s in (1, 2, 3, 4)] == [first.id, first.id, second.id, first.id]
    assert counted_by_runs(engine) == purchases(engine) == (4, 770)


def test_every_kind_of_record_is_claimed_once_and_a_later_day_is_left_alone(engine):
    store(engine, [tap(1, at=START + timedelta(hours=1), received=START + timedelta(hours=1), kind="shift_open",
                       amount=0),
                   tap(2, at=START + timedelta(hours=2), received=START + timedelta(hours=2)),
                   tap(3, at=NEXT + timedelta(hours=2), received=NEXT + timedelta(hours=2))])  # tomorrow's
    with engine.begin() as conn:
        first = cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(hours=3))
        again = cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(days=2))  # a re-clear claims nothing
    assert again.recleared and again.fingerprint == first.fingerprint
    assert [run_of(engine, s) for s in (1, 2, 3)] == [first.id, first.id, None]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_runs_stored_before_revision_0012_get_their_taps_by_the_rule_they_were_made_with(request, backend):
    """Upgrade a database holding two runs made by 846ff19's rule (received before as_of; late taps received since
    the previous run's as_of): the taps go to those runs, each run's stored totals are the sums of the taps it now
    names, and a tap no run had taken yet is left for the next one."""
    from alembic import command

    from backoffice.db import alembic_config

    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_schema_url")
    engine = make_engine(url)
    cfg = alembic_config(url)
    first_as_of, second_as_of = NEXT + timedelta(hours=1), NEXT + timedelta(days=1, hours=1)
    rows = [tap(1, at=START + timedelta(hours=2), received=START + timedelta(hours=2)),  # day 1
            tap(2, at=START + timedelta(hours=22), received=first_as_of + timedelta(hours=2), amount=300),  # late
            tap(3, at=NEXT + timedelta(hours=2), received=NEXT + timedelta(hours=2), amount=150),  # day 2
            tap(4, at=NEXT + timedelta(hours=3), received=second_as_of + timedelta(minutes=5), amount=80)]  # after
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "2026_11_22_0010")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO operator (code, name, timezone, cutoff_hour) "
                              "VALUES (:c, 'Old', 'Asia/Shanghai', 3)"), {"c": OP})
            cols = [c for c in rows[0]]
            conn.execute(text(f"INSERT INTO tap ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"),
                         rows)
            for day, as_of, carried, taps_, gross, late_taps, late_gross, fp in (
                    (DAY, first_as_of, None, 1, 200, 0, 0, "a"),
                    (DAY + timedelta(days=1), second_as_of, first_as_of, 1, 150, 1, 300, "b")):
                conn.execute(text(
                    "INSERT INTO clearing_run (operator, service_day, created_at, as_of, carried_from, rate_bp, tz, "
                    "cutoff_hour, fingerprint, day_taps, day_gross, day_commission, day_net, late_taps, late_gross, "
                    "late_commission, late_net, reconciliation_gross, reconciliation_commission, "
                    "reconciliation_net) VALUES (:op, :day, :as_of, :as_of, :carried, 60, 'Asia/Shanghai', 3, :fp, "
                    ":t, :g, 0, :g, :lt, :lg, 0, :lg, 0, 0, 0)"),
                    {"op": OP, "day": day, "as_of": as_of, "carried": carried, "fp": fp, "t": taps_, "g": gross,
                     "lt": late_taps, "lg": late_gross})
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "2026_12_03_0012")
        with engine.connect() as conn:
            got = dict(conn.execute(text("SELECT t.device_seq, r.service_day FROM tap t "
                                         "LEFT JOIN clearing_run r ON r.id = t.clearing_run_id")).all())
        got = {k: None if v is None else date.fromisoformat(str(v)) for k, v in got.items()}  # SQLite: text
        assert got == {1: DAY, 2: DAY + timedelta(days=1), 3: DAY + timedelta(days=1), 4: None}
        with engine.connect() as conn:
            assert conn.execute(text(
                "SELECT COUNT(*) FROM clearing_run r WHERE r.day_taps + r.late_taps <> (SELECT COUNT(*) FROM tap t "
                "WHERE t.clearing_run_id = r.id) OR r.day_gross + r.late_gross <> (SELECT COALESCE(SUM(amount), 0) "
                "FROM tap t WHERE t.clearing_run_id = r.id)")).scalar() == 0
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "2026_11_22_0010")
        cols = {c["name"] for c in inspect(engine).get_columns("tap")}
        assert "clearing_run_id" not in cols and "device_seq" in cols
    finally:
        engine.dispose()

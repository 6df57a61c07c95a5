"""The block claim's window (revision 0027, backoffice.clearing_runs.claim_taps) on PostgreSQL: a run takes its day's
taps as a block up to a watermark read through the insert gate on ``tap``.

- An insert in flight when the run starts (uncommitted, holding the gate) is waited for: once it commits, the run
  reads a watermark above it and takes the tap in its block.
- A tap committed just after the watermark was read has a larger id: not in the run's block, nor claimed one by one
  by it; the next run takes it as a late tap.

Every check counts with plain SQL (the tap table, the view tap_claimed, the runs' stored totals), not with
clearing's code. The fallback when an insert stays open longer than GATE_WAIT (every tap claimed one by one) is
test_clearing_claims' test_a_tap_committed_just_after_a_run_started_lands_in_the_next_run.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import text

from backoffice import clearing_runs as cr
from backoffice.models import Tap
from tests.integration.test_clearing_claims import (
    DAY,
    NEXT,
    OP,
    START,
    counted_by_runs,
    pg_engine,  # noqa: F401  (fixture)
    purchases,
    run_of,
    store,
    tap,
)


def _sql(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(sql), params).one()


def test_an_insert_in_flight_when_a_run_starts_is_waited_for_and_taken_in_the_block(pg_engine):  # noqa: F811
    engine = pg_engine
    as_of = NEXT + timedelta(hours=1)
    store(engine, [tap(1, at=START + timedelta(hours=2), received=START + timedelta(hours=2, minutes=1))])
    ingest = engine.connect()
    done: dict = {}

    def clear() -> None:
        try:
            with engine.begin() as conn:
                done["run"] = cr.clear_day(conn, operator=OP, day=DAY, now=as_of)
        except BaseException as exc:  # pragma: no cover - reported below
            done["error"] = exc

    try:
        slow = ingest.begin()
        ingest.execute(Tap.__table__.insert(), [tap(2, at=START + timedelta(hours=23), amount=300,
                                                    received=as_of - timedelta(seconds=1))])
        runner = threading.Thread(target=clear)
        runner.start()
        runner.join(0.5)  # the run waits at the gate for the open insert (GATE_WAIT is 2 s)
        slow.commit()
        runner.join(60)
    finally:
        ingest.close()
    assert "error" not in done, done.get("error")
    first = done["run"]
    tap2, mark = _sql(engine, "SELECT t.id, r.claim_watermark FROM tap t, clearing_run r WHERE t.device_seq = 2 "
                              "AND r.id = :r", r=first.id)
    assert mark >= tap2, "the run read its watermark before the insert it waited for"
    assert _sql(engine, "SELECT COUNT(*) FROM tap WHERE clearing_run_id IS NOT NULL")[0] == 0  # a block, no writes
    assert (first.totals["day_taps"], first.totals["day_gross"]) == (2, 500)
    assert (run_of(engine, 1), run_of(engine, 2)) == (first.id, first.id)
    with engine.begin() as conn:
        second = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=as_of + timedelta(days=1))
    assert second.totals["late_taps"] == 0
    assert counted_by_runs(engine) == purchases(engine) == (2, 500)


def test_a_tap_committed_just_after_the_watermark_goes_to_the_next_run(pg_engine, monkeypatch):  # noqa: F811
    engine = pg_engine
    as_of = NEXT + timedelta(hours=1)
    store(engine, [tap(1, at=START + timedelta(hours=2), received=START + timedelta(hours=2, minutes=1))])
    read = cr.tap_watermark

    def then_a_tap_commits(conn):
        mark = read(conn)
        store(engine, [tap(2, at=START + timedelta(hours=23), amount=300, received=as_of - timedelta(seconds=1))])
        return mark

    monkeypatch.setattr(cr, "tap_watermark", then_a_tap_commits)
    with engine.begin() as conn:
        first = cr.clear_day(conn, operator=OP, day=DAY, now=as_of)
    monkeypatch.setattr(cr, "tap_watermark", read)
    assert (first.totals["day_taps"], first.totals["day_gross"]) == (1, 200)
    assert (run_of(engine, 1), run_of(engine, 2)) == (first.id, None)
    with engine.begin() as conn:
        second = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=as_of + timedelta(days=1))
    assert (second.totals["late_taps"], second.totals["late_gross"]) == (1, 300)
    assert run_of(engine, 2) == second.id
    assert _sql(engine, "SELECT clearing_run_id FROM tap WHERE device_seq = 2")[0] == second.id  # one by one
    assert counted_by_runs(engine) == purchases(engine) == (2, 300 + 200)
    # Each run's stored taps and gross equal its taps in plain SQL (the view), and no tap is in two runs.
    assert _sql(engine, "SELECT COUNT(*) FROM clearing_run r WHERE r.day_taps + r.late_taps <> (SELECT COUNT(*) "
                        "FROM tap_claimed t WHERE t.clearing_run_id = r.id AND t.kind = 'purchase')")[0] == 0

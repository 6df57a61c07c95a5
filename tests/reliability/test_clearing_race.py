"""Ingest committing while clearing runs race, on PostgreSQL: at the end every stored tap is in exactly one run.

Two ingest threads store taps in small transactions of their own, each stamping ``received_at`` before its insert
and committing a few milliseconds later (as ingest does: stamp, verify, store, commit), so commits keep landing
just after a run has started. Three clearing threads at once clear the operator's next service day again and
again with the real clock (``clear_day`` as the nightly job calls it; two threads on the same day race, and the
unique (operator, service day) lets one win). Taps belong to days already cleared (late taps), to the day being
cleared, and to the next one.

The checks are plain SQL over the tap and run tables, none of clearing's code:
- no tap in no run, none naming a run that does not exist;
- the runs' tap counts and gross add up to the purchases stored (a tap in two runs would be counted twice), run by
  run and service day by service day (the service day computed in SQL from the 03:00 Asia/Shanghai cut-off);
- "straddlers": taps whose time window named an earlier run than the one that took them (received before that
  run's ``as_of``, of its day or earlier, committed after it read the table). These are the taps 846ff19 lost;
  the test asserts there were some, so it shows the race was run, not dodged.

``FAREBOX_SOAK=1`` (``make soak``): 20,000 taps instead of 1,500.
"""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Tap

SOAK = os.environ.get("FAREBOX_SOAK") == "1"
TAPS = 20_000 if SOAK else 1_500
INGESTERS = 2
CLEARERS = 3
OP = "op_race"
DAY0 = date(2026, 3, 1)
START0 = datetime(2026, 2, 28, 19, 0, tzinfo=UTC)  # 03:00 Asia/Shanghai on DAY0


def _tap(device: str, seq: int, occurred: datetime, received: datetime, rng: random.Random) -> dict:
    kind = "purchase" if rng.random() < 0.95 else "shift_open"
    return {"device_id": device, "device_seq": seq, "kind": kind, "occurred_at": occurred, "received_at": received,
            "operator": OP, "route": f"R{seq % 5}", "vehicle": "V1", "driver": f"D{seq % 3}", "shift_no": 1,
            "card_asn": f"{device}{seq:014d}"[-20:], "card_type": 1, "card_ttc": seq,
            "amount": rng.choice((100, 150, 200, 250)) if kind == "purchase" else 0, "balance_after": 1000,
            "terminal_id": "010000000001", "terminal_seq": seq, "tac": f"{seq:08X}", "reason": ""}


class Race:
    def __init__(self, engine):
        self.engine = engine
        self.frontier = 0  # days cleared so far (day index of the next day to clear)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.runs = self.lost_races = self.clock_retries = 0
        self.lock = threading.Lock()

    def ingest(self, k: int, count: int) -> None:
        rng = random.Random(k)
        device, seq = f"VAL{k}", 0
        try:
            transactions = 0
            while seq < count:
                rows = []
                transactions += 1
                # Every 25th transaction is a slow one (a busy database, a long TAC check): it commits only after a
                # run that started after its stamp has finished, with a tap of a day that run covers. So the race
                # the claim exists for happens on every machine, quiet or loaded, not only by luck of timing.
                slow = transactions % 25 == 0
                runs_before = self.runs
                received = datetime.now(UTC)  # stamped before the commit, as ingest does
                for _ in range(min(rng.randint(1, 4), count - seq)):
                    seq += 1
                    day = (max(0, self.frontier - 1) if slow
                           else rng.randint(max(0, self.frontier - 3), self.frontier + 1))
                    occurred = START0 + timedelta(days=day, seconds=rng.randint(0, 20 * 3600))
                    rows.append(_tap(device, seq, occurred, received, rng))
                with self.engine.begin() as conn:
                    conn.execute(Tap.__table__.insert(), rows)
                    time.sleep(rng.uniform(0, 0.004))  # verifying TACs, acknowledging: the commit comes later
                    deadline = time.monotonic() + 5
                    while slow and self.runs < runs_before + 2 and time.monotonic() < deadline:
                        time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.errors.append(exc)

    def clear(self, k: int) -> None:
        rng = random.Random(100 + k)
        try:
            while not self.stop.is_set():
                with self.engine.connect() as conn:
                    last = conn.execute(text("SELECT MAX(service_day) FROM clearing_run")).scalar()
                day = DAY0 if last is None else last + timedelta(days=1)
                try:
                    with self.engine.begin() as conn:
                        cr.clear_day(conn, operator=OP, day=day)
                    with self.lock:
                        self.runs += 1
                        self.frontier = max(self.frontier, (day - DAY0).days + 1)
                except IntegrityError:  # another thread stored this day first: look again
                    with self.lock:
                        self.lost_races += 1
                except ValueError as exc:
                    if "go back before" not in str(exc):  # our clock read before another thread's run: again
                        raise
                    with self.lock:
                        self.clock_retries += 1
                time.sleep(rng.uniform(0, 0.01))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.errors.append(exc)


def one(engine, sql: str):
    with engine.connect() as conn:
        return conn.execute(text(sql)).one()


def test_ingest_committing_while_runs_clear_puts_every_tap_in_exactly_one_run(pg_schema_url):
    engine = make_engine(pg_schema_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            registry.add_operator(conn, code=OP, name="Race Bus")
            registry.add_vehicle(conn, code="V1", operator=OP, plate="A-V1")
            cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=DAY0 - timedelta(days=30))
        race = Race(engine)
        ingesters = [threading.Thread(target=race.ingest, args=(k, TAPS // INGESTERS)) for k in range(INGESTERS)]
        clearers = [threading.Thread(target=race.clear, args=(k,)) for k in range(CLEARERS)]
        started = time.monotonic()
        for t in clearers + ingesters:
            t.start()
        for t in ingesters:
            t.join(timeout=600)
        race.stop.set()
        for t in clearers:
            t.join(timeout=60)
        assert not race.errors, race.errors
        # After the last upload, one more run takes whatever the racing runs left: every tap's day is cleared.
        last_day = one(engine, "SELECT MAX(((occurred_at AT TIME ZONE 'Asia/Shanghai') - interval '3 hours')::date) "
                               "FROM tap")[0]
        with engine.begin() as conn:
            cleared = conn.execute(text("SELECT MAX(service_day) FROM clearing_run")).scalar()
            cr.clear_day(conn, operator=OP, day=max(last_day, cleared + timedelta(days=1)))
        elapsed = time.monotonic() - started

        taps, purchases, gross = one(engine, "SELECT COUNT(*), COUNT(*) FILTER (WHERE kind = 'purchase'), "
                                             "COALESCE(SUM(amount) FILTER (WHERE kind = 'purchase'), 0) FROM tap")
        runs, run_taps, run_gross = one(engine, "SELECT COUNT(*), SUM(day_taps + late_taps), "
                                                "SUM(day_gross + late_gross) FROM clearing_run")
        # First what any version of clearing can be asked: do the runs add up to the purchases stored?
        assert (int(run_taps), int(run_gross)) == (purchases, gross), (
            f"{runs} runs counted {run_taps} purchases ({run_gross} fen); {purchases} ({gross} fen) are stored")
        in_no_run = one(engine, "SELECT COUNT(*) FROM tap_claimed t LEFT JOIN clearing_run r ON r.id = t.clearing_run_id "
                                "WHERE r.id IS NULL")[0]
        runs_off = one(engine, """
            SELECT COUNT(*) FROM clearing_run r LEFT JOIN (
                SELECT clearing_run_id AS id, COUNT(*) AS n, SUM(amount) AS g FROM tap_claimed WHERE kind = 'purchase'
                GROUP BY clearing_run_id) c ON c.id = r.id
            WHERE r.day_taps + r.late_taps <> COALESCE(c.n, 0) OR r.day_gross + r.late_gross <> COALESCE(c.g, 0)""")[0]
        days_off = one(engine, """
            WITH stored AS (
                SELECT ((occurred_at AT TIME ZONE 'Asia/Shanghai') - interval '3 hours')::date AS d,
                       COUNT(*) AS n, SUM(amount) AS g FROM tap WHERE kind = 'purchase' GROUP BY 1),
            cleared AS (
                SELECT for_day AS d, SUM(taps) AS n, SUM(gross) AS g FROM clearing_row
                WHERE dimension = 'operator' AND section IN ('day', 'late') GROUP BY 1 HAVING SUM(taps) > 0)
            SELECT COUNT(*) FROM stored s FULL JOIN cleared c ON c.d = s.d
            WHERE s.n IS DISTINCT FROM c.n OR s.g IS DISTINCT FROM c.g""")[0]
        straddlers = one(engine, """
            WITH ends AS (
                SELECT id, service_day, as_of,
                       ((service_day + 1)::timestamp + make_interval(hours => cutoff_hour)) AT TIME ZONE tz AS day_end
                FROM clearing_run)
            SELECT COUNT(*) FROM tap_claimed t
            WHERE (SELECT e.id FROM ends e WHERE t.received_at < e.as_of AND t.occurred_at < e.day_end
                   ORDER BY e.service_day LIMIT 1) IS DISTINCT FROM t.clearing_run_id""")[0]
        in_two_runs = int(run_taps) - int(purchases)
        print(f"\nclearing race: {taps} taps ({purchases} purchases, {gross} fen) by {INGESTERS} ingest threads; "
              f"{CLEARERS} clearing threads made {runs} runs ({race.lost_races} lost a race for a day, "
              f"{race.clock_retries} clock retries) in {elapsed:.1f} s; taps in 0 runs: {in_no_run}; "
              f"counted twice: {in_two_runs}; runs off: {runs_off}; days off: {days_off}; "
              f"straddlers (committed after the run their window named): {straddlers}")
        assert in_no_run == 0
        assert runs_off == 0 and days_off == 0
        assert straddlers > 0, "no commit landed after a run started: the race was not exercised"
        assert runs >= 5
    finally:
        engine.dispose()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s"])

"""The auditor (``farebox audit``), on SQLite and PostgreSQL, through the real CLI as a subprocess.

Two service days are settled by the back office as a clerk would (``backoffice.settle.settle``), with a late tap
of the first day arriving after its run and carried into the second. The auditor finds no difference. Then the
stored books are tampered with by plain SQL, one way per test (a route's gross +1 fen, a tap deleted, a card
transaction stored twice, a tap moved from its run to another, a tap that fell between two runs): the auditor
names each, and exits 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import inspect, text

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.audit_runs import audit, commission, day_window
from backoffice.db import make_engine, upgrade
from backoffice.models import Tap
from backoffice.settle import settle

OP = "op_audit"
TZ = ZoneInfo("Asia/Shanghai")
DAY1 = date(2026, 6, 1)
DAY2 = DAY1 + timedelta(days=1)
START1 = datetime(2026, 6, 1, 3, tzinfo=TZ).astimezone(UTC)
START2 = START1 + timedelta(days=1)
BUSES = [("VAL1", "V1", "R1", "D1"), ("VAL2", "V2", "R2", "D2"), ("VAL3", "V3", "R1", "D3")]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")


_seq: dict[str, int] = {}


def _tap(device, vehicle, route, driver, at, *, kind="purchase", amount=0, received=None, card=None) -> dict:
    seq = _seq[device] = _seq.get(device, 0) + 1
    return {"device_id": device, "device_seq": seq, "kind": kind, "occurred_at": at,
            "received_at": received or at + timedelta(minutes=2), "operator": OP, "route": route, "vehicle": vehicle,
            "driver": driver, "shift_no": 1, "card_asn": card or f"{seq:04d}{device[-1]}".rjust(20, "0"),
            "card_type": 1 + seq % 3, "card_ttc": seq, "amount": amount, "balance_after": 5000,
            "terminal_id": "010000000001", "terminal_seq": seq, "tac": f"{seq:08X}", "reason": ""}


def _day(start: datetime, n: int = 20) -> list[dict]:
    rows = []
    for b, (device, vehicle, route, driver) in enumerate(BUSES):
        rows.append(_tap(device, vehicle, route, driver, start + timedelta(hours=2), kind="shift_open"))
        for i in range(n + b):
            rows.append(_tap(device, vehicle, route, driver, start + timedelta(hours=3, minutes=37 * i + b),
                             amount=(200, 100, 0, 250)[(i + b) % 4]))
    return rows


@pytest.fixture
def books(url):
    """Two settled days; a late tap of day 1 carried into day 2's run. Yields (url, engine, [run1, run2])."""
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Audit Bus", at=START1 - timedelta(days=30))
        for _d, vehicle, _r, _dr in BUSES:
            registry.add_vehicle(conn, code=vehicle, operator=OP, plate=f"A-{vehicle}", at=START1 - timedelta(days=30))
        cr.add_fleet(conn, code="F1", operator=OP, name="East")
        cr.assign_vehicle(conn, vehicle="V1", fleet="F1", valid_from=date(2026, 1, 1))
        cr.assign_vehicle(conn, vehicle="V2", fleet="F1", valid_from=DAY2)  # joins the fleet on day 2
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
        conn.execute(Tap.__table__.insert(), _day(START1))
    with engine.begin() as conn:
        run1 = settle(conn, operator=OP, day=DAY1, now=START2 + timedelta(hours=1)).run
    with engine.begin() as conn:  # day 1's last bus uploads after the run: a late tap; then day 2
        conn.execute(Tap.__table__.insert(), [
            _tap("VAL3", "V3", "R1", "D3", START2 - timedelta(minutes=20), amount=333,
                 received=START2 + timedelta(hours=5)), *_day(START2, 15)])
    with engine.begin() as conn:
        run2 = settle(conn, operator=OP, day=DAY2, now=START2 + timedelta(days=1, hours=1)).run
    assert run1.totals["day_gross"] > 0 and run2.totals["late_gross"] == 333
    yield url, engine, [run1.id, run2.id]
    engine.dispose()


def farebox_audit(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAREBOX_DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "farebox.cli", "audit", "--operator", OP, *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _purchases(engine, day: date) -> list:
    start, end = day_window(day, "Asia/Shanghai", 3)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM tap WHERE operator = :op AND kind = 'purchase' ORDER BY id"),
                            {"op": OP}).mappings().all()
    out = []
    for r in rows:
        at = r["occurred_at"]
        at = datetime.fromisoformat(at) if isinstance(at, str) else at
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        if start <= at < end:
            out.append(r)
    return out


def test_settled_books_have_no_difference(books):
    url, engine, runs = books
    with engine.connect() as conn:
        result = audit(conn, operator=OP)
        one_day = audit(conn, operator=OP, day=DAY1)
    assert result.clean, [d.line() for d in result.differences]
    assert one_day.clean and one_day.runs == 1
    # The auditor looked at every stored purchase of both days, counted here by plain SQL and the cut-off rule.
    assert result.taps == len(_purchases(engine, DAY1)) + len(_purchases(engine, DAY2)) == 63 + 1 + 48
    done = farebox_audit(url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no differences" in done.stdout and "2 run(s)" in done.stdout
    assert farebox_audit(url, "--day", str(DAY1)).returncode == 0


def test_commission_and_day_window_are_their_own_definitions():
    assert [commission(g, 60) for g in (0, 83, 84, 250, 10_000, -84)] == [0, 0, 1, 2, 60, -1]
    assert commission(125, 4000) == 50 and commission(1, 5000) == 1 and commission(-1, 5000) == -1
    assert day_window(DAY1, "Asia/Shanghai", 3) == (START1, START2)
    # New York's spring-forward night (2026-03-08): 02:00-03:00 does not exist; at cut-off 2 the day starts when
    # the clock jumps (07:00 UTC) and is an hour short.
    start, end = day_window(date(2026, 3, 8), "America/New_York", 2)
    assert start == datetime(2026, 3, 8, 7, tzinfo=UTC) and end - start == timedelta(hours=23)
    # Written apart from clearing's, it agrees with it, on ordinary days and both changes of the clock.
    from clearing.service_day import day_bounds

    for tz, cutoff in (("Asia/Shanghai", 3), ("America/New_York", 2), ("Europe/Berlin", 2), ("Europe/Berlin", 3)):
        for d in (date(2026, 3, 7), date(2026, 3, 8), date(2026, 3, 29), date(2026, 10, 25), date(2026, 11, 1)):
            assert day_window(d, tz, cutoff) == day_bounds(d, tz, cutoff), (tz, cutoff, d)


def _claim_column(engine) -> bool:
    with engine.connect() as conn:
        return "clearing_run_id" in {c["name"] for c in inspect(conn).get_columns("tap")}


def test_a_route_total_raised_by_one_fen_is_reported(books):
    url, engine, (run1, _run2) = books
    with engine.begin() as conn:
        before = conn.execute(text("SELECT gross FROM clearing_row WHERE run_id = :r AND section = 'day' "
                                   "AND dimension = 'route' AND key = 'R1'"), {"r": run1}).scalar_one()
        conn.execute(text("UPDATE clearing_row SET gross = gross + 1 WHERE run_id = :r AND section = 'day' "
                          "AND dimension = 'route' AND key = 'R1'"), {"r": run1})
    done = farebox_audit(url, "--day", str(DAY1))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"run {run1} ({DAY1}) day {DAY1} route 'R1' gross: stored {before + 1}, re-derived {before}" in done.stdout
    # The commission that the raised row should share is checked too: net no longer gross - commission.
    assert "route 'R1' net (gross - commission)" in done.stdout
    assert farebox_audit(url, "--day", str(DAY2)).returncode == 0  # the other day is untouched


def test_a_deleted_tap_is_reported(books):
    url, engine, (run1, _run2) = books
    gone = next(r for r in _purchases(engine, DAY1) if r["amount"] == 250 and r["route"] == "R2")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM tap WHERE id = :id"), {"id": gone["id"]})
    done = farebox_audit(url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"run {run1} ({DAY1}) day {DAY1} route 'R2' gross: stored" in done.stdout
    assert f"run {run1} ({DAY1}) day {DAY1} vehicle 'V2' taps" in done.stdout
    assert f"{DAY1}: cards lost (fen)" in done.stdout  # the money no longer adds up for the day


def test_a_card_transaction_stored_twice_is_reported(books):
    """A copy of a cleared purchase under another device sequence, taken by the same run (a duplicated link)."""
    url, engine, (run1, _run2) = books
    twin = next(r for r in _purchases(engine, DAY1) if r["amount"] == 200)
    with engine.begin() as conn:  # every column copied, whatever the schema has by now
        cols = [c["name"] for c in inspect(conn).get_columns("tap") if c["name"] not in ("id", "device_seq")]
        # From tap_claimed: the copy carries the run that took the original (since revision 0027 a run's block of
        # its day carries no id on the tap itself).
        source = "tap_claimed" if "tap_claimed" in inspect(conn).get_view_names() else "tap"
        conn.execute(text(f"INSERT INTO tap ({', '.join(cols)}, device_seq) SELECT {', '.join(cols)}, "
                          f"device_seq + 100000 FROM {source} WHERE id = :id"), {"id": twin["id"]})
    done = farebox_audit(url, "--day", str(DAY1))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"card {twin['card_asn']} counter {twin['card_ttc']} purchases stored: stored 2, re-derived 1" in \
        done.stdout
    assert f"route '{twin['route']}' gross" in done.stdout


def test_a_tap_moved_into_a_second_run_is_reported(books):
    """The tap-run link tampered with: a day-1 tap that run 1 took is made run 2's as well (claim moved, or run 2's
    window stretched back over it)."""
    url, engine, (run1, run2) = books
    moved = next(r for r in _purchases(engine, DAY1) if r["amount"] == 100)
    with engine.begin() as conn:
        if _claim_column(engine):
            conn.execute(text("UPDATE tap SET clearing_run_id = :r WHERE id = :id"), {"r": run2, "id": moved["id"]})
        else:
            conn.execute(text("UPDATE clearing_run SET carried_from = :t WHERE id = :r"),
                         {"t": moved["received_at"], "r": run2})
    done = farebox_audit(url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"run {run2} ({DAY2}) late {DAY1}" in done.stdout  # run 2 now carries day-1 taps it never stored
    if not _claim_column(engine):
        assert f"tap {moved['id']} ({DAY1}, 100 fen) clearing runs: stored 2, re-derived 1" in done.stdout
    else:
        assert f"run {run1} ({DAY1}) day {DAY1} route '{moved['route']}' taps" in done.stdout


def test_a_tap_that_fell_between_two_runs_is_reported(books):
    """Received before run 1's moment, stored only after both runs were made, in neither run (issue 9, hole 5)."""
    url, engine, (run1, _run2) = books
    row = _tap("VAL1", "V1", "R1", "D1", START1 + timedelta(hours=20), amount=777,
               received=START2 + timedelta(minutes=30))
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), [row])
    done = farebox_audit(url, "--day", str(DAY1))
    assert done.returncode == 1, done.stdout + done.stderr
    if _claim_column(engine):
        assert "777 fen) clearing runs: stored 0, re-derived 1" in done.stdout
    else:  # by window run 1 took it, but its stored figures do not have it
        assert f"run {run1} ({DAY1}) day {DAY1} route 'R1' gross" in done.stdout


def test_an_unknown_operator_is_a_clear_error(books):
    url, _engine, _runs = books
    env = {**os.environ, "FAREBOX_DATABASE_URL": url}
    done = subprocess.run([sys.executable, "-m", "farebox.cli", "audit", "--operator", "nobody"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not registered" in done.stderr


def test_the_nightly_audit_runs_beside_the_clearing_and_names_a_difference(books, tmp_path, caplog):
    from backoffice import jobs
    from backoffice.scheduler import audit_job_id, clearing_job_id, start_scheduler, stop_scheduler
    from farebox.config import Settings

    _url, engine, (run1, _run2) = books
    scheduler = start_scheduler(engine, Settings(var_dir=tmp_path / "var"), paused=True)
    try:
        audit_job, clearing_job = scheduler.get_job(audit_job_id(OP)), scheduler.get_job(clearing_job_id(OP))
        assert audit_job.func is jobs.nightly_audit and audit_job.kwargs == {"operator": OP}
        # Half an hour after the clearing, in the operator's time zone.
        assert audit_job.next_run_time - clearing_job.next_run_time == timedelta(minutes=30)
        assert jobs.nightly_audit(OP) == {DAY1: [], DAY2: []}
        with engine.begin() as conn:
            conn.execute(text("UPDATE clearing_run SET day_gross = day_gross + 1 WHERE id = :r"), {"r": run1})
        found = jobs.nightly_audit(OP)
        assert [d.figure for d in found[DAY1]] == [f"run {run1} ({DAY1}) total day_gross (its rows)"]
        assert found[DAY2] == []
        assert f"audit {OP} {DAY1}: 1 difference(s)" in caplog.text
    finally:
        stop_scheduler(scheduler)

"""The scheduler on SQLite and PostgreSQL: jobs stored in the database survive a restart, a nightly run missed while
no scheduler ran is caught up when one starts late, two schedulers on one database (one of them a separate
`farebox jobs serve` process) clear the day once, and two clearings of one day racing in the database store one
run. Expected figures are plain sums of the taps written here. Waits poll with a deadline; nothing asserts time."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from sqlalchemy import func, select, text

from backoffice import clearing_runs as cr
from backoffice import jobs, registry
from backoffice.db import make_engine, upgrade
from backoffice.models import ClearingRun, Tap
from backoffice.scheduler import JOB_TABLE, clearing_job_id, make_scheduler, start_scheduler, stop_scheduler
from backoffice.settle import settle
from farebox.cli import main
from farebox.config import Settings

OP = "op_j"
TZ = "Asia/Shanghai"
RATE_BP = 55


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 3, tzinfo=ZoneInfo(TZ)).astimezone(UTC)


def target_day() -> date:
    """The last service day that has ended (cut-off 03:00 plus an hour), worked out here from the wall clock."""
    local = datetime.now(ZoneInfo(TZ)) - timedelta(hours=1)
    return (local - timedelta(hours=3)).date() - timedelta(days=1)


@pytest.fixture
def city(url):
    """An operator with a commission rate and taps on the last ended service day; returns (engine, day, gross)."""
    engine = make_engine(url)
    upgrade(engine)
    day = target_day()
    start = _day_start(day)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="夜班公交", timezone=TZ, at=start - timedelta(days=60))
        cr.set_commission_rate(conn, operator=OP, rate_bp=RATE_BP, valid_from=day - timedelta(days=30))
        rows = []
        for i in range(40):
            at = start + timedelta(hours=4, minutes=23 * i)
            rows.append({"device_id": f"VJ{i % 2}", "device_seq": i, "kind": "purchase", "occurred_at": at,
                         "received_at": at + timedelta(minutes=1), "operator": OP, "route": f"R{i % 3}",
                         "vehicle": f"V{i % 2}", "driver": f"D{i % 2}", "shift_no": 1, "card_asn": f"{i:020d}",
                         "card_type": 1, "card_ttc": i, "amount": 150 + 10 * (i % 4), "balance_after": 900,
                         "terminal_id": f"0200000000{i % 2:02d}", "terminal_seq": i, "tac": f"{i:08X}",
                         "reason": ""})
        conn.execute(Tap.__table__.insert(), rows)
    gross = sum(r["amount"] for r in rows)
    yield engine, day, gross
    engine.dispose()


def runs_of(engine) -> list[tuple[date, int]]:
    with engine.connect() as conn:
        return [(r[0], int(r[1])) for r in conn.execute(
            select(ClearingRun.service_day, ClearingRun.day_gross).where(ClearingRun.operator == OP)
            .order_by(ClearingRun.service_day))]


def wait_for(predicate, what: str, deadline: float = 90.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def stored_next_run(engine, job_id: str) -> float | None:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT next_run_time FROM {JOB_TABLE} WHERE id = :id"), {"id": job_id}).scalar()


def set_next_run(engine, job_id: str, when: datetime) -> None:
    """Move a stored job's next run, as a stopped scheduler would find it (through APScheduler, paused)."""
    s = make_scheduler(engine)
    s.start(paused=True)
    try:
        s.modify_job(job_id, jobstore="default", next_run_time=when)
    finally:
        stop_scheduler(s)


def test_jobs_stored_in_the_database_survive_a_restart(city, tmp_path):
    engine, _day, _gross = city
    settings = Settings(var_dir=tmp_path / "var")
    first = start_scheduler(engine, settings, paused=True)
    job_id = clearing_job_id(OP)
    assert first.get_job(job_id) is not None
    stop_scheduler(first)
    # A time no trigger would compute: if it comes back, it came from the table.
    odd = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3, minutes=7)
    set_next_run(engine, job_id, odd)
    assert stored_next_run(engine, job_id) == pytest.approx(odd.timestamp())

    other = make_engine(engine.url.render_as_string(hide_password=False))  # a new process: a new engine
    second = start_scheduler(other, settings, paused=True)
    try:
        job = second.get_job(job_id)
        assert job.next_run_time == odd and job.kwargs == {"operator": OP}
        with other.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {JOB_TABLE}")).scalar_one() == 1
    finally:
        stop_scheduler(second)
        other.dispose()
    assert runs_of(engine) == []  # paused all along: nothing ran


def test_a_missed_nightly_run_is_caught_up_when_the_scheduler_starts_late(city, tmp_path):
    engine, day, gross = city
    settings = Settings(var_dir=tmp_path / "var")
    stop_scheduler(start_scheduler(engine, settings, paused=True))  # it ran once, days ago, and stored its job
    missed = _day_start(day + timedelta(days=1)) + timedelta(hours=1)  # 04:00 after the day: nobody was running
    set_next_run(engine, clearing_job_id(OP), missed)

    results = []
    scheduler = start_scheduler(engine, settings, paused=True)
    scheduler.add_listener(lambda e: results.append(e), EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    scheduler.resume()
    try:
        wait_for(lambda: [e for e in results if e.job_id == clearing_job_id(OP)], "the missed run")
        [event] = [e for e in results if e.job_id == clearing_job_id(OP)]
        assert event.exception is None, event.traceback
        next_run = scheduler.get_job(clearing_job_id(OP)).next_run_time
    finally:
        stop_scheduler(scheduler)
    assert runs_of(engine) == [(day, gross)]
    [done] = event.retval
    assert done.day == day and done.cleared
    assert (tmp_path / "var" / "reports" / f"settlement-{OP}-{day}.pdf") in done.reports
    assert next_run > datetime.now(UTC)  # coalesced: the one run, then the next night


def test_two_schedulers_on_one_database_clear_the_day_once(city, url, tmp_path):
    engine, day, gross = city
    settings = Settings(var_dir=tmp_path / "var")
    stop_scheduler(start_scheduler(engine, settings, paused=True))
    job_id = clearing_job_id(OP)
    set_next_run(engine, job_id, datetime.now(UTC) - timedelta(hours=2))  # due

    # One scheduler is a process of its own (`farebox jobs serve`): it fires the due job and clears the day.
    ready, log_path = tmp_path / "jobs.ready", tmp_path / "jobs.log"
    env = {**os.environ, "FAREBOX_DATABASE_URL": url, "FAREBOX_VAR_DIR": str(tmp_path / "var2")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "farebox.cli", "-v", "jobs", "serve", "--ready-file",
                                 str(ready)], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, "farebox jobs serve")
        assert proc.poll() is None, log_path.read_text()
        wait_for(lambda: f"clearing {OP} {day}: run" in log_path.read_text(), "the process's run")
        assert runs_of(engine) == [(day, gross)]
        # The other, here, finds the same stored job due as well (as it would had it been down at night while
        # the process ran): it runs the job, which finds the day cleared.
        set_next_run(engine, job_id, datetime.now(UTC) - timedelta(hours=1))
        results = []
        scheduler = start_scheduler(engine, settings, paused=True)
        scheduler.add_listener(lambda e: results.append(e), EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        scheduler.resume()
        try:
            wait_for(lambda: [e for e in results if e.job_id == job_id], "the second scheduler's run")
        finally:
            stop_scheduler(scheduler)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    [event] = [e for e in results if e.job_id == job_id]
    assert event.exception is None and event.retval == []
    assert proc.returncode == 0, log_path.read_text()
    assert runs_of(engine) == [(day, gross)]
    assert "Traceback" not in log_path.read_text(), log_path.read_text()
    assert (tmp_path / "var2" / "reports" / f"settlement-{OP}-{day}.pdf").exists()
    assert not (tmp_path / "var" / "reports").exists()  # the second wrote nothing: it cleared nothing


def test_two_clearings_of_one_day_racing_in_the_database_store_one_run(city):
    engine, day, gross = city
    now = datetime.now(UTC)
    other = make_engine(engine.url.render_as_string(hide_password=False))
    outcome = {}
    # The first clearing has stored its run and not yet committed when the second looks and tries to store its own.
    with engine.begin() as conn:
        first = settle(conn, operator=OP, day=day, now=now)
        racer = threading.Thread(target=lambda: outcome.update(done=jobs.clear_operator(other, operator=OP, now=now)))
        racer.start()
        time.sleep(1.0)  # give it time to reach the insert and wait on ours; the outcome does not depend on it
    racer.join(timeout=90)
    other.dispose()
    assert not racer.is_alive()
    [done] = outcome["done"]
    assert done.run_id == first.run.id and not done.cleared
    assert runs_of(engine) == [(day, gross)]


def test_farebox_jobs_run_and_list(city, url, tmp_path, monkeypatch, capsys):
    engine, day, gross = city
    monkeypatch.setenv("FAREBOX_DATABASE_URL", url)
    monkeypatch.setenv("FAREBOX_VAR_DIR", str(tmp_path / "var"))
    assert main(["jobs", "run", "clearing", "--operator", OP]) == 0
    said = capsys.readouterr().out
    [(cleared, got)] = runs_of(engine)
    assert (cleared, got) == (day, gross) and f"{OP} {day}: clearing run" in said and "cleared" in said
    assert (tmp_path / "var" / "reports" / f"settlement-{OP}-{day}.xlsx").exists()
    assert main(["jobs", "run", "clearing", "--operator", OP]) == 0
    assert "nothing to clear" in capsys.readouterr().out
    assert main(["jobs", "run", "clearing", "--operator", OP, "--day", day.isoformat()]) == 0  # on demand: checked
    assert "checked again" in capsys.readouterr().out
    assert runs_of(engine) == [(day, gross)]
    assert main(["jobs", "list"]) == 0
    said = capsys.readouterr().out
    assert "not stored yet" in said and f"last cleared service day {day}" in said
    stop_scheduler(start_scheduler(engine, Settings(var_dir=tmp_path / "var"), paused=True))
    assert main(["jobs", "list"]) == 0
    said = capsys.readouterr().out
    assert clearing_job_id(OP) in said and "nightly clearing of op_j" in said
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ClearingRun)).scalar_one() == 1


def test_the_job_table_is_made_by_the_migration_in_apschedulers_own_layout(url):
    """Before any scheduler starts, the table exists with the columns APScheduler's job store describes itself."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from sqlalchemy import MetaData

    engine = make_engine(url)
    upgrade(engine)
    reflected = MetaData()
    reflected.reflect(engine, only=[JOB_TABLE])
    theirs = SQLAlchemyJobStore(engine=engine, tablename=JOB_TABLE).jobs_t  # built, not started: creates nothing
    got = reflected.tables[JOB_TABLE]
    assert set(got.columns.keys()) == set(theirs.columns.keys())
    assert [c.name for c in got.primary_key] == [c.name for c in theirs.primary_key]
    assert {c.name: c.nullable for c in got.columns} == {c.name: c.nullable for c in theirs.columns}
    assert {tuple(c.name for c in i.columns) for i in got.indexes} == {("next_run_time",)}
    engine.dispose()


def test_a_database_whose_job_table_apscheduler_made_upgrades_and_keeps_its_jobs(url):
    from alembic import command

    from backoffice.db import alembic_config

    engine = make_engine(url)
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "2026_11_22_0008")
    s = make_scheduler(engine)  # as before revision 0009: the job store makes the table at start
    s.start(paused=True)
    s.add_job(print, "interval", hours=1, id="kept", jobstore="default")
    stop_scheduler(s)
    upgrade(engine)
    assert stored_next_run(engine, "kept") is not None
    engine.dispose()

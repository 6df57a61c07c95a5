"""The back office's scheduler: APScheduler 3 (a BackgroundScheduler in the back-office process), its jobs kept in
the back office's own database (table ``apscheduler_jobs``, SQLAlchemyJobStore on the same engine; the table is
made by migration 0009, so two schedulers starting at once on a fresh database do not race to create it).

Jobs: ``clearing:<operator>`` for every registered operator, each night at the operator's cut-off plus
``backoffice.jobs.SETTLE_DELAY`` in its own time zone (``backoffice.jobs.nightly_clearing``); half an hour later
``audit:<operator>`` (``backoffice.jobs.nightly_audit``, kept in memory, not in the table). Operators registered
later get theirs within ``SYNC_MINUTES`` (a job in memory looks).

Missed runs and double runs:
- A stored job keeps its next run time across restarts; when the scheduler starts after that time (the process was
  down at night) the job runs at once (``misfire_grace_time=None``: however late), once (``coalesce=True``: any
  number of missed nights make one run), and the run clears every day skipped since the last run.
- ``max_instances=1``: a run still going when the next is due is not doubled in this process.
- Two schedulers on one database (two back-office processes) both fire the same stored job: APScheduler 3 does not
  share a job store between schedulers. The day is still cleared once: ``clear_operator`` skips a day with a stored
  run, and the unique (operator, service day) of ``clearing_run`` stops the loser of a race (see backoffice.jobs).

``start_scheduler(engine, settings)`` is the one call ``farebox serve`` (or ``farebox jobs serve``) makes, and
``stop_scheduler(scheduler)`` the one to stop it (not ``scheduler.shutdown()``: see there).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import ConflictingIdError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine, select

from backoffice import jobs, partitions
from backoffice.models import Operator

log = logging.getLogger(__name__)

JOB_TABLE = "apscheduler_jobs"
SYNC_MINUTES = 10
PARTITIONS_AT = {"hour": 0, "minute": 17, "timezone": "UTC"}  # days are made a week ahead: any quiet hour serves
JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}


def clearing_job_id(operator: str) -> str:
    return f"clearing:{operator}"


def make_scheduler(engine: Engine) -> BackgroundScheduler:
    """A scheduler (not started) whose ``default`` job store is the database; ``memory`` holds jobs that must not
    outlive the process (and need not be picklable)."""
    return BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=engine, tablename=JOB_TABLE), "memory": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(2)},
        job_defaults=dict(JOB_DEFAULTS),
        timezone="UTC",
    )


def nightly_trigger(tz: str, cutoff_hour: int) -> CronTrigger:
    delay_hours = int(jobs.SETTLE_DELAY.total_seconds() // 3600)
    return CronTrigger(hour=(cutoff_hour + delay_hours) % 24, minute=0, timezone=tz)


def audit_job_id(operator: str) -> str:
    return f"audit:{operator}"


def audit_trigger(tz: str, cutoff_hour: int) -> CronTrigger:
    """Half an hour after the nightly clearing."""
    delay_hours = int(jobs.SETTLE_DELAY.total_seconds() // 3600)
    return CronTrigger(hour=(cutoff_hour + delay_hours) % 24, minute=30, timezone=tz)


def _same_trigger(a, b) -> bool:
    return (str(a), str(getattr(a, "timezone", ""))) == (str(b), str(getattr(b, "timezone", "")))


def sync_jobs(scheduler: BackgroundScheduler, engine: Engine) -> list[str]:
    """One nightly clearing job per operator in service: added when missing, re-timed when the operator's cut-off
    or time zone changed, left alone otherwise (its stored next run time is what catches up a missed night).
    Returns the ids added or changed."""
    with engine.connect() as conn:
        ops = conn.execute(select(Operator.code, Operator.timezone, Operator.cutoff_hour)
                           .where(Operator.retired_at.is_(None)).order_by(Operator.code)).all()
    changed = []
    for op in ops:
        # The audit beside the clearing, in memory: a night it misses is looked at again the next night (it audits
        # the last days cleared), and `farebox audit` answers on demand.
        audit, audit_at = scheduler.get_job(audit_job_id(op.code), jobstore="memory"), audit_trigger(op.timezone,
                                                                                                     op.cutoff_hour)
        if audit is None or not _same_trigger(audit.trigger, audit_at):
            scheduler.add_job(jobs.nightly_audit, audit_at, id=audit_job_id(op.code), jobstore="memory",
                              kwargs={"operator": op.code}, name=f"nightly audit of {op.code}", replace_existing=True)
        job_id, trigger = clearing_job_id(op.code), nightly_trigger(op.timezone, op.cutoff_hour)
        job = scheduler.get_job(job_id, jobstore="default")
        if job is None:
            try:
                scheduler.add_job(jobs.nightly_clearing, trigger, id=job_id, jobstore="default",
                                  kwargs={"operator": op.code}, name=f"nightly clearing of {op.code}")
            except ConflictingIdError:  # another scheduler on this database added it a moment ago
                continue
            changed.append(job_id)
        elif not _same_trigger(job.trigger, trigger):
            scheduler.reschedule_job(job_id, jobstore="default", trigger=trigger)
            changed.append(job_id)
    if changed:
        log.info("scheduler: jobs added or re-timed: %s", ", ".join(changed))
    return changed


def start_scheduler(engine: Engine, settings, *, paused: bool = False) -> BackgroundScheduler:
    """Start the back office's scheduler on ``engine`` with its jobs in sync with the operators; the reports go to
    ``<settings.var_dir>/reports``. ``paused=True`` starts it without
    running anything until ``scheduler.resume()`` (to add listeners first). Stop it with ``stop_scheduler``."""
    jobs.bind(engine, reports_dir=Path(settings.var_dir) / "reports")
    scheduler = make_scheduler(engine)
    # Paused while the jobs are brought in line, so that a job re-timed here does not fire on its old time first.
    scheduler.start(paused=True)
    sync_jobs(scheduler, engine)
    scheduler.add_job(sync_jobs, "interval", minutes=SYNC_MINUTES, args=(scheduler, engine), id="sync-jobs",
                      jobstore="memory", replace_existing=True, name="schedule new operators")
    if engine.dialect.name == "postgresql":  # tap's day partitions made ahead (SQLite keeps one table)
        scheduler.add_job(partitions.scheduled_make, CronTrigger(**PARTITIONS_AT), args=(engine,),
                          id="partitions:make", jobstore="memory", replace_existing=True,
                          name="day partitions made ahead")
    if not paused:
        scheduler.resume()
    log.info("scheduler: started with %d stored job(s)", len(scheduler.get_jobs(jobstore="default")))
    return scheduler


def stop_scheduler(scheduler: BackgroundScheduler, *, wait: bool = True) -> None:
    """Stop a scheduler without touching its stored jobs. APScheduler 3's shutdown wakes its loop once more with
    the executors already closed: a job due at that moment fails to start but its next run time is moved on in the
    table, and the missed run would be lost. So the database store is taken away first; the back office's engine
    is left open (it is not the scheduler's)."""
    scheduler.pause()
    if "default" in scheduler._jobstores:  # no public way to ask whether a store is attached
        scheduler.remove_jobstore("default", shutdown=False)
    scheduler.shutdown(wait=wait)


def stored_jobs(engine: Engine) -> list[tuple[str, str, datetime | None, str]]:
    """(id, name, next run time (UTC), trigger) of the jobs in the database, without running any."""
    scheduler = make_scheduler(engine)
    scheduler.start(paused=True)
    try:
        return [(j.id, j.name, j.next_run_time, str(j.trigger)) for j in scheduler.get_jobs(jobstore="default")]
    finally:
        stop_scheduler(scheduler, wait=False)


PAYMENT_QUERY_MINUTES = 5
PAYMENT_REFUND_MINUTES = 1
STATEMENT_AT = {"hour": 10, "minute": 15, "timezone": "Asia/Shanghai"}  # platforms publish the day's file by morning


def add_payment_jobs(scheduler: BackgroundScheduler, platform) -> list[str]:
    """The payment platform's jobs (backoffice.jobs.payments_*), in memory (the adapter is not stored): the order
    query every few minutes, pending refunds every minute, the statements each morning. A missed run is made up
    by the next (each job looks at everything still open)."""
    jobs.bind_payments(platform)
    added = [
        scheduler.add_job(jobs.payments_query, "interval", minutes=PAYMENT_QUERY_MINUTES, id="payments:query",
                          jobstore="memory", replace_existing=True, name="order query (missed notifications)"),
        scheduler.add_job(jobs.payments_refunds, "interval", minutes=PAYMENT_REFUND_MINUTES, id="payments:refunds",
                          jobstore="memory", replace_existing=True, name="pending refunds sent again"),
        scheduler.add_job(jobs.payments_statements, CronTrigger(**STATEMENT_AT), id="payments:statements",
                          jobstore="memory", replace_existing=True, name="daily statements fetched"),
    ]
    return [j.id for j in added]

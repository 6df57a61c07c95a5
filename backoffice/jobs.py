"""The scheduled jobs: what the nightly run and `farebox jobs run` do.

APScheduler keeps a job in its database table as a reference to a module-level function and its keyword arguments,
pickled; so the job functions here take plain values (an operator code) and use the engine and reports folder
bound to this process (``bind``, done by ``backoffice.scheduler.start_scheduler``), never a pickled engine, and
no database password lands in the job table.

Clearing an operator (``clear_operator``): the service day that has ended (its cut-off plus ``SETTLE_DELAY``, for
the last uploads of the night) and every day skipped since the operator's last run, oldest first, each in its own
transaction through ``backoffice.settle.settle`` (clearing run, shift reconciliation), then its reports. A day
someone else cleared meanwhile (another scheduler on the same database, a clerk) is left alone: the stored run
is looked for first, and the unique (operator, service day) of ``clearing_run`` turns a race into an error here,
after which the day is found cleared and skipped. So a day is never cleared twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, OperationalError

from backoffice import clearing_runs
from backoffice.models import ClearingRun, Operator
from backoffice.settle import settle, stored_run_id
from clearing.service_day import day_bounds

log = logging.getLogger(__name__)

SETTLE_DELAY = timedelta(hours=1)  # after the cut-off, buses still upload the night's last taps
_bound: dict = {}


def bind(engine: Engine, *, reports_dir: Path | None) -> None:
    """The engine and reports folder the job functions use in this process."""
    _bound.update(engine=engine, reports_dir=reports_dir)


def _context() -> tuple[Engine, Path | None]:
    if "engine" not in _bound:
        raise RuntimeError("backoffice.jobs is not bound to a database in this process: start the scheduler with "
                           "backoffice.scheduler.start_scheduler(engine, settings)")
    return _bound["engine"], _bound["reports_dir"]


def last_ended_day(tz: str, cutoff_hour: int, now: datetime, delay: timedelta = SETTLE_DELAY) -> date:
    """The latest service day whose end (the next cut-off) plus ``delay`` is not after ``now``."""
    local = (now - delay).astimezone(ZoneInfo(tz))
    return (local - timedelta(hours=cutoff_hour)).date() - timedelta(days=1)


@dataclass(frozen=True)
class DayDone:
    day: date
    run_id: int
    cleared: bool  # False: someone else had cleared it (the run was left as it was)
    reports: tuple[Path, ...] = ()
    shift_items: int = 0


def _clear_one(engine: Engine, operator: str, day: date, now: datetime, *, recheck: bool) -> tuple[int, bool, int]:
    """Clear one day in its own transaction; (run id, cleared here, new shift items)."""
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                existing = stored_run_id(conn, operator, day)
                if existing is not None and not recheck:
                    return existing, False, 0
                result = settle(conn, operator=operator, day=day, now=now)
                if result.run is None:
                    raise ValueError(f"{operator} {day} cannot be cleared: {result.provisional}")
                return result.run.id, existing is None, len(result.shift_items)
        except (IntegrityError, OperationalError):
            # Another scheduler (or clerk) stored this day between our look and our insert (unique violation), or
            # SQLite's writer lock went to it; once more, and the day will be found cleared.
            if attempt == 2:
                raise
            log.info("clearing %s %s: raced with another run of the same day; looking again", operator, day)
    raise AssertionError("unreachable")


def clear_operator(engine: Engine, *, operator: str, day: date | None = None, reports_dir: Path | None = None,
                   now: datetime | None = None) -> list[DayDone]:
    """Clear ``day`` (default: the last service day that has ended) and the days skipped before it; see the module
    doc. Asked for a day cleared already (on demand), the stored run is checked again and its reports written
    again; the nightly run (``day=None``) leaves cleared days alone."""
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        op = conn.execute(select(Operator.timezone, Operator.cutoff_hour).where(Operator.code == operator)).first()
        if op is None:
            raise LookupError(f"operator {operator!r} is not registered")
        last = conn.execute(select(ClearingRun.service_day).where(ClearingRun.operator == operator)
                            .order_by(ClearingRun.service_day.desc()).limit(1)).scalar()
        target = day or last_ended_day(op.timezone, op.cutoff_hour, now)
        if day is None and last is not None and last >= target:
            log.info("clearing %s: nothing to clear, service day %s (the last that has ended) is cleared already",
                     operator, target)
            return []
        days = clearing_runs.catch_up_days(conn, operator=operator, day=target)  # the one catch-up rule
    done = []
    for d in days:
        run_id, cleared, items = _clear_one(engine, operator, d, now, recheck=day is not None)
        reports: tuple[Path, ...] = ()
        if reports_dir is not None and (cleared or day is not None):
            with engine.connect() as conn:  # after the commit, read only: the reports name a stored run
                reports = settle(conn, operator=operator, day=d, reports_dir=reports_dir, now=now,
                                 close_day=False).files
        done.append(DayDone(d, run_id, cleared, reports, items))
        log.info("clearing %s %s: run %d %s%s", operator, d, run_id,
                 "stored" if cleared else "found stored already (left as it was)",
                 f", {items} shift(s) out of balance" if items else "")
    if any(d.cleared for d in done):
        _review_cards(engine, operator, day_bounds(days[0], op.timezone, op.cutoff_hour)[0], now)
    return done


def _review_cards(engine: Engine, operator: str, since: datetime, now: datetime) -> None:
    """The ledgers of the cards seen on the cleared days: anomalies become cases for staff. The days are stored
    already, so a failure here is logged and the clearing stands."""
    from backoffice.cards.ledger import review_cards_seen

    try:
        with engine.begin() as conn:
            reviewed, opened = review_cards_seen(conn, operator=operator, since=since, now=now)
    except Exception:
        log.exception("clearing %s: card ledger review failed; the clearing runs stand, and these cards are "
                      "reviewed again when their next taps arrive", operator)
        return
    log.info("clearing %s: %d card ledger(s) reviewed, %d new case(s)", operator, reviewed, opened)


def nightly_clearing(operator: str) -> list[DayDone]:
    """The scheduled job: ``clear_operator`` for the day just ended, with this process's engine and reports."""
    engine, reports_dir = _context()
    return clear_operator(engine, operator=operator, reports_dir=reports_dir)


AUDIT_DAYS = 7  # the nightly audit looks again at the runs of this many last cleared days


def audit_recent(engine: Engine, *, operator: str, days: int = AUDIT_DAYS) -> dict[date, list]:
    """``backoffice.audit_runs.audit`` (plain SQL, no code shared with clearing) of the operator's last ``days``
    cleared service days; the differences found, by day (empty lists: none). Logged as an error when any."""
    from backoffice.audit_runs import audit, snapshot

    found = {}
    with snapshot(engine) as conn:
        cleared = [d for (d,) in conn.execute(select(ClearingRun.service_day).where(ClearingRun.operator == operator)
                                              .order_by(ClearingRun.service_day.desc()).limit(days))]
        for d in sorted(cleared):
            found[d] = audit(conn, operator=operator, day=d).differences
    for d, diffs in found.items():
        if diffs:
            log.error("audit %s %s: %d difference(s) between the stored run and the raw tables, e.g. %s; run "
                      "`farebox audit --operator %s --day %s` for all", operator, d, len(diffs), diffs[0].line(),
                      operator, d)
    log.info("audit %s: %d day(s) audited, %d difference(s)", operator, len(found),
             sum(len(v) for v in found.values()))
    return found


def nightly_audit(operator: str) -> dict[date, list]:
    """The scheduled job beside the clearing: ``audit_recent`` with this process's engine."""
    engine, _reports_dir = _context()
    return audit_recent(engine, operator=operator)


# --- the payment platform (issue 11: backoffice.payments) ---------------------------------------------------------
STATEMENT_DAYS_BACK = 3  # each run fetches the last days' files again: a missed night is caught, a file stored once


def bind_payments(platform) -> None:
    """The payment platform adapter (backoffice.payments.platform) the payment jobs of this process use."""
    _bound["payment_platform"] = platform


def _payments_context():
    engine, _ = _context()
    if _bound.get("payment_platform") is None:
        raise RuntimeError("no payment platform is bound in this process (backoffice.jobs.bind_payments)")
    return engine, _bound["payment_platform"]


def payments_query():
    """Settle orders whose notification never came (backoffice.payments.service.query_open_orders)."""
    from backoffice.payments.service import query_open_orders

    engine, platform = _payments_context()
    done = query_open_orders(engine, platform)
    if done.settled or done.unavailable:
        log.info("payments: %d order(s) asked, %d settled by the query, %d without answer", done.asked,
                 len(done.settled), done.unavailable)
    return done


def payments_refunds():
    """Send pending refunds again, each with its own refund id (backoffice.payments.service)."""
    from backoffice.payments.service import retry_pending_refunds

    engine, platform = _payments_context()
    return retry_pending_refunds(engine, platform)


def payments_statements(now: datetime | None = None, tz: str = "Asia/Shanghai"):
    """Fetch, store once and reconcile the platform's files of the last ``STATEMENT_DAYS_BACK`` days (the platform
    cuts its day at local midnight in ``tz``); a file fetched again is found stored and changes nothing."""
    from backoffice.payments.platform import PlatformError
    from backoffice.payments.service import fetch_statement

    engine, platform = _payments_context()
    today = (now or datetime.now(UTC)).astimezone(ZoneInfo(tz)).date()
    done = []
    for back in range(STATEMENT_DAYS_BACK, 0, -1):
        day = today - timedelta(days=back)
        try:
            stored, items = fetch_statement(engine, platform, day=day, now=now, tz=tz)
        except PlatformError as e:
            log.warning("payments: statement of %s not fetched (%s); tried again next run", day, e)
            continue
        if stored.new:
            log.info("payments: statement of %s stored (%d line(s)), %d new work-list item(s)", day, stored.lines,
                     len(items))
            _payments_close(engine, day, tz)
        done.append((stored, items))
    return done


def _payments_close(engine: Engine, day: date, tz: str) -> None:
    """The day's close report (reports.payments_close) beside the other reports, when a statement came in. The
    statement is stored already, so a failure here is logged; ``farebox payments close-report`` makes it again."""
    _, reports_dir = _context()
    if reports_dir is None:
        return
    from backoffice.payments.close import close_figures
    from reports.payments_close import write_close_report

    try:
        with engine.connect() as conn:
            close = close_figures(conn, day=day, tz=tz)
        write_close_report(close, Path(reports_dir) / "payments")
    except Exception:
        log.exception("payments: the close report of %s was not written; `farebox payments close-report --day %s` "
                      "makes it", day, day)

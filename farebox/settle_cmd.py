"""``farebox settle`` and ``farebox jobs list|run|serve``: clearing a service day or a month, and the scheduled
jobs. Registered in farebox/cli.py by ``register(sub)``."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import year_month


def register(sub) -> None:
    p = sub.add_parser("settle", help="clear a service day (stored run, commission, net) and write its PDF, CSV "
                                      "and XLSX; or a month's report from the stored runs")
    p.add_argument("--operator", required=True)
    p.add_argument("--day", type=date.fromisoformat, default=None, help="service day YYYY-MM-DD")
    p.add_argument("--month", type=year_month, default=None, help="YYYY-MM: the month's report")
    p.add_argument("--out", type=Path, default=Path("var/reports"))
    p.set_defaults(func=_settle)

    p = sub.add_parser("jobs", help="scheduled jobs (stored in the database): list them, run one now, or run the "
                                    "scheduler alone")
    jobs_sub = p.add_subparsers(dest="action", required=True)
    p = jobs_sub.add_parser("list", help="the stored jobs with their next run, and each operator's last cleared day")
    p.set_defaults(func=_jobs_list)
    p = jobs_sub.add_parser("run", help="run a job now, in this process")
    p.add_argument("job", choices=["clearing"])
    p.add_argument("--operator", required=True)
    p.add_argument("--day", type=date.fromisoformat, default=None,
                   help="service day (default: the last one that has ended, and any skipped before it)")
    p.add_argument("--out", type=Path, default=None, help="reports folder (default <var_dir>/reports)")
    p.set_defaults(func=_jobs_run)
    p = jobs_sub.add_parser("serve", help="the scheduler alone, until SIGTERM / SIGINT")
    p.add_argument("--ready-file", type=Path, default=None, help="touched once the scheduler runs")
    p.set_defaults(func=_jobs_serve)


def _yuan(fen) -> str:
    from clearing.money import yuan

    return yuan(fen, symbol="¥")


def _not_begun(engine, operator: str, day: date) -> str | None:
    """Why ``day`` cannot be settled yet because it has not even begun (None when it has, or the operator is
    unknown: settle says so itself)."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from backoffice.models import Operator
    from clearing.service_day import day_bounds, local_time

    with engine.connect() as conn:
        op = conn.execute(select(Operator.timezone, Operator.cutoff_hour).where(Operator.code == operator)).first()
    if op is None:
        return None
    start = day_bounds(day, op.timezone, op.cutoff_hour)[0]
    if datetime.now(UTC) >= start:
        return None
    return (f"service day {day} has not begun: it starts {local_time(start, op.timezone)} {op.timezone}. "
            "Settle a day once it has ended")


def _still_running(engine, operator: str, day: date) -> str | None:
    from sqlalchemy import select

    from backoffice.models import Operator
    from clearing.service_day import day_bounds, local_time

    with engine.connect() as conn:
        op = conn.execute(select(Operator.timezone, Operator.cutoff_hour).where(Operator.code == operator)).first()
    if op is None:
        return None
    end = day_bounds(day, op.timezone, op.cutoff_hour)[1]
    return (f"service day {day} is still running (it ends {local_time(end, op.timezone)} {op.timezone}): "
            "figures so far, nothing stored")


def _settle(args, settings) -> int:
    from backoffice.settle import settle, settle_month

    if (args.day is None) == (args.month is None):
        print("farebox settle: give --day YYYY-MM-DD (a service day) or --month YYYY-MM", file=sys.stderr)
        return 2
    engine = bootstrap.start(settings).engine()
    if args.day is not None and (why := _not_begun(engine, args.operator, args.day)):
        print(f"farebox settle: {why}", file=sys.stderr)
        return 2
    try:
        with engine.begin() as conn:  # a day that has ended is cleared and its run stored: committed here
            if args.month is not None:
                m = settle_month(conn, operator=args.operator, year=args.month[0], month=args.month[1],
                                 reports_dir=args.out)
            else:
                d = settle(conn, operator=args.operator, day=args.day, reports_dir=args.out)
    except (LookupError, ValueError) as e:
        print(f"farebox settle: {e}", file=sys.stderr)
        return 2
    if args.month is not None:
        gross = sum(int(r.totals["day_gross"]) for r in m.runs)
        net = sum(int(r.totals["day_net"]) for r in m.runs)
        payable = sum(int(r.totals["payable_net"]) for r in m.runs)
        print(f"{args.operator} {m.first_day:%Y-%m}: {len(m.runs)} day(s) cleared, gross {_yuan(gross)}, net "
              f"{_yuan(net)}; payable with late taps and adjustments {_yuan(payable)}; "
              f"{len(m.missing)} day(s) without a clearing run left out")
        tickets = sum(int(r.totals.get("ticket_gross", 0)) for r in m.runs)
        if tickets:
            print(f"  e-tickets: revenue recognised {_yuan(tickets)} (no issuer commission on e-tickets)")
        print(f"reports: {', '.join(str(f) for f in m.files)}")
        return 0
    s, run = d.settlement, d.run
    if run is None:
        why = d.provisional
        if "still running" in why:  # said in the operator's own time, not as a UTC ISO stamp
            why = _still_running(engine, args.operator, args.day) or why
        print(f"{args.operator} {args.day}: PROVISIONAL, {why}")
        print(f"  {s.taps} fares, gross {_yuan(s.amount)}")
    else:
        t = run.totals
        print(f"{args.operator} {args.day}: clearing run {run.id}{' (stored already, checked)' if run.recleared else ''}"
              f": {t['day_taps']} fares, gross {_yuan(t['day_gross'])}, issuer commission "
              f"{_yuan(t['day_commission'])}, net {_yuan(t['day_net'])}; payable with late taps and adjustments "
              f"{_yuan(t['payable_net'])}")
        if t.get("ticket_gross") or t.get("ticket_day_uses") or t.get("ticket_late_uses"):
            # e-tickets: recognised revenue, beside the card fares; no issuer commission, not in payable
            print(f"  e-tickets: {t['ticket_day_uses']} use(s), revenue recognised {_yuan(t['ticket_day_gross'])}"
                  f"; for earlier days {_yuan(t['ticket_late_gross'])}; day's total (card gross + e-tickets) "
                  f"{_yuan(t['day_gross'] + t['ticket_day_gross'])} (no issuer commission on e-tickets)")
        if d.shift_items:
            print(f"  {len(d.shift_items)} shift(s) out of balance: see the reconciliation work list")
    print(f"reports: {', '.join(str(f) for f in d.files)}")
    return 0


def _jobs_list(args, settings) -> int:
    from sqlalchemy import func, select

    from backoffice.models import ClearingRun, Operator
    from backoffice.scheduler import clearing_job_id, stored_jobs
    from clearing.service_day import local_time

    engine = bootstrap.start(settings).read_engine()  # reading only: never migrates
    found = {job_id: (name, at, trigger) for job_id, name, at, trigger in stored_jobs(engine)}
    with engine.connect() as conn:
        ops = conn.execute(select(Operator.code, Operator.timezone).where(Operator.retired_at.is_(None))
                           .order_by(Operator.code)).all()
        last = dict(conn.execute(select(ClearingRun.operator, func.max(ClearingRun.service_day))
                                 .group_by(ClearingRun.operator)).all())
    zones = {op.code: op.timezone for op in ops}
    for job_id, (name, at, trigger) in sorted(found.items()):
        # each operator's jobs run in its own zone: say the time as its clerks read it, and name the zone
        tz = zones.get(job_id.rpartition(":")[2], "UTC")
        when = f"{local_time(at, tz)} {tz}" if at else "paused"
        print(f"{job_id:24} next {when:30} {trigger:32} {name}")
    for op in ops:
        if clearing_job_id(op.code) not in found:
            print(f"{clearing_job_id(op.code):24} not stored yet: added when the scheduler starts (farebox serve, "
                  "farebox jobs serve)")
        print(f"  {op.code}: last cleared service day {last.get(op.code) or 'none'}")
    return 0


def _jobs_run(args, settings) -> int:
    from backoffice.jobs import clear_operator

    engine = bootstrap.start(settings).engine()
    try:
        done = clear_operator(engine, operator=args.operator, day=args.day,
                              reports_dir=Path(settings.var_dir) / "reports" if args.out is None else args.out)
    except (LookupError, ValueError) as e:
        print(f"farebox jobs run: {e}", file=sys.stderr)
        return 2
    if not done:
        print(f"{args.operator}: nothing to clear (the last service day that has ended is cleared)")
    for d in done:
        what = "cleared" if d.cleared else "cleared before; checked again"
        print(f"{args.operator} {d.day}: clearing run {d.run_id} {what}"
              + (f"; {d.shift_items} shift(s) out of balance" if d.shift_items else ""))
        if d.reports:
            print(f"  reports: {', '.join(str(p) for p in d.reports)}")
    return 0


def _jobs_serve(args, settings) -> int:
    from backoffice.scheduler import start_scheduler, stop_scheduler
    from backoffice.signals import stop_requested

    engine = bootstrap.start(settings).engine()
    scheduler = start_scheduler(engine, settings)
    done = stop_requested()
    if args.ready_file:
        Path(args.ready_file).touch()
    done.wait()
    stop_scheduler(scheduler)
    return 0

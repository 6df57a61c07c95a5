"""``farebox payments ...``: the payment platform at the command line (backoffice.payments). Registered in
farebox/cli.py by ``register(sub)``.

- ``farebox payments query [ORDER_ID ...]``: ask the platform about orders still unpaid here (default: every one
  created in the last day whose notification never came) and settle the paid ones, once;
- ``farebox payments refund ORDER_ID [--ticket ID ...] --by WHO --why TEXT``: refund unused tickets (or a paid,
  unloaded top-up) through the platform, exactly once; ``farebox payments refund --retry`` sends pending refunds
  again with their own refund ids;
- ``farebox payments statement fetch --day YYYY-MM-DD``: fetch the platform's file, store it once, reconcile it
  into the payment work list (its new items are printed);
- ``farebox payments close-report --day YYYY-MM-DD --out DIR``: the day's sales/refunds/fees close (PDF, CSV,
  XLSX).

The platform: ``FAREBOX_PAYMENT_URL``, ``FAREBOX_PAYMENT_MERCHANT``, ``FAREBOX_PAYMENT_SECRET`` (hex), and its
Ed25519 public key as for the webhooks (``FAREBOX_PAYMENT_PUBLIC_KEY``). Money is shown in yuan. Exit 0 done,
1 refused or not settled, 2 cannot run.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path

from farebox.serve import scheduled_job


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: give YYYY-MM-DD") from None


def _yuan(fen: int) -> str:
    from clearing.money import yuan

    return yuan(fen, symbol="¥")


def _platform(settings):
    from backoffice.payments.platform import URL_ENV, platform_from_env
    from farebox import bootstrap

    root = bootstrap.start(settings, "payment", announce=False)
    platform = platform_from_env(root.payment_public_key)
    if platform is None:
        print(f"farebox payments: {URL_ENV} is not set: give the payment platform's address (and "
              "FAREBOX_PAYMENT_MERCHANT, FAREBOX_PAYMENT_SECRET)", file=sys.stderr)
        raise SystemExit(2)
    return root, platform


@scheduled_job
def payment_jobs(scheduler, services) -> None:
    """``farebox serve``: the order query, refund retries and statements (backoffice.scheduler.add_payment_jobs),
    when a platform is configured (``FAREBOX_PAYMENT_URL``); without one, notifications only."""
    import logging

    from backoffice.payments.platform import URL_ENV, platform_from_env
    from backoffice.scheduler import add_payment_jobs
    from farebox import bootstrap
    from farebox.config import load_settings

    log = logging.getLogger(__name__)
    if not os.environ.get(URL_ENV, "").strip():
        log.info("payments: no platform configured (%s): no order query, refund or statement jobs", URL_ENV)
        return
    try:  # the key serve checked at start; loaded again here by the same rule
        platform = platform_from_env(bootstrap.start(load_settings(), "payment", announce=False).payment_public_key)
    except (bootstrap.StartRefused, ValueError) as e:
        log.error("payments: the platform's settings are refused (%s): no order query, refund or statement jobs", e)
        return
    if platform is not None:
        add_payment_jobs(scheduler, platform)


def register(sub) -> None:
    p = sub.add_parser("payments", help="the payment platform: order query, refunds, daily statement, close report")
    act = p.add_subparsers(dest="action", required=True)
    q = act.add_parser("query", help="settle orders whose payment notification never came")
    q.add_argument("order_ids", nargs="*", metavar="ORDER_ID")
    q.set_defaults(func=_query)
    r = act.add_parser("refund", help="refund unused tickets or a paid, unloaded top-up, exactly once")
    r.add_argument("order_id", nargs="?", metavar="ORDER_ID")
    r.add_argument("--ticket", type=int, action="append", dest="tickets", help="only this ticket (repeatable)")
    r.add_argument("--by", help="who refunds")
    r.add_argument("--why", help="why")
    r.add_argument("--retry", action="store_true", help="send the pending refunds again (same refund ids)")
    r.set_defaults(func=_refund)
    s = act.add_parser("statement", help="the platform's daily statement").add_subparsers(dest="what", required=True)
    f = s.add_parser("fetch", help="fetch, store once, reconcile into the work list")
    f.add_argument("--day", type=_day, required=True)
    f.set_defaults(func=_fetch)
    c = act.add_parser("close-report", help="the day's sales, refunds and fees (PDF, CSV, XLSX)")
    c.add_argument("--day", type=_day, required=True)
    c.add_argument("--out", type=Path, default=None, help="folder (default: <var>/reports)")
    c.set_defaults(func=_close)


def _query(args, settings) -> int:
    from backoffice.payments.service import query_open_orders

    root, platform = _platform(settings)
    done = query_open_orders(root.engine(), platform, order_ids=args.order_ids or None)
    print(f"asked {done.asked}, settled {len(done.settled)}, not paid {done.unpaid}, unknown to the platform "
          f"{done.unknown}, no answer {done.unavailable}")
    for order_id in done.settled:
        print(f"  {order_id}: paid")
    return 0 if not done.unavailable else 1


def _refund(args, settings) -> int:
    from backoffice.payments import service

    root, platform = _platform(settings)
    if args.retry:
        rows = service.retry_pending_refunds(root.engine(), platform, older_than=__import__("datetime").timedelta(0))
    else:
        if not args.order_id or not args.by or not args.why:
            print("farebox payments refund: give ORDER_ID, --by and --why (or --retry)", file=sys.stderr)
            return 2
        try:
            rows = [service.refund(root.engine(), platform, order_id=args.order_id, who=args.by, why=args.why,
                                   ticket_ids=args.tickets)]
        except service.RefundError as e:
            print(f"farebox payments refund: refused ({e.code}): {e}", file=sys.stderr)
            return 1
    for row in rows:
        print(f"refund {row['refund_id']} of order {row['order_id']}: {_yuan(row['amount'])}, {row['state']}"
              f"{' (' + row['answer'] + ')' if row['answer'] else ''}, attempts {row['attempts']}")
    return 0 if all(row["state"] == "succeeded" for row in rows) else 1


def _fetch(args, settings) -> int:
    from backoffice.payments.platform import PlatformError
    from backoffice.payments.service import StatementError, fetch_statement

    root, platform = _platform(settings)
    try:
        stored, items = fetch_statement(root.engine(), platform, day=args.day)
    except (PlatformError, StatementError) as e:
        print(f"farebox payments statement fetch: {e}", file=sys.stderr)
        return 2
    print(f"statement {args.day}: #{stored.statement_id}, {stored.lines} line(s), "
          + ("stored" if stored.new else "the same file was stored already (nothing stored again)"))
    print(f"{len(items)} new work-list item(s)")
    for i in items:
        print(f"  {i.problem}: {i.ref} ours {'-' if i.ours is None else _yuan(i.ours)} "
              f"theirs {'-' if i.theirs is None else _yuan(i.theirs)}")
    return 0


def _close(args, settings) -> int:
    from backoffice.db import make_engine
    from backoffice.payments.close import close_figures
    from reports.payments_close import tie_out, write_close_report

    engine = make_engine(settings.effective_database_url)
    try:
        with engine.connect() as conn:
            close = close_figures(conn, day=args.day)
    finally:
        engine.dispose()
    out = args.out or Path(settings.var_dir) / "reports"
    for path in write_close_report(close, out):
        print(path)
    print(f"sales {_yuan(close.total('sales'))}, refunds {_yuan(close.total('refunds'))}, fees "
          f"{_yuan(close.total('fees'))}, net {_yuan(close.total('net'))}")
    for item, books, theirs in tie_out(close):
        print(f"  {item}: books {_yuan(books)}, statement {'-' if theirs is None else _yuan(theirs)}")
    return 0

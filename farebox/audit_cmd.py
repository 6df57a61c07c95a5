"""``farebox audit --operator X [--day D]``: re-derive every figure of the stored clearing runs from the raw tables
(``backoffice.audit_runs``, plain SQL that shares no code with clearing) and print each difference. Exit 0 when
there is none, 1 on any difference, 2 when the audit cannot run (unknown operator, no schema).

Read only: it never migrates nor writes the database. Registered in farebox/cli.py by ``register(sub)``.
"""

from __future__ import annotations

import sys
from datetime import date


def register(sub) -> None:
    p = sub.add_parser("audit", help="re-derive the stored clearing runs' figures from the raw tables with plain "
                                     "SQL and print every difference (exit 1 on any)")
    p.add_argument("--operator", required=True)
    p.add_argument("--day", type=date.fromisoformat, default=None,
                   help="service day YYYY-MM-DD: its run and its taps (default: every run of the operator)")
    p.add_argument("--limit", type=int, default=200, help="differences printed at most (all are counted)")
    p.set_defaults(func=_audit)


def print_result(result, *, day: date | None = None, limit: int = 200, out=None) -> None:
    out = out or sys.stdout
    scope = f"{result.operator} {day}" if day else f"{result.operator}, every run"
    if result.clean:
        print(f"audit {scope}: {result.runs} run(s), {result.taps} purchase(s): no differences", file=out)
        return
    print(f"audit {scope}: {result.runs} run(s), {result.taps} purchase(s): {len(result.differences)} "
          "DIFFERENCE(S) (figure: stored, re-derived)", file=out)
    for d in result.differences[:limit]:
        print(f"  {d.line()}", file=out)
    if len(result.differences) > limit:
        print(f"  ... and {len(result.differences) - limit} more", file=out)


def _audit(args, settings) -> int:
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from backoffice.audit_runs import audit, snapshot
    from backoffice.db import make_engine

    engine = make_engine(settings.effective_database_url)
    try:
        with snapshot(engine) as conn:
            if not inspect(conn).has_table("clearing_run"):
                print(f"farebox audit: no back-office schema at {engine.url.render_as_string(hide_password=True)}:"
                      " point FAREBOX_DATABASE_URL at the back office's database", file=sys.stderr)
                return 2
            result = audit(conn, operator=args.operator, day=args.day)
    except LookupError as e:
        print(f"farebox audit: {e}", file=sys.stderr)
        return 2
    except SQLAlchemyError as e:
        print(f"farebox audit: the database refused a query ({type(e).__name__}: {str(e).splitlines()[0]})",
              file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print_result(result, day=args.day, limit=args.limit)
    return 0 if result.clean else 1

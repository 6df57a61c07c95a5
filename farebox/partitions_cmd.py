"""``farebox partitions``: the day partitions of ``tap`` and ``quarantine`` on PostgreSQL (backoffice.partitions).

    farebox partitions list [--table tap|quarantine] [--exact] [--from DAY] [--to DAY]
                                                 every day: attached, archived (detached), or in DEFAULT, with rows
    farebox partitions make [--ahead N]          the days ahead (and those found in DEFAULT), as the daily job does
    farebox partitions detach DAY [DAY2] [--force]   a day or a range to the archive schema (refused while its taps
                                                 are not cleared, unless --force)
    farebox partitions attach DAY [DAY2]         archived days back into the table

``list`` gives the planner's row estimates (marked ``~``) unless ``--exact`` (count, sum of amounts and the taps not
cleared, a scan of each day listed). The exit status is 1 when a detach or attach was refused.
Registered in farebox/cli.py by ``register(sub)``.
"""

from __future__ import annotations

import sys
from datetime import date


def register(sub) -> None:
    p = sub.add_parser("partitions", help="day partitions of tap and quarantine (PostgreSQL): list, make, detach, "
                                          "attach")
    actions = p.add_subparsers(dest="action", required=True)

    q = actions.add_parser("list", help="every day: attached, archived or in DEFAULT, with its rows")
    q.add_argument("--table", default="tap", choices=("tap", "quarantine"))
    q.add_argument("--exact", action="store_true", help="count rows, amounts and uncleared taps (scans each day)")
    q.add_argument("--from", dest="first", type=date.fromisoformat, default=None, metavar="DAY")
    q.add_argument("--to", dest="last", type=date.fromisoformat, default=None, metavar="DAY")
    q.set_defaults(func=_list)

    q = actions.add_parser("make", help="partitions for the days ahead and for days found in DEFAULT")
    q.add_argument("--ahead", type=int, default=None, help="days ahead of today (default 7)")
    q.set_defaults(func=_make)

    for name, helptext in (("detach", "move a day (or DAY..DAY2) out of the table into the archive schema"),
                           ("attach", "bring archived days back into the table")):
        q = actions.add_parser(name, help=helptext)
        q.add_argument("day", type=date.fromisoformat, metavar="DAY")
        q.add_argument("last", type=date.fromisoformat, nargs="?", default=None, metavar="DAY2",
                       help="the last day of a range (inclusive)")
        q.add_argument("--table", default="tap", choices=("tap", "quarantine"))
        if name == "detach":
            q.add_argument("--force", action="store_true",
                           help="detach even taps not cleared yet (or open quarantine rows)")
        q.set_defaults(func=_detach if name == "detach" else _attach)


def _fmt(row) -> str:
    rows = f"{row.rows:>12,}" if row.exact else f"{'~' + format(row.rows, ','):>12}"
    amount = "" if row.amount is None else f"  {row.amount / 100:>14,.2f}"
    open_ = "" if row.open is None else f"  {row.open:>10,}"
    day = "(no day)" if row.day is None else row.day.isoformat()
    return f"{day:<10}  {row.state:<8}  {row.where:<32}{rows}{amount}{open_}"


def _list(args, settings) -> int:
    from backoffice import partitions
    from farebox import bootstrap

    engine = bootstrap.start(settings).read_engine()
    with engine.connect() as conn:
        try:
            rows = partitions.listing(conn, args.table, exact=args.exact)
        except partitions.PartitionError as e:
            print(f"farebox partitions list: {e}", file=sys.stderr)
            return 1
    rows = [r for r in rows if (args.first is None or (r.day is not None and r.day >= args.first))
            and (args.last is None or (r.day is not None and r.day <= args.last))]
    open_name = "not cleared" if args.table == "tap" else "open"
    print(f"{'day':<10}  {'state':<8}  {'table':<32}{'rows':>12}" + ("  {:>14}  {:>10}".format(
        "amount (yuan)" if args.table == "tap" else "", open_name) if args.exact else ""))
    for r in rows:
        print(_fmt(r))
    by_state = {s: [r for r in rows if r.state == s] for s in ("attached", "archived", "default")}
    print(f"{len(by_state['attached'])} day(s) attached, {len(by_state['archived'])} archived (detached: "
          f"{', '.join(str(r.day) for r in by_state['archived']) or 'none'}), "
          f"{sum(r.rows for r in by_state['default']):,} row(s) in {args.table}_default"
          + (f" over {len(by_state['default'])} day(s): `farebox partitions make` gives them partitions"
             if by_state["default"] else ""))
    if not args.exact:
        print("(~ : the planner's estimate, as of the last ANALYZE; --exact counts)")
    return 0


def _make(args, settings) -> int:
    from backoffice import partitions
    from farebox import bootstrap

    engine = bootstrap.start(settings).engine()
    try:
        made = partitions.make(engine, **({} if args.ahead is None else {"ahead": args.ahead}))
    except partitions.PartitionError as e:
        print(f"farebox partitions make: {e}", file=sys.stderr)
        return 1
    for m in made:
        moved = f", {m.moved:,} row(s) moved out of {m.table}_default" if m.moved else ""
        print(f"made {m.name}{moved}")
    print(f"{len(made)} partition(s) made" if made else "nothing to make: every day wanted has its partition")
    return 0


def _days(args):
    from backoffice import partitions

    return partitions.days_between(args.day, args.last) if args.last else [args.day]


def _detach(args, settings) -> int:
    from backoffice import partitions
    from farebox import bootstrap

    engine = bootstrap.start(settings).engine()
    failed = 0
    for day in _days(args):
        try:
            with engine.begin() as conn:
                r = partitions.detach(conn, args.table, day, force=args.force)
        except partitions.PartitionError as e:
            print(f"farebox partitions detach: {e}", file=sys.stderr)
            failed += 1
            continue
        amount = "" if r.amount is None else f", {r.amount / 100:,.2f} yuan"
        uncleared = f" ({r.open:,} not cleared, forced)" if r.open else ""
        print(f"detached {day}: {r.rows:,} row(s){amount}{uncleared} now in {r.where}")
    return 1 if failed else 0


def _attach(args, settings) -> int:
    from backoffice import partitions
    from farebox import bootstrap

    engine = bootstrap.start(settings).engine()
    failed = 0
    for day in _days(args):
        try:
            with engine.begin() as conn:
                r, moved = partitions.attach(conn, args.table, day)
        except partitions.PartitionError as e:
            print(f"farebox partitions attach: {e}", file=sys.stderr)
            failed += 1
            continue
        late = f" ({moved:,} of them arrived while it was archived, from {args.table}_default)" if moved else ""
        print(f"attached {day}: {r.rows:,} row(s) in {r.where}{late}")
    return 1 if failed else 0

"""``farebox ticket-revenue ...``: how ticket revenue is recognised and what is still owed as rides
(backoffice.tickets.revenue, clearing.tickets). Registered in farebox/cli.py by ``register(sub)``.

- ``farebox ticket-revenue rule --operator OP --product CODE (--per-ride YUAN | --spread) --by WHO``: state a
  pass's rule (each ride at a stated value, or the price spread over its days of validity). Single rides and
  coach trips are always recognised at use at the price paid.
- ``farebox ticket-revenue outstanding --operator OP``: the deferred balance (sold, not yet recognised) by product
  after the operator's latest clearing run, in yuan.
"""

from __future__ import annotations

import sys

from farebox import bootstrap
from farebox.cli_types import amount_in_yuan


def register(sub) -> None:
    p = sub.add_parser("ticket-revenue", help="ticket revenue: a pass's recognition rule, the deferred balance")
    s = p.add_subparsers(dest="ticket_revenue_command", required=True)
    r = s.add_parser("rule", help="state how a pass's revenue is recognised")
    r.add_argument("--operator", required=True)
    r.add_argument("--product", required=True, help="the pass's product code")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--per-ride", type=amount_in_yuan, dest="per_ride", metavar="YUAN",
                     help="each ride earns this much (yuan, e.g. 2.50) until the price is used up")
    how.add_argument("--spread", action="store_true", help="the price spread over the service days of validity")
    r.add_argument("--by", required=True, help="who states the rule")
    r.set_defaults(func=_rule)
    o = s.add_parser("outstanding", help="sold, not yet recognised, by product, after the latest clearing run")
    o.add_argument("--operator", required=True)
    o.set_defaults(func=_outstanding)


def _yuan(fen: int) -> str:
    from clearing.money import yuan

    return yuan(fen, symbol="¥")


def _rule(args, settings) -> int:
    from backoffice.tickets import revenue

    rule = "spread" if args.spread else "per_ride"
    try:
        with bootstrap.start(settings).engine().begin() as conn:
            revenue.set_rule(conn, operator=args.operator, product=args.product, rule=rule,
                             ride_value_fen=args.per_ride or 0, by=args.by)
    except (LookupError, ValueError, TypeError) as e:
        print(f"farebox ticket-revenue rule: {e}", file=sys.stderr)
        return 2
    said = (f"each ride earns {_yuan(args.per_ride)} until the price is used up" if rule == "per_ride"
            else "its price is spread over its service days of validity")
    print(f"{args.operator} {args.product}: {said}; unused money at the end of validity is breakage")
    return 0


def _outstanding(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from backoffice import clearing_runs
    from backoffice.tickets import revenue

    with bootstrap.start(settings).read_engine().connect() as conn:
        run = clearing_runs.latest_run(conn, args.operator)
        if run is None:
            print(f"farebox ticket-revenue outstanding: {args.operator} has no clearing run yet", file=sys.stderr)
            return 2
        frame = revenue.outstanding(conn, operator=args.operator, run_id=run.id, as_of=run.as_of)
    table = Table(title=f"{args.operator}: sold, not yet recognised, after clearing run {run.id} ({run.day})")
    for heading in ("product", "tickets", "sold", "refunded", "recognised", "deferred"):
        table.add_column(heading, justify="left" if heading == "product" else "right")
    for r in frame.itertuples(index=False):
        table.add_row(r.product, str(r.tickets), *(_yuan(int(getattr(r, c))) for c in
                                                   ("sold", "refunded", "recognised", "deferred")))
    table.add_row("total", str(int(frame["tickets"].sum())),
                  *(_yuan(int(frame[c].sum())) for c in ("sold", "refunded", "recognised", "deferred")))
    Console(width=120).print(table)
    return 0

"""``farebox quarantine``: what ingest would not store, and the review of it (backoffice.quarantine).

    farebox quarantine                         the open rows, newest first (as before: ``--limit``)
    farebox quarantine list [--status all] [--device D] [--matching TEXT]
    farebox quarantine show ID                 the row, its record, the validator's PSAMs over time
    farebox quarantine release ID... --why W   every ingest check again: stored once, or still open with the reason
    farebox quarantine release --device D --matching "not the PSAM" --why W    every open row that matches
    farebox quarantine reject ID... --why W    closed for good, nothing stored

Decisions are signed ``--by`` (default: the login name) and written to the audit trail. Each row is released or
rejected in a transaction of its own; the exit status is 1 when any row was not (still failing, or decided already).
Registered in farebox/cli.py by ``register(sub)``.
"""

from __future__ import annotations

import getpass
import sys


def register(sub) -> None:
    p = sub.add_parser("quarantine", help="what ingest could not accept; review it: list, show, release, reject")
    p.add_argument("--limit", type=int, default=50, help="rows listed (default 50)")
    p.set_defaults(func=_list, status="open", device=None, matching=None)
    actions = p.add_subparsers(dest="action")

    q = actions.add_parser("list", help="quarantine rows, newest first")
    q.add_argument("--status", default="open", choices=("open", "released", "rejected", "all"))
    q.add_argument("--device", default=None, help="one validator's rows")
    q.add_argument("--matching", default=None, metavar="TEXT", help="rows whose reason contains TEXT")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=_list)

    q = actions.add_parser("show", help="one row: its record and the validator's PSAMs over time")
    q.add_argument("id", type=int)
    q.set_defaults(func=_show)

    for name, helptext in (("release", "put rows through every ingest check again; stored once if they pass"),
                           ("reject", "close rows for good; nothing is stored")):
        q = actions.add_parser(name, help=helptext)
        q.add_argument("ids", type=int, nargs="*", metavar="ID")
        q.add_argument("--device", default=None, help="with --matching: every open row of this validator ...")
        q.add_argument("--matching", default=None, metavar="TEXT", help="... whose reason contains TEXT")
        q.add_argument("--why", required=True, help="the reason, for the audit trail")
        q.add_argument("--by", default=None, help="who decides (default: the login name)")
        if name == "release":
            q.add_argument("--accept-unsigned", action="store_true",
                           help="as `farebox ingest --accept-unsigned`: take rows of unsigned v1 batches")
        q.set_defaults(func=_decide, decision=name)


def _list(args, settings) -> int:
    from backoffice import quarantine
    from farebox import bootstrap

    engine = bootstrap.start(settings).read_engine()
    status = None if args.status == "all" else args.status
    with engine.connect() as conn:
        rows, total = quarantine.items(conn, status=status, device=args.device, matching=args.matching,
                                       limit=args.limit)
    for r in rows:
        seq = "-" if r.device_seq is None else r.device_seq
        reason = r.reason if r.recheck_reason is None else f"{r.reason}  [rechecked: {r.recheck_reason}]"
        print(f"{r.id:>7}  {r.received_at:%Y-%m-%d %H:%M:%S}  {r.status:<8} {r.device_id:<20} {seq:>8}  {reason}")
    print(f"{len(rows)} of {total} {args.status} quarantined record(s) shown")
    return 0


def _show(args, settings) -> int:
    from backoffice import quarantine
    from farebox import bootstrap

    engine = bootstrap.start(settings).read_engine()
    with engine.connect() as conn:
        try:
            d = quarantine.details(conn, args.id)
        except quarantine.NotFound as e:
            print(f"farebox quarantine show: {e}", file=sys.stderr)
            return 1
    for name in ("id", "status", "received_at", "topic", "device_id", "device_seq", "reason", "signed",
                 "recheck_reason", "rechecked_at", "resolved_by", "resolved_at", "resolution", "tap_id"):
        print(f"{name:>15}: {'-' if d[name] is None else d[name]}")
    if d["record"] is not None:
        print("         record:")
        from clearing.money import yuan

        for name, value in d["record"].items():
            if name in ("amount", "balance_after", "full_fare") and isinstance(value, int):
                value = f"{yuan(value, symbol='¥')}  ({value} fen, as the card and the wire carry it)"
            print(f"{name:>15}  {value}")
    else:
        print(f"         record: {d['record_problem']}")
    print("          PSAMs: (the registry's history of this validator)")
    for v in d["psams"]:
        until = "now" if v["valid_to"] is None else f"{v['valid_to']:%Y-%m-%d %H:%M:%S}Z"
        print(f"                 {v['terminal_id']}  from {v['valid_from']:%Y-%m-%d %H:%M:%S}Z until {until}")
    return 0


def _decide(args, settings) -> int:
    from backoffice import quarantine
    from backoffice.ingest import Ingest
    from farebox import bootstrap

    if not args.ids and not (args.device and args.matching):
        print(f"farebox quarantine {args.decision}: name the rows (IDs), or every open row of a validator with "
              "--device D --matching TEXT", file=sys.stderr)
        return 2
    needs = ("issuer", "device_master") if args.decision == "release" else ()
    try:
        root = bootstrap.start(settings, *needs)
    except bootstrap.StartRefused as e:
        print(f"farebox quarantine {args.decision}: {e}", file=sys.stderr)
        return 2
    engine = root.engine()
    by = args.by or getpass.getuser()
    ids = list(args.ids)
    if args.device and args.matching:
        with engine.connect() as conn:
            rows, _ = quarantine.items(conn, status="open", device=args.device, matching=args.matching, limit=100_000)
        ids += sorted(r.id for r in rows if r.id not in ids)
    ingest = None
    if args.decision == "release":
        ingest = Ingest(keys=root.key_service, master=root.device_master, accept_unsigned=args.accept_unsigned,
                        write="copy" if engine.dialect.name == "postgresql" else "insert")
    done = failed = 0
    for qid in ids:
        try:
            with engine.begin() as conn:
                if ingest is not None:
                    outcome = quarantine.release(conn, qid, by=by, why=args.why, ingest=ingest)
                    if outcome.released:
                        done += 1
                        print(f"{qid}: released, {outcome.item.resolution}")
                    else:
                        failed += 1
                        print(f"{qid}: still quarantined: {outcome.still_failing}")
                else:
                    quarantine.reject(conn, qid, by=by, why=args.why)
                    done += 1
                    print(f"{qid}: rejected")
        except quarantine.QuarantineError as e:
            failed += 1
            print(f"{qid}: {e}", file=sys.stderr)
    print(f"{done} {'released' if ingest is not None else 'rejected'}, {failed} not")
    return 1 if failed else 0

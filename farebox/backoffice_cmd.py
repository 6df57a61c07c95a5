"""``farebox demo``, ``farebox serve``, ``farebox db upgrade`` and ``farebox token add|list``: the back office as
one process, its schema and its API tokens. Registered in farebox/cli.py by ``register(sub)``."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import fractions


def register(sub) -> None:
    p = sub.add_parser("demo", help="one service day of a simulated city, from card to settlement PDF; ends with "
                                    "the line that opens the same data in the browser (farebox serve)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--day", type=date.fromisoformat, default=None, help="service day (default: yesterday)")
    p.add_argument("--riders", type=int, default=200)
    p.add_argument("--buses", type=int, default=None, metavar="N",
                   help="a city of N buses instead (e.g. 1000): real validators in districts of 100, a Mosquitto of "
                        "the run's own, the throughput of each stage (farebox.demo_city)")
    p.add_argument("--district", type=int, default=100, metavar="K",
                   help="with --buses: buses per child process (default 100; paho takes ~150 at most in one)")
    p.add_argument("--kill-ingest-at", type=fractions, default=(),
                   help="fractions of the day (e.g. 0.3,0.6) at which ingest is killed with SIGKILL and restarted")
    p.set_defaults(func=_demo)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=_db_upgrade)

    p = sub.add_parser("serve", help="the back office in one process: API and web pages, and (embedded default) "
                                     "ingest, the status consumer, the deny-list publisher and the scheduler")
    p.add_argument("--host", default="127.0.0.1", help="address the pages and API listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--web-only", action="store_true", help="only the API and pages")
    p.add_argument("--no-web", action="store_true", help="no API and pages (the MQTT parts and scheduler only)")
    p.add_argument("--no-ingest", action="store_true", help="no ingest (run it alone: farebox ingest)")
    p.add_argument("--no-status", action="store_true", help="no status consumer (alone: farebox device monitor)")
    p.add_argument("--no-publisher", action="store_true", help="no deny-list publisher (alone: farebox denylist serve)")
    p.add_argument("--no-scheduler", action="store_true", help="no scheduled jobs")
    p.add_argument("--operator", default=None, help="MQTT parts: only this operator's buses")
    p.add_argument("--ready-file", type=Path, default=None, help="touch this file once every part is up")
    p.set_defaults(func=_serve)

    p = sub.add_parser("token", help="API and web-page tokens (kept hashed in the token file: setting "
                                     "api_tokens_file or FAREBOX_API_TOKENS, default var/api-tokens.toml)")
    token = p.add_subparsers(dest="action", required=True)
    p = token.add_parser("add", help="make a token, print it once, keep its SHA-256")
    p.add_argument("--role", required=True, choices=["clerk", "operator_staff", "operations", "admin", "partner"])
    p.add_argument("--name", required=True, help="who holds it")
    p.add_argument("--operator", default=None,
                   help="the bus company a clerk or a partner works for (required for those two roles)")
    p.add_argument("--lang", choices=["zh", "en"], default=None,
                   help="the holder's page language (default: the name's earlier choice, else the browser's)")
    p.add_argument("--file", type=Path, default=None, help="the token file (default: the api_tokens_file setting)")
    p.add_argument("--days", type=float, default=None,
                   help="how many days the token works (default 90: backoffice.web.auth.DEFAULT_TOKEN_DAYS); "
                        "renew it with a new one")
    p.set_defaults(func=_token_add)
    p = token.add_parser("list", help="names, roles, operators, page languages and the state of the tokens "
                                      "(expiry, revoked)")
    p.add_argument("--file", type=Path, default=None)
    p.set_defaults(func=_token_list)
    p = token.add_parser("revoke", help="stop a person's token now (a running farebox serve refuses it at once, "
                                        "and ends the web page sessions opened with it)")
    p.add_argument("--name", required=True, help="whose token (as farebox token list shows)")
    p.add_argument("--file", type=Path, default=None)
    p.set_defaults(func=_token_revoke)


def _demo(args, settings) -> int:
    from farebox.demo import run_demo

    if args.buses is not None:
        from farebox.demo_city import run_city

        return 0 if run_city(settings, buses=args.buses, seed=args.seed, day=args.day,
                                 district=args.district).consistent else 1
    result = run_demo(settings, seed=args.seed, day=args.day, riders=args.riders, kill_ingest_at=args.kill_ingest_at)
    return 0 if result.consistent else 1


def _db_upgrade(args, settings) -> int:
    engine = bootstrap.start(settings).engine()
    print(f"schema is current on {engine.url.render_as_string(hide_password=True)}")
    return 0


def _serve(args, settings) -> int:
    from farebox.serve import ServeOptions, serve

    web_only = args.web_only
    options = ServeOptions(host=args.host, port=args.port, ingest=not (args.no_ingest or web_only),
                           status=not (args.no_status or web_only), publisher=not (args.no_publisher or web_only),
                           scheduler=not (args.no_scheduler or web_only), web=not args.no_web,
                           operator=args.operator, ready_file=args.ready_file)
    return serve(settings, options)


def _token_add(args, settings) -> int:
    from backoffice.web.auth import DEFAULT_TOKEN_DAYS, TokenFileError, add_token

    path = args.file or settings.tokens_path
    if args.operator is not None:
        refused = _unknown_operator(settings, args.operator)
        if refused:
            print(f"farebox token add: {refused}", file=sys.stderr)
            return 2
    try:
        token = add_token(path, role=args.role, name=args.name, operator=args.operator,
                          days=DEFAULT_TOKEN_DAYS if args.days is None else args.days, lang=args.lang)
    except TokenFileError as e:
        print(f"farebox token add: {e}", file=sys.stderr)
        return 2
    print(token)
    print(f"token for {args.name} ({args.role}{', ' + args.operator if args.operator else ''}); only its SHA-256 is "
          f"kept, in {path}: this is the one time it is shown", file=sys.stderr)
    return 0


def _unknown_operator(settings, operator: str) -> str | None:
    """Why a token cannot be tied to ``operator`` in the configured database, or None when it can."""
    from sqlalchemy import select

    from backoffice.models import Operator

    engine = bootstrap.start(settings).read_engine()  # reading only: never migrates
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Operator.retired_at).where(Operator.code == operator)).first()
            known = sorted(conn.execute(select(Operator.code).where(Operator.retired_at.is_(None))).scalars())
    finally:
        engine.dispose()
    if row is not None and row.retired_at is None:
        return None
    if row is not None:
        return f"operator {operator!r} is retired in {where}: a token cannot be given for it"
    return (f"operator {operator!r} is not registered in {where} (registered: {', '.join(known) or 'none'}). "
            f"Add it first with `farebox registry add-operator --code {operator} --name NAME --by YOU`, or check "
            "FAREBOX_DATABASE_URL names the back office's database")


def _token_list(args, settings) -> int:
    from datetime import UTC, datetime

    from backoffice.web.auth import TokenFileError, TokenStore

    path = args.file or settings.tokens_path
    try:
        entries = TokenStore(path).entries()
    except TokenFileError as e:
        print(f"farebox token list: {e}", file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    for e in entries:
        p = e.principal
        print(f"{p.name:<24} {p.role:<15} {p.operator or '':<12} {e.lang or '-':<4} {e.state(now)}")
    working = sum(e.valid_at(now) for e in entries)
    print(f"{len(entries)} token(s) in {path}, {working} working")
    return 0


def _token_revoke(args, settings) -> int:
    from backoffice.web.auth import TokenFileError, revoke_token

    path = args.file or settings.tokens_path
    try:
        n = revoke_token(path, name=args.name)
    except TokenFileError as e:
        print(f"farebox token revoke: {e}", file=sys.stderr)
        return 2
    print(f"revoked {n} token(s) of {args.name} in {path}; their web page sessions end with them")
    return 0

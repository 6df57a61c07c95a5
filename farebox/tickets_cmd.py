"""``farebox ticket ...``: the ticket catalogue and orders (backoffice.tickets). Registered in farebox/cli.py by
``register(sub)``.

- ``farebox ticket product add --operator OP --code CODE --kind single|day_pass|month_pass|coach_trip --name NAME
  --price YUAN [--routes C1,C2] [--days N] [--uses N] [--category adult|student|elderly|staff] --by WHO``
- ``farebox ticket product list --operator OP [--all]``
- ``farebox ticket departure add --operator OP --product CODE --route R --date YYYY-MM-DD --time HH:MM --seats N``
- ``farebox ticket departure import-gtfs FEED --operator OP --product CODE --from DATE --to DATE --seats N
  [--route R ...]``
- ``farebox ticket departure list --operator OP [--date D [--until D]] [--route R]``
- ``farebox ticket order show ORDER_ID [--codes]`` (``--codes``: each ticket's pickup code and QR text, made with
  the ticket keys, so the published test keys are refused outside labs)
- ``farebox ticket keys init --out DIR`` (a fresh ticket signing seed and pickup master, and the settings to give);
  ``farebox ticket keys show`` (the public key and key id validators get; never a secret)

Prices are typed and shown in yuan (``--price 30.00``); the back office keeps fen. Times are shown on the
operator's clock.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import amount_in_yuan
from farebox.serve import scheduled_job

CATEGORIES = {"adult": 1, "student": 2, "elderly": 3, "staff": 4}


@scheduled_job
def ticket_expiry_job(scheduler, services) -> None:
    """``farebox serve``: every minute, unpaid orders past their hold give their seats back and tickets past their
    validity expire (backoffice.tickets.jobs). In memory: it takes the engine, which is not stored."""
    from backoffice.tickets.jobs import EVERY_SECONDS, expire_due

    scheduler.add_job(expire_due, "interval", seconds=EVERY_SECONDS, args=(services.engine,), id="tickets-expiry",
                      jobstore="memory", replace_existing=True, name="expire unpaid ticket orders and old tickets")


def _category(text: str) -> int:
    if text.isdigit() and 0 < int(text) < 256:
        return int(text)
    if text.lower() in CATEGORIES:
        return CATEGORIES[text.lower()]
    raise argparse.ArgumentTypeError(f"{text!r}: a rider category is one of {', '.join(CATEGORIES)} or its number")


def _category_name(n: int) -> str:
    return next((name for name, v in CATEGORIES.items() if v == n), f"type {n}")


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: give YYYY-MM-DD") from None


def _routes(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def _yuan(fen: int) -> str:
    from clearing.money import yuan

    return yuan(fen, symbol="¥")


def register(sub) -> None:
    p = sub.add_parser("ticket", help="tickets beside cards: products, coach departures, orders")
    ticket = p.add_subparsers(dest="what", required=True)

    product = ticket.add_parser("product", help="what an operator sells").add_subparsers(dest="action", required=True)
    p = product.add_parser("add", help="add a product to an operator's catalogue")
    p.add_argument("--operator", required=True)
    p.add_argument("--code", required=True, help="short code, e.g. ride, day, airport")
    p.add_argument("--kind", required=True, choices=["single", "day_pass", "month_pass", "coach_trip"])
    p.add_argument("--name", required=True)
    p.add_argument("--price", required=True, type=amount_in_yuan, metavar="YUAN", help="price in yuan, e.g. 30.00")
    p.add_argument("--routes", type=_routes, default=[], metavar="R1,R2",
                   help="the routes it is good on (default: any route; coach trips: set per departure)")
    p.add_argument("--days", type=int, default=None,
                   help="validity in the operator's service days (default: 1; a month pass 30)")
    p.add_argument("--uses", type=int, default=None, help="rides allowed, 0 = unlimited (default: 1 for a single "
                                                          "ride or coach trip, 0 for passes)")
    p.add_argument("--category", type=_category, default=1, help="rider category: adult (default), student, ...")
    p.add_argument("--by", required=True, help="who adds it")
    p.set_defaults(func=_product_add)
    p = product.add_parser("list", help="an operator's products")
    p.add_argument("--operator", required=True)
    p.add_argument("--all", action="store_true", help="also the ones no longer sold")
    p.set_defaults(func=_product_list)
    for name, active in (("stop", False), ("resume", True)):
        p = product.add_parser(name, help=f"{name} selling a product (tickets sold stay good)")
        p.add_argument("--operator", required=True)
        p.add_argument("--code", required=True)
        p.set_defaults(func=_product_active, active=active)

    dep = ticket.add_parser("departure", help="coach departures and their seats").add_subparsers(
        dest="action", required=True)
    p = dep.add_parser("add", help="one coach departure")
    p.add_argument("--operator", required=True)
    p.add_argument("--product", required=True, help="the coach_trip product's code")
    p.add_argument("--route", required=True)
    p.add_argument("--date", required=True, type=_day, help="service date YYYY-MM-DD")
    p.add_argument("--time", required=True, help="local departure time HH:MM (24:00 and later: after midnight)")
    p.add_argument("--seats", required=True, type=int)
    p.set_defaults(func=_departure_add)
    p = dep.add_parser("import-gtfs", help="departures from a GTFS feed's trips (calendar.txt / calendar_dates.txt "
                                           "say which days each runs)")
    p.add_argument("feed", type=Path, help="a GTFS folder or .zip")
    p.add_argument("--operator", required=True)
    p.add_argument("--product", required=True, help="the coach_trip product's code")
    p.add_argument("--from", dest="start", required=True, type=_day, help="first service date YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, type=_day, help="last service date YYYY-MM-DD")
    p.add_argument("--seats", required=True, type=int, help="seats of each departure")
    p.add_argument("--route", action="append", default=[], help="only this route's trips (repeatable)")
    p.set_defaults(func=_departure_import)
    p = dep.add_parser("list", help="departures with their seats free")
    p.add_argument("--operator", required=True)
    p.add_argument("--date", type=_day, default=None, help="service date (default: all)")
    p.add_argument("--until", type=_day, default=None, help="last service date, with --date")
    p.add_argument("--route", default=None)
    p.set_defaults(func=_departure_list)

    order = ticket.add_parser("order", help="ticket orders").add_subparsers(dest="action", required=True)
    p = order.add_parser("show", help="an order: items, tickets, payment and every change")
    p.add_argument("order_id")
    p.add_argument("--codes", action="store_true", help="also each ticket's pickup code and QR text (to send "
                                                        "again); needs the ticket keys")
    p.set_defaults(func=_order_show)

    keys = ticket.add_parser("keys", help="the ticket signing key and pickup master").add_subparsers(
        dest="action", required=True)
    p = keys.add_parser("init", help="fresh ticket keys in a new folder, and the settings lines to use")
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    p.add_argument("--key-id", type=int, default=1, help="the key id tokens carry (1..255, default 1; change it "
                                                         "with each new key so buses can hold old and new)")
    p.set_defaults(func=_keys_init)
    p = keys.add_parser("show", help="the public key and key id the validators check tickets with")
    p.set_defaults(func=_keys_show)


def _fail(e: Exception) -> int:
    print(f"farebox ticket: {e}", file=sys.stderr)
    return 2


def _write(settings, work) -> int:
    from backoffice.gtfs import GtfsError
    from backoffice.tickets.catalogue import CatalogueError
    from backoffice.tickets.orders import OrderError

    engine = bootstrap.start(settings).engine()
    try:
        with engine.begin() as conn:
            lines = work(conn)
    except (CatalogueError, OrderError, GtfsError) as e:
        return _fail(e)
    print("\n".join(lines))
    return 0


def _product_line(p) -> str:
    rides = "unlimited rides" if p.uses == 0 else f"{p.uses} ride{'s' if p.uses != 1 else ''}"
    where = "routes " + ", ".join(p.routes) if p.routes else ("its departure's route" if p.kind == "coach_trip"
                                                              else "any route")
    return (f"{p.code}: {p.name} ({p.kind}) {_yuan(p.price_fen)}, {rides}, {p.validity_days} service day"
            f"{'s' if p.validity_days != 1 else ''}, {where}, {_category_name(p.rider_category)}"
            f"{'' if p.active else ' - not sold'}")


def _product_add(args, settings) -> int:
    from backoffice.tickets import catalogue

    def add(conn):
        p = catalogue.add_product(conn, operator=args.operator, code=args.code, kind=args.kind, name=args.name,
                                  price_fen=args.price, routes=args.routes, validity_days=args.days, uses=args.uses,
                                  rider_category=args.category, by=args.by)
        return [f"{args.operator} now sells {_product_line(p)}"]
    return _write(settings, add)


def _product_active(args, settings) -> int:
    from backoffice.tickets import catalogue

    def change(conn):
        p = catalogue.set_product_active(conn, operator=args.operator, code=args.code, active=args.active)
        return [_product_line(p)]
    return _write(settings, change)


def _product_list(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from backoffice.tickets import catalogue

    with bootstrap.start(settings).read_engine().connect() as conn:
        rows = catalogue.list_products(conn, args.operator, active_only=not args.all)
    if not rows:
        print(f"{args.operator} sells no tickets yet: farebox ticket product add --operator {args.operator} ...")
        return 0
    table = Table(title=f"{args.operator}: products")
    for col in ("code", "name", "kind", "price", "valid", "rides", "routes", "rider", "sold"):
        table.add_column(col, justify="right" if col == "price" else "left")
    for p in rows:
        table.add_row(p.code, p.name, p.kind, _yuan(p.price_fen), f"{p.validity_days} d",
                      "unlimited" if p.uses == 0 else str(p.uses),
                      " ".join(p.routes) or ("per departure" if p.kind == "coach_trip" else "any"),
                      _category_name(p.rider_category), "yes" if p.active else "no")
    Console(width=120).print(table)
    return 0


def _departure_line(d, tz: str) -> str:
    from clearing.service_day import local_time

    return (f"departure {d.id}: {d.product} on route {d.route}, service day {d.service_date}, leaves "
            f"{local_time(d.departs_at, tz)} ({tz}), {d.seats_free} of {d.seats} seats free")


def _tz(conn, operator: str) -> str:
    from sqlalchemy import select

    from backoffice.models import Operator

    return conn.execute(select(Operator.timezone).where(Operator.code == operator)).scalar() or "Asia/Shanghai"


def _departure_add(args, settings) -> int:
    from backoffice.tickets import catalogue

    def add(conn):
        d = catalogue.add_departure(conn, operator=args.operator, product=args.product, route=args.route,
                                    service_date=args.date, departs=args.time, seats=args.seats)
        return [_departure_line(d, _tz(conn, args.operator))]
    return _write(settings, add)


def _departure_import(args, settings) -> int:
    from backoffice.tickets import catalogue

    def run(conn):
        report = catalogue.import_gtfs_departures(conn, operator=args.operator, product=args.product,
                                                  folder_or_zip=args.feed, start=args.start, end=args.end,
                                                  seats=args.seats, routes=args.route)
        return report.lines()
    return _write(settings, run)


def _departure_list(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from backoffice.tickets import catalogue
    from clearing.service_day import local_time

    with bootstrap.start(settings).read_engine().connect() as conn:
        rows = catalogue.list_departures(conn, args.operator, day=args.date, until=args.until, route=args.route)
        tz = _tz(conn, args.operator)
    if not rows:
        print(f"no departures of {args.operator}{' on ' + str(args.date) if args.date else ''}")
        return 0
    table = Table(title=f"{args.operator}: departures ({tz})")
    for col in ("id", "product", "route", "service day", "departs", "seats", "taken", "free"):
        table.add_column(col, justify="right" if col in ("id", "seats", "taken", "free") else "left")
    for d in rows:
        table.add_row(str(d.id), d.product, d.route, str(d.service_date), local_time(d.departs_at, tz),
                      str(d.seats), str(d.seats_taken), str(d.seats_free))
    Console(width=120).print(table)
    return 0


def _ticket_keys(settings):
    """The configured ticket keys under the house test-key rule (a refusal reads as every other secret's)."""
    from backoffice.tickets.keys import TicketKeysRefused, ticket_keys
    from farebox.keys import TestKeyRefused, TestKeyUse

    try:
        keys = ticket_keys(settings)
    except TicketKeysRefused as e:
        raise TestKeyRefused([TestKeyUse(u.what, u.give, u.source) for u in e.uses]) from None
    if keys.is_test:
        print("INSECURE: the published TEST ticket keys (labs and tests only)", file=sys.stderr)
    return keys


def _keys_init(args, settings) -> int:
    import os
    import secrets

    from backoffice.tickets.keys import PICKUP_KEY_ENV, TICKET_KEY_ENV, TICKET_KEY_ID_ENV, TicketKeys

    out = args.out
    if not 1 <= args.key_id <= 255:
        return _fail(ValueError("--key-id: 1 to 255 (0 is the published test key's)"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return _fail(ValueError(f"{out} exists and is not an empty folder: give a new one (nothing is overwritten)"))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    seed, master = secrets.token_bytes(32), secrets.token_bytes(32)
    paths = {}
    for name, value in (("ticket-seed.hex", seed), ("ticket-pickup.hex", master)):
        paths[name] = (out / name).resolve()
        fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(value.hex() + "\n")
    keys = TicketKeys(seed, args.key_id, master)
    print(f"Fresh ticket keys in {out.resolve()} (SECRET: back them up, share none):")
    print("  ticket-seed.hex    signs every ticket token (Ed25519 seed)")
    print("  ticket-pickup.hex  each operator's pickup-code key derives from it")
    print("Settings, as environment variables:")
    print(f"  {TICKET_KEY_ENV}={paths['ticket-seed.hex']}")
    print(f"  {TICKET_KEY_ID_ENV}={args.key_id}")
    print(f"  {PICKUP_KEY_ENV}={paths['ticket-pickup.hex']}")
    print(f"Validators check tokens with key id {args.key_id}, public key {keys.public_key().hex()} (their params "
          "carry it).")
    return 0


def _keys_show(args, settings) -> int:
    keys = _ticket_keys(settings)
    print(f"ticket key id {keys.key_id}, public key {keys.public_key().hex()} ({keys.source})")
    return 0


def _order_show(args, settings) -> int:
    from backoffice.tickets.orders import OrderError, show_order, tickets_of
    from clearing.service_day import local_time

    keys = _ticket_keys(settings) if args.codes else None
    with bootstrap.start(settings).read_engine().connect() as conn:
        try:
            o = show_order(conn, args.order_id)
        except OrderError as e:
            return _fail(e)
        tz = _tz(conn, o.operator)
        codes = {t.ticket_id: t for t in tickets_of(conn, o.order_id, keys=keys)} if keys else {}
    at = lambda t: local_time(t, tz, "%Y-%m-%d %H:%M:%S")  # noqa: E731
    print(f"order {o.order_id} ({o.operator}, {o.channel}, phone {o.phone or '-'}): {o.state}")
    print(f"  total {_yuan(o.total_fen)}, paid {_yuan(o.paid_fen)}, refunded {_yuan(o.refunded_fen)}; payment "
          f"{o.payment_ref or '-'}")
    print(f"  created {at(o.created_at)}, hold until {at(o.expires_at)}, paid {at(o.paid_at)}, "
          f"issued {at(o.issued_at)} ({tz})")
    print("items:")
    for i in o.items:
        extra = f" departure {i['departure_id']}" if i["departure_id"] else (
            f" from {i['start_date']}" if i["start_date"] else "")
        print(f"  {i['quantity']} x {i['product']} ({i['kind']}){extra} at {_yuan(i['unit_fen'])} = "
              f"{_yuan(i['amount_fen'])}")
    if o.tickets:
        print("tickets:")
    for t in o.tickets:
        uses = f"{t['uses_made']}/{'unlimited' if t['uses_allowed'] == 0 else t['uses_allowed']} used"
        print(f"  {t['ticket_id']} {t['kind']} {t['state']}, {uses}, {at(t['valid_from'])} to {at(t['valid_to'])}, "
              f"routes {t['routes'] or 'any'}, serial {t['pickup_serial']:010d}, {_yuan(t['price_fen'])}")
        if t["ticket_id"] in codes:
            code, token = codes[t["ticket_id"]].pickup_code, codes[t["ticket_id"]].token
            print(f"    pickup code {code[:4]} {code[4:8]} {code[8:12]} {code[12:]}")
            print(f"    QR {token}")
    print("changes:")
    for a in o.audit:
        print(f"  {at(a['at'])} {a['who']}: {a['from_state'] or '-'} -> {a['to_state']}: {a['why']}")
    return 0

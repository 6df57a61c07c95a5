"""``farebox registry ...``: operators, routes, vehicles, drivers and validators (GTFS import, names, fare
tables, audit, add / edit / retire). Registered in farebox/cli.py by ``register(sub)``."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import amount_in_yuan, iso_time, terminal_id


def register(sub) -> None:
    p = sub.add_parser("registry", help="operators, routes, vehicles, drivers, validators: GTFS import, names, "
                                        "fare tables, audit")
    reg = p.add_subparsers(dest="action", required=True)
    p = reg.add_parser("import-gtfs", help="create or update routes and stops from a GTFS folder or zip "
                                           "(all or nothing)")
    p.add_argument("--operator", required=True)
    p.add_argument("feed", type=Path, help="a GTFS folder or .zip (routes, stops, trips, stop_times)")
    p.add_argument("--by", default="gtfs import", help="who imports, for the audit lines")
    p.add_argument("--default-fare", type=amount_in_yuan, default=None, metavar="YUAN",
                   help="flat fare in yuan for new routes, e.g. 2.00 (default: none; they stay out of the fare "
                        "table until set)")
    p.set_defaults(func=_registry_import_gtfs)
    p = reg.add_parser("names", help="route names, vehicle plates, driver names (as they were at --at)")
    p.add_argument("--operator", required=True)
    p.add_argument("--at", type=iso_time, default=None, help="ISO time with zone (default now)")
    p.set_defaults(func=_registry_names)
    p = reg.add_parser("fare-table", help="the operator's fare table from the registry: the JSON parameter file "
                                          "the validators read (amounts in fen, as on the card)")
    p.add_argument("--operator", required=True)
    p.add_argument("--version", type=int, default=None,
                   help="the parameter version to stamp it with (default: one above the last params package "
                        "published for the operator, 1 for the first)")
    p.add_argument("--at", type=iso_time, default=None, help="ISO time with zone (default now)")
    p.set_defaults(func=_registry_fare_table)
    p = reg.add_parser("audit", help="who changed what in the registry, and when")
    p.add_argument("--operator", required=True)
    p.add_argument("--kind", default=None, choices=["operator", "route", "vehicle", "driver", "device", "fleet",
                                                    "stop"])
    p.add_argument("--key", default=None)
    p.set_defaults(func=_registry_audit)
    _add_company_commands(reg)
    _add_registry_writes(reg)


def _registry_engine(settings):
    return bootstrap.start(settings).engine()


def _reading(settings):
    return bootstrap.start(settings).read_engine()  # reading only: never migrates


def _registry_import_gtfs(args, settings) -> int:
    from backoffice.gtfs import GtfsError, import_gtfs
    from backoffice.registry import RegistryError

    engine = _registry_engine(settings)
    try:
        with engine.begin() as conn:
            report = import_gtfs(conn, operator=args.operator, folder_or_zip=args.feed, by=args.by,
                                 default_fare=args.default_fare)
    except (GtfsError, RegistryError) as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0


def _registry_names(args, settings) -> int:
    from backoffice.registry import names

    with _reading(settings).connect() as conn:
        found = names(conn, args.operator, at=args.at)
    for kind, table in found.items():
        for key, name in sorted(table.items()):
            print(f"{kind:8} {key:16} {name}")
    return 0


def _registry_fare_table(args, settings) -> int:
    import json

    from backoffice.registry import RegistryError, fare_table

    try:
        with _reading(settings).connect() as conn:
            version = args.version if args.version is not None else _next_params_version(conn, args.operator)
            doc = fare_table(conn, args.operator, version, at=args.at)
    except RegistryError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, ensure_ascii=False, indent=2))
    return 0


def _next_params_version(conn, operator: str) -> int:
    """One above the highest params version published for the operator (any target), 1 for the first."""
    from sqlalchemy import select

    from backoffice.models import Package

    versions = conn.execute(select(Package.version).where(Package.operator == operator,
                                                          Package.kind == "params")).scalars()
    return max((int(v) for v in versions if str(v).isdigit()), default=0) + 1


def _registry_audit(args, settings) -> int:
    from backoffice.registry import audit_lines

    with _reading(settings).connect() as conn:
        lines = audit_lines(conn, operator=args.operator, kind=args.kind, key=args.key)
    for a in lines:
        print(f"{a['recorded_at']:%Y-%m-%d %H:%M:%S}Z  {a['by']:12} {a['action']:7} {a['kind']:8} {a['key']:16} "
              f"{_money_in_yuan(a['detail'])}  (from {a['effective_at']:%Y-%m-%d %H:%M}Z)")
    return 0


def _money_in_yuan(detail: str) -> str:
    """An audit line as stored names fares in fen ("flat_fare: 200 -> 250"); people read them in yuan."""
    import re

    from clearing.money import yuan

    def one(m: re.Match) -> str:
        return f"{m.group(1)}{m.group(2)}" + re.sub(r"\d+", lambda n: yuan(int(n.group()), symbol="¥"), m.group(3))
    return re.sub(r"\b(flat_fare|transfer_discount|min_balance)(=|: )((?:\d+|None)(?: -> (?:\d+|None))?)", one, detail)


# kind -> (key option, key argument of the use cases); the add / edit / retire commands are made in a loop so that
# every kind takes the same shape: farebox registry add-<kind> | edit-<kind> | retire-<kind>.
_REGISTRY_KINDS = {"route": ("code", "code"), "vehicle": ("code", "code"), "driver": ("staff-no", "staff_no"),
                   "device": ("device-id", "device_id")}


def _stage_list(text: str):
    """'10:2.00,20:3.00' -> [(10, 200), (20, 300)]: up to that many stops, the fare typed in yuan, kept in fen."""
    from clearing.money import parse_yuan

    try:
        return [(int(u), parse_yuan(f)) for u, f in (part.split(":") for part in text.split(","))]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are 'up to stops:fare in yuan,...', e.g. "
                                         f"10:2.00,20:3.00 ({e})") from None


def _stop_lists(args):
    lists = {d: getattr(args, f"stops{d}").split() for d in (0, 1) if getattr(args, f"stops{d}", None)}
    return lists or None


def _registry_write(args, settings) -> int:
    from sqlalchemy.exc import IntegrityError

    from backoffice import registry

    kind, action = args.kind, args.write
    key = getattr(args, _REGISTRY_KINDS[kind][1])
    keyarg = {_REGISTRY_KINDS[kind][1]: key}
    when = {"by": args.by, "at": args.at}
    engine = _registry_engine(settings)
    try:
        with engine.begin() as conn:
            if action == "retire":
                getattr(registry, f"retire_{kind}")(conn, **keyarg, **when, reason=args.reason)
                changed = True
            elif kind == "route":
                fields = {"name": args.name, "flat_fare": args.fare, "stages": args.stages, "stops": _stop_lists(args)}
                if action == "add":
                    registry.add_route(conn, **keyarg, operator=args.operator, **fields, **when)
                    changed = True
                else:
                    changed = registry.edit_route(conn, **keyarg, **fields, **when)
            elif kind == "vehicle":
                if action == "add":
                    registry.add_vehicle(conn, **keyarg, operator=args.operator, plate=args.plate, **when)
                    changed = True
                else:
                    changed = registry.edit_vehicle(conn, **keyarg, plate=args.plate, **when)
                if args.fleet:
                    if args.fleet_from is None:
                        print("farebox: give --fleet-from (the first service day in the fleet) with --fleet",
                              file=sys.stderr)
                        raise _Abort
                    registry.assign_fleet(conn, vehicle=key, fleet=args.fleet, valid_from=args.fleet_from,
                                          by=args.by)
                    changed = True
            elif kind == "driver":
                if action == "add":
                    registry.add_driver(conn, **keyarg, operator=args.operator, name=args.name,
                                        card_asn=args.card_asn, **when)
                    changed = True
                else:
                    changed = registry.edit_driver(conn, **keyarg, name=args.name, card_asn=args.card_asn, **when)
            elif action == "add":
                registry.add_device(conn, **keyarg, operator=args.operator, vehicle=args.vehicle,
                                    terminal_id=args.terminal_id, **when)
                changed = True
            else:
                changed = False
                if args.vehicle or args.no_vehicle:
                    changed = registry.move_device(conn, **keyarg, vehicle=None if args.no_vehicle else args.vehicle,
                                                   **when)
                if args.terminal_id:
                    changed = registry.edit_device(conn, **keyarg, terminal_id=args.terminal_id, **when) or changed
    except _Abort:
        return 2
    except registry.RegistryError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    except IntegrityError:
        print(f"farebox: {kind} {key!r}: refused by the database: the code is taken already or names something "
              "that is not registered", file=sys.stderr)
        return 2
    verb = {"add": "added", "edit": "changed" if changed else "unchanged (nothing differs)", "retire": "retired"}
    fares = ""
    if kind == "route" and action != "retire" and (args.fare is not None or args.stages is not None):
        from clearing.money import yuan

        fares = (f" (flat fare {yuan(args.fare, symbol='¥')})" if args.fare is not None else
                 " (stages: " + ", ".join(f"up to {u} stops {yuan(f, symbol='¥')}" for u, f in args.stages) + ")")
    print(f"{kind} {key} {verb[action]}{fares}")
    return 0


class _Abort(Exception):
    """A command refused before it changed anything (the message is printed already)."""


def _add_registry_writes(reg) -> None:
    from datetime import date

    for kind, (option, dest) in _REGISTRY_KINDS.items():
        for action in ("add", "edit", "retire"):
            p = reg.add_parser(f"{action}-{kind}", help=f"{action} a {kind} (history kept, an audit line signed --by)")
            p.set_defaults(func=_registry_write, kind=kind, write=action)
            p.add_argument(f"--{option}", dest=dest, required=True)
            p.add_argument("--by", required=True, help="who makes the change, for the audit line")
            p.add_argument("--at", type=iso_time, default=None, help="effective from, ISO time with zone "
                                                                        "(default now)")
            if action == "retire":
                p.add_argument("--reason", default="")
                continue
            adding = action == "add"
            if adding:
                p.add_argument("--operator", required=True)
            if kind == "route":
                p.add_argument("--name", required=adding)
                fare = p.add_mutually_exclusive_group()
                fare.add_argument("--fare", type=amount_in_yuan, default=None, metavar="YUAN",
                                  help="flat fare in yuan, e.g. 2.00")
                fare.add_argument("--stages", type=_stage_list, default=None,
                                  help="distance fares 'up to stops:yuan,...', e.g. 10:2.00,20:3.00")
                p.add_argument("--stops0", default=None, help="stop codes outbound, in order, space separated")
                p.add_argument("--stops1", default=None, help="stop codes inbound")
            elif kind == "vehicle":
                p.add_argument("--plate", required=adding)
                p.add_argument("--fleet", default=None, help="put it in this fleet from --fleet-from")
                p.add_argument("--fleet-from", type=date.fromisoformat, default=None, help="service day YYYY-MM-DD")
            elif kind == "driver":
                p.add_argument("--name", required=adding)
                p.add_argument("--card-asn", default=None, required=adding, help="the driver card's ASN (20 hex)")
            else:
                p.add_argument("--terminal-id", type=terminal_id, required=adding, default=None)
                p.add_argument("--vehicle", default=None, help="the vehicle it is mounted in")
                if not adding:
                    p.add_argument("--no-vehicle", action="store_true", help="taken out of its vehicle")


# ----------------------------------------------------------------- the company itself: operator, commission, fleets
def _add_company_commands(reg) -> None:
    from datetime import date

    p = reg.add_parser("add-operator", help="register a bus company: code, name, time zone, service-day cut-off")
    p.add_argument("--code", required=True, help="1-32 characters of a-z, 0-9 and _ (it names the buses' MQTT "
                                                 "topics, tokens and reports), e.g. zhixing")
    p.add_argument("--name", required=True, help="the name reports print, e.g. 'Zhixing Bus Co.'")
    p.add_argument("--timezone", default="Asia/Shanghai", help="IANA time zone of its service day "
                                                               "(default Asia/Shanghai)")
    p.add_argument("--cutoff-hour", type=int, default=3,
                   help="local hour its service day ends: a bus out after midnight belongs to the day it started "
                        "(default 3, i.e. 03:00)")
    p.add_argument("--by", required=True, help="who makes the change, for the audit line")
    p.set_defaults(func=_operator_add)
    p = reg.add_parser("edit-operator", help="rename a bus company or change its service day (history kept)")
    p.add_argument("--code", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--timezone", default=None)
    p.add_argument("--cutoff-hour", type=int, default=None)
    p.add_argument("--by", required=True)
    p.add_argument("--at", type=iso_time, default=None, help="effective from, ISO time with zone (default now)")
    p.set_defaults(func=_operator_edit)
    p = reg.add_parser("operators", help="the bus companies: code, name, time zone, cut-off, commission rate now")
    p.add_argument("--all", action="store_true", help="retired ones too")
    p.set_defaults(func=_operator_list)

    p = reg.add_parser("set-commission", help="the card issuer's commission on a company's fares, from a service "
                                              "day on (clearing needs one)")
    p.add_argument("--operator", required=True)
    p.add_argument("--percent", required=True, type=_percent, metavar="P",
                   help="percent of the gross, at most two decimals, e.g. 0.60")
    p.add_argument("--from", dest="valid_from", required=True, type=date.fromisoformat, metavar="YYYY-MM-DD",
                   help="the first service day it applies to (after the last cleared day)")
    p.add_argument("--by", required=True)
    p.set_defaults(func=_commission_set)
    p = reg.add_parser("commission", help="a company's commission rates over time")
    p.add_argument("--operator", required=True)
    p.set_defaults(func=_commission_list)

    p = reg.add_parser("fare-rules", help="a company's fare rules beside the routes' fares: the share of the fare "
                                          "each card type pays, the transfer discount, the minimum balance")
    p.add_argument("--operator", required=True)
    p.add_argument("--discount", type=_discount, action="append", default=None, metavar="TYPE=PERCENT",
                   help="percent of the fare a card type pays, e.g. student=50 elderly=0 (repeatable; replaces "
                        "the whole set; types not named pay 100)")
    p.add_argument("--transfer-window", type=int, default=None, metavar="MINUTES",
                   help="a boarding on another route within this many minutes of the last paid one is a transfer")
    p.add_argument("--transfer-discount", type=_yuan_or_zero, default=None, metavar="YUAN",
                   help="taken off a transfer's fare, e.g. 1.00")
    p.add_argument("--min-balance", type=_yuan_or_zero, default=None, metavar="YUAN",
                   help="the balance a card must hold to board, e.g. 0.00")
    p.add_argument("--by", required=True)
    p.add_argument("--at", type=iso_time, default=None, help="effective from, ISO time with zone (default now)")
    p.set_defaults(func=_fare_rules)

    p = reg.add_parser("add-fleet", help="a fleet of a company (a depot, a branch): reports add its vehicles up")
    p.add_argument("--operator", required=True)
    p.add_argument("--code", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--by", required=True)
    p.set_defaults(func=_fleet_add)


CARD_TYPE_NAMES = {"adult": 1, "student": 2, "elderly": 3, "staff": 4}


def _discount(text: str) -> tuple[int, int]:
    name, _, percent = text.partition("=")
    card_type = CARD_TYPE_NAMES.get(name.strip().lower(), int(name) if name.strip().isdigit() else None)
    if card_type is None or not percent.strip().isdigit() or not 0 <= int(percent) <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: give TYPE=PERCENT, TYPE one of {', '.join(CARD_TYPE_NAMES)} "
                                         "or a card type number, PERCENT 0-100 (what that card pays of the fare)")
    return card_type, int(percent)


def _yuan_or_zero(text: str) -> int:
    from clearing.money import parse_yuan

    try:
        return parse_yuan(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fare_rules(args, settings) -> int:
    from backoffice import registry
    from clearing.money import yuan

    def set_rules(conn):
        changed = registry.set_fare_rules(
            conn, operator=args.operator, by=args.by, at=args.at,
            discounts=dict(args.discount) if args.discount is not None else None,
            transfer_window_minutes=args.transfer_window, transfer_discount=args.transfer_discount,
            min_balance=args.min_balance)
        if not changed:
            return f"{args.operator}: fare rules unchanged (nothing differs)"
        said = []
        if args.discount is not None:
            names = {v: k for k, v in CARD_TYPE_NAMES.items()}
            said.append("pays " + ", ".join(f"{names.get(t, t)} {p}%" for t, p in sorted(dict(args.discount).items())))
        if args.transfer_window is not None or args.transfer_discount is not None:
            said.append(f"transfer within {args.transfer_window if args.transfer_window is not None else '(as before)'}"
                        f" min: {yuan(args.transfer_discount, symbol='¥')} off")
        if args.min_balance is not None:
            said.append(f"minimum balance {yuan(args.min_balance, symbol='¥')}")
        return f"{args.operator}: fare rules changed: " + "; ".join(said) + " (farebox registry fare-table shows them)"
    return _write(settings, f"fare rules of {args.operator}", set_rules)


def _percent(text: str) -> int:
    from clearing.commission import parse_percent

    try:
        return parse_percent(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _write(settings, what, use_case) -> int:
    """Run one registry use case in its own transaction; a refusal is printed with what to do, exit 2."""
    from sqlalchemy.exc import IntegrityError

    from backoffice.registry import RegistryError

    engine = _registry_engine(settings)
    try:
        with engine.begin() as conn:
            said = use_case(conn)
    except RegistryError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    except IntegrityError:
        print(f"farebox: {what}: refused by the database: the code is taken already or names something that is "
              "not registered", file=sys.stderr)
        return 2
    print(said)
    return 0


def _operator_add(args, settings) -> int:
    from backoffice import registry

    def add(conn):
        registry.add_operator(conn, code=args.code, name=args.name, timezone=args.timezone,
                              cutoff_hour=args.cutoff_hour, by=args.by)
        return (f"operator {args.code} added: {args.name}, service day in {args.timezone} ending "
                f"{args.cutoff_hour:02d}:00. Next: its commission rate (farebox registry set-commission), "
                "then routes, vehicles, drivers and validators")
    return _write(settings, f"operator {args.code}", add)


def _operator_edit(args, settings) -> int:
    from backoffice import registry

    def edit(conn):
        changed = registry.edit_operator(conn, code=args.code, by=args.by, name=args.name, timezone=args.timezone,
                                         cutoff_hour=args.cutoff_hour, at=args.at)
        return f"operator {args.code} {'changed' if changed else 'unchanged (nothing differs)'}"
    return _write(settings, f"operator {args.code}", edit)


def _operator_list(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from backoffice.registry import operators
    from clearing.commission import percent_text

    with _reading(settings).connect() as conn:
        rows = operators(conn, include_retired=args.all)
    if not rows:
        print("no operator registered yet: farebox registry add-operator --code CODE --name NAME --by YOU")
        return 0
    table = Table(title="bus companies")
    for col in ("code", "name", "time zone", "day ends", "commission now", "since"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["code"] + (" (retired)" if r["retired_at"] else ""), r["name"], r["timezone"],
                      f"{r['cutoff_hour']:02d}:00", "none set" if r["rate_bp"] is None else percent_text(r["rate_bp"]),
                      "-" if r["rate_from"] is None else r["rate_from"].isoformat())
    Console(width=100).print(table)
    return 0


def _commission_set(args, settings) -> int:
    from backoffice import registry
    from clearing.commission import percent_text

    def set_rate(conn):
        registry.set_commission_rate(conn, operator=args.operator, rate_bp=args.percent, valid_from=args.valid_from,
                                     by=args.by)
        return (f"{args.operator}: card-issuer commission {percent_text(args.percent)} of the gross from service "
                f"day {args.valid_from} on")
    return _write(settings, f"commission of {args.operator}", set_rate)


def _commission_list(args, settings) -> int:
    from backoffice.registry import commission_rates
    from clearing.commission import percent_text

    with _reading(settings).connect() as conn:
        rates = commission_rates(conn, operator=args.operator)
    if not rates:
        print(f"{args.operator}: no commission rate set: farebox registry set-commission --operator {args.operator} "
              "--percent P --from YYYY-MM-DD --by YOU")
        return 0
    for r in rates:
        print(f"{args.operator}  from {r['valid_from']}  {percent_text(r['rate_bp']):>8}")
    return 0


def _fleet_add(args, settings) -> int:
    from backoffice import registry

    def add(conn):
        registry.add_fleet(conn, code=args.code, operator=args.operator, name=args.name, by=args.by)
        return (f"fleet {args.code} ({args.name}) added to {args.operator}; put vehicles in it with "
                "add-vehicle / edit-vehicle --fleet CODE --fleet-from YYYY-MM-DD")
    return _write(settings, f"fleet {args.code}", add)

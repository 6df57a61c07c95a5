"""``farebox registry ...``: operators, routes, vehicles, drivers and validators (GTFS import, names, fare
tables, audit, add / edit / retire). Registered in farebox/cli.py by ``register(sub)``."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import iso_time, terminal_id


def register(sub) -> None:
    p = sub.add_parser("registry", help="operators, routes, vehicles, drivers, validators: GTFS import, names, "
                                        "fare tables, audit")
    reg = p.add_subparsers(dest="action", required=True)
    p = reg.add_parser("import-gtfs", help="create or update routes and stops from a GTFS folder or zip "
                                           "(all or nothing)")
    p.add_argument("--operator", required=True)
    p.add_argument("feed", type=Path, help="a GTFS folder or .zip (routes, stops, trips, stop_times)")
    p.add_argument("--by", default="gtfs import", help="who imports, for the audit lines")
    p.add_argument("--default-fare", type=int, default=None, help="flat fare in fen for new routes (default: none; "
                                                                  "they stay out of the fare table until set)")
    p.set_defaults(func=_registry_import_gtfs)
    p = reg.add_parser("names", help="route names, vehicle plates, driver names (as they were at --at)")
    p.add_argument("--operator", required=True)
    p.add_argument("--at", type=iso_time, default=None, help="ISO time with zone (default now)")
    p.set_defaults(func=_registry_names)
    p = reg.add_parser("fare-table", help="the operator's fare table (JSON parameter file) from the registry")
    p.add_argument("--operator", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--at", type=iso_time, default=None, help="ISO time with zone (default now)")
    p.set_defaults(func=_registry_fare_table)
    p = reg.add_parser("audit", help="who changed what in the registry, and when")
    p.add_argument("--operator", required=True)
    p.add_argument("--kind", default=None, choices=["operator", "route", "vehicle", "driver", "device", "fleet",
                                                    "stop"])
    p.add_argument("--key", default=None)
    p.set_defaults(func=_registry_audit)
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
            doc = fare_table(conn, args.operator, args.version, at=args.at)
    except RegistryError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, ensure_ascii=False, indent=2))
    return 0


def _registry_audit(args, settings) -> int:
    from backoffice.registry import audit_lines

    with _reading(settings).connect() as conn:
        lines = audit_lines(conn, operator=args.operator, kind=args.kind, key=args.key)
    for a in lines:
        print(f"{a['recorded_at']:%Y-%m-%d %H:%M:%S}Z  {a['by']:12} {a['action']:7} {a['kind']:8} {a['key']:16} "
              f"{a['detail']}  (from {a['effective_at']:%Y-%m-%d %H:%M}Z)")
    return 0


# kind -> (key option, key argument of the use cases); the add / edit / retire commands are made in a loop so that
# every kind takes the same shape: farebox registry add-<kind> | edit-<kind> | retire-<kind>.
_REGISTRY_KINDS = {"route": ("code", "code"), "vehicle": ("code", "code"), "driver": ("staff-no", "staff_no"),
                   "device": ("device-id", "device_id")}


def _stage_list(text: str):
    """'10:200,20:300' -> [(10, 200), (20, 300)]: up to that many stops, the fare in fen."""
    try:
        return [(int(u), int(f)) for u, f in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are 'up to stops:fare fen,...', e.g. 10:200,20:300") \
            from None


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
    print(f"{kind} {key} {verb[action]}")
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
                fare.add_argument("--fare", type=int, default=None, help="flat fare in fen")
                fare.add_argument("--stages", type=_stage_list, default=None,
                                  help="distance fares 'up to stops:fen,...', e.g. 10:200,20:300")
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

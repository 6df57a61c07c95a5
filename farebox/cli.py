"""The `farebox` command. Each subcommand turns its arguments into one call; the wiring lives in farebox/."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import date
from pathlib import Path

from farebox.config import load_settings


def _demo(args, settings) -> int:
    from farebox.demo import run_demo

    result = run_demo(settings, seed=args.seed, day=args.day, riders=args.riders, kill_ingest_at=args.kill_ingest_at)
    return 0 if result.consistent else 1


def _ingest(args, settings) -> int:
    from backoffice.db import make_engine, upgrade
    from backoffice.ingest_consumer import IngestConsumer
    from farebox.keys import issuer_keys
    from wire.mqtt_url import parse_mqtt_url

    if not settings.mqtt_url:
        print("farebox ingest needs a broker: set FAREBOX_MQTT_URL (e.g. mqtt://127.0.0.1:1883)", file=sys.stderr)
        return 2
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    consumer = IngestConsumer(engine, parse_mqtt_url(settings.mqtt_url), keys=issuer_keys(settings),
                              client_id=args.client_id, operator=args.operator)
    if args.ready_file:
        consumer.on_ready = lambda: Path(args.ready_file).touch()
    consumer.run_forever()
    return 0


def _db_upgrade(args, settings) -> int:
    from backoffice.db import make_engine, upgrade

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    print(f"schema is current on {engine.url.render_as_string(hide_password=True)}")
    return 0


def _settle(args, settings) -> int:
    from backoffice.db import make_engine
    from backoffice.settle import settle

    engine = make_engine(settings.effective_database_url)
    with engine.connect() as conn:
        result = settle(conn, operator=args.operator, day=args.day, reports_dir=args.out)
    s = result.settlement
    print(f"{args.operator} {args.day}: {s.taps} fares, {s.amount} fen; PDF {result.pdf}")
    return 0


def _device_add(args, settings) -> int:
    from backoffice import registry
    from backoffice.db import make_engine, upgrade

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    from sqlalchemy.exc import IntegrityError

    try:
        with engine.begin() as conn:
            registry.add_device(conn, device_id=args.device_id, operator=args.operator, vehicle=args.vehicle,
                                terminal_id=args.terminal_id.lower())
    except IntegrityError:
        print(f"farebox: device {args.device_id} is registered already, or operator {args.operator!r} / vehicle "
              f"{args.vehicle!r} is not", file=sys.stderr)
        return 1
    print(f"device {args.device_id} registered for {args.operator} (PSAM terminal {args.terminal_id.lower()})")
    return 0


def _quarantine(args, settings) -> int:
    from sqlalchemy import select

    from backoffice.db import make_engine
    from backoffice.models import Quarantine

    engine = make_engine(settings.effective_database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(Quarantine.received_at, Quarantine.device_id, Quarantine.device_seq,
                                   Quarantine.reason).order_by(Quarantine.id.desc()).limit(args.limit)).all()
    for r in rows:
        seq = "-" if r.device_seq is None else r.device_seq
        print(f"{r.received_at:%Y-%m-%d %H:%M:%S}  {r.device_id:<20} {seq:>8}  {r.reason}")
    print(f"{len(rows)} most recent quarantined record(s) shown")
    return 0


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = (-1.0,)
    if any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError("give fractions of the day from 0 to 1, e.g. 0.3,0.6")
    return values


def _terminal_id(text: str) -> str:
    if len(text) != 12 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError("a PSAM terminal number is 12 hex digits, e.g. 010000000042")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farebox", description="An open bus smartcard system.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="one service day of a simulated city, from card to settlement PDF")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--day", type=date.fromisoformat, default=None, help="service day (default: yesterday)")
    p.add_argument("--riders", type=int, default=200)
    p.add_argument("--kill-ingest-at", type=_fractions, default=(),
                   help="fractions of the day (e.g. 0.3,0.6) at which ingest is killed with SIGKILL and restarted")
    p.set_defaults(func=_demo)

    p = sub.add_parser("ingest", help="store validators' tap batches from the broker (FAREBOX_MQTT_URL)")
    p.add_argument("--client-id", default="farebox_ingest", help="MQTT client id (the persistent session's name)")
    p.add_argument("--operator", default=None, help="only this operator's buses (default: every operator's)")
    p.add_argument("--ready-file", default=None, help="touch this file once subscribed")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=_db_upgrade)

    p = sub.add_parser("device", help="validators")
    device = p.add_subparsers(dest="action", required=True)
    p = device.add_parser("add", help="register a validator so ingest accepts its taps")
    p.add_argument("--device-id", required=True)
    p.add_argument("--operator", required=True)
    p.add_argument("--terminal-id", required=True, type=_terminal_id, help="its PSAM's terminal number (hex)")
    p.add_argument("--vehicle", default=None)
    p.set_defaults(func=_device_add)

    p = sub.add_parser("quarantine", help="what ingest could not accept, newest first, with the reason")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_quarantine)

    p = sub.add_parser("settle", help="settle one service day and write its PDF")
    p.add_argument("--operator", required=True)
    p.add_argument("--day", type=date.fromisoformat, required=True)
    p.add_argument("--out", type=Path, default=Path("var/reports"))
    p.set_defaults(func=_settle)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_log = logging.StreamHandler()
    # The level sits on the handler, so a command may log more to its own files than to the console.
    console_log.setLevel(logging.INFO if args.verbose or args.command == "ingest" else logging.WARNING)
    console_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=console_log.level, handlers=[console_log])
    try:
        settings = load_settings()
    except (OSError, ValueError) as e:
        print(f"farebox: bad configuration: {e}", file=sys.stderr)
        return 2
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())

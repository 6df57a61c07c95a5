"""The `farebox` command. Each subcommand turns its arguments into one call; the wiring lives in farebox/."""

from __future__ import annotations

import argparse
import logging
import sys

from farebox.config import load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farebox", description="An open bus smartcard system.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    # Each domain's module adds its subcommands: register new ones here, one line each.
    from farebox import backoffice_cmd, cards_cmd, fleet_cmd, ingest_cmd, publish_cmd, registry_cmd, settle_cmd
    from farebox import simcard, validator_cmd
    from farebox import audit_cmd

    backoffice_cmd.register(sub)  # demo, db, serve, token
    ingest_cmd.register(sub)  # ingest, quarantine
    fleet_cmd.register(sub)  # device, devices, broker
    publish_cmd.register(sub)  # denylist, package
    registry_cmd.register(sub)
    settle_cmd.register(sub)  # settle, jobs
    simcard.add_parser(sub)  # sim
    validator_cmd.add_parser(sub)  # validator
    cards_cmd.add_parser(sub)  # keys, card, topup
    audit_cmd.register(sub)  # audit
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_log = logging.StreamHandler()
    # The level sits on the handler, so a command may log more to its own files than to the console.
    console_log.setLevel(logging.INFO if args.verbose or args.command in ("ingest", "validator", "serve") else logging.WARNING)
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

"""The `farebox` command. Each subcommand turns its arguments into one call; the wiring lives in farebox/."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from farebox.bootstrap import StartRefused, refusal
from farebox.config import load_settings
from farebox.keys import TestKeyRefused


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farebox", description="An open bus smartcard system.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument(*INSECURE_FLAG, **INSECURE_OPTION, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    # Each domain's module adds its subcommands: register new ones here, one line each.
    from farebox import backoffice_cmd, cards_cmd, fleet_cmd, ingest_cmd, publish_cmd, registry_cmd, settle_cmd
    from farebox import keys_cmd, simcard, validator_cmd
    from farebox import audit_cmd

    backoffice_cmd.register(sub)  # demo, db, serve, token
    ingest_cmd.register(sub)  # ingest, quarantine
    fleet_cmd.register(sub)  # device, devices, broker
    publish_cmd.register(sub)  # denylist, package
    registry_cmd.register(sub)
    settle_cmd.register(sub)  # settle, jobs
    simcard.add_parser(sub)  # sim
    validator_cmd.add_parser(sub)  # validator
    cards_cmd.add_parser(sub)  # card, topup
    __import__("farebox.desk_cmd").desk_cmd.register(sub)  # desk
    keys_cmd.register(sub)  # keys
    audit_cmd.register(sub)  # audit
    __import__("farebox.tickets_cmd").tickets_cmd.register(sub)  # ticket
    __import__("farebox.payments_cmd").payments_cmd.register(sub)  # payments
    __import__("farebox.sms_cmd").sms_cmd.register(sub)  # sms
    __import__("farebox.ticket_revenue_cmd").ticket_revenue_cmd.register(sub)  # ticket-revenue
    __import__("farebox.partitions_cmd").partitions_cmd.register(sub)  # partitions
    _insecure_flag_everywhere(sub)
    return parser


# For labs and benches: run on the published test keys, with a banner (farebox.bootstrap). Also accepted after the
# subcommand's name, where people type it; FAREBOX_INSECURE_TEST_KEYS=1 does the same.
INSECURE_FLAG = ("--insecure-test-keys",)
INSECURE_OPTION = {"action": "store_true", "dest": "insecure_test_keys",
                   "help": "run on the PUBLISHED test keys (labs only; a banner says so). Without it, a command "
                           "refuses to start when a secret is not set or holds a test value"}


def _insecure_flag_everywhere(sub) -> None:
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for action in nested:
                _insecure_flag_everywhere(action)
        elif not any("--insecure-test-keys" in a.option_strings for a in parser._actions):
            parser.add_argument(*INSECURE_FLAG, **INSECURE_OPTION, default=argparse.SUPPRESS)


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
    if args.insecure_test_keys:
        settings = dataclasses.replace(settings, insecure_test_keys=True)
    try:
        return args.func(args, settings)
    except (StartRefused, TestKeyRefused) as e:
        # a TestKeyRefused here came from a secret read without farebox.bootstrap.start: same words
        message = refusal(e.uses) if isinstance(e, TestKeyRefused) else str(e)
        print(f"farebox {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

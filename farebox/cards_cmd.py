"""``farebox card`` and ``farebox topup``: issuing and losing cards, and the counter top-up on a desk reader.
Registered in farebox/cli.py by ``add_parser(sub)``; ``farebox keys`` lives in farebox/keys_cmd.py.

- ``farebox card issue --reader PATH | --sim-state FILE`` ``--deposit YUAN --staff WHO [--proof TEXT]``.
- ``farebox card lost --asn HEX --staff WHO --why TEXT``; ``farebox card show --asn HEX`` (ledger and cases).
- ``farebox topup counter --reader PATH --amount YUAN --terminal-id HEX --staff WHO``.

Amounts are typed and printed in yuan (``--amount 50.00``); the back office keeps fen. A simulated card
(``--sim-state``) is personalised with the configured issuer keys (farebox.simcard.sim_issuer_keys).
"""

from __future__ import annotations

import secrets
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import amount_in_yuan


CARD_TYPES = {"adult": 1, "student": 2, "elderly": 3, "staff": 4}


def _card_type(text: str) -> int:
    import argparse

    if text.isdigit() and 0 < int(text) < 256:
        return int(text)
    if text.lower() in CARD_TYPES:
        return CARD_TYPES[text.lower()]
    raise argparse.ArgumentTypeError(f"{text!r}: a card type is one of {', '.join(CARD_TYPES)} or its number")


def _type_name(card_type: int) -> str:
    return next((name for name, n in CARD_TYPES.items() if n == card_type), f"type {card_type}")


def _yuan(fen) -> str:
    from clearing.money import yuan

    return yuan(fen, symbol="¥")


def _engine(settings):
    return bootstrap.start(settings).engine()


def _session(args, settings=None):
    """A card session: the card in the desk reader, or a simulated card from its state file."""
    if getattr(args, "sim_state", None):
        from hardware_sim.card import SimCard
        from farebox.simcard import load_sim_card, sim_issuer_keys

        path = Path(args.sim_state)
        if path.exists():
            card = load_sim_card(path, settings)
        else:
            start = date.today() - timedelta(days=30)
            path.parent.mkdir(parents=True, exist_ok=True)
            card = SimCard(secrets.token_bytes(10), args.card_type, 0, start=start,
                           end=start + timedelta(days=3650), state_file=path, keys=sim_issuer_keys(settings))

        class _Direct:
            exchange = staticmethod(card.transmit)

        return _Direct()
    from validator.readers import open_reader

    session = open_reader(args.reader).poll(args.wait)
    if session is None:
        raise SystemExit(f"no card on {args.reader} within {args.wait} s")
    return session


def _card_issue(args, settings) -> int:
    from backoffice.cards import issuance

    facts = issuance.read_card(_session(args, settings))
    with _engine(settings).begin() as conn:
        try:
            issuance.issue_card(conn, card=facts, deposit=args.deposit, who=args.staff, now=datetime.now(UTC),
                                proof=args.proof, holder=args.holder)
        except issuance.IssueError as e:
            print(f"farebox card issue: {e}", file=sys.stderr)
            return 1
    print(f"card {facts.asn} issued: {_type_name(facts.card_type)}, balance {_yuan(facts.balance)}, deposit "
          f"{_yuan(args.deposit)}, valid {facts.valid_from} to {facts.valid_to}")
    return 0


def _card_lost(args, settings) -> int:
    from backoffice.cards import issuance

    with _engine(settings).begin() as conn:
        try:
            frozen = issuance.report_lost(conn, asn=args.asn, who=args.staff, why=args.why, now=datetime.now(UTC))
        except issuance.IssueError as e:
            print(f"farebox card lost: {e}", file=sys.stderr)
            return 1
    print(f"card {args.asn} is lost: on the next deny list (farebox denylist publish); {_yuan(frozen)} frozen for "
          "refund")
    return 0


def _card_show(args, settings) -> int:
    from backoffice.cards import cases, ledger

    with bootstrap.start(settings).read_engine().connect() as conn:  # reading only: never migrates
        book = ledger.card_ledger(conn, asn=args.asn)
        open_ = cases.open_cases(conn, asn=args.asn)
    print(f"card {args.asn}: opening {_yuan(book.opening)} + loads {_yuan(book.loads)} - purchases "
          f"{_yuan(book.purchases)} + adjustments {_yuan(book.adjustments)} - refunds {_yuan(book.refunds)} = "
          f"{_yuan(book.balance)}; the card last said {_yuan(book.card_balance)} "
          f"({'agrees' if book.agrees else 'DIFFERS'})")
    for c in open_:
        print(f"  case {c.id} [{c.kind}] {c.detail}")
    return 0


def _topup_counter(args, settings) -> int:
    from backoffice.cards import topup
    from epurse.apdu import ResponseError, StatusError
    from validator.readers import ReaderError

    root = bootstrap.start(settings, "issuer")
    try:
        done = topup.counter_topup(root.engine(), _session(args, settings), keys=root.key_service,
                                   amount=args.amount, terminal_id=bytes.fromhex(args.terminal_id),
                                   staff=args.staff, now=datetime.now(UTC))
    except topup.TopupRefused as e:
        print(f"farebox topup: refused ({e.reason}): {e}", file=sys.stderr)
        return 1
    except (StatusError, ResponseError, ReaderError) as e:
        print(f"farebox topup: the card did not finish: {e}. If it left after CREDIT FOR LOAD, present it again: "
              "its log settles the load", file=sys.stderr)
        return 1
    print(f"card {done.asn}: loaded {_yuan(done.amount)}, balance {_yuan(done.new_balance)} (load {done.load_id}, "
          f"online counter {done.online_ttc}, TAC {done.tac.hex()})")
    return 0


def add_parser(sub) -> None:
    def card_source(q):
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("--reader", help="desk reader path, e.g. pcsc: or pcsc:0")
        src.add_argument("--sim-state", help="a simulated card's state file (made if missing)")
        q.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a card")
        q.add_argument("--card-type", type=_card_type, default=1, metavar="TYPE",
                       help="simulated card only: adult, student, elderly, staff (or 1-4)")

    p = sub.add_parser("card", help="issue cards, report them lost, show their ledger")
    card = p.add_subparsers(dest="action", required=True)
    q = card.add_parser("issue", help="record the card in the desk reader as issued")
    card_source(q)
    q.add_argument("--deposit", type=amount_in_yuan, default=0, metavar="YUAN", help="deposit taken, in yuan "
                                                                                   "(default 0)")
    q.add_argument("--staff", required=True)
    q.add_argument("--proof", default="", help="a concession type's proof, e.g. the student id")
    q.add_argument("--holder", default="")
    q.set_defaults(func=_card_issue)
    q = card.add_parser("lost", help="deny the card and freeze its balance for refund")
    q.add_argument("--asn", required=True)
    q.add_argument("--staff", required=True)
    q.add_argument("--why", required=True)
    q.set_defaults(func=_card_lost)
    q = card.add_parser("show", help="the card's ledger against its own balance, and its open cases")
    q.add_argument("--asn", required=True)
    q.set_defaults(func=_card_show)

    p = sub.add_parser("topup", help="load cards")
    top = p.add_subparsers(dest="action", required=True)
    q = top.add_parser("counter", help="load the card in the desk reader (the back office is the issuer host)")
    card_source(q)
    q.add_argument("--amount", type=amount_in_yuan, required=True, metavar="YUAN", help="in yuan, e.g. 50.00")
    q.add_argument("--terminal-id", default="0e0000000001", help="the desk's terminal number (12 hex digits)")
    q.add_argument("--staff", required=True)
    q.set_defaults(func=_topup_counter)

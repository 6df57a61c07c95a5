"""Issuance and loss: a card (or RFID-SIM) enters the back office when staff hand it out, and leaves the rider's
hands when it is reported lost.

Personalisation itself (writing the ASN, the validity and the diversified keys into the chip) is done by the card
factory or a personalisation machine with the issuer's keys; the counter's desktop reader reads what the chip says
(:func:`read_card`, through any card session: ``pcsc:``, ``sim:``...) and :func:`issue_card` records it with the
deposit, the card type's proof (a student or elderly card needs one) and who issued it. The simulator plays the
factory: ``farebox card issue --sim-state FILE`` makes a SimCard with the test keys and issues it the same way.

The reading also takes the card's two transaction counters (TTC) as they stand at issue: the offline one,
which counts purchases, and the online one, which counts loads. The ledger needs them to see a record missing
before the first one it has (backoffice.cards.ledger). A card tells them only in the answer to an INITIALIZE,
so :func:`read_counters` sends INITIALIZE FOR PURCHASE and INITIALIZE FOR LOAD for 0 fen and never completes
either: a PBOC e-purse moves a counter only on the DEBIT or CREDIT that completes an INITIALIZE, and drops an
open one on its next command, whatever that is (hardware_sim.card.SimCard does the same); card desk tools read
the counters this way too. A card that refuses (a blocked card answers 6985) is issued all the same, with its
counters unknown (None) and a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, select, update

from backoffice.cards import audit, ledger
from backoffice.models import Card, CardAccount
from epurse import apdu

CONCESSIONS = {2: "student", 3: "elderly"}  # epurse.cardtypes values that need proof at issue
# The terminal number the two INITIALIZEs of read_counters send. No DEBIT or CREDIT ever follows them, so no
# MAC, TAC or log record of the card ever carries it: any 6 bytes would do, and zeros say "no terminal".
COUNTER_TERMINAL = bytes(6)
KEY_INDEX = 0x01  # the card's purchase and load key index, as the validators and the top-up host use it
log = logging.getLogger(__name__)
_ACCOUNT = CardAccount.__table__
_CARD = Card.__table__


class IssueError(Exception):
    pass


@dataclass(frozen=True)
class CardFacts:
    """What the chip itself says, read at the counter."""

    asn: str  # 20 hex digits
    issuer: str
    card_type: int
    algorithm: int
    valid_from: date
    valid_to: date
    balance: int
    purchase_ttc: int | None = None  # the offline counter: purchases so far (None: the card did not say)
    load_ttc: int | None = None  # the online counter: loads so far (None: the card did not say)


def read_card(session, *, counters: bool = True) -> CardFacts:
    """SELECT the transit application, read the public information file, the two counters
    (:func:`read_counters`; ``counters=False`` leaves them None) and the balance.

    ``session`` is anything with ``exchange(apdu) -> response``. Raises epurse.apdu.StatusError / ResponseError
    when the card answers something else (a blocked card answers SELECT with 6283: it is read all the same)."""
    answer = session.exchange(apdu.select_aid())
    if answer[-2:] not in (b"\x90\x00", b"\x62\x83"):
        apdu.check(answer, "SELECT")
    info = apdu.parse_public_info(apdu.check(session.exchange(apdu.read_public_info()), "READ BINARY 0015"))
    purchase_ttc, load_ttc = read_counters(session, asn=info.asn.hex()) if counters else (None, None)
    # GET BALANCE after the INITIALIZEs: it ends the one still open, so the card leaves the desk with none.
    balance = apdu.parse_balance(apdu.check(session.exchange(apdu.get_balance()), "GET BALANCE"))
    return CardFacts(info.asn.hex(), info.issuer.hex(), info.card_type, info.algorithm, info.start, info.end,
                     balance, purchase_ttc, load_ttc)


def read_counters(session, *, asn: str = "") -> tuple[int | None, int | None]:
    """(offline TTC, online TTC) of the selected card: what INITIALIZE FOR PURCHASE and INITIALIZE FOR LOAD
    for 0 fen answer, the counters before the next purchase and the next load. Neither is completed (see the
    module docstring); the INITIALIZE FOR LOAD stays open until the card's next command. A counter the card
    refuses to tell, or tells in an answer that does not parse, is None, with a log line; a reader error (the
    card pulled away) is raised as it comes."""
    init_purchase = apdu.init_purchase(KEY_INDEX, 0, COUNTER_TERMINAL)
    purchase = _counter(session, init_purchase, "INITIALIZE FOR PURCHASE",
                        lambda data: apdu.parse_init_purchase(data).ttc, asn, "purchase")
    init_load = apdu.init_load(KEY_INDEX, 0, COUNTER_TERMINAL)
    load = _counter(session, init_load, "INITIALIZE FOR LOAD",
                    lambda data: apdu.parse_init_load(data).online_ttc, asn, "load")
    return purchase, load


def _counter(session, command: bytes, name: str, parse, asn: str, kind: str) -> int | None:
    try:
        return parse(apdu.check(session.exchange(command), name))
    except (apdu.StatusError, apdu.ResponseError) as e:
        log.warning("card %s did not tell its %s counter (%s for 0 fen: %s); it is recorded as unknown, "
                    "so the ledger cannot see a %s missing before the first one it has",
                    asn or "?", kind, name, e, kind)
        return None


def issue_card(conn: Connection, *, card: CardFacts, deposit: int, who: str, now: datetime, proof: str = "",
               holder: str = "") -> None:
    """Record a card as issued: the ``card`` row the deny list reads, and its account (deposit, opening
    balance and counters, validity, proof), with an audit record. A concession card type needs its proof (e.g.
    the student id)."""
    if deposit < 0:
        raise IssueError("a deposit cannot be negative")
    if card.card_type in CONCESSIONS and not proof.strip():
        raise IssueError(f"a {CONCESSIONS[card.card_type]} card needs its proof (e.g. the id card number)")
    if conn.execute(select(_CARD.c.asn).where(_CARD.c.asn == card.asn)).first() is None:
        conn.execute(_CARD.insert().values(asn=card.asn, card_type=card.card_type, status="active"))
    elif conn.execute(select(_ACCOUNT.c.asn).where(_ACCOUNT.c.asn == card.asn)).first() is not None:
        raise IssueError(f"card {card.asn} is issued already")
    conn.execute(_ACCOUNT.insert().values(
        asn=card.asn, algorithm=card.algorithm, issuer=card.issuer, valid_from=card.valid_from,
        valid_to=card.valid_to, deposit=deposit, opening_balance=card.balance, proof=proof, holder=holder,
        issued_at=now, issued_by=who, opening_purchase_ttc=card.purchase_ttc, opening_load_ttc=card.load_ttc))
    audit.record(conn, who=who, action="issue", why="card issued", now=now, asn=card.asn, amount=deposit,
                 card_type=card.card_type, opening_balance=card.balance, algorithm=card.algorithm,
                 purchase_ttc=card.purchase_ttc, load_ttc=card.load_ttc)


def report_lost(conn: Connection, *, asn: str, who: str, why: str, now: datetime) -> int:
    """The card goes on the deny list (status lost) and its book balance is frozen for refund; returns it."""
    status = conn.execute(select(_CARD.c.status).where(_CARD.c.asn == asn)).scalar()
    if status is None:
        raise IssueError(f"card {asn} is not known")
    if conn.execute(select(_ACCOUNT.c.asn).where(_ACCOUNT.c.asn == asn)).first() is None:
        raise IssueError(f"card {asn} has no issuance record: issue it (farebox card issue) to hold its balance")
    if status == "active":
        conn.execute(update(_CARD).where(_CARD.c.asn == asn).values(status="lost"))
    frozen = ledger.freeze_balance(conn, asn=asn, now=now)
    audit.record(conn, who=who, action="report_lost", why=why, now=now, asn=asn, amount=frozen,
                 status_before=status)
    return frozen

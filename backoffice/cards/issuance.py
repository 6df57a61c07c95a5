"""Issuance and loss: a card (or RFID-SIM) enters the back office when staff hand it out, and leaves the rider's
hands when it is reported lost.

Personalisation itself (writing the ASN, the validity and the diversified keys into the chip) is done by the card
factory or a personalisation machine with the issuer's keys; the counter's desktop reader reads what the chip says
(:func:`read_card`, through any card session: ``pcsc:``, ``sim:``...) and :func:`issue_card` records it with the
deposit, the card type's proof (a student or elderly card needs one) and who issued it. The simulator plays the
factory: ``farebox card issue --sim-state FILE`` makes a SimCard with the test keys and issues it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, select, update

from backoffice.cards import audit, ledger
from backoffice.models import Card, CardAccount
from epurse import apdu

CONCESSIONS = {2: "student", 3: "elderly"}  # epurse.cardtypes values that need proof at issue
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


def read_card(session) -> CardFacts:
    """SELECT the transit application, read the public information file and the balance.

    ``session`` is anything with ``exchange(apdu) -> response``. Raises epurse.apdu.StatusError / ResponseError
    when the card answers something else (a blocked card answers SELECT with 6283: it is read all the same)."""
    answer = session.exchange(apdu.select_aid())
    if answer[-2:] not in (b"\x90\x00", b"\x62\x83"):
        apdu.check(answer, "SELECT")
    info = apdu.parse_public_info(apdu.check(session.exchange(apdu.read_public_info()), "READ BINARY 0015"))
    balance = apdu.parse_balance(apdu.check(session.exchange(apdu.get_balance()), "GET BALANCE"))
    return CardFacts(info.asn.hex(), info.issuer.hex(), info.card_type, info.algorithm, info.start, info.end,
                     balance)


def issue_card(conn: Connection, *, card: CardFacts, deposit: int, who: str, now: datetime, proof: str = "",
               holder: str = "") -> None:
    """Record a card as issued: the ``card`` row the deny list reads, and its account (deposit, opening balance,
    validity, proof), with an audit record. A concession card type needs its proof (e.g. the student id)."""
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
        issued_at=now, issued_by=who))
    audit.record(conn, who=who, action="issue", why="card issued", now=now, asn=card.asn, amount=deposit,
                 card_type=card.card_type, opening_balance=card.balance, algorithm=card.algorithm)


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

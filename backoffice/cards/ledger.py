"""A ledger per card: what the back office says the card should hold, beside what the card itself reported.

The book balance = opening balance (at issue) + loads - purchases + adjustments - refunds. Loads and purchases are
card transactions, each with the balance the card reported after it (a purchase's ``balance_after``, a load's new
balance). Adjustments are staff corrections of the book (a tap whose record never arrived, say) and never touch the
card. Refunds pay a lost or blocked card's frozen balance back to its holder: money leaves the book, while the dead
card's chip keeps the number it had. So the check is::

    book balance + refunds == the balance the card last reported

(with no refunds: the book equals the card). :func:`check` is pure: it takes the movements and returns the ledger
with its findings (a counter jump, a balance that does not follow, the same counter with different content, a book
that does not match the card); :func:`review_card` reads a card's movements from the database, checks them and
raises a case per finding (cases.py). Adjustments and refunds are use cases here, each with an audit record.

The card's own history is two exact chains: loads in online-counter order (made by the back office as
issuer host) and purchases in offline-counter order (made by bus validators). A bus's clock drifts by minutes,
so they are merged by evidence, not by clock: the next movement is the chain head whose reported balance
follows from the running balance. If both heads follow (one moved no money) or neither does (a record is
missing or wrong), the head after which the other follows goes first; only when the balances cannot tell do
the times decide.

A missing record shows as a counter jump between two records the ledger has; a missing FIRST record leaves no
jump, and a later load and tap of the same amount can even make the books agree while the card holds less.
So issuance reads the card's counters as they stood at issue (backoffice.cards.issuance.read_counters, kept on
the card's account), and :func:`check` given them finds a chain whose first record has a higher counter.
Unknown opening counters (None: a card issued before they were read, or one that would not tell) check as
before.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, func, select, update

from backoffice.cards import audit, cases
from backoffice.models import Card, CardAccount, CardCase, CardEntry, CardLoad, Tap

LOAD, PURCHASE, ADJUSTMENT, REFUND = "load", "purchase", "adjustment", "refund"
_CHIP = (LOAD, PURCHASE)  # movements the card itself made, with the balance it reported


@dataclass(frozen=True)
class Movement:
    """One money movement on a card. ``amount`` is positive fen except an adjustment's, which carries its sign.
    ``counter`` is the card's online TTC for a load and its offline TTC for a purchase (before the transaction);
    ``content`` is what a second record of the same counter is compared against."""

    kind: str
    amount: int
    at: datetime
    counter: int | None = None
    balance_after: int | None = None
    ref: str = ""
    content: tuple = ()

    @property
    def effect(self) -> int:
        if self.kind == LOAD:
            return self.amount
        if self.kind in (PURCHASE, REFUND):
            return -self.amount
        return self.amount  # adjustment, signed


@dataclass(frozen=True)
class Finding:
    kind: str  # a cases.* kind
    key: str  # names the place in the card's history, so the same anomaly raises one case
    detail: str


@dataclass(frozen=True)
class Ledger:
    opening: int
    loads: int
    purchases: int
    adjustments: int
    refunds: int
    card_balance: int | None  # the balance the card last reported (None: it never reported one)
    findings: list[Finding] = field(default_factory=list)

    @property
    def balance(self) -> int:
        """The book balance: what the back office owes the card's holder."""
        return self.opening + self.loads - self.purchases + self.adjustments - self.refunds

    @property
    def agrees(self) -> bool:
        return self.card_balance is None or self.balance + self.refunds == self.card_balance


def _dedupe(moves: list[Movement], kind: str, findings: list[Finding], opening: int | None = None
            ) -> list[Movement]:
    """One movement per counter; a second with other content is a finding (a clone or a forged record). The
    counters run on from ``opening`` (the card's counter at issue, None: not known) without a gap, or it is a
    finding (a record missing)."""
    by_counter: dict[int, Movement] = {}
    for m in moves:
        first = by_counter.get(m.counter)
        if first is None:
            by_counter[m.counter] = m
        elif (first.amount, first.balance_after, first.content) != (m.amount, m.balance_after, m.content):
            findings.append(Finding(cases.SAME_COUNTER_DIFFERENT, f"{kind}{m.counter}",
                                    f"{kind} counter {m.counter}: {first.ref} and {m.ref} differ"))
    kept = sorted(by_counter.values(), key=lambda m: m.counter)
    if opening is not None and kept and kept[0].counter > opening:
        # A counter names the transaction it counts (the TTC before it), so the first record after issue has
        # the opening counter. "@issue" keeps the key apart from a jump between two records ("purchase0-2").
        first, missing = kept[0].counter, kept[0].counter - opening
        plural = "" if missing == 1 else "s"
        findings.append(Finding(cases.COUNTER_JUMP, f"{kind}@issue{opening}-{first}",
                                f"{missing} {kind}{plural} after issue missing: the card's {kind} counter "
                                f"was {opening} at issue, the first record ({kept[0].ref}) has {first}"))
    for a, b in itertools.pairwise(kept):
        if b.counter != a.counter + 1:
            findings.append(Finding(cases.COUNTER_JUMP, f"{kind}{a.counter}-{b.counter}",
                                    f"{kind} counter jumps from {a.counter} to {b.counter}: "
                                    f"{b.counter - a.counter - 1} transaction(s) missing"))
    return kept


def _follows(m: Movement, running: int) -> bool:
    # No reported balance is no evidence against any place, so it counts as following: a head that does not
    # follow yet can then come after it, not before it by a drifted clock. Its effect still enters the sum.
    return m.balance_after is None or m.balance_after == running + m.effect


def _next(loads: deque[Movement], purchases: deque[Movement], running: int) -> Movement:
    """Take the next movement of the card's history off the head of one chain (see the module docstring)."""
    if not loads or not purchases:
        return (loads or purchases).popleft()
    load, purchase = loads[0], purchases[0]
    take_load, take_purchase = _follows(load, running), _follows(purchase, running)
    if take_load == take_purchase:
        # Both follow when one moves no money (a zero fare) or reported nothing; neither does when a record
        # before one of them is missing. The one after which the other follows goes first: else a zero fare
        # that a fast bus dates after a load makes the load look wrong, and one missing record gives two
        # findings.
        take_load = _follows(purchase, _after(load, running))
        take_purchase = _follows(load, _after(purchase, running))
    if take_load == take_purchase:  # the balances cannot tell: by time, a load first at the same instant
        take_load = load.at <= purchase.at
    return (loads if take_load else purchases).popleft()


def _after(m: Movement, running: int) -> int:
    """The balance after ``m`` as :func:`check` carries it on: the card's word, where it gave one."""
    return running + m.effect if m.balance_after is None else m.balance_after


def check(movements: list[Movement], *, opening: int = 0, opening_purchase_ttc: int | None = None,
          opening_load_ttc: int | None = None) -> Ledger:
    """The ledger of ``movements`` from the ``opening`` balance, with its findings. ``opening_purchase_ttc``
    and ``opening_load_ttc`` are the card's offline and online counters at issue (None: not known); given, a
    chain whose first record is past them is a COUNTER_JUMP (records missing before the first one it has)."""
    findings: list[Finding] = []
    loads = _dedupe([m for m in movements if m.kind == LOAD], "load", findings, opening_load_ttc)
    purchases = _dedupe([m for m in movements if m.kind == PURCHASE], "purchase", findings,
                        opening_purchase_ttc)
    heads = (deque(loads), deque(purchases))
    running, last = opening, None
    while heads[0] or heads[1]:
        m = _next(*heads, running)
        running += m.effect
        if m.balance_after is not None and m.balance_after != running:
            findings.append(Finding(cases.BALANCE_MISMATCH, f"{m.kind}{m.counter}",
                                    f"after {m.ref} the card said {m.balance_after} fen, the records before it "
                                    f"give {running} fen ({m.balance_after - running:+d})"))
            running = m.balance_after  # one missing record is one finding, not one per later transaction
        last = m
    others = [m for m in movements if m.kind not in _CHIP]
    ledger = Ledger(
        opening=opening,
        loads=sum(m.amount for m in loads),
        purchases=sum(m.amount for m in purchases),
        adjustments=sum(m.amount for m in others if m.kind == ADJUSTMENT),
        refunds=sum(m.amount for m in others if m.kind == REFUND),
        card_balance=None if last is None else last.balance_after,
        findings=findings,
    )
    if not ledger.agrees:
        findings.append(Finding(cases.BALANCE_MISMATCH, f"book@{last.kind}{last.counter}",
                                f"the book gives {ledger.balance} fen (+{ledger.refunds} refunded), the card last "
                                f"said {ledger.card_balance} fen after {last.ref}"))
    return ledger


# --- the database side ----------------------------------------------------------------------------------------

_LOAD = CardLoad.__table__
_ENTRY = CardEntry.__table__
_ACCOUNT = CardAccount.__table__
_TAP = Tap.__table__
_CARD = Card.__table__


def movements(conn: Connection, asn: str) -> tuple[int, list[Movement]]:
    """(opening balance, every movement) of a card, from the issuance record, loads, taps and ledger entries."""
    opening = conn.execute(select(_ACCOUNT.c.opening_balance).where(_ACCOUNT.c.asn == asn)).scalar() or 0
    out = [Movement(LOAD, r.amount, r.settled_at or r.authorized_at, r.online_ttc, r.balance_before + r.amount,
                    f"load {r.id} ({r.channel})", (r.terminal_id, r.tx_date, r.tx_time))
           for r in conn.execute(select(_LOAD).where(_LOAD.c.asn == asn, _LOAD.c.status == "loaded"))]
    out += [Movement(PURCHASE, r.amount, r.occurred_at, r.card_ttc, r.balance_after,
                     f"tap {r.device_id}/{r.device_seq}", (r.terminal_id, r.terminal_seq, r.tac))
            for r in conn.execute(select(_TAP).where(_TAP.c.card_asn == asn, _TAP.c.kind == "purchase"))]
    out += [Movement(r.kind, r.amount, r.at, ref=f"{r.kind} {r.id} by {r.who}")
            for r in conn.execute(select(_ENTRY).where(_ENTRY.c.asn == asn))]
    return opening, out


def card_ledger(conn: Connection, *, asn: str) -> Ledger:
    """A card's ledger, checked against its counters at issue where its account has them."""
    opening, moves = movements(conn, asn)
    counters = conn.execute(select(_ACCOUNT.c.opening_purchase_ttc, _ACCOUNT.c.opening_load_ttc)
                            .where(_ACCOUNT.c.asn == asn)).first()
    purchase_ttc, load_ttc = counters if counters is not None else (None, None)
    return check(moves, opening=opening, opening_purchase_ttc=purchase_ttc, opening_load_ttc=load_ttc)


def review_card(conn: Connection, *, asn: str, now: datetime) -> Ledger:
    """Check a card's ledger (with its opening balance and counters) and open a case for each new finding."""
    ledger = card_ledger(conn, asn=asn)
    for f in ledger.findings:
        cases.raise_case(conn, asn=asn, kind=f.kind, key=f.key, detail=f.detail, now=now)
    return ledger


def review_cards_seen(conn: Connection, *, operator: str, since: datetime, now: datetime) -> tuple[int, int]:
    """Review every issued card (one with an account) whose taps on ``operator``'s buses arrived since ``since``:
    the nightly job's sweep, so anomalies become cases without anyone asking. Returns (cards reviewed, new
    cases)."""
    asns = conn.execute(select(_TAP.c.card_asn).distinct()
                        .join(_ACCOUNT, _ACCOUNT.c.asn == _TAP.c.card_asn)
                        .where(_TAP.c.operator == operator, _TAP.c.received_at >= since)
                        .order_by(_TAP.c.card_asn)).scalars().all()
    before = conn.execute(select(func.count()).select_from(CardCase)).scalar_one()
    for asn in asns:
        review_card(conn, asn=asn, now=now)
    after = conn.execute(select(func.count()).select_from(CardCase)).scalar_one()
    return len(asns), after - before


def adjust(conn: Connection, *, asn: str, amount: int, who: str, why: str, now: datetime) -> Ledger:
    """A staff correction of the book by ``amount`` fen (signed), e.g. -200 for a tap whose record was lost."""
    if not isinstance(amount, int) or amount == 0:
        raise ValueError("an adjustment is a non-zero whole number of fen")
    if not why.strip():
        raise ValueError("say why: an adjustment without a reason cannot be audited")
    _need_card(conn, asn)
    conn.execute(_ENTRY.insert().values(asn=asn, kind=ADJUSTMENT, amount=amount, at=now, who=who, why=why))
    audit.record(conn, who=who, action="adjust", why=why, now=now, asn=asn, amount=amount)
    return card_ledger(conn, asn=asn)


class RefundRefused(Exception):
    pass


def refund_balance(conn: Connection, *, asn: str, amount: int, who: str, why: str, now: datetime) -> Ledger:
    """Pay ``amount`` fen of a lost or blocked card's frozen balance back to its holder."""
    if not isinstance(amount, int) or amount <= 0:
        raise ValueError("a refund is a positive whole number of fen")
    status = _need_card(conn, asn)
    frozen = conn.execute(select(_ACCOUNT.c.frozen_balance).where(_ACCOUNT.c.asn == asn)).scalar()
    if status not in ("lost", "blocked") or frozen is None:
        raise RefundRefused(f"card {asn} is {status}: report it lost (which freezes its balance) before a refund")
    refunded = conn.execute(select(func.coalesce(func.sum(_ENTRY.c.amount), 0))
                            .where(_ENTRY.c.asn == asn, _ENTRY.c.kind == REFUND)).scalar_one()
    if refunded + amount > frozen:
        raise RefundRefused(f"card {asn}: {frozen} fen frozen, {refunded} refunded already; {amount} more is "
                            "too much")
    conn.execute(_ENTRY.insert().values(asn=asn, kind=REFUND, amount=amount, at=now, who=who, why=why))
    audit.record(conn, who=who, action="refund_balance", why=why, now=now, asn=asn, amount=amount)
    return card_ledger(conn, asn=asn)


def freeze_balance(conn: Connection, *, asn: str, now: datetime) -> int:
    """Freeze a card's book balance for refund (loss reporting calls this); returns it."""
    balance = card_ledger(conn, asn=asn).balance
    conn.execute(update(_ACCOUNT).where(_ACCOUNT.c.asn == asn).values(frozen_balance=balance, frozen_at=now))
    return balance


def _need_card(conn: Connection, asn: str) -> str:
    status = conn.execute(select(_CARD.c.status).where(_CARD.c.asn == asn)).scalar()
    if status is None:
        raise LookupError(f"card {asn} is not known: issue it first (farebox card issue)")
    return status

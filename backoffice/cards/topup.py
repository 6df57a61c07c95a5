"""Top-ups, at the counter and over the air: the back office as the issuer host of the load protocol.

The card says INITIALIZE FOR LOAD -> balance, online TTC, random, MAC1; the host checks MAC1 and answers MAC2
(:mod:`backoffice.keyservice`, keys never leave it); the card runs CREDIT FOR LOAD and answers the TAC, which the
host verifies and records. Every MAC2 the host gives is a ``card_load`` row written and committed *before* it
leaves, so a load whose TAC never comes back is never invisible.

What makes it safe to hand out a MAC2 again: the card's online counter (TTC). A MAC2 is bound to one card session
(the card's random) at one counter value t, and a card credits at most one load at each counter value. So any
number of MAC2s at the *same* counter can never load more than once between them: **all the MAC2s of one order are
given at one counter value**, and an order gets a MAC2 at another counter only after every earlier one is proven
void. What proves what:

- *loaded*: the card's TAC (reported by the phone, or relayed as the card's answer to GET TRANSACTION PROVE for the
  load at t), verified with the issuer's keys; or the card's log showing the load at t with this amount, terminal,
  date and time. A phone can forge a log, but a forged "loaded" only ever costs the rider: it never releases money.
- *void*: a load at t is void when the card's own TAC proves another load at t (the counter is spent), or when
  the host's own desk reader (counter top-up, staff at the desk) reads the card at counter t *now*: its earlier
  card sessions are gone, so no MAC2 at t can ever be used. Nothing a phone says voids a load: a phone can replay
  an old INITIALIZE answer (a genuine MAC1 at an old counter) and an old log, and a void would hand out a new MAC2.
- *unconfirmed*: the card (a MAC1 at a higher counter, or the phone's word) is past t and nothing proves whether the
  MAC2 was used. The order waits for staff (the card at the desk, or the issuer's file), and is never re-authorised.

Over-the-air order states (``topup_order.status``)::

    created --signed webhook, amount matches--> paid
    paid --phone relays INITIALIZE, MAC1 good--> authorized        (MAC2 given, card_load row at TTC t)
    authorized --same TTC, same random (a retry)--> authorized      (the same MAC2 again)
    authorized --same TTC, new random (phone started over)--> authorized  (another MAC2 at t: at most one can load)
    authorized --a MAC1 at a higher TTC for this order--> unconfirmed   (refused: a MAC2 at t may have loaded)
    authorized|unconfirmed --TAC (reported or proved) verified, or the log shows it--> loaded
    authorized|unconfirmed --the card's TAC proves another load at t--> paid
    authorized|unconfirmed --staff read the card at the desk at counter t--> paid  (then retry, or refund)
    authorized|unconfirmed --staff, with the issuer's file--> loaded
    paid --staff refund--> refunded

A refused request changes nothing, except the one proven fact it carries: a MAC1-verified INITIALIZE at a counter
past this order's load makes the order unconfirmed. At most one loaded row exists per (card, online TTC) (a unique
index). Duplicate webhooks find their event row; duplicate TAC reports find the order loaded. Every step that
changes money has an audit record.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, select, update

from backoffice.cards import audit, cases
from backoffice.keyservice import KeyService, LoadRefused, LoadRequest
from backoffice.models import Card, CardLoad, TopupOrder
from epurse import apdu, crypto

_LOAD = CardLoad.__table__
_ORDER = TopupOrder.__table__
_CARD = Card.__table__
HOST = "ota-host"  # who the audit names when the host itself acts


class TopupRefused(Exception):
    """The host will not do this step; ``reason`` is a short code (the phone menu and the API map it)."""

    def __init__(self, reason: str, message: str, *, keep: bool = False):
        super().__init__(message)
        self.reason = reason
        self.keep = keep  # the refusal itself changed state (an order now unconfirmed, a case): commit it


@dataclass(frozen=True)
class LoadGrant:
    """The host's answer to INITIALIZE FOR LOAD: what CREDIT FOR LOAD sends."""

    load_id: int
    date4: bytes
    time3: bytes
    mac2: bytes

    def credit_apdu(self) -> bytes:
        return apdu.credit_load(self.date4, self.time3, self.mac2)


@dataclass(frozen=True)
class Order:
    order_id: str
    asn: str
    rider: str
    amount: int
    status: str
    created_at: datetime
    updated_at: datetime
    payment_ref: str | None


def _order(r) -> Order:
    return Order(r.order_id, r.asn, r.rider, r.amount, r.status, r.created_at, r.updated_at, r.payment_ref)


def _request(row) -> LoadRequest:
    return LoadRequest(asn=bytes.fromhex(row.asn), algorithm=row.algorithm, balance=row.balance_before,
                       online_ttc=row.online_ttc, random=bytes.fromhex(row.card_random),
                       mac1=bytes.fromhex(row.mac1), amount=row.amount, terminal_id=bytes.fromhex(row.terminal_id))


# --- the host's core, both channels -------------------------------------------------------------------------


def _card_status(conn: Connection, asn: str) -> str:
    status = conn.execute(select(_CARD.c.status).where(_CARD.c.asn == asn)).scalar()
    if status is None:
        raise TopupRefused("unknown_card", f"card {asn} is not issued here")
    return status


def _init_request(asn: str, init: apdu.LoadInit, amount: int, terminal_id: bytes) -> LoadRequest:
    return LoadRequest(asn=bytes.fromhex(asn), algorithm=init.algorithm, balance=init.balance,
                       online_ttc=init.online_ttc, random=init.random, mac1=init.mac1, amount=amount,
                       terminal_id=terminal_id)


def _check_mac1(keys: KeyService, asn: str, init: apdu.LoadInit, amount: int, terminal_id: bytes) -> None:
    """The card's own MAC1 over this INITIALIZE FOR LOAD answer, before anything is concluded from it: a forged
    answer is refused and changes nothing."""
    if not keys.verify_load_mac1(_init_request(asn, init, amount, terminal_id)):
        raise TopupRefused("bad_mac1", f"card {asn}: the INITIALIZE FOR LOAD answer's MAC1 does not verify "
                                       f"for {amount} fen at terminal {terminal_id.hex()}")


def _grant(conn: Connection, *, keys: KeyService, asn: str, init: apdu.LoadInit, amount: int, terminal_id: bytes,
           channel: str, staff: str, now: datetime, order_id: str | None) -> LoadGrant:
    status = _card_status(conn, asn)
    if status != "active":
        raise TopupRefused("card_denied", f"card {asn} is {status}: no load")
    if amount <= 0:
        raise TopupRefused("bad_amount", "a load is a positive number of fen")
    date4, time3 = _distinct_stamp(conn, asn=asn, online_ttc=init.online_ttc, amount=amount, now=now)
    try:
        mac2 = keys.load_mac2(_init_request(asn, init, amount, terminal_id), date4, time3)
    except LoadRefused as e:
        raise TopupRefused("bad_mac1", str(e)) from None
    _card_at(conn, asn=asn, online_ttc=init.online_ttc, now=now)
    load_id = conn.execute(_LOAD.insert().values(
        asn=asn, channel=channel, order_id=order_id, amount=amount, balance_before=init.balance,
        online_ttc=init.online_ttc, algorithm=init.algorithm, card_random=init.random.hex(), mac1=init.mac1.hex(),
        terminal_id=terminal_id.hex(), tx_date=date4.hex(), tx_time=time3.hex(), mac2=mac2.hex(),
        status="authorized", staff=staff, authorized_at=now).returning(_LOAD.c.id)).scalar_one()
    audit.record(conn, who=staff, action="authorize_load", why=f"{channel} load", now=now, asn=asn,
                 order_id=order_id, amount=amount, load_id=load_id, online_ttc=init.online_ttc)
    return LoadGrant(load_id, date4, time3, mac2)


def _distinct_stamp(conn: Connection, *, asn: str, online_ttc: int, amount: int, now: datetime
                    ) -> tuple[bytes, bytes]:
    """The date and time the MAC2 (and so the card's TAC and log record) will carry. The load TAC covers the new
    balance, counter, amount, terminal, date and time, but not the session: two MAC2s at one counter for the same
    amount in the same second would get the same TAC, and the host could not tell which one the card used. So a
    second MAC2 at a counter gets the next free second."""
    taken = {(r.tx_date, r.tx_time) for r in conn.execute(select(_LOAD.c.tx_date, _LOAD.c.tx_time).where(
        _LOAD.c.asn == asn, _LOAD.c.online_ttc == online_ttc, _LOAD.c.amount == amount))}
    stamp = now
    while (crypto.bcd_date(stamp).hex(), crypto.bcd_time(stamp).hex()) in taken:
        stamp += timedelta(seconds=1)
    return crypto.bcd_date(stamp), crypto.bcd_time(stamp)


def _card_at(conn: Connection, *, asn: str, online_ttc: int, now: datetime) -> None:
    """A MAC1-verified INITIALIZE FOR LOAD shows the card at online counter ``online_ttc``: what that says of the
    card's live loads. Past a load's counter: the load may have happened (unconfirmed). At its counter: nothing (a
    phone's answer may be a replay, and a second MAC2 at the same counter is safe anyway; the desk reader's own
    reading voids such loads in :func:`resolve_from_card` before it asks for a grant). Below it: the card went
    backwards, a case."""
    for row in _live(conn, asn=asn):
        if row.online_ttc < online_ttc:
            _unconfirmed(conn, row, now)
        elif row.online_ttc > online_ttc:
            cases.raise_case(conn, asn=asn, kind=cases.COUNTER_BACKWARDS, key=f"load{row.online_ttc}",
                             detail=f"online counter {online_ttc} is below load {row.id}'s {row.online_ttc}", now=now)


def _live(conn: Connection, *, asn: str | None = None, order_id: str | None = None):
    """Loads that got a MAC2 and are not settled yet, newest first."""
    q = select(_LOAD).where(_LOAD.c.status == "authorized").order_by(_LOAD.c.id.desc())
    if asn is not None:
        q = q.where(_LOAD.c.asn == asn)
    if order_id is not None:
        q = q.where(_LOAD.c.order_id == order_id)
    return conn.execute(q).all()


def _void(conn: Connection, row, now: datetime, *, why: str, who: str = HOST) -> None:
    conn.execute(update(_LOAD).where(_LOAD.c.id == row.id).values(status="void", settled_at=now))
    if row.order_id is not None:
        # The order may load again only when none of its MAC2s is left that could still have loaded.
        left = set(conn.execute(select(_LOAD.c.status).where(_LOAD.c.order_id == row.order_id)).scalars())
        if not left & {"authorized", "loaded"}:
            conn.execute(update(_ORDER).where(_ORDER.c.order_id == row.order_id,
                                              _ORDER.c.status.in_(("authorized", "unconfirmed", "loaded")))
                         .values(status="paid", updated_at=now))
    audit.record(conn, who=who, action="void_load", why=why, now=now, asn=row.asn, order_id=row.order_id,
                 amount=row.amount, load_id=row.id, online_ttc=row.online_ttc)


def _unconfirmed(conn: Connection, row, now: datetime) -> None:
    if row.order_id is not None:
        conn.execute(update(_ORDER).where(_ORDER.c.order_id == row.order_id, _ORDER.c.status == "authorized")
                     .values(status="unconfirmed", updated_at=now))
    cases.raise_case(conn, asn=row.asn, kind=cases.LOAD_UNCONFIRMED, key=f"load{row.id}",
                     detail=f"load {row.id} ({row.amount} fen at online counter {row.online_ttc}) got its MAC2 "
                            "but no TAC, and the card has moved on: read its log, or check the issuer's file", now=now)


def _loaded(conn: Connection, row, now: datetime, *, tac: str | None, by: str, who: str = HOST) -> set[int]:
    """Record ``row`` as loaded. Its counter is spent, so every other load at it is void, when ``by`` is proof
    from the card (its TAC) or staff; a log (``card_log``) proves only this load, so the others wait for proof.
    Returns the ids of the loads it voided."""
    proven = by != "card_log"
    voided = set()
    for other in conn.execute(select(_LOAD).where(_LOAD.c.asn == row.asn, _LOAD.c.online_ttc == row.online_ttc,
                                                  _LOAD.c.id != row.id, _LOAD.c.status != "void")).all():
        if other.status == "loaded" and not proven:
            raise TopupRefused("already_loaded", f"load {other.id} is the card's load at online counter "
                                                 f"{row.online_ttc} already")
        if proven:
            _void(conn, other, now, who=who, why=f"load {row.id} at the same online counter {row.online_ttc} is "
                                                 f"proven ({by}): this MAC2 can never have been used")
            voided.add(other.id)
    conn.execute(update(_LOAD).where(_LOAD.c.id == row.id).values(status="loaded", tac=tac, confirmed_by=by,
                                                                  settled_at=now))
    if row.order_id is not None:
        conn.execute(update(_ORDER).where(_ORDER.c.order_id == row.order_id).values(status="loaded",
                                                                                    updated_at=now))
    audit.record(conn, who=who, action="load_confirmed", why=f"confirmed by {by}", now=now, asn=row.asn,
                 order_id=row.order_id, amount=row.amount, load_id=row.id, tac=tac)
    return voided


def _tac_ok(keys: KeyService, row, tac: bytes) -> bool:
    return keys.verify_load_tac(_request(row), bytes.fromhex(row.tx_date), bytes.fromhex(row.tx_time), tac)


def confirm_load(conn: Connection, *, keys: KeyService, load_id: int, tac: bytes, now: datetime) -> None:
    """The card's TAC for a load: verified, the load recorded as loaded (a repeat of the same TAC is a no-op)."""
    row = conn.execute(select(_LOAD).where(_LOAD.c.id == load_id)).first()
    if row is None:
        raise TopupRefused("unknown_load", f"no load {load_id}")
    if row.status == "loaded":
        if row.tac == tac.hex():
            return
        raise TopupRefused("already_loaded", f"load {load_id} is recorded already")
    if not _tac_ok(keys, row, tac):
        raise TopupRefused("bad_tac", f"load {load_id}: the TAC does not verify")
    _loaded(conn, row, now, tac=tac.hex(), by="tac")


@dataclass(frozen=True)
class LoadProof:
    """The card's answer to GET TRANSACTION PROVE for the load at ``online_ttc`` (type 02): its TAC."""

    online_ttc: int
    tac: bytes


def resolve_from_card(conn: Connection, *, asn: str, online_ttc: int, log: list[apdu.LogRecord], now: datetime,
                      who: str = HOST, keys: KeyService | None = None, proofs: list[LoadProof] = (),
                      witnessed: bool = False) -> dict[int, str]:
    """The card is seen again: its online TTC now, its log (READ RECORD, newest first) and, when relayed, its
    answers to GET TRANSACTION PROVE. Settles its loads that got a MAC2 and no TAC, by the rules in this module's
    docstring. ``witnessed``: the host's own desk reader read all of it just now (else a phone told it).
    Returns load id -> what became of it (loaded / void / unconfirmed / authorized)."""
    out: dict[int, str] = {}
    voided: set[int] = set()  # by a sibling's proof, earlier in this loop
    for row in _live(conn, asn=asn):
        if row.id in voided:
            out[row.id] = "void"
            continue
        proof = next((p for p in proofs if p.online_ttc == row.online_ttc), None)
        if proof is not None and keys is not None and _tac_ok(keys, row, proof.tac):
            voided |= _loaded(conn, row, now, tac=proof.tac.hex(), by="tac", who=who)
            out[row.id] = "loaded"
            continue
        at_t = [r for r in log if r.tx_type == apdu.TX_LOAD and r.ttc == row.online_ttc]
        if at_t and (
                at_t[0].amount, at_t[0].terminal_id.hex(), at_t[0].date.hex(), at_t[0].time.hex()) == (
                row.amount, row.terminal_id, row.tx_date, row.tx_time):
            try:
                _loaded(conn, row, now, tac=None, by="card_log", who=who)
                out[row.id] = "loaded"
                continue
            except TopupRefused:
                pass  # another load at this counter is the card's: this one waits for proof
        if online_ttc > row.online_ttc:
            _unconfirmed(conn, row, now)
            out[row.id] = "unconfirmed"
        elif online_ttc == row.online_ttc and witnessed:
            _void(conn, row, now, why="the desk reader read the card at this load's online counter: its MAC2 "
                                      "belongs to a card session that is gone", who=who)
            out[row.id] = "void"
        else:
            out[row.id] = "authorized"  # the phone's word, or a stale read: nothing is concluded from it
    return out


# --- counter top-up -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterLoad:
    asn: str
    load_id: int
    amount: int
    new_balance: int
    online_ttc: int
    tac: bytes


def read_card_log(session) -> list[apdu.LogRecord]:
    """READ RECORD 1..10 of the card's transaction log (the application must be selected), newest first."""
    out = []
    for n in range(1, 11):
        answer = session.exchange(apdu.read_log_record(n))
        if answer[-2:] != b"\x90\x00":
            break
        out.append(apdu.parse_log_record(answer[:-2]))
    return out


def read_for_load(session, *, amount: int, terminal_id: bytes):
    """The desk reader's half before the host answers: (CardFacts, log newest first, LoadInit). The card is left
    with its INITIALIZE FOR LOAD open, so the next command it gets must be the CREDIT FOR LOAD (the desk agent,
    farebox/desk.py, holds the card for it)."""
    from backoffice.cards.issuance import read_card

    facts = read_card(session, counters=False)  # a top-up must not open INITIALIZEs that could disturb a prove
    log = read_card_log(session)
    init = apdu.parse_init_load(apdu.check(session.exchange(apdu.init_load(1, amount, terminal_id)),
                                           "INITIALIZE FOR LOAD"))
    return facts, log, init


def authorize_counter_load(conn: Connection, *, keys: KeyService, asn: str, init: apdu.LoadInit,
                           log: list[apdu.LogRecord], amount: int, terminal_id: bytes, staff: str,
                           now: datetime) -> LoadGrant:
    """The host's half of a counter top-up: the card's MAC1 checked, its earlier unfinished loads settled from
    what the desk reader read just now (a witness, unlike a phone's relay: staff at their own desk), and the
    MAC2 granted. The caller commits before the CREDIT FOR LOAD goes to the card."""
    _check_mac1(keys, asn, init, amount, terminal_id)
    resolve_from_card(conn, asn=asn, online_ttc=init.online_ttc, log=log, now=now, who=staff, witnessed=True)
    return _grant(conn, keys=keys, asn=asn, init=init, amount=amount, terminal_id=terminal_id, channel="counter",
                  staff=staff, now=now, order_id=None)


def counter_topup(engine: Engine, session, *, keys: KeyService, amount: int, terminal_id: bytes, staff: str,
                  now: datetime) -> CounterLoad:
    """A staff member loads ``amount`` fen onto the card in the desk reader (``session``: ``exchange(apdu)``).

    First the card's earlier unfinished loads are settled from its log; the authorisation is committed before
    CREDIT FOR LOAD is sent, the TAC after. A card pulled away between the two leaves an authorized load that the
    next sight of the card settles. Raises TopupRefused, epurse.apdu.StatusError / ResponseError, or the reader's
    errors (validator.readers.ReaderError) as they come."""
    facts, log, init = read_for_load(session, amount=amount, terminal_id=terminal_id)
    with engine.begin() as conn:
        grant = authorize_counter_load(conn, keys=keys, asn=facts.asn, init=init, log=log, amount=amount,
                                       terminal_id=terminal_id, staff=staff, now=now)
    tac = apdu.parse_credit(apdu.check(session.exchange(grant.credit_apdu()), "CREDIT FOR LOAD"))
    with engine.begin() as conn:
        confirm_load(conn, keys=keys, load_id=grant.load_id, tac=tac, now=now)
    return CounterLoad(facts.asn, grant.load_id, amount, init.balance + amount, init.online_ttc, tac)


# --- over the air -------------------------------------------------------------------------------------------


def create_order(conn: Connection, *, asn: str, rider: str, amount: int, now: datetime,
                 order_id: str | None = None) -> Order:
    """A rider asks for a top-up in the phone menu: an order waiting for its payment."""
    if not isinstance(amount, int) or amount <= 0:
        raise TopupRefused("bad_amount", "a top-up is a positive whole number of fen")
    status = _card_status(conn, asn)
    if status != "active":
        raise TopupRefused("card_denied", f"card {asn} is {status}: no top-up")
    order_id = order_id or "T" + secrets.token_hex(12)
    conn.execute(_ORDER.insert().values(order_id=order_id, asn=asn, rider=rider, amount=amount, status="created",
                                        created_at=now, updated_at=now))
    audit.record(conn, who=rider, action="order_created", why="top-up asked in the phone menu", now=now, asn=asn,
                 order_id=order_id, amount=amount)
    return get_order(conn, order_id=order_id)


def get_order(conn: Connection, *, order_id: str) -> Order:
    row = conn.execute(select(_ORDER).where(_ORDER.c.order_id == order_id)).first()
    if row is None:
        raise TopupRefused("unknown_order", f"no order {order_id}")
    return _order(row)


def _lock_order(conn: Connection, order_id: str, now: datetime):
    # A write first: it takes the row lock on PostgreSQL and the write lock on SQLite, so two retries of one
    # order arriving together are served one after the other and the second sees the first's MAC2.
    conn.execute(update(_ORDER).where(_ORDER.c.order_id == order_id).values(updated_at=now))
    row = conn.execute(select(_ORDER).where(_ORDER.c.order_id == order_id)).first()
    if row is None:
        raise TopupRefused("unknown_order", f"no order {order_id}")
    return row


def mark_paid(conn: Connection, *, order_id: str, amount: int, payment_ref: str, now: datetime) -> str:
    """The payment platform says the order is paid. Idempotent; returns what happened, in words."""
    row = _lock_order(conn, order_id, now)
    if row.payment_ref is not None:
        if row.payment_ref == payment_ref:
            return f"order {order_id} was paid already ({payment_ref})"
        raise TopupRefused("paid_twice", f"order {order_id} is paid by {row.payment_ref} already; "
                                         f"{payment_ref} must be refunded by the platform")
    if amount != row.amount:
        raise TopupRefused("amount_differs", f"order {order_id} is for {row.amount} fen, the payment says {amount}")
    if row.status != "created":
        raise TopupRefused("bad_state", f"order {order_id} is {row.status}")
    conn.execute(update(_ORDER).where(_ORDER.c.order_id == order_id).values(
        status="paid", payment_ref=payment_ref, paid_at=now, updated_at=now))
    audit.record(conn, who="payment-webhook", action="order_paid", why="signed payment notification", now=now,
                 asn=row.asn, order_id=order_id, amount=amount, payment_ref=payment_ref)
    return f"order {order_id} paid ({payment_ref})"


def authorize_ota(conn: Connection, *, keys: KeyService, order_id: str, asn: str, init: apdu.LoadInit,
                  terminal_id: bytes, now: datetime, log: list[apdu.LogRecord] | None = None) -> LoadGrant:
    """The phone relays its SIM's INITIALIZE FOR LOAD answer for a paid order; the host answers MAC2.

    ``log``: the SIM's log records, when the phone read them first; they can confirm earlier loads (never void
    them). The answer's MAC1 is checked before anything else, so a forged answer changes nothing."""
    row = _lock_order(conn, order_id, now)
    if row.asn != asn:
        raise TopupRefused("wrong_card", f"order {order_id} is for card {row.asn}, not {asn}")
    _check_mac1(keys, asn, init, row.amount, terminal_id)
    for live in _live(conn, order_id=order_id):
        if live.online_ttc == init.online_ttc and live.card_random == init.random.hex():
            if live.mac1 != init.mac1.hex() or live.balance_before != init.balance:
                raise TopupRefused("bad_mac1", f"order {order_id}: a retry that differs from the first request")
            # The phone did not get the answer (a timeout) and asks again for the same card session.
            return LoadGrant(live.id, bytes.fromhex(live.tx_date), bytes.fromhex(live.tx_time),
                             bytes.fromhex(live.mac2))
    settled = {}
    if log is not None:
        settled = resolve_from_card(conn, asn=asn, online_ttc=init.online_ttc, log=log, now=now)
        row = conn.execute(select(_ORDER).where(_ORDER.c.order_id == order_id)).one()
    try:
        return _authorize_paid(conn, keys=keys, row=row, asn=asn, init=init, terminal_id=terminal_id, now=now)
    except TopupRefused as e:
        # What the verified answer and the log settled stands even when this request is refused (e.g. "already
        # loaded"): a confirmation, or an unconfirmed mark from a MAC1-proven counter; never a void.
        e.keep = e.keep or any(v in ("loaded", "unconfirmed") for v in settled.values())
        raise


def _authorize_paid(conn: Connection, *, keys: KeyService, row, asn: str, init: apdu.LoadInit,
                    terminal_id: bytes, now: datetime) -> LoadGrant:
    order_id = row.order_id
    if row.status == "loaded":
        raise TopupRefused("already_loaded", f"order {order_id} is loaded already")
    if row.status in ("created", "refunded"):
        raise TopupRefused("not_paid" if row.status == "created" else "refunded",
                           f"order {order_id} is {row.status}: no load")
    live = _live(conn, order_id=order_id)
    if live:
        counter = live[0].online_ttc  # all of an order's MAC2s are at one counter (this module's docstring)
        if init.online_ttc > counter:
            # MAC1-verified: the card really is past the counter this order's MAC2s were for; one may have loaded.
            for load in live:
                _unconfirmed(conn, load, now)
            raise TopupRefused("load_unconfirmed", f"order {order_id}: the card's online counter moved past the "
                                                   "MAC2 given for this order; it may be loaded. Its log, its "
                                                   "transaction proof or staff will settle it", keep=True)
        if init.online_ttc < counter:
            raise TopupRefused("counter_backwards", f"order {order_id}: the card's online counter "
                                                    f"{init.online_ttc} is below the {counter} it showed")
    if row.status == "unconfirmed":
        raise TopupRefused("load_unconfirmed", f"order {order_id} may be loaded already: its load is unconfirmed")
    grant = _grant(conn, keys=keys, asn=asn, init=init, amount=row.amount, terminal_id=terminal_id,
                   channel="ota", staff=HOST, now=now, order_id=order_id)
    conn.execute(update(_ORDER).where(_ORDER.c.order_id == order_id).values(status="authorized", updated_at=now))
    return grant


def report_tac(conn: Connection, *, keys: KeyService, order_id: str, tac: bytes, now: datetime) -> Order:
    """The phone reports the TAC its SIM answered to CREDIT FOR LOAD. A repeat is harmless."""
    row = _lock_order(conn, order_id, now)
    loads = conn.execute(select(_LOAD).where(_LOAD.c.order_id == order_id, _LOAD.c.status != "void")).all()
    for load in loads:
        if load.status == "loaded":
            if load.tac in (None, tac.hex()):
                return _order(row)  # a report we have (or the card log told us first)
            continue
        if _tac_ok(keys, load, tac):
            _loaded(conn, load, now, tac=tac.hex(), by="tac")
            return get_order(conn, order_id=order_id)
    raise TopupRefused("bad_tac", f"order {order_id}: the TAC does not verify for any of its loads")


def unconfirmed_orders(conn: Connection, *, now: datetime, grace: timedelta = timedelta(minutes=5)) -> list[Order]:
    """Paid, load unconfirmed: a MAC2 went out more than ``grace`` ago and no TAC came, or the card moved on."""
    q = select(_ORDER).where(
        (_ORDER.c.status == "unconfirmed")
        | ((_ORDER.c.status == "authorized") & (_ORDER.c.updated_at < now - grace))).order_by(_ORDER.c.created_at)
    return [_order(r) for r in conn.execute(q)]


def staff_confirm_loaded(conn: Connection, *, order_id: str, who: str, why: str, now: datetime) -> Order:
    """Staff settle an unconfirmed order as loaded, with the issuer's file (or the card at the desk) showing the
    load. Its other MAC2s at that counter become void: the counter is spent."""
    row = _lock_order(conn, order_id, now)
    if row.status not in ("authorized", "unconfirmed"):
        raise TopupRefused("bad_state", f"order {order_id} is {row.status}: nothing to confirm")
    live = _live(conn, order_id=order_id)
    if not live:
        raise TopupRefused("bad_state", f"order {order_id} has no load waiting for confirmation")
    _loaded(conn, live[0], now, tac=None, by="staff", who=who)
    audit.record(conn, who=who, action="staff_confirm", why=why, now=now, asn=row.asn, order_id=order_id,
                 amount=row.amount)
    return get_order(conn, order_id=order_id)


def staff_retry(conn: Connection, *, order_id: str, card_online_ttc: int, who: str, why: str, now: datetime
                ) -> Order:
    """Staff let an unconfirmed order be loaded again, only when the card's online counter, read at the desk from
    the card itself, proves its MAC2s were never used."""
    row = _lock_order(conn, order_id, now)
    if row.status not in ("authorized", "unconfirmed"):
        raise TopupRefused("bad_state", f"order {order_id} is {row.status}: nothing to retry")
    live = _live(conn, order_id=order_id)
    for load in live:
        if load.online_ttc != card_online_ttc:
            raise TopupRefused("may_be_loaded", f"order {order_id}: the card's online counter is "
                                                f"{card_online_ttc}, past this order's load at {load.online_ttc}: "
                                                "it may be loaded; read its log or the issuer's file")
    for load in live:
        _void(conn, load, now, why=why, who=who)
    audit.record(conn, who=who, action="staff_retry", why=why, now=now, asn=row.asn, order_id=order_id,
                 amount=row.amount, card_online_ttc=card_online_ttc)
    return get_order(conn, order_id=order_id)


def refund_order(conn: Connection, *, order_id: str, who: str, why: str, now: datetime) -> Order:
    """Give a paid order's money back (the platform pays it out); only while no load of it can have happened."""
    row = _lock_order(conn, order_id, now)
    if row.status != "paid":
        hint = (" first settle its load from the card (its online counter or log)"
                if row.status in ("authorized", "unconfirmed") else "")
        raise TopupRefused("bad_state", f"order {order_id} is {row.status}: no refund;{hint}")
    conn.execute(update(_ORDER).where(_ORDER.c.order_id == order_id).values(status="refunded", updated_at=now))
    audit.record(conn, who=who, action="refund_order", why=why, now=now, asn=row.asn, order_id=order_id,
                 amount=row.amount, payment_ref=row.payment_ref)
    return get_order(conn, order_id=order_id)

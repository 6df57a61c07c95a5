"""Ticket orders: created -> paid -> issued -> used | refunded | expired, one audit line per change.

Each function is one use case on the caller's connection, inside the caller's transaction (``with engine.begin()``):
it raises :class:`OrderError` when the request cannot be met, and the caller's rollback then leaves nothing behind.

States of an order::

    created --pay--> paid --issue--> issued --all tickets used--> used
       |                |               +----all refunded-------> refunded
       |                +--refund--> refunded  (could not be issued)
       |                                +----validity over------> expired
       +--hold deadline passed, unpaid--> expired (seats released)

Why it holds under concurrency (PostgreSQL READ COMMITTED, SQLite's one writer):

- Seats: an order takes its seats with one conditional UPDATE,
  ``seats_taken = seats_taken + n WHERE seats_taken + n <= seats``. PostgreSQL re-checks the condition on the row
  as the other buyer committed it, so two buyers of the last seat cannot both get it; the CHECK constraint
  ``seats_taken <= seats`` is the backstop. ``departure.seats_taken`` always equals the seats of its holds that are
  ``held`` or ``sold`` (the test checks it with plain SQL).
- Payment: ``created -> paid`` is a conditional UPDATE on ``state = 'created'``; a notification and an order query
  racing for the same order find one row changed between them: the second one is told ``already_paid``. The same
  condition decides the race between a payment and the expiry job.
- Issue: ``paid -> issued`` the same way, so tickets are made once; asked again, the tickets made are returned.

A payment that arrives after its order expired takes the seats again if they are still free (the order goes on
as paid); otherwise the order stays expired with the money recorded (``paid_fen``) and ``refund_due`` tells the
payment side to give it back. A second, different payment for an order already paid changes nothing here and is
reported as ``second_payment`` for the same reason.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, case, func, insert, select, update

from backoffice.models import Departure, Operator, OrderAudit, OrderItem, Product, SeatHold, Ticket, TicketOrder

CHANNELS = ("web", "sms", "partner", "counter")
STATES = ("created", "paid", "issued", "used", "refunded", "expired")
HOLD_MINUTES = 15  # how long seats are held for an unpaid order
MAX_QUANTITY = 10  # tickets of one item
MAX_ITEMS = 10
PASS_START_AHEAD_DAYS = 62  # a pass may start at most this many service days ahead
BOARDING_BEFORE = timedelta(minutes=60)  # a coach ticket is good from an hour before departure ...
BOARDING_AFTER = timedelta(minutes=120)  # ... to two hours after (a late coach)
PHONE = re.compile(r"\+?[0-9]{5,20}")
PICKUP_MOD = 10**10
KINDS = {"single": 1, "day_pass": 2, "month_pass": 3, "coach_trip": 4}  # wire.ticket.ProductKind


def split_routes(text: str) -> tuple[str, ...]:
    """A product's or ticket's route codes as stored (space-separated; none = any route)."""
    return tuple(r for r in (text or "").split() if r)


class OrderError(ValueError):
    """An order request or change that cannot be done. ``code`` is stable (API answers map it), ``message`` says
    what was wrong and what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ItemRequest:
    product: str  # the product's code in the operator's catalogue
    quantity: int = 1
    departure_id: int | None = None  # a coach trip's departure
    start_date: date | None = None  # a pass's first service day (default: today's)


@dataclass(frozen=True)
class PayResult:
    outcome: str  # paid | already_paid | second_payment | refund_due | revived
    order_id: str
    state: str

    @property
    def newly_paid(self) -> bool:
        return self.outcome in ("paid", "revived")


@dataclass(frozen=True)
class IssuedTicket:
    ticket_id: int
    token: str
    pickup_code: str
    kind: str
    routes: tuple[str, ...]
    valid_from: datetime
    valid_to: datetime
    uses_allowed: int


@dataclass
class RefundQuote:
    order_id: str
    amount_fen: int
    tickets: list[int] = field(default_factory=list)  # the tickets the refund voids
    refused: dict[int, str] = field(default_factory=dict)  # ticket -> why it cannot be refunded
    whole_payment: bool = False  # an order paid but never issued (or paid after expiry): all the money back


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _now(now: datetime | None) -> datetime:
    return _utc(now) if now is not None else datetime.now(UTC)


def _audit(conn: Connection, order_id: str, *, who: str, at: datetime, from_state: str | None, to_state: str,
           why: str) -> None:
    conn.execute(insert(OrderAudit).values(order_id=order_id, at=at, who=who[:64], from_state=from_state,
                                           to_state=to_state, why=why[:500]))


def _move(conn: Connection, order_id: str, from_state: str, to_state: str, *, who: str, at: datetime, why: str,
          **values) -> bool:
    """``from_state -> to_state`` if the order is still in ``from_state`` (then one audit line); False otherwise."""
    changed = conn.execute(update(TicketOrder).where(TicketOrder.order_id == order_id,
                                                     TicketOrder.state == from_state)
                           .values(state=to_state, updated_at=at, **values)).rowcount
    if changed:
        _audit(conn, order_id, who=who, at=at, from_state=from_state, to_state=to_state, why=why)
    return bool(changed)


def _order(conn: Connection, order_id: str):
    row = conn.execute(select(TicketOrder).where(TicketOrder.order_id == order_id)).first()
    if row is None:
        raise OrderError("unknown_order", f"there is no ticket order {order_id!r}")
    return row


def _operator(conn: Connection, code: str):
    row = conn.execute(select(Operator.timezone, Operator.cutoff_hour, Operator.retired_at)
                       .where(Operator.code == code)).first()
    if row is None or row.retired_at is not None:
        raise OrderError("unknown_operator", f"operator {code!r} does not sell tickets here")
    return row


def service_day_of(at: datetime, tz: str, cutoff_hour: int) -> date:
    """The operator's service day ``at`` falls in (as clearing.service_day counts it)."""
    return (_utc(at).astimezone(ZoneInfo(tz)).replace(tzinfo=None) - timedelta(hours=cutoff_hour)).date()


def day_start(day: date, tz: str, cutoff_hour: int) -> datetime:
    """The UTC instant service day ``day`` begins (its cut-off hour on the local clock)."""
    return datetime.combine(day, time(cutoff_hour)).replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)


def _insert_or_nothing(conn: Connection, model, values: dict) -> bool:
    """INSERT unless it would break a unique key (then nothing, False): PostgreSQL and SQLite alike. Whether a row
    went in is read from RETURNING, not from ``rowcount``: psycopg reports -1 (true) for a skipped
    ``ON CONFLICT DO NOTHING`` (test_insert_or_nothing_tells_whether_it_inserted)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    key = list(model.__table__.primary_key.columns)
    stmt = dialect_insert(model).values(**values).on_conflict_do_nothing().returning(*key)
    return conn.execute(stmt).first() is not None


def _take_seats(conn: Connection, departure_id: int, seats: int, now: datetime) -> bool:
    return bool(conn.execute(
        update(Departure)
        .where(Departure.id == departure_id, Departure.active.is_(True), Departure.departs_at > now,
               Departure.seats_taken + seats <= Departure.seats)
        .values(seats_taken=Departure.seats_taken + seats)).rowcount)


def _give_back_seats(conn: Connection, departure_id: int, seats: int) -> None:
    conn.execute(update(Departure).where(Departure.id == departure_id)
                 .values(seats_taken=Departure.seats_taken - seats))


# ---------------------------------------------------------------------------------------------------- create
def _check_phone(channel: str, phone: str) -> str:
    phone = re.sub(r"[\s-]", "", phone or "")
    if phone and not PHONE.fullmatch(phone):
        raise OrderError("bad_phone", f"phone number {phone!r}: digits only, 5 to 20, an optional leading +")
    if not phone and channel in ("web", "sms"):
        raise OrderError("bad_phone", f"a {channel} order needs the rider's phone number (the ticket is sent there)")
    return phone


def _priced_items(conn: Connection, operator: str, items: Sequence[ItemRequest], now: datetime, op) -> list[dict]:
    if not items or len(items) > MAX_ITEMS:
        raise OrderError("bad_items", f"an order has 1 to {MAX_ITEMS} items")
    today = service_day_of(now, op.timezone, op.cutoff_hour)
    out = []
    for item in items:
        q = item.quantity
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= MAX_QUANTITY:
            raise OrderError("bad_quantity", f"quantity {q!r}: 1 to {MAX_QUANTITY} tickets of one item")
        p = conn.execute(select(Product).where(Product.operator == operator, Product.code == item.product)).first()
        if p is None or not p.active:
            raise OrderError("unknown_product", f"{operator} does not sell a product {item.product!r} (now)")
        start = None
        if p.kind == "coach_trip":
            if item.departure_id is None:
                raise OrderError("departure_needed", f"{item.product} is a coach trip: choose a departure")
            dep = conn.execute(select(Departure).where(Departure.id == item.departure_id)).first()
            if dep is None or dep.product_id != p.id or not dep.active:
                raise OrderError("unknown_departure", f"departure {item.departure_id} is not one of {item.product}")
        elif item.departure_id is not None:
            raise OrderError("bad_items", f"{item.product} is a {p.kind}: it has no departures")
        elif p.kind in ("day_pass", "month_pass"):
            start = item.start_date or today
            if not today <= start <= today + timedelta(days=PASS_START_AHEAD_DAYS):
                raise OrderError("bad_start_date", f"a pass starts on a service day from {today} to "
                                 f"{today + timedelta(days=PASS_START_AHEAD_DAYS)}, not {start}")
        elif item.start_date is not None:
            raise OrderError("bad_items", f"{item.product} is a single ride: good on the day it is bought")
        out.append({"product_id": p.id, "departure_id": item.departure_id, "start_date": start, "quantity": q,
                    "unit_fen": p.price_fen, "amount_fen": p.price_fen * q})
    return out


@dataclass(frozen=True)
class Quote:
    """What an order of these items would cost now, before anything is held: the SMS dialogue's quote, the web
    shop's basket. ``seats_free`` per coach item (None for other kinds); ``enough`` whether all fit now."""

    total_fen: int
    lines: list[dict]

    @property
    def enough(self) -> bool:
        return all(line["seats_free"] is None or line["seats_free"] >= line["quantity"] for line in self.lines)


def quote_order(conn: Connection, *, operator: str, items: Sequence[ItemRequest], now: datetime | None = None
                ) -> Quote:
    """Price ``items`` from the catalogue, holding nothing. OrderError as ``create_order`` for a bad item."""
    now = _now(now)
    op = _operator(conn, operator)
    lines = []
    for item in _priced_items(conn, operator, items, now, op):
        product = conn.execute(select(Product.code, Product.name, Product.kind)
                               .where(Product.id == item["product_id"])).one()
        free = None
        if item["departure_id"] is not None:
            dep = conn.execute(select(Departure.seats, Departure.seats_taken, Departure.departs_at)
                               .where(Departure.id == item["departure_id"])).one()
            free = 0 if _utc(dep.departs_at) <= now else dep.seats - dep.seats_taken
        lines.append(item | {"product": product.code, "name": product.name, "kind": product.kind,
                             "seats_free": free})
    return Quote(sum(line["amount_fen"] for line in lines), lines)


def _new_order_id(now: datetime) -> str:
    return f"TK{now:%Y%m%d}{secrets.token_hex(8).upper()}"


def create_order(conn: Connection, *, operator: str, channel: str, phone: str, items: Sequence[ItemRequest],
                 who: str, idempotency_key: str | None = None, now: datetime | None = None,
                 hold_minutes: int = HOLD_MINUTES) -> str:
    """A new order (state created) with its items priced from the catalogue and its coach seats held until
    ``expires_at``. The same ``idempotency_key`` (per operator and channel) returns the first order's id and changes
    nothing, however often it is sent. OrderError: sold out, departed, unknown product, bad phone ..."""
    now = _now(now)
    if channel not in CHANNELS:
        raise OrderError("bad_channel", f"channel {channel!r}: one of {', '.join(CHANNELS)}")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 64:
        raise OrderError("bad_idempotency_key", "an idempotency key is 1 to 64 characters")
    op = _operator(conn, operator)
    phone = _check_phone(channel, phone)

    def existing() -> str | None:
        if idempotency_key is None:
            return None
        return conn.execute(select(TicketOrder.order_id).where(
            TicketOrder.operator == operator, TicketOrder.channel == channel,
            TicketOrder.idempotency_key == idempotency_key)).scalar()

    if (known := existing()) is not None:
        return known
    priced = _priced_items(conn, operator, items, now, op)
    order_id = _new_order_id(now)
    expires = now + timedelta(minutes=hold_minutes)
    # A concurrent order with the same key inserts first: this one then returns that one. (ON CONFLICT rather than a
    # savepoint: pysqlite's savepoint opened before any write would commit on release.)
    if not _insert_or_nothing(conn, TicketOrder, dict(
            order_id=order_id, operator=operator, channel=channel, phone=phone, state="created",
            total_fen=sum(i["amount_fen"] for i in priced), paid_fen=0, refunded_fen=0, payment_ref=None,
            idempotency_key=idempotency_key, created_at=now, updated_at=now, expires_at=expires)):
        if (known := existing()) is not None:
            return known
        raise OrderError("conflict", "the order could not be stored: send it again")
    seats: dict[int, int] = {}
    for item in priced:
        conn.execute(insert(OrderItem).values(order_id=order_id, **item))
        if item["departure_id"] is not None:
            seats[item["departure_id"]] = seats.get(item["departure_id"], 0) + item["quantity"]
    # Departures are taken in id order, by every order alike: two baskets of the same two coaches cannot deadlock.
    for departure_id, n in sorted(seats.items()):
        if not _take_seats(conn, departure_id, n, now):
            dep = conn.execute(select(Departure).where(Departure.id == departure_id)).first()
            if _utc(dep.departs_at) <= now:
                raise OrderError("departed", f"departure {dep.id} ({dep.service_date} {dep.departs_local}) has "
                                 "left: choose a later one")
            raise OrderError("sold_out", f"departure {dep.id} ({dep.service_date} {dep.departs_local}) has "
                             f"{dep.seats - dep.seats_taken} seat(s) left, {n} asked")
        conn.execute(insert(SeatHold).values(departure_id=departure_id, order_id=order_id, seats=n, state="held",
                                             created_at=now, expires_at=expires))
    _audit(conn, order_id, who=who, at=now, from_state=None, to_state="created",
           why=f"{channel} order, {len(priced)} item(s), {sum(i['quantity'] for i in priced)} ticket(s)")
    return order_id


# ------------------------------------------------------------------------------------------------------- pay
def mark_paid(conn: Connection, order_id: str, *, amount_fen: int, payment_ref: str, who: str,
              now: datetime | None = None, why: str = "payment confirmed") -> PayResult:
    """Record that the platform collected ``amount_fen`` for the order under ``payment_ref``. Idempotent: a
    notification and an order query (or a notification delivered twice) record one payment; the later ones are
    told ``already_paid``. OrderError when the amount is not the order's total."""
    now = _now(now)
    if not payment_ref or len(payment_ref) > 64:
        raise OrderError("bad_payment_ref", "a payment reference is 1 to 64 characters")
    order = _order(conn, order_id)
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int) or amount_fen != order.total_fen:
        raise OrderError("amount_mismatch", f"order {order_id} costs {order.total_fen} fen; the payment says "
                         f"{amount_fen!r}")
    if order.payment_ref == payment_ref:
        return PayResult("already_paid", order_id, order.state)
    if _move(conn, order_id, "created", "paid", who=who, at=now, why=f"{why} ({payment_ref})",
             paid_fen=amount_fen, payment_ref=payment_ref, paid_at=now):
        conn.execute(update(SeatHold).where(SeatHold.order_id == order_id, SeatHold.state == "held")
                     .values(state="sold"))
        return PayResult("paid", order_id, "paid")
    order = _order(conn, order_id)  # someone else moved it first: see what it is now
    if order.payment_ref == payment_ref:
        return PayResult("already_paid", order_id, order.state)
    if order.payment_ref is not None:
        return PayResult("second_payment", order_id, order.state)
    if order.state == "expired":
        return _paid_after_expiry(conn, order, amount_fen=amount_fen, payment_ref=payment_ref, who=who, now=now,
                                  why=why)
    raise OrderError("bad_state", f"order {order_id} is {order.state}: it cannot be paid")


def _paid_after_expiry(conn: Connection, order, *, amount_fen: int, payment_ref: str, who: str, now: datetime,
                       why: str) -> PayResult:
    # First the money is written down on the expired order (a conditional UPDATE: a concurrent call for the same
    # order waits on this row and then finds the payment there), then the seats are tried again.
    if not conn.execute(update(TicketOrder).where(TicketOrder.order_id == order.order_id,
                                                  TicketOrder.state == "expired", TicketOrder.payment_ref.is_(None))
                        .values(updated_at=now, paid_fen=amount_fen, payment_ref=payment_ref, paid_at=now)).rowcount:
        again = _order(conn, order.order_id)
        return PayResult("already_paid" if again.payment_ref == payment_ref else "second_payment", order.order_id,
                         again.state)
    holds = conn.execute(select(SeatHold).where(SeatHold.order_id == order.order_id, SeatHold.state == "released")
                         .order_by(SeatHold.departure_id, SeatHold.id)).all()
    taken: list | None = []
    for h in holds:
        if not _take_seats(conn, h.departure_id, h.seats, now):
            for back in taken:
                _give_back_seats(conn, back.departure_id, back.seats)
            taken = None
            break
        taken.append(h)
    if taken is not None:
        _move(conn, order.order_id, "expired", "paid", who=who, at=now,
              why=f"{why} ({payment_ref}) after the order expired; its seats were free again")
        for h in holds:
            conn.execute(insert(SeatHold).values(departure_id=h.departure_id, order_id=order.order_id,
                                                 seats=h.seats, state="sold", created_at=now, expires_at=now))
        return PayResult("revived", order.order_id, "paid")
    _audit(conn, order.order_id, who=who, at=now, from_state="expired", to_state="expired",
           why=f"{why} ({payment_ref}) after the order expired and its seats were sold: refund due")
    return PayResult("refund_due", order.order_id, "expired")


def refund_due(conn: Connection, order_id: str) -> int:
    """Fen collected for an order that will never be issued (paid after it expired), not yet given back."""
    order = _order(conn, order_id)
    if order.state == "expired" and order.issued_at is None:
        return order.paid_fen - order.refunded_fen
    return 0


# ----------------------------------------------------------------------------------------------------- issue
def _validity(product, item, departure, *, now: datetime, op) -> tuple[datetime, datetime, tuple[str, ...]]:
    now = now.replace(microsecond=0)
    if product.kind == "coach_trip":
        at = _utc(departure.departs_at)
        return at - BOARDING_BEFORE, at + BOARDING_AFTER, (departure.route,)
    routes = split_routes(product.routes)
    if product.kind == "single":
        first = service_day_of(now, op.timezone, op.cutoff_hour)
        return now, day_start(first + timedelta(days=product.validity_days), op.timezone, op.cutoff_hour), routes
    first = item.start_date
    start = day_start(first, op.timezone, op.cutoff_hour)
    end = day_start(first + timedelta(days=product.validity_days), op.timezone, op.cutoff_hour)
    return start, end, routes


def _insert_ticket(conn: Connection, values: dict, make_token) -> int:
    """A fresh random ticket id whose pickup serial is free for the operator (a clash is retried)."""
    for _ in range(20):
        ticket_id = secrets.randbelow(2**63 - 1) + 1
        if _insert_or_nothing(conn, Ticket, dict(ticket_id=ticket_id, pickup_serial=ticket_id % PICKUP_MOD,
                                                 token=make_token(ticket_id), **values)):
            return ticket_id
    raise RuntimeError("no free ticket id after 20 tries")


def issue_tickets(conn: Connection, order_id: str, *, keys, who: str, now: datetime | None = None
                  ) -> list[IssuedTicket]:
    """Make the tickets of a paid order (state paid -> issued): each a signed token (wire.ticket.encode_ticket with
    the ticket key) and a pickup code (the operator's pickup key). Asked again, the tickets already made are
    returned and nothing changes. ``keys``: backoffice.tickets.keys.TicketKeys."""
    from wire.ticket import Ticket as TokenFields, encode_ticket

    now = _now(now)
    order = _order(conn, order_id)
    if order.state != "paid" or not _move(conn, order_id, "paid", "issued", who=who, at=now,
                                          why="tickets issued", issued_at=now):
        order = _order(conn, order_id)
        if order.issued_at is not None:
            return tickets_of(conn, order_id, keys=keys)
        raise OrderError("not_paid", f"order {order_id} is {order.state}: only a paid order is issued")
    op = _operator(conn, order.operator)
    for item in conn.execute(select(OrderItem).where(OrderItem.order_id == order_id).order_by(OrderItem.id)).all():
        product = conn.execute(select(Product).where(Product.id == item.product_id)).one()
        departure = (conn.execute(select(Departure).where(Departure.id == item.departure_id)).one()
                     if item.departure_id is not None else None)
        valid_from, valid_to, routes = _validity(product, item, departure, now=now, op=op)

        def token(ticket_id: int) -> str:
            return encode_ticket(TokenFields(ticket_id=ticket_id, operator=order.operator,
                                             product=KINDS[product.kind], valid_from=valid_from, valid_to=valid_to,
                                             routes=routes, uses=product.uses, rider_category=product.rider_category,
                                             key_id=keys.key_id), keys.seed)

        for _ in range(item.quantity):
            _insert_ticket(conn, {
                "order_id": order_id, "item_id": item.id, "product_id": product.id, "departure_id": item.departure_id,
                "operator": order.operator, "kind": product.kind, "routes": " ".join(routes),
                "rider_category": product.rider_category, "price_fen": item.unit_fen, "valid_from": valid_from,
                "valid_to": valid_to, "uses_allowed": product.uses, "uses_made": 0, "key_id": keys.key_id,
                "state": "issued", "issued_at": now, "updated_at": now}, token)
    return tickets_of(conn, order_id, keys=keys)


def tickets_of(conn: Connection, order_id: str, *, keys=None) -> list[IssuedTicket]:
    """The order's tickets, oldest item first; pickup codes need ``keys`` (else "")."""
    from wire.ticket import pickup_code

    operator = _order(conn, order_id).operator
    key = keys.pickup_key(operator) if keys is not None else None
    rows = conn.execute(select(Ticket).where(Ticket.order_id == order_id)
                        .order_by(Ticket.item_id, Ticket.issued_at, Ticket.pickup_serial)).all()
    return [IssuedTicket(r.ticket_id, r.token, pickup_code(r.ticket_id, key) if key else "", r.kind,
                         split_routes(r.routes), _utc(r.valid_from), _utc(r.valid_to), r.uses_allowed)
            for r in rows]


def ticket_by_pickup_code(conn: Connection, *, operator: str, code: str, keys) -> int:
    """The ticket id a pickup code stands for. wire.ticket.TicketError for a mistyped or made-up code;
    OrderError ``unknown_ticket`` for a well-formed code of no ticket here. (Guessing is rate-limited by the
    counter that calls this.)"""
    from wire.ticket import check_pickup_code

    serial = check_pickup_code(code, keys.pickup_key(operator))
    ticket_id = conn.execute(select(Ticket.ticket_id).where(Ticket.operator == operator,
                                                            Ticket.pickup_serial == serial)).scalar()
    if ticket_id is None:
        raise OrderError("unknown_ticket", "no ticket of this operator has that pickup code")
    return ticket_id


def use_by_pickup_code(conn: Connection, *, operator: str, code: str, keys, who: str,
                       at: datetime | None = None) -> tuple[int, int]:
    """A pickup code redeemed (at a station counter): (ticket id, use number). wire.ticket.TicketError for a code
    whose check digits fail; OrderError ``unknown_ticket``, ``not_valid_now`` (before or after its validity) or
    ``used_up`` (used, refunded, expired) otherwise, and nothing is counted."""
    at = _now(at)
    ticket_id = ticket_by_pickup_code(conn, operator=operator, code=code, keys=keys)
    row = conn.execute(select(Ticket.state, Ticket.valid_from, Ticket.valid_to).where(Ticket.ticket_id == ticket_id)
                       ).one()
    if row.state == "issued" and not _utc(row.valid_from) <= at < _utc(row.valid_to):
        raise OrderError("not_valid_now", f"ticket {ticket_id} is good from {_utc(row.valid_from):%Y-%m-%d %H:%M} "
                         f"to {_utc(row.valid_to):%Y-%m-%d %H:%M} UTC")
    use = record_use(conn, ticket_id, who=who, at=at)
    if use is None:
        raise OrderError("used_up", f"ticket {ticket_id} is {row.state}: no ride left on it")
    return ticket_id, use


def orders_of_phone(conn: Connection, *, operator: str, phone: str, limit: int = 20) -> list[str]:
    """The newest orders a rider's phone number made with the operator (their "my tickets")."""
    phone = re.sub(r"[\s-]", "", phone or "")
    return list(conn.execute(select(TicketOrder.order_id).where(TicketOrder.operator == operator,
                                                                TicketOrder.phone == phone)
                             .order_by(TicketOrder.created_at.desc()).limit(limit)).scalars())


# ------------------------------------------------------------------------------------------- use and settle
def _settle(conn: Connection, order_id: str, *, who: str, at: datetime, why: str) -> None:
    """An issued order whose tickets are all done becomes refunded (all refunded), used (any used) or expired."""
    states = [s for (s,) in conn.execute(select(Ticket.state).where(Ticket.order_id == order_id))]
    if not states or "issued" in states:
        return
    final = ("refunded" if all(s == "refunded" for s in states)
             else "used" if "used" in states or _any_use(conn, order_id) else "expired")
    _move(conn, order_id, "issued", final, who=who, at=at, why=why)


def _any_use(conn: Connection, order_id: str) -> bool:
    return bool(conn.execute(select(func.count()).select_from(Ticket)
                             .where(Ticket.order_id == order_id, Ticket.uses_made > 0)).scalar())


def record_use(conn: Connection, ticket_id: int, *, who: str, at: datetime | None = None) -> int | None:
    """Count one use of a ticket; its use number (1, 2, ...), or None when the ticket has no use left (used up,
    refunded, expired: the caller flags it). A ticket used up, and an order whose tickets are all done, change
    state with an audit line."""
    at = _now(at)
    made = add_use(conn, ticket_id, at=at, state="issued")
    if made is not None:
        order_id = conn.execute(select(Ticket.order_id).where(Ticket.ticket_id == ticket_id)).scalar_one()
        _settle(conn, order_id, who=who, at=at, why=f"ticket {ticket_id} used")
    return made


def add_use(conn: Connection, ticket_id: int, *, at: datetime, state: str) -> int | None:
    """One more use on a ticket in ``state`` that has a use left (a ticket used up becomes "used"); its use number,
    or None. ``state="expired"``: a use made within validity that reached us after the expiry job closed it."""
    changed = conn.execute(
        update(Ticket)
        .where(Ticket.ticket_id == ticket_id, Ticket.state == state,
               (Ticket.uses_allowed == 0) | (Ticket.uses_made < Ticket.uses_allowed))
        .values(uses_made=Ticket.uses_made + 1, updated_at=at,
                state=case(((Ticket.uses_allowed > 0) & (Ticket.uses_made + 1 >= Ticket.uses_allowed), "used"),
                           else_=Ticket.state))).rowcount
    if not changed:
        return None
    return conn.execute(select(Ticket.uses_made).where(Ticket.ticket_id == ticket_id)).scalar()


def denied_tickets(conn: Connection, operator: str, *, now: datetime | None = None) -> list[int]:
    """Ticket ids a bus must refuse although their token still verifies: refunded tickets whose validity is not
    over (after that the token refuses itself). For the validators' parameters (TicketKeys.validator_params)."""
    now = _now(now)
    return list(conn.execute(select(Ticket.ticket_id).where(Ticket.operator == operator, Ticket.state == "refunded",
                                                            Ticket.valid_to > now)
                             .order_by(Ticket.ticket_id)).scalars())


# ---------------------------------------------------------------------------------------------------- expire
def expire_unpaid(conn: Connection, *, now: datetime | None = None, who: str = "expiry job",
                  limit: int = 500) -> list[str]:
    """Orders still unpaid at their hold deadline become expired and give their seats back. Returns their ids."""
    now = _now(now)
    due = conn.execute(select(TicketOrder.order_id).where(TicketOrder.state == "created",
                                                          TicketOrder.expires_at <= now)
                       .order_by(TicketOrder.expires_at).limit(limit)).scalars().all()
    done = []
    for order_id in due:
        if not _move(conn, order_id, "created", "expired", who=who, at=now,
                     why="not paid before the hold ended; seats released"):
            continue  # paid (or expired) in between
        _release_holds(conn, order_id, now=now, states=("held",))
        done.append(order_id)
    return done


def cancel_order(conn: Connection, order_id: str, *, who: str, why: str, now: datetime | None = None) -> bool:
    """An unpaid order ends now (created -> expired, one audit line) and its held seats go back: a rider who let a
    quote lapse or said no. False when it was paid or had ended already (nothing changes then)."""
    now = _now(now)
    if not _move(conn, order_id, "created", "expired", who=who, at=now, why=why):
        return False
    _release_holds(conn, order_id, now=now, states=("held",))
    return True


def extend_hold(conn: Connection, order_id: str, *, until: datetime, who: str, why: str = "",
                now: datetime | None = None) -> bool:
    """An unpaid order keeps its seats until ``until`` (the order's ``expires_at`` and its held seats' alike),
    e.g. once the rider confirmed a quote and is paying (seats not yet released by the expiry job are still held,
    so a hold past its time is extended too). False when the order is no longer unpaid (paid, expired); nothing
    changes then. An audit line when ``why`` is given."""
    now = _now(now)
    until = _utc(until)
    if not conn.execute(update(TicketOrder).where(TicketOrder.order_id == order_id, TicketOrder.state == "created")
                        .values(expires_at=until, updated_at=now)).rowcount:
        return False
    conn.execute(update(SeatHold).where(SeatHold.order_id == order_id, SeatHold.state == "held")
                 .values(expires_at=until))
    if why:
        _audit(conn, order_id, who=who, at=now, from_state="created", to_state="created", why=why)
    return True


def _release_holds(conn: Connection, order_id: str, *, now: datetime, states: Iterable[str]) -> None:
    for h in conn.execute(select(SeatHold).where(SeatHold.order_id == order_id, SeatHold.state.in_(tuple(states)))
                          .order_by(SeatHold.departure_id, SeatHold.id)).all():
        if conn.execute(update(SeatHold).where(SeatHold.id == h.id, SeatHold.state == h.state)
                        .values(state="released", released_at=now)).rowcount:
            _give_back_seats(conn, h.departure_id, h.seats)


def expire_tickets(conn: Connection, *, now: datetime | None = None, who: str = "expiry job",
                   limit: int = 2000) -> int:
    """Tickets whose validity is over, with uses left, become expired; their orders settle. Returns how many."""
    now = _now(now)
    rows = conn.execute(select(Ticket.ticket_id, Ticket.order_id).where(Ticket.state == "issued",
                                                                        Ticket.valid_to <= now)
                        .limit(limit)).all()
    n = 0
    for r in rows:
        n += conn.execute(update(Ticket).where(Ticket.ticket_id == r.ticket_id, Ticket.state == "issued")
                          .values(state="expired", updated_at=now)).rowcount
    for order_id in sorted({r.order_id for r in rows}):
        _settle(conn, order_id, who=who, at=now, why="validity over")
    return n


# ---------------------------------------------------------------------------------------------------- refund
def refund_quote(conn: Connection, order_id: str, *, ticket_ids: Iterable[int] | None = None,
                 now: datetime | None = None) -> RefundQuote:
    """What a refund of the order (or of ``ticket_ids`` of it) would give back, and why any ticket is refused:
    only unused tickets still in their validity (a coach ticket before its departure) are refunded. Changes
    nothing."""
    now = _now(now)
    order = _order(conn, order_id)
    quote = RefundQuote(order_id, 0)
    if order.state == "paid" or (order.state == "expired" and order.issued_at is None):
        quote.amount_fen = order.paid_fen - order.refunded_fen
        quote.whole_payment = quote.amount_fen > 0
        return quote
    rows = conn.execute(select(Ticket, Departure.departs_at).outerjoin(Departure, Departure.id == Ticket.departure_id)
                        .where(Ticket.order_id == order_id)
                        .order_by(Ticket.departure_id, Ticket.ticket_id)).all()  # locks in one order, as create
    wanted = None if ticket_ids is None else set(ticket_ids)
    for r in rows:
        if wanted is not None and r.ticket_id not in wanted:
            continue
        if r.state != "issued":
            quote.refused[r.ticket_id] = f"the ticket is {r.state}"
        elif r.uses_made:
            quote.refused[r.ticket_id] = f"the ticket has been used {r.uses_made} time(s)"
        elif _utc(r.valid_to) <= now:
            quote.refused[r.ticket_id] = "the ticket's validity is over"
        elif r.departs_at is not None and _utc(r.departs_at) <= now:
            quote.refused[r.ticket_id] = "the coach has left"
        else:
            quote.tickets.append(r.ticket_id)
            quote.amount_fen += r.price_fen
    for t in (wanted or set()) - {r.ticket_id for r in rows}:
        quote.refused[t] = f"not a ticket of order {order_id}"
    return quote


def refund(conn: Connection, order_id: str, *, who: str, why: str, ticket_ids: Iterable[int] | None = None,
           now: datetime | None = None) -> RefundQuote:
    """Void the refundable tickets (as ``refund_quote``) in the caller's transaction, give their coach seats back,
    add the amount to the order's ``refunded_fen`` and settle the order. The payment side commits its refund row in
    the same transaction, then asks the platform. A ticket used in between is not voided (its UPDATE finds it
    changed) and not counted. Nothing refundable: OrderError ``not_refundable``."""
    now = _now(now)
    quote = refund_quote(conn, order_id, ticket_ids=ticket_ids, now=now)
    if quote.amount_fen <= 0:
        raise OrderError("not_refundable", f"nothing of order {order_id} can be refunded: "
                         + ("; ".join(f"ticket {t}: {w}" for t, w in quote.refused.items()) or "nothing paid"))
    if quote.whole_payment:
        order = _order(conn, order_id)
        conn.execute(update(TicketOrder).where(TicketOrder.order_id == order_id)
                     .values(refunded_fen=TicketOrder.refunded_fen + quote.amount_fen, updated_at=now))
        if order.state == "paid":
            _move(conn, order_id, "paid", "refunded", who=who, at=now, why=why)
            _release_holds(conn, order_id, now=now, states=("sold", "held"))
        else:
            _audit(conn, order_id, who=who, at=now, from_state=order.state, to_state=order.state,
                   why=f"{why}: the payment after expiry given back")
        return quote
    voided, amount = [], 0
    for t in quote.tickets:
        row = conn.execute(select(Ticket.price_fen, Ticket.departure_id).where(Ticket.ticket_id == t)).one()
        if not conn.execute(update(Ticket).where(Ticket.ticket_id == t, Ticket.state == "issued",
                                                 Ticket.uses_made == 0)
                            .values(state="refunded", updated_at=now)).rowcount:
            quote.refused[t] = "used or changed while the refund was made"
            continue
        voided.append(t)
        amount += row.price_fen
        if row.departure_id is not None:
            _one_seat_back(conn, order_id, row.departure_id, now)
    quote.tickets, quote.amount_fen = voided, amount
    if not voided:
        raise OrderError("not_refundable", f"nothing of order {order_id} can be refunded any more")
    conn.execute(update(TicketOrder).where(TicketOrder.order_id == order_id)
                 .values(refunded_fen=TicketOrder.refunded_fen + amount, updated_at=now))
    _settle(conn, order_id, who=who, at=now, why=f"{why} ({len(voided)} ticket(s) refunded)")
    if _order(conn, order_id).state == "issued":  # part refunded: still a line saying so
        _audit(conn, order_id, who=who, at=now, from_state="issued", to_state="issued",
               why=f"{why} ({len(voided)} ticket(s) refunded, {amount} fen)")
    return quote


def _one_seat_back(conn: Connection, order_id: str, departure_id: int, now: datetime) -> None:
    hold = conn.execute(select(SeatHold).where(SeatHold.order_id == order_id, SeatHold.departure_id == departure_id,
                                               SeatHold.state == "sold", SeatHold.seats > 0)
                        .order_by(SeatHold.id)).first()
    if hold is None:
        return
    conn.execute(update(SeatHold).where(SeatHold.id == hold.id).values(
        seats=SeatHold.seats - 1,
        state=case((SeatHold.seats - 1 == 0, "released"), else_=SeatHold.state),
        released_at=case((SeatHold.seats - 1 == 0, now), else_=SeatHold.released_at)))
    _give_back_seats(conn, departure_id, 1)


# ------------------------------------------------------------------------------------------------------ read
@dataclass
class OrderView:
    order_id: str
    operator: str
    channel: str
    phone: str
    state: str
    total_fen: int
    paid_fen: int
    refunded_fen: int
    payment_ref: str | None
    created_at: datetime
    expires_at: datetime
    paid_at: datetime | None
    issued_at: datetime | None
    items: list[dict]
    tickets: list[dict]
    audit: list[dict]


def show_order(conn: Connection, order_id: str) -> OrderView:
    o = _order(conn, order_id)
    items = [dict(r._mapping) | {"product": r.code, "kind": r.kind} for r in conn.execute(
        select(OrderItem, Product.code, Product.kind).join(Product, Product.id == OrderItem.product_id)
        .where(OrderItem.order_id == order_id).order_by(OrderItem.id))]
    tickets = [dict(r._mapping) for r in conn.execute(
        select(Ticket.ticket_id, Ticket.kind, Ticket.routes, Ticket.state, Ticket.valid_from, Ticket.valid_to,
               Ticket.uses_allowed, Ticket.uses_made, Ticket.price_fen, Ticket.pickup_serial)
        .where(Ticket.order_id == order_id).order_by(Ticket.item_id, Ticket.pickup_serial))]
    audit = [dict(r._mapping) for r in conn.execute(
        select(OrderAudit.at, OrderAudit.who, OrderAudit.from_state, OrderAudit.to_state, OrderAudit.why)
        .where(OrderAudit.order_id == order_id).order_by(OrderAudit.id))]
    return OrderView(o.order_id, o.operator, o.channel, o.phone, o.state, o.total_fen, o.paid_fen, o.refunded_fen,
                     o.payment_ref, _utc(o.created_at), _utc(o.expires_at), _utc(o.paid_at), _utc(o.issued_at),
                     items, tickets, audit)

"""The payment platform's use cases: settle an order the platform says is paid (from a notification or a query,
once), the order-query job, refunds exactly once, and the daily statement stored once.

Paying once: a ticket order goes through ``backoffice.tickets.orders.mark_paid`` and a top-up order through
``backoffice.cards.topup.mark_paid``; both are idempotent by the platform's payment reference, so a notification,
its duplicates, a late copy and the order query record one payment between them.

Refunding once:

1. one transaction voids what is refunded (unused tickets: ``orders.refund``; a paid, unloaded top-up:
   ``topup.refund_order``) and inserts the ``payment_refund`` row (state ``pending``, a new ``refund_id``), and
   commits, before the platform is called;
2. the platform is asked with that ``refund_id`` as the idempotency key; no answer (lost, timed out) leaves the row
   pending and the retry job (or ``farebox payments refund --retry``) sends the same id again, never a new one;
3. the answer is recorded by a conditional UPDATE on ``state = 'pending'``: whether it comes back from the call,
   from a retry, or as the platform's refund notification (even twice), it is written once.

Functions take an engine where they commit on their own (a call to the platform must not hold a transaction open);
``settle_paid`` and ``record_refund_answer`` run in the caller's transaction.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from backoffice.cards import topup
from backoffice.models import TicketOrder, TopupOrder
from backoffice.payments import tables
from backoffice.payments.platform import (STATEMENT_COLUMNS, BadAnswer, Payment, Platform, PlatformError,
                                          PlatformRefused, PlatformUnavailable)
from backoffice.tickets import orders

log = logging.getLogger(__name__)
R, S, L = tables.refund, tables.statement, tables.statement_line
QUERY_GRACE = timedelta(minutes=2)  # a notification normally comes within seconds; after this, ask
QUERY_WINDOW = timedelta(hours=24)  # orders older than this are not asked about any more
QUERY_LIMIT = 200
REFUND_RETRY_AFTER = timedelta(seconds=30)


class RefundError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def order_kind(conn: Connection, order_id: str) -> str | None:
    """``ticket`` or ``topup`` by where the order is; None when farebox has no such order."""
    if conn.execute(select(TicketOrder.order_id).where(TicketOrder.order_id == order_id)).first():
        return "ticket"
    if conn.execute(select(TopupOrder.order_id).where(TopupOrder.order_id == order_id)).first():
        return "topup"
    return None


def settle_paid(conn: Connection, *, order_id: str, amount: int, payment_ref: str, who: str, now: datetime) -> str:
    """The platform says ``order_id`` is paid: record it once (ticket or top-up), in words what happened. A refusal
    (unknown order, wrong amount, a second payment) is returned as words too, for the event log; nothing changes."""
    return _settle_paid(conn, order_id=order_id, amount=amount, payment_ref=payment_ref, who=who, now=now)[0]


def _settle_paid(conn: Connection, *, order_id: str, amount: int, payment_ref: str, who: str, now: datetime
                 ) -> tuple[str, bool]:
    """(words, whether this call recorded the payment)."""
    kind = order_kind(conn, order_id)
    if kind == "ticket":
        try:
            result = orders.mark_paid(conn, order_id, amount_fen=amount, payment_ref=payment_ref, who=who, now=now,
                                      why=f"payment confirmed by {who}")
        except orders.OrderError as e:
            return f"refused ({e.code}): {e}", False
        outcome = f"ticket order {order_id}: {result.outcome} ({payment_ref})"
        if result.outcome == "refund_due":  # paid after it expired and its seats were sold: the money goes back
            row = start_refund(conn, order_id=order_id, who=who, now=now,
                               why="paid after the order expired and its seats were sold")
            outcome += f"; refund {row['refund_id']} queued"
        elif result.outcome == "second_payment":
            outcome += "; " + _refund_stray(conn, "ticket", order_id, payment_ref, amount, who=who, now=now)
        return outcome, result.newly_paid or result.outcome == "refund_due"
    if kind == "topup":
        try:
            words = topup.mark_paid(conn, order_id=order_id, amount=amount, payment_ref=payment_ref, now=now)
        except topup.TopupRefused as e:
            if e.reason == "paid_twice":
                return f"refused ({e.reason}): {e}; " + _refund_stray(conn, "topup", order_id, payment_ref, amount,
                                                                      who=who, now=now), False
            return f"refused ({e.reason}): {e}", False
        return words, not words.startswith(f"order {order_id} was paid already")
    return f"refused (unknown_order): no order {order_id}", False


def _refund_stray(conn: Connection, kind: str, order_id: str, payment_ref: str, amount: int, *, who: str,
                  now: datetime) -> str:
    """A second payment of an order already paid: a pending refund of it (once per payment reference), sent by
    the refund job; the order itself keeps its first payment."""
    known = conn.execute(select(R.c.refund_id).where(R.c.payment_ref == payment_ref)).scalar()
    if known is not None:
        return f"refund {known} of it exists already"
    refund_id = _new_refund_id(now)
    conn.execute(insert(R).values(refund_id=refund_id, order_kind=kind, order_id=order_id, payment_ref=payment_ref,
                                  amount=amount, ticket_ids="", state="pending", attempts=0, answer="",
                                  requested_by=who[:64], why="a second payment of an order paid already",
                                  created_at=now))
    return f"refund {refund_id} of the second payment queued"


# ---------------------------------------------------------------------------------------------- checkout
def order_to_pay(conn: Connection, order_id: str) -> tuple[str, int]:
    """(kind, fen to collect) of an order waiting for its payment; RefundError-like ValueError otherwise."""
    t = conn.execute(select(TicketOrder.state, TicketOrder.total_fen, TicketOrder.payment_ref)
                     .where(TicketOrder.order_id == order_id)).first()
    if t is not None:
        if t.state != "created" or t.payment_ref is not None:
            raise RefundError("bad_state", f"ticket order {order_id} is {t.state}: nothing to pay")
        return "ticket", int(t.total_fen)
    o = conn.execute(select(TopupOrder.status, TopupOrder.amount).where(TopupOrder.order_id == order_id)).first()
    if o is None:
        raise RefundError("unknown_order", f"no order {order_id}")
    if o.status != "created":
        raise RefundError("bad_state", f"top-up order {order_id} is {o.status}: nothing to pay")
    return "topup", int(o.amount)


def start_payment(engine: Engine, platform: Platform, *, order_id: str, notify_url: str | None = None,
                  description: str = "farebox") -> Payment:
    """Open the platform's payment for an order (the web shop, SMS and partner channels call this): the amount is
    the order's own, never the caller's. Asked again (a lost answer), the platform answers the same payment.
    ``notify_url`` defaults to the adapter's (``FAREBOX_PAYMENT_NOTIFY_URL``)."""
    notify_url = notify_url or getattr(platform, "notify_url", None)
    if not notify_url:
        raise ValueError("no notify_url: set FAREBOX_PAYMENT_NOTIFY_URL to the public address of /api/v1/ota/webhook")
    with engine.connect() as conn:
        _kind, amount = order_to_pay(conn, order_id)
    return platform.create_payment(order_id=order_id, amount=amount, description=description, notify_url=notify_url)


# ---------------------------------------------------------------------------------------------- order query
@dataclass
class QueryDone:
    asked: int = 0
    settled: list[str] = field(default_factory=list)  # order ids paid by this run
    unpaid: int = 0
    unknown: int = 0  # the platform has no such order (the rider never reached the payment page)
    unavailable: int = 0  # no answer: asked again next run


def _open_orders(conn: Connection, *, now: datetime, grace: timedelta, window: timedelta, limit: int) -> list[str]:
    t, o = TicketOrder, TopupOrder
    since, until = now - window, now - grace
    tickets = conn.execute(select(t.order_id).where(t.payment_ref.is_(None), t.state.in_(("created", "expired")),
                                                    t.created_at >= since, t.created_at <= until)
                           .order_by(t.created_at).limit(limit)).scalars().all()
    topups = conn.execute(select(o.order_id).where(o.status == "created", o.created_at >= since,
                                                   o.created_at <= until)
                          .order_by(o.created_at).limit(limit)).scalars().all()
    return [*tickets, *topups][:limit]


def query_open_orders(engine: Engine, platform: Platform, *, now: datetime | None = None,
                      order_ids: list[str] | None = None, grace: timedelta = QUERY_GRACE,
                      window: timedelta = QUERY_WINDOW, limit: int = QUERY_LIMIT) -> QueryDone:
    """Ask the platform about orders still unpaid here (created at least ``grace`` ago, within ``window``), or about
    ``order_ids``; each one the platform says is paid is settled in its own transaction (``settle_paid``)."""
    now = now or datetime.now(UTC)
    if order_ids is None:
        with engine.connect() as conn:
            order_ids = _open_orders(conn, now=now, grace=grace, window=window, limit=limit)
    done = QueryDone()
    for order_id in order_ids:
        done.asked += 1
        try:
            payment = platform.query_order(order_id)
        except PlatformError as e:  # no answer, or one that does not verify: nothing is believed, asked again
            done.unavailable += 1
            (log.error if isinstance(e, BadAnswer) else log.warning)("order query %s: %s; asked again next run",
                                                                      order_id, e)
            continue
        if payment is None:
            done.unknown += 1
            continue
        if payment.status not in ("paid", "refunded") or not payment.payment_ref:
            done.unpaid += 1
            continue
        with engine.begin() as conn:
            outcome, recorded = _settle_paid(conn, order_id=order_id, amount=payment.amount,
                                             payment_ref=payment.payment_ref, who="order query", now=now)
        if recorded:
            done.settled.append(order_id)
        log.info("order query %s: %s", order_id, outcome)
    return done


# ---------------------------------------------------------------------------------------------- refunds
def _refund_view(row) -> dict:
    return dict(row._mapping)


def get_refund(conn: Connection, refund_id: str) -> dict:
    row = conn.execute(select(R).where(R.c.refund_id == refund_id)).first()
    if row is None:
        raise LookupError(f"no refund {refund_id}")
    return _refund_view(row)


def _new_refund_id(now: datetime) -> str:
    return f"RF{now:%Y%m%d}{secrets.token_hex(8).upper()}"


def start_refund(conn: Connection, *, order_id: str, who: str, why: str, ticket_ids: list[int] | None = None,
                 now: datetime) -> dict:
    """Step 1 (module doc), in the caller's transaction: void what is refunded and write the pending refund row.
    Only unused tickets (``orders.refund_quote``) and paid, unloaded top-ups; RefundError otherwise."""
    kind = order_kind(conn, order_id)
    if kind is None:
        raise RefundError("unknown_order", f"no order {order_id}")
    if kind == "ticket":
        try:
            quote = orders.refund(conn, order_id, who=who, why=why, ticket_ids=ticket_ids, now=now)
        except orders.OrderError as e:
            raise RefundError(e.code, str(e)) from None
        amount, voided = quote.amount_fen, quote.tickets
        payment_ref = conn.execute(select(TicketOrder.payment_ref).where(TicketOrder.order_id == order_id)).scalar()
    else:
        if ticket_ids:
            raise RefundError("bad_request", f"order {order_id} is a top-up: it has no tickets")
        try:
            order = topup.refund_order(conn, order_id=order_id, who=who, why=why, now=now)
        except topup.TopupRefused as e:
            raise RefundError(e.reason, str(e)) from None
        amount, voided, payment_ref = order.amount, [], order.payment_ref
    if not payment_ref:
        raise RefundError("not_paid", f"order {order_id} has no payment on the platform to refund")
    refund_id = _new_refund_id(now)
    conn.execute(insert(R).values(refund_id=refund_id, order_kind=kind, order_id=order_id, payment_ref=payment_ref,
                                  amount=amount, ticket_ids=" ".join(str(t) for t in voided), state="pending",
                                  attempts=0, answer="", requested_by=who[:64], why=why[:500], created_at=now))
    return get_refund(conn, refund_id)


def record_refund_answer(conn: Connection, *, refund_id: str, refund_ref: str, amount: int, now: datetime,
                         how: str) -> str:
    """The platform says refund ``refund_id`` was paid out under ``refund_ref``: recorded once (the first answer;
    any later copy, by call or notification, finds the row answered and changes nothing)."""
    row = conn.execute(select(R).where(R.c.refund_id == refund_id)).first()
    if row is None:
        return f"refused (unknown_refund): no refund {refund_id}"
    if amount != row.amount:
        return f"refused (amount_differs): refund {refund_id} is {row.amount} fen, the platform says {amount}"
    changed = conn.execute(update(R).where(R.c.refund_id == refund_id, R.c.state == "pending").values(
        state="succeeded", platform_ref=refund_ref[:64], answered_at=now, answer=f"succeeded ({how})"[:500])).rowcount
    if changed:
        return f"refund {refund_id} succeeded ({refund_ref})"
    return f"refund {refund_id} was answered already ({row.state})"


def send_refund(engine: Engine, platform: Platform, refund_id: str, *, now: datetime | None = None) -> dict:
    """Step 2 and 3: ask the platform for a pending refund (the same id every time) and record its answer once.
    Without an answer the row stays pending (``attempts`` counts the tries)."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        row = get_refund(conn, refund_id)
        if row["state"] != "pending":
            return row
        conn.execute(update(R).where(R.c.refund_id == refund_id).values(attempts=R.c.attempts + 1))
    try:
        answer = platform.refund(refund_id=refund_id, order_id=row["order_id"], payment_ref=row["payment_ref"],
                                 amount=row["amount"], reason=row["why"] or "refund")
    except (PlatformUnavailable, BadAnswer) as e:  # the refund may have been made: only the same id again
        log.warning("refund %s: %s; left pending, the same refund id is sent again", refund_id, e)
        with engine.connect() as conn:
            return get_refund(conn, refund_id)
    except PlatformRefused as e:
        # What was voided stays voided (a ticket refunded must not ride): the refusal goes to the work list.
        from backoffice.cards.payments_recon import DEFAULT_TZ, STATEMENT_PROBLEMS, add_item

        with engine.begin() as conn:
            if conn.execute(update(R).where(R.c.refund_id == refund_id, R.c.state == "pending").values(
                    state="failed", answered_at=now, answer=f"refused ({e.reason}): {e}"[:500])).rowcount:
                add_item(conn, day=now.astimezone(ZoneInfo(DEFAULT_TZ)).date(), ref=refund_id,
                         problem="refund_refused", ours=row["amount"], theirs=None, now=now,
                         detail=f"refund of order {row['order_id']}, {row['amount']} fen: the platform said "
                                f"{e.reason}: {e}. " + STATEMENT_PROBLEMS["refund_refused"])
            return get_refund(conn, refund_id)
    with engine.begin() as conn:
        record_refund_answer(conn, refund_id=refund_id, refund_ref=answer.refund_ref, amount=answer.amount, now=now,
                             how="answer")
        return get_refund(conn, refund_id)


def refund(engine: Engine, platform: Platform, *, order_id: str, who: str, why: str,
           ticket_ids: list[int] | None = None, now: datetime | None = None) -> dict:
    """Refund an order (or some of its tickets) through the platform, exactly once (module doc)."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        row = start_refund(conn, order_id=order_id, who=who, why=why, ticket_ids=ticket_ids, now=now)
    return send_refund(engine, platform, row["refund_id"], now=now)


def retry_pending_refunds(engine: Engine, platform: Platform, *, now: datetime | None = None,
                          older_than: timedelta = REFUND_RETRY_AFTER) -> list[dict]:
    """The job: every refund still pending after ``older_than`` is sent again with its own refund id."""
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        ids = conn.execute(select(R.c.refund_id).where(R.c.state == "pending", R.c.created_at <= now - older_than)
                           .order_by(R.c.created_at)).scalars().all()
    return [send_refund(engine, platform, refund_id, now=now) for refund_id in ids]


# ---------------------------------------------------------------------------------------------- statement
class StatementError(ValueError):
    """The platform's file cannot be read as documented (platform.STATEMENT_DOC); nothing was stored."""


_ID = re.compile(r"[\x21-\x7e]{1,40}")
_REF = re.compile(r"[\x21-\x7e]{1,64}")
_FEN = re.compile(r"-?[0-9]{1,12}")


def read_statement(text: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    header = [h.strip() for h in next(reader, [])]
    if sorted(header) != sorted(STATEMENT_COLUMNS):
        raise StatementError(f"statement line 1: columns {header}; expected exactly {list(STATEMENT_COLUMNS)}")
    out = []
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        line = reader.line_num
        if len(row) != len(header):
            raise StatementError(f"statement line {line}: {len(row)} fields, the header has {len(header)}")
        r = {k: v.strip() for k, v in zip(header, row, strict=True)}
        if r["kind"] not in ("payment", "refund"):
            raise StatementError(f"statement line {line}: kind must be payment or refund, got {r['kind'][:20]!r}")
        if not _ID.fullmatch(r["order_id"]) or not _REF.fullmatch(r["ref"]):
            raise StatementError(f"statement line {line}: order_id / ref must be printable ASCII (40 / 64 at most)")
        if not _FEN.fullmatch(r["amount"]) or int(r["amount"]) <= 0 or not _FEN.fullmatch(r["fee"]):
            raise StatementError(f"statement line {line}: amount must be positive whole fen, fee whole fen")
        try:
            at = datetime.fromisoformat(r["at"].replace("Z", "+00:00"))
        except ValueError:
            raise StatementError(f"statement line {line}: at {r['at'][:40]!r} is not an ISO 8601 time") from None
        if at.tzinfo is None:
            raise StatementError(f"statement line {line}: at must be UTC (end it with Z)")
        out.append({"kind": r["kind"], "order_id": r["order_id"], "ref": r["ref"], "amount": int(r["amount"]),
                    "fee": int(r["fee"]), "at": at.astimezone(UTC)})
    return out


@dataclass(frozen=True)
class StatementStored:
    statement_id: int
    day: date
    new: bool  # False: this very file was stored before (fetched twice), nothing stored again
    lines: int


def store_statement(conn: Connection, *, day: date, text: str, now: datetime) -> StatementStored:
    """Store the day's file once: the same bytes again find the stored one (unique day + SHA-256)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    known = conn.execute(select(S.c.id, S.c.lines).where(S.c.day == day, S.c.sha256 == digest)).first()
    if known is not None:
        return StatementStored(known.id, day, False, known.lines)
    lines = read_statement(text)
    statement_id = conn.execute(insert(S).values(day=day, sha256=digest, fetched_at=now, lines=len(lines),
                                                 body=text).returning(S.c.id)).scalar_one()
    if lines:
        conn.execute(insert(L), [dict(line, statement_id=statement_id) for line in lines])
    return StatementStored(statement_id, day, True, len(lines))


def fetch_statement(engine: Engine, platform: Platform, *, day: date, now: datetime | None = None,
                    tz: str | None = None) -> tuple[StatementStored, list]:
    """Fetch the day's statement, store it once and reconcile it (backoffice.cards.payments_recon): (what was
    stored, the new work-list items)."""
    from backoffice.cards import payments_recon

    now = now or datetime.now(UTC)
    text = platform.daily_statement(day)
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                stored = store_statement(conn, day=day, text=text, now=now)
                items = payments_recon.reconcile_statement(conn, statement_id=stored.statement_id, now=now,
                                                           **({"tz": tz} if tz else {}))
            return stored, items
        except IntegrityError:  # another process stored the same file a moment ago: found stored next time
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def statements(conn: Connection, *, day: date | None = None) -> list[dict]:
    q = select(S.c.id, S.c.day, S.c.sha256, S.c.fetched_at, S.c.lines).order_by(S.c.id)
    if day is not None:
        q = q.where(S.c.day == day)
    return [dict(r._mapping) for r in conn.execute(q)]


def latest_statement_id(conn: Connection, day: date) -> int | None:
    return conn.execute(select(func.max(S.c.id)).where(S.c.day == day)).scalar()

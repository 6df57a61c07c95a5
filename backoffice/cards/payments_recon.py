"""The payment platform's daily file against farebox's over-the-air top-up orders, stored as items for
mobile-operator staff to settle: retry the load, refund the rider, accept, or dispute with the platform.

The comparison itself is clearing.reconcile.reconcile_payments (pure); this module reads the platform's CSV
(``PAYMENT_FILE_DOC``), loads the day's orders with their load state, stores each new item once and records the
staff's decisions. Like the other use cases it runs inside the caller's transaction and commits nothing itself.

The platform's daily statement (issue 11, backoffice.payments: payments of ticket and top-up orders, refunds,
fees) is reconciled by ``reconcile_statement`` into the same work list, with its own problems (``STATEMENT_PROBLEMS``):
a payment or refund on the statement that farebox has not recorded (an extra order), one farebox recorded that no
stored statement carries (a missing order), or one whose amount differs. A refund item names the refund id in
``order_id`` (what it is about, as a Discrepancy's ``ref``).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, exists, or_, select, update

from backoffice.models import CardLoad, PaymentReconItem, TopupOrder
from clearing.reconcile import Discrepancy, reconcile_payments

PAYMENT_COLUMNS = ("order_id", "amount", "status", "paid_at")
PAYMENT_FILE_DOC = """The payment platform's daily file: CSV, UTF-8, comma-separated, one header line with exactly
these columns (any order), one row per top-up order the platform handled that day:

| column | meaning |
|---|---|
| order_id | farebox's top-up order id (as sent to the platform when the rider paid), at most 40 characters |
| amount | what the platform collected, integer fen (positive) |
| status | ``paid`` (money kept) or ``refunded`` (money given back to the rider) |
| paid_at | when the rider paid, ISO 8601 in UTC (e.g. 2026-11-22T01:30:00Z) |
"""
DECISIONS = ("accepted", "refunded", "retried", "disputed")
# Platforms cut their day files at local midnight; the day's orders are those created in that local day.
DEFAULT_TZ = "Asia/Shanghai"
# What a cell may hold before anything is stored (a NUL byte or a 30-digit amount used to reach the database and
# answer 500): an order id is printable ASCII, an amount at most a card's 4-byte field of fen.
_AMOUNT = re.compile(r"[0-9]{1,10}")
_ORDER_ID = re.compile(r"[\x21-\x7e]{1,40}")
MAX_FEN = 0xFFFFFFFF


class PaymentFileError(ValueError):
    """The platform's file cannot be read as documented; nothing was stored."""


@dataclass(frozen=True)
class PaymentRecord:
    order_id: str
    amount: int
    status: str
    paid_at: datetime


def _utc_time(text: str, line: int) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise PaymentFileError(f"payment file line {line}: paid_at {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None or moment.utcoffset() != timedelta(0):
        raise PaymentFileError(f"payment file line {line}: paid_at {text!r} must be in UTC (end it with Z)")
    return moment.astimezone(UTC)


def read_payment_file(text: str) -> list[PaymentRecord]:
    """The platform's CSV (``PAYMENT_FILE_DOC``) as records; the first bad line is named in a PaymentFileError."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise PaymentFileError(f"payment file is empty; its first line must name the columns {list(PAYMENT_COLUMNS)}")
    names = [h.strip() for h in header]
    if sorted(names) != sorted(PAYMENT_COLUMNS):
        raise PaymentFileError(f"payment file line 1: columns {names}; expected exactly {list(PAYMENT_COLUMNS)}")
    out = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # a blank line (e.g. the file's last) carries nothing
        if len(row) != len(names):
            raise PaymentFileError(f"payment file line {line}: {len(row)} fields, the header has {len(names)}")
        rec = {n: cell.strip() for n, cell in zip(names, row, strict=True)}
        if not _ORDER_ID.fullmatch(rec["order_id"]):
            raise PaymentFileError(f"payment file line {line}: order_id must be 1 to 40 printable ASCII characters, "
                                   f"got {rec['order_id'][:50]!r}")
        if not _AMOUNT.fullmatch(rec["amount"]) or not 0 < int(rec["amount"]) <= MAX_FEN:
            raise PaymentFileError(f"payment file line {line}: amount must be a positive whole number of fen, at most "
                                   f"{MAX_FEN:,}, got {rec['amount'][:30]!r}")
        if rec["status"] not in ("paid", "refunded"):
            raise PaymentFileError(f"payment file line {line}: status must be paid or refunded, "
                                   f"got {rec['status'][:30]!r}")
        out.append(PaymentRecord(rec["order_id"], int(rec["amount"]), rec["status"],
                                 _utc_time(rec["paid_at"], line)))
    return out


def day_bounds(day: date, tz: str = DEFAULT_TZ) -> tuple[datetime, datetime]:
    zone = ZoneInfo(tz)
    start = datetime.combine(day, time(0), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def load_day_orders(conn: Connection, *, day: date, order_ids: list[str], tz: str = DEFAULT_TZ) -> list[dict]:
    """Farebox's orders created in ``day`` that farebox heard were paid, plus any order the platform's file
    names (one paid just after midnight was created the day before: it must be matched, not reported missing; one
    whose webhook never arrived is still ``created`` here). An order never paid nor named is a rider who gave up:
    no difference. ``state`` is ``loaded`` when a CardLoad for the order is loaded, else the order's status."""
    start, end = day_bounds(day, tz)
    loaded = exists().where(CardLoad.order_id == TopupOrder.order_id, CardLoad.status == "loaded")
    in_day = (TopupOrder.created_at >= start) & (TopupOrder.created_at < end) & (TopupOrder.status != "created")
    named = TopupOrder.order_id.in_(order_ids) if order_ids else None
    query = select(TopupOrder.order_id, TopupOrder.amount, TopupOrder.status, loaded.label("loaded")).where(
        or_(in_day, named) if named is not None else in_day)
    return [{"order_id": r.order_id, "amount": int(r.amount), "state": "loaded" if r.loaded else r.status}
            for r in conn.execute(query.order_by(TopupOrder.order_id))]


def reconcile_payments_day(conn: Connection, *, day: date, platform_csv_text: str, now: datetime,
                           tz: str = DEFAULT_TZ) -> list[Discrepancy]:
    """Reconcile the platform's file for ``day`` against the orders; store each item not stored before (same
    order and problem: left with whatever staff decided on it). Returns the new items only."""
    records = read_payment_file(platform_csv_text)
    platform = [{"order_id": r.order_id, "amount": r.amount, "status": r.status} for r in records]
    orders = load_day_orders(conn, day=day, order_ids=sorted({r.order_id for r in records}), tz=tz)
    found = reconcile_payments(platform, orders)
    return _store_new(conn, found, day=day, now=now)


def _store_new(conn: Connection, found: list[Discrepancy], *, day: date, now: datetime) -> list[Discrepancy]:
    """Each (order or refund, problem) stored once, left with whatever staff decided on it; the new ones."""
    if not found:
        return []
    known = set(conn.execute(select(PaymentReconItem.order_id, PaymentReconItem.problem).where(
        PaymentReconItem.order_id.in_(sorted({i.ref for i in found})))).all())
    new = []
    for item in found:
        if (item.ref, item.problem) in known:
            continue
        known.add((item.ref, item.problem))
        conn.execute(PaymentReconItem.__table__.insert().values(
            day=day, order_id=item.ref, problem=item.problem, ours=item.ours, theirs=item.theirs,
            detail=item.detail[:500], status="open", created_at=now, note=""))
        new.append(item)
    return new


def items(conn: Connection, *, status: str | None = None) -> list[dict]:
    """Stored items, oldest first; ``status="open"``: what still needs someone."""
    query = select(PaymentReconItem.__table__).order_by(PaymentReconItem.id)
    if status is not None:
        query = query.where(PaymentReconItem.status == status)
    return [dict(r._mapping) for r in conn.execute(query)]


def get_item(conn: Connection, item_id: int) -> dict:
    row = conn.execute(select(PaymentReconItem.__table__).where(PaymentReconItem.id == item_id)).first()
    if row is None:
        raise LookupError(f"payment reconciliation item {item_id} not found")
    return dict(row._mapping)


def resolve_payment_item(conn: Connection, *, item_id: int, status: str, by: str, note: str = "",
                         now: datetime | None = None) -> dict:
    """Staff's decision on an item, signed: ``retried`` (the load was retried), ``refunded`` (the rider was
    refunded), ``accepted`` (nothing to do) or ``disputed`` (taken up with the platform). It records the decision
    only: the retry or refund itself goes through the top-up use cases. A disputed item may be decided again
    later; any other decision closes it."""
    if status not in DECISIONS:
        raise ValueError(f"status must be one of {list(DECISIONS)}, got {status!r}")
    if not by:
        raise ValueError("say who decided (by=...): every decision on money is signed")
    item = get_item(conn, item_id)
    if item["status"] not in ("open", "disputed"):
        raise ValueError(f"payment reconciliation item {item_id} is {item['status']} already "
                         f"(by {item['resolved_by']})")
    conn.execute(update(PaymentReconItem).where(PaymentReconItem.id == item_id).values(
        status=status, resolved_by=by[:64], resolved_at=now or datetime.now(UTC), note=note[:500]))
    return get_item(conn, item_id)


# ------------------------------------------------------------------------------------------ the daily statement
STATEMENT_PROBLEMS = {
    "payment_not_in_farebox": "paid on the platform, farebox has no such payment: settle the order (query) or refund",
    "payment_missing_in_statement": "paid in farebox, on no statement of the platform: ask the platform",
    "payment_amount_differs": "the platform collected another amount than the order's",
    "refund_not_in_farebox": "refunded on the platform, farebox has no such refund answered",
    "refund_missing_in_statement": "refunded in farebox, on no statement of the platform: ask the platform",
    "refund_amount_differs": "the platform paid out another amount than the refund's",
    "refund_refused": "the platform refused a refund farebox had committed (its tickets are void): pay the rider "
                      "back another way, or take it up with the platform",
}


def add_item(conn: Connection, *, day: date, ref: str, problem: str, ours: int | None, theirs: int | None,
             detail: str, now: datetime) -> bool:
    """One work-list item, unless the same (order or refund, problem) is there already; True when added."""
    if conn.execute(select(PaymentReconItem.id).where(PaymentReconItem.order_id == ref,
                                                      PaymentReconItem.problem == problem)).first():
        return False
    conn.execute(PaymentReconItem.__table__.insert().values(
        day=day, order_id=ref, problem=problem, ours=ours, theirs=theirs, detail=detail[:500], status="open",
        created_at=now, note=""))
    return True


def _books_payments(conn: Connection, start: datetime, end: datetime) -> dict[str, tuple[str, int]]:
    """payment_ref -> (order id, fen) of the payments farebox recorded in [start, end)."""
    from backoffice.models import TicketOrder

    out = {}
    for r in conn.execute(select(TicketOrder.order_id, TicketOrder.payment_ref, TicketOrder.paid_fen).where(
            TicketOrder.payment_ref.is_not(None), TicketOrder.paid_at >= start, TicketOrder.paid_at < end)):
        out[r.payment_ref] = (r.order_id, int(r.paid_fen))
    for r in conn.execute(select(TopupOrder.order_id, TopupOrder.payment_ref, TopupOrder.amount).where(
            TopupOrder.payment_ref.is_not(None), TopupOrder.paid_at >= start, TopupOrder.paid_at < end)):
        out[r.payment_ref] = (r.order_id, int(r.amount))
    return out


def _payment_by_ref(conn: Connection, ref: str) -> tuple[str, int] | None:
    from backoffice.models import TicketOrder

    r = conn.execute(select(TicketOrder.order_id, TicketOrder.paid_fen).where(TicketOrder.payment_ref == ref)).first()
    if r is not None:
        return r.order_id, int(r.paid_fen)
    r = conn.execute(select(TopupOrder.order_id, TopupOrder.amount).where(TopupOrder.payment_ref == ref)).first()
    return (r.order_id, int(r.amount)) if r is not None else None


def statement_discrepancies(conn: Connection, *, statement_id: int, tz: str = DEFAULT_TZ) -> list[Discrepancy]:
    """The stored statement against farebox's payments and answered refunds (module doc); changes nothing.

    A statement line is looked for in farebox by its reference whatever day farebox recorded it (a payment at the
    platform's 23:59:59 heard here at 00:00:02 is not two differences); farebox's payments and refunds of the
    statement's day are looked for on every stored statement, so one the platform put on its next day's file is
    not reported missing once that file is in."""
    from backoffice.payments.tables import refund as R, statement as S, statement_line as L

    day = conn.execute(select(S.c.day).where(S.c.id == statement_id)).scalar_one()
    start, end = day_bounds(day, tz)
    lines = conn.execute(select(L).where(L.c.statement_id == statement_id).order_by(L.c.id)).all()
    found: list[Discrepancy] = []
    for line in lines:
        if line.kind == "payment":
            ours = _payment_by_ref(conn, line.ref)
            if ours is None or ours[0] != line.order_id:
                found.append(Discrepancy("payment", line.order_id, "payment_not_in_farebox", None, int(line.amount),
                                         f"payment {line.ref} of {line.amount} fen for order {line.order_id}: "
                                         + STATEMENT_PROBLEMS["payment_not_in_farebox"]))
            elif ours[1] != line.amount:
                found.append(Discrepancy("payment", line.order_id, "payment_amount_differs", ours[1],
                                         int(line.amount), f"payment {line.ref}: farebox {ours[1]} fen, "
                                                           f"platform {line.amount} fen"))
        else:
            r = conn.execute(select(R.c.amount, R.c.state).where(R.c.refund_id == line.ref)).first()
            if r is None or r.state != "succeeded":
                found.append(Discrepancy("payment", line.ref, "refund_not_in_farebox",
                                         None, int(line.amount), f"refund {line.ref} of order {line.order_id}, "
                                         f"{line.amount} fen; farebox: {r.state if r else 'no such refund'}"))
            elif r.amount != line.amount:
                found.append(Discrepancy("payment", line.ref, "refund_amount_differs", int(r.amount),
                                         int(line.amount), f"refund {line.ref}: farebox {r.amount} fen, platform "
                                                           f"{line.amount} fen"))
    on_any = set(conn.execute(select(L.c.kind, L.c.ref).distinct()).all())
    for ref, (order_id, amount) in sorted(_books_payments(conn, start, end).items()):
        if ("payment", ref) not in on_any:
            found.append(Discrepancy("payment", order_id, "payment_missing_in_statement", amount, None,
                                     f"payment {ref} of {amount} fen: "
                                     + STATEMENT_PROBLEMS["payment_missing_in_statement"]))
    for r in conn.execute(select(R.c.refund_id, R.c.order_id, R.c.amount).where(
            R.c.state == "succeeded", R.c.answered_at >= start, R.c.answered_at < end).order_by(R.c.refund_id)):
        if ("refund", r.refund_id) not in on_any:
            found.append(Discrepancy("payment", r.refund_id, "refund_missing_in_statement", int(r.amount), None,
                                     f"refund of order {r.order_id}, {r.amount} fen: "
                                     + STATEMENT_PROBLEMS["refund_missing_in_statement"]))
    return found


def reconcile_statement(conn: Connection, *, statement_id: int, now: datetime, tz: str = DEFAULT_TZ
                        ) -> list[Discrepancy]:
    """``statement_discrepancies`` stored in the work list, each (order or refund, problem) once; the new ones."""
    from backoffice.payments.tables import statement as S

    day = conn.execute(select(S.c.day).where(S.c.id == statement_id)).scalar_one()
    found = statement_discrepancies(conn, statement_id=statement_id, tz=tz)
    return _store_new(conn, found, day=day, now=now)

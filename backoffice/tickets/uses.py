"""Ticket uses stored once: the ``ticket_use`` records validators upload beside their taps, and the uses a station
counter makes when it redeems a pickup code (revision 2026_12_03_0021).

A bus checks a ticket offline; what it cannot see is the same ticket used on another bus that is offline too. The
back office sees every use, so it numbers them: each use that counts gets the ticket's next use number
(``ticket.uses_made`` + 1, through ``backoffice.tickets.orders.record_use``, which also moves the ticket to ``used``
and its order on), and ``(ticket_id, use_no)`` is unique, so two workers storing two uses of a single ride at the
same moment cannot both number theirs 1. A use beyond what the ticket allows (a single ride shown on two buses, a
refunded ticket) is still stored, never lost, but with ``revenue`` false, no use number and its ``flag`` and
``reason``; a ticket with such a use goes on the deny list every bus receives (backoffice.denylist_publish, under
``wire.ticket.deny_keys``) until its validity is over.

Exactly once: a record is keyed by (device_id, epoch, device_seq) as taps are; a batch sent again finds its keys
stored (a duplicate when the content is the same, a conflict held in quarantine when it is not). A counter
redemption has no device sequence (NULL): it is one row by construction.

A pickup-code use on a bus names only the ticket's 10-digit serial (ticket id mod 10^10); the operator's ticket of
that serial is the one used. A record naming no ticket of its operator is quarantined with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, date, datetime

from sqlalchemy import (BigInteger, Boolean, Column, Connection, Date, DateTime, Index, Integer, String, Table,
                        UniqueConstraint, func, select, tuple_)
from sqlalchemy.dialects import postgresql, sqlite

from backoffice.models import Base, Operator, Tap, Ticket
from backoffice.tickets.orders import add_use, record_use, service_day_of
from wire.records import PRESENTED_PICKUP, RecordKind, TapRecord

log = logging.getLogger(__name__)

BigId = BigInteger().with_variant(Integer, "sqlite")
UTC_TIME = DateTime(timezone=True)
PICKUP_MOD = 10**10
PRESENTED_COUNTER = "counter"  # a pickup code redeemed at a station counter (backoffice.tickets.redeem)
COUNTER_DEVICE = "counter"  # ticket_use.device_id of counter redemptions (their device_seq is NULL)

# flags of uses that do not count (revenue false)
SECOND_USE = "second_use"  # the ticket had no use left: shown on another bus (fraud), or used up
REFUNDED = "refunded"  # the money went back; the ticket was still shown
OUTSIDE_VALIDITY = "outside_validity"  # a pickup code used before or after its ticket's validity
FRAUD_FLAGS = (SECOND_USE, REFUNDED)  # these put the ticket on the deny list

ticket_use = Table(
    "ticket_use", Base.metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("device_id", String(32), nullable=False),
    Column("epoch", BigInteger, nullable=False, server_default="0"),
    Column("device_seq", BigInteger, nullable=True),  # NULL: a counter redemption
    Column("operator", String(32), nullable=False),
    Column("ticket_id", BigInteger, nullable=False),
    Column("use_no", Integer, nullable=True),  # the ticket's use this is (1, 2, ...); NULL when not a revenue use
    Column("device_use", Integer, nullable=False, server_default="0"),  # what the bus counted (its own use number)
    Column("presented_by", String(8), nullable=False),  # qr | pickup | counter
    Column("route", String(64), nullable=False, server_default=""),
    Column("vehicle", String(64), nullable=False, server_default=""),
    Column("driver", String(64), nullable=False, server_default=""),
    Column("shift_no", Integer, nullable=False, server_default="0"),
    Column("staff", String(64), nullable=False, server_default=""),  # who redeemed it at a counter
    Column("occurred_at", UTC_TIME, nullable=False),
    Column("service_day", Date, nullable=False),
    Column("received_at", UTC_TIME, nullable=False),
    Column("revenue", Boolean, nullable=False),
    Column("flag", String(16), nullable=True),  # second_use | refunded | outside_validity
    Column("reason", String(500), nullable=False, server_default=""),
    UniqueConstraint("device_id", "epoch", "device_seq", name="uq_ticket_use_record"),
    UniqueConstraint("ticket_id", "use_no", name="uq_ticket_use_number"),
    Index("ix_ticket_use_ticket", "ticket_id"),
    Index("ix_ticket_use_day", "operator", "service_day"),
    Index("ix_ticket_use_flag", "flag"),
)

# the record fields a stored use keeps (what tells a resend from a conflict)
COMPARED = ("operator", "route", "vehicle", "driver", "shift_no", "device_use", "presented_by", "occurred_at")


@dataclasses.dataclass
class Outcome:
    """What became of one uploaded ticket_use record."""

    status: str  # stored | duplicate | conflict | unknown
    reason: str = ""
    flag: str | None = None
    ticket_id: int | None = None
    use_no: int | None = None


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _insert(conn: Connection, values: dict) -> bool:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # whether a row went in is read from RETURNING, not rowcount (see orders._insert_or_nothing: psycopg's rowcount
    # does not say 0 for a skipped ON CONFLICT DO NOTHING)
    key = list(ticket_use.primary_key.columns)
    stmt = dialect.insert(ticket_use).values(**values).on_conflict_do_nothing().returning(*key)
    return conn.execute(stmt).first() is not None


def lock_name(record: TapRecord) -> str:
    """The advisory-lock name of a ticket_use record (ingest locks it with the devices): a QR use names the ticket
    and a pickup use its serial, and both share the serial, so two uses of one ticket never race."""
    return f"ticket|{record.operator}|{record.ticket_id % PICKUP_MOD}"


class _Operators:
    def __init__(self, conn: Connection):
        self.conn, self.known = conn, {}

    def service_day(self, operator: str, at: datetime) -> date:
        if operator not in self.known:
            row = self.conn.execute(select(Operator.timezone, Operator.cutoff_hour)
                                    .where(Operator.code == operator)).first()
            self.known[operator] = (row.timezone, row.cutoff_hour) if row else ("Asia/Shanghai", 3)
        return service_day_of(at, *self.known[operator])


def _ticket_of(conn: Connection, record: TapRecord):
    """The stored ticket a record names (QR: by id; pickup code: by the operator's serial), or None."""
    columns = (Ticket.ticket_id, Ticket.operator, Ticket.state, Ticket.valid_from, Ticket.valid_to,
               Ticket.uses_allowed, Ticket.uses_made)
    if record.presented == PRESENTED_PICKUP:
        query = select(*columns).where(Ticket.operator == record.operator,
                                       Ticket.pickup_serial == record.ticket_id % PICKUP_MOD)
    else:
        query = select(*columns).where(Ticket.ticket_id == record.ticket_id)
    return conn.execute(query).first()


def count_use(conn: Connection, ticket, *, at: datetime, who: str) -> tuple[int | None, str | None, str]:
    """Count one use of ``ticket`` (a row of :func:`_ticket_of`) made at ``at``: (use number, None, "") when it
    counts, else (None, flag, reason)."""
    valid_from, valid_to = _utc(ticket.valid_from), _utc(ticket.valid_to)
    if not valid_from <= at < valid_to:
        return None, OUTSIDE_VALIDITY, (f"used at {at:%Y-%m-%d %H:%M:%S}Z, outside its validity "
                                        f"{valid_from:%Y-%m-%d %H:%M}Z to {valid_to:%Y-%m-%d %H:%M}Z")
    use = record_use(conn, ticket.ticket_id, who=who, at=at)
    if use is None and ticket.state == "expired":
        # A use made within validity, uploaded after the expiry job closed the ticket (a bus offline overnight).
        use = add_use(conn, ticket.ticket_id, at=at, state="expired")
    if use is not None:
        return use, None, ""
    if ticket.state == "refunded":
        return None, REFUNDED, f"ticket {ticket.ticket_id} was refunded: shown after its money went back"
    made = conn.execute(select(Ticket.uses_made).where(Ticket.ticket_id == ticket.ticket_id)).scalar()
    return None, SECOND_USE, (f"ticket {ticket.ticket_id} has no use left ({made} of {ticket.uses_allowed} made): "
                              "shown again, on another bus or after it was used up")


def _stored_by_key(conn: Connection, keys: list[tuple[str, int, int]]) -> dict:
    found = {}
    for i in range(0, len(keys), 400):
        query = select(ticket_use).where(tuple_(ticket_use.c.device_id, ticket_use.c.epoch,
                                                ticket_use.c.device_seq).in_(keys[i:i + 400]))
        for row in conn.execute(query).mappings():
            found[(row["device_id"], row["epoch"], row["device_seq"])] = row
    return found


def _tap_keys(conn: Connection, keys: list[tuple[str, int, int]]) -> set[tuple[str, int, int]]:
    found = set()
    for i in range(0, len(keys), 400):
        found.update(tuple(k) for k in conn.execute(
            select(Tap.device_id, Tap.epoch, Tap.device_seq)
            .where(tuple_(Tap.device_id, Tap.epoch, Tap.device_seq).in_(keys[i:i + 400]))))
    return found


def _differences(row, record: TapRecord) -> list[str]:
    mine = {"operator": row["operator"], "route": row["route"], "vehicle": row["vehicle"], "driver": row["driver"],
            "shift_no": row["shift_no"], "device_use": row["device_use"], "presented_by": row["presented_by"],
            "occurred_at": int(_utc(row["occurred_at"]).timestamp())}
    theirs = {"operator": record.operator, "route": record.route, "vehicle": record.vehicle,
              "driver": record.driver, "shift_no": record.shift_no, "device_use": record.ticket_use,
              "presented_by": record.presented, "occurred_at": int(record.occurred_at.timestamp())}
    out = [name for name in COMPARED if mine[name] != theirs[name]]
    # a QR use names the ticket; a pickup use only its serial
    if (row["ticket_id"] if record.presented != PRESENTED_PICKUP else row["ticket_id"] % PICKUP_MOD) != \
            record.ticket_id:
        out.append("ticket")
    return out


def store_records(conn: Connection, records: list[TapRecord], *, now: datetime) -> list[Outcome]:
    """Store uploaded ticket_use records (inside the caller's transaction, after the caller took the advisory locks
    of :func:`lock_name`): one :class:`Outcome` per record, in order. ``stored`` (a revenue use, or a flagged one:
    ``flag`` says), ``duplicate`` (the same record stored before), ``conflict`` / ``unknown`` (the caller
    quarantines it with ``reason``)."""
    out: list[Outcome | None] = [None] * len(records)
    before = _stored_by_key(conn, sorted({r.key for r in records}))
    operators = _Operators(conn)
    taps = _tap_keys(conn, sorted({r.key for r in records} - set(before)))
    here: dict[tuple[str, int, int], dict] = {}  # keys stored by this call, as rows
    for i, r in enumerate(records):
        if r.key in taps:  # a device sequence is one record, whatever its kind
            out[i] = Outcome("conflict", f"conflict: device {r.device_id} journal {r.epoch} seq {r.device_seq} is "
                             "already stored as a card tap; not a ticket use: review it")
            continue
        if r.key in here:
            before[r.key] = here[r.key]
        if r.key in before:
            differs = _differences(before[r.key], r)
            out[i] = (Outcome("duplicate") if not differs else Outcome(
                "conflict", f"conflict: device {r.device_id} journal {r.epoch} seq {r.device_seq} is already stored as "
                f"a ticket use with different {', '.join(differs)}; not a duplicate: review it"))
            continue
        if r.kind is not RecordKind.TICKET_USE or r.presented not in ("qr", "pickup"):
            out[i] = Outcome("unknown", f"ticket use presented as {r.presented!r}, neither qr nor pickup")
            continue
        ticket = _ticket_of(conn, r)
        if ticket is None or ticket.operator != r.operator:
            what = (f"pickup serial {r.ticket_id % PICKUP_MOD:010d}" if r.presented == PRESENTED_PICKUP
                    else f"ticket {r.ticket_id}")
            out[i] = Outcome("unknown", f"{what} is no ticket of operator {r.operator} here: not counted, review it")
            continue
        use_no, flag, reason = count_use(conn, ticket, at=r.occurred_at,
                                         who=f"ingest: device {r.device_id} seq {r.device_seq}")
        values = dict(device_id=r.device_id, epoch=r.epoch, device_seq=r.device_seq, operator=r.operator,
                      ticket_id=ticket.ticket_id, use_no=use_no, device_use=r.ticket_use, presented_by=r.presented,
                      route=r.route, vehicle=r.vehicle, driver=r.driver, shift_no=r.shift_no,
                      occurred_at=r.occurred_at, service_day=operators.service_day(r.operator, r.occurred_at),
                      received_at=now, revenue=use_no is not None, flag=flag, reason=reason[:500])
        if not _insert(conn, values):
            # the caller holds the device's lock and nothing here stored this key: the database changed under us
            raise RuntimeError(f"ticket use {r.key} appeared while it was being stored; the batch is retried")
        here[r.key] = values
        if flag:
            log.warning("device %s seq %d: ticket use flagged %s: %s", r.device_id, r.device_seq, flag, reason)
        out[i] = Outcome("stored", reason, flag, ticket.ticket_id, use_no)
    return out


def record_counter_use(conn: Connection, *, ticket_id: int, operator: str, use_no: int, staff: str, station: str,
                       at: datetime, route: str = "") -> None:
    """The ticket_use row of a pickup code redeemed at a counter (the use already counted by
    ``orders.use_by_pickup_code``)."""
    _insert(conn, dict(device_id=COUNTER_DEVICE, epoch=0, device_seq=None, operator=operator, ticket_id=ticket_id,
                       use_no=use_no, device_use=0, presented_by=PRESENTED_COUNTER, route=route[:64], vehicle=station[:64],
                       driver="", shift_no=0, staff=staff[:64], occurred_at=at,
                       service_day=_Operators(conn).service_day(operator, at), received_at=at, revenue=True,
                       flag=None, reason=""))


def flagged_tickets(conn: Connection, *, now: datetime | None = None) -> list[int]:
    """Tickets with a fraud-flagged use (shown again after their uses ran out, or after a refund) whose validity is
    not over: every bus must refuse them (the deny list; after validity the token refuses itself)."""
    now = now or datetime.now(UTC)
    query = (select(ticket_use.c.ticket_id).distinct()
             .join(Ticket.__table__, Ticket.ticket_id == ticket_use.c.ticket_id)
             .where(ticket_use.c.flag.in_(FRAUD_FLAGS), Ticket.valid_to > now)
             .order_by(ticket_use.c.ticket_id))
    return list(conn.execute(query).scalars())


def uses_of(conn: Connection, ticket_id: int) -> list[dict]:
    """A ticket's uses, oldest first (pages, support)."""
    return [dict(r) for r in conn.execute(select(ticket_use).where(ticket_use.c.ticket_id == ticket_id)
                                          .order_by(ticket_use.c.occurred_at, ticket_use.c.id)).mappings()]


def revenue_uses(conn: Connection, operator: str, day: date) -> int:
    return conn.execute(select(func.count()).select_from(ticket_use)
                        .where(ticket_use.c.operator == operator, ticket_use.c.service_day == day,
                               ticket_use.c.revenue.is_(True))).scalar()

"""Clearing runs and reconciliation items in the database: the use cases the nightly job, the CLI and the clerk's
pages call. Each runs inside the caller's transaction (``with engine.begin() as conn``) and commits nothing itself.

- ``clear_day``: clear an operator's service day (catching up any day skipped since the last run, see
  ``catch_up_days``), store the run, claim its taps (``claim_taps``: every tap lands in exactly one run), store its
  rows, carry the clerk's adjustments into it; asked again for a cleared day, it re-clears from the taps the run
  claimed and checks that the result is the same (``ClearingMismatch`` otherwise: a closed day never changes).
- ``reconcile_shifts_day``, ``import_issuer_file``, ``store_items``: reconciliation items, stored once each.
- ``resolve_item``: accept / adjust / dispute, with who and when.

The figures come from ``clearing.runs``, ``clearing.tickets`` and ``clearing.reconcile``; this module only loads
and stores. Ticket revenue (issue 11) is a second source beside taps: a new run, once it claimed its taps, claims the
ticket uses, pass days, refunds and breakage no run has taken (``backoffice.tickets.revenue.recognise``) and stores
their sums as rows of sections ``ticket`` (its day) and ``ticket_late`` (earlier days), commission 0; clearing the
day again sums them again from the run's own ledger lines and checks them with the card rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pandas as pd
from sqlalchemy import Connection, and_, case, func, literal_column, or_, select, text, tuple_, union_all, update
from sqlalchemy.exc import OperationalError

from backoffice import day_lock
from backoffice.models import (
    ClearingRow,
    ClearingRun,
    CommissionRate,
    Fleet,
    FleetVehicle,
    Operator,
    ReconItem,
    Tap,
)
from clearing import commission as fee
from clearing.reconcile import (
    ISSUER_COLUMNS,
    Discrepancy,
    read_issuer_file,
    reconcile_issuer,
    reconcile_shifts,
)
from clearing.runs import (
    NO_FLEET,
    PURCHASE,
    RUN_TAP_COLUMNS,
    DIMENSIONS,
    FINGERPRINT_V2,
    Adjustment,
    ClearingResult,
    ClearingWindow,
    clear,
    clear_sums,
    fingerprint_of_sums,
)
from clearing.service_day import day_bounds, service_day
from clearing.tickets import SECTION_DAY as TICKET_DAY, SECTION_LATE as TICKET_LATE

STATUSES = ("open", "accepted", "adjusted", "disputed")
ROW_FIELDS = ("section", "dimension", "key", "for_day", "taps", "gross", "commission", "net")
_TOTALS = ("day_taps", "day_gross", "day_commission", "day_net", "late_taps", "late_gross", "late_commission",
           "late_net", "reconciliation_gross", "reconciliation_commission", "reconciliation_net")


class ClearingMismatch(RuntimeError):
    """A cleared day, cleared again from its stored window, does not give its stored result."""


@dataclass(frozen=True, eq=False)
class StoredRun:
    id: int
    operator: str
    day: date
    created_at: datetime
    as_of: datetime
    fingerprint: str
    totals: dict  # the run's totals in fen (``_TOTALS``) plus payable_net
    rows: pd.DataFrame  # ROW_FIELDS
    recleared: bool = False  # True when this call found the day cleared and checked it again

    def table(self, dimension: str, section: str = "day") -> pd.DataFrame:
        """A breakdown for reports: the key column named after the dimension (``route``...), taps, gross,
        commission, net, in fen."""
        sel = self.rows[(self.rows["section"] == section) & (self.rows["dimension"] == dimension)]
        out = sel[["key", "for_day", "taps", "gross", "commission", "net"]].rename(columns={"key": dimension})
        return out.reset_index(drop=True)


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# ------------------------------------------------------------------------------------------------ registry
def add_fleet(conn: Connection, *, code: str, operator: str, name: str) -> None:
    conn.execute(Fleet.__table__.insert().values(code=code, operator=operator, name=name))


def assign_vehicle(conn: Connection, *, vehicle: str, fleet: str, valid_from: date) -> None:
    """Put a vehicle in a fleet from service day ``valid_from`` on (earlier days keep their fleet)."""
    conn.execute(FleetVehicle.__table__.insert().values(vehicle=vehicle, fleet=fleet, valid_from=valid_from))


def set_commission_rate(conn: Connection, *, operator: str, rate_bp: int, valid_from: date) -> None:
    """The card issuer's commission on ``operator``'s gross from service day ``valid_from`` on, in basis points."""
    conn.execute(CommissionRate.__table__.insert().values(operator=operator, rate_bp=fee.check_rate(rate_bp),
                                                          valid_from=valid_from))


def rate_on(conn: Connection, operator: str, day: date) -> int | None:
    """The commission rate in force on ``day`` (the latest set from that day or earlier), None when none is set.
    The one look-up of the rate: clearing and the settlement's "can this day be cleared" both ask here."""
    rate = conn.execute(select(CommissionRate.rate_bp).where(
        CommissionRate.operator == operator, CommissionRate.valid_from <= day)
        .order_by(CommissionRate.valid_from.desc()).limit(1)).scalar()
    return None if rate is None else int(rate)


def commission_rate(conn: Connection, operator: str, day: date) -> int:
    rate = rate_on(conn, operator, day)
    if rate is None:
        raise LookupError(f"operator {operator!r} has no card-issuer commission rate for {day}: set one with "
                          "`farebox registry set-commission --operator CODE --percent P --from <first day>`")
    return int(rate)


def _operator(conn: Connection, operator: str):
    op = conn.execute(select(Operator.timezone, Operator.cutoff_hour).where(Operator.code == operator)).first()
    if op is None:
        raise LookupError(f"operator {operator!r} is not registered")
    return op


# ------------------------------------------------------------------------------------------------ loading
def _with_fleets(conn: Connection, taps: pd.DataFrame, operator: str, tz: str, cutoff_hour: int) -> pd.DataFrame:
    """Each tap's fleet: the vehicle's assignment in force on the tap's own service day ("" when none)."""
    assigned = pd.DataFrame(conn.execute(
        select(FleetVehicle.vehicle, FleetVehicle.valid_from, FleetVehicle.fleet)
        .join(Fleet, Fleet.code == FleetVehicle.fleet).where(Fleet.operator == operator)).all(),
        columns=["vehicle", "valid_from", "fleet"])
    if taps.empty or assigned.empty:
        return taps.assign(fleet=NO_FLEET)
    assigned["since"] = pd.to_datetime([day_bounds(d, tz, cutoff_hour)[0] for d in assigned["valid_from"]],
                                       utc=True).as_unit("us")
    left = taps.assign(_row=range(len(taps)), occurred_at=taps["occurred_at"].dt.as_unit("us"))
    merged = pd.merge_asof(left.sort_values("occurred_at"), assigned.sort_values("since")[["vehicle", "since",
                                                                                          "fleet"]],
                           left_on="occurred_at", right_on="since", by="vehicle", direction="backward")
    merged = merged.sort_values("_row")
    return taps.assign(fleet=merged["fleet"].fillna(NO_FLEET).astype(str).to_numpy())


TAP_GATE = 0x66617265_0027  # the advisory lock key of revision 0027's insert gate on tap (PostgreSQL)
GATE_WAIT = "2s"
RUN_WORK_MEM = "256MB"  # work_mem for a run's sums (this transaction only)  # how long a claim waits for inserts in flight before it claims every tap one by one instead


def tap_watermark(conn: Connection) -> int | None:
    """The largest tap id now stored, read so that every tap with an id up to it is committed (and seen by this
    transaction's next statements) or will never be: on PostgreSQL each INSERT/COPY into ``tap`` holds a shared
    advisory lock until its commit (revision 0027's statement trigger); this takes it exclusively for the moment of
    reading ``max(id)`` and lets it go, so inserts in flight commit first and later ones get larger ids (the id
    sequence hands them out in order). None when an insert stays uncommitted longer than ``GATE_WAIT`` (the claim
    then takes its taps one by one, as before revision 0027). SQLite: one writer at a time. Read it before this
    transaction writes any tap (a waiting insert may want a row it changed)."""
    if conn.dialect.name != "postgresql":
        return int(conn.execute(select(func.coalesce(func.max(Tap.id), 0))).scalar())
    level = conn.execute(text("SELECT current_setting('transaction_isolation')")).scalar()
    if level != "read committed":  # an older snapshot would not see every tap up to the watermark
        raise RuntimeError(f"a clearing run claims taps in a READ COMMITTED transaction, not {level}")
    wait = conn.execute(text("SELECT current_setting('lock_timeout')")).scalar()
    try:
        with conn.begin_nested():  # a lock timeout fails the savepoint only
            conn.execute(text(f"SET LOCAL lock_timeout = '{GATE_WAIT}'"))
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": TAP_GATE})
    except OperationalError:
        return None
    finally:
        conn.execute(text("SELECT set_config('lock_timeout', :w, true)"), {"w": wait})
    try:
        return int(conn.execute(text("SELECT coalesce(max(id), 0) FROM tap")).scalar())
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": TAP_GATE})


_ASK = object()


def claim_taps(conn: Connection, *, run_id: int, window: ClearingWindow, watermark=_ASK) -> int:
    """Give run ``run_id`` every stored tap of ``window.operator`` that no run has taken yet, of the run's day or an
    earlier one, committed when the claim began (id <= ``watermark``, default ``tap_watermark``) and received before
    ``window.as_of``; returns how many it took one by one (None: no watermark, every tap one by one). The one place that decides which taps a run takes.

    Why a claim and not a time window: ingest stamps ``received_at`` before its commit, so a tap can be received
    before a run's moment and committed after the run read the table; a run that took "received before as_of"
    and a next run that took "received at or after it" both missed it. Here each tap is taken by one run in the
    run's own transaction, and ``run_of_tap`` / the view ``tap_claimed`` say which:

    - The block: the taps of the run's own service day with an id up to the run's ``claim_watermark`` and not taken
      one by one. That watermark is ``watermark``, lowered below the first tap of the day received at or after
      ``as_of``, so every tap of the block was received before it. Nothing is written per tap (at 10 M taps a day
      the UPDATE of each was 93% of the night); the run stores the number. A tap committed later has a larger id
      and is never in the block.
    - One by one (``tap.clearing_run_id``): the day's taps above the block (committed before the claim, received
      before ``as_of``), and the taps of earlier days not in their day's block (late taps, committed after that
      day's claim or received after its ``as_of``; days before the operator's first block: every tap not taken).

    A tap committed after the watermark was read (or still uncommitted then) is above it: not in this run, taken
    by the next. Runs of one operator are made one at a time (the unique (operator, service_day) and catch-up:
    ``clear_day``), and the UPDATEs take only taps whose ``clearing_run_id`` is NULL and not in a block. Never both,
    never neither. ``received_at < as_of`` keeps a run's taps to what had arrived by its moment (a clock that
    disagrees a little only moves a tap to the next run); a tap received at exactly ``as_of`` goes to the next run.
    A tap's day is its ``service_day`` (the operator's rule, frozen once it has taps: revision 0026), the same day
    as ``occurred_at`` within the window's bounds; a tap at exactly the next cut-off belongs to the next day. Every
    kind of record is claimed (shift records too), so "which run took this tap" has an answer for each; only
    purchases are money.
    """
    top = tap_watermark(conn) if watermark is _ASK else watermark
    op, day, as_of = window.operator, window.day, window.as_of
    tap = Tap.__table__
    own = (Tap.operator == op, Tap.service_day == day, Tap.clearing_run_id.is_(None))
    upto = () if top is None else (Tap.id <= top,)  # no watermark: what is committed now, one by one
    block = 0
    if top is not None:  # min(id + 0): the received_at index (BRIN), not a walk down the ids
        after = conn.execute(select(func.min(Tap.id + 0)).where(*own, *upto, Tap.received_at >= as_of)).scalar()
        block = top if after is None else int(after) - 1
    conn.execute(update(ClearingRun).where(ClearingRun.id == run_id).values(claim_watermark=block))
    took = 0
    if top is None or block < top:
        took += conn.execute(update(tap).where(*own, Tap.id > block, *upto, Tap.received_at < as_of)
                             .values(clearing_run_id=run_id)).rowcount
    blocks = conn.execute(select(ClearingRun.service_day, ClearingRun.claim_watermark).where(
        ClearingRun.operator == op, ClearingRun.claim_watermark.is_not(None), ClearingRun.service_day < day)
        .order_by(ClearingRun.service_day)).all()
    for earlier, mark in blocks:  # one day's partition each, from its key's id range: only the day's late taps
        took += conn.execute(update(tap).where(
            Tap.operator == op, Tap.service_day == earlier, Tap.clearing_run_id.is_(None), Tap.id > mark,
            *upto, Tap.received_at < as_of).values(clearing_run_id=run_id)).rowcount
    first = blocks[0].service_day if blocks else day
    took += conn.execute(update(tap).where(  # days before the operator's first block (few untaken, bar the first)
        Tap.operator == op, Tap.service_day < first, Tap.clearing_run_id.is_(None), *upto,
        Tap.received_at < as_of).values(clearing_run_id=run_id)).rowcount
    return took


def _block(conn: Connection, run_id: int):
    row = conn.execute(select(ClearingRun.operator, ClearingRun.service_day, ClearingRun.claim_watermark)
                       .where(ClearingRun.id == run_id)).first()
    return row if row is not None and row.claim_watermark is not None else None


def run_taps(conn: Connection, run_id: int, *columns: str):
    """The taps run ``run_id`` took (``claim_taps``) as a subquery ``t`` with ``columns``: the ones carrying its id,
    UNION ALL its day's block (on PostgreSQL one partition, scanned once)."""
    cols = [Tap.__table__.c[c] for c in columns]
    carried = select(*cols).where(Tap.clearing_run_id == run_id)
    block = _block(conn, run_id)
    if block is None or not block.claim_watermark:
        return carried.subquery("t")
    return union_all(carried, select(*cols).where(
        Tap.clearing_run_id.is_(None), Tap.operator == block.operator, Tap.service_day == block.service_day,
        Tap.id <= block.claim_watermark)).subquery("t")


def taken_by(conn: Connection, run_id: int):
    """A WHERE clause on ``tap``: taken by run ``run_id`` (for readers that already narrow the taps to a day)."""
    clause = Tap.clearing_run_id == run_id
    block = _block(conn, run_id)
    if block is None or not block.claim_watermark:
        return clause
    return or_(clause, and_(Tap.clearing_run_id.is_(None), Tap.operator == block.operator,
                            Tap.service_day == block.service_day, Tap.id <= block.claim_watermark))


def run_of_tap():
    """A SQL expression over ``tap``: the id of the run that took the tap, NULL when no run has (the view
    ``tap_claimed`` gives the same as its ``clearing_run_id``)."""
    in_block = (select(ClearingRun.id).where(
        ClearingRun.operator == Tap.operator, ClearingRun.service_day == Tap.service_day,
        ClearingRun.claim_watermark >= Tap.id).correlate(Tap).scalar_subquery())
    return func.coalesce(Tap.clearing_run_id, in_block)


def load_run_taps(conn: Connection, run_id: int, window: ClearingWindow) -> pd.DataFrame:
    """The purchases run ``run_id`` claimed (``claim_taps``), with their fleets, for ``clearing.runs.clear``."""
    cols = [c for c in RUN_TAP_COLUMNS if c != "fleet"]
    query = (select(*[getattr(Tap, c) for c in cols])
             .where(Tap.clearing_run_id == run_id, Tap.kind == PURCHASE)
             .order_by(Tap.device_id, Tap.device_seq))
    frame = pd.DataFrame(conn.execute(query).all(), columns=cols)
    for col in ("occurred_at", "received_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    frame["amount"] = frame["amount"].astype("int64")
    frame["card_type"] = frame["card_type"].astype("int64")
    return _with_fleets(conn, frame, window.operator, window.tz, window.cutoff_hour)


# ------------------------------------------------------------------------------------------ sums in the database
# A run's figures are sums, and the database sums them where the taps are: one scan of the run's purchases
# (PostgreSQL: GROUPING SETS, one set per dimension; SQLite: one GROUP BY per dimension), keyed by the minute of
# a late tap (NULL for the day's own) so that late taps' service days are found in Python over a few buckets, never
# over rows. No tap crosses into Python as an object; what comes back is a row per key.
_MINUTE_SQLITE = "%Y-%m-%d %H:%M:00"


def _late_minute(conn: Connection, start: datetime, occurred_at):
    """The minute (UTC) of a tap before the day's start, NULL for the day's own taps: a minute lies inside one
    service day (cut-offs are on the hour, zones are whole minutes), so a late tap's day is its minute's."""
    if conn.dialect.name == "postgresql":
        minute = func.date_trunc("minute", occurred_at)
    else:
        minute = func.strftime(_MINUTE_SQLITE, occurred_at)
    return case((occurred_at < start, minute), else_=None).label("late_minute")


def _minute_day(values, window: ClearingWindow) -> dict:
    """Service day of each distinct minute bucket (datetime from PostgreSQL, text from SQLite)."""
    distinct = sorted({v for v in values if v is not None}, key=str)
    if not distinct:
        return {}
    stamps = pd.to_datetime(pd.Series([str(v) if not isinstance(v, datetime) else v for v in distinct]), utc=True)
    days = service_day(stamps, tz=window.tz, cutoff_hour=window.cutoff_hour)
    return dict(zip(distinct, days, strict=True))


def _fleet_of(conn: Connection, operator: str):
    """vehicle -> [(valid_from, fleet)] oldest first, for the fleet a vehicle was in on a service day."""
    out: dict[str, list] = {}
    for vehicle, valid_from, fleet_code in conn.execute(
            select(FleetVehicle.vehicle, FleetVehicle.valid_from, FleetVehicle.fleet)
            .join(Fleet, Fleet.code == FleetVehicle.fleet).where(Fleet.operator == operator)
            .order_by(FleetVehicle.vehicle, FleetVehicle.valid_from)):
        out.setdefault(vehicle, []).append((valid_from, fleet_code))
    return out


def _fleet_on(history, vehicle: str, day: date) -> str:
    found = NO_FLEET
    for valid_from, code in history.get(vehicle, ()):
        if valid_from <= day:
            found = code
    return found


def _run_sums(conn: Connection, run_id: int, window: ClearingWindow) -> dict:
    """(section, for_day) -> dimension -> [(key, taps, gross)] of the purchases run ``run_id`` claimed."""
    start = day_bounds(window.day, window.tz, window.cutoff_hour)[0]
    t = run_taps(conn, run_id, "kind", "occurred_at", "route", "vehicle", "driver", "card_type", "amount")
    late = _late_minute(conn, start, t.c.occurred_at)
    where = (t.c.kind == PURCHASE,)
    n, gross = func.count().label("n"), func.coalesce(func.sum(t.c.amount), 0).label("gross")
    cols = {"route": t.c.route, "vehicle": t.c.vehicle, "driver": t.c.driver, "card_type": t.c.card_type}
    results: list[tuple[str, object, object, int, int]] = []  # (dim, late minute, key, taps, gross)
    if conn.dialect.name == "postgresql":
        sets = [tuple_(late, c) for c in cols.values()]
        query = (select(late, *cols.values(), func.grouping(*cols.values()).label("g"), n, gross)
                 .where(*where).group_by(func.grouping_sets(*sets)))
        bits = {dim: 1 << (len(cols) - 1 - i) for i, dim in enumerate(cols)}  # GROUPING(): 1 = not grouped
        for row in conn.execute(query):
            dim = next(d for d, b in bits.items() if row.g == sum(bits.values()) - b)
            results.append((dim, row.late_minute, getattr(row, dim), int(row.n), int(row.gross)))
    else:
        for dim, col in cols.items():
            for row in conn.execute(select(late, col, n, gross).where(*where).group_by(late, col)):
                results.append((dim, row[0], row[1], int(row[2]), int(row[3])))
    days = _minute_day([r[1] for r in results], window)
    sums: dict = {}
    for dim, minute, key, taps, amount in results:
        section = ("day", window.day) if minute is None else ("late", days[minute])
        bucket = sums.setdefault(section, {}).setdefault(dim, {})
        label = "" if key is None else str(key)
        t, g = bucket.get(label, (0, 0))
        bucket[label] = (t + taps, g + amount)
    history = _fleet_of(conn, window.operator)
    out = {}
    for (section, for_day), dims in sums.items():
        fleets: dict[str, tuple[int, int]] = {}
        for vehicle, (t, g) in dims.get("vehicle", {}).items():
            code = _fleet_on(history, vehicle, for_day)
            ft, fg = fleets.get(code, (0, 0))
            fleets[code] = (ft + t, fg + g)
        dims["fleet"] = fleets
        out[(section, for_day)] = {dim: [(k, t, g) for k, (t, g) in dims.get(dim, {}).items()]
                                   for dim in DIMENSIONS[1:]}
    return out


# One 64-bit value per tap: the first 8 bytes of MD5 over its content as text. PostgreSQL computes and folds them
# (count, sum, bit_xor); SQLite has no MD5, so Python hashes the same text there (the embedded, small case).
_TAP_TEXT_PG = ("concat_ws('|', device_id, device_seq, floor(date_part('epoch', occurred_at))::bigint, "
                "floor(date_part('epoch', received_at))::bigint, route, vehicle, driver, card_type, amount)")
_TAP_TEXT_SQLITE = ("device_id || '|' || device_seq || '|' || CAST(strftime('%s', occurred_at) AS "
                    "INTEGER) || '|' || CAST(strftime('%s', received_at) AS INTEGER) || '|' || route || '|' || "
                    "vehicle || '|' || driver || '|' || card_type || '|' || amount")


def _run_digest(conn: Connection, run_id: int) -> tuple[int, int, int]:
    """(taps, wrapping sum, xor) of the per-tap values of the purchases run ``run_id`` claimed."""
    t = run_taps(conn, run_id, "kind", "device_id", "device_seq", "occurred_at", "received_at", "route", "vehicle",
                 "driver", "card_type", "amount")
    if conn.dialect.name == "postgresql":
        h = (select(literal_column(f"('x' || left(md5({_TAP_TEXT_PG}), 16))::bit(64)::bigint").label("h"))
             .select_from(t).where(t.c.kind == PURCHASE).subquery("h"))
        n, total, xor = conn.execute(select(func.count(), func.coalesce(func.sum(h.c.h), 0),
                                            func.coalesce(func.bit_xor(h.c.h), 0))).one()
        return int(n), int(total) % (1 << 64), int(xor) % (1 << 64)
    import hashlib

    n = total = xor = 0
    for (line,) in conn.execute(select(literal_column(_TAP_TEXT_SQLITE)).select_from(t)
                                .where(t.c.kind == PURCHASE)):
        h = int.from_bytes(hashlib.md5(str(line).encode()).digest()[:8], "big")
        n, total, xor = n + 1, (total + h) % (1 << 64), xor ^ h
    return n, total, xor


def clear_run(conn: Connection, run_id: int, window: ClearingWindow, adjustments) -> ClearingResult:
    """Clear the purchases run ``run_id`` claimed, summed in the database (``_run_sums``, ``_run_digest``)."""
    if conn.dialect.name == "postgresql":  # room to hash the groups (a day's 25,000 keys) instead of sorting 10 M rows
        conn.execute(text("SELECT set_config('work_mem', :m, true)"), {"m": RUN_WORK_MEM})
    n, total, xor = _run_digest(conn, run_id)
    result = clear_sums(_run_sums(conn, run_id, window), window, adjustments,
                        fingerprint=fingerprint_of_sums(window, n, total, xor, adjustments))
    taken = result.totals["day_taps"] + result.totals["late_taps"]
    if taken != n:  # the two scans saw the same claimed rows (one transaction); never store what disagrees
        raise ClearingMismatch(f"run {run_id}: {taken} purchases summed, {n} fingerprinted")
    return result


# ------------------------------------------------------------------------------------------------ runs
def _stored(conn: Connection, run, *, recleared: bool = False) -> StoredRun | None:
    if run is None:
        return None
    rows = pd.DataFrame(conn.execute(
        select(*[getattr(ClearingRow, c) for c in ROW_FIELDS]).where(ClearingRow.run_id == run.id)).all(),
        columns=list(ROW_FIELDS))
    rows = rows.sort_values(["section", "for_day", "dimension", "key"], kind="stable").reset_index(drop=True)
    for col in ("taps", "gross", "commission", "net"):
        rows[col] = rows[col].astype("int64")
    totals = {k: int(getattr(run, k)) for k in _TOTALS}
    totals["payable_net"] = totals["day_net"] + totals["late_net"] + totals["reconciliation_net"]
    totals.update(ticket_totals(rows))
    return StoredRun(run.id, run.operator, run.service_day, _utc(run.created_at), _utc(run.as_of),
                     run.fingerprint, totals, rows, recleared)


def _ticket_revenue():
    """backoffice.tickets.revenue, imported when a run needs it: the registry imports this module, and the ticket
    use cases import the registry's neighbours; a top-level import here closes a circle."""
    from backoffice.tickets import revenue

    return revenue


def ticket_totals(rows: pd.DataFrame) -> dict:
    """A run's ticket figures from its rows, in fen: uses and revenue of its day, of earlier days, and together
    (``ticket_gross``). Not part of ``payable_*``: the card issuer pays card fares only."""
    out = {}
    for section, name in ((TICKET_DAY, "ticket_day"), (TICKET_LATE, "ticket_late")):
        sel = rows[(rows["section"] == section) & (rows["dimension"] == "operator")]
        out[f"{name}_uses"] = int(sel["taps"].sum())
        out[f"{name}_gross"] = int(sel["gross"].sum())
    out["ticket_gross"] = out["ticket_day_gross"] + out["ticket_late_gross"]
    return out


def _with_tickets(conn: Connection, result: ClearingResult, run_id: int, window: ClearingWindow) -> ClearingResult:
    """The card result with the run's ticket rows beside its rows (sorted as a run's rows are)."""
    extra = _ticket_revenue().run_rows(conn, run_id, window)
    if not extra:
        return result
    frame = pd.concat([result.rows, pd.DataFrame(extra, columns=list(ROW_FIELDS))], ignore_index=True)
    frame = frame.sort_values(["section", "for_day", "dimension", "key"], kind="stable").reset_index(drop=True)
    for col in ("taps", "gross", "commission", "net"):
        frame[col] = frame[col].astype("int64")
    return ClearingResult(result.window, frame, result.fingerprint, result.totals)


def _run_row(conn: Connection, where):
    # Core rows (attribute access by column), not ORM objects: these use cases run on a Connection.
    return conn.execute(select(ClearingRun.__table__).where(where)).first()


def get_run(conn: Connection, run_id: int) -> StoredRun | None:
    return _stored(conn, _run_row(conn, ClearingRun.id == run_id))


def latest_run(conn: Connection, operator: str) -> StoredRun | None:
    return _stored(conn, conn.execute(select(ClearingRun.__table__).where(ClearingRun.operator == operator)
                                      .order_by(ClearingRun.service_day.desc()).limit(1)).first())


def _window_of(run) -> ClearingWindow:
    return ClearingWindow(run.operator, run.service_day, _utc(run.as_of), _utc(run.carried_from), run.rate_bp,
                          run.tz, run.cutoff_hour)


def _carried(conn: Connection, run_id: int) -> list[Adjustment]:
    rows = conn.execute(select(ReconItem.id, ReconItem.service_day, ReconItem.adjustment)
                        .where(ReconItem.carried_run_id == run_id)).all()
    return [Adjustment(r.id, r.service_day, int(r.adjustment)) for r in rows]


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    cols = list(ROW_FIELDS)
    a = a[cols].sort_values(cols[:4]).reset_index(drop=True)
    b = b[cols].sort_values(cols[:4]).reset_index(drop=True)
    return a.astype(str).equals(b.astype(str))


def _reclear(conn: Connection, run) -> StoredRun:
    window = _window_of(run)
    if run.fingerprint.startswith(FINGERPRINT_V2):
        card = clear_run(conn, run.id, window, _carried(conn, run.id))
    else:  # a run stored before the sums moved into the database: checked the way it was made
        card = clear(load_run_taps(conn, run.id, window), window, _carried(conn, run.id))
    result = _with_tickets(conn, card, run.id, window)
    stored = _stored(conn, run, recleared=True)
    if result.fingerprint != run.fingerprint or not _same_rows(result.rows, stored.rows):
        raise ClearingMismatch(
            f"{run.operator} {run.service_day}: cleared again from run {run.id}'s window, the inputs' fingerprint is "
            f"{result.fingerprint[:16]}… (stored {run.fingerprint[:16]}…) and the day's gross "
            f"{result.totals['day_gross']} fen (stored {run.day_gross}); stored taps of a closed day have changed: "
            "look at the tap table, the run stays as it was")
    changed = _ticket_revenue().changed_uses(conn, run.id, window)
    if changed:
        raise ClearingMismatch(
            f"{run.operator} {run.service_day}: {len(changed)} ticket use(s) run {run.id} recognised no longer give "
            f"the same revenue line (first: {changed[0]}); stored ticket uses of a closed day have changed: look at "
            "the ticket_use table, the run stays as it was")
    return stored


def _insert_run(conn: Connection, window: ClearingWindow, created_at: datetime) -> int:
    """The run's row first (its totals filled in by ``_store_result``), so that its id can claim taps; a second run
    of the same day waits here on the unique (operator, service_day) and fails when the first commits."""
    zeros = dict.fromkeys(_TOTALS, 0)
    w = window
    return conn.execute(ClearingRun.__table__.insert().values(
        operator=w.operator, service_day=w.day, created_at=created_at, as_of=w.as_of, carried_from=w.carried_from,
        rate_bp=w.rate_bp, tz=w.tz, cutoff_hour=w.cutoff_hour, fingerprint="", **zeros)
        .returning(ClearingRun.id)).scalar_one()


def _store_result(conn: Connection, run_id: int, result: ClearingResult, adjustments: list[Adjustment]) -> None:
    conn.execute(update(ClearingRun).where(ClearingRun.id == run_id).values(
        fingerprint=result.fingerprint, **{k: result.totals[k] for k in _TOTALS}))
    rows = [dict(zip(ROW_FIELDS, r, strict=True), run_id=run_id)
            for r in result.rows[list(ROW_FIELDS)].itertuples(index=False, name=None)]
    for r in rows:
        for k in ("taps", "gross", "commission", "net"):
            r[k] = int(r[k])
    if rows:
        conn.execute(ClearingRow.__table__.insert(), rows)
    if adjustments:
        conn.execute(update(ReconItem).where(ReconItem.id.in_([a.item_id for a in adjustments]),
                                             ReconItem.carried_run_id.is_(None))
                     .values(carried_run_id=run_id))


def _last_run(conn: Connection, operator: str):
    return conn.execute(select(ClearingRun.__table__).where(ClearingRun.operator == operator)
                        .order_by(ClearingRun.service_day.desc()).limit(1)).first()


def catch_up_days(conn: Connection, *, operator: str, day: date) -> list[date]:
    """The days to clear, oldest first, so that ``day`` is cleared with no day skipped before it: every day after
    the operator's last run up to ``day`` (just ``[day]`` for a first run or a day cleared already). A day before
    the last run that was never cleared is refused: its taps went to the runs after it as late taps. The one
    catch-up rule: ``clear_day`` and the nightly job (``backoffice.jobs``) both follow it."""
    last = conn.execute(select(func.max(ClearingRun.service_day)).where(ClearingRun.operator == operator)).scalar()
    if last is None or day == last:
        return [day]
    if day < last:
        if _run_row(conn, and_(ClearingRun.operator == operator, ClearingRun.service_day == day)) is not None:
            return [day]
        raise ValueError(f"{operator} {day} comes before the last cleared day {last} and was never cleared "
                         "itself: its taps were carried as late taps into the runs after it")
    return [last + timedelta(days=n) for n in range(1, (day - last).days + 1)]


def _clear_new_day(conn: Connection, op, operator: str, day: date, now: datetime, watermark: int | None
                   ) -> StoredRun:
    last = _last_run(conn, operator)
    if last is not None and now < _utc(last.as_of):
        raise ValueError(f"clearing as of {now.isoformat()} would go back before the last run's "
                         f"{_utc(last.as_of).isoformat()}")
    window = ClearingWindow(operator, day, now, _utc(last.as_of) if last else None,
                            commission_rate(conn, operator, day), op.timezone, op.cutoff_hour)
    adjustments = [Adjustment(r.id, r.service_day, int(r.adjustment)) for r in conn.execute(
        select(ReconItem.id, ReconItem.service_day, ReconItem.adjustment).where(
            ReconItem.operator == operator, ReconItem.status == "adjusted", ReconItem.carried_run_id.is_(None)))]
    run_id = _insert_run(conn, window, now)
    claim_taps(conn, run_id=run_id, window=window, watermark=watermark)
    _ticket_revenue().recognise(conn, run_id=run_id, window=window)
    result = _with_tickets(conn, clear_run(conn, run_id, window, adjustments), run_id, window)
    _store_result(conn, run_id, result, adjustments)
    return _stored(conn, _run_row(conn, ClearingRun.id == run_id))


def clear_day(conn: Connection, *, operator: str, day: date, now: datetime | None = None) -> StoredRun:
    """Clear ``operator``'s service ``day`` as of ``now`` (default: the current time), or re-clear and check it
    when it is cleared already. Days skipped since the operator's last run are cleared first, in order
    (``catch_up_days``), each its own run, in the caller's transaction. A day a clerk signed off is not cleared
    again (``backoffice.day_lock.DayLocked``): its corrections go into the next run."""
    now = _utc(now) or datetime.now(UTC)
    existing = _run_row(conn, and_(ClearingRun.operator == operator, ClearingRun.service_day == day))
    if existing is not None:
        day_lock.check_open(conn, operator=operator, day=day)  # a signed-off day is locked: DayLocked
        return _reclear(conn, existing)
    op = _operator(conn, operator)
    run = None
    days = catch_up_days(conn, operator=operator, day=day)
    watermark = tap_watermark(conn)  # once, before this transaction writes a tap: each day's claim uses it
    for d in days:
        run = _clear_new_day(conn, op, operator, d, now, watermark)
    return run


# ------------------------------------------------------------------------------------------- reconciliation
def store_items(conn: Connection, *, operator: str, day: date, items: list[Discrepancy],
                now: datetime | None = None) -> list[int]:
    """Store discrepancies as open items; one already stored (same kind, ref, problem) is left as it is, with
    whatever a clerk decided on it. Returns the ids of the new items."""
    now = _utc(now) or datetime.now(UTC)
    if not items:
        return []
    keys = {(i.kind, i.ref, i.problem) for i in items}
    known = set(conn.execute(select(ReconItem.kind, ReconItem.ref, ReconItem.problem).where(
        ReconItem.operator == operator,
        tuple_(ReconItem.kind, ReconItem.ref, ReconItem.problem).in_(list(keys)))).all())
    new = []
    for it in items:
        key = (it.kind, it.ref, it.problem)
        if key in known:
            continue
        known.add(key)
        new.append(conn.execute(ReconItem.__table__.insert().values(
            operator=operator, kind=it.kind, service_day=day, ref=it.ref[:80], problem=it.problem, ours=it.ours,
            theirs=it.theirs, detail=it.detail[:500], status="open", created_at=now, note="")
            .returning(ReconItem.id)).scalar_one())
    return new


def load_shift_taps(conn: Connection, *, operator: str, day: date) -> pd.DataFrame:
    """Every record of the shifts that have a record in service ``day`` (the whole shift, also past the cut-off)."""
    op = _operator(conn, operator)
    start, end = day_bounds(day, op.timezone, op.cutoff_hour)
    # A shift belongs to one journal (device, epoch): a replaced journal numbers its shifts from 1 again.
    shifts = (select(Tap.device_id, Tap.epoch, Tap.shift_no).where(
        Tap.operator == operator, Tap.shift_no > 0, Tap.occurred_at >= start, Tap.occurred_at < end)
        .distinct().subquery())
    cols = ["device_id", "epoch", "device_seq", "kind", "shift_no", "amount", "occurred_at"]
    query = (select(*[getattr(Tap, c) for c in cols])
             .join(shifts, and_(Tap.device_id == shifts.c.device_id, Tap.epoch == shifts.c.epoch,
                                Tap.shift_no == shifts.c.shift_no))
             .where(Tap.operator == operator).order_by(Tap.device_id, Tap.epoch, Tap.device_seq))
    frame = pd.DataFrame(conn.execute(query).all(), columns=cols)
    frame["amount"] = frame["amount"].astype("int64")
    return frame


def reconcile_shifts_day(conn: Connection, *, operator: str, day: date, declared: pd.DataFrame | None = None,
                         now: datetime | None = None) -> tuple[pd.DataFrame, list[int]]:
    """Shift totals of the day and the ids of new out-of-balance items."""
    totals, items = reconcile_shifts(load_shift_taps(conn, operator=operator, day=day), declared)
    return totals, store_items(conn, operator=operator, day=day, items=items, now=now)


def load_day_purchases(conn: Connection, *, operator: str, day: date) -> pd.DataFrame:
    """The operator's stored purchases of service ``day`` in the issuer file's columns."""
    op = _operator(conn, operator)
    start, end = day_bounds(day, op.timezone, op.cutoff_hour)
    frame = pd.DataFrame(conn.execute(select(*[getattr(Tap, c) for c in ISSUER_COLUMNS]).where(
        Tap.operator == operator, Tap.kind == PURCHASE, Tap.occurred_at >= start, Tap.occurred_at < end)).all(),
        columns=list(ISSUER_COLUMNS))
    frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True)
    return frame


def import_issuer_file(conn: Connection, *, operator: str, day: date, source, now: datetime | None = None
                       ) -> tuple[list[Discrepancy], list[int]]:
    """Reconcile the issuer's daily file (``clearing.reconcile.ISSUER_FILE_DOC``) against the day's purchases;
    returns every discrepancy found and the ids of the items that are new."""
    items = reconcile_issuer(load_day_purchases(conn, operator=operator, day=day), read_issuer_file(source))
    return items, store_items(conn, operator=operator, day=day, items=items, now=now)


def resolve_item(conn: Connection, *, item_id: int, status: str, by: str, now: datetime | None = None,
                 adjustment: int | None = None, note: str = "") -> None:
    """A clerk's decision: ``accepted`` (our figure stands), ``adjusted`` (carry ``adjustment`` fen, by default
    the item's suggestion, into the next run) or ``disputed`` (taken up with the other side). An item already
    carried into a run is closed."""
    if status not in STATUSES[1:]:
        raise ValueError(f"status must be one of {STATUSES[1:]}, got {status!r}")
    if not by:
        raise ValueError("say who decided (by=...): every decision on money is signed")
    item = conn.execute(select(ReconItem.__table__).where(ReconItem.id == item_id)).first()
    if item is None:
        raise LookupError(f"reconciliation item {item_id} does not exist")
    if item.carried_run_id is not None:
        raise ValueError(f"item {item_id} was carried into clearing run {item.carried_run_id}; it is closed")
    if status == "adjusted":
        if adjustment is None and item.theirs is None and item.kind == "shift":
            # A shift's gap has no other side's figure: the money missing is unknown, so the clerk must say it.
            raise ValueError(f"item {item_id} is a shift discrepancy: give the adjustment in fen")
        adjustment = (item.theirs or 0) - (item.ours or 0) if adjustment is None else adjustment
        if isinstance(adjustment, bool) or not isinstance(adjustment, int):
            raise TypeError(f"adjustment must be int fen, got {adjustment!r}")
    else:
        adjustment = None
    conn.execute(update(ReconItem).where(ReconItem.id == item_id).values(
        status=status, adjustment=adjustment, resolved_by=by[:64], resolved_at=_utc(now) or datetime.now(UTC),
        note=note[:500]))


def items(conn: Connection, *, operator: str, status: str | None = None) -> pd.DataFrame:
    """The reconciliation work list (all, or one status), oldest first."""
    cols = ["id", "kind", "service_day", "ref", "problem", "ours", "theirs", "detail", "status", "adjustment",
            "created_at", "resolved_by", "resolved_at", "note", "carried_run_id"]
    q = select(*[getattr(ReconItem, c) for c in cols]).where(ReconItem.operator == operator)
    if status is not None:
        q = q.where(ReconItem.status == status)
    return pd.DataFrame(conn.execute(q.order_by(ReconItem.id)).all(), columns=cols)


def open_count(conn: Connection, operator: str) -> int:
    return int(conn.execute(select(func.count()).select_from(ReconItem).where(
        ReconItem.operator == operator, ReconItem.status == "open")).scalar_one())

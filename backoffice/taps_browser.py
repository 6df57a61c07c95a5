"""The taps browser's query: one operator's stored records over a range of service days, filtered by route,
vehicle, driver, card, kind and outcome and a free-text search, a page at a time, with the totals of everything
the filters select (not only the page). The same selection, unpaginated, is what the page exports.

"Where did this tap go" is the outcome of each record:

- ``cleared``: a clearing run of its own service day took it (``clearing_runs.claim_taps``);
- ``late``: it arrived after its day was cleared, and the run of a later day took it as a late tap;
- ``waiting``: stored, not taken by any run yet (its day is not cleared, or it came after the last run);
- ``refused``: a deny-listed card refused on the bus (kind ``denied``; no money);
- ``flagged``: an e-ticket use that does not count (kind ``ticket``: a second use on another bus, a use after a
  refund, outside validity; its flag and reason say which).

Kind ``ticket`` reads the stored e-ticket uses (backoffice.tickets.uses) instead of the taps: their "fares" are the
counting uses and their amount the revenue a clearing run recognised on them (backoffice.tickets.revenue).

Records the back office refused at the door are in the quarantine, not here (the page links to it).

Keyword-only functions on the caller's connection, like backoffice.web.reads; no HTTP, no formatting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, case, false, func, not_, or_, select

from backoffice.clearing_runs import run_of_tap
from backoffice.models import ClearingRun, Driver, Route, Tap, Vehicle
from clearing.service_day import day_bounds

KINDS = {"purchase": ("乘车", "fare"), "shift_open": ("司机签到", "driver signed in"),
         "shift_close": ("司机签退", "driver signed out"), "denied": ("拒绝（黑名单卡）", "refused (deny-listed card)"),
         "ticket": ("电子票使用", "e-ticket use")}
OUTCOMES = {"cleared": ("已清分", "cleared"), "late": ("迟到，计入后一批次", "late, in a later run"),
            "waiting": ("待清分", "waiting for clearing"), "refused": ("车上拒绝", "refused on the bus"),
            "flagged": ("不计收入（已标记）", "not counted (flagged)")}
PURCHASE, DENIED, TICKET = "purchase", "denied", "ticket"
FLAGS = {"second_use": ("重复使用（疑似欺诈）", "used again (fraud suspected)"),
         "refunded": ("已退票仍使用", "used after its refund"),
         "outside_validity": ("不在有效期内", "outside its validity")}
MAX_RANGE_DAYS = 366
MAX_EXPORT = 100_000  # rows in one export; narrower filters beyond that
_COLUMNS = ("id", "device_id", "epoch", "device_seq", "kind", "occurred_at", "received_at", "route", "vehicle",
            "driver", "shift_no", "card_asn", "card_type", "card_ttc", "amount", "balance_after", "terminal_id",
            "terminal_seq", "reason", "clearing_run_id")


@dataclass(frozen=True)
class TapFilter:
    operator: str
    first_day: date
    last_day: date
    route: str = ""
    vehicle: str = ""
    driver: str = ""
    card: str = ""
    kind: str = ""
    outcome: str = ""
    q: str = ""

    def check(self) -> None:
        """ValueError with what to change when the filter cannot be asked."""
        if self.last_day < self.first_day:
            raise ValueError(f"the range ends ({self.last_day}) before it starts ({self.first_day})")
        if (self.last_day - self.first_day).days >= MAX_RANGE_DAYS:
            raise ValueError(f"a range of at most {MAX_RANGE_DAYS} days, please")
        if self.kind and self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.outcome and self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r}: one of {', '.join(OUTCOMES)}")


@dataclass(frozen=True)
class TapPage:
    rows: list[dict]  # the page's records, oldest first, each with service_day, outcome, run_day and
    # upload_delay_min (received minus happened: a bus out of reach shows hours here)
    total: int  # records the filters select
    fares: int  # purchases among them
    amount: int  # their fen
    limit: int
    offset: int


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _runs(conn: Connection, operator: str, since: date) -> dict[int, tuple[date, datetime]]:
    """The operator's runs that can hold taps of days from ``since`` on: id -> (service day, its first moment)."""
    rows = conn.execute(select(ClearingRun.id, ClearingRun.service_day, ClearingRun.tz, ClearingRun.cutoff_hour)
                        .where(ClearingRun.operator == operator, ClearingRun.service_day >= since))
    return {int(r.id): (r.service_day, day_bounds(r.service_day, r.tz, r.cutoff_hour)[0]) for r in rows}


def _late(runs: dict[int, tuple[date, datetime]]):
    """A tap is late when the run that took it is of a later day: it happened before that run's day began."""
    parts = [and_(run_of_tap() == rid, Tap.occurred_at < start) for rid, (_d, start) in runs.items()]
    return or_(*parts) if parts else false()


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _where(f: TapFilter, *, tz: str, cutoff_hour: int, runs: dict) -> list:
    start = day_bounds(f.first_day, tz, cutoff_hour)[0]
    end = day_bounds(f.last_day, tz, cutoff_hour)[1]
    where = [Tap.operator == f.operator, Tap.occurred_at >= start, Tap.occurred_at < end]
    for column, value in ((Tap.route, f.route), (Tap.vehicle, f.vehicle), (Tap.driver, f.driver),
                          (Tap.kind, f.kind)):
        if value:
            where.append(column == value)
    if f.card:
        where.append(Tap.card_asn == f.card.strip().lower())
    late = _late(runs)
    if f.outcome == "refused":
        where.append(Tap.kind == DENIED)
    elif f.outcome == "waiting":
        where += [Tap.kind != DENIED, run_of_tap().is_(None)]
    elif f.outcome == "late":
        where += [Tap.kind != DENIED, late]
    elif f.outcome == "cleared":
        where += [Tap.kind != DENIED, run_of_tap().is_not(None), not_(late)]
    q = f.q.strip()
    if q:
        pattern = _like(q)
        names = [  # registry names a clerk knows a bus, route or driver by
            Tap.route.in_(select(Route.code).where(Route.operator == f.operator,
                                                   Route.name.ilike(pattern, escape="\\"))),
            Tap.vehicle.in_(select(Vehicle.code).where(Vehicle.operator == f.operator,
                                                       Vehicle.plate.ilike(pattern, escape="\\"))),
            Tap.driver.in_(select(Driver.staff_no).where(Driver.operator == f.operator,
                                                         Driver.name.ilike(pattern, escape="\\")))]
        texts = [c.ilike(pattern, escape="\\") for c in (Tap.device_id, Tap.card_asn, Tap.route, Tap.vehicle,
                                                          Tap.driver, Tap.terminal_id, Tap.reason)]
        exact = [Tap.device_seq == int(q)] if q.isdigit() and len(q) <= 15 else []
        where.append(or_(*texts, *names, *exact))
    return where


def service_day_of(at: datetime, tz: str, cutoff_hour: int) -> date:
    """The service day of one moment, by the wall-clock rule of clearing.service_day."""
    wall = _utc(at).astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    return (wall - timedelta(hours=cutoff_hour)).date()


def _outcome(kind: str, run_day: date | None, day: date) -> str:
    if kind == DENIED:
        return "refused"
    if run_day is None:
        return "waiting"
    return "late" if run_day > day else "cleared"


def _rows(conn: Connection, query, *, tz: str, cutoff_hour: int, runs: dict) -> list[dict]:
    out = []
    for r in conn.execute(query):
        row = dict(r._mapping)
        row["occurred_at"], row["received_at"] = _utc(row["occurred_at"]), _utc(row["received_at"])
        day = service_day_of(row["occurred_at"], tz, cutoff_hour)
        run_id = row["clearing_run_id"]
        run_day = runs[int(run_id)][0] if run_id is not None and int(run_id) in runs else None
        if run_id is not None and run_day is None:  # a run older than the range start cannot hold it, but be exact
            run_day = conn.execute(select(ClearingRun.service_day).where(ClearingRun.id == run_id)).scalar()
        row.update(service_day=day, run_day=run_day, outcome=_outcome(row["kind"], run_day, day),
                   upload_delay_min=int((row["received_at"] - row["occurred_at"]).total_seconds() // 60))
        out.append(row)
    return out


def search(conn: Connection, f: TapFilter, *, tz: str, cutoff_hour: int, limit: int = 50,
           offset: int = 0) -> TapPage:
    """One page of the records ``f`` selects, oldest first, and the totals of all of them."""
    f.check()
    if f.kind == TICKET:  # e-ticket uses (their own table): fares = counting uses, amount = revenue recognised
        return _ticket_search(conn, f, tz=tz, cutoff_hour=cutoff_hour, limit=limit, offset=offset)
    runs = _runs(conn, f.operator, f.first_day)
    where = _where(f, tz=tz, cutoff_hour=cutoff_hour, runs=runs)
    is_fare = Tap.kind == PURCHASE
    total, fares, amount = conn.execute(select(
        func.count(), func.coalesce(func.sum(case((is_fare, 1), else_=0)), 0),
        func.coalesce(func.sum(case((is_fare, Tap.amount), else_=0)), 0)).select_from(Tap).where(*where)).one()
    # The run that took a tap: its id on the tap, or the run whose block of the day holds it (claim_taps).
    query = (select(*[run_of_tap().label(c) if c == "clearing_run_id" else getattr(Tap, c) for c in _COLUMNS])
             .where(*where)
             .order_by(Tap.occurred_at, Tap.id).limit(limit).offset(offset))
    rows = _rows(conn, query, tz=tz, cutoff_hour=cutoff_hour, runs=runs)
    return TapPage(rows, int(total), int(fares), int(amount), limit, offset)


# ------------------------------------------------------------------------------------------------ ticket uses
def _ticket_parts(f: TapFilter, *, tz: str, cutoff_hour: int):
    """The stored ticket uses ``f`` selects (kind ``ticket``), each with the run that recognised it (the ledger's
    ``use`` line, backoffice.tickets.revenue) and that run's day; the columns the page shows, tap-shaped."""
    from backoffice.tickets.revenue import ledger
    from backoffice.tickets.uses import ticket_use as u

    start = day_bounds(f.first_day, tz, cutoff_hour)[0]
    end = day_bounds(f.last_day, tz, cutoff_hour)[1]
    line = ledger.alias("line")
    where = [u.c.operator == f.operator, u.c.occurred_at >= start, u.c.occurred_at < end]
    for column, value in ((u.c.route, f.route), (u.c.vehicle, f.vehicle), (u.c.driver, f.driver)):
        if value:
            where.append(column == value)
    if f.card:  # a ticket's number in the card field
        card = f.card.strip()
        where.append(u.c.ticket_id == int(card) if card.isdigit() and len(card) <= 19 else false())
    late = ClearingRun.service_day > u.c.service_day
    if f.outcome == "flagged":
        where.append(u.c.revenue.is_(False))
    elif f.outcome == "waiting":
        where += [u.c.revenue.is_(True), line.c.run_id.is_(None)]
    elif f.outcome == "late":
        where += [line.c.run_id.is_not(None), late]
    elif f.outcome == "cleared":
        where += [line.c.run_id.is_not(None), not_(late)]
    elif f.outcome == "refused":
        where.append(false())
    q = f.q.strip()
    if q:
        pattern = _like(q)
        texts = [c.ilike(pattern, escape="\\") for c in (u.c.device_id, u.c.route, u.c.vehicle, u.c.driver,
                                                           u.c.reason, u.c.flag, u.c.staff)]
        exact = [u.c.ticket_id == int(q)] if q.isdigit() and len(q) <= 19 else []
        where.append(or_(*texts, *exact))
    joined = (u.outerjoin(line, and_(line.c.use_id == u.c.id, line.c.source == "use"))
              .outerjoin(ClearingRun, ClearingRun.id == line.c.run_id))
    columns = (u.c.id, u.c.device_id, u.c.epoch, u.c.device_seq, u.c.occurred_at, u.c.received_at, u.c.route,
               u.c.vehicle, u.c.driver, u.c.shift_no, u.c.ticket_id, u.c.use_no, u.c.presented_by, u.c.revenue,
               u.c.flag, u.c.reason, u.c.staff, line.c.amount, line.c.run_id.label("clearing_run_id"),
               ClearingRun.service_day.label("run_day"))
    return joined, where, columns, u, line


def _ticket_search(conn: Connection, f: TapFilter, *, tz: str, cutoff_hour: int, limit: int,
                   offset: int) -> TapPage:
    joined, where, columns, u, line = _ticket_parts(f, tz=tz, cutoff_hour=cutoff_hour)
    total, fares, amount = conn.execute(select(
        func.count(), func.coalesce(func.sum(case((u.c.revenue.is_(True), 1), else_=0)), 0),
        func.coalesce(func.sum(line.c.amount), 0)).select_from(joined).where(*where)).one()
    rows = []
    for r in conn.execute(select(*columns).select_from(joined).where(*where)
                          .order_by(u.c.occurred_at, u.c.id).limit(limit).offset(offset)):
        occurred, received = _utc(r.occurred_at), _utc(r.received_at)
        day = service_day_of(occurred, tz, cutoff_hour)
        run_day = r.run_day if r.run_day is None or isinstance(r.run_day, date) else date.fromisoformat(
            str(r.run_day)[:10])
        outcome = ("flagged" if not r.revenue else "waiting" if r.clearing_run_id is None
                   else "late" if run_day > day else "cleared")
        rows.append({
            "id": f"u{r.id}", "device_id": r.device_id, "epoch": r.epoch,
            "device_seq": "" if r.device_seq is None else int(r.device_seq), "kind": TICKET,
            "occurred_at": occurred, "received_at": received, "route": r.route, "vehicle": r.vehicle,
            "driver": r.driver or r.staff, "shift_no": int(r.shift_no or 0), "card_asn": "", "card_type": 0,
            "ticket_id": int(r.ticket_id), "use_no": r.use_no, "presented_by": r.presented_by,
            "amount": int(r.amount or 0), "balance_after": 0, "terminal_id": "", "terminal_seq": 0,
            "reason": r.reason or "", "flag": r.flag, "flag_label": FLAGS.get(r.flag) if r.flag else None,
            "clearing_run_id": None if r.clearing_run_id is None else int(r.clearing_run_id), "run_day": run_day,
            "service_day": day, "outcome": outcome,
            "upload_delay_min": int((received - occurred).total_seconds() // 60)})
    return TapPage(rows, int(total), int(fares), int(amount), limit, offset)


def export(conn: Connection, f: TapFilter, *, tz: str, cutoff_hour: int) -> TapPage:
    """Every record ``f`` selects (all pages), oldest first, with the same totals; ValueError beyond
    ``MAX_EXPORT`` records."""
    first = search(conn, f, tz=tz, cutoff_hour=cutoff_hour, limit=1, offset=0)
    if first.total > MAX_EXPORT:
        raise ValueError(f"{first.total} records match: an export holds at most {MAX_EXPORT}; narrow the range or "
                         "the filters")
    return search(conn, f, tz=tz, cutoff_hour=cutoff_hour, limit=max(first.total, 1), offset=0)


def latest_day_with_data(conn: Connection, *, operator: str, tz: str, cutoff_hour: int,
                         now: datetime) -> date | None:
    """The latest service day, up to the one ``now`` is in, that has any stored record of the operator (a clock
    that ran ahead does not open the pages on a future day); None when there are none."""
    today = service_day_of(now, tz, cutoff_hour)
    end = day_bounds(today, tz, cutoff_hour)[1]
    last = conn.execute(select(func.max(Tap.occurred_at)).where(Tap.operator == operator,
                                                                Tap.occurred_at < end)).scalar()
    return None if last is None else service_day_of(last, tz, cutoff_hour)

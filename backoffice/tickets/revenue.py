"""Ticket revenue in the books: the operator's rule for each product, and the ledger a clearing run writes as it
recognises ticket revenue (rules: ``clearing.tickets``). Runs inside the caller's transaction, commits nothing.

``recognise`` is called by ``backoffice.clearing_runs`` for each new run, right after the run claimed its taps: it
claims, for the run, every counting ticket use of the operator that no run has taken, of the run's day or an
earlier one, received before the run's moment (the same rule as ``claim_taps``: a late use goes to the next run),
every spread pass's day up to the run's day, every refund to take back and every ticket whose validity ended by the
day's end with money left (breakage). Each becomes one ledger line with a unique ``ref`` (``use:<id>``,
``day:<ticket>:<date>``, ``breakage:<ticket>``, ``breakage-back:<use id>``, ``refund:<ticket>``), so nothing is
recognised twice, and the run's ticket rows are summed from its lines (``run_rows``), also when a run is cleared
again to check it.

Figures for reports: ``sales`` (tickets sold and refunded in a service day, by product and channel),
``outstanding`` (sold, not yet recognised: the deferred balance, by product, as of a run).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
from sqlalchemy import (BigInteger, CheckConstraint, Column, Connection, Date, DateTime, ForeignKey, Integer, String,
                        Table, case, func, inspect, select)

from backoffice.models import Base, Product, Ticket, TicketOrder
from backoffice.tickets.orders import service_day_of
from backoffice.tickets.uses import ticket_use
from clearing.service_day import day_bounds
from clearing.tickets import LEDGER_COLUMNS, PASS_KINDS, RULES, default_rule, share, ticket_rows, use_value

BigId = BigInteger().with_variant(Integer, "sqlite")

revenue_rule = Table(
    "ticket_revenue_rule", Base.metadata,
    Column("product_id", BigInteger, ForeignKey("product.id"), primary_key=True, autoincrement=False),
    Column("rule", String(16), nullable=False),
    Column("ride_value_fen", BigInteger, nullable=False, server_default="0"),
    Column("set_by", String(64), nullable=False, server_default=""),
    Column("set_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("rule IN ('per_ride', 'spread')", name="ck_ticket_revenue_rule"),
    CheckConstraint("ride_value_fen >= 0", name="ck_ticket_revenue_ride_value"),
)

ledger = Table(
    "ticket_revenue", Base.metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", BigInteger, ForeignKey("clearing_run.id"), nullable=False, index=True),
    Column("operator", String(32), nullable=False),
    Column("ref", String(80), nullable=False, unique=True),
    Column("source", String(16), nullable=False),
    Column("ticket_id", BigInteger, nullable=False, index=True),
    Column("use_id", BigInteger, nullable=True),
    Column("for_day", Date, nullable=False),
    Column("route", String(32), nullable=False, server_default=""),
    Column("vehicle", String(32), nullable=False, server_default=""),
    Column("driver", String(32), nullable=False, server_default=""),
    Column("product", String(32), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
)


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# ------------------------------------------------------------------------------------------------- the rule
def set_rule(conn: Connection, *, operator: str, product: str, rule: str, ride_value_fen: int = 0, by: str,
             now: datetime | None = None) -> None:
    """State how a pass's revenue is recognised: ``per_ride`` at ``ride_value_fen`` a use, or ``spread`` over its
    days. Products that are not passes are always recognised at use at the price paid."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if isinstance(ride_value_fen, bool) or not isinstance(ride_value_fen, int) or ride_value_fen < 0:
        raise TypeError(f"ride value must be int fen >= 0, got {ride_value_fen!r}")
    if rule == "per_ride" and ride_value_fen <= 0:
        raise ValueError("a per-ride rule states the value of a ride (more than 0 fen)")
    row = conn.execute(select(Product.id, Product.kind).where(Product.operator == operator,
                                                              Product.code == product)).first()
    if row is None:
        raise LookupError(f"operator {operator!r} has no product {product!r}")
    if row.kind not in PASS_KINDS:
        raise ValueError(f"{product} is a {row.kind}: only passes take a rule; it is recognised at use")
    now = _utc(now) if now else datetime.now(UTC)
    conn.execute(revenue_rule.delete().where(revenue_rule.c.product_id == row.id))
    conn.execute(revenue_rule.insert().values(product_id=row.id, rule=rule, ride_value_fen=ride_value_fen,
                                              set_by=by[:64], set_at=now))


def rule_of(conn: Connection, *, operator: str, product: str) -> tuple[str, int]:
    """(rule, ride value in fen) a product follows: at_use, per_ride or spread."""
    row = conn.execute(select(Product.kind, revenue_rule.c.rule, revenue_rule.c.ride_value_fen)
                       .select_from(Product).outerjoin(revenue_rule, revenue_rule.c.product_id == Product.id)
                       .where(Product.operator == operator, Product.code == product)).first()
    if row is None:
        raise LookupError(f"operator {operator!r} has no product {product!r}")
    return _rule(row.kind, row.rule), int(row.ride_value_fen or 0)


def _rule(kind: str, stated: str | None) -> str:
    return stated if (stated and kind in PASS_KINDS) else default_rule(kind)


# ------------------------------------------------------------------------------------------------ recognise
def _ticket_columns():
    return (Ticket.ticket_id, Ticket.kind, Ticket.price_fen, Ticket.uses_allowed, Ticket.valid_from,
            Ticket.valid_to, Product.code.label("product"), TicketOrder.channel, revenue_rule.c.rule,
            revenue_rule.c.ride_value_fen)


def _ticket_joins(query):
    return (query.join(Product, Product.id == Ticket.product_id)
            .join(TicketOrder, TicketOrder.order_id == Ticket.order_id)
            .outerjoin(revenue_rule, revenue_rule.c.product_id == Ticket.product_id))


def _recognised(conn: Connection, ticket_ids) -> dict[int, tuple[int, int]]:
    """ticket -> (all lines' sum, breakage lines' sum) of what the ledger holds."""
    ids = sorted(set(ticket_ids))
    out: dict[int, tuple[int, int]] = {}
    for i in range(0, len(ids), 500):
        for r in conn.execute(select(ledger.c.ticket_id, func.sum(ledger.c.amount),
                                     func.sum(case((ledger.c.source == "breakage", ledger.c.amount), else_=0)))
                              .where(ledger.c.ticket_id.in_(ids[i:i + 500])).group_by(ledger.c.ticket_id)):
            out[int(r[0])] = (int(r[1] or 0), int(r[2] or 0))
    return out


def _line(ref: str, source: str, t, for_day: date, amount: int, *, use_id=None, route="", vehicle="",
          driver="") -> dict:
    return dict(ref=ref, source=source, ticket_id=int(t.ticket_id), use_id=use_id, for_day=for_day,
                route=route[:32], vehicle=vehicle[:32], driver=driver[:32], product=t.product, channel=t.channel,
                amount=int(amount))


def _claim_uses(conn: Connection, window, end: datetime) -> list[dict]:
    taken = select(ledger.c.use_id).where(ledger.c.use_id.is_not(None), ledger.c.operator == window.operator)
    query = _ticket_joins(select(ticket_use.c.id, ticket_use.c.use_no, ticket_use.c.route, ticket_use.c.vehicle,
                                 ticket_use.c.driver, ticket_use.c.occurred_at, *_ticket_columns())
                          .select_from(ticket_use).join(Ticket, Ticket.ticket_id == ticket_use.c.ticket_id)) \
        .where(ticket_use.c.operator == window.operator, ticket_use.c.revenue.is_(True),
               ticket_use.c.use_no.is_not(None), ticket_use.c.occurred_at < end,
               ticket_use.c.received_at < window.as_of, ticket_use.c.id.not_in(taken)) \
        .order_by(ticket_use.c.id)
    uses = conn.execute(query).all()
    before = _recognised(conn, [u.ticket_id for u in uses])
    lines = []
    for u in uses:
        for_day = service_day_of(_utc(u.occurred_at), window.tz, window.cutoff_hour)
        value = use_value(rule=_rule(u.kind, u.rule), price=int(u.price_fen), uses_allowed=int(u.uses_allowed),
                          use_no=int(u.use_no), ride_value=int(u.ride_value_fen or 0))
        lines.append(_line(f"use:{u.id}", "use", u, for_day, value, use_id=int(u.id), route=u.route,
                           vehicle=u.vehicle, driver=u.driver))
        total, breakage = before.get(int(u.ticket_id), (0, 0))
        back = min(value, breakage)
        if back > 0:  # a use made in validity that arrived after breakage: its value comes out of breakage
            lines.append(_line(f"breakage-back:{u.id}", "breakage", u, for_day, -back))
            before[int(u.ticket_id)] = (total, breakage - back)
    return lines


def _refunds(conn: Connection, window, end: datetime) -> list[dict]:
    until = min(window.as_of, end)
    rows = conn.execute(_ticket_joins(select(*_ticket_columns(), Ticket.updated_at)).where(
        Ticket.operator == window.operator, Ticket.state == "refunded", Ticket.updated_at < until,
        Ticket.ticket_id.in_(select(ledger.c.ticket_id)),
        Ticket.ticket_id.not_in(select(ledger.c.ticket_id).where(ledger.c.source == "refund")))).all()
    held = _recognised(conn, [r.ticket_id for r in rows])
    return [_line(f"refund:{r.ticket_id}", "refund", r,
                  service_day_of(_utc(r.updated_at), window.tz, window.cutoff_hour), -held[int(r.ticket_id)][0])
            for r in rows if held.get(int(r.ticket_id), (0, 0))[0]]


def _open_tickets(conn: Connection, window, end: datetime):
    """Tickets with money not yet recognised that a run may recognise days or breakage of."""
    sums = (select(ledger.c.ticket_id, func.sum(ledger.c.amount).label("held"),
                   func.sum(case((ledger.c.source == "breakage", 1), else_=0)).label("broken"))
            .group_by(ledger.c.ticket_id).subquery())
    query = _ticket_joins(select(*_ticket_columns(), func.coalesce(sums.c.held, 0).label("held"))
                          .select_from(Ticket).outerjoin(sums, sums.c.ticket_id == Ticket.ticket_id)) \
        .where(Ticket.operator == window.operator, Ticket.state != "refunded", Ticket.issued_at < window.as_of,
               Ticket.valid_from < end, func.coalesce(sums.c.held, 0) < Ticket.price_fen,
               func.coalesce(sums.c.broken, 0) == 0)
    return conn.execute(query).all()


def _validity_days(t, window) -> tuple[date, date]:
    first = service_day_of(_utc(t.valid_from), window.tz, window.cutoff_hour)
    last = service_day_of(_utc(t.valid_to) - timedelta(microseconds=1), window.tz, window.cutoff_hour)
    return first, last


def _days_and_breakage(conn: Connection, window, end: datetime, pending: list[dict]) -> list[dict]:
    tickets = _open_tickets(conn, window, end)
    spread = [t for t in tickets if _rule(t.kind, t.rule) == "spread"]
    done = set()
    ids = [int(t.ticket_id) for t in spread]
    for i in range(0, len(ids), 500):
        done.update(conn.execute(select(ledger.c.ref).where(ledger.c.source == "pass_day",
                                                            ledger.c.ticket_id.in_(ids[i:i + 500]))).scalars())
    lines = []
    added: dict[int, int] = {}
    for line in pending:
        added[line["ticket_id"]] = added.get(line["ticket_id"], 0) + line["amount"]
    for t in spread:
        first, last = _validity_days(t, window)
        n = (last - first).days + 1
        for i in range(n):
            d = first + timedelta(days=i)
            if d > window.day:
                break
            ref = f"day:{t.ticket_id}:{d.isoformat()}"
            if ref not in done:
                amount = share(int(t.price_fen), n, i)
                lines.append(_line(ref, "pass_day", t, d, amount))
                added[int(t.ticket_id)] = added.get(int(t.ticket_id), 0) + amount
    for t in tickets:
        if _utc(t.valid_to) > end:
            continue
        left = int(t.price_fen) - int(t.held) - added.get(int(t.ticket_id), 0)
        if left > 0:
            lines.append(_line(f"breakage:{t.ticket_id}", "breakage", t, _validity_days(t, window)[1], left))
    return lines


def _in_use(conn: Connection) -> bool:
    """Whether this database has the ticket tables (a database before revisions 0021 and 0024 clears cards only)."""
    names = ("ticket_revenue", "ticket_use")
    return all(inspect(conn).has_table(n) for n in names)


def recognise(conn: Connection, *, run_id: int, window) -> pd.DataFrame:
    """Recognise for run ``run_id`` (``window``: its ``clearing.runs.ClearingWindow``) the ticket revenue no run
    has taken; returns the lines stored (``LEDGER_COLUMNS``). See the module doc and ``clearing.tickets``."""
    if not _in_use(conn):
        return _frame([])
    end = day_bounds(window.day, window.tz, window.cutoff_hour)[1]
    lines = _claim_uses(conn, window, end)
    lines += _refunds(conn, window, end)
    lines += _days_and_breakage(conn, window, end, lines)
    if lines:
        conn.execute(ledger.insert(), [dict(line, run_id=run_id, operator=window.operator) for line in lines])
    return _frame(lines)


def _frame(lines) -> pd.DataFrame:
    frame = pd.DataFrame(list(lines), columns=list(LEDGER_COLUMNS) + ["ref"]) if lines else \
        pd.DataFrame(columns=list(LEDGER_COLUMNS) + ["ref"])
    frame["amount"] = frame["amount"].astype("int64")
    return frame[list(LEDGER_COLUMNS)]


def run_lines(conn: Connection, run_id: int) -> pd.DataFrame:
    """The ledger lines run ``run_id`` recognised (``LEDGER_COLUMNS``)."""
    if not _in_use(conn):
        return _frame([])
    rows = conn.execute(select(*[ledger.c[c] for c in LEDGER_COLUMNS], ledger.c.ref)
                        .where(ledger.c.run_id == run_id).order_by(ledger.c.id)).mappings().all()
    return _frame([dict(r) for r in rows])


def changed_uses(conn: Connection, run_id: int, window) -> list[str]:
    """The run's use lines whose stored use (or ticket, or rule) no longer gives the same line: each as a short
    text; [] when every line still stands. Clearing a closed day again asks this beside summing its lines."""
    if not _in_use(conn):
        return []
    query = _ticket_joins(select(ledger.c.ref, ledger.c.amount, ledger.c.route.label("l_route"),
                                 ledger.c.vehicle.label("l_vehicle"), ledger.c.driver.label("l_driver"),
                                 ledger.c.for_day, ticket_use.c.use_no, ticket_use.c.revenue, ticket_use.c.route,
                                 ticket_use.c.vehicle, ticket_use.c.driver, ticket_use.c.occurred_at,
                                 *_ticket_columns())
                          .select_from(ledger).join(ticket_use, ticket_use.c.id == ledger.c.use_id)
                          .join(Ticket, Ticket.ticket_id == ledger.c.ticket_id)) \
        .where(ledger.c.run_id == run_id, ledger.c.source == "use")
    out = []
    for r in conn.execute(query):
        want = (0 if not r.revenue or r.use_no is None else
                use_value(rule=_rule(r.kind, r.rule), price=int(r.price_fen), uses_allowed=int(r.uses_allowed),
                          use_no=int(r.use_no), ride_value=int(r.ride_value_fen or 0)),
                r.route[:32], r.vehicle[:32], r.driver[:32],
                service_day_of(_utc(r.occurred_at), window.tz, window.cutoff_hour))
        have = (int(r.amount), r.l_route, r.l_vehicle, r.l_driver, r.for_day if isinstance(r.for_day, date)
                else date.fromisoformat(str(r.for_day)[:10]))
        if have != want:
            out.append(f"{r.ref}: stored {have}, now {want}")
    return out


def run_rows(conn: Connection, run_id: int, window) -> list[tuple]:
    """The run's ticket rows (``clearing.tickets.ticket_rows``) summed from its stored lines."""
    return ticket_rows(run_lines(conn, run_id), window.operator, window.day)


# ------------------------------------------------------------------------------------------------ figures
SALES_COLUMNS = ("product", "channel", "tickets", "gross", "refunded_tickets", "refunded", "net")


def sales(conn: Connection, *, operator: str, day: date, tz: str, cutoff_hour: int,
          last_day: date | None = None) -> pd.DataFrame:
    """Tickets sold (issued) in service ``day`` (to ``last_day``, inclusive) and tickets refunded in it, by product
    and channel, in fen."""
    start, end = day_bounds(day, tz, cutoff_hour)[0], day_bounds(last_day or day, tz, cutoff_hour)[1]
    base = _ticket_joins(select(Product.code.label("product"), TicketOrder.channel, func.count().label("n"),
                                func.sum(Ticket.price_fen).label("fen")).select_from(Ticket)) \
        .where(Ticket.operator == operator).group_by(Product.code, TicketOrder.channel)
    sold = conn.execute(base.where(Ticket.issued_at >= start, Ticket.issued_at < end)).all()
    back = conn.execute(base.where(Ticket.state == "refunded", Ticket.updated_at >= start,
                                   Ticket.updated_at < end)).all()
    table: dict[tuple[str, str], list[int]] = {}
    for r in sold:
        table.setdefault((r.product, r.channel), [0, 0, 0, 0])[0:2] = [int(r.n), int(r.fen)]
    for r in back:
        table.setdefault((r.product, r.channel), [0, 0, 0, 0])[2:4] = [int(r.n), int(r.fen)]
    rows = [(p, c, v[0], v[1], v[2], v[3], v[1] - v[3]) for (p, c), v in sorted(table.items())]
    frame = pd.DataFrame(rows, columns=list(SALES_COLUMNS))
    for col in SALES_COLUMNS[2:]:
        frame[col] = frame[col].astype("int64")
    return frame


OUTSTANDING_COLUMNS = ("product", "tickets", "sold", "refunded", "recognised", "deferred")


def outstanding(conn: Connection, *, operator: str, run_id: int, as_of: datetime) -> pd.DataFrame:
    """The deferred balance by product after run ``run_id`` (its moment ``as_of``): tickets issued before it,
    sold less refunded less recognised by that run and the runs before it, in fen."""
    as_of = _utc(as_of)
    tickets = conn.execute(_ticket_joins(select(Product.code.label("product"), Ticket.ticket_id, Ticket.price_fen,
                                                Ticket.state, Ticket.updated_at).select_from(Ticket))
                           .where(Ticket.operator == operator, Ticket.issued_at < as_of)).all()
    lines = conn.execute(select(ledger.c.product, func.sum(ledger.c.amount))
                         .where(ledger.c.operator == operator, ledger.c.run_id <= run_id)
                         .group_by(ledger.c.product)).all()
    table: dict[str, list[int]] = {}
    for t in tickets:
        row = table.setdefault(t.product, [0, 0, 0, 0])
        row[0] += 1
        row[1] += int(t.price_fen)
        if t.state == "refunded" and _utc(t.updated_at) < as_of:
            row[2] += int(t.price_fen)
    for product, fen in lines:
        table.setdefault(product, [0, 0, 0, 0])[3] += int(fen or 0)
    rows = [(p, v[0], v[1], v[2], v[3], v[1] - v[2] - v[3]) for p, v in sorted(table.items())]
    frame = pd.DataFrame(rows, columns=list(OUTSTANDING_COLUMNS))
    for col in OUTSTANDING_COLUMNS[1:]:
        frame[col] = frame[col].astype("int64")
    return frame


def run_moment(conn: Connection, run_id: int) -> datetime:
    from backoffice.models import ClearingRun

    return _utc(conn.execute(select(ClearingRun.as_of).where(ClearingRun.id == run_id)).scalar_one())


__all__ = ["set_rule", "rule_of", "recognise", "run_lines", "run_rows", "sales", "outstanding", "ledger",
           "revenue_rule"]

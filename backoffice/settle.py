"""Settle a service day (or a month) and write its reports: the use case behind `farebox settle`, the nightly job,
the demo and the clerk's pages.

A day that has ended is settled from its clearing run (``backoffice.clearing_runs.clear_day``): the run is stored in
the caller's transaction (commit it: ``with engine.begin() as conn``), the shifts of the day are reconciled, and the
reports name the run. Asked again, the stored run is re-cleared and checked, never replaced. A day still running, or
an operator with no card-issuer commission rate, gets provisional figures (gross only, nothing stored, the reports
say "provisional"), so that a clerk can look at today without closing it. ``close_day=False`` never writes: the
stored run if there is one, else the provisional figures.

Reports (when ``reports_dir`` is given): ``settlement-<operator>-<day>.pdf`` (reports.daily), the same tables as
``settlement-<operator>-<day>-by_route.csv`` etc. and ``settlement-<operator>-<day>.xlsx`` beside it.
Besides the day's own taps, a run carries adjustments for earlier days (late taps, by day and route; a clerk's
reconciliation adjustments, by item): the reports list them (also as ``-adjustments.csv`` when there are any)
and show what is payable: day + adjustments = the run's ``payable_net``. A month's report does the same over
its runs. An operator that sells e-tickets gets a ticket section in a day's reports (``reports.tickets``: revenue
the run recognised by route, vehicle, driver, product, channel and source, earlier days', the day's sales by product
and channel, the deferred balance by product; ``-tickets_by_route.csv`` ... ``-ticket_outstanding.csv``), outside
the card figures and their issuer commission.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
from sqlalchemy import Connection, func, select

from backoffice import clearing_runs, registry
from backoffice.models import ClearingRun as ClearingRunRow
from backoffice.models import Fleet, Operator, ReconItem, Tap, Ticket
from backoffice.tickets import revenue as ticket_revenue
from clearing.runs import NO_FLEET, PURCHASE
from clearing.service_day import day_bounds
from clearing.settlement import Settlement
from epurse.cardtypes import CardType
from reports.daily import write_daily_pdf
from reports.monthly import month_bounds, runs_label, write_monthly_pdf
from reports.settlement_doc import LATE, RECONCILIATION, ClearingRun, Comparison, SettlementTables
from reports.tables import write_settlement_csv, write_settlement_xlsx
from reports.tickets import DIMENSIONS as TICKET_DIMENSIONS
from reports.tickets import TicketTables

log = logging.getLogger(__name__)

TAP_COLUMNS = ["device_id", "epoch", "device_seq", "kind", "occurred_at", "operator", "route", "vehicle", "driver",
               "card_type", "amount"]  # epoch: with device_seq, the tap's key (a replaced journal starts at 1 again)
BREAKDOWNS = ("fleet", "route", "vehicle", "driver")
MONEY = ("taps", "gross", "commission", "net")


@dataclass(frozen=True, eq=False)
class DaySettlement:
    settlement: Settlement  # the day's purchases by route / vehicle / driver / card type (``amount`` = gross, fen)
    pdf: Path | None
    run: clearing_runs.StoredRun | None = None  # None: provisional figures, nothing stored
    files: tuple[Path, ...] = ()  # every report written: the PDF, the CSVs, the XLSX
    shift_items: tuple[int, ...] = ()  # ids of new out-of-balance shift items found when the day was cleared
    provisional: str = ""  # why the figures are provisional ("" when they come from a clearing run)
    # What the reports print, for pages that show the same: by_card_type (card_type, taps, free, gross
    # [, commission, net]), commission_bp (the rate the day was cleared at), previous (the day before's run
    # totals, ``previous.totals`` None when it has no run), names (incl. "card_type"), tz. None only for callers
    # that build a DaySettlement themselves.
    tables: SettlementTables | None = None


@dataclass(frozen=True, eq=False)
class MonthSettlement:
    operator: str
    first_day: date
    last_day: date
    runs: tuple[clearing_runs.StoredRun, ...]  # the stored runs of the month's days, by day
    missing: tuple[date, ...]  # days of the month with no clearing run (not reported)
    tables: SettlementTables  # also: by_card_type, commission_bp, previous (the month before), days_not_cleared
    pdf: Path | None
    files: tuple[Path, ...] = ()


def load_day_taps(conn: Connection, *, operator: str, day: date, tz: str, cutoff_hour: int) -> pd.DataFrame:
    start, end = day_bounds(day, tz, cutoff_hour)
    query = (select(*[getattr(Tap, c) for c in TAP_COLUMNS])
             .where(Tap.operator == operator, Tap.occurred_at >= start, Tap.occurred_at < end))
    frame = pd.DataFrame(conn.execute(query).all(), columns=TAP_COLUMNS)
    # SQLite hands back naive datetimes; everything stored is UTC.
    frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True)
    return frame


def provisional_settlement(conn: Connection, *, operator: str, day: date, tz: str, cutoff_hour: int
                           ) -> tuple[Settlement, dict[int, int]]:
    """The stored purchases of ``day`` summed in the database by route, vehicle, driver and card type (a
    ``Settlement`` as ``clearing.settlement.settle_day`` gives it, with no run), and the free rides by card type.
    The tap table's unique key already keeps a record once, so nothing is deduplicated here."""
    start, end = day_bounds(day, tz, cutoff_hour)
    where = (Tap.operator == operator, Tap.kind == PURCHASE, Tap.occurred_at >= start, Tap.occurred_at < end)
    tables = {}
    for key, col in (("route", Tap.route), ("vehicle", Tap.vehicle), ("driver", Tap.driver),
                     ("card_type", Tap.card_type)):
        rows = conn.execute(select(col, func.count(), func.coalesce(func.sum(Tap.amount), 0)).where(*where)
                            .group_by(col)).all()
        keys = [int(k) if key == "card_type" else ("" if k is None else str(k)) for k, _n, _g in rows]
        frame = pd.DataFrame({key: pd.Series(keys, dtype="int64" if key == "card_type" else "str"),
                              "taps": pd.Series([int(n) for _k, n, _g in rows], dtype="int64"),
                              "amount": pd.Series([int(g) for _k, _n, g in rows], dtype="int64")})
        tables[key] = frame.sort_values(key, kind="stable").reset_index(drop=True)
    free = {int(ct): int(n) for ct, n in conn.execute(
        select(Tap.card_type, func.count()).where(*where, Tap.amount == 0).group_by(Tap.card_type))}
    cards = tables["card_type"]
    return Settlement(operator=operator, day=day, by_route=tables["route"], by_vehicle=tables["vehicle"],
                      by_driver=tables["driver"], by_card_type=cards, taps=int(cards["taps"].sum()),
                      amount=int(cards["amount"].sum())), free


def _operator(conn: Connection, operator: str):
    op = conn.execute(select(Operator.name, Operator.timezone, Operator.cutoff_hour)
                      .where(Operator.code == operator)).first()
    if op is None:
        raise LookupError(f"operator {operator!r} is not registered: add it with `farebox registry add-operator`")
    return op


def stored_run_id(conn: Connection, operator: str, day: date) -> int | None:
    return conn.execute(select(ClearingRunRow.id).where(ClearingRunRow.operator == operator,
                                                        ClearingRunRow.service_day == day)).scalar()


def _as_settlement(run: clearing_runs.StoredRun) -> Settlement:
    """The run's day section in the shape callers of the old settlement know: key, taps, amount (gross)."""
    tables = {}
    for dim in ("route", "vehicle", "driver", "card_type"):
        frame = run.table(dim)[[dim, "taps", "gross"]].rename(columns={"gross": "amount"})
        if dim == "card_type":
            frame[dim] = frame[dim].astype("int64")
        tables[dim] = frame.sort_values(dim, kind="stable").reset_index(drop=True)
    return Settlement(operator=run.operator, day=run.day, by_route=tables["route"], by_vehicle=tables["vehicle"],
                      by_driver=tables["driver"], by_card_type=tables["card_type"],
                      taps=int(run.totals["day_taps"]), amount=int(run.totals["day_gross"]))


def _taps_by_hour(conn: Connection, *, operator: str, first: date, last: date, tz: str, cutoff_hour: int,
                  run_id: int | None) -> pd.DataFrame:
    """Purchases by local hour of the day, as the run counted them (the day's taps it claimed); every stored one
    of the day when there is no run yet (provisional)."""
    start, end = day_bounds(first, tz, cutoff_hour)[0], day_bounds(last, tz, cutoff_hour)[1]
    t = (Tap.__table__ if run_id is None else
         clearing_runs.run_taps(conn, run_id, "operator", "kind", "occurred_at"))
    # Counted in the database by UTC minute (a minute lies inside one local hour in every zone), then the few
    # hundred minutes are put in their local hours here: no tap crosses into Python as an object.
    if conn.dialect.name == "postgresql":
        minute = func.date_trunc("minute", t.c.occurred_at)
    else:
        minute = func.strftime("%Y-%m-%d %H:%M:00", t.c.occurred_at)
    query = (select(minute.label("minute"), func.count()).select_from(t)
             .where(t.c.operator == operator, t.c.kind == PURCHASE, t.c.occurred_at >= start, t.c.occurred_at < end)
             .group_by(minute))
    counts = [0] * 24
    zone = ZoneInfo(tz)
    for at, n in conn.execute(query):
        at = datetime.fromisoformat(at) if isinstance(at, str) else at
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        counts[at.astimezone(zone).hour] += int(n)
    return pd.DataFrame({"hour": range(24), "taps": counts}, dtype="int64")


CARD_TYPE_NAMES = {int(t): f"{t.label_zh} {t.label}" for t in CardType}  # reports get names, not the card app


def _names(conn: Connection, operator: str, at=None) -> dict[str, dict]:
    """Names as they were at ``at`` (the period's start), so last month's report prints last month's names."""
    names = registry.names(conn, operator, at=at)
    names["fleet"] = dict(conn.execute(select(Fleet.code, Fleet.name).where(Fleet.operator == operator)).all())
    names["fleet"][NO_FLEET] = "不属车队 not in a fleet"  # a vehicle no fleet claims is still counted, under ""
    names["card_type"] = dict(CARD_TYPE_NAMES)
    return names


def _free_rides(conn: Connection, run: clearing_runs.StoredRun, tz: str, cutoff_hour: int) -> dict[int, int]:
    """Purchases of the run's own day that paid nothing (free concession rides), by card type: a count over the
    taps the run claimed, so that it sits inside the run's card-type rows."""
    start, end = day_bounds(run.day, tz, cutoff_hour)
    t = clearing_runs.run_taps(conn, run.id, "card_type", "kind", "amount", "occurred_at")
    rows = conn.execute(select(t.c.card_type, func.count()).where(
        t.c.kind == PURCHASE, t.c.amount == 0, t.c.occurred_at >= start, t.c.occurred_at < end)
        .group_by(t.c.card_type))
    return {int(ct): int(n) for ct, n in rows}


def _card_types(frame: pd.DataFrame, free: dict[int, int]) -> pd.DataFrame:
    """A run's (or the runs' summed) card-type rows with their free rides: card_type as an integer."""
    out = frame.copy()
    out["card_type"] = out["card_type"].astype("int64")
    out.insert(2, "free", pd.Series([free.get(int(c), 0) for c in out["card_type"].tolist()], dtype="int64"))
    return out.sort_values("card_type", kind="stable").reset_index(drop=True)


def _run_rates(conn: Connection, run_ids: list[int]) -> tuple[int, ...]:
    """The commission rates the runs were cleared at, in day order, each once."""
    if not run_ids:
        return ()
    rates = conn.execute(select(ClearingRunRow.rate_bp).where(ClearingRunRow.id.in_(run_ids))
                         .order_by(ClearingRunRow.service_day)).scalars().all()
    return tuple(dict.fromkeys(int(r) for r in rates))


def _stored_totals(conn: Connection, operator: str, first: date, last: date) -> dict[str, int] | None:
    """The days' own totals (taps, gross, commission, net) summed over the stored runs of ``first``..``last``;
    None when none of those days has a run."""
    rows = conn.execute(select(ClearingRunRow.day_taps, ClearingRunRow.day_gross, ClearingRunRow.day_commission,
                               ClearingRunRow.day_net).where(
        ClearingRunRow.operator == operator, ClearingRunRow.service_day >= first,
        ClearingRunRow.service_day <= last)).all()
    if not rows:
        return None
    return {c: sum(int(r[i]) for r in rows) for i, c in enumerate(MONEY)}


def _breakdown(run: clearing_runs.StoredRun, dim: str) -> pd.DataFrame:
    frame = run.table(dim)
    return frame[[dim, *MONEY]].sort_values(dim, kind="stable").reset_index(drop=True)


def _adjustments(conn: Connection, runs: list[clearing_runs.StoredRun]) -> pd.DataFrame:
    """What the runs carry for earlier days, for the reports: late taps by (for_day, route) and reconciliation
    adjustments by item (named by the item's kind and problem), summed over the runs; late taps first, then by
    day and key."""
    parts = []
    for run in runs:
        late = run.table("route", "late").rename(columns={"route": "key"}).assign(kind=LATE)
        items = (run.table("item", "reconciliation").rename(columns={"item": "key"})
                 .assign(kind=RECONCILIATION))
        parts += [f for f in (late, items) if not f.empty]
    columns = ["kind", "for_day", "key", "name", *MONEY]
    if not parts:
        return pd.DataFrame({"kind": pd.Series([], dtype="str"), "for_day": pd.Series([], dtype="object"),
                             "key": pd.Series([], dtype="str"), "name": pd.Series([], dtype="str"),
                             **{c: pd.Series([], dtype="int64") for c in MONEY}})[columns]
    out = (pd.concat(parts).groupby(["kind", "for_day", "key"], sort=False, dropna=False)[list(MONEY)].sum()
           .reset_index().astype({c: "int64" for c in MONEY}))
    ids = [int(k) for k in out.loc[out["kind"] == RECONCILIATION, "key"]]
    described = {}
    if ids:
        described = {str(r.id): f"{r.kind} {r.problem}".replace("_", " ") for r in conn.execute(
            select(ReconItem.id, ReconItem.kind, ReconItem.problem).where(ReconItem.id.in_(ids)))}
    out["name"] = [described.get(k, "") if kind == RECONCILIATION else ""
                   for kind, k in zip(out["kind"], out["key"], strict=True)]
    order = [(0 if kind == LATE else 1, day, int(k) if kind == RECONCILIATION else 0, k)
             for kind, day, k in zip(out["kind"], out["for_day"], out["key"], strict=True)]
    out = out.iloc[sorted(range(len(out)), key=order.__getitem__)].reset_index(drop=True)
    return out[columns]


def ticket_tables(conn: Connection, runs: list[clearing_runs.StoredRun], tz: str, cutoff_hour: int
                  ) -> TicketTables | None:
    """The runs' e-ticket figures for the reports (``reports.tickets``): what they recognised for their own days
    (summed by key) and for earlier days, the sales of their days, the deferred balance after the last of them;
    None when the operator had sold no ticket by then and the runs recognised nothing."""
    if not runs:
        return None
    last = max(runs, key=lambda r: r.day)
    sections = set().union(*(set(r.rows["section"]) for r in runs))
    if "ticket" not in sections and "ticket_late" not in sections and not conn.execute(
            select(func.count()).select_from(Ticket).where(Ticket.operator == last.operator,
                                                           Ticket.issued_at < last.as_of)).scalar():
        return None
    by = {}
    for dim in TICKET_DIMENSIONS:
        frame = pd.concat([r.table(dim, "ticket")[[dim, "taps", "gross"]] for r in runs], ignore_index=True)
        frame = frame.groupby(dim, sort=True)[["taps", "gross"]].sum().reset_index() if len(frame) else frame
        by[dim] = frame.astype({"taps": "int64", "gross": "int64"}).reset_index(drop=True)
    late = pd.concat([r.table("source", "ticket_late")[["for_day", "source", "taps", "gross"]] for r in runs],
                     ignore_index=True)
    if len(late):
        late = late.groupby(["for_day", "source"], sort=True)[["taps", "gross"]].sum().reset_index()
    first = min(r.day for r in runs)
    return TicketTables(
        by=by, late=late.astype({"taps": "int64", "gross": "int64"}).reset_index(drop=True),
        sales=ticket_revenue.sales(conn, operator=last.operator, day=first, last_day=last.day, tz=tz,
                                   cutoff_hour=cutoff_hour),
        outstanding=ticket_revenue.outstanding(conn, operator=last.operator, run_id=last.id, as_of=last.as_of))


def _provisional_table(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    return frame[[key, "taps", "amount"]].rename(columns={"amount": "gross"}).reset_index(drop=True)


# The PDF is for reading: a city's 10,000 vehicles and 15,000 drivers one by one are ~500 pages that nobody reads
# and that take longer to typeset than the day takes to clear. Past PDF_ROWS keys, the PDF lists the PDF_ROWS
# biggest by gross (in key order) and one row summing all the others, so its totals are still the day's; the CSV
# and the XLSX keep every key.
PDF_ROWS = 100
_REST = {"vehicle": ("辆车", "vehicles"), "driver": ("名司机", "drivers")}


def _pdf_tables(tables: SettlementTables) -> SettlementTables:
    changes = {}
    for key, (zh, en) in _REST.items():
        frame = getattr(tables, f"by_{key}")
        if frame is None or len(frame) <= PDF_ROWS:
            continue
        money = [c for c in frame.columns if c != key]
        top = frame.nlargest(PDF_ROWS, "gross", keep="first").sort_values(key, kind="stable")
        rest = frame.drop(index=top.index)
        names = tables.names.get(key) or {}
        note = (f"其余 {len(rest):,} {zh} the other {len(rest):,} {en} (each in the CSV and XLSX)")
        tail = pd.DataFrame({key: ["…"], "name": [note], **{c: [int(rest[c].sum())] for c in money}})
        shown = top.assign(name=[str(names.get(k, "")) for k in top[key].tolist()])
        out = pd.concat([shown, tail], ignore_index=True)[[key, "name", *money]]
        changes[f"by_{key}"] = out.astype({c: "int64" for c in money})
    return replace(tables, **changes) if changes else tables


def _write(tables: SettlementTables, reports_dir: Path, stem: str, writer, cutoff_hour: int) -> tuple[Path, ...]:
    reports_dir = Path(reports_dir)
    pdf = writer(_pdf_tables(tables), reports_dir / f"{stem}.pdf", cutoff_hour=cutoff_hour)
    csvs = write_settlement_csv(tables, reports_dir, stem=stem)
    xlsx = write_settlement_xlsx(tables, reports_dir / f"{stem}.xlsx")
    return (pdf, *csvs, xlsx)


def settle(conn: Connection, *, operator: str, day: date, reports_dir: Path | None = None,
           now: datetime | None = None, close_day: bool = True) -> DaySettlement:
    """Settle ``operator``'s service ``day`` as of ``now`` (default: the current time); see the module doc."""
    now = now or datetime.now(UTC)
    op = _operator(conn, operator)
    day_end = day_bounds(day, op.timezone, op.cutoff_hour)[1]
    run, items, why = None, (), ""
    run_id = stored_run_id(conn, operator, day)
    can_clear = now >= day_end and clearing_runs.rate_on(conn, operator, day) is not None
    if close_day and (run_id is not None or can_clear):
        # clear_day stores a new run (catching up skipped days first) or re-clears the stored one and checks it.
        new = run_id is None
        run = clearing_runs.clear_day(conn, operator=operator, day=day, now=now)
        if new:
            _totals, ids = clearing_runs.reconcile_shifts_day(conn, operator=operator, day=day, now=now)
            items = tuple(ids)
    elif run_id is not None:
        run = clearing_runs.get_run(conn, run_id)
    elif now < day_end:
        why = f"service day {day} is still running (it ends {day_end.isoformat()})"
    elif close_day:
        why = (f"operator {operator} has no card-issuer commission rate for {day}: set one with "
               "`farebox registry set-commission` to clear the day")
    else:
        why = f"service day {day} has no clearing run yet"

    before = day - timedelta(days=1)
    previous = Comparison(("前一日", "previous day"), before, before, _stored_totals(conn, operator, before, before))
    if run is not None:
        settlement = _as_settlement(run)
        tables = SettlementTables(
            operator=operator, operator_name=op.name, first_day=day, last_day=day,
            by_route=_breakdown(run, "route"), by_vehicle=_breakdown(run, "vehicle"),
            by_driver=_breakdown(run, "driver"), by_fleet=_breakdown(run, "fleet"),
            taps_by_hour=None, run=ClearingRun(str(run.id), run.created_at), generated_at=now, names={},
            adjustments=_adjustments(conn, [run]),
            by_card_type=_card_types(_breakdown(run, "card_type"), _free_rides(conn, run, op.timezone,
                                                                               op.cutoff_hour)),
            commission_bp=_run_rates(conn, [run.id]),
            tickets=ticket_tables(conn, [run], op.timezone, op.cutoff_hour))
        run_id = run.id
    else:
        settlement, free = provisional_settlement(conn, operator=operator, day=day, tz=op.timezone,
                                                  cutoff_hour=op.cutoff_hour)
        tables = SettlementTables(
            operator=operator, operator_name=op.name, first_day=day, last_day=day,
            by_route=_provisional_table(settlement.by_route, "route"),
            by_vehicle=_provisional_table(settlement.by_vehicle, "vehicle"),
            by_driver=_provisional_table(settlement.by_driver, "driver"),
            by_card_type=_card_types(_provisional_table(settlement.by_card_type, "card_type"), free),
            run=None, generated_at=now, names={}, provisional=why)  # the header then says "no stored run"
        run_id = None
    tables = replace(tables, previous=previous, tz=op.timezone,
                     names=_names(conn, operator, day_bounds(day, op.timezone, op.cutoff_hour)[0]))
    if reports_dir is None:
        return DaySettlement(settlement, None, run, (), items, why, tables)
    hours = _taps_by_hour(conn, operator=operator, first=day, last=day, tz=op.timezone, cutoff_hour=op.cutoff_hour,
                          run_id=run_id)
    tables = replace(tables, taps_by_hour=hours)
    files = _write(tables, Path(reports_dir), f"settlement-{operator}-{day.isoformat()}", write_daily_pdf,
                   op.cutoff_hour)
    return DaySettlement(settlement, files[0], run, files, items, why, tables)


def _sum_over_runs(runs: list[clearing_runs.StoredRun], dim: str) -> pd.DataFrame:
    frames = [run.table(dim) for run in runs]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({dim: pd.Series([], dtype="str"), **{c: pd.Series([], dtype="int64") for c in MONEY}})
    out = pd.concat(frames).groupby(dim, sort=True)[list(MONEY)].sum().reset_index()
    return out.astype({c: "int64" for c in MONEY})


def settle_month(conn: Connection, *, operator: str, year: int, month: int, reports_dir: Path | None = None,
                 now: datetime | None = None) -> MonthSettlement:
    """The month's settlement from the stored runs of its service days (read only: a day with no run is listed in
    ``missing`` and left out, because clearing it now would close it out of order; the nightly job or
    ``farebox settle --day`` clears days). Each row sums the day rows of the runs; commission + net == gross
    holds per row because it holds per day. ``tables.adjustments`` sums what the runs carry for earlier days,
    so the report's payable net is the sum of the runs' ``payable_net``."""
    now = now or datetime.now(UTC)
    op = _operator(conn, operator)
    first, last = month_bounds(year, month)
    start = day_bounds(first, op.timezone, op.cutoff_hour)[0]
    ids = conn.execute(select(ClearingRunRow.id).where(
        ClearingRunRow.operator == operator, ClearingRunRow.service_day >= first,
        ClearingRunRow.service_day <= last).order_by(ClearingRunRow.service_day)).scalars().all()
    runs = [clearing_runs.get_run(conn, i) for i in ids]
    cleared = {r.day for r in runs}
    missing = tuple(date.fromordinal(o) for o in range(first.toordinal(), last.toordinal() + 1)
                    if date.fromordinal(o) not in cleared)
    by_day = pd.DataFrame({"day": [r.day for r in runs],
                           **{c: [int(r.totals[f"day_{c}"]) for r in runs] for c in MONEY}})
    by_day = by_day.astype({c: "int64" for c in MONEY})
    if runs:
        # Which days are cleared and which not is the status line's (``days_not_cleared``), not the run's label.
        label = runs_label(r.id for r in runs)  # "1-2": the PDF's header says "清分批次 Clearing runs 1-2"
        run = ClearingRun(label, max(r.created_at for r in runs))
    else:
        run = ClearingRun("none: no day of the month is cleared", now)
    free: dict[int, int] = {}
    for r in runs:
        for ct, n in _free_rides(conn, r, op.timezone, op.cutoff_hour).items():
            free[ct] = free.get(ct, 0) + n
    prev_last = first - timedelta(days=1)
    prev_first = prev_last.replace(day=1)
    tables = SettlementTables(
        operator=operator, operator_name=op.name, first_day=first, last_day=last,
        by_route=_sum_over_runs(runs, "route"), by_vehicle=_sum_over_runs(runs, "vehicle"),
        by_driver=_sum_over_runs(runs, "driver"), by_fleet=_sum_over_runs(runs, "fleet"), by_day=by_day,
        run=run, generated_at=now, names=_names(conn, operator, start),
        adjustments=_adjustments(conn, runs) if runs else None,
        by_card_type=_card_types(_sum_over_runs(runs, "card_type"), free),
        commission_bp=_run_rates(conn, [r.id for r in runs]),
        previous=Comparison(("上月", "previous month"), prev_first, prev_last,
                            _stored_totals(conn, operator, prev_first, prev_last)),
        tz=op.timezone, days_not_cleared=missing, tickets=ticket_tables(conn, runs, op.timezone, op.cutoff_hour))
    pdf, files = None, ()
    if reports_dir is not None:
        files = _write(tables, Path(reports_dir), f"settlement-{operator}-{first:%Y-%m}", write_monthly_pdf,
                       op.cutoff_hour)
        pdf = files[0]
    return MonthSettlement(operator, first, last, tuple(runs), missing, tables, pdf, files)


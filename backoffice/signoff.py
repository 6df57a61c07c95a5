"""A clerk's sign-off of a service day's settlement, and what the settlement page puts beside the day's figures.

Sign-off (``sign_off``): a clerk approves the stored clearing run of a day, by name and time, after the run is
cleared again from its claimed taps and found the same (``clearing_runs.clear_day`` checks it). The row keeps the
run's fingerprint, its gross and what was payable, so "what exactly was approved" has an answer. From then on the
day is locked: ``clearing_runs.clear_day`` refuses to clear it again (``DayLocked``, raised by ``check_open``).
Nothing of a signed-off day changes afterwards, and nothing needs to: a tap of that day arriving late is claimed by
the next day's run as a late tap (``clearing_runs.claim_taps`` takes every unclaimed tap of the run's day *or an
earlier one*), and a reconciliation adjustment is carried into the next run, so the books still add up: the sum of
all runs' day and late sections is every purchase stored.

Page figures (``comparisons``, ``free_rides``, ``refused``): day-over-day and month-to-date read the stored runs'
totals (no money is computed here, only added up); counts of free rides and refused records come from the taps.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, func, select

from backoffice import clearing_runs
from backoffice.day_lock import SettlementSignoff, SignOff, as_utc, signed_off
from backoffice.models import ClearingRun, Device, Quarantine, Tap
from clearing.service_day import day_bounds

PURCHASE, DENIED = "purchase", "denied"


class SignOffError(ValueError):
    """The day cannot be signed off (no clearing run yet, signed off already, the run is not the one shown)."""


def sign_off(conn: Connection, *, operator: str, day: date, by: str, now: datetime | None = None,
             run_id: int | None = None, note: str = "") -> SignOff:
    """Approve ``operator``'s service ``day``: its stored run is checked again (cleared from its claimed taps and
    compared, ``clearing_runs.ClearingMismatch`` when different) and the approval stored with who and when.
    ``run_id``: the run the clerk was shown; a different stored run is refused. In the caller's transaction."""
    if not by.strip():
        raise SignOffError("say who approves (by=...): a sign-off is signed")
    now = as_utc(now or datetime.now(UTC))
    done = signed_off(conn, operator=operator, day=day)
    if done is not None:
        raise SignOffError(f"{operator} {day} was signed off already by {done.approved_by} at "
                           f"{done.approved_at:%Y-%m-%d %H:%M} UTC (clearing run {done.run_id})")
    stored = conn.execute(select(ClearingRun.id).where(ClearingRun.operator == operator,
                                                       ClearingRun.service_day == day)).scalar()
    if stored is None:
        raise SignOffError(f"{operator} {day} has no clearing run yet: provisional figures are not signed off; "
                           "clear the day first (the nightly job, the settlement page or `farebox settle`)")
    if run_id is not None and int(run_id) != int(stored):
        raise SignOffError(f"{operator} {day}: the page showed clearing run {run_id} but the stored run is "
                           f"{stored}: reload the page and look at the figures again")
    run = clearing_runs.clear_day(conn, operator=operator, day=day, now=now)  # re-cleared and compared
    conn.execute(SettlementSignoff.__table__.insert().values(
        operator=operator, service_day=day, run_id=run.id, fingerprint=run.fingerprint,
        day_gross=int(run.totals["day_gross"]), payable_net=int(run.totals["payable_net"]), approved_by=by[:64],
        approved_at=now, note=note[:500]))
    return signed_off(conn, operator=operator, day=day)


# ------------------------------------------------------------------------------------------------ page figures
MONEY = ("taps", "gross", "commission", "net")


def _run_totals(conn: Connection, operator: str, first: date, last: date) -> tuple[dict, int]:
    """The stored runs' day totals over [first, last] summed, and how many days have a run."""
    cols = [func.coalesce(func.sum(getattr(ClearingRun, f"day_{c}")), 0) for c in MONEY]
    row = conn.execute(select(func.count(), *cols).where(
        ClearingRun.operator == operator, ClearingRun.service_day >= first,
        ClearingRun.service_day <= last)).one()
    return dict(zip(MONEY, (int(v) for v in row[1:]), strict=True)), int(row[0])


def _month_start(day: date) -> date:
    return day.replace(day=1)


def comparisons(conn: Connection, *, operator: str, day: date) -> dict:
    """Day-over-day (the previous day's stored run) and month-to-date (the stored runs of this month up to
    ``day``, beside the same days of the month before), from the runs' own totals."""
    prev_day = day - timedelta(days=1)
    prev, prev_runs = _run_totals(conn, operator, prev_day, prev_day)
    first = _month_start(day)
    mtd, mtd_runs = _run_totals(conn, operator, first, day)
    last_month_first = _month_start(first - timedelta(days=1))
    last_month_end = first - timedelta(days=1)
    same = min(last_month_first + timedelta(days=day.day - 1), last_month_end)
    before, before_runs = _run_totals(conn, operator, last_month_first, same)
    return {"previous_day": prev_day, "previous": prev if prev_runs else None,
            "month_first": first, "month_to_date": mtd, "month_days": (day - first).days + 1, "month_runs": mtd_runs,
            "last_month_first": last_month_first, "last_month_to": same, "last_month": before,
            "last_month_runs": before_runs}


def change(now: int | None, before: int | None) -> tuple[int, str] | None:
    """(difference, percent text) of two figures; None when one is missing."""
    if now is None or before is None:
        return None
    diff = now - before
    if before == 0:
        return diff, "—"
    tenths = (abs(diff) * 1000 + abs(before) // 2) // abs(before)  # integer rounding, no float
    return diff, f"{'-' if diff < 0 else '+'}{tenths // 10}.{tenths % 10}%"


def free_rides(conn: Connection, *, operator: str, day: date, tz: str, cutoff_hour: int,
               run_id: int | None) -> dict[int, int]:
    """Purchases of no money (free concession rides) by card type: the day's taps the run took, or every stored
    one of the day when there is no run yet."""
    start, end = day_bounds(day, tz, cutoff_hour)
    q = (select(Tap.card_type, func.count()).where(Tap.operator == operator, Tap.kind == PURCHASE, Tap.amount == 0,
                                                   Tap.occurred_at >= start, Tap.occurred_at < end)
         .group_by(Tap.card_type))
    if run_id is not None:
        q = q.where(clearing_runs.taken_by(conn, run_id))
    return {int(k): int(n) for k, n in conn.execute(q)}


def refused(conn: Connection, *, operator: str, day: date, tz: str, cutoff_hour: int) -> dict:
    """Taps refused that day: deny-listed cards refused on the bus (by card type), and records the back office
    quarantined (received that day, from the operator's registered validators)."""
    start, end = day_bounds(day, tz, cutoff_hour)
    denied = {int(k): int(n) for k, n in conn.execute(
        select(Tap.card_type, func.count()).where(Tap.operator == operator, Tap.kind == DENIED,
                                                  Tap.occurred_at >= start, Tap.occurred_at < end)
        .group_by(Tap.card_type))}
    quarantined = conn.execute(select(func.count()).select_from(Quarantine).where(
        Quarantine.device_id.in_(select(Device.device_id).where(Device.operator == operator)),
        Quarantine.received_at >= start, Quarantine.received_at < end)).scalar_one()
    return {"denied": denied, "denied_total": sum(denied.values()), "quarantined": int(quarantined)}

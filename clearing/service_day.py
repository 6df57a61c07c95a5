"""The service day: which operating day a moment belongs to.

Taps are stored in UTC, but a bus company counts its money by local operating day, and a bus still running at
01:30 local belongs to the day it set out on. So a service day runs from the cut-off hour (default 03:00) local
time to the same wall-clock hour the next day.

The rule is defined on the local wall clock: take the local time, go back `cutoff_hour` hours on the wall clock,
take the date. `day_bounds` gives the UTC window of exactly those moments, so a query by window and a
`service_day` test on the rows agree, also across daylight-saving changes in zones that have them.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pandas as pd

DEFAULT_TZ = "Asia/Shanghai"
DEFAULT_CUTOFF_HOUR = 3


def _check_cutoff(cutoff_hour: int) -> None:
    if not 0 <= cutoff_hour <= 23:
        raise ValueError(f"cutoff_hour must be 0..23, got {cutoff_hour!r}")


def service_day(ts_utc: pd.Series, tz: str = DEFAULT_TZ, cutoff_hour: int = DEFAULT_CUTOFF_HOUR) -> pd.Series:
    """The service day (a `datetime.date`) of each timestamp; NaT stays NaT.

    `ts_utc` must be timezone-aware (TypeError otherwise): a naive time could be UTC or local, and guessing
    would move taps between days.
    """
    _check_cutoff(cutoff_hour)
    ts = pd.Series(ts_utc) if not isinstance(ts_utc, pd.Series) else ts_utc
    if len(ts) == 0 and not isinstance(ts.dtype, pd.DatetimeTZDtype):
        return pd.Series([], index=ts.index, dtype=object)
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        raise TypeError(
            f"service_day needs timezone-aware UTC timestamps, got dtype {ts.dtype}: "
            "localize them first, e.g. series.dt.tz_localize('UTC')"
        )
    # Drop the zone after converting, so the subtraction happens on the wall clock and not in absolute time
    # (they differ by an hour on a daylight-saving night).
    wall = ts.dt.tz_convert(tz).dt.tz_localize(None)
    return (wall - pd.Timedelta(hours=cutoff_hour)).dt.date


def _first_instant_at(wall: datetime, tz: str) -> pd.Timestamp:
    """The earliest UTC instant whose local wall clock reads `wall` or later."""
    naive = pd.Timestamp(wall)
    try:
        # A wall time skipped by a spring-forward gap starts at the moment the clock jumps.
        local = naive.tz_localize(tz, ambiguous="raise", nonexistent="shift_forward")
    except (
        ValueError
    ):  # AmbiguousTimeError: the wall time happens twice (autumn); the first one starts the day
        local = min(
            naive.tz_localize(tz, ambiguous=True, nonexistent="shift_forward"),
            naive.tz_localize(tz, ambiguous=False, nonexistent="shift_forward"),
        )
    return local.tz_convert("UTC")


def day_bounds(
    day: date, tz: str = DEFAULT_TZ, cutoff_hour: int = DEFAULT_CUTOFF_HOUR
) -> tuple[datetime, datetime]:
    """The half-open UTC window [start, end) of service day `day`, as aware `datetime`s in UTC."""
    _check_cutoff(cutoff_hour)
    if isinstance(day, datetime):  # a datetime is a date too; its time would silently be ignored
        raise TypeError(f"day must be a datetime.date, not a datetime: {day!r}")
    start = _first_instant_at(datetime.combine(day, time(cutoff_hour)), tz)
    end = _first_instant_at(datetime.combine(day + timedelta(days=1), time(cutoff_hour)), tz)
    return (
        start.to_pydatetime().astimezone(UTC),
        end.to_pydatetime().astimezone(UTC),
    )


def last_closed_day(now: datetime, tz: str = DEFAULT_TZ, cutoff_hour: int = DEFAULT_CUTOFF_HOUR) -> date:
    """The latest service day that has ended at ``now`` (aware). Between midnight and the cut-off the calendar's
    yesterday is still running: at 01:00 local on the 4th the latest closed day is the 2nd, not the 3rd."""
    _check_cutoff(cutoff_hour)
    running = (now.astimezone(ZoneInfo(tz)) - timedelta(hours=cutoff_hour)).date()
    return running - timedelta(days=1)


def local_time(at: datetime | None, tz: str = DEFAULT_TZ, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A moment as a person in ``tz`` reads it (the operator's zone): what pages, the CLI, PDFs and spreadsheets
    show. A naive datetime is UTC (SQLite hands stored UTC back naive); None -> "-". The API keeps UTC with offset."""
    if at is None:
        return "-"
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    return at.astimezone(ZoneInfo(tz)).strftime(fmt)

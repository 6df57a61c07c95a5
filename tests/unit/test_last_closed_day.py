"""clearing.service_day.last_closed_day: the latest service day that has ended, checked hour by hour against the
day's end computed by hand (local midnight + cut-off) in two zones, one with a daylight-saving change."""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from clearing.service_day import last_closed_day


def _end_by_hand(day: date, tz: str, cutoff: int) -> datetime:
    after = day + timedelta(days=1)  # the next calendar day's cut-off, on the local clock (whatever its offset)
    return datetime(after.year, after.month, after.day, cutoff, tzinfo=ZoneInfo(tz)).astimezone(UTC)


@pytest.mark.parametrize("tz,cutoff", [("Asia/Shanghai", 3), ("Europe/Berlin", 4), ("UTC", 0)])
def test_the_latest_closed_day_has_ended_and_the_next_has_not(tz, cutoff):
    now = datetime(2026, 10, 23, 0, 30, tzinfo=UTC)  # Berlin leaves summer time on the 25th
    while now < datetime(2026, 10, 28, tzinfo=UTC):
        day = last_closed_day(now, tz, cutoff)
        assert _end_by_hand(day, tz, cutoff) <= now < _end_by_hand(day + timedelta(days=1), tz, cutoff), (now, day)
        now += timedelta(minutes=47)


def test_between_midnight_and_the_cutoff_yesterday_is_still_running():
    # 01:00 on the 4th in Shanghai (17:00 UTC on the 3rd): the 3rd runs until 03:00, so the 2nd is the latest closed.
    assert last_closed_day(datetime(2026, 12, 3, 17, 0, tzinfo=UTC)) == date(2026, 12, 2)
    assert last_closed_day(datetime(2026, 12, 3, 19, 0, tzinfo=UTC)) == date(2026, 12, 3)

"""Clearing: service days and the daily settlement, checked against plain-Python reckoning written here."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing.service_day import day_bounds, service_day
from clearing.settlement import TAP_COLUMNS, Settlement, settle_day

CST = timezone(timedelta(hours=8))  # Asia/Shanghai has had no daylight saving since 1991
DAY = date(2024, 5, 2)


def local(y, mo, d, h, mi=0, s=0, tz=CST) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=tz).astimezone(UTC)


_seq = iter(range(1, 10**9))


def tap(
    at: datetime,
    *,
    kind="purchase",
    operator="BUS1",
    route="R1",
    vehicle="V1",
    driver="D1",
    card_type=1,
    amount=200,
    device_id=None,
) -> dict:
    return {
        "device_id": device_id or f"VAL-{vehicle}",
        "device_seq": next(_seq),
        "kind": kind,
        "occurred_at": at,
        "operator": operator,
        "route": route,
        "vehicle": vehicle,
        "driver": driver,
        "card_type": card_type,
        "amount": amount,
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(TAP_COLUMNS))
    df["occurred_at"] = pd.to_datetime(df["occurred_at"], utc=True)
    return df


def reference(rows, day, operator, tz="Asia/Shanghai", cutoff_hour=3):
    """The settlement reckoned by hand: loops and dicts, zoneinfo for the local clock."""
    zone = ZoneInfo(tz)
    out = {key: defaultdict(lambda: [0, 0]) for key in ("route", "vehicle", "driver", "card_type")}
    taps = amount = 0
    for r in rows:
        wall = r["occurred_at"].astimezone(zone).replace(tzinfo=None)
        if (
            r["operator"] != operator
            or r["kind"] != "purchase"
            or (wall - timedelta(hours=cutoff_hour)).date() != day
        ):
            continue
        taps += 1
        amount += r["amount"]
        for key, table in out.items():
            table[r[key]][0] += 1
            table[r[key]][1] += r["amount"]
    return taps, amount, {key: dict(sorted((k, tuple(v)) for k, v in t.items())) for key, t in out.items()}


def as_dict(table: pd.DataFrame, key: str) -> dict:
    return {
        k: (t, a) for k, t, a in zip(table[key].tolist(), table["taps"].tolist(), table["amount"].tolist())
    }


def assert_matches(s: Settlement, expected) -> None:
    taps, amount, tables = expected
    assert (s.taps, s.amount) == (taps, amount)
    assert isinstance(s.taps, int) and isinstance(s.amount, int)
    for key, table in s.tables().items():
        assert list(table.columns) == [key, "taps", "amount"]
        assert as_dict(table, key) == tables[key]
        assert list(table[key]) == sorted(table[key])
        assert table["taps"].dtype == "int64" and table["amount"].dtype == "int64"
    assert s.totals_agree()


@pytest.fixture
def day_of_taps() -> list[dict]:
    rows = []
    # An ordinary day: two routes, three vehicles, three drivers, three card types.
    for i in range(30):
        route, vehicle, driver = (
            ("R1", "V1", "D1") if i % 3 == 0 else ("R1", "V2", "D2") if i % 3 == 1 else ("R2", "V3", "D3")
        )
        rows.append(
            tap(
                local(2024, 5, 2, 7 + i % 12, i),
                route=route,
                vehicle=vehicle,
                driver=driver,
                card_type=i % 3,
                amount=[200, 100, 0][i % 3] + i,
            )
        )
    rows += [
        # around the cut-off at the start of the day
        tap(local(2024, 5, 2, 2, 59, 59), amount=1001),  # previous service day
        tap(local(2024, 5, 2, 3, 0, 0), amount=1002),  # first second of DAY
        # around the cut-off at the end: the late bus still belongs to DAY
        tap(local(2024, 5, 3, 1, 30), route="R2", vehicle="V3", driver="D3", amount=1004),
        tap(local(2024, 5, 3, 2, 59, 59), route="R2", vehicle="V3", driver="D3", amount=1008),
        tap(local(2024, 5, 3, 3, 0, 0), route="R2", vehicle="V3", driver="D3", amount=1016),  # next day
        # not revenue
        tap(local(2024, 5, 2, 6, 0), kind="shift_open", amount=0),
        tap(local(2024, 5, 2, 23, 0), kind="shift_close", amount=0),
        tap(local(2024, 5, 2, 12, 0), kind="denied", amount=500),
        # another operator's bus, same route code
        tap(local(2024, 5, 2, 12, 0), operator="BUS2", route="R1", vehicle="X9", driver="D9", amount=300),
    ]
    return rows


def test_service_day_cutoff_shanghai():
    ts = pd.Series(
        pd.to_datetime(
            [
                local(2024, 5, 2, 2, 59, 59),
                local(2024, 5, 2, 3),
                local(2024, 5, 2, 23, 59),
                local(2024, 5, 3, 0, 30),
                local(2024, 5, 3, 2, 59, 59),
                local(2024, 5, 3, 3),
            ],
            utc=True,
        )
    )
    assert service_day(ts).tolist() == [date(2024, 5, 1)] + [DAY] * 4 + [date(2024, 5, 3)]


def test_service_day_refuses_naive_times_and_takes_empty():
    with pytest.raises(TypeError, match="timezone-aware"):
        service_day(pd.Series(pd.to_datetime(["2024-05-02 12:00"])))
    assert service_day(pd.Series([], dtype="datetime64[ns, UTC]")).tolist() == []
    assert service_day(pd.Series([], dtype=object)).tolist() == []


def test_day_bounds_shanghai():
    assert day_bounds(DAY) == (datetime(2024, 5, 1, 19, tzinfo=UTC), datetime(2024, 5, 2, 19, tzinfo=UTC))
    assert day_bounds(DAY, cutoff_hour=0) == (
        datetime(2024, 5, 1, 16, tzinfo=UTC),
        datetime(2024, 5, 2, 16, tzinfo=UTC),
    )


def test_day_bounds_across_daylight_saving():
    # New York: clocks go 02:00 -> 03:00 on 2024-03-10 and 02:00 -> 01:00 on 2024-11-03.
    # With a 03:00 cut-off the skipped hour falls in the service day of the 9th: a 23-hour day.
    start, end = day_bounds(date(2024, 3, 9), "America/New_York", 3)
    assert (start, end) == (datetime(2024, 3, 9, 8, tzinfo=UTC), datetime(2024, 3, 10, 7, tzinfo=UTC))
    # A cut-off inside the skipped hour starts the day when the clock jumps.
    assert day_bounds(date(2024, 3, 10), "America/New_York", 2)[0] == datetime(2024, 3, 10, 7, tzinfo=UTC)
    # A cut-off in the repeated hour starts the day at its first occurrence: a 25-hour day.
    start, end = day_bounds(date(2024, 11, 3), "America/New_York", 1)
    assert (start, end) == (datetime(2024, 11, 3, 5, tzinfo=UTC), datetime(2024, 11, 4, 6, tzinfo=UTC))
    with pytest.raises(ValueError):
        day_bounds(DAY, cutoff_hour=24)


def test_settle_day_against_hand_reckoning(day_of_taps):
    s = settle_day(frame(day_of_taps), DAY, operator="BUS1")
    assert (s.operator, s.day) == ("BUS1", DAY)
    assert_matches(s, reference(day_of_taps, DAY, "BUS1"))
    # The boundary taps by name: 03:00:00 on DAY and the late bus up to 02:59:59 count, nothing else does.
    day_purchases = [r for r in day_of_taps[:30]]
    assert s.amount == sum(r["amount"] for r in day_purchases) + 1002 + 1004 + 1008
    assert s.taps == 33
    assert (
        as_dict(s.by_route, "route")["R2"][1]
        == sum(r["amount"] for r in day_purchases if r["route"] == "R2") + 1004 + 1008
    )


def test_other_operator_and_neighbour_days(day_of_taps):
    df = frame(day_of_taps)
    other = settle_day(df, DAY, operator="BUS2")
    assert (other.taps, other.amount, other.by_vehicle["vehicle"].tolist()) == (1, 300, ["X9"])
    before = settle_day(df, date(2024, 5, 1), operator="BUS1")
    after = settle_day(df, date(2024, 5, 3), operator="BUS1")
    assert (before.taps, before.amount, after.taps, after.amount) == (1, 1001, 1, 1016)


def test_settle_day_in_another_time_zone():
    ny = ZoneInfo("America/New_York")
    rows = [
        tap(datetime(2024, 3, 10, 1, 59, tzinfo=ny), amount=1, driver="A"),  # service day 2024-03-09
        tap(datetime(2024, 3, 10, 3, 0, tzinfo=ny), amount=2, driver="A"),  # 03:00 EDT = 07:00 UTC: the 10th
        tap(datetime(2024, 3, 10, 22, 0, tzinfo=ny), amount=4, driver="B", route="R9"),
        tap(datetime(2024, 3, 11, 1, 59, tzinfo=ny), amount=8, driver="B", route="R9"),  # late bus: the 10th
        tap(datetime(2024, 3, 11, 2, 0, tzinfo=ny), amount=16, driver="B"),  # the 11th
    ]
    s = settle_day(frame(rows), date(2024, 3, 10), operator="BUS1", tz="America/New_York", cutoff_hour=2)
    assert_matches(s, reference(rows, date(2024, 3, 10), "BUS1", "America/New_York", 2))
    assert (s.taps, s.amount) == (3, 14)
    # Shanghai reckoning of the same taps gives other days: the zone really is used.
    assert settle_day(frame(rows), date(2024, 3, 10), operator="BUS1").amount != 14


def test_empty_input():
    for df in (pd.DataFrame(columns=list(TAP_COLUMNS)), frame([])):
        s = settle_day(df, DAY, operator="BUS1")
        assert (s.taps, s.amount) == (0, 0)
        assert s.totals_agree()
        for key, table in s.tables().items():
            assert list(table.columns) == [key, "taps", "amount"] and table.empty
            assert table["taps"].dtype == "int64" and table["amount"].dtype == "int64"


def test_only_non_purchases_gives_empty_tables():
    rows = [tap(local(2024, 5, 2, 9), kind="shift_open"), tap(local(2024, 5, 2, 10), kind="denied")]
    s = settle_day(frame(rows), DAY, operator="BUS1")
    assert (s.taps, s.amount, len(s.by_route)) == (0, 0, 0)


def test_missing_keys_are_still_counted():
    rows = [tap(local(2024, 5, 2, 9), driver=None, amount=150), tap(local(2024, 5, 2, 10), amount=50)]
    s = settle_day(frame(rows), DAY, operator="BUS1")
    assert (int(s.by_driver["taps"].sum()), int(s.by_driver["amount"].sum())) == (2, 200)
    assert s.totals_agree()


def test_bad_input_is_refused_clearly():
    rows = [tap(local(2024, 5, 2, 9))]
    with pytest.raises(ValueError, match="missing column"):
        settle_day(frame(rows).drop(columns=["driver"]), DAY, operator="BUS1")
    floats = frame(rows).astype({"amount": "float64"})
    with pytest.raises(TypeError, match="integer fen"):
        settle_day(floats, DAY, operator="BUS1")
    naive = frame(rows)
    naive["occurred_at"] = naive["occurred_at"].dt.tz_localize(None)
    with pytest.raises(TypeError, match="timezone-aware"):
        settle_day(naive, DAY, operator="BUS1")


def test_replayed_record_counts_once_and_conflicts_are_refused():
    row = tap(local(2024, 5, 2, 9), amount=200)
    assert settle_day(frame([row, dict(row)]), DAY, operator="BUS1").amount == 200
    with pytest.raises(ValueError, match="device_seq"):
        settle_day(frame([row, dict(row, amount=999)]), DAY, operator="BUS1")


def test_totals_agree_notices_a_broken_table(day_of_taps):
    s = settle_day(frame(day_of_taps), DAY, operator="BUS1")
    broken = Settlement(
        s.operator, s.day, s.by_route.iloc[1:], s.by_vehicle, s.by_driver, s.taps, s.amount, s.by_card_type
    )
    assert s.totals_agree() and not broken.totals_agree()


# --- properties -------------------------------------------------------------------------------------------------

WINDOW_START = datetime(2024, 5, 1, 12, tzinfo=UTC)
random_tap = st.fixed_dictionaries(
    {
        "occurred_at": st.integers(0, 48 * 3600).map(lambda s: WINDOW_START + timedelta(seconds=s)),
        "kind": st.sampled_from(["purchase", "purchase", "purchase", "shift_open", "shift_close", "denied"]),
        "operator": st.sampled_from(["BUS1", "BUS2"]),
        "route": st.sampled_from(["R1", "R2", "R10"]),
        "vehicle": st.sampled_from(["V1", "V2", "V3"]),
        "driver": st.sampled_from(["D1", "D2"]),
        "card_type": st.integers(0, 3),
        "amount": st.integers(0, 10_000),
    }
)


@settings(max_examples=150, deadline=None)
@given(st.lists(random_tap, max_size=60))
def test_tables_add_up_to_the_purchases_in_the_day_window(raw):
    rows = [dict(r, device_id="VAL-1", device_seq=i) for i, r in enumerate(raw)]
    # The window written out by hand: 03:00 Beijing time (UTC+8) on DAY to 03:00 the next morning.
    start = datetime(2024, 5, 2, 3, tzinfo=CST)
    end = start + timedelta(days=1)
    in_day = [
        r
        for r in rows
        if r["operator"] == "BUS1" and r["kind"] == "purchase" and start <= r["occurred_at"] < end
    ]
    want_taps, want_amount = len(in_day), 0
    for r in in_day:
        want_amount += r["amount"]
    s = settle_day(frame(rows), DAY, operator="BUS1")
    assert (s.taps, s.amount) == (want_taps, want_amount)
    for table in (s.by_route, s.by_vehicle, s.by_driver, s.by_card_type):
        assert (int(table["taps"].sum()), int(table["amount"].sum())) == (want_taps, want_amount)
    assert_matches(s, reference(rows, DAY, "BUS1"))


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31)),
    st.sampled_from(["Asia/Shanghai", "America/New_York", "Europe/London", "Australia/Lord_Howe"]),
    st.integers(0, 23),
)
def test_service_day_and_day_bounds_agree(moment, tz, cutoff):
    t = moment.replace(tzinfo=UTC)
    day = service_day(pd.Series(pd.to_datetime([t], utc=True)), tz=tz, cutoff_hour=cutoff).iloc[0]
    start, end = day_bounds(day, tz=tz, cutoff_hour=cutoff)
    assert start <= t < end

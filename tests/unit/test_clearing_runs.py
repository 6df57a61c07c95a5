"""Clearing runs (pure): totals against plain loops, the commission rule, every breakdown adding up to the same
figures, re-clearing giving the same rows and fingerprint, late taps landing as adjustments. Which taps a run
takes is the database's claim (tests/integration/test_clearing_claims.py); here a run settles what it is handed."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing import commission as fee
from clearing.runs import DIMENSIONS, RUN_TAP_COLUMNS, Adjustment, ClearingWindow, clear

DAY = date(2026, 3, 5)
DAY_START = datetime(2026, 3, 4, 19, 0, tzinfo=UTC)  # 03:00 Asia/Shanghai on DAY
AS_OF = DAY_START + timedelta(days=1, hours=2)


def window(rate_bp=60, carried_from=None, as_of=AS_OF, day=DAY) -> ClearingWindow:
    return ClearingWindow("OP", day, as_of, carried_from, rate_bp)


def tap(seq, *, at=None, received=None, route="R1", vehicle="V1", driver="D1", fleet="F1", card_type=1,
        amount=200, kind="purchase", device="VAL1") -> dict:
    at = at or DAY_START + timedelta(hours=2, seconds=seq)
    return {"device_id": device, "device_seq": seq, "kind": kind, "occurred_at": at,
            "received_at": received or at + timedelta(minutes=1), "route": route, "vehicle": vehicle,
            "driver": driver, "fleet": fleet, "card_type": card_type, "amount": amount}


def frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(RUN_TAP_COLUMNS))
    for col in ("occurred_at", "received_at"):
        df[col] = pd.to_datetime(df[col], utc=True)
    df["amount"] = df["amount"].astype("int64")
    df["card_type"] = df["card_type"].astype("int64")
    return df


# ------------------------------------------------------------------------------------------------ commission
def test_commission_rounds_half_away_from_zero():
    assert fee.commission_of(50, 100) == 1  # 0.5 fen -> 1
    assert fee.commission_of(49, 100) == 0  # 0.49 -> 0
    assert fee.commission_of(-50, 100) == -1  # a reversal is exactly the negative
    assert fee.commission_of(1_000_000, 60) == 6_000
    assert fee.split(12_345, 75) == (93, 12_252)  # 92.5875 -> 93


def test_allocate_gives_leftover_fen_to_largest_remainders_then_first_rows():
    # 3 equal rows sharing 10 fen: 3.33 each, the first row gets the fen left over
    assert fee.allocate([100, 100, 100], 10) == [4, 3, 3]
    # exact shares 1.2, 2.4, 6.4: floors 1, 2, 6 (9); the fen left goes to the largest remainder (0.4, row 2 first)
    assert fee.allocate([12, 24, 64], 10) == [1, 3, 6]


@given(st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=40),
       st.integers(min_value=0, max_value=10_000))
def test_rows_commission_plus_net_is_gross_and_sums_to_the_total_commission(grosses, rate):
    commissions, nets = fee.split_rows(grosses, rate)
    assert all(c + n == g for c, n, g in zip(commissions, nets, grosses, strict=True))
    assert sum(commissions) == fee.commission_of(sum(grosses), rate)
    assert sum(commissions) + sum(nets) == sum(grosses)
    # no row is off its exact share by a whole fen or more
    total = sum(grosses)
    if total:
        for g, c in zip(grosses, commissions, strict=True):
            assert abs(c * total - g * sum(commissions)) < total


def test_rate_is_checked():
    with pytest.raises(ValueError):
        fee.commission_of(100, 10_001)
    with pytest.raises(TypeError):
        fee.commission_of(100, 0.6)


# ------------------------------------------------------------------------------------------------ runs
def plain_breakdown(rows, key, rate):
    """The day's purchases by one key with plain loops: taps, gross."""
    taps, gross = defaultdict(int), defaultdict(int)
    for r in rows:
        if r["kind"] != "purchase":
            continue
        taps[str(r[key])] += 1
        gross[str(r[key])] += r["amount"]
    return dict(taps), dict(gross)


def test_day_totals_match_plain_loops_and_other_kinds_are_left_out():
    rows = [tap(i, route=f"R{i % 3}", vehicle=f"V{i % 4}", driver=f"D{i % 5}", fleet=f"F{i % 2}",
                card_type=1 + i % 3, amount=100 + 10 * (i % 7)) for i in range(1, 200)]
    rows.append(tap(500, kind="shift_open", amount=0))
    rows.append(tap(501, kind="denied", amount=0))
    result = clear(frame(rows), window(rate_bp=60))
    purchases = [r for r in rows if r["kind"] == "purchase"]
    gross = sum(r["amount"] for r in purchases)
    assert result.totals["day_taps"] == len(purchases)
    assert result.totals["day_gross"] == gross
    assert result.totals["day_commission"] == (gross * 60 + 5000) // 10000  # half up, non-negative gross
    for dim in DIMENSIONS[1:]:
        taps, by_key = plain_breakdown(purchases, dim, 60)
        table = result.table(dim)
        assert dict(zip(table["key"], table["gross"], strict=True)) == by_key
        assert dict(zip(table["key"], table["taps"], strict=True)) == taps
        assert (table["commission"] + table["net"] == table["gross"]).all()
        assert int(table["commission"].sum()) == result.totals["day_commission"]


def test_the_run_settles_every_tap_handed_to_it_and_sorts_day_from_late_by_the_cut_off():
    # The run takes what it claimed (backoffice.clearing_runs.claim_taps); here it only sorts. A tap at exactly
    # the day's 03:00:00 cut-off is the day's own, one a second earlier the day before's (late).
    rows = [tap(1), tap(2, at=DAY_START), tap(3, at=DAY_START - timedelta(seconds=1)),
            tap(4, received=AS_OF + timedelta(seconds=1))]  # received after as_of: still the run's, if handed in
    result = clear(frame(rows), window())
    assert result.totals["day_taps"] == 3
    assert result.totals["late_taps"] == 1
    late = result.table("route", "late")
    assert list(late["for_day"]) == [DAY - timedelta(days=1)]


def test_a_purchase_of_a_later_day_is_refused_even_at_exactly_the_next_cut_off():
    end = DAY_START + timedelta(days=1)  # 03:00:00 local the next day: the next day's first moment
    with pytest.raises(ValueError, match="after that day's end"):
        clear(frame([tap(1), tap(2, at=end)]), window())
    ok = clear(frame([tap(1), tap(2, at=end - timedelta(microseconds=1))]), window())
    assert ok.totals["day_taps"] == 2
    # other kinds are not money: a shift record of the next day handed in is ignored, not refused
    assert clear(frame([tap(1), tap(2, at=end, kind="shift_open", amount=0)]), window()).totals["day_taps"] == 1


def test_late_taps_land_as_adjustments_for_their_own_day():
    previous_as_of = DAY_START + timedelta(hours=1)  # yesterday's run was made at 04:00 today
    yesterday = DAY_START - timedelta(hours=5)
    rows = [tap(1), tap(2),
            tap(4, at=yesterday, received=previous_as_of + timedelta(hours=3), amount=150, route="R9"),  # late
            tap(5, at=yesterday - timedelta(days=1), received=previous_as_of + timedelta(hours=4), amount=120)]
    result = clear(frame(rows), window(carried_from=previous_as_of))
    assert result.totals["day_taps"] == 2 and result.totals["day_gross"] == 400
    assert result.totals["late_taps"] == 2 and result.totals["late_gross"] == 270
    late = result.rows[(result.rows["section"] == "late") & (result.rows["dimension"] == "route")]
    assert sorted(zip(late["for_day"], late["key"], late["gross"])) == [
        (DAY - timedelta(days=2), "R1", 120), (DAY - timedelta(days=1), "R9", 150)]
    assert result.totals["payable_net"] == result.totals["day_net"] + result.totals["late_net"]


def test_reconciliation_adjustments_are_carried_with_their_own_commission():
    result = clear(frame([tap(1, amount=10_000)]), window(rate_bp=100),
                   [Adjustment(7, DAY - timedelta(days=1), -250), Adjustment(8, DAY - timedelta(days=2), 49)])
    assert result.totals["reconciliation_gross"] == -201
    items = result.table("item", "reconciliation")
    assert list(items["key"]) == ["8", "7"] or list(items["key"]) == ["7", "8"]
    assert dict(zip(items["key"], items["commission"], strict=True)) == {"7": -3, "8": 0}  # -2.5 -> -3; 0.49 -> 0
    assert result.totals["payable_net"] == 10_000 - 100 + (-250 + 3) + 49


def test_reclearing_gives_the_same_rows_and_fingerprint_whatever_the_row_order():
    rows = [tap(i, route=f"R{i % 3}", driver=f"D{i % 4}", amount=100 + i) for i in range(1, 60)]
    a = clear(frame(rows), window())
    b = clear(frame(list(reversed(rows))).astype({"route": "category", "driver": "category"}), window())
    assert a.fingerprint == b.fingerprint
    pd.testing.assert_frame_equal(a.rows, b.rows)
    changed = [dict(r) for r in rows]
    changed[10]["amount"] += 1
    assert clear(frame(changed), window()).fingerprint != a.fingerprint
    assert clear(frame(rows), window(rate_bp=61)).fingerprint != a.fingerprint


def test_refuses_float_money_and_naive_times():
    df = frame([tap(1)])
    with pytest.raises(TypeError):
        clear(df.assign(amount=df["amount"].astype(float)), window())
    with pytest.raises(TypeError):
        clear(df.assign(occurred_at=df["occurred_at"].dt.tz_localize(None)), window())


keys = st.sampled_from(["A", "B", "C", "D"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(keys, keys, keys, keys, st.integers(1, 4), st.integers(0, 5000),
                          st.integers(-30, 30)), max_size=60),
       st.integers(0, 10_000))
def test_every_breakdown_sums_to_the_same_taps_gross_commission_and_net(spec, rate):
    rows = [tap(i + 1, route="R" + r, vehicle="V" + v, driver="D" + d, fleet="F" + f, card_type=c, amount=a,
                at=DAY_START + timedelta(hours=12, minutes=m))
            for i, (r, v, d, f, c, a, m) in enumerate(spec)]
    result = clear(frame(rows), window(rate_bp=rate))
    gross = sum(r["amount"] for r in rows)
    expected = (len(rows), gross, fee.commission_of(gross, rate))
    for dim in DIMENSIONS:
        t = result.table(dim)
        got = (int(t["taps"].sum()), int(t["gross"].sum()), int(t["commission"].sum()))
        assert got == expected, dim
        assert (t["commission"] + t["net"] == t["gross"]).all()

"""Reconciliation (pure): shift totals against plain loops, gaps and unclosed shifts flagged, the issuer's file
against our purchases (and against itself: nothing), payment records against top-ups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing.reconcile import (
    ISSUER_COLUMNS,
    read_issuer_file,
    reconcile_issuer,
    reconcile_payments,
    reconcile_shifts,
    shift_totals,
    write_issuer_file,
)

T0 = datetime(2026, 3, 5, 0, 0, tzinfo=UTC)


def shift_records(device, first_seq, shift_no, purchases, *, amount=200, close=True) -> list[dict]:
    rows = [{"device_id": device, "device_seq": first_seq, "kind": "shift_open", "shift_no": shift_no, "amount": 0}]
    for i in range(purchases):
        rows.append({"device_id": device, "device_seq": first_seq + 1 + i, "kind": "purchase",
                     "shift_no": shift_no, "amount": amount + i})
    if close:
        rows.append({"device_id": device, "device_seq": first_seq + 1 + purchases, "kind": "shift_close",
                     "shift_no": shift_no, "amount": 0})
    return rows


def shifts_frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["device_id", "device_seq", "kind", "shift_no", "amount"])


def test_balanced_shifts_give_no_items_and_totals_match_plain_sums():
    rows = shift_records("VAL1", 1, 1, 5) + shift_records("VAL1", 8, 2, 3) + shift_records("VAL2", 1, 1, 4)
    rows.append({"device_id": "VAL2", "device_seq": 7, "kind": "denied", "shift_no": 0, "amount": 0})
    totals, items = reconcile_shifts(shifts_frame(rows))
    assert items == []
    plain = {}
    for r in rows:
        if r["shift_no"] > 0 and r["kind"] == "purchase":
            k = (r["device_id"], r["shift_no"])
            taps, amount = plain.get(k, (0, 0))
            plain[k] = (taps + 1, amount + r["amount"])
    got = {(r.device_id, r.shift_no): (r.purchases, r.amount) for r in totals.itertuples()}
    assert got == plain
    assert totals["missing"].sum() == 0 and totals["closed"].all() and totals["opened"].all()


def test_a_gap_a_missing_sign_in_and_an_unclosed_shift_are_flagged_per_shift():
    a = shift_records("VAL1", 1, 1, 6)
    del a[3]  # one purchase never arrived
    b = shift_records("VAL1", 9, 2, 3)[1:]  # sign-in missing
    c = shift_records("VAL2", 1, 4, 2, close=False)
    totals, items = reconcile_shifts(shifts_frame(a + b + c))
    found = sorted((i.ref, i.problem) for i in items)
    assert found == [("VAL1/1", "records_missing"), ("VAL1/2", "no_sign_in"), ("VAL2/4", "not_closed")]
    gap = totals[(totals["device_id"] == "VAL1") & (totals["shift_no"] == 1)].iloc[0]
    assert (gap["missing"], gap["purchases"], gap["first_seq"], gap["last_seq"]) == (1, 5, 1, 8)


def test_a_replaced_journal_numbers_its_shifts_again_and_each_journal_shift_stands_alone():
    """Bus VAL1's storage is replaced mid-day: the new journal (epoch 7) starts at sequence 1 and shift 1 again.
    Keyed by (device, epoch) both shifts balance; keyed by device alone they would fold into one shift whose
    sequences repeat (a false gap and a false sum)."""
    old = [r | {"epoch": 0} for r in shift_records("VAL1", 1, 1, 3)]
    new = [r | {"epoch": 7} for r in shift_records("VAL1", 1, 1, 2, amount=300)]
    frame = pd.DataFrame(old + new, columns=["device_id", "epoch", "device_seq", "kind", "shift_no", "amount"])
    totals, items = reconcile_shifts(frame)
    assert items == []
    by = {(r.epoch, r.shift_no): (r.records, r.purchases, r.amount) for r in totals.itertuples()}
    assert by == {(0, 1): (5, 3, 200 + 201 + 202), (7, 1): (4, 2, 300 + 301)}
    unclosed = [r | {"epoch": 7} for r in shift_records("VAL1", 1, 1, 1, close=False)]
    _, items = reconcile_shifts(pd.DataFrame(old + unclosed, columns=frame.columns))
    assert [(i.ref, i.problem) for i in items] == [("VAL1/journal 7/1", "not_closed")]


def test_rows_in_any_order_and_categoricals_give_the_same_totals():
    rows = shift_records("VAL1", 1, 1, 5) + shift_records("VAL2", 1, 1, 4) + shift_records("VAL1", 8, 2, 3)
    plain = shift_totals(shifts_frame(rows))
    shuffled = shifts_frame(rows).sample(frac=1, random_state=3)
    shuffled["device_id"] = shuffled["device_id"].astype("category")
    shuffled["kind"] = shuffled["kind"].astype("category")
    pd.testing.assert_frame_equal(shift_totals(shuffled), plain)


def test_declared_shift_totals_out_of_balance():
    rows = shift_records("VAL1", 1, 1, 3)  # 3 purchases: 200 + 201 + 202
    declared = pd.DataFrame([{"device_id": "VAL1", "shift_no": 1, "taps": 4, "amount": 803},
                             {"device_id": "VAL9", "shift_no": 1, "taps": 1, "amount": 200}])
    _, items = reconcile_shifts(shifts_frame(rows), declared)
    got = {(i.ref, i.problem): (i.ours, i.theirs) for i in items}
    assert got == {("VAL1/1", "out_of_balance"): (603, 803), ("VAL9/1", "shift_not_received"): (None, 200)}


# ------------------------------------------------------------------------------------------------ issuer file
def issuer_row(n, amount=200, **over) -> dict:
    row = {"card_asn": f"{n:020X}", "card_ttc": n % 50, "amount": amount, "terminal_id": "010000000001",
           "terminal_seq": 1000 + n, "tac": f"{n * 7919 % 2**32:08X}", "occurred_at": T0 + timedelta(seconds=n)}
    row.update(over)
    return row


def issuer_frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(ISSUER_COLUMNS))
    df["occurred_at"] = pd.to_datetime(df["occurred_at"], utc=True)
    return df


def test_issuer_file_round_trips_through_csv():
    rows = issuer_frame([issuer_row(i) for i in range(1, 6)])
    text = write_issuer_file(rows)
    assert text.splitlines()[0] == ",".join(ISSUER_COLUMNS)
    back = read_issuer_file(text)
    assert reconcile_issuer(rows, back) == []
    assert back["amount"].dtype == "int64"


def test_issuer_file_errors_name_the_line_and_column():
    with pytest.raises(ValueError, match="lacks column"):
        read_issuer_file("card_asn,amount\nAA,1\n")
    bad = write_issuer_file(issuer_frame([issuer_row(1)])).replace(",200,", ",2.00,")
    with pytest.raises(ValueError, match="line 2: amount"):
        read_issuer_file(bad)


def test_issuer_differences_each_give_one_item():
    ours = [issuer_row(1), issuer_row(2), issuer_row(3, amount=150), issuer_row(4), issuer_row(6)]
    theirs = [issuer_row(1), issuer_row(3, amount=200), issuer_row(4, tac="00000000"), issuer_row(5),
              issuer_row(6), issuer_row(6)]
    items = reconcile_issuer(issuer_frame(ours), issuer_frame(theirs))
    got = {(i.ref, i.problem): (i.ours, i.theirs, i.suggested) for i in items}
    r = {n: f"{n:020X}/{n % 50}" for n in range(1, 7)}
    assert got == {
        (r[2], "missing_in_file"): (200, None, -200),
        (r[3], "amount_differs"): (150, 200, 50),
        (r[4], "record_differs"): (200, 200, 0),
        (r[5], "missing_in_farebox"): (None, 200, 200),
        (r[6], "duplicate_in_file"): (200, 400, 200),
    }


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 10**5)), max_size=40,
                unique_by=lambda t: t[0]))
def test_a_file_reconciled_against_itself_is_empty(spec):
    rows = issuer_frame([issuer_row(n, amount=a) for n, a in spec])
    assert reconcile_issuer(rows, read_issuer_file(write_issuer_file(rows))) == []


# ------------------------------------------------------------------------------------------------ payments
def test_payments_against_topups():
    platform = [{"order_id": "o1", "amount": 5000, "status": "paid"},
                {"order_id": "o2", "amount": 2000, "status": "paid"},  # paid, load failed
                {"order_id": "o3", "amount": 1000, "status": "refunded"},  # refunded but loaded
                {"order_id": "o4", "amount": 3000, "status": "paid"},  # amounts differ
                {"order_id": "o5", "amount": 100, "status": "paid"},  # no top-up at all
                {"order_id": "o7", "amount": 700, "status": "paid"},
                {"order_id": "o7", "amount": 700, "status": "paid"}]
    topups = pd.DataFrame([{"order_id": "o1", "amount": 5000, "state": "loaded"},
                           {"order_id": "o2", "amount": 2000, "state": "failed"},
                           {"order_id": "o3", "amount": 1000, "state": "loaded"},
                           {"order_id": "o4", "amount": 2000, "state": "loaded"},
                           {"order_id": "o6", "amount": 800, "state": "loaded"},  # not on the platform
                           {"order_id": "o7", "amount": 700, "state": "loaded"}])
    got = {(i.ref, i.problem): (i.ours, i.theirs) for i in reconcile_payments(platform, topups)}
    assert got == {("o2", "paid_not_loaded"): (None, 2000), ("o3", "loaded_not_paid"): (1000, None),
                   ("o4", "amount_differs"): (2000, 3000), ("o5", "paid_not_loaded"): (None, 100),
                   ("o6", "missing_on_platform"): (800, None), ("o7", "duplicate_on_platform"): (700, 700)}


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 10**6)), max_size=30, unique_by=lambda t: t[0]))
def test_matching_payments_and_topups_give_nothing(spec):
    platform = [{"order_id": f"o{n}", "amount": a, "status": "paid"} for n, a in spec]
    topups = [{"order_id": f"o{n}", "amount": a, "state": "loaded"} for n, a in reversed(spec)]
    assert reconcile_payments(platform, topups) == []

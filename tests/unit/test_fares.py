"""validator.fares and epurse.transit: pure pricing and the card's transit record. Expected fares are worked by
hand in each test from the table's numbers, not computed with the code under test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from epurse.cardtypes import CardType
from epurse.transit import RECORD_LEN, TransitRecord, TransitRecordError, TripState
from validator.fares import DistanceFare, FareError, FareTable, Stage, Step, Transfer, quote

T0 = datetime(2026, 5, 4, 7, 30, tzinfo=UTC)
TERMINAL = bytes.fromhex("010000000042")

TABLE = FareTable(
    version=7,
    flat={"r1": 200, "r15": 150},
    distance={"k8": DistanceFare((Stage(5, 200), Stage(10, 300), Stage(20, 500)), max_trip_minutes=120)},
    discounts={CardType.STUDENT: 50, CardType.ELDERLY: 0, CardType.STAFF: 80},
    transfer=Transfer(window_minutes=90, discount=100),
    min_balance=50,
)


def trip(state=TripState.DONE, route="r15", at=T0 - timedelta(minutes=30), entry_stop=0, terminal=b"\x01" * 6):
    return TransitRecord(state=state, route=route, vehicle="v9", driver="D1", terminal_id=terminal, at=at,
                         amount=150, full_fare=150, entry_stop=entry_stop)


def q(route="r1", card=CardType.ADULT, last=None, stop=0, now=T0, table=TABLE):
    return quote(table, route=route, stop=stop, card_type=card, last=last, now=now)


# --- flat fares, discounts, transfers ---------------------------------------------------------------------


@pytest.mark.parametrize("card, fen", [(CardType.ADULT, 200), (CardType.STUDENT, 100), (CardType.ELDERLY, 0),
                                       (CardType.STAFF, 160)])
def test_flat_fare_by_card_type(card, fen):
    result = q(card=card)
    assert (result.step, result.amount, result.full_fare) == (Step.RIDE, fen, 200)


def test_percent_rounds_to_the_nearest_fen():
    table = FareTable(1, flat={"r": 155}, discounts={CardType.STUDENT: 50})
    assert q(route="r", card=CardType.STUDENT, table=table).amount == 78  # 77.5 -> 78


def test_transfer_from_another_route_within_the_window():
    result = q(last=trip(route="r15", at=T0 - timedelta(minutes=89)))
    assert result.amount == 100 and result.full_fare == 200 and "transfer from r15" in result.note


def test_no_transfer_after_the_window_or_on_the_same_route():
    assert q(last=trip(route="r15", at=T0 - timedelta(minutes=91))).amount == 200
    assert q(last=trip(route="r1", at=T0 - timedelta(minutes=10))).amount == 200


def test_transfer_never_goes_below_zero():
    assert q(card=CardType.STUDENT, last=trip(at=T0 - timedelta(minutes=5))).amount == 0  # 100 - 100


def test_minimum_balance():
    assert q().required_balance == 200
    assert q(card=CardType.ELDERLY).required_balance == 50  # a free ride still needs the minimum balance


# --- distance fares ---------------------------------------------------------------------------------------


def test_entry_takes_nothing_and_needs_the_maximum_fare():
    result = q(route="k8", stop=3)
    assert (result.step, result.amount, result.entry_stop, result.required_balance) == (Step.ENTRY, 0, 3, 500)


@pytest.mark.parametrize("entry, exit_, fen", [(3, 3, 200), (3, 8, 200), (3, 9, 300), (13, 3, 300),
                                               (0, 20, 500), (0, 40, 500)])
def test_exit_pays_by_stops_ridden(entry, exit_, fen):
    result = q(route="k8", stop=exit_, last=trip(TripState.ON_BOARD, route="k8", entry_stop=entry))
    assert (result.step, result.amount, result.entry_stop, result.exit_stop) == (Step.EXIT, fen, entry, exit_)


def test_exit_discount_by_card_type():
    result = q(route="k8", stop=12, card=CardType.STUDENT, last=trip(TripState.ON_BOARD, route="k8"))
    assert (result.amount, result.full_fare) == (250, 500)


def test_unfinished_trip_pays_its_maximum_fare_on_the_next_boarding():
    stale = trip(TripState.ON_BOARD, route="k8", at=T0 - timedelta(minutes=121), entry_stop=2)
    again = q(route="k8", stop=6, last=stale)  # too old to be this trip's start: a new entry plus recovery
    assert (again.step, again.amount, again.entry_stop) == (Step.ENTRY, 500, 6)
    assert again.required_balance == 1000 and "unfinished trip on k8" in again.note
    flat = q(route="r1", last=trip(TripState.ON_BOARD, route="k8", at=T0 - timedelta(minutes=5)))
    assert (flat.step, flat.amount, flat.full_fare) == (Step.RIDE, 700, 700)


def test_unfinished_trip_on_a_route_the_table_no_longer_has_pays_this_routes_maximum():
    result = q(route="r15", last=trip(TripState.ON_BOARD, route="gone"))
    assert result.amount == 150 + 150


# --- the table as a parameter file ------------------------------------------------------------------------


def test_round_trip_through_the_parameter_file():
    assert FareTable.from_dict(TABLE.to_dict()) == TABLE


@pytest.mark.parametrize("doc, words", [
    ({}, "malformed"),
    ({"version": 1, "flat": {"r1": -5}}, "whole number of fen"),
    ({"version": 1, "flat": {"r1": 2.5}}, "whole number of fen"),
    ({"version": 1, "distance": {"k": {"stages": []}}}, "no fare stages"),
    ({"version": 1, "distance": {"k": {"stages": [[5, 100], [3, 200]]}}}, "go up"),
    ({"version": 1, "discounts": {"2": 150}}, "0 to 100"),
    ({"version": 1, "flat": {"k": 1}, "distance": {"k": {"stages": [[1, 1]]}}}, "both"),
])
def test_malformed_tables_are_refused_with_a_reason(doc, words):
    with pytest.raises(FareError, match=words):
        FareTable.from_dict(doc)


def test_unknown_route_is_a_fare_error():
    with pytest.raises(FareError, match="no fare for route 'r99'"):
        q(route="r99")


# --- the transit record -----------------------------------------------------------------------------------


def test_transit_record_bytes():
    record = TransitRecord(state=TripState.ON_BOARD, route="k8", vehicle="bus-12", driver="D0042",
                           terminal_id=TERMINAL, at=datetime(2026, 5, 4, 23, 59, 58, tzinfo=UTC), amount=0,
                           full_fare=500, entry_stop=3)
    raw = record.encode()
    assert len(raw) == RECORD_LEN
    assert raw[:5].hex() == "023e010300"
    assert raw[5:17] == b"k8" + bytes(10) and raw[17:29] == b"bus-12" + bytes(6)
    assert raw[41:47] == TERMINAL
    assert raw[47:54].hex() == "20260504235958"
    assert raw[54:62].hex() == "00000000" "000001f4"
    assert TransitRecord.decode(raw) == record


def test_blank_record_and_garbage():
    assert TransitRecord.decode(bytes(RECORD_LEN)) is None
    with pytest.raises(TransitRecordError):
        TransitRecord.decode(b"\x07" + bytes(RECORD_LEN - 1))
    with pytest.raises(TransitRecordError):
        TransitRecord.decode(bytes(10))
    bad_date = bytearray(trip().encode())
    bad_date[47:51] = b"\x20\x26\x13\x99"
    with pytest.raises(TransitRecordError):
        TransitRecord.decode(bytes(bad_date))


def test_long_route_codes_keep_their_first_twelve_bytes():
    record = trip(route="abcdef_r15_long")
    back = TransitRecord.decode(record.encode())
    assert back.route == "abcdef_r15_l"
    # the fare rules still recognise the route from the truncated code
    table = FareTable(1, flat={"abcdef_r15_long": 100, "r1": 200}, transfer=Transfer(90, 50))
    assert quote(table, route="abcdef_r15_long", stop=0, card_type=CardType.ADULT, last=back, now=T0).amount == 100
    assert quote(table, route="r1", stop=0, card_type=CardType.ADULT, last=back, now=T0).amount == 150

"""validator.terminal: a real Terminal over a SimReader with SimCards and a SimPsam in its SAM slot (as
farebox/demo.py wires it), a real Journal in tmp_path and a clock the test moves. TACs are checked with a
DES / CBC-MAC of tests/reference_crypto.py from the published test TAC master key, not with epurse.crypto."""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime, timedelta

import pytest
from reference_crypto import ref_purchase_tac

from blacklist.denylist import DenyList
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from epurse.transit import TransitRecord, TripState
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.fares import DistanceFare, FareTable, Stage, Transfer
from validator.journal import Journal
from validator.messages import Outcome, screen_text, yuan
from validator.readers import CardRemoved
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from wire.records import RecordKind

T0 = datetime(2024, 3, 5, 7, 30, 0, tzinfo=UTC)
TERMINAL_ID = bytes.fromhex("010000000042")
FARE = 200  # fen, route r12
RIDER_ASN = bytes.fromhex("31000000000000012345")
OTHER_ASN = bytes.fromhex("31000000000000054321")
DRIVER_ASN = bytes.fromhex("31000000000000900001")
DRIVER2_ASN = bytes.fromhex("31000000000000900002")


# --------------------------------------------------------------------------------------- reference crypto


def test_reference_tac_reproduces_the_published_example():
    # epurse/keys.py works one TAC through by hand with OpenSSL: 620098f7
    when = datetime(2024, 3, 5, 7, 30, 0)
    asn = bytes.fromhex("00000000000000012345")
    assert ref_purchase_tac(TEST_ISSUER_KEYS.tac, asn, 200, TERMINAL_ID, 7, when).hex() == "620098f7"


# --------------------------------------------------------------------------------------- the bus


class Bus:
    """A validator as demo.py builds one, with a clock the test moves and a reader the test puts cards on."""

    def __init__(self, tmp_path, *, deny=(), route="r12", psam_sequence=41, fares=None, terminal_id=TERMINAL_ID,
                 name="bus0042"):
        self.now = T0
        self.psam = SimPsam(terminal_id, keys=TEST_ISSUER_KEYS, sequence=psam_sequence)
        slot = SimReader()
        slot.present(self.psam)
        self.journal = Journal(tmp_path / f"{name}.journal")
        self.reader = SimReader()
        self.terminal = Terminal(
            TerminalConfig(device_id=name, operator="citybus", route=route, vehicle="v7"),
            journal=self.journal,
            psam=slot.poll(),
            fares=fares or FareTable(version=1, flat={"r12": FARE, "r30": 300}),
            deny_list=DenyList.from_asns(list(deny)),
            clock=lambda: self.now,
        )

    def tap(self, card):
        self.reader.present(card)
        try:
            return self.terminal.tap(self.reader.poll())
        finally:
            self.reader.remove()

    def later(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def records(self, kind=None):
        return [r for r in self.journal.records_since(0) if kind is None or r.kind is kind]


def rider(
    balance=1000, asn=RIDER_ASN, card_type=CardType.ADULT, start=date(2024, 1, 1), end=date(2028, 12, 31)
):
    return SimCard(asn, int(card_type), balance, start=start, end=end)


def driver(staff_no="D1001", asn=DRIVER_ASN):
    return SimCard(
        asn,
        int(CardType.DRIVER),
        0,
        staff_no=staff_no,
        holder_name="王师傅",
        start=date(2024, 1, 1),
        end=date(2028, 12, 31),
    )


@pytest.fixture
def bus(tmp_path):
    b = Bus(tmp_path)
    yield b
    b.journal.close()


@pytest.fixture
def on_shift(bus):
    assert bus.tap(driver()).outcome is Outcome.SHIFT_OPENED
    bus.later(60)
    return bus


# --------------------------------------------------------------------------------------- shifts


def test_no_fare_without_a_shift(bus):
    card = rider()
    result = bus.tap(card)
    assert result.outcome is Outcome.NO_SHIFT and result.record is None
    assert card.balance == 1000 and card.ttc == 0 and card.log == []
    assert bus.records() == [] and bus.journal.pending() == []


def test_driver_card_opens_and_closes_a_shift(bus):
    opened = bus.tap(driver())
    assert opened.outcome is Outcome.SHIFT_OPENED
    r = opened.record
    assert (r.kind, r.driver, r.shift_no, r.card_asn, r.card_type) == (
        RecordKind.SHIFT_OPEN,
        "D1001",
        1,
        DRIVER_ASN.hex(),
        CardType.DRIVER,
    )
    assert (r.device_id, r.operator, r.route, r.vehicle, r.occurred_at) == (
        "bus0042",
        "citybus",
        "r12",
        "v7",
        T0,
    )
    assert bus.terminal.shift == {
        "driver": "D1001",
        "shift_no": 1,
        "opened_at": int(T0.timestamp()),
    }

    bus.later(3600)
    closed = bus.tap(driver())
    assert closed.outcome is Outcome.SHIFT_CLOSED
    c = closed.record
    assert (c.kind, c.driver, c.shift_no, c.card_asn) == (
        RecordKind.SHIFT_CLOSE,
        "D1001",
        1,
        DRIVER_ASN.hex(),
    )
    assert c.occurred_at == T0 + timedelta(hours=1) and c.device_seq == r.device_seq + 1
    assert bus.terminal.shift is None
    assert bus.tap(rider()).outcome is Outcome.NO_SHIFT

    bus.later(60)
    again = bus.tap(driver())
    assert again.outcome is Outcome.SHIFT_OPENED and again.record.shift_no == 2
    assert [x.device_seq for x in bus.journal.unsent(10)] == [1, 2, 3]


def test_driver_handover_closes_the_old_shift_and_opens_the_new_one(on_shift):
    bus = on_shift
    bus.later(120)
    result = bus.tap(driver("D2002", DRIVER2_ASN))
    assert result.outcome is Outcome.SHIFT_OPENED
    kinds = [(r.kind, r.driver, r.shift_no) for r in bus.records()]
    assert kinds == [
        (RecordKind.SHIFT_OPEN, "D1001", 1),
        (RecordKind.SHIFT_CLOSE, "D1001", 1),
        (RecordKind.SHIFT_OPEN, "D2002", 2),
    ]
    handover_close = bus.records()[1]
    assert "D2002" in handover_close.reason and handover_close.occurred_at == T0 + timedelta(seconds=180)
    assert bus.terminal.shift["driver"] == "D2002" and bus.terminal.shift["shift_no"] == 2
    assert result.record.device_seq == 3
    bus.later(10)
    paid = bus.tap(rider())
    assert paid.outcome is Outcome.PAID and (paid.record.driver, paid.record.shift_no) == ("D2002", 2)


def test_shift_numbers_keep_growing_across_a_restart(tmp_path):
    bus = Bus(tmp_path)
    assert bus.tap(driver()).outcome is Outcome.SHIFT_OPENED
    bus.later(60)
    assert bus.tap(driver()).outcome is Outcome.SHIFT_CLOSED
    bus.journal.close()
    bus = Bus(tmp_path)  # power cycle: a new process on the same journal
    bus.later(120)
    assert bus.tap(driver()).outcome is Outcome.SHIFT_OPENED
    opens = [r.shift_no for r in bus.records(RecordKind.SHIFT_OPEN)]
    bus.journal.close()
    assert opens == [1, 2]


# --------------------------------------------------------------------------------------- paying


def test_rider_pays_the_route_fare_with_a_verifiable_tac(on_shift):
    bus = on_shift
    card = rider(balance=1000)
    sequence_before = bus.psam.sequence
    result = bus.tap(card)
    assert result.outcome is Outcome.PAID
    assert card.balance == 1000 - 200 == 800 and card.ttc == 1
    assert (result.fare, result.balance) == (200, 800)
    r = result.record
    assert r.kind is RecordKind.PURCHASE
    assert (r.amount, r.balance_after, r.card_ttc, r.card_type) == (200, card.balance, 0, CardType.ADULT)
    assert (r.card_asn, r.terminal_id) == (RIDER_ASN.hex(), TERMINAL_ID.hex())
    assert r.terminal_seq == sequence_before == 41 and bus.psam.sequence == 42
    assert (r.driver, r.shift_no, r.route, r.vehicle, r.occurred_at) == ("D1001", 1, "r12", "v7", bus.now)
    assert r.reason == ""
    expected = ref_purchase_tac(TEST_ISSUER_KEYS.tac, RIDER_ASN, 200, TERMINAL_ID, 41, bus.now, 0x09)
    assert r.tac == expected.hex() and len(r.tac) == 8
    assert card.log[0].tac == expected  # the card agrees with the record
    # the completed record is in the outbox, not pending
    assert bus.journal.pending() == [] and bus.journal.unsent(10)[-1] == r


def test_two_riders_and_a_second_fare(on_shift):
    bus = on_shift
    a, b = rider(balance=500), rider(balance=1234, asn=OTHER_ASN, card_type=CardType.STUDENT)
    ra, rb = bus.tap(a), bus.tap(b)
    bus.later(31)
    ra2 = bus.tap(a)
    assert [x.outcome for x in (ra, rb, ra2)] == [Outcome.PAID] * 3
    assert (a.balance, b.balance) == (100, 1034) and (a.ttc, b.ttc) == (2, 1)
    assert (ra2.record.card_ttc, ra2.record.balance_after, ra2.record.terminal_seq) == (1, 100, 43)
    assert ra2.record.tac == ref_purchase_tac(
        TEST_ISSUER_KEYS.tac, RIDER_ASN, 200, TERMINAL_ID, 43, bus.now, 0x09
    ).hex()
    assert rb.record.tac == ref_purchase_tac(
        TEST_ISSUER_KEYS.tac, OTHER_ASN, 200, TERMINAL_ID, 42, T0 + timedelta(seconds=60), 0x09
    ).hex()
    seqs = [r.device_seq for r in bus.records(RecordKind.PURCHASE)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


def test_exact_balance_pays_down_to_zero(on_shift):
    card = rider(balance=FARE)
    result = on_shift.tap(card)
    assert result.outcome is Outcome.PAID and card.balance == 0 and result.record.balance_after == 0


def test_insufficient_balance_leaves_the_card_untouched(on_shift):
    bus = on_shift
    card = rider(balance=FARE - 1)
    sequence_before = bus.psam.sequence
    result = bus.tap(card)
    assert result.outcome is Outcome.INSUFFICIENT_BALANCE and result.fare == FARE
    assert card.balance == FARE - 1 and card.ttc == 0 and card.log == []
    assert bus.records(RecordKind.PURCHASE) == [] and bus.journal.pending() == []
    assert bus.psam.sequence == sequence_before


def test_deny_listed_card_is_blocked_and_recorded(tmp_path):
    bus = Bus(tmp_path, deny=[RIDER_ASN.hex()])
    bus.tap(driver())
    card = rider()
    result = bus.tap(card)
    assert result.outcome is Outcome.CARD_BLOCKED
    r = result.record
    assert (r.kind, r.card_asn, r.card_type, r.amount) == (
        RecordKind.DENIED,
        RIDER_ASN.hex(),
        CardType.ADULT,
        0,
    )
    assert r.reason and r.tac == ""
    assert card.balance == 1000 and card.ttc == 0 and card.log == []
    assert bus.journal.unsent(10)[-1] == r and bus.records(RecordKind.PURCHASE) == []
    # a card not on the list pays as usual on the same bus
    assert bus.tap(rider(asn=OTHER_ASN)).outcome is Outcome.PAID
    bus.journal.close()


def test_deny_listed_card_is_blocked_even_without_a_shift(tmp_path):
    bus = Bus(tmp_path, deny=[RIDER_ASN])
    result = bus.tap(rider())
    assert result.outcome is Outcome.CARD_BLOCKED and result.record.kind is RecordKind.DENIED
    bus.journal.close()


def test_card_with_a_blocked_application(on_shift):
    card = rider()
    card.blocked = True
    result = on_shift.tap(card)
    assert result.outcome is Outcome.CARD_BLOCKED and card.balance == 1000
    assert on_shift.records(RecordKind.PURCHASE) == []


@pytest.mark.parametrize(
    "start,end,outcome",
    [
        (date(2020, 1, 1), date(2024, 3, 4), Outcome.CARD_EXPIRED),  # ended yesterday
        (date(2024, 3, 6), date(2028, 1, 1), Outcome.CARD_EXPIRED),  # valid from tomorrow
        (date(2020, 1, 1), date(2024, 3, 5), Outcome.PAID),  # last valid day
        (date(2024, 3, 5), date(2028, 1, 1), Outcome.PAID),  # first valid day
    ],
    ids=["expired", "not-yet-valid", "last-day", "first-day"],
)
def test_validity_dates(on_shift, start, end, outcome):
    card = rider(start=start, end=end)
    result = on_shift.tap(card)
    assert result.outcome is outcome
    assert card.balance == (1000 if outcome is Outcome.CARD_EXPIRED else 800)
    assert len(on_shift.records(RecordKind.PURCHASE)) == (0 if outcome is Outcome.CARD_EXPIRED else 1)


def test_double_tap_within_the_window_is_already_paid(on_shift):
    bus = on_shift
    card = rider(balance=1000)
    assert bus.tap(card).outcome is Outcome.PAID
    bus.later(29)
    second = bus.tap(card)
    assert second.outcome is Outcome.ALREADY_PAID and second.record is None
    assert card.balance == 800 and len(bus.records(RecordKind.PURCHASE)) == 1
    bus.later(1)  # 30 s after paying: the window (30 s) is over
    assert bus.tap(card).outcome is Outcome.PAID
    assert card.balance == 600 and len(bus.records(RecordKind.PURCHASE)) == 2


# --------------------------------------------------------------------------------------- card pulled away


class PulledBeforeDebit:
    """The card leaves the field just as DEBIT FOR PURCHASE (INS 54) is sent: the card never sees it."""

    def __init__(self, card: SimCard):
        self.card = card

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1] == 0x54:
            raise CardRemoved("card left the field before DEBIT")
        return self.card.transmit(apdu)


class PulledAfterDebit(PulledBeforeDebit):
    """The card debits, but leaves the field before its answer (TAC, MAC2) reaches the reader."""

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.card.transmit(apdu)
        if apdu[1] == 0x54:
            raise CardRemoved("card left the field before answering DEBIT")
        return answer


def test_card_removed_before_debit_leaves_a_grey_record(on_shift):
    bus = on_shift
    card = rider(balance=1000)
    result = bus.tap(PulledBeforeDebit(card))
    assert result.outcome is Outcome.TAP_AGAIN and result.record is None
    assert card.balance == 1000 and card.ttc == 0
    [grey] = bus.journal.pending()
    assert (grey.kind, grey.card_asn, grey.amount, grey.card_ttc, grey.tac) == (
        RecordKind.PURCHASE,
        RIDER_ASN.hex(),
        200,
        0,
        "",
    )
    assert grey.device_seq not in [r.device_seq for r in bus.journal.unsent(100)]
    assert bus.records(RecordKind.PURCHASE) == []
    assert screen_text(result.outcome) == "请重新刷卡 Please tap again"


def test_grey_record_is_resolved_when_the_card_comes_back(on_shift):
    bus = on_shift
    card = rider(balance=1000)
    assert bus.tap(PulledBeforeDebit(card)).outcome is Outcome.TAP_AGAIN
    bus.later(5)
    assert bus.tap(card).outcome is Outcome.PAID
    assert card.balance == 800
    assert bus.journal.pending() == []  # the card never debited: cancelled, not left grey


def test_debit_with_a_lost_answer_is_not_charged_twice(on_shift):
    bus = on_shift
    card = rider(balance=1000)
    assert bus.tap(PulledAfterDebit(card)).outcome is Outcome.TAP_AGAIN
    assert card.balance == 800  # the card did debit
    bus.later(5)
    bus.tap(card)
    purchases = bus.journal.unsent(100)
    assert card.balance == 800, f"charged twice: balance {card.balance}"
    assert [r.tac for r in purchases if r.kind is RecordKind.PURCHASE] == [card.log[-1].tac.hex()]


# --------------------------------------------------------------------------------------- out of service


def test_route_without_a_fare_is_out_of_service_not_a_crash(tmp_path):
    bus = Bus(tmp_path, route="r99")
    try:
        bus.tap(driver())
        card = rider()
        result = bus.tap(card)
        assert result.outcome is Outcome.OUT_OF_SERVICE and card.balance == 1000
    finally:
        bus.journal.close()


# --------------------------------------------------------------------------------------- the screen


def test_screen_text_after_a_purchase(on_shift):
    result = on_shift.tap(rider(balance=1234))
    assert (
        screen_text(result.outcome, result.fare, result.balance)
        == "扣款成功 Paid | 票价 Fare ¥2.00 | 余额 Balance ¥10.34"
    )


@pytest.mark.parametrize(
    "outcome,fare,balance,expected",
    [
        (Outcome.INSUFFICIENT_BALANCE, 200, None, "余额不足 Insufficient balance | 票价 Fare ¥2.00"),
        (Outcome.ALREADY_PAID, None, None, "已付款 Already paid"),
        (Outcome.CARD_BLOCKED, None, None, "此卡已停用 Card blocked"),
        (Outcome.CARD_EXPIRED, None, None, "卡已过期 Card expired"),
        (Outcome.NO_SHIFT, None, None, "司机未签到 Driver not signed in"),
        (Outcome.PAID, 5, 0, "扣款成功 Paid | 票价 Fare ¥0.05 | 余额 Balance ¥0.00"),
        (Outcome.PAID, 100, 1234567, "扣款成功 Paid | 票价 Fare ¥1.00 | 余额 Balance ¥12345.67"),
    ],
)
def test_screen_text_both_languages(outcome, fare, balance, expected):
    assert screen_text(outcome, fare, balance) == expected


def test_every_outcome_has_chinese_and_english():
    for outcome in Outcome:
        text = screen_text(outcome)
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text), outcome
        assert any(ch.isascii() and ch.isalpha() for ch in text), outcome


def test_yuan():
    assert [yuan(x) for x in (0, 1, 10, 99, 100, 101, 12345, -5, -250)] == [
        "0.00",
        "0.01",
        "0.10",
        "0.99",
        "1.00",
        "1.01",
        "123.45",
        "-0.05",
        "-2.50",
    ]


def test_validity_dates_are_the_local_calendar_days_of_the_bus(on_shift):
    # 17:00 UTC on 5 March is 01:00 on 6 March in Shanghai: a card that ended on 5 March no longer rides.
    on_shift.now = datetime(2024, 3, 5, 17, 0, tzinfo=UTC)
    card = rider(start=date(2020, 1, 1), end=date(2024, 3, 5))
    assert on_shift.tap(card).outcome is Outcome.CARD_EXPIRED and card.balance == 1000


class FullDiskJournal(Journal):
    """A journal on a disk that has just filled up: every write fails as SQLite reports it."""

    def _write(self, record, state):
        raise sqlite3.OperationalError("database or disk is full")


def test_a_full_disk_stops_fares_before_any_money_moves(tmp_path):
    bus = Bus(tmp_path)
    assert bus.tap(driver()).outcome is Outcome.SHIFT_OPENED
    bus.journal.close()
    bus.journal = bus.terminal.journal = FullDiskJournal(tmp_path / "bus0042.journal")
    bus.later(60)
    card = rider(balance=1000)
    result = bus.tap(card)
    assert result.outcome is Outcome.OUT_OF_SERVICE and "disk is full" in result.detail
    assert card.balance == 1000  # the grey record could not be written, so no DEBIT was sent
    bus.journal.close()


# --------------------------------------------------------------------------------------- fares from the table

TABLE = FareTable(
    version=3,
    flat={"r12": 200, "r30": 300},
    distance={"k8": DistanceFare((Stage(5, 200), Stage(10, 300), Stage(30, 500)))},
    discounts={CardType.STUDENT: 50, CardType.ELDERLY: 0},
    transfer=Transfer(window_minutes=90, discount=100),
    min_balance=100,
)


def card_transit_record(card: SimCard) -> TransitRecord | None:
    """Read the transit record off the card with plain APDUs, as any reader would."""
    assert card.transmit(bytes.fromhex("00A4040008A000000632010105"))[-2:] == b"\x90\x00"
    answer = card.transmit(bytes.fromhex("00B202BC40"))
    if answer == b"\x6a\x83":
        return None
    assert answer[-2:] == b"\x90\x00"
    return TransitRecord.decode(answer[:-2])


@pytest.fixture
def two_buses(tmp_path):
    a = Bus(tmp_path, route="r30", fares=TABLE, terminal_id=bytes.fromhex("010000000301"), name="bus0301")
    b = Bus(tmp_path, route="r12", fares=TABLE, name="bus0042")
    for bus, staff in ((a, "D1"), (b, "D2")):
        assert bus.tap(driver(staff_no=staff)).outcome is Outcome.SHIFT_OPENED
        bus.later(60)
    yield a, b
    a.journal.close()
    b.journal.close()


def test_a_ride_writes_the_transit_record_with_the_debit(on_shift):
    card = rider()
    result = on_shift.tap(card)
    assert result.record.tx_type == 0x09 and result.record.full_fare == 200
    trip = card_transit_record(card)
    assert (trip.state, trip.route, trip.vehicle, trip.driver) == (TripState.DONE, "r12", "v7", "D1001")
    assert (trip.terminal_id, trip.at, trip.amount) == (TERMINAL_ID, on_shift.now, 200)


def test_transfer_to_another_route_within_the_window(two_buses):
    a, b = two_buses
    card = rider(balance=1000)
    assert a.tap(card).fare == 300
    b.now = a.now + timedelta(minutes=40)
    result = b.tap(card)
    assert (result.outcome, result.fare, result.balance) == (Outcome.PAID, 100, 600)
    assert result.record.full_fare == 200 and "transfer from r30" in result.record.reason
    b.later(60 * 60)  # past the window: full fare again, even after a transfer
    c = rider(balance=1000, asn=OTHER_ASN)
    assert b.tap(c).fare == 200 and b.tap(card).fare == 200


def test_concession_cards_pay_their_share_and_free_rides_are_recorded(two_buses):
    _a, b = two_buses
    student, elder = rider(card_type=CardType.STUDENT), rider(asn=OTHER_ASN, card_type=CardType.ELDERLY)
    s, e = b.tap(student), b.tap(elder)
    assert (s.fare, student.balance) == (100, 900)
    assert (e.outcome, e.fare, elder.balance) == (Outcome.PAID, 0, 1000)
    assert e.record.tac == ref_purchase_tac(TEST_ISSUER_KEYS.tac, OTHER_ASN, 0, TERMINAL_ID, e.record.terminal_seq,
                                            b.now, 0x09).hex()


def test_minimum_balance_refuses_without_touching_the_card(two_buses):
    _a, b = two_buses
    card = rider(balance=99, card_type=CardType.ELDERLY)  # a free ride, but below the 100 fen minimum
    result = b.tap(card)
    assert result.outcome is Outcome.INSUFFICIENT_BALANCE and card.balance == 99 and card.ttc == 0
    assert b.journal.pending() == [] and b.records(RecordKind.PURCHASE) == []


def test_distance_fare_entry_and_exit(tmp_path):
    bus = Bus(tmp_path, route="k8", fares=TABLE)
    bus.tap(driver())
    card = rider(balance=1000)
    bus.terminal.at_stop(2)
    bus.later(60)
    entry = bus.tap(card)
    assert (entry.outcome, entry.fare, card.balance) == (Outcome.ENTERED, 0, 1000)
    assert (entry.record.entry_stop, entry.record.exit_stop, entry.record.amount) == (2, 0, 0)
    assert card_transit_record(card).state is TripState.ON_BOARD
    bus.terminal.at_stop(9)
    bus.later(20 * 60)
    out = bus.tap(card)
    assert (out.outcome, out.fare, card.balance) == (Outcome.PAID, 300, 700)  # 7 stops: the 10-stop stage
    assert (out.record.entry_stop, out.record.exit_stop) == (2, 9)
    assert card_transit_record(card).state is TripState.DONE
    bus.journal.close()


def test_entry_needs_the_maximum_fare_and_an_evaded_exit_is_recovered(tmp_path):
    bus = Bus(tmp_path, route="k8", fares=TABLE)
    bus.tap(driver())
    bus.later(60)
    poor = rider(balance=499)
    assert bus.tap(poor).outcome is Outcome.INSUFFICIENT_BALANCE and poor.ttc == 0
    card = rider(balance=2000, asn=OTHER_ASN)
    assert bus.tap(card).outcome is Outcome.ENTERED
    bus.now += timedelta(hours=5)  # never tapped out; boards again hours later
    again = bus.tap(card)
    assert (again.outcome, again.fare, card.balance) == (Outcome.PAID, 500, 1500)
    assert "unfinished trip on k8" in again.record.reason
    assert card_transit_record(card).state is TripState.ON_BOARD  # and this is a new trip's entry
    bus.journal.close()


def test_a_new_fare_table_applies_from_the_next_tap(on_shift):
    on_shift.terminal.replace_fares(FareTable(version=2, flat={"r12": 250}))
    assert on_shift.tap(rider()).fare == 250


# --------------------------------------------------------------------------------------- deny list


def test_deny_listed_card_is_locked_on_the_card_itself(tmp_path):
    bus = Bus(tmp_path, deny=[RIDER_ASN.hex()])
    bus.tap(driver())
    card = rider()
    first = bus.tap(card)
    assert first.outcome is Outcome.CARD_BLOCKED and first.record.reason == "on deny list; application blocked"
    assert card.blocked
    # Anywhere else, even on a validator with an old list, the card now refuses to pay.
    other = Bus(tmp_path, name="bus0099")
    other.tap(driver())
    again = other.tap(card)
    assert again.outcome is Outcome.CARD_BLOCKED and card.balance == 1000
    for b in (bus, other):
        b.journal.close()


class PulledDuringBlock(PulledBeforeDebit):
    def transmit(self, apdu: bytes) -> bytes:
        if apdu[:2] == b"\x84\x1e":
            raise CardRemoved("card left the field before APPLICATION BLOCK")
        return self.card.transmit(apdu)


def test_a_block_that_fails_is_still_recorded(tmp_path):
    bus = Bus(tmp_path, deny=[RIDER_ASN.hex()])
    card = rider()
    result = bus.tap(PulledDuringBlock(card))
    assert result.outcome is Outcome.CARD_BLOCKED and not card.blocked
    assert "could not block" in result.record.reason and bus.records(RecordKind.DENIED) == [result.record]
    # Issue 9 hole 3: that reason (91 characters as built) is written within the wire's limit, so it can be sent.
    from wire import codec

    assert len(result.record.reason) <= codec.MAX_TEXT
    codec.encode_batch(bus.journal.unsent(10), key=b"k" * 32)
    bus.journal.close()


def test_a_new_deny_list_applies_from_the_next_tap(on_shift):
    card = rider()
    assert on_shift.tap(card).outcome is Outcome.PAID
    on_shift.terminal.replace_deny_list(DenyList.from_asns([RIDER_ASN.hex()], version=2))
    on_shift.later(60)
    assert on_shift.tap(card).outcome is Outcome.CARD_BLOCKED and card.blocked


# --------------------------------------------------------------------------------------- cards that misbehave


class Answers:
    """A card whose answer to one instruction is replaced."""

    def __init__(self, card: SimCard, ins: int, answer: bytes):
        self.card, self.ins, self.answer = card, ins, answer

    def transmit(self, apdu: bytes) -> bytes:
        real = self.card.transmit(apdu)
        return self.answer if apdu[1] == self.ins else real


@pytest.mark.parametrize("ins, answer, outcome", [
    (0xB0, b"\x6a\x82", Outcome.CARD_UNREADABLE),  # no public file: not our card
    (0xB0, b"\x01\x02\x90\x00", Outcome.CARD_UNREADABLE),  # truncated public file
    (0x50, b"\x6a\x81", Outcome.CARD_UNREADABLE),  # unexpected status word
    (0x50, b"\x93\x02", Outcome.TAP_AGAIN),
    (0x50, b"", Outcome.CARD_UNREADABLE),  # a card that answers nothing at all
])
def test_bad_cards_get_a_clear_outcome_and_take_nothing(on_shift, ins, answer, outcome):
    card = rider()
    result = on_shift.tap(Answers(card, ins, answer))
    assert result.outcome is outcome and card.balance == 1000
    assert on_shift.journal.pending() == [] and on_shift.records(RecordKind.PURCHASE) == []
    assert on_shift.tap(rider(asn=OTHER_ASN)).outcome is Outcome.PAID  # and the validator keeps going


def test_a_transit_record_we_cannot_read_is_overwritten_not_a_refusal(on_shift):
    card = rider()
    # A record another scheme wrote (or garbage): the rider pays the plain fare and gets a fresh record.
    result = on_shift.tap(Answers(card, 0xB2, b"\x99" * 64 + b"\x90\x00"))
    assert (result.outcome, result.fare, card.balance) == (Outcome.PAID, 200, 800)
    assert card_transit_record(card).route == "r12"


# --------------------------------------------------------------------------------------- the driver's totals


def test_sign_out_and_hand_over_show_the_shift_totals(two_buses):
    _a, bus = two_buses  # D2 signed in on r12: adults pay 200, students 100
    riders = [rider(asn=bytes.fromhex(f"3100000000000007{n:04d}"), card_type=t)
              for n, t in enumerate([CardType.ADULT, CardType.STUDENT, CardType.ADULT, CardType.ELDERLY])]
    paid = [bus.tap(c).fare for c in riders]
    bus.tap(PulledBeforeDebit(rider(asn=OTHER_ASN)))  # grey: not in the totals until settled
    handed = bus.tap(driver(staff_no="D3", asn=DRIVER2_ASN))
    assert handed.outcome is Outcome.SHIFT_OPENED
    report = handed.report
    assert (report.driver, report.close_reason, report.unsettled) == ("D2", "handed over to D3", 1)
    by_type = {r.card_type: (r.taps, r.amount) for r in report.rows}
    assert by_type == {CardType.ADULT: (2, 400), CardType.STUDENT: (1, 100), CardType.ELDERLY: (1, 0)}
    assert (report.taps, report.amount) == (len(paid), sum(paid)) == (4, 500)
    bus.later(60)
    assert bus.tap(rider(asn=bytes.fromhex("31000000000000080001"))).fare == 200
    closed = bus.tap(driver(staff_no="D3", asn=DRIVER2_ASN))
    assert closed.outcome is Outcome.SHIFT_CLOSED and (closed.report.taps, closed.report.amount) == (1, 200)
    assert bus.terminal.shift_report().shift_no == closed.report.shift_no  # the reprint is the last shift
    assert bus.terminal.shift_report(report.shift_no) == report


def test_a_device_id_or_operator_longer_than_the_wire_carries_is_refused_at_start():
    """Issue 9 hole 3: every record carries both, so a longer one would make every batch unsendable."""
    from validator.terminal import TerminalConfig

    with pytest.raises(ValueError, match="1 to 32 characters"):
        TerminalConfig(device_id="b" * 33, operator="citybus", route="r12", vehicle="v7")
    with pytest.raises(ValueError, match="operator"):
        TerminalConfig(device_id="bus0042", operator="", route="r12", vehicle="v7")

"""The ledger per card (pure): findings for a counter jump, a balance that does not follow, the same counter
with different content; a first purchase or load missing after issue, found by the card's counters at issue;
loads and taps put in order by the balances the card reported, whatever the buses' clocks say (with
hypothesis: skewed clocks give no findings, a lost tap is still found); and, with hypothesis, money conserved
across loads, purchases, refunds and adjustments on a real simulated card (the host's MAC2 loads it, a
simulated PSAM debits it): the ledger equals the card's balance."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backoffice.cards import cases
from backoffice.cards.issuance import read_card
from backoffice.cards.ledger import ADJUSTMENT, LOAD, PURCHASE, REFUND, Movement, check
from backoffice.keyservice import LoadRequest, LocalKeyService
from epurse import apdu, crypto
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam

T0 = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)
TERMINAL = bytes.fromhex("0B0000000007")
KEYS = LocalKeyService(TEST_ISSUER_KEYS, source="test keys")


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def kinds(ledger) -> list[str]:
    return sorted(f.kind for f in ledger.findings)


def test_a_clean_history_agrees_with_the_card():
    moves = [Movement(LOAD, 1000, at(0), 0, 1500, "l0"), Movement(PURCHASE, 200, at(1), 0, 1300, "p0"),
             Movement(PURCHASE, 200, at(2), 1, 1100, "p1"), Movement(LOAD, 500, at(3), 1, 1600, "l1")]
    ledger = check(moves, opening=500)
    assert ledger.findings == [] and ledger.agrees
    assert (ledger.balance, ledger.card_balance) == (1600, 1600)


def test_a_missing_purchase_is_a_counter_jump_and_a_balance_that_does_not_follow():
    moves = [Movement(PURCHASE, 200, at(1), 0, 800, "p0"), Movement(PURCHASE, 200, at(3), 2, 400, "p2")]
    ledger = check(moves, opening=1000)
    assert kinds(ledger) == [cases.BALANCE_MISMATCH, cases.BALANCE_MISMATCH, cases.COUNTER_JUMP]
    assert (ledger.balance, ledger.card_balance) == (600, 400) and not ledger.agrees
    fixed = check([*moves, Movement(ADJUSTMENT, -200, at(4), ref="lost tap")], opening=1000)
    assert fixed.agrees and fixed.balance == 400
    assert kinds(fixed) == [cases.BALANCE_MISMATCH, cases.COUNTER_JUMP]  # the history still shows the gap


def test_the_same_counter_with_different_content_is_found_and_counted_once():
    a = Movement(PURCHASE, 200, at(1), 5, 800, "tap bus1/9", ("t1", 9))
    clone = Movement(PURCHASE, 200, at(2), 5, 800, "tap bus2/4", ("t2", 4))
    copy = Movement(PURCHASE, 200, at(1), 5, 800, "tap bus1/9 again", ("t1", 9))
    ledger = check([a, clone, copy], opening=1000)
    assert kinds(ledger) == [cases.SAME_COUNTER_DIFFERENT]
    assert ledger.purchases == 200 and ledger.agrees


def test_refunds_leave_the_book_and_not_the_chip():
    moves = [Movement(PURCHASE, 300, at(1), 0, 700, "p0"), Movement(REFUND, 700, at(9), ref="lost card")]
    ledger = check(moves, opening=1000)
    assert ledger.balance == 0 and ledger.card_balance == 700 and ledger.agrees and ledger.findings == []


# --- the card's counters at issue: a record missing before the first one the ledger has ---------------------


def test_a_lost_first_tap_hidden_by_a_later_load_and_tap_is_found_by_the_counters_at_issue():
    # From 1000 fen the first tap (200, offline counter 0) never arrived; then 200 was loaded and 200 tapped.
    # The card holds 800, yet the two records follow from 1000 and end where the card's last word (the load's
    # 1000) says: without the counters at issue the books agree and nothing is found.
    moves = [Movement(LOAD, 200, at(5), 0, 1000, "load 1"), Movement(PURCHASE, 200, at(6), 1, 800, "tap 2")]
    blind = check(moves, opening=1000)
    assert blind.findings == [] and blind.agrees and blind.balance == 1000
    ledger = check(moves, opening=1000, opening_purchase_ttc=0, opening_load_ttc=0)
    assert [(f.kind, f.key) for f in ledger.findings] == [(cases.COUNTER_JUMP, "purchase@issue0-1")]
    assert ledger.findings[0].detail == ("1 purchase after issue missing: the card's purchase counter was 0 "
                                         "at issue, the first record (tap 2) has 1")


def test_a_missing_first_load_and_several_missing_first_taps_name_their_place():
    moves = [Movement(LOAD, 500, at(1), 3, 1500, "l3"), Movement(PURCHASE, 200, at(2), 9, 1300, "p9")]
    ledger = check(moves, opening=1000, opening_purchase_ttc=7, opening_load_ttc=2)
    found = {f.key: f for f in ledger.findings if f.kind == cases.COUNTER_JUMP}
    assert set(found) == {"load@issue2-3", "purchase@issue7-9"}
    assert found["purchase@issue7-9"].detail.startswith(
        "2 purchases after issue missing: the card's purchase counter was 7 at issue")
    assert found["load@issue2-3"].detail.startswith(
        "1 load after issue missing: the card's load counter was 2")


def test_a_history_from_issue_raises_nothing_and_unknown_counters_check_as_before():
    # A card used before issue (counters 7 and 2): its first records after issue carry exactly those counters.
    moves = [Movement(LOAD, 1000, at(0), 2, 1500, "l2"), Movement(PURCHASE, 200, at(1), 7, 1300, "p7"),
             Movement(PURCHASE, 200, at(2), 8, 1100, "p8"), Movement(LOAD, 500, at(3), 3, 1600, "l3")]
    ledger = check(moves, opening=500, opening_purchase_ttc=7, opening_load_ttc=2)
    assert ledger.findings == [] and ledger.agrees
    # One counter known, the other not: only the known one is checked.
    assert check(moves[1:], opening=1500, opening_purchase_ttc=7).findings == []
    assert [f.key for f in check(moves[1:], opening=1500, opening_load_ttc=2).findings] == ["load@issue2-3"]
    # No records of a kind: nothing to compare the counter with (a lost last record is never visible).
    assert check([], opening=500, opening_purchase_ttc=7, opening_load_ttc=2).findings == []
    # Unknown counters (a card issued before they were read): the same findings as ever.
    gap = [Movement(PURCHASE, 200, at(1), 1, 800, "p1"), Movement(PURCHASE, 200, at(3), 3, 400, "p3")]
    assert check(gap, opening=1000).findings == check(gap, opening=1000, opening_purchase_ttc=None,
                                                      opening_load_ttc=None).findings
    assert kinds(check(gap, opening=1000)) == [cases.BALANCE_MISMATCH, cases.BALANCE_MISMATCH,
                                               cases.COUNTER_JUMP]


# --- loads and purchases merged by the balances the card reported, not by the bus's clock -------------------


def hm(hour: int, minute: int) -> datetime:
    return datetime(2026, 11, 22, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize("skew", [-5, +5])
def test_a_bus_clock_minutes_off_does_not_make_a_balance_look_wrong(skew):
    # A load at 10:00 (the host's clock, which is right); a tap at 10:02 real time. A bus 5 minutes slow
    # dates the tap 09:57, before the load; its balance says it came after.
    moves = [Movement(LOAD, 500, hm(10, 0), 0, 1500, "load at 10:00"),
             Movement(PURCHASE, 200, hm(10, 2) + timedelta(minutes=skew), 0, 1300, "tap at 10:02 real")]
    ledger = check(moves, opening=1000)
    assert ledger.findings == [] and ledger.agrees
    assert (ledger.balance, ledger.card_balance) == (1300, 1300)


def test_a_zero_fare_or_a_tap_without_a_balance_dated_on_the_wrong_side_of_a_load():
    # A free transfer at 09:58 real time, dated 10:03 by a fast bus: at 1000 fen both it and the load
    # follow; only with the transfer first does the load still follow.
    free = [Movement(PURCHASE, 0, hm(10, 3), 0, 1000, "free transfer"),
            Movement(LOAD, 500, hm(10, 0), 0, 1500, "l0")]
    assert check(free, opening=1000).findings == []
    # A tap that reported no balance, dated before the load by a slow bus: the load's balance puts it first.
    silent = [Movement(LOAD, 500, hm(10, 0), 0, 1500, "l0"),
              Movement(PURCHASE, 200, hm(9, 57), 0, None, "p0"),
              Movement(PURCHASE, 200, hm(10, 10), 1, 1100, "p1")]
    ledger = check(silent, opening=1000)
    assert ledger.findings == [] and ledger.agrees and ledger.card_balance == 1100


@pytest.mark.parametrize(("tap_at", "wrong"), [(hm(10, 1), "purchase0"), (hm(9, 59), "load0")])
def test_when_the_balances_cannot_tell_the_times_decide(tap_at, wrong):
    # From 1000 fen both follow, but not one after the other (one of them is wrong): whichever the times put
    # second is the one that does not follow.
    moves = [Movement(LOAD, 500, hm(10, 0), 0, 1500, "l0"), Movement(PURCHASE, 200, tap_at, 0, 800, "p0")]
    ledger = check(moves, opening=1000)
    assert [(f.kind, f.key) for f in ledger.findings if not f.key.startswith("book@")] == \
        [(cases.BALANCE_MISMATCH, wrong)]


@pytest.mark.parametrize("skew", [-5, +40])  # +40: the bus dates the tap after the next load, as well
def test_a_missing_load_is_one_finding_whatever_the_bus_clock(skew):
    bus = timedelta(minutes=skew)
    moves = [Movement(LOAD, 500, hm(8, 0), 0, 1500, "l0"),
             Movement(PURCHASE, 200, hm(8, 30) + bus, 0, 1300, "p0"),
             # load 1 (+500 at 09:00, 1800 fen) never reached the ledger
             Movement(PURCHASE, 200, hm(9, 30) + bus, 1, 1600, "p1"),
             Movement(LOAD, 500, hm(10, 0), 2, 2100, "l2"),
             Movement(PURCHASE, 200, hm(10, 30) + bus, 2, 1900, "p2")]
    ledger = check(moves, opening=1000)
    assert sorted((f.kind, f.key) for f in ledger.findings) == [
        (cases.BALANCE_MISMATCH, "book@purchase2"),  # the book lacks the load the card has
        (cases.BALANCE_MISMATCH, "purchase1"),  # the first tap after the gap, once
        (cases.COUNTER_JUMP, "load0-2")]
    assert (ledger.balance, ledger.card_balance) == (1400, 1900)


# A real history: loads (1 fen to 50 yuan) and taps (free up to 5 yuan; one the card cannot pay is refused and
# leaves no record), real times a minute or more apart, each tap dated by a bus clock up to 30 minutes off.
history = st.lists(st.tuples(st.sampled_from([LOAD, PURCHASE]), st.integers(0, 5000), st.integers(1, 20),
                             st.integers(-30 * 60, 30 * 60)), max_size=25)


def real_history(opening: int, steps) -> tuple[list[Movement], int]:
    moves: list[Movement] = []
    balance, counters, now = opening, {LOAD: 3, PURCHASE: 7}, T0  # the test's own sum, a plain loop
    for kind, amount, gap, skew in steps:
        now += timedelta(minutes=gap)
        if kind == LOAD:
            amount = max(amount, 1)
            balance += amount
            moves.append(Movement(LOAD, amount, now, counters[LOAD], balance, f"load {len(moves)}"))
        else:
            amount %= 501
            if amount > balance:
                continue
            balance -= amount
            bus_time = now + timedelta(seconds=skew)
            moves.append(Movement(PURCHASE, amount, bus_time, counters[PURCHASE], balance,
                                  f"tap {len(moves)}"))
        counters[kind] += 1
    return moves, balance


@settings(max_examples=300, deadline=None)
@given(opening=st.integers(0, 3000), steps=history, drop=st.integers(0, 10**6))
def test_skewed_bus_clocks_give_no_findings_and_a_lost_tap_is_still_found(opening, steps, drop):
    moves, balance = real_history(opening, steps)
    ledger = check(moves, opening=opening)
    assert ledger.findings == [] and ledger.agrees
    assert ledger.balance == balance and ledger.card_balance == (balance if moves else None)
    assert check(moves, opening=opening, opening_purchase_ttc=7, opening_load_ttc=3).findings == []

    taps = [i for i, m in enumerate(moves) if m.kind == PURCHASE]
    if not taps:
        return
    lost = taps[drop % len(taps)]
    rest = moves[:lost] + moves[lost + 1:]
    found = kinds(check(rest, opening=opening))
    # With the counters at issue (real_history's 7 and 3) every lost tap but the last is a counter jump.
    known = kinds(check(rest, opening=opening, opening_purchase_ttc=7, opening_load_ttc=3))
    assert (cases.COUNTER_JUMP in known) == (lost != taps[-1])
    between_taps = taps[0] < lost < taps[-1]  # the ledger knows no counter before the first tap it has
    if between_taps:
        assert cases.COUNTER_JUMP in found
    elif lost == taps[-1] and moves[lost].amount and lost != len(moves) - 1:
        # Only loads come after it, each with a balance that lacks the fare: no order of the records follows.
        assert found and set(found) == {cases.BALANCE_MISMATCH}
    else:
        # A lost first tap: usually a later balance gives it away, but not always (a later load and tap of
        # the same amount can be merged into a history that follows without it). A lost last record, or a
        # free last tap, leaves nothing on the card's side to find.
        assert cases.COUNTER_JUMP not in found


# --- money conserved, on a real simulated card ---------------------------------------------------------------


def host_load(card: SimCard, amount: int, when: datetime) -> int:
    apdu.check(card.transmit(apdu.select_aid()), "SELECT")
    init = apdu.parse_init_load(apdu.check(card.transmit(apdu.init_load(1, amount, TERMINAL)), "INIT LOAD"))
    request = LoadRequest(asn=card.asn, algorithm=init.algorithm, balance=init.balance, online_ttc=init.online_ttc,
                          random=init.random, mac1=init.mac1, amount=amount, terminal_id=TERMINAL)
    date4, time3 = crypto.bcd_date(when), crypto.bcd_time(when)
    tac = apdu.parse_credit(apdu.check(card.transmit(apdu.credit_load(date4, time3, KEYS.load_mac2(
        request, date4, time3))), "CREDIT"))
    assert KEYS.verify_load_tac(request, date4, time3, tac)
    return init.online_ttc


def purchase(card: SimCard, psam: SimPsam, amount: int, when: datetime) -> int | None:
    apdu.check(card.transmit(apdu.select_aid()), "SELECT")
    answer = card.transmit(apdu.init_purchase(1, amount, TERMINAL))
    if answer[-2:] == b"\x94\x01":
        return None  # not enough on the card: the bus refuses the rider, nothing moves
    init = apdu.parse_init_purchase(apdu.check(answer, "INIT PURCHASE"))
    p = apdu.parse_psam_init_purchase(apdu.check(psam.transmit(apdu.psam_init_purchase(
        init.random, init.ttc, amount, 0x06, when, init.key_version, init.algorithm, card.asn[2:], card.issuer)),
        "PSAM"))
    apdu.check(card.transmit(apdu.debit_purchase(p.terminal_seq, crypto.bcd_date(when), crypto.bcd_time(when),
                                                 p.mac1)), "DEBIT")
    return init.ttc


ops = st.lists(st.tuples(st.sampled_from(["load", "purchase", "lost_tap"]), st.integers(1, 5000)), max_size=12)


class Direct:
    """A card session straight onto a SimCard, as a desk reader would give it."""

    def __init__(self, card):
        self.exchange = card.transmit


@settings(max_examples=40, deadline=None)
@given(opening=st.integers(0, 3000), ops=ops, algorithm=st.sampled_from([0x00, 0x04]),
       refund_share=st.integers(0, 100), used=st.tuples(st.integers(0, 300), st.integers(0, 300)))
def test_money_is_conserved_and_the_ledger_equals_the_card(opening, ops, algorithm, refund_share, used):
    card = SimCard(bytes.fromhex("20000000000000000099"), 1, opening, algorithm=algorithm,
                   start=date(2026, 1, 1), end=date(2030, 1, 1), ttc=used[0], online_ttc=used[1])
    issued = read_card(Direct(card))  # the counters as issuance reads them; reading them changes nothing
    assert (issued.purchase_ttc, issued.load_ttc, issued.balance) == (*used, opening)
    assert (card.ttc, card.online_ttc, card.balance, card.log) == (*used, opening, [])
    counters = {"opening_purchase_ttc": issued.purchase_ttc, "opening_load_ttc": issued.load_ttc}
    psam = SimPsam(TERMINAL)
    moves: list[Movement] = []
    loaded = spent = adjusted = lost_taps = 0  # the test's own sums, plain loops
    reported_is_current = True  # the card's last balance change reached the back office
    for i, (op, amount) in enumerate(ops):
        when = at(i)
        if op == "load":
            ttc = host_load(card, amount, when)
            moves.append(Movement(LOAD, amount, when, ttc, card.balance, f"load {i}"))
            loaded += amount
            reported_is_current = True
            continue
        ttc = purchase(card, psam, amount, when)
        if ttc is None:
            continue
        spent += amount
        reported_is_current = op == "purchase"
        if op == "purchase":
            moves.append(Movement(PURCHASE, amount, when, ttc, card.balance, f"tap {i}"))
        else:  # the bus's record of it never arrived: staff find the gap and adjust the book
            lost_taps += 1
            moves.append(Movement(ADJUSTMENT, -amount, when, ref=f"lost tap {i}"))
            adjusted -= amount
    ledger = check(moves, opening=opening, **counters)
    assert ledger.balance == card.balance  # the book, adjusted for lost taps, is what the chip holds
    if ledger.card_balance is not None and reported_is_current:
        assert ledger.card_balance == card.balance and ledger.agrees
    assert opening + loaded - spent == card.balance
    assert ledger.loads == loaded and ledger.adjustments == adjusted
    assert ledger.purchases + (-ledger.adjustments) == spent
    if lost_taps == 0:
        assert ledger.findings == []
    # The card is reported lost: part of its frozen balance is paid back.
    refund = card.balance * refund_share // 100
    if refund:
        moves.append(Movement(REFUND, refund, at(len(ops) + 1), ref="refund"))
    after = check(moves, opening=opening, **counters)
    assert after.balance == card.balance - refund and after.refunds == refund
    assert after.balance + after.refunds == card.balance
    # Conservation: what came in (opening + loads) went out as fares, refunds, or is still owed on the card.
    assert opening + loaded == spent + refund + after.balance
    if reported_is_current:
        assert after.agrees

"""Tearing: the card leaves the field after each APDU of a purchase in turn, and the next presentation settles it.

A rider purchase sends the card six APDUs (SELECT, READ BINARY 0015, READ RECORD 17/02, INITIALIZE FOR PURCHASE,
UPDATE CAPP DATA CACHE, DEBIT FOR PURCHASE). For each k = 1..6, in two variants:

- **answer lost**: the card carries out the k-th command (a DEBIT is on the card's EEPROM) but is gone before
  its answer reaches the reader;
- **never received**: the card is gone before the k-th command reaches it.

The validator says "tap again". The card comes back 5 s later (inside the double-tap window) or 2 minutes later
(a new ride). Then, from the journal file (plain sqlite3) and the card itself: one completed record per debit, with
the card's TAC, amounts adding up to the balance lost, no grey record left; the rider's retry inside the window is
charged nothing more if the first DEBIT went through, and once otherwise; two minutes later it is a new fare.
Both for a 3DES and an SM4 card. Then the same with the retry torn too, at each of its own APDUs in turn, and a
third presentation: however the tears fall, a rider who tries three times within 10 s pays exactly one fare.
"""

from __future__ import annotations

import itertools

import pytest

from epurse.apdu import ALG_3DES, ALG_SM4
from validator.messages import Outcome
from validator.readers import CardRemoved

ALGORITHMS = {"3des": ALG_3DES, "sm4": ALG_SM4}
FARE = 200  # the bus fixture's flat fare
PURCHASE_INS = ("SELECT", "READ BINARY", "READ RECORD", "INITIALIZE FOR PURCHASE", "UPDATE CAPP DATA CACHE",
                "DEBIT FOR PURCHASE")


def pulled(answer_lost: bool):
    """The fault at the k-th APDU: the card leaves the field, having carried the command out or not."""

    def fault(card, apdu):
        if answer_lost:
            card.transmit(apdu)
        raise CardRemoved("card left the field")

    return fault


def test_a_purchase_sends_the_card_these_apdus(bus, rider, misbehaving):
    card = misbehaving(rider(1), 0, pulled(False))
    assert bus.tap(card).outcome is Outcome.PAID
    assert tuple(card.names) == PURCHASE_INS


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("answer_lost", [True, False], ids=["answer-lost", "never-received"])
@pytest.mark.parametrize("k", range(1, len(PURCHASE_INS) + 1), ids=lambda k: f"{k}-{PURCHASE_INS[k - 1]}")
@pytest.mark.parametrize("back_after", [5, 120], ids=["back-in-5s", "back-in-2min"])
def test_card_pulled_after_each_apdu(bus, rider, misbehaving, books, algorithm, answer_lost, k, back_after):
    card = rider(1, ALGORITHMS[algorithm])
    first = bus.tap(misbehaving(card, k, pulled(answer_lost), gone=True))
    assert first.outcome is Outcome.TAP_AGAIN and first.record is None
    debited = answer_lost and PURCHASE_INS[k - 1] == "DEBIT FOR PURCHASE"
    assert card.ttc == int(debited) and card.balance == 1000 - FARE * debited
    # the grey record is on disk before the card is sent its new transit record and the DEBIT
    grey = [b for state, b in bus.rows(card.asn.hex()) if state == "pending"]
    assert len(grey) == (k >= PURCHASE_INS.index("UPDATE CAPP DATA CACHE") + 1)
    books(bus, card, settled=False)

    bus.later(back_after)
    again = bus.tap(card)
    new_ride = back_after > bus.terminal.config.double_tap_seconds
    charged = 1 + (debited and new_ride) if debited else 1  # the torn debit, and a new fare only for a new ride
    assert again.outcome is Outcome.PAID
    assert card.balance == 1000 - FARE * charged, f"charged {(1000 - card.balance) // FARE} fares, not {charged}"
    assert again.balance == card.balance and again.fare == FARE
    done = books(bus, card)
    assert len(done) == charged and again.record.tac == done[-1]["tac"]

    bus.later(5)
    assert bus.tap(card).outcome is Outcome.ALREADY_PAID and card.balance == 1000 - FARE * charged
    books(bus, card)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_card_pulled_again_on_its_retry(bus, rider, misbehaving, books, algorithm):
    cases = 0
    for n, (k, lost, j, lost_again) in enumerate(itertools.product(
            range(1, len(PURCHASE_INS) + 1), (True, False), range(1, 8), (True, False))):
        card = rider(100 + n, ALGORITHMS[algorithm])
        what = f"first tap pulled at {k} ({'answer lost' if lost else 'never received'}), retry at {j} " \
               f"({'answer lost' if lost_again else 'never received'})"
        assert bus.tap(misbehaving(card, k, pulled(lost), gone=True)).outcome is Outcome.TAP_AGAIN, what
        bus.later(5)
        retry = misbehaving(card, j, pulled(lost_again), gone=True)
        outcome = bus.tap(retry).outcome
        assert outcome in (Outcome.TAP_AGAIN, Outcome.PAID), what
        books(bus, card, settled=False)
        bus.later(5)
        third = bus.tap(card)
        assert third.outcome in (Outcome.PAID, Outcome.ALREADY_PAID), what
        assert card.balance == 1000 - FARE, f"{what}: charged {(1000 - card.balance) / FARE} fares, not 1"
        assert len(books(bus, card)) == 1, what
        bus.later(600)  # the next rider's case starts well away from this one
        cases += retry.n >= j  # the retry really was torn (a short retry may end before its j-th APDU)
    assert cases > 100

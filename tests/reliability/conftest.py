"""What test_tearing.py and test_bad_cards.py share, as fixtures (a test module cannot import a conftest by name:
the other conftests of the suite are also called ``conftest``): a validator on a real journal file with a clock the
test moves, cards that misbehave at a chosen APDU, and the books checked against the cards themselves.

| fixture | gives |
|---|---|
| ``bus`` | a ``Bus``: a Terminal (SimReader, SimPsam in a SAM slot, real Journal in tmp_path, flat fare 200 fen on r1), a
  driver signed in; closed after the test |
| ``make_bus`` | ``make_bus(name)`` -> another ``Bus`` in tmp_path, closed after the test |
| ``rider`` | ``rider(n, algorithm=ALG_3DES, balance=1000)`` -> a fresh adult SimCard, ASN numbered ``n`` |
| ``misbehaving`` | the ``Misbehaving`` class: the card, but its k-th APDU of one presentation answered by a fault |
| ``books`` | ``books(bus, card, start=1000, settled=True, tacs=True)``: balance loss == completed purchases, once per
  card TTC, with the card's own TACs (see :func:`books`) |
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pytest

from epurse.apdu import ALG_3DES
from epurse.cardtypes import CardType
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.readers import CardRemoved
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig

T0 = datetime(2024, 3, 5, 7, 30, 0, tzinfo=UTC)
TERMINAL_ID = bytes.fromhex("010000000042")
FARE = 200
BALANCE = 1000
# The card APDUs of one rider purchase, in order (PSAM commands go to the SAM slot, not to the card).
PURCHASE_INS = ("SELECT", "READ BINARY", "READ RECORD", "INITIALIZE FOR PURCHASE", "UPDATE CAPP DATA CACHE",
                "DEBIT FOR PURCHASE")
INS_NAMES = {0xA4: "SELECT", 0xB0: "READ BINARY", 0xB2: "READ RECORD", 0x50: "INITIALIZE FOR PURCHASE",
             0xDC: "UPDATE CAPP DATA CACHE", 0x54: "DEBIT FOR PURCHASE", 0x5A: "GET TRANSACTION PROVE"}


class Bus:
    """A validator as demo.py wires one, its journal in ``tmp_path``, signed in by a driver."""

    def __init__(self, tmp_path, name: str = "bus0042"):
        self.now = T0
        self.psam = SimPsam(TERMINAL_ID, sequence=41)
        slot = SimReader()
        slot.present(self.psam)
        self.journal_path = tmp_path / f"{name}.journal"
        self.journal = Journal(self.journal_path)
        self.reader = SimReader()
        self.terminal = Terminal(TerminalConfig(device_id=name, operator="citybus", route="r1", vehicle="v7"),
                                 journal=self.journal, psam=slot.poll(),
                                 fares=FareTable(version=1, flat={"r1": FARE}), clock=lambda: self.now)
        driver = SimCard(bytes.fromhex("31000000000000900001"), int(CardType.DRIVER), 0, staff_no="D1001",
                         start=date(2024, 1, 1), end=date(2028, 12, 31))
        assert self.tap(driver).outcome.value == "shift_opened"
        self.later(60)

    def tap(self, card):
        self.reader.present(card)
        try:
            return self.terminal.tap(self.reader.poll())
        finally:
            self.reader.remove()

    def later(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def close(self) -> None:
        self.journal.close()

    def rows(self, asn: str) -> list[tuple[str, dict]]:
        """(state, record) of this card's purchases, read from the journal file with plain sqlite3."""
        db = sqlite3.connect(self.journal_path)
        try:
            rows = db.execute("SELECT state, body FROM record ORDER BY device_seq").fetchall()
        finally:
            db.close()
        return [(state, b) for state, body in rows
                if (b := json.loads(body))["kind"] == "purchase" and b["card_asn"] == asn]


def rider(n: int, algorithm: int = ALG_3DES, balance: int = BALANCE) -> SimCard:
    return SimCard(bytes.fromhex(f"31000000{n:012d}"), int(CardType.ADULT), balance, start=date(2024, 1, 1),
                   end=date(2028, 12, 31), algorithm=algorithm)


class Misbehaving:
    """The card, except at its ``k``-th APDU of this presentation (1-based; 0: never), where ``fault(card, apdu)``
    answers instead (it may pass the command to the card first, or raise a reader error). With ``gone`` the card
    is out of the field for every APDU after that one (a pulled card does not come back mid-tap). ``names``: the
    APDUs the terminal sent, by name."""

    def __init__(self, card: SimCard, k: int, fault: Callable[[SimCard, bytes], bytes], *, gone: bool = False):
        self.card, self.k, self.fault, self.gone = card, k, fault, gone
        self.n = 0
        self.names: list[str] = []

    def transmit(self, apdu: bytes) -> bytes:
        self.n += 1
        self.names.append(INS_NAMES.get(apdu[1], f"INS {apdu[1]:02X}"))
        if self.n == self.k:
            return self.fault(self.card, apdu)
        if self.gone and 0 < self.k < self.n:
            raise CardRemoved("the card is gone")
        return self.card.transmit(apdu)


def books(bus: Bus, card: SimCard, start: int = BALANCE, *, settled: bool = True, tacs: bool = True) -> list[dict]:
    """The card's completed purchases, after checking them against the card: one per debit (TTC 0 .. TTC - 1),
    each with the TAC the card logged, amounts adding up to the balance it lost; a grey record only for a debit
    not yet settled (none at all when ``settled``). ``tacs=False``: a garbled DEBIT answer may have put another TAC
in a (flagged) record. Returns the completed records."""
    asn = card.asn.hex()
    rows = bus.rows(asn)
    done = [b for state, b in rows if state == "done"]
    grey = [b for state, b in rows if state == "pending"]
    ttcs = [b["card_ttc"] for b in done]
    assert len(ttcs) == len(set(ttcs)), f"card {asn}: a TTC in two completed records: {ttcs}"
    if settled:
        assert grey == [], f"card {asn}: grey records left {grey}"
    debited_grey = [b for b in grey if b["card_ttc"] < card.ttc]
    assert sorted(ttcs + [b["card_ttc"] for b in debited_grey]) == list(range(card.ttc)), \
        f"card {asn}: card TTC {card.ttc}, completed {ttcs}, grey {[b['card_ttc'] for b in grey]}"
    taken = sum(b["amount"] for b in done) + sum(b["amount"] for b in debited_grey)
    assert start - card.balance == taken, f"card {asn}: lost {start - card.balance} fen, journal says {taken}"
    logged = {t.ttc: t.tac.hex() for t in card.log}
    for b in done if tacs else ():
        assert b["tac"] == logged[b["card_ttc"]], f"card {asn} TTC {b['card_ttc']}: TAC is not the card's"
    return done


@pytest.fixture
def make_bus(tmp_path):
    made = []

    def make(name: str = "bus0042") -> Bus:
        made.append(Bus(tmp_path, name))
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def bus(make_bus):
    return make_bus()


@pytest.fixture(name="rider")
def rider_fixture():
    return rider


@pytest.fixture(name="misbehaving")
def misbehaving_fixture():
    return Misbehaving


@pytest.fixture(name="books")
def books_fixture():
    return books

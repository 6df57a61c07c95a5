"""The same validator Terminal over every reader backend (sim:, pcsc: through a real pcscd + vpcd, nfc: over
nfcpy's udp driver, rfid24: over a pty), the faults each backend must turn into CardRemoved / CommunicationError,
a stock PC/SC tool reading our simulated card, and ``farebox sim card`` as a separate process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta

import pytest

from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from hardware_sim.vpcd import DEFAULT_PORT, VpcdCard, reader_name, settle_vpcd
from validator.fares import FareTable
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers import CardRemoved, CommunicationError, open_reader
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from wire.records import RecordKind

T0 = datetime(2024, 3, 5, 7, 30, 0, tzinfo=UTC)
TERMINAL_ID = bytes.fromhex("010000000042")
FARE = 200
SELECT = bytes.fromhex("00A4040008A000000632010105")
GET_BALANCE = bytes.fromhex("805C000204")
BACKENDS = ["sim", "pcsc", "nfc", "rfid24"]


def rider(balance=1000, asn="31000000000000012345"):
    return SimCard(bytes.fromhex(asn), int(CardType.ADULT), balance, start=date(2024, 1, 1), end=date(2028, 12, 31))


def driver():
    return SimCard(bytes.fromhex("31000000000000900001"), int(CardType.DRIVER), 0, staff_no="D1001",
                   start=date(2024, 1, 1), end=date(2028, 12, 31))


class Validator:
    """A Terminal as on a bus: PSAM in a slot of its own, a journal on disk, a clock the test moves."""

    def __init__(self, tmp_path):
        self.now = T0
        slot = SimReader()
        slot.present(SimPsam(TERMINAL_ID, keys=TEST_ISSUER_KEYS))
        self.journal = Journal(tmp_path / "bus.journal")
        self.terminal = Terminal(TerminalConfig(device_id="bus0042", operator="citybus", route="r12", vehicle="v7"),
                                 journal=self.journal, psam=slot.poll(), fares=FareTable(version=1, flat={"r12": FARE}),
                                 clock=lambda: self.now)

    def later(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def validator(tmp_path):
    v = Validator(tmp_path)
    yield v
    v.journal.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_driver_signs_in_then_a_rider_pays_over_every_backend(backend, card_rig, validator):
    rig = card_rig(backend)
    opened = rig.tap(validator.terminal, driver())
    assert opened.outcome is Outcome.SHIFT_OPENED, opened.detail
    validator.later(60)
    card = rider(1000)
    paid = rig.tap(validator.terminal, card)
    assert paid.outcome is Outcome.PAID, paid.detail
    assert card.balance == 1000 - FARE and paid.balance == 1000 - FARE and card.ttc == 1
    purchases = [r for r in validator.journal.records_since(0) if r.kind is RecordKind.PURCHASE]
    assert len(purchases) == 1 and validator.journal.pending() == []
    record = purchases[0]
    assert (record.card_asn, record.amount, record.balance_after, record.driver) == (
        card.asn.hex(), FARE, 1000 - FARE, "D1001")
    assert record.tac == card.log[0].tac.hex()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_card_pulled_mid_session_raises_card_removed_and_stays_removed(backend, card_rig):
    rig = card_rig(backend)
    rig.present(rider())
    session = rig.reader.poll(5)
    assert session is not None
    assert session.exchange(SELECT)[-2:] == b"\x90\x00"
    rig.remove()
    with pytest.raises(CardRemoved):
        session.exchange(GET_BALANCE)
    with pytest.raises(CardRemoved):  # and on every later exchange of that session
        session.exchange(GET_BALANCE)
    rig.present(rider())
    again = rig.reader.poll(5)
    assert again is not None and again.exchange(SELECT)[-2:] == b"\x90\x00"


class FaultyLine:
    """A card in the module whose answers the line then damages, one fault per command of the purchase."""

    def __init__(self, card, module):
        self.card, self.module, self.asn = card, module, card.asn

    def transmit(self, apdu: bytes) -> bytes:
        response = self.card.transmit(apdu)
        fault = {b"\x00\xa4": lambda m: m.garbage_next(b"\x00\x02\xff\x02\x00\x40\x13\x37"),  # before SELECT's answer
                 b"\x00\xb0": lambda m: m.corrupt_next(),  # READ BINARY's answer: bad BCC
                 b"\x80\x50": lambda m: m.nak_next(),  # the DEBIT request after INITIALIZE: refused, resent
                 b"\x80\x54": lambda m: m.corrupt_next()}.get(bytes(apdu[:2]))  # the DEBIT's answer: REPEAT
        if fault:
            fault(self.module)
        return response


def test_rfid24_purchase_through_garbage_bad_checksums_and_a_refused_frame(card_rig, validator, rfid24_module):
    rig = card_rig("rfid24", module=rfid24_module)
    assert rig.tap(validator.terminal, driver()).outcome is Outcome.SHIFT_OPENED
    validator.later(60)
    card = rider(1000)
    paid = rig.tap(validator.terminal, FaultyLine(card, rfid24_module))
    assert paid.outcome is Outcome.PAID, paid.detail
    assert card.balance == 1000 - FARE and card.ttc == 1  # debited once, whatever the line did
    c = rfid24_module.counters
    assert (c["garbage"], c["corrupted"], c["naks"]) == (1, 2, 1)
    assert c["repeats"] == 2 and rig.reader.stats["repeats"] == 2 and rig.reader.stats["resends"] == 1


def test_rfid24_gives_up_with_communication_error(card_rig, rfid24_module):
    rig = card_rig("rfid24", module=rfid24_module)
    reader = open_reader(f"rfid24:{rfid24_module.path}?timeout=0.2&retries=2")
    rfid24_module.present(rider())
    session = reader.poll(1)
    assert session.exchange(SELECT)[-2:] == b"\x90\x00"
    rfid24_module.corrupt_next(3)  # the answer and both REPEATs damaged
    with pytest.raises(CommunicationError, match="no good answer"):
        session.exchange(GET_BALANCE)
    rfid24_module.silence_next(1)  # an APDU is never sent twice on a guess
    with pytest.raises(CommunicationError, match="no answer"):
        session.exchange(GET_BALANCE)
    rfid24_module.silence_next(1)  # ACTIVATE is harmless to repeat
    assert reader.poll(1).exchange(GET_BALANCE)[-2:] == b"\x90\x00"
    reader.close()
    rig.close()


def test_opensc_tool_reads_the_served_card(pcsc_vpcd):
    tool = shutil.which("opensc-tool")
    if tool is None:
        pytest.skip("opensc-tool not installed (apt-get install opensc; scripts/ensure-services.sh does)")
    with VpcdCard(rider(1234), port=DEFAULT_PORT):
        for _ in range(50):  # pcscd sees the card within its presence poll
            done = subprocess.run([tool, "-r", reader_name(DEFAULT_PORT), "-s", SELECT.hex(), "-s",
                                   GET_BALANCE.hex()], capture_output=True, text=True, timeout=20, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.1)
    # the next test's card goes into the same reader: let pcscd see this one leave first, as a hand would
    assert open_reader(f"pcsc:{reader_name(DEFAULT_PORT)}").card_gone(3000)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SW1=0x90, SW2=0x00") == 2
    assert "00 00 04 D2" in done.stdout  # 1234 fen


class T0StyleCard:
    """Answers like a T=0 card: data comes only through GET RESPONSE (61xx), and a wrong Le is corrected (6Cxx)."""

    def __init__(self, card):
        self.card = card
        self.waiting = b""
        self.seen: list[str] = []

    def transmit(self, apdu: bytes) -> bytes:
        self.seen.append(apdu.hex())
        if apdu[1] == 0xC0:
            n = apdu[4] or 256
            out, self.waiting = self.waiting[:n], self.waiting[n:]
            return out + (bytes([0x61, len(self.waiting)]) if self.waiting else b"\x90\x00")
        if apdu[:4] == bytes.fromhex("00B09500") and apdu[4] != 30:
            return b"\x6c\x1e"  # the file is 30 bytes: ask again with Le 1E
        response = self.card.transmit(apdu)
        data, sw = response[:-2], response[-2:]
        if sw == b"\x90\x00" and data:
            self.waiting = data
            return bytes([0x61, min(len(data), 8)])  # hand it out 8 bytes at a time
        return response


def test_pcsc_follows_get_response_and_le_correction(card_rig):
    rig = card_rig("pcsc")
    card = T0StyleCard(rider(777))
    rig.present(card)
    session = rig.reader.poll(5)
    assert session.exchange(SELECT) == bytes.fromhex("6F0C8408A000000632010105A500") + b"\x90\x00"
    info = session.exchange(bytes.fromhex("00B0950010"))
    assert len(info) == 32 and info[-2:] == b"\x90\x00" and info[10:20] == card.card.asn
    assert session.exchange(GET_BALANCE) == (777).to_bytes(4, "big") + b"\x90\x00"
    assert "00b095001e" in card.seen and "00c0000008" in card.seen


class EchoCard:
    """Answers any command with its data twice (and 9000): long answers, to make ISO-DEP chain both ways."""

    def transmit(self, apdu: bytes) -> bytes:
        return (apdu[5:] * 2)[:256] + b"\x90\x00"


def test_nfc_chains_long_commands_and_answers(card_rig):
    rig = card_rig("nfc")
    rig.present(EchoCard())
    session = rig.reader.poll(5)
    data = bytes(range(255))
    assert session.exchange(bytes.fromhex("80EE0000FF") + data) == (data * 2)[:256] + b"\x90\x00"
    assert session.exchange(bytes.fromhex("80EE000003") + b"abc") == b"abcabc\x90\x00"


def farebox_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "farebox.cli", "sim", "card", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_sim_card_command_runs_apdus_in_process(tmp_path):
    state = tmp_path / "card.json"
    done = farebox_cli("--asn", "31000000000000055555", "--balance", "43.21", "--state", str(state),
                       "--apdu", SELECT.hex(), "--apdu", GET_BALANCE.hex())
    assert done.returncode == 0, done.stderr
    assert "31000000000000055555" in done.stdout and "adult" in done.stdout
    assert "< 000010E19000" in done.stdout
    again = farebox_cli("--state", str(state), "--apdu", SELECT.hex(), "--apdu", GET_BALANCE.hex())
    assert again.returncode == 0 and "loaded from" in again.stdout and "31000000000000055555" in again.stdout


def test_sim_card_command_serves_through_vpcd_to_pyscard(pcsc_vpcd):
    port = DEFAULT_PORT + 1
    proc = subprocess.Popen([sys.executable, "-m", "farebox.cli", "sim", "card", "--vpcd", hex(port), "--type",
                             "student", "--balance", "25.00"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()
        assert "student" in first and "¥25.00" in first, first + proc.stderr.read() if proc.poll() else first
        reader = open_reader(f"pcsc:{reader_name(port)}")
        settle_vpcd(reader)
        session = reader.poll(10)
        assert session is not None
        assert session.exchange(SELECT)[-2:] == b"\x90\x00"
        assert session.exchange(GET_BALANCE) == (2500).to_bytes(4, "big") + b"\x90\x00"
        reader.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "stopped." in out
    # the reader sees the card go when the process goes
    assert open_reader(f"pcsc:{reader_name(port)}").card_gone(3000)


def test_open_reader_refuses_unknown_paths():
    from validator.readers import ReaderError

    for bad in ("usb", "magic:1", "rfid24:", "nfc:"):
        with pytest.raises(ReaderError):
            open_reader(bad)
    assert os.environ.get("PYTEST_CURRENT_TEST")

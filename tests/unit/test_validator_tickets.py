"""validator.tickets on a real Terminal and journal (a simulated PSAM, a driver card to open the shift): QR tickets
and pickup codes made by the tests' own reference (tests/reference_ticket.py), outcomes as the rider sees them, and
the journal read back with plain sqlite3."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, date, datetime, timedelta

import pytest
from reference_ticket import ref_body, ref_keypair, ref_pickup_code, ref_sign, ref_text

from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.driver_menu import DriverMenu
from validator.fares import FareTable
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from validator.tickets import TicketChecker
from wire.ticket import TicketParams

SEED = bytes(range(32))
_, PUB = ref_keypair(SEED)
PICKUP_KEY = b"citybus pickup key, 32 bytes...."
NOW = datetime.now(UTC).replace(microsecond=0)
DAY = 86400


def token(ticket_id=1001, *, operator="citybus", product=1, routes=("r1",), start=None, end=None, uses=1,
          key_id=1, seed=SEED) -> str:
    start = int((NOW - timedelta(hours=1)).timestamp()) if start is None else start
    end = int((NOW + timedelta(hours=23)).timestamp()) if end is None else end
    body = ref_body(key_id=key_id, ticket_id=ticket_id, operator=operator, product=product, routes=list(routes),
                    valid_from=start, valid_to=end, uses=uses, category=1)
    return ref_text(body, ref_sign(body, seed))


class Bus:
    def __init__(self, tmp_path, *, signed_in=True, params=True):
        self.now = NOW
        self.path = tmp_path / "journal.db"
        self.journal = Journal(self.path)
        slot = SimReader()
        slot.present(SimPsam(bytes.fromhex("010000000777"), keys=TEST_ISSUER_KEYS))
        self.terminal = Terminal(TerminalConfig("bus0777", "citybus", "r1", "v7"), journal=self.journal,
                                 psam=slot.poll(), fares=FareTable(1, {"r1": 200}), clock=lambda: self.now)
        if params:
            self.terminal.replace_ticket_params(TicketParams({1: PUB}, PICKUP_KEY, frozenset({666})))
        self.tickets = TicketChecker(self.terminal, max_wrong_codes=3, lockout_seconds=300)
        if signed_in:
            reader = SimReader()
            reader.present(SimCard(bytes.fromhex("99990000000000000001"), CardType.DRIVER, 0, staff_no="D7",
                                   start=date.today() - timedelta(days=9), end=date.today() + timedelta(days=9)))
            assert self.terminal.tap(reader.poll()).outcome is Outcome.SHIFT_OPENED

    def later(self, seconds=60):
        self.now += timedelta(seconds=seconds)

    def uses_on_disk(self) -> list[dict]:
        db = sqlite3.connect(self.path)
        rows = [json.loads(b) for (b,) in db.execute("SELECT body FROM record WHERE state = 'done' "
                                                    "ORDER BY device_seq")]
        db.close()
        return [r for r in rows if r["kind"] == "ticket_use"]


@pytest.fixture
def bus(tmp_path):
    b = Bus(tmp_path)
    yield b
    b.journal.close()


def test_single_ride_accepted_once(bus):
    result = bus.tickets.scan(token())
    assert result.outcome is Outcome.TICKET_OK and result.record.driver == "D7"
    bus.later()
    assert bus.tickets.scan(token()).outcome is Outcome.TICKET_USED
    bus.later()
    assert bus.tickets.scan(token().encode() + b"\r").outcome is Outcome.TICKET_USED
    uses = bus.uses_on_disk()
    assert [(u["ticket_id"], u["ticket_use"], u["presented"], u["route"], u["driver"]) for u in uses] == [
        (1001, 1, "qr", "r1", "D7")]


def test_day_pass_many_uses_but_one_per_double_tap_window(bus):
    day = token(2002, product=2, uses=0, routes=())
    outcomes = []
    for step in (0, 5, 120, 3600):
        bus.later(step)
        outcomes.append(bus.tickets.scan(day).outcome)
    assert outcomes == [Outcome.TICKET_OK, Outcome.ALREADY_PAID, Outcome.TICKET_OK, Outcome.TICKET_OK]
    assert [u["ticket_use"] for u in bus.uses_on_disk()] == [1, 2, 3]


def test_ticket_of_two_uses(bus):
    two = token(3003, uses=2)
    got = []
    for _ in range(3):
        bus.later(60)
        got.append(bus.tickets.scan(two).outcome)
    assert got == [Outcome.TICKET_OK, Outcome.TICKET_OK, Outcome.TICKET_USED]


@pytest.mark.parametrize(("make", "outcome"), [
    (lambda: token(end=int((NOW - timedelta(seconds=1)).timestamp()), start=int((NOW - timedelta(days=1)).timestamp())),
     Outcome.TICKET_EXPIRED),
    (lambda: token(end=int(NOW.timestamp())), Outcome.TICKET_EXPIRED),  # half-open: the end itself is out
    (lambda: token(start=int((NOW + timedelta(minutes=5)).timestamp())), Outcome.TICKET_NOT_YET_VALID),
    (lambda: token(routes=("r2", "r3")), Outcome.TICKET_WRONG_ROUTE),
    (lambda: token(operator="othercoach"), Outcome.TICKET_WRONG_OPERATOR),
    (lambda: token(seed=bytes(32)), Outcome.TICKET_FORGED),
    (lambda: token(key_id=7), Outcome.TICKET_UNREADABLE),
    (lambda: token(666), Outcome.TICKET_BLOCKED),
    (lambda: "https://example.com/not-a-ticket", Outcome.TICKET_UNREADABLE),
    (lambda: bytes(range(256)) * 8, Outcome.TICKET_UNREADABLE),  # 2 kB of garbage
])
def test_refusals_write_nothing(bus, make, outcome):
    assert bus.tickets.scan(make()).outcome is outcome
    assert bus.uses_on_disk() == []


def test_altered_ticket_is_forged(bus):
    text = token()
    i = 10
    altered = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1:]
    assert bus.tickets.scan(altered).outcome is Outcome.TICKET_FORGED


def test_no_keys_no_shift(tmp_path):
    b = Bus(tmp_path, params=False, signed_in=False)
    assert b.tickets.scan(token()).outcome is Outcome.TICKET_UNREADABLE
    b.terminal.replace_ticket_params(TicketParams({1: PUB}))
    assert b.tickets.scan(token()).outcome is Outcome.NO_SHIFT
    assert b.tickets.pickup(ref_pickup_code(1001, PICKUP_KEY)).outcome is Outcome.TICKET_UNREADABLE  # no pickup key
    b.journal.close()


def test_pickup_code_once_and_shares_the_ticket_with_its_qr(bus):
    code = ref_pickup_code(1001, PICKUP_KEY)
    result = bus.tickets.pickup(code)
    assert result.outcome is Outcome.TICKET_OK and result.record.ticket_id == 1001
    bus.later()
    assert bus.tickets.pickup(code).outcome is Outcome.TICKET_USED
    assert bus.tickets.scan(token(1001)).outcome is Outcome.TICKET_USED
    assert bus.tickets.pickup(ref_pickup_code(666, PICKUP_KEY)).outcome is Outcome.TICKET_BLOCKED
    assert [(u["ticket_id"], u["presented"]) for u in bus.uses_on_disk()] == [(1001, "pickup")]


def test_wrong_codes_lock_the_keypad_across_a_restart(tmp_path):
    b = Bus(tmp_path)
    good = ref_pickup_code(4242, PICKUP_KEY)
    wrong = good[:10] + f"{(int(good[10:]) + 1) % 10**6:06d}"
    assert b.tickets.pickup("123").outcome is Outcome.CODE_WRONG  # malformed: not counted
    assert [b.tickets.pickup(wrong).outcome for _ in range(3)] == [Outcome.CODE_WRONG, Outcome.CODE_WRONG,
                                                                   Outcome.CODE_LOCKED]
    assert b.tickets.pickup(good).outcome is Outcome.CODE_LOCKED  # even the right code waits
    b.journal.close()
    again = Bus.__new__(Bus)  # the validator restarted: a new journal handle and checker on the same file
    again.now, again.path = b.now, b.path
    again.journal = Journal(b.path)
    slot = SimReader()
    slot.present(SimPsam(bytes.fromhex("010000000777"), keys=TEST_ISSUER_KEYS))
    again.terminal = Terminal(TerminalConfig("bus0777", "citybus", "r1", "v7"), journal=again.journal,
                              psam=slot.poll(), fares=FareTable(1, {"r1": 200}), clock=lambda: again.now)
    again.terminal.replace_ticket_params(TicketParams({1: PUB}, PICKUP_KEY))
    again.tickets = TicketChecker(again.terminal, max_wrong_codes=3, lockout_seconds=300)
    assert again.tickets.pickup(good).outcome is Outcome.CODE_LOCKED
    again.later(301)
    assert again.tickets.pickup(good).outcome is Outcome.TICKET_OK
    again.journal.close()


def test_driver_keypad_sequence(bus):
    class Keys:
        pending = ""

        def read(self):
            out, self.pending = self.pending, ""
            return out

        def close(self):
            pass

    keys, shown = Keys(), []
    menu = DriverMenu(bus.terminal, keys, None, shown.append, tickets=bus.tickets)
    code = ref_pickup_code(5005, PICKUP_KEY)
    keys.pending = "5" + code[:8] + "*" + "5" + code + "#"
    menu.poll()
    assert any("验票成功 Ticket accepted" in line for lines in shown for line in lines)
    assert [u["ticket_id"] for u in bus.uses_on_disk()] == [5005]
    keys.pending = "5" + code + "#"
    menu.poll()
    assert "车票已使用 Ticket already used" in shown[-1][0]


def test_ticket_keys_arrive_in_a_signed_params_package_and_survive_a_restart(tmp_path):
    from validator.downlink import Downlink
    from wire.packages import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, Package, params_body, sign_package

    b = Bus(tmp_path, params=False)
    assert b.tickets.scan(token()).outcome is Outcome.TICKET_UNREADABLE
    down = Downlink(b.terminal, public_key=TEST_PUBLIC_KEY, staging_dir=tmp_path / "staging")
    tickets = {"keys": {"1": PUB.hex()}, "pickup_key": PICKUP_KEY.hex(), "denied": [1001]}
    pkg = Package("params", 1, "_fleet", NOW - timedelta(seconds=1), params_body(tickets=tickets))
    assert down.receive("params", sign_package(pkg, TEST_SIGNING_SEED), fleet=True) is not None
    down.apply_due()
    assert b.terminal.ticket_params.public_keys == {1: PUB}
    assert b.tickets.scan(token(1001)).outcome is Outcome.TICKET_BLOCKED
    assert b.tickets.scan(token(1002)).outcome is Outcome.TICKET_OK
    # a bad tickets section is refused with the package (signature fine, body not)
    bad = Package("params", 2, "_fleet", NOW, b'{"tickets":{"keys":{"1":"00"}}}')
    assert down.receive("params", sign_package(bad, TEST_SIGNING_SEED), fleet=True) is None
    # restart: a new terminal gets the keys back from the downlink's state
    b.terminal.ticket_params = TicketParams()
    Downlink(b.terminal, public_key=TEST_PUBLIC_KEY, staging_dir=tmp_path / "staging")
    assert b.terminal.ticket_params.pickup_key == PICKUP_KEY and b.terminal.ticket_params.denied == {1001}
    b.journal.close()


def test_tickets_on_the_ordinary_deny_list_are_refused_by_qr_and_by_pickup_code(bus):
    from blacklist.denylist import DenyList
    from wire.ticket import deny_keys

    # the keys written by hand: prefix FE71 + ticket id, FE72 + serial, 8 bytes big-endian each
    assert deny_keys(12_345_678_901_234) == (bytes.fromhex("fe71") + (12_345_678_901_234).to_bytes(8, "big"),
                                             bytes.fromhex("fe72") + (5_678_901_234).to_bytes(8, "big"))
    card = bytes.fromhex("99990000000000000042")
    bus.terminal.replace_deny_list(DenyList.from_asns([card, *deny_keys(9009), *deny_keys(12_345_678_901_234)],
                                                      version=2))
    assert bus.tickets.scan(token(9009)).outcome is Outcome.TICKET_BLOCKED
    assert bus.tickets.pickup(ref_pickup_code(12_345_678_901_234, PICKUP_KEY)).outcome is Outcome.TICKET_BLOCKED
    assert bus.tickets.scan(token(9010)).outcome is Outcome.TICKET_OK
    assert bus.uses_on_disk()[0]["ticket_id"] == 9010


def test_pruning_forgets_used_tickets_only_after_they_cannot_be_used(tmp_path):
    from validator.journal import KEEP_PICKUP_SECONDS, TICKET_GRACE_SECONDS

    b = Bus(tmp_path)
    old_end = int((NOW + timedelta(hours=1)).timestamp())
    assert b.tickets.scan(token(1, end=old_end)).outcome is Outcome.TICKET_OK
    assert b.tickets.pickup(ref_pickup_code(2, PICKUP_KEY)).outcome is Outcome.TICKET_OK
    assert b.tickets.scan(token(3, end=old_end + 30 * DAY)).outcome is Outcome.TICKET_OK
    b.now = NOW + timedelta(hours=1, seconds=TICKET_GRACE_SECONDS + 60)  # ticket 1 is past validity + grace
    assert b.tickets.scan(token(4, start=int(b.now.timestamp()) - 60, end=int(b.now.timestamp()) + DAY)
                          ).outcome is Outcome.TICKET_OK
    with b.journal._lock, b.journal._tx():
        b.journal._forget_old_tickets()
    db = sqlite3.connect(b.path)
    left = [s for (s,) in db.execute("SELECT serial FROM ticket_used ORDER BY serial")]
    db.close()
    assert left == [2, 3, 4]  # the pickup serial stays for KEEP_PICKUP_SECONDS
    b.now += timedelta(seconds=KEEP_PICKUP_SECONDS)
    assert b.tickets.scan(token(5, start=int(b.now.timestamp()) - 60, end=int(b.now.timestamp()) + DAY)
                          ).outcome is Outcome.TICKET_OK
    with b.journal._lock, b.journal._tx():
        b.journal._forget_old_tickets()
    db = sqlite3.connect(b.path)
    assert [s for (s,) in db.execute("SELECT serial FROM ticket_used ORDER BY serial")] == [5]
    db.close()
    b.journal.close()

"""hardware_sim.phone.PhoneMenu against a simulated SIM: rides made by a real Terminal (purchase APDUs through a
SimPsam) and a load, read back over APDUs: the balance the SIM holds, at most 10 log records newest first, each
shown with the phone's local time and its amount; one language at a time; a blocked SIM says so."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from blacklist.denylist import DenyList
from epurse import apdu
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.phone import PhoneMenu
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig

T0 = datetime(2026, 12, 1, 23, 50, tzinfo=UTC)  # 07:50 on 12-02 in Shanghai


def sim(balance=5000, asn="86000000000000000042") -> SimCard:
    return SimCard(bytes.fromhex(asn), int(CardType.ADULT), balance, start=date(2026, 1, 1), end=date(2030, 1, 1))


def ride(tmp_path, card: SimCard, times: int, deny=()) -> list[datetime]:
    now = [T0]
    slot = SimReader()
    slot.present(SimPsam(bytes.fromhex("010000000099"), keys=TEST_ISSUER_KEYS, sequence=1))
    terminal = Terminal(TerminalConfig(device_id="bus99", operator="citybus", route="r1", vehicle="v1"),
                        journal=Journal(tmp_path / "j.db"), psam=slot.poll(), fares=FareTable(version=1,
                        flat={"r1": 150}), deny_list=DenyList.from_asns(list(deny)), clock=lambda: now[0])
    reader = SimReader()
    reader.present(SimCard(bytes.fromhex("99000000000000000001"), int(CardType.DRIVER), 0, staff_no="D1",
                           start=date(2026, 1, 1), end=date(2030, 1, 1)))
    terminal.tap(reader.poll())
    at = []
    for _ in range(times):
        now[0] += timedelta(minutes=40)
        reader.present(card)
        terminal.tap(reader.poll())
        at.append(now[0])
    terminal.journal.close()
    return at


def test_balance_and_the_last_ten_of_twelve_rides(tmp_path):
    card = sim()
    at = ride(tmp_path, card, 12)
    assert len(card.log) >= 12 and card.balance == 5000 - 12 * 150
    lines = PhoneMenu(card, language="zh").lines()
    assert lines[:3] == ["公交卡 …00000042", f"余额 ¥{card.balance // 100}.{card.balance % 100:02d}", "最近交易"]
    shown = lines[3:]
    assert len(shown) == 10  # READ RECORD 1..10: the newest ten
    newest_first = [t.astimezone(timezone(timedelta(hours=8))).strftime("%m-%d %H:%M") for t in reversed(at)][:10]
    assert [" ".join(line.split()[:2]) for line in shown] == newest_first
    assert all(line.split()[2:4] == ["乘车", "-1.50"] and line.endswith("010000000099") for line in shown)
    en = PhoneMenu(card, language="en").lines()
    assert en[:3] == ["Transit card …00000042", "Balance ¥32.00", "Recent transactions"]
    assert all(" Ride " in line and "乘车" not in line for line in en[3:])


def test_a_new_sim_and_a_blocked_one(tmp_path):
    fresh = sim(800, "86000000000000000001")
    assert PhoneMenu(fresh, language="en").show() == ("Transit card …00000001\nBalance ¥8.00\n"
                                                      "Recent transactions\n  No transactions yet\n")
    blocked = sim(800, "86000000000000000002")
    ride(tmp_path, blocked, 1, deny=[blocked.asn.hex()])  # the bus locks a deny-listed SIM
    assert blocked.blocked
    zh = PhoneMenu(blocked, language="zh").lines()
    assert "此卡已停用, 请联系营业厅" in zh and zh[1] == "余额 ¥8.00"


def test_one_language_only():
    with pytest.raises(ValueError, match="zh or en"):
        PhoneMenu(sim(), language="fr")
    assert apdu.read_log_record(1) == bytes.fromhex("00B201C417")  # SFI 18, record 1: the newest

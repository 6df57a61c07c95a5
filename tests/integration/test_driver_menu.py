"""The driver's menu on a real `farebox validator run` process: riders' cards in a simulated 2.4 GHz module on a
pty, the driver's keypad on a second pty (hardware_sim.keypad), the ESC/POS slip printer on a third
(hardware_sim.printer, which decodes the bytes it receives into the text on the paper).

Every figure on a slip is checked against the journal the process writes, read here with plain sqlite3 and summed
with plain loops: the shift totals, the last taps, one tap by its number (with its TAC), the reprint, the sign-out
slip, and the reprint after the validator restarted."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

from test_validator_process import Screen

from blacklist.denylist import write_atomic
from epurse.cardtypes import CardType
from hardware_sim.card import SimCard
from hardware_sim.keypad import SimKeypad
from hardware_sim.printer import SimPrinter

TODAY = date.today()
SLIPS = Path(__file__).resolve().parents[2] / "var" / "test-artefacts" / "slips"


def card(n: int, card_type=CardType.ADULT, balance=1000, **kw) -> SimCard:
    return SimCard(bytes.fromhex(f"5200{n:016d}"), int(card_type), balance, start=TODAY - timedelta(days=30),
                   end=TODAY + timedelta(days=30), **kw)


def journal_rows(path) -> list[dict]:
    db = sqlite3.connect(path)
    try:
        return [json.loads(body) for (body,) in db.execute(
            "SELECT body FROM record WHERE state = 'done' ORDER BY device_seq")]
    finally:
        db.close()


def yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def value(slip: str, label: str) -> str:
    """The value printed right of ``label`` (on the same line, or alone on the next when it did not fit)."""
    lines = slip.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(label):
            rest = line[len(label):].strip()
            return rest or lines[i + 1].strip()
    raise AssertionError(f"{label!r} not on the slip:\n{slip}")


def start(tmp_path, module, keypad, printer):
    fares = tmp_path / "fares.json"
    if not fares.exists():
        fares.write_text(json.dumps({"version": 1, "flat": {"r7": 200}, "discounts": {"2": 50}}))
        write_atomic(tmp_path / "denylist.bin", [card(66).asn.hex()], version=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "validator", "run", "--device", "bus0707", "--operator", "citybus",
         "--route", "r7", "--vehicle", "v7", "--reader", f"rfid24:{module.path}", "--psam", "sim:010000000707",
         "--journal", str(tmp_path / "journal.db"), "--fares", str(fares),
         "--deny-list", str(tmp_path / "denylist.bin"), "--double-tap-seconds", "0",
         "--keypad", f"serial:{keypad.path}", "--printer", f"serial:{printer.path}?baud=115200"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return proc, Screen(proc)


def stop(proc, screen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert proc.returncode == 0, "\n".join(screen.lines)


def test_driver_menu_prints_what_the_journal_holds(tmp_path, rfid24_module):
    journal = tmp_path / "journal.db"
    with SimKeypad() as keypad, SimPrinter() as printer:
        proc, screen = start(tmp_path, rfid24_module, keypad, printer)
        try:
            def tap(c: SimCard, expect: str, after: int) -> int:
                rfid24_module.present(c)
                at = screen.wait_for(expect, after)
                rfid24_module.remove()
                return at + 1

            at = screen.wait_for("r7", 0)
            keypad.press("1")  # nobody has signed in yet: nothing to print
            at = screen.wait_for("No shift yet", at) + 1
            driver = card(9, CardType.DRIVER, 0, staff_no="D0707")
            at = tap(driver, "签到成功", at)
            riders = [card(1), card(2, CardType.STUDENT), card(3), card(4, CardType.ELDERLY), card(5)]
            for rider in riders:
                at = tap(rider, "成功", at)
            at = tap(card(66), "此卡已停用", at)  # deny-listed: refused and shown among the taps

            keypad.press("#")
            at = screen.wait_for("DRIVER MENU", at) + 1
            keypad.press("1")
            (totals,) = printer.wait_for_slips(1)

            rows = journal_rows(journal)
            purchases = [r for r in rows if r["kind"] == "purchase"]
            assert len(purchases) == len(riders)
            assert value(totals, "合计 Total").split() == [str(len(purchases)),
                                                        yuan(sum(r["amount"] for r in purchases))]
            assert value(totals, "司机 Driver") == "D0707" and value(totals, "黑名单拒绝 Denied") == "1"
            assert value(totals, "签退 Closed") == "未签退 still open"
            by_type: dict[int, list[int]] = {}
            for r in purchases:
                by_type.setdefault(r["card_type"], []).append(r["amount"])
            assert value(totals, "学生卡 Student").split() == ["1", yuan(sum(by_type[CardType.STUDENT]))]

            keypad.press("3")
            last = printer.wait_for_slips(2)[1]
            taps = [r for r in rows if r["kind"] in ("purchase", "denied")][::-1]
            lines = [line.split() for line in last.splitlines() if line[:1].isdigit()]
            assert [int(line[0]) for line in lines] == [r["device_seq"] for r in taps]
            assert [line[-1] for line in lines] == [yuan(r["amount"]) if r["kind"] == "purchase" else "-"
                                                    for r in taps]

            student = next(r for r in purchases if r["card_type"] == CardType.STUDENT)
            keypad.press("4")
            at = screen.wait_for("Tap number", at) + 1
            keypad.press(f"{student['device_seq']}#")
            one = printer.wait_for_slips(3)[2]
            assert value(one, "流水号 Tap no.") == str(student["device_seq"])
            assert value(one, "票价 Fare") == yuan(student["amount"])
            assert value(one, "余额 Balance") == yuan(student["balance_after"]) == yuan(riders[1].balance)
            assert value(one, "交易认证 TAC") == student["tac"]
            assert value(one, "卡号 Card") == "…" + student["card_asn"][-8:]

            keypad.press("4999#")  # a number this bus never wrote: said on the screen, nothing printed
            at = screen.wait_for("No such tap 999", at) + 1
            keypad.press("2")
            reprint = printer.wait_for_slips(4)[3]
            assert "重印 REPRINT" in reprint.splitlines()[0]
            assert reprint.split("\n", 1)[1] == one

            at = tap(driver, "签退成功", at)
            signout = printer.wait_for_slips(5)[4]
            rows = journal_rows(journal)
            assert rows[-1]["kind"] == "shift_close"
            assert value(signout, "合计 Total").split() == [str(len(purchases)),
                                                         yuan(sum(r["amount"] for r in purchases))]
            assert value(signout, "签退 Closed") != "未签退 still open"
        finally:
            stop(proc, screen)
        assert printer.unknown == []

        # The validator restarts (a new day, a power cut): "reprint" still gives the sign-out slip.
        proc, screen = start(tmp_path, rfid24_module, keypad, printer)
        try:
            screen.wait_for("r7", 0)
            keypad.press("2")
            again = printer.wait_for_slips(6)[5]
        finally:
            stop(proc, screen)
        assert again.split("\n", 1)[1] == signout

        # At the depot: the same shift reprinted from the journal onto a printer, by the command line
        depot = subprocess.run([sys.executable, "-m", "farebox.cli", "validator", "shift-report", "--journal",
                                str(journal), "--printer", f"serial:{printer.path}"], capture_output=True,
                               text=True, timeout=60, check=False)
        assert depot.returncode == 0, depot.stderr
        reprinted = printer.wait_for_slips(7)[6]
        assert "重印 REPRINT" in reprinted and value(reprinted, "合计 Total") == value(signout, "合计 Total")
        assert reprinted == depot.stdout
    # What the printer printed, kept as a test artefact to read as a driver would
    SLIPS.mkdir(parents=True, exist_ok=True)
    (SLIPS / "driver-menu-slips.txt").write_text("\n~~~~~~~~ cut ~~~~~~~~\n\n".join(printer.slips), "utf-8")

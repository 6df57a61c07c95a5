"""`farebox validator` as a real process on a bus: riders' phones in a simulated 2.4 GHz RFID-SIM module on a pty,
a simulated PSAM, the journal on disk, the fare table and deny list as files that change while it runs.

What the test checks comes from outside the process: the screen text it prints, the cards' balances, and the journal
read with plain sqlite3 after it stopped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import date, timedelta

import pytest

from blacklist.denylist import write_atomic
from epurse.apdu import ALG_SM4
from epurse.cardtypes import CardType
from hardware_sim.card import SimCard

TODAY = date.today()


def card(n: int, card_type=CardType.ADULT, balance=1000, **kw) -> SimCard:
    return SimCard(bytes.fromhex(f"5100{n:016d}"), int(card_type), balance, start=TODAY - timedelta(days=30),
                   end=TODAY + timedelta(days=30), **kw)


class Screen:
    """The validator's stdout, read in a thread so the test can wait for a line."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, after: int, timeout: float = 20.0) -> int:
        """Index of the first line from ``after`` on that contains ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{text!r} not shown; screen was:\n" + "\n".join(self.lines[after:]))
                self._cond.wait(left)


def test_validator_process_serves_riders_and_swaps_parameters(tmp_path, rfid24_module):
    fares = tmp_path / "fares.json"
    fares.write_text(json.dumps({"version": 1, "flat": {"r12": 200}, "discounts": {"2": 50}}))
    deny = write_atomic(tmp_path / "denylist.bin", [], version=1)
    journal = tmp_path / "journal.db"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "validator", "run", "--device", "bus0777", "--operator", "citybus",
         "--route", "r12", "--vehicle", "v7", "--reader", f"rfid24:{rfid24_module.path}",
         "--psam", "sim:010000000777", "--journal", str(journal), "--fares", str(fares), "--deny-list", str(deny),
         # no double-tap window: only waiting for the card to leave keeps a resting card from paying twice
         "--double-tap-seconds", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    screen = Screen(proc)
    try:
        def tap(c: SimCard, expect: str, after: int) -> int:
            rfid24_module.present(c)
            at = screen.wait_for(expect, after)
            rfid24_module.remove()
            return at + 1

        at = screen.wait_for("r12", 0)  # the idle screen names the route
        driver = card(9, CardType.DRIVER, 0, staff_no="D0777")
        at = tap(driver, "签到成功", at)
        adult, student, phone = card(1), card(2, CardType.STUDENT), card(3, algorithm=ALG_SM4)
        at = tap(adult, "扣款成功", at)
        at = tap(student, "扣款成功", at)
        # A card left on the reader is charged once, not again and again.
        rfid24_module.present(phone)
        at = screen.wait_for("扣款成功", at) + 1
        time.sleep(1.0)
        rfid24_module.remove()
        assert (adult.balance, student.balance, phone.balance) == (800, 900, 800)

        # The back office's link drops in a new fare table and deny list (atomically, as it would).
        fares.with_suffix(".tmp").write_text(json.dumps({"version": 2, "flat": {"r12": 250}}))
        os.replace(fares.with_suffix(".tmp"), fares)
        write_atomic(deny, [card(1).asn.hex()], version=2)
        time.sleep(0.5)
        at = tap(card(4), "扣款成功", at)
        at = tap(adult, "此卡已停用", at)
        assert adult.blocked and adult.balance == 800
        at = tap(driver, "签退成功", at)
        screen.wait_for("D0777", at)  # the shift report names the driver
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0, "\n".join(screen.lines)
    assert "stopped after" in screen.lines[-1]

    db = sqlite3.connect(journal)
    rows = [json.loads(body) for (body,) in db.execute("SELECT body FROM record WHERE state = 'done' "
                                                     "ORDER BY device_seq")]
    db.close()
    purchases = [(r["card_asn"][-2:], r["amount"]) for r in rows if r["kind"] == "purchase"]
    assert purchases == [("01", 200), ("02", 100), ("03", 200), ("04", 250)]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("denied") == 1 and (kinds[0], kinds[-1]) == ("shift_open", "shift_close")

    # The depot reprints the shift from the journal the process left behind; its total is the journal's own sum.
    reprint = subprocess.run([sys.executable, "-m", "farebox.cli", "validator", "shift-report", "--journal",
                              str(journal), "--width", "48", "--languages", "en"],
                             check=False, capture_output=True, text=True, timeout=60, env=env)
    assert reprint.returncode == 0, reprint.stderr
    total_fen = sum(amount for _, amount in purchases)
    total_line = next(line for line in reprint.stdout.splitlines() if line.lower().startswith("total"))
    assert total_line.split()[1:] == [str(len(purchases)), f"{total_fen // 100}.{total_fen % 100:02d}"]
    assert "D0777" in reprint.stdout and "reprint" in reprint.stdout.lower()
    missing = subprocess.run([sys.executable, "-m", "farebox.cli", "validator", "shift-report", "--journal",
                              str(journal), "--shift", "99"], check=False, capture_output=True, text=True,
                             timeout=60, env=env)
    assert missing.returncode == 1 and "no record of shift 99" in missing.stderr


@pytest.mark.parametrize("problem", ["fares", "reader"])
def test_validator_refuses_to_start_with_a_clear_reason(tmp_path, problem):
    fares = tmp_path / "fares.json"
    fares.write_text("{not json" if problem == "fares" else json.dumps({"version": 1, "flat": {"r1": 100}}))
    reader = "usb:0" if problem == "reader" else "sim:"
    out = subprocess.run(
        [sys.executable, "-m", "farebox.cli", "validator", "run", "--device", "b", "--operator", "o", "--route", "r1",
         "--vehicle", "v", "--reader", reader, "--psam", "sim:010000000001", "--journal", str(tmp_path / "j.db"),
         "--fares", str(fares)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot start" in out.stderr

"""A real `farebox validator run` on a distance-fare route knows where the bus is (issue 9, hole 8): a simulated GPS
receiver on a pty (hardware_sim.gps, NMEA with valid checksums) drives the bus along the route's stop coordinates,
which come in the fare table; riders' phones tap on and off in the RFID-SIM module on another pty; in a tunnel the
driver's stop button (a named pipe) moves the bus on. The fares charged, read from the cards' balances and from the
journal (plain sqlite3, after the process stopped), equal an independent computation from the fare table's stages.

On the code of 846ff19 nothing fed ``Terminal.at_stop``: every tap was at stop 0 and every trip cost the first
stage (and ``--gps`` did not exist)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
from test_validator_process import Screen

from epurse.cardtypes import CardType
from hardware_sim.card import SimCard
from hardware_sim.gps import SimGps, interpolate

ROOT = Path(__file__).resolve().parents[2]
TODAY = date.today()
STAGES = [[1, 100], [3, 200], [6, 300]]  # up to 1 stop 1 yuan, up to 3 stops 2 yuan, beyond 3 yuan
STUDENT_PERCENT = 50
# Seven stops about 330 m apart going north-east through Shanghai (WGS-84), numbered as the back office numbers them.
STOPS = [[n, round(31.2300 + 0.0030 * n, 6), round(121.4700 + 0.0008 * n, 6)] for n in range(7)]


def expected_fare(entry: int, exit_: int, card_type: int) -> int:
    """Independent of validator.fares: the stage whose 'up to' covers the stops ridden, then the card type's
    percentage rounded to the nearest fen."""
    ridden = abs(exit_ - entry)
    fare = next((f for up, f in STAGES if ridden <= up), STAGES[-1][1])
    percent = STUDENT_PERCENT if card_type == CardType.STUDENT else 100
    return (fare * percent + 50) // 100


def card(n: int, card_type=CardType.ADULT, balance=1000, **kw) -> SimCard:
    return SimCard(bytes.fromhex(f"5200{n:016d}"), int(card_type), balance, start=TODAY - timedelta(days=30),
                   end=TODAY + timedelta(days=30), **kw)


@pytest.fixture
def gps():
    sim = SimGps(*STOPS[0][1:], rate=10)
    yield sim
    sim.close()


def test_a_bus_driving_its_route_charges_distance_fares_by_the_stops_ridden(tmp_path, rfid24_module, gps):
    fares = tmp_path / "fares.json"
    fares.write_text(json.dumps({"version": 1, "distance": {"r9": {"stages": STAGES}},
                                 "discounts": {str(int(CardType.STUDENT)): STUDENT_PERCENT}, "stops": {"r9": STOPS}}))
    journal, button = tmp_path / "journal.db", tmp_path / "stop-button"
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "validator", "run", "--device", "bus0999", "--operator", "citybus",
         "--route", "r9", "--vehicle", "v9", "--reader", f"rfid24:{rfid24_module.path}",
         "--psam", "sim:010000000999", "--journal", str(journal), "--fares", str(fares),
         "--gps", f"{gps.path}:9600", "--stop-button", str(button), "--double-tap-seconds", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", FAREBOX_INSECURE_TEST_KEYS="1"))
    screen = Screen(proc)
    riders = {"A": card(1), "B": card(2), "C": card(3), "D": card(4, CardType.STUDENT), "E": card(5)}
    trips: dict[str, list[int]] = {}  # rider -> [entry stop, exit stop], as the bus drove them
    try:
        at = screen.wait_for("at stop 0 (gps)", 0)

        def tap(c: SimCard, expect: str) -> None:
            nonlocal at
            rfid24_module.present(c)
            at = screen.wait_for(expect, at) + 1
            rfid24_module.remove()

        def drive_to(stop: int) -> None:
            nonlocal at
            here = STOPS[stop][1:]
            gps.drive(interpolate(last_point[0], here, 3), dwell=0.15)  # between stops: no stop change
            gps.move_to(*here)
            last_point[0] = here
            at = screen.wait_for(f"at stop {stop} (gps)", at) + 1

        def board(name: str, stop: int) -> None:
            tap(riders[name], "上车成功")
            trips[name] = [stop]

        def alight(name: str, stop: int) -> None:
            tap(riders[name], "扣款成功")
            trips[name].append(stop)

        last_point = [STOPS[0][1:]]
        tap(card(9, CardType.DRIVER, 0, staff_no="D0999"), "签到成功")
        board("B", 0)
        drive_to(1)
        board("A", 1)
        board("D", 1)
        drive_to(2)
        board("C", 2)
        board("E", 2)
        gps.corrupt_next(10)  # line noise while the bus moves on: dropped, the next good fix places the bus
        drive_to(3)
        alight("C", 3)
        drive_to(4)
        alight("A", 4)
        # Beyond stop 4, outside its radius and not yet at stop 5: the bus is still "at stop 4".
        gps.drive(interpolate(STOPS[4][1:], STOPS[5][1:], 3)[1:2], dwell=0.6)
        alight("E", 4)
        # A tunnel: no fix. The driver presses the stop button at stop 5.
        gps.lose_fix()
        time.sleep(0.5)
        with open(button, "w") as pipe:
            pipe.write("next\n")
        at = screen.wait_for("at stop 5 (button)", at) + 1
        alight("D", 5)
        last_point[0] = STOPS[5][1:]
        drive_to(6)
        alight("B", 6)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0, "\n".join(screen.lines[-40:])
    assert trips == {"B": [0, 6], "A": [1, 4], "D": [1, 5], "C": [2, 3], "E": [2, 4]}

    want = {name: expected_fare(*trips[name], c.card_type) for name, c in riders.items()}
    assert want == {"A": 200, "B": 300, "C": 100, "D": 150, "E": 200}  # the stages, worked by hand
    assert {name: 1000 - c.balance for name, c in riders.items()} == want

    db = sqlite3.connect(journal)
    rows = [json.loads(body) for (body,) in db.execute("SELECT body FROM record WHERE state = 'done' "
                                                     "ORDER BY device_seq")]
    db.close()
    by_card = {c.asn.hex(): name for name, c in riders.items()}
    recorded: dict[str, list[tuple[int, int, int]]] = {}
    for r in rows:
        if r["kind"] == "purchase":
            recorded.setdefault(by_card[r["card_asn"]], []).append((r["entry_stop"], r["exit_stop"], r["amount"]))
    for name, (entry, exit_) in trips.items():
        assert recorded[name] == [(entry, 0, 0), (entry, exit_, want[name])], (name, recorded[name])
    assert sum(r["amount"] for r in rows if r["kind"] == "purchase") == sum(want.values()) == 950

"""The vpcd link under load: many purchases through pcscd + vsmartcard-vpcd, each answer checked.

The soak is opt-in (it takes minutes): ``FAREBOX_VPCD_SOAK=1000 .venv/bin/pytest tests/integration/test_vpcd_soak.py``
runs 1000 purchases; ``FAREBOX_VPCD_SOAK_LOAD=3`` adds that many busy-looping processes meanwhile. Every 25th
purchase pulls the card and inserts it again (pcscd's insertion and power-up sequence); the others keep it in the
reader, as a pass held on the reader does. Each must come out PAID with the right balance, and the card must never
have seen vpcd out of step (``VpcdCard.violations``).

The tests that always run check, against a fake vpcd on a local socket, that the card notices a request sent while
its answer is still owed and leaves the reader instead of answering it.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

# tests/integration is on sys.path (rootdir conftest, no __init__.py)
from test_readers import FARE, GET_BALANCE, SELECT, Validator, driver, rider

from hardware_sim.vpcd import DEFAULT_ATR, VpcdCard
from validator.messages import Outcome

SOAK = int(os.environ.get("FAREBOX_VPCD_SOAK", "0") or 0)
LOAD = int(os.environ.get("FAREBOX_VPCD_SOAK_LOAD", "0") or 0)
REINSERT_EVERY = 25


def _send(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(struct.pack(">H", len(payload)) + payload)


def _recv(conn: socket.socket) -> bytes:
    head = conn.recv(2, socket.MSG_WAITALL)
    return conn.recv(struct.unpack(">H", head)[0], socket.MSG_WAITALL)


@pytest.fixture
def fake_vpcd():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    yield server
    server.close()


def test_card_answers_a_vpcd_that_keeps_to_the_protocol(fake_vpcd):
    card = VpcdCard(rider(1234), port=fake_vpcd.getsockname()[1])
    card.insert()
    conn, _ = fake_vpcd.accept()
    with conn:
        conn.settimeout(5)
        _send(conn, b"\x04")
        assert _recv(conn) == DEFAULT_ATR
        _send(conn, b"\x01")  # power on and the ATR right after it: no answer owed in between
        _send(conn, b"\x04")
        assert _recv(conn) == DEFAULT_ATR
        assert card.wait_powered(1)
        _send(conn, SELECT)
        assert _recv(conn)[-2:] == b"\x90\x00"
        _send(conn, GET_BALANCE)
        assert _recv(conn) == (1234).to_bytes(4, "big") + b"\x90\x00"
    card.remove()
    assert card.violations == 0


def test_card_leaves_the_reader_when_vpcd_asks_again_before_reading_the_answer(fake_vpcd):
    card = VpcdCard(rider(), port=fake_vpcd.getsockname()[1])
    card.insert()
    conn, _ = fake_vpcd.accept()
    with conn:
        conn.settimeout(5)
        conn.sendall(b"\x00\x01\x04" * 2)  # two ATR requests, the first answer not read: out of step
        deadline = time.monotonic() + 5
        while card.inserted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not card.inserted and card.violations == 1
        try:  # no answer at all: the connection is closed (reset, as our second request went unread), card pulled
            assert conn.recv(64) == b""
        except ConnectionResetError:
            pass
    card.remove()


@pytest.mark.skipif(SOAK <= 0, reason="opt-in: FAREBOX_VPCD_SOAK=<purchases> (and FAREBOX_VPCD_SOAK_LOAD=<procs>)")
def test_vpcd_soak_many_purchases_never_out_of_step(card_rig, tmp_path):
    loaders = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(LOAD)]
    validator = Validator(tmp_path)
    try:
        rig = card_rig("pcsc")
        assert rig.tap(validator.terminal, driver()).outcome is Outcome.SHIFT_OPENED
        balance = FARE * (SOAK + 1)
        card = rider(balance)
        bad: list[str] = []
        violations = 0
        rig.present(card)
        started = time.monotonic()
        for i in range(SOAK):
            if i and i % REINSERT_EVERY == 0:
                violations += rig._vpcd.violations
                rig.remove()
                rig.present(card)
            validator.later(60)
            session = rig.reader.poll(5)
            assert session is not None, f"purchase {i}: no card seen"
            result = validator.terminal.tap(session)
            if result.outcome is Outcome.PAID and result.balance == balance - FARE:
                balance -= FARE
            else:
                bad.append(f"#{i}: {result.outcome.value} {result.detail} (wire: {list(rig._vpcd.wire)[-8:]})")
                balance = card.balance
                rig.remove()
                rig.present(card)
        violations += rig._vpcd.violations
        elapsed = time.monotonic() - started
        print(f"\nvpcd soak: {SOAK} purchases, {len(bad)} not paid, {violations} out-of-step, load {LOAD}, "
              f"{elapsed:.0f} s")
        assert not bad and violations == 0, "\n".join(bad[:10])
        assert card.balance == FARE and card.ttc == SOAK
    finally:
        for p in loaders:
            p.kill()
            p.wait()
        validator.journal.close()

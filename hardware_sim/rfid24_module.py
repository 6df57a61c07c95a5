"""A 2.45 GHz RFID-SIM reader module on a pseudo-terminal, speaking farebox's rfid24 frame profile
(validator/readers/rfid24.py documents the frames and commands).

``Rfid24Module()`` opens a pty pair and serves the master side from a thread; ``.path`` is the slave device
(``/dev/pts/N``) to open a reader on: ``open_reader(f"rfid24:{module.path}")``. It holds zero or one phone SIM (any
object with ``transmit(apdu) -> response``, e.g. a ``hardware_sim.card.SimCard``): ``present(card)``, ``remove()``.

Faults for tests, each applied to the next ``n`` answers (or requests):

- ``corrupt_next(n)``: the answer goes out with its BCC inverted (the host should ask for REPEAT);
- ``garbage_next(data, n)``: ``data`` goes on the line before the answer (the host should skip it);
- ``silence_next(n)``: the command is executed but no answer is sent (as a lost answer);
- ``nak_next(n)``: the request is treated as damaged: not executed, answered BAD FRAME (the host resends).

``counters`` counts requests, APDUs relayed to the card, REPEATs served and faults applied, so a test can tell the
recovery really happened.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import tty
from typing import Self

from validator.readers.rfid24 import (
    CMD_ACTIVATE,
    CMD_APDU,
    CMD_BAD_FRAME,
    CMD_HALT,
    CMD_REPEAT,
    ST_BAD_FRAME,
    ST_NO_CARD,
    ST_OK,
    FrameScanner,
    encode_frame,
)

log = logging.getLogger(__name__)


def card_uid(card) -> bytes:
    """The RFID-SIM's anticollision UID: the last 8 bytes of the card's ASN when it has one, as issuers
    commonly derive it; 8 bytes of the object's id otherwise."""
    asn = getattr(card, "asn", None)
    if isinstance(asn, bytes | bytearray) and len(asn) >= 8:
        return bytes(asn[-8:])
    return (id(card) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")


class Rfid24Module:
    def __init__(self, card=None):
        self._master, self._slave = os.openpty()
        # raw: no echo, no CR/LF translation, no line discipline on either side of the pair
        tty.setraw(self._master)
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self._lock = threading.RLock()  # a test's card may set the next fault from inside transmit()
        self._card = card
        self._active = None  # the card ACTIVATE found; APDUs go only to it
        self._last_answer: bytes | None = None
        self._faults = {"corrupt": 0, "silence": 0, "nak": 0, "garbage": 0}
        self._garbage = b""
        self.counters = {"requests": 0, "apdus": 0, "repeats": 0, "corrupted": 0, "silenced": 0, "naks": 0,
                         "garbage": 0, "bad_requests": 0}
        self._wake_r, self._wake_w = os.pipe()
        self._running = True
        self._thread = threading.Thread(target=self._serve, name=f"rfid24-module {self.path}", daemon=True)
        self._thread.start()

    # --- the phone --------------------------------------------------------------------------------------------

    @property
    def card(self):
        return self._card

    def present(self, card) -> None:
        with self._lock:
            self._card = card
            self._active = None

    def remove(self) -> None:
        with self._lock:
            self._card = None
            self._active = None

    # --- faults -----------------------------------------------------------------------------------------------

    def corrupt_next(self, n: int = 1) -> None:
        with self._lock:
            self._faults["corrupt"] += n

    def silence_next(self, n: int = 1) -> None:
        with self._lock:
            self._faults["silence"] += n

    def nak_next(self, n: int = 1) -> None:
        with self._lock:
            self._faults["nak"] += n

    def garbage_next(self, data: bytes, n: int = 1) -> None:
        with self._lock:
            self._garbage = bytes(data)
            self._faults["garbage"] += n

    # --- serving ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        if not self._running:
            return
        self._running = False
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:  # already closed: nothing to release
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        scanner = FrameScanner()
        while self._running:
            ready, _, _ = select.select([self._master, self._wake_r], [], [])
            if self._wake_r in ready or not self._running:
                return
            try:
                data = os.read(self._master, 4096)
            except OSError:  # EIO: the slave side is gone; we keep it open ourselves, so only on close
                return
            scanner.feed(data)
            while (body := scanner.next_frame()) is not None:
                self._handle(body)
            if scanner.bad_bcc:
                # A damaged request: nothing was executed; tell the host so it can send it again.
                scanner.bad_bcc = False
                with self._lock:
                    self.counters["bad_requests"] += 1
                    self._write(encode_frame(CMD_BAD_FRAME + bytes([ST_BAD_FRAME])), remember=True)

    def _handle(self, body: bytes) -> None:
        self.counters["requests"] += 1
        cmd, data = body[:2], body[2:]
        with self._lock:
            if self._faults["nak"]:
                self._faults["nak"] -= 1
                self.counters["naks"] += 1
                self._write(encode_frame(CMD_BAD_FRAME + bytes([ST_BAD_FRAME])), remember=True)
                return
            if cmd == CMD_REPEAT:
                self.counters["repeats"] += 1
                answer = self._last_answer or encode_frame(CMD_BAD_FRAME + bytes([ST_BAD_FRAME]))
                self._write(answer, remember=False)
                return
            answer = encode_frame(self._execute(cmd, data))
            self._write(answer, remember=True)

    def _execute(self, cmd: bytes, data: bytes) -> bytes:
        """The answer body for one request (called with the lock held)."""
        if cmd == CMD_ACTIVATE:
            if self._card is None:
                return cmd + bytes([ST_NO_CARD])
            self._active = self._card
            return cmd + bytes([ST_OK]) + card_uid(self._card)
        if cmd == CMD_HALT:
            self._active = None
            return cmd + bytes([ST_OK])
        if cmd == CMD_APDU:
            if self._active is None or self._active is not self._card:
                return cmd + bytes([ST_NO_CARD])
            self.counters["apdus"] += 1
            response = self._card.transmit(data)
            log.debug("rfid24 %s: %s -> %s", self.path, data.hex(), response.hex())
            return cmd + bytes([ST_OK]) + response
        # An unknown command code: answered like a damaged frame, nothing done.
        return CMD_BAD_FRAME + bytes([ST_BAD_FRAME])

    def _write(self, frame: bytes, *, remember: bool) -> None:
        if remember:
            # REPEAT serves the answer as it was meant, not as it was damaged. A BAD FRAME answer is remembered
            # too: REPEAT must never hand out the answer to an older command as if it were this one's.
            self._last_answer = frame
        if self._faults["silence"]:
            self._faults["silence"] -= 1
            self.counters["silenced"] += 1
            return
        if self._faults["corrupt"]:
            self._faults["corrupt"] -= 1
            self.counters["corrupted"] += 1
            frame = frame[:-2] + bytes([frame[-2] ^ 0xFF]) + frame[-1:]
        if self._faults["garbage"]:
            self._faults["garbage"] -= 1
            self.counters["garbage"] += 1
            frame = self._garbage + frame
        os.write(self._master, frame)

"""``rfid24:<serial device>[?baud=115200&timeout=0.5&retries=2]`` — a 2.45 GHz RFID-SIM reader module on a UART.

The phone's SIM speaks the same e-purse APDUs as a card; the module relays them over a serial line in frames.
Such modules differ in their command sets, so this is farebox's documented profile; a module that speaks another
dialect needs only a different ``Rfid24Reader`` command table, the framing stays.

Frame (both directions)::

    02 | LEN (2 bytes, big-endian) | CMD (2 bytes) | DATA | BCC (1 byte) | 03

- ``LEN`` counts ``CMD`` and ``DATA``: everything between LEN and BCC (so an APDU frame has LEN = 2 + len(APDU)).
- ``BCC`` is the XOR of the two LEN bytes, the two CMD bytes and every DATA byte: everything between STX and BCC.
  STX, BCC and ETX are not covered.
- No byte stuffing: a receiver finds frames by STX, a plausible LEN (2..``MAX_LEN``), ETX at the end and a good BCC,
  so bytes that happen to be 02 inside a frame, or line noise between frames, cannot fool it.

Commands (host -> module) and answers (module -> host). Every answer repeats the command code and adds one
status byte: ``00`` OK, ``01`` no card (nothing in the field, or the card that was activated has gone), ``02`` the
card did not answer in time.

| CMD     | name     | host sends          | module answers                                              |
|---------|----------|---------------------|-------------------------------------------------------------|
| ``A2 31`` | ACTIVATE | nothing             | ``A2 31 00`` + card UID (4-10 bytes), or ``A2 31 01``        |
| ``A2 32`` | HALT     | nothing             | ``A2 32 00`` (the card is released; APDUs need ACTIVATE)     |
| ``A2 33`` | APDU     | the command APDU    | ``A2 33 00`` + response APDU (data + SW1 SW2), or ``01``/``02`` |
| ``A2 3E`` | REPEAT   | nothing             | the module's previous answer (a BAD FRAME too) again, byte for byte, **not** re-executed |
| ``A2 3F`` | BAD FRAME| (module only)       | ``A2 3F 03``: the module got a frame with a bad BCC/ETX and did nothing with it |

Recovery, as the host does it:

- The module says BAD FRAME: it did not execute the command, so the host sends the same frame again. (BAD FRAME
  in answer to a REPEAT is ambiguous: an APDU then fails with ``CommunicationError``; ACTIVATE/HALT are resent.)
- The answer arrives damaged (bad BCC, no ETX, or cut short): the module did answer this command, so the host
  asks for REPEAT (never re-sends a DEBIT: a card must not see it twice).
- Bytes before, between or after frames are skipped; a frame is recognised wherever it starts.
- Silence: ACTIVATE and HALT change nothing on the card and are simply sent again. An APDU that gets no answer at
  all is a ``CommunicationError``: REPEAT might replay the answer to the previous APDU if the module never heard
  this one, and guessing with money is not allowed (the terminal's grey record settles an unanswered DEBIT).
- After ``retries`` failed attempts the host gives up with ``CommunicationError``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from validator.readers.base import CardRemoved, CardSession, CommunicationError, ReaderError

log = logging.getLogger(__name__)

STX, ETX = 0x02, 0x03
CMD_ACTIVATE = b"\xa2\x31"
CMD_HALT = b"\xa2\x32"
CMD_APDU = b"\xa2\x33"
CMD_REPEAT = b"\xa2\x3e"
CMD_BAD_FRAME = b"\xa2\x3f"
ST_OK, ST_NO_CARD, ST_CARD_MUTE, ST_BAD_FRAME = 0x00, 0x01, 0x02, 0x03
# CMD + status + the longest short APDU either way (5 + 255 + 1 command bytes, 256 + 2 response bytes)
MAX_LEN = 2 + 1 + 261
DEFAULT_BAUD = 115200
DEFAULT_TIMEOUT = 0.5  # s for a whole answer: a SIM may think ~100 ms, 270 bytes at 115200 baud take ~25 ms
DEFAULT_RETRIES = 2
QUIET_GAP = 0.02  # s of silence after a damaged frame before asking for REPEAT (a good frame may still follow)
POLL_INTERVAL = 0.02  # s between ACTIVATE attempts while the field is empty


def bcc(data: bytes) -> int:
    x = 0
    for b in data:
        x ^= b
    return x


def encode_frame(body: bytes) -> bytes:
    """``body`` is CMD + DATA; returns the whole frame with STX, LEN, BCC and ETX."""
    if not 2 <= len(body) <= MAX_LEN:
        raise ValueError(f"frame body of {len(body)} bytes (2..{MAX_LEN})")
    head = len(body).to_bytes(2, "big")
    return bytes([STX]) + head + body + bytes([bcc(head + body), ETX])


class FrameScanner:
    """Finds frames in a byte stream that may carry noise. ``feed()`` bytes, then ``next_frame()`` for each body
    (CMD + DATA) found. ``damaged`` tells that something frame-shaped went by that was not a good frame (bad BCC, or
    a started frame still incomplete) since the last ``reset()``."""

    def __init__(self):
        self.buf = bytearray()
        self.bad_bcc = False

    def reset(self) -> None:
        self.buf.clear()
        self.bad_bcc = False

    def feed(self, data: bytes) -> None:
        self.buf += data

    @property
    def damaged(self) -> bool:
        return self.bad_bcc or self._has_partial()

    def _has_partial(self) -> bool:
        i = self.buf.find(STX)
        while i >= 0:
            n = int.from_bytes(self.buf[i + 1 : i + 3], "big") if len(self.buf) >= i + 3 else None
            if n is None or 2 <= n <= MAX_LEN:
                return True
            i = self.buf.find(STX, i + 1)
        return False

    def next_frame(self) -> bytes | None:
        buf = self.buf
        i = buf.find(STX)
        first_incomplete = None
        while i >= 0:
            if len(buf) < i + 3:
                break
            n = int.from_bytes(buf[i + 1 : i + 3], "big")
            end = i + 3 + n + 2  # one past ETX
            if not 2 <= n <= MAX_LEN:
                i = buf.find(STX, i + 1)
                continue
            if len(buf) < end:
                # Might be a frame still arriving, or noise with a 02 in it: keep it, but look further for a
                # complete good frame that would prove it noise.
                if first_incomplete is None:
                    first_incomplete = i
                i = buf.find(STX, i + 1)
                continue
            if buf[end - 1] == ETX and bcc(buf[i + 1 : end - 2]) == buf[end - 2]:
                body = bytes(buf[i + 3 : end - 2])
                del buf[:end]
                return body
            if buf[end - 1] == ETX:
                self.bad_bcc = True
            i = buf.find(STX, i + 1)
        # Nothing good: forget what cannot start a frame any more.
        keep = first_incomplete if first_incomplete is not None else (i if i >= 0 else len(buf))
        del buf[:keep]
        return None


class _Damaged(Exception):
    pass


class _Silent(Exception):
    pass


@dataclass(frozen=True)
class Rfid24Options:
    device: str
    baud: int = DEFAULT_BAUD
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    @classmethod
    def parse(cls, rest: str) -> Rfid24Options:
        device, _, query = rest.partition("?")
        if not device:
            raise ReaderError("rfid24: needs a serial device, e.g. rfid24:/dev/ttyUSB0?baud=115200")
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = set(q) - {"baud", "timeout", "retries"}
        if unknown:
            raise ReaderError(f"rfid24: unknown option(s) {', '.join(sorted(unknown))} (baud, timeout, retries)")
        try:
            return cls(device, int(q.get("baud", DEFAULT_BAUD)), float(q.get("timeout", DEFAULT_TIMEOUT)),
                       int(q.get("retries", DEFAULT_RETRIES)))
        except ValueError as e:
            raise ReaderError(f"rfid24: bad option value in {rest!r}: {e}") from None


class Rfid24Session:
    def __init__(self, reader: Rfid24Reader, uid: bytes, generation: int):
        self._reader = reader
        self.uid = uid
        self._generation = generation
        self._gone = False

    def exchange(self, apdu: bytes) -> bytes:
        if self._gone or self._reader._generation != self._generation:
            raise CardRemoved("the RFID-SIM session ended (card gone or another card activated)")
        status, data = self._reader._command(CMD_APDU + bytes(apdu), idempotent=False)
        if status == ST_OK and len(data) >= 2:
            return data
        self._gone = True
        if status == ST_NO_CARD:
            raise CardRemoved("the phone left the field")
        if status == ST_CARD_MUTE:
            raise CardRemoved("the SIM did not answer (phone moved away?)")
        raise CommunicationError(f"rfid24 module answered APDU with status {status:02X} and {len(data)} bytes")


class Rfid24Reader:
    def __init__(self, options: Rfid24Options | str):
        import serial

        self.options = options if isinstance(options, Rfid24Options) else Rfid24Options.parse(options)
        try:
            self._port = serial.Serial(self.options.device, self.options.baud, timeout=QUIET_GAP,
                                       write_timeout=max(1.0, self.options.timeout))
        except (serial.SerialException, OSError, ValueError) as e:
            raise CommunicationError(f"rfid24: cannot open {self.options.device}: {e}") from e
        self._scanner = FrameScanner()
        self._lock = threading.Lock()  # one command on the line at a time
        self._generation = 0
        self.stats = {"frames": 0, "resends": 0, "repeats": 0}

    # --- the line ---------------------------------------------------------------------------------------------

    def _send(self, body: bytes) -> None:
        import serial

        # Whatever is still on the line belongs to an earlier exchange (a late or repeated answer, noise).
        try:
            self._port.reset_input_buffer()
            self._scanner.reset()
            self._port.write(encode_frame(body))
            self.stats["frames"] += 1
        except (serial.SerialException, OSError) as e:
            raise CommunicationError(f"rfid24: write to {self.options.device} failed: {e}") from e

    def _receive(self) -> bytes:
        import serial

        deadline = time.monotonic() + self.options.timeout
        scanner, port = self._scanner, self._port
        while True:
            try:
                chunk = port.read(max(1, port.in_waiting))
            except (serial.SerialException, OSError) as e:
                raise CommunicationError(f"rfid24: read from {self.options.device} failed: {e}") from e
            if chunk:
                scanner.feed(chunk)
                body = scanner.next_frame()
                if body is not None:
                    return body
                if time.monotonic() < deadline:
                    continue
                raise _Damaged() if scanner.damaged else _Silent()
            # a quiet gap: a damaged frame is not going to be followed by a good one
            if scanner.bad_bcc:
                raise _Damaged()
            if time.monotonic() >= deadline:
                raise _Damaged() if scanner.damaged else _Silent()

    def _command(self, body: bytes, *, idempotent: bool) -> tuple[int, bytes]:
        cmd = body[:2]
        with self._lock:
            answer = None
            send = body
            for attempt in range(self.options.retries + 1):
                if attempt:
                    self.stats["repeats" if send == CMD_REPEAT else "resends"] += 1
                self._send(send)
                try:
                    answer = self._receive()
                except _Damaged:
                    log.debug("rfid24: damaged answer to %s, asking for REPEAT", cmd.hex())
                    send = CMD_REPEAT
                    continue
                except _Silent:
                    if idempotent or send == CMD_REPEAT:  # nothing on the card changes by asking again
                        continue
                    raise CommunicationError(
                        f"rfid24: no answer to {cmd.hex()} within {self.options.timeout} s") from None
                if answer[:2] == CMD_BAD_FRAME:
                    if send == CMD_REPEAT and not idempotent:
                        # Either our command was refused (its BAD FRAME was then damaged on the way back) or our
                        # REPEAT was, which leaves the real answer unknowable. Sending the APDU again could execute
                        # it twice: give up instead.
                        raise CommunicationError(f"rfid24: the answer to {cmd.hex()} was lost and cannot be "
                                                 "recovered (module refused a damaged frame)")
                    # the module threw our frame away unexecuted: sending it again is safe
                    log.debug("rfid24: module refused a damaged frame, sending it again")
                    send = body
                    continue
                if answer[:2] != cmd or len(answer) < 3:
                    raise CommunicationError(f"rfid24: asked {cmd.hex()}, module answered {answer[:3].hex()}")
                return answer[2], answer[3:]
            raise CommunicationError(
                f"rfid24: no good answer to {cmd.hex()} after {self.options.retries + 1} attempts")

    # --- Reader -----------------------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> CardSession | None:
        deadline = time.monotonic() + timeout
        while True:
            status, uid = self._command(CMD_ACTIVATE, idempotent=True)
            if status == ST_OK:
                self._generation += 1
                return Rfid24Session(self, uid, self._generation)
            if status not in (ST_NO_CARD, ST_CARD_MUTE):
                raise CommunicationError(f"rfid24: ACTIVATE answered status {status:02X}")
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_INTERVAL)

    def halt(self) -> None:
        self._generation += 1
        self._command(CMD_HALT, idempotent=True)

    def close(self) -> None:
        self._generation += 1
        try:
            self._port.close()
        except OSError:  # closing a port whose device vanished: nothing left to release
            pass

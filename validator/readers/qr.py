"""``qr:`` — a 2D (QR) scanner module on a serial port, as buses carry beside the card reader.

    qr:/dev/ttyUSB1?baud=9600

The module decodes the code itself and sends its text followed by CR (some send CR LF, or LF alone: any of these
ends a code; empty lines are skipped). There are no frames and no answers: the scanner only talks. What a code
says is validator.tickets' business; this backend only cuts the byte stream into codes, and keeps its memory
bounded whatever comes down the line: a "code" longer than ``max_code`` bytes is handed over cut to
``max_code + 1`` bytes (so the ticket codec refuses it as too long) and the rest of it, up to its CR, is dropped.

A scanner is not a card reader (nothing to exchange APDUs with), so it has its own small interface, ``read()``,
beside ``validator.readers.Reader``; the validator's loop polls both. Port failures raise
``validator.readers.CommunicationError``, like the other serial backend (rfid24).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from validator.readers.base import CommunicationError, ReaderError

MAX_CODE = 2048  # bytes: QR codes a bus scanner reads hold at most a few hundred characters
_ENDS = b"\r\n"


class QrScanner:
    def __init__(self, device: str, *, baud: int = 9600, max_code: int = MAX_CODE):
        import serial

        self.device = device
        self.max_code = max_code
        self._buf = bytearray()
        self._overflow = False  # dropping the rest of a code that was too long
        self._codes: list[bytes] = []
        try:
            self.port = serial.Serial(device, baudrate=baud, timeout=0)
        except (serial.SerialException, OSError) as e:
            raise CommunicationError(f"QR scanner {device}: {e}") from None

    def read(self, timeout: float = 0.0) -> bytes | None:
        """The next complete code (without its line end), or None if none came within ``timeout`` seconds."""
        import serial

        if not self._codes:
            try:
                self.port.timeout = timeout
                first = self.port.read(1)  # waits up to timeout for the first byte
                data = first + self.port.read(self.port.in_waiting) if first else b""
            except (serial.SerialException, OSError) as e:
                raise CommunicationError(f"QR scanner {self.device}: {e}") from None
            self._feed(data)
        return self._codes.pop(0) if self._codes else None

    def _feed(self, data: bytes) -> None:
        for b in data:
            if b in _ENDS:
                if self._buf:
                    self._codes.append(bytes(self._buf))
                self._buf.clear()
                self._overflow = False
            elif self._overflow:
                continue
            elif len(self._buf) > self.max_code:
                self._overflow = True  # _buf already holds max_code + 1 bytes: enough to be refused
            else:
                self._buf.append(b)

    def close(self) -> None:
        try:
            self.port.close()
        except Exception:  # noqa: BLE001 - closing a port that went away
            pass


def open_scanner(path: str) -> QrScanner:
    """A scanner from its path: ``qr:<serial device>[?baud=9600]``."""
    scheme, sep, rest = path.partition(":")
    if scheme != "qr" or not sep or not rest:
        raise ReaderError(f"scanner path {path!r}: give qr:<serial device>[?baud=9600], e.g. qr:/dev/ttyUSB1")
    device, _, query = rest.partition("?")
    try:
        baud = int(parse_qs(query).get("baud", ["9600"])[0])
    except ValueError:
        raise ReaderError(f"scanner path {path!r}: baud must be a number, e.g. ?baud=9600") from None
    return QrScanner(device, baud=baud)

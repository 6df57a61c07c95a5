"""The validator's slip printer: an ESC/POS receipt printer (58 mm, 32 columns; 80 mm, 48) on a serial port.

Chosen by a path string, as readers are (validator.readers):

| path | printer |
|---|---|
| ``serial:<device>[?baud=9600]`` | an ESC/POS printer on a UART or USB-serial adapter (pyserial) |
| ``console:`` | no printer: the slip's text goes to standard output (a bench, the demo) |

Why our own ~30 lines of ESC/POS and not python-escpos (3.1 installs from PyPI): a slip uses five commands, and
python-escpos would bring Pillow, PyYAML, qrcode, python-barcode, appdirs, argcomplete and six onto every bus for
them. It also leaves the printer's mode to chance: it writes a line holding Chinese as raw GB18030 but never sends
``FS &`` (Chinese character mode), and a line without Chinese goes through its code-page tables, where a sign such
as "…" has no place. Here every slip is one encoding, set explicitly. What we send, per slip::

    ESC @            initialise (modes back to default)
    FS &             Chinese character mode: text bytes are GB18030
    <lines>, each encoded GB18030 and ended by LF
    ESC d 4          feed four lines, so the text clears the cutter
    GS V 1           partial cut

Printing happens on a thread of its own (:meth:`SlipPrinter.print_slip` only queues), so a slow 9600-baud printer
never holds up the next rider's tap. A printer that is unplugged or out of order is logged and retried on the
next slip; it never stops the validator.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from urllib.parse import parse_qs

from wire.escpos import CHINESE_ON, CUT, ENCODING, ESC, FEED_4, FS, GS, INIT, LF, slip_bytes  # noqa: F401 (shared)

log = logging.getLogger(__name__)

SCHEMES = ("serial", "console")


class PrinterError(Exception):
    """The printer path is wrong, or the printer cannot be opened."""


class SlipPrinter:
    """Queues slips and writes them from a worker thread with ``write(bytes)``; ``open_port`` (re)opens the port."""

    def __init__(self, open_port: Callable[[], Callable[[bytes], None]], *, name: str):
        self.name = name
        self._open_port = open_port
        self._write: Callable[[bytes], None] | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self.printed = self.failed = 0  # slips sent to the printer, and slips lost to a fault (logged)
        self._thread = threading.Thread(target=self._run, name=f"printer {name}", daemon=True)
        self._thread.start()

    def print_slip(self, text: str) -> None:
        self._queue.put(slip_bytes(text))

    def close(self, timeout: float = 5.0) -> None:
        """Print what is queued (up to ``timeout`` seconds), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                if self._write is None:
                    self._write = self._open_port()
                self._write(data)
                self.printed += 1
            except Exception as e:  # noqa: BLE001 - a printer fault must never reach the fare loop
                self._write = None
                self.failed += 1
                log.error("printer %s: slip not printed (%s); check its cable, power and paper", self.name, e)


def _serial_port(device: str, baud: int) -> Callable[[], Callable[[bytes], None]]:
    def open_port():
        import serial

        port = serial.Serial(device, baudrate=baud, timeout=1, write_timeout=30)

        def write(data: bytes) -> None:
            port.write(data)
            port.flush()

        return write

    return open_port


def _console_port() -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        text = data.removeprefix(INIT + CHINESE_ON).removesuffix(FEED_4 + CUT).decode(ENCODING, errors="replace")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    return write


def open_printer(path: str) -> SlipPrinter:
    scheme, sep, rest = path.partition(":")
    if not sep or scheme not in SCHEMES:
        raise PrinterError(f"printer path {path!r}: give one of serial:<device>[?baud=9600], console:")
    if scheme == "console":
        return SlipPrinter(lambda: _console_port(), name="console")
    device, _, query = rest.partition("?")
    if not device:
        raise PrinterError(f"printer path {path!r} names no serial device, e.g. serial:/dev/ttyUSB0")
    try:
        baud = int(parse_qs(query).get("baud", ["9600"])[0])
    except ValueError:
        raise PrinterError(f"printer path {path!r}: baud must be a number, e.g. ?baud=19200") from None
    if not os.path.exists(device):  # not fatal: fares go on, and a printer plugged in later is opened then
        log.warning("printer %s is not there: slips are not printed until it is (check the cable or the path)",
                    device)
    return SlipPrinter(_serial_port(device, baud), name=device)

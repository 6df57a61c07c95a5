"""A simulated 2D (QR) scanner module on a pty: the validator opens ``qr:<.path>``; a test "scans" a code with
``scan(text)``, which sends the code's text and a CR as the real module does once it has decoded a QR code.
``send(raw)`` puts any bytes on the line (garbage, a code without its CR, 2 kB of noise)."""

from __future__ import annotations

import os
import tty
from typing import Self


class SimScanner:
    def __init__(self, line_end: bytes = b"\r"):
        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.line_end = line_end
        self.scans = 0

    def scan(self, text: str | bytes) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        self.send(data + self.line_end)
        self.scans += 1

    def send(self, raw: bytes) -> None:
        view = memoryview(raw)
        while view:  # a pty takes a few kB at a time
            n = os.write(self._master, view)
            view = view[n:]

    def close(self) -> None:
        for fd in (self._slave, self._master):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""A simulated ESC/POS receipt printer on a pty: the validator prints to ``.path`` as it would to
``/dev/ttyUSB0``, and the printer decodes what arrives into the text a driver would tear off.

It understands what slip printers are sent (ESC @, ESC a/E/!/-/M/t/J/d, FS & and FS ., GS !, GS V, LF, CR) and
decodes text as GB18030 in Chinese mode and Latin-1 outside it. Each cut (GS V) ends a slip; ``slips`` holds
them in order, ``wait_for_slips(n)`` waits until ``n`` have been cut. Bytes it does not know are kept in
``unknown`` rather than guessed at, so a test sees a printer driver that sends something odd.
"""

from __future__ import annotations

import os
import threading
import time
import tty
from typing import Self

ESC, FS, GS = 0x1B, 0x1C, 0x1D
# ESC commands with one parameter byte: justification, bold, print mode, underline, font, code table, feeds
_ESC_ONE = frozenset(b"aE!-MtJd")


class SimPrinter:
    def __init__(self):
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # bytes as they are: no LF -> CRLF, no echo
        self.path = os.ttyname(self._slave)
        self.slips: list[str] = []
        self.unknown: list[bytes] = []
        self._text = bytearray()
        self._chinese = False
        self._pending = b""
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="sim printer", daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        for fd in (self._slave, self._master):
            try:
                os.close(fd)
            except OSError:
                pass
        self._thread.join(timeout=2)

    def wait_for_slips(self, n: int, timeout: float = 20.0) -> list[str]:
        """The first ``n`` slips, once they have been cut."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.slips) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{n} slip(s) expected, {len(self.slips)} printed: {self.slips!r}")
                self._cond.wait(left)
            return self.slips[:n]

    def _serve(self) -> None:
        while not self._closed:
            try:
                data = os.read(self._master, 4096)
            except OSError:
                return
            if not data:
                return
            with self._cond:
                self._feed(data)

    def _feed(self, data: bytes) -> None:
        buf = self._pending + data
        i = 0
        while i < len(buf):
            b = buf[i]
            need = self._command_length(buf, i)
            if need is None:  # a command cut in two by the pty: wait for the rest
                break
            if need:
                self._command(buf[i:i + need])
                i += need
                continue
            if b == 0x0A:
                self._text += b"\n"
            elif b != 0x0D:
                self._text.append(b)
            i += 1
        self._pending = buf[i:]

    @staticmethod
    def _command_length(buf: bytes, i: int) -> int | None:
        """Bytes of the command starting at ``i`` (0: not a command; None: not all there yet)."""
        b = buf[i]
        if b not in (ESC, FS, GS):
            return 0
        if i + 1 >= len(buf):
            return None
        op = buf[i + 1]
        if b == ESC and op == ord("@") or b == FS and op in b"&.":
            return 2
        if b == ESC and op in _ESC_ONE or b == GS and op == ord("!"):
            return 3 if i + 2 < len(buf) else None
        if b == GS and op == ord("V"):
            if i + 2 >= len(buf):
                return None
            if buf[i + 2] in (65, 66):  # GS V m n: feed n then cut
                return 4 if i + 3 < len(buf) else None
            return 3
        return 2  # unknown: kept in ``unknown``, its parameters (if any) read as text

    def _command(self, cmd: bytes) -> None:
        if cmd == b"\x1b@":
            self._chinese = False
        elif cmd == b"\x1c&":
            self._chinese = True
        elif cmd == b"\x1c.":
            self._chinese = False
        elif cmd[:2] == b"\x1bd":
            self._text += b"\n" * cmd[2]
        elif cmd[:2] == b"\x1dV":
            self._cut()
        elif not (cmd[0] == ESC and cmd[1] in _ESC_ONE or cmd[:2] == b"\x1d!"):
            self.unknown.append(cmd)

    def _cut(self) -> None:
        text = self._text.decode("gb18030" if self._chinese else "latin-1", errors="replace")
        self._text = bytearray()
        self.slips.append(text.strip("\n") + "\n")
        self._cond.notify_all()

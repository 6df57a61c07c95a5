"""The validator's main loop: wait for a card, decide, show, and between riders keep the bus's parameters current.

One card is one tap: after deciding, the loop waits until that card has left the field, so a card resting on the
reader is not charged again when the double-tap window runs out. Between taps it picks up a new fare table or deny
list that has landed on disk (the link writes them atomically; see blacklist.denylist.replace_file) and swaps it in
whole, never mid-tap; a file that fails its checks is refused with a log line and the old one stays in force. The
idle screen is refreshed every few seconds with the shift and the journal's state. Signed packages the link has
checked and staged (validator.downlink) are applied at the same moment, once their activation time has come.
The bus's stop, as the GPS receiver or the driver's stop button last posted it (validator.gps.Position), is handed
to the terminal at the same moment, so a distance fare is priced from where the bus is.

Nothing here knows which reader, display or link is underneath; farebox/validator_cmd.py wires them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from blacklist.denylist import DenyList, DenyListError
from epurse import apdu
from validator.display import Display
from validator.fares import FareError, FareTable
from validator.readers.base import CardSession, Reader, ReaderError
from validator.terminal import Terminal

log = logging.getLogger(__name__)


class _WatchedFile:
    """A parameter file, reloaded when its identity (inode, size, mtime) changes: an atomic rename is noticed."""

    def __init__(self, path: Path | None):
        self.path = path
        self._seen: tuple | None = None

    def changed(self) -> bool:
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        if ident == self._seen:
            return False
        self._seen = ident
        return True


class ValidatorApp:
    def __init__(self, terminal: Terminal, reader: Reader, display: Display, *, uplink=None, downlink=None,
                 fares_file: str | Path | None = None, deny_file: str | Path | None = None,
                 idle_seconds: float = 5.0, poll_seconds: float = 0.2, position=None, menu=None, scanner=None,
                 tickets=None):
        self.terminal = terminal
        self.reader = reader
        self.display = display
        self.uplink = uplink
        self.downlink = downlink
        self._fares = _WatchedFile(Path(fares_file) if fares_file else None)
        self._deny = _WatchedFile(Path(deny_file) if deny_file else None)
        self.idle_seconds = idle_seconds
        self.poll_seconds = poll_seconds
        self.position = position  # validator.gps.Position, or None: the bus's stop never changes
        self.menu = menu  # validator.driver_menu.DriverMenu, or None: no keypad
        # validator.readers.qr.QrScanner and validator.tickets.TicketChecker, or None: no 2D scanner on this bus
        self.scanner = scanner
        self.tickets = tickets
        self.taps = 0
        self.scans = 0

    def run(self, stop: threading.Event) -> None:
        """Serve riders until ``stop`` is set. Never raises for a card, a reader hiccup or a bad parameter file."""
        next_idle = 0.0
        while not stop.is_set():
            self.load_parameters()
            self.move()
            if self.menu is not None:
                self.menu.poll()  # the driver's keys, between taps like everything else here
            if self.scanner is not None:
                self.scan()
            if time.monotonic() >= next_idle:
                self.display.idle(route=self.terminal.config.route, shift=self.terminal.shift,
                                  usage=self.terminal.journal.usage())
                next_idle = time.monotonic() + self.idle_seconds
            try:
                session = self.reader.poll(timeout=self.poll_seconds)
            except ReaderError as e:
                log.error("reader: %s; retrying in 1 s (check the reader's cable and power)", e)
                stop.wait(1.0)
                continue
            if session is None:
                continue
            self.serve(session, stop)
            next_idle = time.monotonic() + self.idle_seconds

    def scan(self) -> None:
        """Check the codes the 2D scanner read since the last look (tickets: validator.tickets)."""
        try:
            code = self.scanner.read(0.0)
        except ReaderError as e:
            log.error("QR scanner: %s (check its cable and power)", e)
            return
        while code is not None:
            result = self.tickets.scan(code)
            self.scans += 1
            self.display.show(result)
            if self.uplink is not None and result.record is not None:
                self.uplink.notify()
            try:
                code = self.scanner.read(0.0)
            except ReaderError:
                return

    def move(self) -> None:
        """Tell the terminal the stop the GPS or the stop button reported since the last look (between taps)."""
        if self.position is None:
            return
        number = self.position.take()
        if number is not None:
            self.terminal.at_stop(number)
            log.info("at stop %d (%s)", number, self.position.source)

    def serve(self, session: CardSession, stop: threading.Event) -> None:
        result = self.terminal.tap(session)
        self.taps += 1
        self.display.show(result)
        if result.report is not None:
            self.display.show_shift_report(result.report)
        if self.menu is not None:
            self.menu.after_tap(result)  # the sign-out slip
        if self.uplink is not None and result.record is not None:
            self.uplink.notify()
        self._wait_until_removed(session, stop)

    def _wait_until_removed(self, session: CardSession, stop: threading.Event) -> None:
        # A harmless SELECT every poll period; the reader says when the card has gone.
        while not stop.wait(self.poll_seconds):
            try:
                session.exchange(apdu.select_aid())
            except ReaderError:
                return

    def load_parameters(self) -> None:
        """Apply staged packages that are due, then swap in a fare table or deny list that changed on disk; keep
        the old one if the new one is bad."""
        if self.downlink is not None:
            kinds = {p.kind for p in self.downlink.apply_due()}
            # The downlink wrote those files itself and swapped them in already: not a change to load again.
            if "params" in kinds:
                self._fares.changed()
            if "denylist" in kinds:
                self._deny.changed()
        if self._fares.changed():
            try:
                table = FareTable.from_dict(json.loads(self._fares.path.read_text("utf-8")))
            except (OSError, ValueError, FareError) as e:
                log.error("fare table %s refused, v%d stays in force: %s", self._fares.path,
                          self.terminal.fares.version, e)
            else:
                if table != self.terminal.fares:
                    self.terminal.replace_fares(table)
        if self._deny.changed():
            try:
                deny = DenyList.load(self._deny.path)
            except (OSError, DenyListError) as e:
                log.error("deny list %s refused, v%d stays in force: %s", self._deny.path,
                          self.terminal.deny_list.version, e)
            else:
                self.terminal.replace_deny_list(deny)

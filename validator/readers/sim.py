"""``sim:`` — an in-process reader. Anything with ``transmit(apdu) -> response`` (a hardware_sim card, a phone SIM)
can be put in its field; the terminal code above cannot tell it from a real reader.
"""

from __future__ import annotations

import threading

from validator.readers.base import CardRemoved, CardSession


class SimSession:
    def __init__(self, reader: SimReader, card):
        self._reader = reader
        self._card = card

    def exchange(self, apdu: bytes) -> bytes:
        if self._reader.card is not self._card:
            raise CardRemoved("card left the field")
        return self._card.transmit(bytes(apdu))


class SimReader:
    def __init__(self):
        self.card = None
        self._changed = threading.Condition()

    def present(self, card) -> None:
        with self._changed:
            self.card = card
            self._changed.notify_all()

    def remove(self) -> None:
        with self._changed:
            self.card = None

    def poll(self, timeout: float = 0.0) -> CardSession | None:
        with self._changed:
            if self.card is None and timeout > 0:
                self._changed.wait(timeout)
            return SimSession(self, self.card) if self.card is not None else None

    def close(self) -> None:
        self.remove()

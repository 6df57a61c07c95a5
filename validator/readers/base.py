"""The reader front end: every backend (sim:, and later pcsc:, nfc:, rfid24:) hands out card sessions with one
method, ``exchange(apdu) -> response``. Card code never sees the backend.

One exception tree, so the terminal catches meaning rather than library internals.
"""

from __future__ import annotations

from typing import Protocol


class ReaderError(Exception):
    """Anything that went wrong between the reader and the card."""


class CardRemoved(ReaderError):
    """The card left the field (or the phone was pulled away) before it answered."""


class CommunicationError(ReaderError):
    """The reader or the link to it failed: a garbled frame, a timeout, a dead port."""


class CardSession(Protocol):
    def exchange(self, apdu: bytes) -> bytes: ...


class Reader(Protocol):
    def poll(self, timeout: float = 0.0) -> CardSession | None:
        """A session with the card now in the field, or None if the field stays empty for ``timeout`` seconds."""

    def close(self) -> None: ...

"""``pcsc:<reader>`` — a PC/SC reader through pcscd, with pyscard's thin ``smartcard.scard`` layer (the PC/SC C API
one to one, so every failure arrives as a PC/SC return code we can map exactly).

``<reader>`` is the reader's full PC/SC name (``pcsc:farebox vpcd 00 00``), a unique part of it
(``pcsc:ACR122``), its index in pcscd's list (``pcsc:0``), or empty for the first reader. The name is resolved
when the reader is opened and again whenever it is not found (a USB reader plugged back in gets a new name
suffix from pcscd only if another is present).

Sessions speak T=0 or T=1, whichever the card offers. On T=0 (and on T=1 cards that behave so) a card may answer
``61xx`` ("xx more bytes waiting": fetched with GET RESPONSE ``00 C0 00 00 xx``, repeatedly, data concatenated)
or ``6Cxx`` ("wrong Le, the right one is xx": the same command is sent again with Le = xx); the terminal only
ever sees the final data + status word.
"""

from __future__ import annotations

import logging
import time

from validator.readers.base import CardRemoved, CardSession, CommunicationError, ReaderError

log = logging.getLogger(__name__)

# A card pulled mid-command first shows as "transaction failed"; pcscd notices the empty slot on its next
# presence poll. Waiting this long for that tells "card removed" from a reader fault.
GONE_WAIT_MS = 1000
MAX_CHAINED = 32  # GET RESPONSE / Le-correction rounds before we call the card broken (a loop would hang the bus)


def _scard():
    try:
        from smartcard import scard
    except ImportError as e:  # pragma: no cover - pyscard is a dependency
        raise ReaderError(f"pcsc: pyscard is not installed ({e})") from e
    return scard


class PcscSession:
    def __init__(self, reader: PcscReader, handle, protocol: int):
        self._reader = reader
        self._handle = handle
        self._protocol = protocol
        self._gone = False

    def _transmit(self, apdu: bytes) -> bytes:
        s = _scard()
        if self._gone:
            raise CardRemoved("card left the reader")
        hr, response = s.SCardTransmit(self._handle, self._protocol, list(apdu))
        if hr != s.SCARD_S_SUCCESS:
            self._fail(hr, "transmit")
        if len(response) < 2:
            raise CommunicationError(f"pcsc: card answered {bytes(response).hex() or 'nothing'}, no status word")
        return bytes(response)

    def exchange(self, apdu: bytes) -> bytes:
        apdu = bytes(apdu)
        response = self._transmit(apdu)
        data = b""
        for _ in range(MAX_CHAINED):
            sw1, sw2 = response[-2], response[-1]
            if sw1 == 0x6C:
                # Resend with the Le the card asked for: a case 2/4 command has its Le as the last byte.
                has_le = len(apdu) == 5 or (len(apdu) > 5 and len(apdu) == 6 + apdu[4])
                apdu = (apdu[:-1] if has_le else apdu) + bytes([sw2])
                response = self._transmit(apdu)
            elif sw1 == 0x61:
                data += response[:-2]
                response = self._transmit(bytes([apdu[0] & 0x03, 0xC0, 0x00, 0x00, sw2]))
            else:
                return data + response
        raise CommunicationError(f"pcsc: card kept asking for GET RESPONSE / Le after {MAX_CHAINED} rounds")

    def _fail(self, hr: int, what: str):
        s = _scard()
        message = s.SCardGetErrorMessage(hr)
        removed = {s.SCARD_W_REMOVED_CARD, s.SCARD_E_NO_SMARTCARD, s.SCARD_W_RESET_CARD,
                   s.SCARD_W_UNPOWERED_CARD, s.SCARD_W_UNRESPONSIVE_CARD}
        if hr in removed or self._reader.card_gone(GONE_WAIT_MS):
            self._gone = True
            self.disconnect()
            raise CardRemoved(f"card left the reader ({what}: {message})")
        if hr in (s.SCARD_E_NO_SERVICE, s.SCARD_E_SERVICE_STOPPED, s.SCARD_E_INVALID_HANDLE):
            self._reader._lost_service()
        elif hr == s.SCARD_E_NOT_TRANSACTED:
            # The slot still says "card", but the card did not take the command: swapped faster than pcscd's
            # presence poll, or it lost power. Whatever it had selected is gone, so this session is over either way;
            # a reset tells a card we can talk to again (the next poll) from a dead reader.
            rv = s.SCardReconnect(self._handle, s.SCARD_SHARE_SHARED, s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1,
                                  s.SCARD_RESET_CARD)
            if (rv[0] if isinstance(rv, list | tuple) else rv) == s.SCARD_S_SUCCESS:
                self._gone = True
                self.disconnect()
                raise CardRemoved(f"the card in {self._reader.name!r} was reset or replaced mid-session ({message})")
        raise CommunicationError(f"pcsc {what} on {self._reader.name!r}: {message} (0x{hr & 0xFFFFFFFF:08X})")

    def disconnect(self) -> None:
        if self._handle is not None:
            s = _scard()
            s.SCardDisconnect(self._handle, s.SCARD_LEAVE_CARD)
            self._handle = None
            self._gone = True


class PcscReader:
    def __init__(self, which: str = ""):
        self.which = which
        self._context = None
        self.name = ""
        self._session: PcscSession | None = None
        self._connect_service()
        self.name = self._resolve()

    # --- pcscd ------------------------------------------------------------------------------------------------

    def _connect_service(self) -> None:
        s = _scard()
        hr, context = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
        if hr != s.SCARD_S_SUCCESS:
            raise CommunicationError(f"pcsc: cannot reach pcscd: {s.SCardGetErrorMessage(hr)} (is pcscd running?)")
        self._context = context

    def _lost_service(self) -> None:
        """pcscd restarted or went away: the next poll establishes a fresh context."""
        self._context = None

    def readers(self) -> list[str]:
        s = _scard()
        if self._context is None:
            self._connect_service()
        hr, names = s.SCardListReaders(self._context, [])
        if hr == s.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hr != s.SCARD_S_SUCCESS:
            if hr in (s.SCARD_E_NO_SERVICE, s.SCARD_E_SERVICE_STOPPED, s.SCARD_E_INVALID_HANDLE):
                self._lost_service()
            raise CommunicationError(f"pcsc: cannot list readers: {s.SCardGetErrorMessage(hr)}")
        return list(names)

    def _resolve(self) -> str:
        names = self.readers()
        which = self.which
        if not names:
            raise ReaderError("pcsc: pcscd knows no readers")
        if which == "":
            return names[0]
        if which in names:
            return which
        if which.isdigit():
            i = int(which)
            if i < len(names):
                return names[i]
            raise ReaderError(f"pcsc: no reader number {i}; pcscd has {names}")
        matches = [n for n in names if which.lower() in n.lower()]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ReaderError(f"pcsc: no reader matches {which!r}; pcscd has {names}")
        raise ReaderError(f"pcsc: {which!r} matches several readers {matches}; give the full name")

    def _state(self, timeout_ms: int, known: int | None) -> int | None:
        """The reader's event state after waiting up to ``timeout_ms`` for a change from ``known``."""
        s = _scard()
        if self._context is None:
            self._connect_service()
        current = s.SCARD_STATE_UNAWARE if known is None else known & ~s.SCARD_STATE_CHANGED
        hr, states = s.SCardGetStatusChange(self._context, timeout_ms, [(self.name, current)])
        if hr == s.SCARD_E_TIMEOUT:
            return known
        if hr == s.SCARD_E_UNKNOWN_READER:
            self.name = self._resolve()  # unplugged and back: look it up again
            return None
        if hr != s.SCARD_S_SUCCESS:
            if hr in (s.SCARD_E_NO_SERVICE, s.SCARD_E_SERVICE_STOPPED, s.SCARD_E_INVALID_HANDLE):
                self._lost_service()
            raise CommunicationError(f"pcsc: reader {self.name!r}: {s.SCardGetErrorMessage(hr)}")
        return states[0][1]

    def _present(self, state: int | None) -> bool:
        s = _scard()
        return state is not None and bool(state & s.SCARD_STATE_PRESENT) and not state & s.SCARD_STATE_MUTE

    def card_gone(self, wait_ms: int = 0) -> bool:
        """True if the slot is empty now, or becomes empty within ``wait_ms``."""
        try:
            state = self._state(0, None)
            if self._present(state) and wait_ms:
                state = self._state(wait_ms, state)
        except ReaderError:
            return True
        return not self._present(state)

    # --- Reader -----------------------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> CardSession | None:
        s = _scard()
        if self._session is not None:  # a new tap: the previous session's card handle is released
            self._session.disconnect()
            self._session = None
        deadline = time.monotonic() + timeout
        state = None
        while True:
            state = self._state(0 if state is None else max(0, int((deadline - time.monotonic()) * 1000)), state)
            if self._present(state):
                hr, handle, protocol = s.SCardConnect(self._context, self.name, s.SCARD_SHARE_SHARED,
                                                      s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
                if hr == s.SCARD_S_SUCCESS:
                    self._session = PcscSession(self, handle, protocol)
                    return self._session
                if hr not in (s.SCARD_E_NO_SMARTCARD, s.SCARD_W_REMOVED_CARD, s.SCARD_W_UNRESPONSIVE_CARD):
                    raise CommunicationError(f"pcsc: connect to the card in {self.name!r}: "
                                             f"{s.SCardGetErrorMessage(hr)}")
                state = None  # gone again between the two calls: start over
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        s = _scard()
        if self._session is not None:
            self._session.disconnect()
            self._session = None
        if self._context is not None:
            s.SCardReleaseContext(self._context)
            self._context = None

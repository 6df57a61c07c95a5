"""A hardware_sim card in a real PC/SC reader: the card side of vsmartcard's ``vpcd`` driver for pcscd.

pcscd loads ``libifdvpcd.so``, which listens on a TCP port per virtual reader; a virtual card connects to it as a
client, and then every PC/SC application (pyscard, opensc-tool, scriptor) sees a card in that reader.
``VpcdCard(card).insert()`` connects (the card is in the reader), ``remove()`` disconnects (the card is pulled).

vpcd's wire protocol: every message is a 2-byte big-endian length and a payload. A 1-byte payload is a control
byte: ``00`` power off, ``01`` power on, ``02`` reset (no reply to any of these), ``04`` "send your ATR" (reply:
the ATR). A longer payload is a command APDU; the reply is the response APDU from ``card.transmit``.

Speed: without ``TCP_NODELAY`` (our replies are small writes) and ``TCP_QUICKACK`` after every ``recv`` (Linux
turns quick ACKs off again on its own), each round trip waits for a delayed ACK, ~40 ms; with both it is ~30 µs.

Order on the socket (Debian 12's vsmartcard-vpcd, upstream virtualsmartcard 0.8): vpcd never has two requests out.
``vicc_transmit`` (vpcd.c) sends and then blocks in ``recv(MSG_WAITALL)`` with no timeout until the whole answer is
in, and pcscd calls the driver for one slot only under that slot's mutex (``IFDStatusICC`` / ``IFDPowerICC`` /
``IFDTransmit`` in pcscd's ifdwrapper.c). So the only requests that can follow one another without an answer
between them are the power controls: a new card sees ``04`` (pcscd's presence poll, ``vicc_present``), then
``04 01 04`` (``IFDPowerICC``: presence check, power on, ``IFDHGetCapabilities(TAG_IFD_ATR)``), then pcscd's
presence poll ``04`` every 400 ms. The card checks that order: a request that arrives while an answer is still
owed is a broken link, and the card leaves the reader (pcscd and the application see a removed card) rather than
hand any later command the answer meant for an earlier one. ``violations`` counts those, and the log line shows
the early bytes.

That order holds only if one pcscd reader entry uses the driver. ``libifdvpcd.so`` keeps its sockets in one global
array indexed by slot (``Lun & 0xffff``), so a second entry (Debian's ``/etc/reader.conf.d/vpcd``, "Virtual PCD" on
0x8C7B) takes over the first one's slots: pcscd then polls one card from two readers, each under its own mutex, and
their requests cross (``vpcd sent 000104 while the answer to 04 was owed``, or a card never powered). This was the
"fresh card kept waiting" failure of earlier CI runs; scripts/ensure-services.sh disables the other entry.

One vpcd port holds one card. A second card that connects while another is in the reader sits in the listen
backlog, unseen, until the first leaves: ``wait_powered()`` tells "pcscd has powered *this* card" from "some card
is in that reader" (another process's, when two test runs share the machine's one pcscd).

``PCSCD_READER_CONF`` is the reader.conf entry that makes pcscd offer two farebox readers on ports 0x9C40 and
0x9C41; scripts/ensure-services.sh installs the same text and starts pcscd with it.
"""

from __future__ import annotations

import argparse
import collections
import logging
import socket
import struct
import threading
import time
from typing import Self

log = logging.getLogger(__name__)

DEFAULT_PORT = 0x9C40  # the first farebox vpcd reader; the second is DEFAULT_PORT + 1
READER_NAME = "farebox vpcd"  # pcscd appends " 00 00", " 00 01"
PCSCD_READER_CONF = f"""\
# farebox: two virtual PC/SC readers for hardware_sim cards (hardware_sim/vpcd.py)
FRIENDLYNAME "{READER_NAME}"
DEVICENAME   /dev/null:0x{DEFAULT_PORT:04X}
LIBPATH      /usr/lib/pcsc/drivers/serial/libifdvpcd.so
CHANNELID    0x{DEFAULT_PORT:04X}
"""


def _atr(historical: bytes) -> bytes:
    """A contactless-style T=1 ATR (PC/SC part 3 layout): 3B 8n 80 01 <historical bytes> TCK."""
    body = bytes([0x80 | len(historical), 0x80, 0x01]) + historical
    tck = 0
    for b in body:  # TCK: XOR of T0 .. the last historical byte
        tck ^= b
    return bytes([0x3B]) + body + bytes([tck])


DEFAULT_ATR = _atr(b"farebox-EP")


def reader_name(port: int) -> str:
    """The PC/SC name pcscd gives the farebox vpcd reader listening on ``port``."""
    return f"{READER_NAME} 00 {port - DEFAULT_PORT:02d}"


class VpcdCard:
    def __init__(self, card, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, atr: bytes = DEFAULT_ATR):
        self.card = card
        self.host = host
        self.port = port
        self.atr = atr
        self.apdus = 0
        self.requests = 0  # every message vpcd sent on the current connection
        self.violations = 0  # requests that came while an answer was still owed (see the module doc)
        self.wire: collections.deque = collections.deque(maxlen=64)  # (monotonic s, request hex, answer length)
        self._powered = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def inserted(self) -> bool:
        return self._sock is not None

    def insert(self, timeout: float = 5.0) -> None:
        """Connect to vpcd: the card is now in the reader. ConnectionError if nothing listens on the port."""
        with self._lock:
            if self._sock is not None:
                return
            try:
                sock = socket.create_connection((self.host, self.port), timeout=timeout)
            except OSError as e:
                raise ConnectionError(
                    f"no vpcd on {self.host}:{self.port} ({e}): is pcscd running with farebox's vpcd reader "
                    "config? (scripts/ensure-services.sh starts it)") from e
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._powered.clear()
            self.requests = 0
            self._sock = sock
            self._thread = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                            name=f"vpcd-card {self.host}:{self.port}")
            self._thread.start()

    def remove(self) -> None:
        """Disconnect from vpcd: the card has been pulled out of the reader."""
        with self._lock:
            sock, self._sock = self._sock, None
            thread, self._thread = self._thread, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # the other end went first
                pass
            sock.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)

    close = remove

    def wait_powered(self, timeout: float = 5.0) -> bool:
        """True once pcscd has powered this card up (``01``, then the ATR asked for and sent) on this connection;
        False if that does not happen within ``timeout`` s (another card holds the port, or pcscd is not polling)."""
        return self._powered.wait(timeout)

    def __enter__(self) -> Self:
        self.insert()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _serve(self, sock: socket.socket) -> None:
        power_up = False
        try:
            while True:
                head = _recv_exact(sock, 2)
                if head is None:
                    break
                (size,) = struct.unpack(">H", head)
                payload = _recv_exact(sock, size) if size else b""
                if payload is None:
                    break
                self.requests += 1
                # vpcd now waits for the answer (ATR or R-APDU): nothing may come before we send it
                early = _pending(sock) if len(payload) != 1 or payload[0] == 0x04 else b""
                if early:
                    self.violations += 1
                    log.error("vpcd card on %s:%d: vpcd sent %s while the answer to %s was owed: the link is "
                              "out of step; the card leaves the reader (last requests: %s)", self.host, self.port,
                              early.hex(), payload[:8].hex(), [w[1] for w in self.wire][-6:])
                    break
                reply = self._answer(payload)
                self.wire.append((time.monotonic(), payload[:8].hex(), None if reply is None else len(reply)))
                if reply is not None:
                    sock.sendall(struct.pack(">H", len(reply)) + reply)
                if len(payload) == 1:  # 01 power on / 02 reset, then 04 ATR: pcscd has powered this card
                    if payload[0] in (0x01, 0x02):
                        power_up = True
                    elif payload[0] == 0x04 and power_up:
                        self._powered.set()
                    elif payload[0] == 0x00:
                        power_up = False
        except OSError as e:
            if self._sock is sock:  # not our own remove(): say why the card went away
                log.warning("vpcd card on %s:%d: connection lost: %s", self.host, self.port, e)
        finally:
            with self._lock:
                if self._sock is sock:
                    self._sock = None
            sock.close()

    def _answer(self, payload: bytes) -> bytes | None:
        if len(payload) == 1:
            if payload[0] == 0x04:
                return self.atr
            # 00 power off, 01 power on, 02 reset: a SimCard keeps its state across them, as a card's EEPROM does;
            # an object that knows better can have a reset() hook.
            if payload[0] == 0x02 and hasattr(self.card, "reset"):
                self.card.reset()
            return None
        self.apdus += 1
        response = self.card.transmit(payload)
        log.debug("vpcd %d: %s -> %s", self.port, payload.hex(), response.hex())
        return response


def _pending(sock: socket.socket) -> bytes:
    """What is waiting to be read on ``sock`` right now, up to 32 bytes (one non-blocking peek; b"" if nothing)."""
    try:
        return sock.recv(32, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        # Linux drops back to delayed ACKs after a while; re-arm quick ACKs on every read (see the module doc).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def settle_vpcd(reader, wait: float = 0.15, card: VpcdCard | None = None, timeout: float = 5.0) -> None:
    """Wait until pcscd has the new virtual card powered and the reader shows it, so a tap finds it at once.

    With ``card`` (the ``VpcdCard`` just inserted), wait for pcscd to power *that* card (``wait_powered``), then for
    the reader to show a card; ConnectionError if pcscd never takes it (another card holds the vpcd port: another
    process using the same pcscd). Without it, wait for the reader to show a card and then ``wait`` s more."""
    deadline = time.monotonic() + timeout
    if card is not None and not card.wait_powered(timeout):
        raise ConnectionError(
            f"pcscd did not take the card on vpcd port {card.port} within {timeout:g} s ({card.requests} requests "
            "seen): another card is in that reader (another process using this pcscd?), or pcscd is not polling")
    while reader.card_gone(100) and time.monotonic() < deadline:
        pass
    if card is None:
        time.sleep(wait)


def main(argv: list[str] | None = None) -> int:
    """``python -m hardware_sim.vpcd --print-conf``: the pcscd reader.conf entry (for scripts and CI)."""
    p = argparse.ArgumentParser(prog="python -m hardware_sim.vpcd")
    p.add_argument("--print-conf", action="store_true", help="print the pcscd reader.conf entry and exit")
    args = p.parse_args(argv)
    if args.print_conf:
        print(PCSCD_READER_CONF, end="")
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

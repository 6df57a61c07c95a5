"""A hardware_sim card as an ISO-DEP (ISO 14443-4, NFC Forum Type 4A) contactless card, over nfcpy's ``udp`` driver.

nfcpy emulates only Type 3 tags itself; this is the Type 4A card side on top of ``clf.listen()``:

- activation (ISO 14443-3A): nfcpy's udp driver answers SENS_REQ / SDD_REQ / SEL_REQ from the ``LocalTarget``
  (SENS_RES ``4400``, SEL_RES ``20`` = ISO-DEP compliant, a 4-byte NFCID1 from the card's ASN);
- RATS ``E0 xy`` -> ATS ``05 78 80 90 02``: FSCI 8 (we take 256-byte frames), TA ``80``, TB ``90`` = FWI 9
  (frame waiting time ~155 ms: room for a loaded machine, and nfcpy then retries a lost block up to 5 times),
  TC ``02``. The reader's FSDI from the RATS sets how big our I-blocks may be;
- I-blocks with chaining both ways: a chained command is acknowledged with R(ACK) and put together; a response
  longer than the reader's frame is sent in chained I-blocks, each after the reader's R(ACK);
- R(NAK) with our current block number: the last block is sent again; with the other number: R(ACK)
  (ISO 14443-4 rules 11 and 12), so a lost command is re-sent by the reader, never executed twice;
- S(DESELECT) ``C2``: answered ``C2``, the card waits to be activated again.

Whole commands go to ``card.transmit(apdu)`` (a ``hardware_sim.card.SimCard``). ``NfcCard(card, port).start()``
serves in a thread; ``remove()`` takes the card out of the field (it stops answering at once: the reader's next
frame times out), ``present()`` puts it back (optionally another card), ``stop()`` ends the thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Self

log = logging.getLogger(__name__)

ATS = bytes.fromhex("0578809002")
FSD_BY_FSDI = (16, 24, 32, 40, 48, 64, 96, 128, 256)
IDLE_WAIT = 0.5  # s the card waits for the reader's next frame before checking whether it should stop


class NfcCard:
    def __init__(self, card, port: int, host: str = "127.0.0.1"):
        self.card = card
        self.host = host
        self.port = port
        self.apdus = 0
        self.activations = 0
        self._present = threading.Event()
        self._present.set()
        self._running = False
        self._thread: threading.Thread | None = None
        self._clf = None

    # --- the field --------------------------------------------------------------------------------------------

    def present(self, card=None) -> None:
        if card is not None:
            self.card = card
        self._present.set()

    def remove(self) -> None:
        self._present.clear()

    def start(self) -> NfcCard:
        import nfc

        self._clf = nfc.ContactlessFrontend(f"udp:{self.host}:{self.port}")
        self._running = True
        self._thread = threading.Thread(target=self._run, name=f"nfc-card udp:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._present.set()  # wake a removed card's wait
        # A datagram wakes a listen() or exchange() that is waiting for the reader.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"106A 00", (self.host, self.port))
        if self._thread is not None:
            self._thread.join(timeout=3)
        if self._clf is not None:
            self._clf.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- ISO-DEP ----------------------------------------------------------------------------------------------

    def _target(self):
        import nfc.clf

        target = nfc.clf.LocalTarget("106A")
        target.sens_res = bytearray.fromhex("4400")
        asn = getattr(self.card, "asn", b"\x00\x00\x00\x01")
        target.sdd_res = bytearray(b"\x08" + bytes(asn[-3:]))  # 08: a random-ID style single-size NFCID1
        target.sel_res = bytearray.fromhex("20")
        return target

    def _run(self) -> None:
        import nfc.clf

        clf = self._clf
        while self._running:
            if not self._present.wait(IDLE_WAIT):
                clf.device.mute()  # out of the field: nothing answers on our port
                continue
            try:
                activated = self._listen(clf)
            except (nfc.clf.CommunicationError, OSError) as e:
                log.debug("nfc card listen: %s", e)
                continue
            if not self._running:
                return
            if activated is None or activated.tt4_cmd is None or not self._present.is_set():
                continue  # no reader, or a frame for a session that ended (we were away): wait for a RATS
            try:
                self._session(clf, bytes(activated.tt4_cmd))
            except (nfc.clf.CommunicationError, OSError) as e:
                log.debug("nfc card session ended: %s", e)

    def _listen(self, clf):
        """``clf.listen()``, but on the socket already bound when there is one. nfcpy's listen closes and re-binds
        the card's UDP socket first; a reader that senses again right after a tap (its RFOFF ended our session)
        sends its SENS_REQ into that gap and then waits a whole second for an answer. The udp driver's own
        ``_listen_tta`` on the bound socket leaves no gap (private, but this driver exists only for tests)."""
        import time

        device = clf.device
        sock = getattr(device, "socket", None)
        if sock is None or not hasattr(device, "_listen_tta"):
            return clf.listen(self._target(), 1.0)
        try:
            bound = sock.getsockname()[1] == self.port
        except OSError:
            bound = False
        if not bound:
            return clf.listen(self._target(), 1.0)
        with clf.lock:
            clf.target = device._listen_tta(self._target(), time.time() + 1.0)
            return clf.target

    def _session(self, clf, rats: bytes) -> None:
        import nfc.clf

        self.activations += 1
        fsd = FSD_BY_FSDI[min(8, rats[1] >> 4)] if len(rats) > 1 else 256
        chunk = fsd - 3  # PCB + CRC_A
        block = 1  # our block number; ISO 14443-4 starts the card at 1, the reader at 0, so a NAK(0) means "lost"
        last: bytes = ATS
        reply: bytes | None = ATS
        command = b""
        pending_response = b""  # the rest of a chained response
        while self._running:
            try:
                frame = clf.exchange(reply, IDLE_WAIT)
            except nfc.clf.TimeoutError:
                reply = None  # the reader is busy (journal writes): keep waiting, say nothing
                continue
            if not self._present.is_set() or not self._running:
                return  # left the field: the reader's frame goes unanswered
            if frame is None or len(frame) == 0:
                return
            frame = bytes(frame)
            pcb = frame[0]
            reply = None
            if pcb & 0xE2 == 0x02:  # I-block
                number = pcb & 0x01
                if pcb & 0x0C:  # CID / NAD are not used by nfcpy and not supported here
                    continue
                block = number
                command += frame[1:]
                if pcb & 0x10:  # chained command: acknowledge, wait for the rest
                    reply = last = bytes([0xA2 | block])
                    continue
                apdu, command = command, b""
                self.apdus += 1
                response = self.card.transmit(apdu)
                log.debug("nfc card %d: %s -> %s", self.port, apdu.hex(), response.hex())
                pending_response = response
                reply = last = self._next_response_block(block, pending_response, chunk)
                pending_response = pending_response[chunk:]
            elif pcb & 0xE6 == 0xA2:  # R-block
                number = pcb & 0x01
                if pcb & 0x10:  # R(NAK)
                    reply = last if number == block else bytes([0xA2 | block])
                elif number == block:  # R(ACK) for the block we sent: the reader repeats its own? resend ours
                    reply = last
                else:  # R(ACK) for our chained response: the next part
                    block = number
                    reply = last = self._next_response_block(block, pending_response, chunk)
                    pending_response = pending_response[chunk:]
            elif pcb & 0xF7 == 0xC2:  # S(DESELECT)
                clf.exchange(bytes([0xC2]), 0)
                return
            # anything else: no answer (a card keeps quiet on what it cannot parse)

    @staticmethod
    def _next_response_block(block: int, data: bytes, chunk: int) -> bytes:
        more = len(data) > chunk
        return bytes([(0x12 if more else 0x02) | block]) + data[:chunk]

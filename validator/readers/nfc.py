"""``nfc:<nfcpy path>`` — a contactless reader through nfcpy: ``nfc:usb``, ``nfc:usb:072f:2200``, ``nfc:tty:S0:pn532``,
or ``nfc:udp:127.0.0.1:50000`` (nfcpy's UDP driver, which hardware_sim.nfc_card serves a simulated card on).

A poll senses for a Type A target and activates it as ISO-DEP (Type 4A: RATS/ATS, nfcpy's ``IsoDepInitiator``);
APDUs go through ``Type4Tag.transceive`` so the status word comes back raw (``send_apdu`` would raise on anything
but 9000, and the terminal reads 9401, 6283 and friends as answers, not failures).

nfcpy gives a card only 30 ms to answer the RATS; a busy machine (or a phone's SIM) can miss that, so activation
is tried ``ACTIVATE_TRIES`` times before the card is reported absent. nfcpy's own ISO-DEP retries (R(NAK)) cover
a lost block; when they run out the card has left the field: ``CardRemoved``.

Note on timing: with the udp driver one sense waits up to 1 s for an answer, so ``poll(0)`` on an empty field
takes about a second there (real USB readers answer in milliseconds).
"""

from __future__ import annotations

import logging
import time

from validator.readers.base import CardRemoved, CardSession, CommunicationError, ReaderError

log = logging.getLogger(__name__)

ACTIVATE_TRIES = 5
SENSE_INTERVAL = 0.05  # s between senses while the field is empty (a real reader's polling loop)


class NfcSession:
    def __init__(self, reader: NfcReader, tag, generation: int):
        self._reader = reader
        self.tag = tag
        self._generation = generation
        self._gone = False

    @property
    def uid(self) -> bytes:
        return bytes(self.tag.identifier)

    def exchange(self, apdu: bytes) -> bytes:
        import nfc.clf
        import nfc.tag

        if self._gone or self._reader._generation != self._generation:
            raise CardRemoved("card left the field")
        try:
            response = self.tag.transceive(bytearray(apdu))
        except (nfc.tag.TagCommandError, nfc.clf.CommunicationError) as e:
            # nfcpy has already retried with R(NAK); a card that still does not answer is out of the field
            self._gone = True
            raise CardRemoved(f"card left the field ({e})") from e
        except OSError as e:
            self._gone = True
            raise CommunicationError(f"nfc reader {self._reader.path}: {e}") from e
        if response is None or len(response) < 2:
            self._gone = True
            raise CardRemoved("card answered no status word (left the field mid-frame)")
        return bytes(response)


class NfcReader:
    def __init__(self, path: str):
        import nfc

        if not path:
            raise ReaderError("nfc: needs an nfcpy device path, e.g. nfc:usb or nfc:udp:127.0.0.1:50000")
        self.path = path
        try:
            self._clf = nfc.ContactlessFrontend(path)
        except (OSError, ValueError) as e:
            raise CommunicationError(f"nfc: cannot open {path!r}: {e}") from e
        self._generation = 0
        self.stats = {"activations": 0, "activation_retries": 0}

    def poll(self, timeout: float = 0.0) -> CardSession | None:
        import nfc.clf
        import nfc.tag

        self._generation += 1  # a new poll ends the previous session (sense switches the field off and on)
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            try:
                target = self._clf.sense(nfc.clf.RemoteTarget("106A"))
                if target is not None and target.sel_res and target.sel_res[0] & 0x20:
                    tag = nfc.tag.activate(self._clf, target)
                    if tag is not None:
                        self.stats["activations"] += 1
                        return NfcSession(self, tag, self._generation)
            except (nfc.clf.CommunicationError, nfc.tag.TagCommandError) as e:
                # most often the 30 ms ATS deadline missed: sense and activate again
                tries += 1
                self.stats["activation_retries"] += 1
                log.debug("nfc %s: activation failed (%s), try %d", self.path, e, tries)
                if tries < ACTIVATE_TRIES:
                    continue
            except OSError as e:
                raise CommunicationError(f"nfc reader {self.path}: {e}") from e
            if time.monotonic() >= deadline:
                return None
            time.sleep(SENSE_INTERVAL)

    def close(self) -> None:
        self._generation += 1
        try:
            self._clf.close()
        except OSError:  # a device already gone has nothing to release
            pass

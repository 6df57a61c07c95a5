"""A simulated PSAM: the secure module in a validator that holds the issuer's purchase and maintenance master keys.

``SimPsam.transmit(apdu)`` answers data + SW1 SW2 and never raises (internal errors would answer ``6F00``).
What it answers (any other INS -> ``6D00``, CLA other than 00 / 80 / 84 -> ``6E00``, wrong lengths -> ``6700``):

- ``00 A4 ...`` SELECT of anything: ``9000`` (the simulated PSAM has a single application, always selected).
- ``00 B0 96 offset`` READ BINARY of the terminal number file (SFI 16): the 6-byte terminal number.
- ``80 70 00 00 24`` INIT FOR PURCHASE (MAC1): card random(4) TTC(2) amount(4) type(1) date(4) time(3) key version(1)
  algorithm(1) card number(8) issuer code(8). Needs type 06 or 09 and algorithm 00 (3DES) or 04 (SM4) (else
  ``6A80``) and key version 01 (else ``9403``). With the card's algorithm's suite (epurse.crypto.suite):
  DPK = diversify(purchase master, card number), SESPK with the PSAM's current terminal sequence; answers terminal
  sequence(4) MAC1(4) and advances ``sequence`` by one (wrapping after FFFFFFFF).
- ``80 72 00 00 04`` VERIFY MAC2 of the last INIT FOR PURCHASE: ``9000`` if right, ``9302`` if wrong, ``6985`` if
  there is nothing to verify. Either answer ends that purchase.
- ``80 FA 05 00 15`` APPLICATION BLOCK MAC: algorithm(1) card number(8) issuer code(8) card challenge(4); answers
  the MAC(4) for the card's ``84 1E 00 00 04``: ``suite(algorithm).block_mac(DAMK, challenge)`` with
  DAMK = diversify(maintenance master, card number). Unknown algorithm -> ``6A80``; P1 other than 05 -> ``6B00``.

The issuer code rides along in both commands: this PSAM serves one issuer, whose keys it was given.
"""

from __future__ import annotations

from dataclasses import dataclass

from epurse import crypto
from epurse.apdu import (
    SW_CONDITIONS_NOT_SATISFIED,
    SW_FILE_NOT_FOUND,
    SW_KEY_NOT_FOUND,
    SW_MAC_INVALID,
    SW_OK,
    SW_WRONG_DATA,
    SW_WRONG_P1P2,
    TX_COMPOSITE,
    TX_PURCHASE,
)
from epurse.keys import TEST_ISSUER_KEYS, IssuerKeys
from hardware_sim.card import KEY_VERSION, Command, Refused, parse_command, sw_bytes


@dataclass(frozen=True)
class _Purchase:
    suite: crypto.CryptoSuite
    session_key: bytes
    amount: int


def _suite(algorithm: int) -> crypto.CryptoSuite:
    try:
        return crypto.suite(algorithm)
    except ValueError:
        raise Refused(SW_WRONG_DATA) from None


class SimPsam:
    def __init__(self, terminal_id: bytes, *, keys: IssuerKeys = TEST_ISSUER_KEYS, sequence: int = 1):
        if len(terminal_id) != 6:
            raise ValueError(f"a terminal number is 6 bytes, got {len(terminal_id)}")
        if not 0 <= sequence <= 0xFFFFFFFF:
            raise ValueError("the terminal sequence is 4 bytes")
        self.terminal_id = bytes(terminal_id)
        self.sequence = sequence  # the terminal sequence the next purchase will get
        self._purchase_master = keys.purchase
        self._maintenance_master = keys.maintenance
        self._last: _Purchase | None = None
        self._handlers = {
            (0x00, 0xA4): self._select,
            (0x00, 0xB0): self._read_binary,
            (0x80, 0x70): self._init_purchase,
            (0x80, 0x72): self._verify_mac2,
            (0x80, 0xFA): self._block_mac,
        }

    def __repr__(self) -> str:
        return f"SimPsam(terminal_id={self.terminal_id.hex()}, sequence={self.sequence})"

    def transmit(self, apdu: bytes) -> bytes:
        """Answer one command APDU: response data + SW1 SW2. Never raises."""
        try:
            command = parse_command(apdu, self._handlers)
            return self._handlers[command.cla, command.ins](command)
        except Refused as refused:
            return sw_bytes(refused.sw)
        except Exception:  # noqa: BLE001 - a simulator bug must not take the reader down; 6F00 = no diagnosis
            return sw_bytes(0x6F00)

    def _select(self, c: Command) -> bytes:
        return sw_bytes(SW_OK)

    def _read_binary(self, c: Command) -> bytes:
        c.need_no_data()
        if c.p1 != 0x96:
            raise Refused(SW_FILE_NOT_FOUND)
        if c.p2 > len(self.terminal_id):
            raise Refused(SW_WRONG_P1P2)
        return self.terminal_id[c.p2 : c.p2 + c.le_or_256] + sw_bytes(SW_OK)

    def _init_purchase(self, c: Command) -> bytes:
        if (c.p1, c.p2) != (0x00, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(0x24, 0x24)
        d = c.data
        random, ttc, amount, tx_type = (
            d[0:4],
            int.from_bytes(d[4:6], "big"),
            int.from_bytes(d[6:10], "big"),
            d[10],
        )
        date4, time3, key_version, algorithm, card_no = d[11:15], d[15:18], d[18], d[19], d[20:28]
        if tx_type not in (TX_PURCHASE, TX_COMPOSITE):
            raise Refused(SW_WRONG_DATA)
        suite = _suite(algorithm)
        if key_version != KEY_VERSION:
            raise Refused(SW_KEY_NOT_FOUND)
        # d[28:36] is the issuer code; this PSAM serves one issuer, so it only rides along.
        dpk = suite.diversify(self._purchase_master, card_no)
        seq = self.sequence
        sespk = suite.purchase_session_key(dpk, random, ttc, seq)
        mac1 = suite.purchase_mac1(sespk, amount, tx_type, self.terminal_id, date4, time3)
        self.sequence = (seq + 1) & 0xFFFFFFFF
        self._last = _Purchase(suite, sespk, amount)
        return seq.to_bytes(4, "big") + mac1 + sw_bytes(SW_OK)

    def _verify_mac2(self, c: Command) -> bytes:
        if (c.p1, c.p2) != (0x00, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(4, 4)
        last, self._last = self._last, None
        if last is None:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if c.data != last.suite.purchase_mac2(last.session_key, last.amount):
            raise Refused(SW_MAC_INVALID)
        return sw_bytes(SW_OK)

    def _block_mac(self, c: Command) -> bytes:
        if (c.p1, c.p2) != (0x05, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(0x15, 0x15)
        algorithm, card_no, challenge = c.data[0], c.data[1:9], c.data[17:21]
        suite = _suite(algorithm)
        damk = suite.diversify(self._maintenance_master, card_no)
        return suite.block_mac(damk, challenge) + sw_bytes(SW_OK)

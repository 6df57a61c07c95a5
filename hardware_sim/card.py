"""A simulated transit e-purse card (PBOC 2.0 electronic purse as JT/T 978 profiles it), answering real APDUs.

``SimCard.transmit(apdu)`` takes the command bytes and returns the answer: data followed by the 2-byte status word.
It never raises, whatever the bytes (a reader must survive any card); an internal error would answer ``6F00``.

What the card answers (``CLA INS P1 P2``; any other INS -> ``6D00``, any CLA other than 00 / 80 / 84 -> ``6E00``, a
body that does not match its Lc or the command's fixed length -> ``6700``, unexpected P1 P2 -> ``6B00``):

- ``00 A4 04 00`` SELECT the AID ``A000000632010105``: a small FCI (``6F 0C 84 08 <AID> A5 00``) and ``9000``, or
  ``6283`` if the application is blocked; another AID -> ``6A82`` and nothing stays selected. ``00 A4 00 00 02 3F00``
  selects the MF (deselects the application). Until the application is selected, READ BINARY / READ RECORD answer
  ``6A82`` and the e-purse commands ``6985``.
- ``00 B0 95|96 offset`` READ BINARY of the public information file 0015 (30 bytes) or the holder file 0016 (32 bytes:
  staff number 12 ASCII space-padded, name 20 UTF-8 NUL-padded); ``00 B2 n C4`` READ RECORD n (1 = newest, up to 10)
  of the transaction log, 23 bytes: TTC(2) overdraft(3) amount(4) type(1) terminal(6) date(4) time(3); ``6A83`` past
  the last record.
- ``80 5C 00 02 04`` GET BALANCE.
- ``80 50 01|03 02 0B`` INITIALIZE FOR PURCHASE (P1 03 = composite, type 09): key index must be 01 (else ``9403``);
  ``9401`` if the amount exceeds the balance; ``6985`` if blocked or the TTC is exhausted (FFFF). Answers balance(4)
  TTC(2) overdraft ``000000`` key version ``01`` algorithm ``00`` and a fresh random(4) from os.urandom.
- ``80 54 01 00 0F`` DEBIT FOR PURCHASE, only as the very next command after INITIALIZE FOR PURCHASE (else ``6985``):
  checks MAC1 with SESPK (``9302`` and no debit if wrong); debits, increments the TTC, logs the transaction and
  answers TAC(4) MAC2(4).
- ``80 50 00 02 0B`` INITIALIZE FOR LOAD: answers balance(4) online TTC(2) key version ``01`` algorithm ``00``
  random(4) MAC1(4); ``6985`` if the new balance would pass ``max_balance``.
  ``80 52 00 00 0B`` CREDIT FOR LOAD, only right after it: checks the host's MAC2 (``9302``), credits, increments the
  online TTC, logs (type 02, ttc = online TTC) and answers the TAC(4).
- ``80 5A 00 06|09 02`` GET TRANSACTION PROVE + TTC(2): MAC2(4) TAC(4) of the card's last purchase if it has that
  type and TTC (the TTC INITIALIZE FOR PURCHASE gave), else ``9406``.

Any command other than the matching second step ends an open purchase or load, as on a real card.
Keys: the card diversifies DPK, DLK, DTK and DAMK from the issuer's master keys with its ASN (epurse.crypto).
Not simulated: UPDATE CAPP DATA CACHE, APPLICATION BLOCK (set ``blocked`` instead), overdraft, SM4.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date

from epurse import crypto
from epurse.apdu import (
    AID,
    SW_APP_BLOCKED,
    SW_CLA_NOT_SUPPORTED,
    SW_CONDITIONS_NOT_SATISFIED,
    SW_FILE_NOT_FOUND,
    SW_INS_NOT_SUPPORTED,
    SW_INSUFFICIENT_FUNDS,
    SW_KEY_NOT_FOUND,
    SW_MAC_INVALID,
    SW_OK,
    SW_PROVE_NOT_AVAILABLE,
    SW_RECORD_NOT_FOUND,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    TX_COMPOSITE,
    TX_LOAD,
    TX_PURCHASE,
)
from epurse.keys import TEST_ISSUER_CODE, TEST_ISSUER_KEYS, IssuerKeys

APP_TYPE_EP = 0x02  # application type: electronic purse
APP_VERSION = 0x01
KEY_INDEX = 0x01
KEY_VERSION = 0x01
LOG_RECORDS = 10  # READ RECORD serves this many, as a real card's cyclic log file does
_FCI = bytes([0x6F, 0x0C, 0x84, 0x08]) + AID + bytes([0xA5, 0x00])


# --- command framing, shared with hardware_sim.psam ----------------------------------------------------------


class Refused(Exception):
    """Raised inside a simulated device to answer a status word with no data."""

    def __init__(self, sw: int):
        super().__init__(f"{sw:04X}")
        self.sw = sw


def sw_bytes(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


@dataclass(frozen=True)
class Command:
    """One short-length command APDU, split: ``le`` is None when the command has no Le byte."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    le: int | None

    @property
    def le_or_256(self) -> int:
        # Le absent or 00 asks for "up to 256 bytes" in a short APDU.
        return self.le or 256

    def need_no_data(self) -> None:
        if self.data:
            raise Refused(SW_WRONG_LENGTH)

    def need_data(self, least: int, most: int) -> None:
        if not least <= len(self.data) <= most:
            raise Refused(SW_WRONG_LENGTH)


def parse_command(apdu: bytes, known: dict[tuple[int, int], object]) -> Command:
    """Split a command APDU; refuse it as a card would: short -> 6700, CLA -> 6E00, INS -> 6D00, Lc -> 6700."""
    apdu = bytes(apdu)
    if len(apdu) < 4:
        raise Refused(SW_WRONG_LENGTH)
    cla, ins, p1, p2 = apdu[:4]
    if cla not in (0x00, 0x80, 0x84):
        raise Refused(SW_CLA_NOT_SUPPORTED)
    if (cla, ins) not in known:
        raise Refused(SW_INS_NOT_SUPPORTED)
    if len(apdu) == 4:
        return Command(cla, ins, p1, p2, b"", None)
    if len(apdu) == 5:
        return Command(cla, ins, p1, p2, b"", apdu[4])
    lc, body = apdu[4], apdu[5:]
    if lc == 0 or len(body) not in (lc, lc + 1):  # Lc 00 would start an extended-length APDU: not supported
        raise Refused(SW_WRONG_LENGTH)
    return Command(cla, ins, p1, p2, body[:lc], body[lc] if len(body) > lc else None)


@dataclass(frozen=True)
class Transaction:
    """One entry of ``SimCard.log``. ``ttc`` is the counter before the transaction (offline TTC for purchases,
    online TTC for loads); ``date`` / ``time`` are the BCD bytes the terminal sent (4 and 3 bytes)."""

    ttc: int
    amount: int
    tx_type: int
    terminal_id: bytes
    date: bytes
    time: bytes
    tac: bytes
    mac2: bytes
    terminal_seq: int  # 0 for loads
    balance_after: int

    def record(self) -> bytes:
        """The 23-byte log record READ RECORD returns."""
        return (
            self.ttc.to_bytes(2, "big")
            + bytes(3)
            + self.amount.to_bytes(4, "big")
            + bytes([self.tx_type])
            + self.terminal_id
            + self.date
            + self.time
        )


@dataclass(frozen=True)
class _Purchase:
    tx_type: int
    amount: int
    terminal_id: bytes
    random: bytes
    ttc: int


@dataclass(frozen=True)
class _Load:
    amount: int
    terminal_id: bytes
    online_ttc: int
    session_key: bytes


class SimCard:
    def __init__(
        self,
        asn: bytes,
        card_type: int,
        balance: int,
        *,
        keys: IssuerKeys = TEST_ISSUER_KEYS,
        issuer: bytes = TEST_ISSUER_CODE,
        start: date,
        end: date,
        staff_no: str = "",
        holder_name: str = "",
        ttc: int = 0,
        online_ttc: int = 0,
        max_balance: int = 0xFFFFFFFF,
        blocked: bool = False,
    ):
        if len(asn) != 10:
            raise ValueError(f"an ASN is 10 bytes, got {len(asn)}")
        if len(issuer) != 8:
            raise ValueError(f"an issuer code is 8 bytes, got {len(issuer)}")
        if not 0 <= card_type <= 0xFF:
            raise ValueError(f"card type {card_type} does not fit in one byte")
        if not 0 <= balance <= max_balance <= 0xFFFFFFFF:
            raise ValueError(
                f"balance {balance} must be from 0 to max_balance {max_balance} (at most FFFFFFFF)"
            )
        if not 0 <= ttc <= 0xFFFF or not 0 <= online_ttc <= 0xFFFF:
            raise ValueError("TTCs are 2 bytes")
        if len(staff_no.encode("ascii")) > 12:
            raise ValueError(f"staff number {staff_no!r} is longer than 12 characters")
        if len(holder_name.encode("utf-8")) > 20:
            raise ValueError(f"holder name {holder_name!r} is longer than 20 bytes in UTF-8")
        self.asn = bytes(asn)
        self.card_type = card_type
        self.balance = balance
        self.ttc = ttc
        self.online_ttc = online_ttc
        self.max_balance = max_balance
        self.blocked = blocked
        self.issuer = bytes(issuer)
        self.start = start
        self.end = end
        self.staff_no = staff_no
        self.holder_name = holder_name
        self.log: list[Transaction] = []  # newest first
        self._dpk = crypto.diversify(keys.purchase, self.asn)
        self._dlk = crypto.diversify(keys.load, self.asn)
        self._dtk = crypto.diversify(keys.tac, self.asn)
        self._damk = crypto.diversify(
            keys.maintenance, self.asn
        )  # kept for APPLICATION BLOCK, not simulated yet
        self._selected = False
        self._pending: _Purchase | _Load | None = None
        self._handlers = {
            (0x00, 0xA4): self._select,
            (0x00, 0xB0): self._read_binary,
            (0x00, 0xB2): self._read_record,
            (0x80, 0x5C): self._get_balance,
            (0x80, 0x50): self._initialize,
            (0x80, 0x54): self._debit,
            (0x80, 0x52): self._credit,
            (0x80, 0x5A): self._transaction_prove,
        }

    def __repr__(self) -> str:
        return f"SimCard(asn={self.asn.hex()}, type={self.card_type}, balance={self.balance}, ttc={self.ttc})"

    def transmit(self, apdu: bytes) -> bytes:
        """Answer one command APDU: response data + SW1 SW2. Never raises."""
        # An open purchase or load survives only until the next command, whatever that command is.
        pending, self._pending = self._pending, None
        try:
            command = parse_command(apdu, self._handlers)
            return self._handlers[command.cla, command.ins](command, pending)
        except Refused as refused:
            return sw_bytes(refused.sw)
        except Exception:  # noqa: BLE001 - a simulator bug must not take the reader down; 6F00 = no diagnosis
            return sw_bytes(0x6F00)

    # --- files ----------------------------------------------------------------------------------------------

    def public_info(self) -> bytes:
        """The 30-byte public information file 0015."""
        return (
            self.issuer
            + bytes([APP_TYPE_EP, APP_VERSION])
            + self.asn
            + crypto.bcd_date(self.start)
            + crypto.bcd_date(self.end)
            + bytes([self.card_type, 0x00])
        )

    def holder_info(self) -> bytes:
        """The 32-byte holder file 0016."""
        staff = self.staff_no.encode("ascii", "replace")[:12].ljust(12, b" ")
        return staff + self.holder_name.encode("utf-8")[:20].ljust(20, b"\x00")

    # --- commands -------------------------------------------------------------------------------------------

    def _select(self, c: Command, _pending) -> bytes:
        if c.p1 == 0x04 and c.p2 in (0x00, 0x0C):
            c.need_data(1, 16)
            if c.data != AID:
                self._selected = False
                raise Refused(SW_FILE_NOT_FOUND)
            self._selected = True
            fci = _FCI if c.p2 == 0x00 else b""
            return fci + sw_bytes(SW_APP_BLOCKED if self.blocked else SW_OK)
        if c.p1 == 0x00 and c.p2 in (0x00, 0x0C):
            c.need_data(2, 2)
            if c.data != b"\x3f\x00":
                raise Refused(SW_FILE_NOT_FOUND)
            self._selected = False
            return sw_bytes(SW_OK)
        raise Refused(SW_WRONG_P1P2)

    def _read_binary(self, c: Command, _pending) -> bytes:
        c.need_no_data()
        if not self._selected or not c.p1 & 0x80:
            raise Refused(SW_FILE_NOT_FOUND)
        files = {0x15: self.public_info, 0x16: self.holder_info}
        if c.p1 & 0x1F not in files or c.p1 & 0x60:
            raise Refused(SW_FILE_NOT_FOUND)
        content = files[c.p1 & 0x1F]()
        if c.p2 > len(content):
            raise Refused(SW_WRONG_P1P2)
        return content[c.p2 : c.p2 + c.le_or_256] + sw_bytes(SW_OK)

    def _read_record(self, c: Command, _pending) -> bytes:
        c.need_no_data()
        if not self._selected or c.p2 != (0x18 << 3 | 0x04):
            raise Refused(SW_FILE_NOT_FOUND)
        if not 1 <= c.p1 <= min(len(self.log), LOG_RECORDS):
            raise Refused(SW_RECORD_NOT_FOUND)
        return self.log[c.p1 - 1].record() + sw_bytes(SW_OK)

    def _get_balance(self, c: Command, _pending) -> bytes:
        self._need_selected()
        c.need_no_data()
        if (c.p1, c.p2) != (0x00, 0x02):
            raise Refused(SW_WRONG_P1P2)
        return self.balance.to_bytes(4, "big") + sw_bytes(SW_OK)

    def _initialize(self, c: Command, _pending) -> bytes:
        self._need_selected()
        if c.p2 != 0x02 or c.p1 not in (0x00, 0x01, 0x03):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(11, 11)
        key_index, amount, terminal_id = c.data[0], int.from_bytes(c.data[1:5], "big"), c.data[5:11]
        if key_index != KEY_INDEX:
            raise Refused(SW_KEY_NOT_FOUND)
        if self.blocked:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        random = os.urandom(4)
        if c.p1 == 0x00:
            return self._initialize_load(amount, terminal_id, random)
        if amount > self.balance:
            raise Refused(SW_INSUFFICIENT_FUNDS)
        if self.ttc >= 0xFFFF:  # the counter cannot count this purchase: the card is used up
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        tx_type = TX_COMPOSITE if c.p1 == 0x03 else TX_PURCHASE
        self._pending = _Purchase(tx_type, amount, terminal_id, random, self.ttc)
        answer = (
            self.balance.to_bytes(4, "big")
            + self.ttc.to_bytes(2, "big")
            + bytes(3)  # no overdraft
            + bytes([KEY_VERSION, 0x00])  # algorithm 00 = 3DES
            + random
        )
        return answer + sw_bytes(SW_OK)

    def _initialize_load(self, amount: int, terminal_id: bytes, random: bytes) -> bytes:
        if self.balance + amount > self.max_balance or self.online_ttc >= 0xFFFF:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        session_key = crypto.load_session_key(self._dlk, random, self.online_ttc)
        mac1 = crypto.load_mac1(session_key, self.balance, amount, terminal_id)
        self._pending = _Load(amount, terminal_id, self.online_ttc, session_key)
        answer = (
            self.balance.to_bytes(4, "big")
            + self.online_ttc.to_bytes(2, "big")
            + bytes([KEY_VERSION, 0x00])
            + random
            + mac1
        )
        return answer + sw_bytes(SW_OK)

    def _debit(self, c: Command, pending) -> bytes:
        if not isinstance(pending, _Purchase):
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if (c.p1, c.p2) != (0x01, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(15, 15)
        terminal_seq = int.from_bytes(c.data[0:4], "big")
        date4, time3, mac1 = c.data[4:8], c.data[8:11], c.data[11:15]
        p = pending
        sespk = crypto.purchase_session_key(self._dpk, p.random, p.ttc, terminal_seq)
        if mac1 != crypto.purchase_mac1(sespk, p.amount, p.tx_type, p.terminal_id, date4, time3):
            raise Refused(SW_MAC_INVALID)
        tac = crypto.purchase_tac(self._dtk, p.amount, p.tx_type, p.terminal_id, terminal_seq, date4, time3)
        mac2 = crypto.purchase_mac2(sespk, p.amount)
        self.balance -= p.amount
        self.ttc = p.ttc + 1
        self.log.insert(
            0,
            Transaction(
                p.ttc, p.amount, p.tx_type, p.terminal_id, date4, time3, tac, mac2, terminal_seq, self.balance
            ),
        )
        return tac + mac2 + sw_bytes(SW_OK)

    def _credit(self, c: Command, pending) -> bytes:
        if not isinstance(pending, _Load):
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if (c.p1, c.p2) != (0x00, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(11, 11)
        date4, time3, mac2 = c.data[0:4], c.data[4:7], c.data[7:11]
        p = pending
        if mac2 != crypto.load_mac2(p.session_key, p.amount, p.terminal_id, date4, time3):
            raise Refused(SW_MAC_INVALID)
        new_balance = self.balance + p.amount
        tac = crypto.load_tac(self._dtk, new_balance, p.online_ttc, p.amount, p.terminal_id, date4, time3)
        self.balance = new_balance
        self.online_ttc = p.online_ttc + 1
        self.log.insert(
            0,
            Transaction(
                p.online_ttc, p.amount, TX_LOAD, p.terminal_id, date4, time3, tac, mac2, 0, new_balance
            ),
        )
        return tac + sw_bytes(SW_OK)

    def _transaction_prove(self, c: Command, _pending) -> bytes:
        self._need_selected()
        if c.p1 != 0x00 or c.p2 not in (TX_PURCHASE, TX_COMPOSITE):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(2, 2)
        ttc = int.from_bytes(c.data, "big")
        last = next((t for t in self.log if t.tx_type != TX_LOAD), None)
        if last is None or (last.tx_type, last.ttc) != (c.p2, ttc):
            raise Refused(SW_PROVE_NOT_AVAILABLE)
        return last.mac2 + last.tac + sw_bytes(SW_OK)

    def _need_selected(self) -> None:
        if not self._selected:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)

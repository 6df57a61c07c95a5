"""A simulated transit e-purse card (PBOC 2.0 electronic purse as JT/T 978 profiles it), answering real APDUs.

``SimCard.transmit(apdu)`` takes the command bytes and returns the answer: data followed by the 2-byte status word.
It never raises, whatever the bytes (a reader must survive any card); an internal error would answer ``6F00``.

What the card answers (``CLA INS P1 P2``; any other INS -> ``6D00``, any CLA other than 00 / 80 / 84 -> ``6E00``, a
body that does not match its Lc or the command's fixed length -> ``6700``, unexpected P1 P2 -> ``6B00``):

- ``00 A4 04 00`` SELECT the AID ``A000000632010105``: a small FCI (``6F 0C 84 08 <AID> A5 00``) and ``9000``, or
  the FCI and ``6283`` if the application is blocked (it is selected all the same, so its public files can still be
  read); another AID -> ``6A82`` and nothing stays selected. ``00 A4 00 00 02 3F00`` selects the MF (deselects the
  application). Until the application is selected, READ BINARY / READ RECORD answer ``6A82`` and the e-purse
  commands ``6985``.
- ``00 B0 95|96 offset`` READ BINARY of the public information file 0015 (30 bytes; its 2 issuer-data bytes are the
  card type and the algorithm, ``00`` or ``04``) or the holder file 0016 (32 bytes: staff number 12 ASCII
  space-padded, name 20 UTF-8 NUL-padded).
- ``00 B2 n C4`` READ RECORD n (1 = newest, up to 10) of the transaction log (SFI 18), 23 bytes: TTC(2)
  overdraft(3) amount(4) type(1) terminal(6) date(4) time(3); ``6A83`` past the last record.
  ``00 B2 02 BC 40`` READ RECORD 02 of the composite-application file (SFI 17): the 64 bytes the last composite
  purchase wrote; ``6A83`` if none ever did (or another record number); Le other than ``40`` / ``00`` -> ``6C40``.
  P2 must name a record by P1 (low bits ``100``, else ``6B00``); another SFI -> ``6A82``.
- ``80 5C 00 02 04`` GET BALANCE (Le other than ``04`` / ``00`` -> ``6C04``).
- ``80 50 01|03 02 0B`` INITIALIZE FOR PURCHASE (P1 03 = composite, type 09): key index must be 01 (else ``9403``);
  ``6985`` if the application is blocked or the TTC is exhausted (FFFF); ``9401`` if the amount exceeds the balance.
  Answers balance(4) TTC(2) overdraft ``000000`` key version ``01`` the card's algorithm (``00`` 3DES or ``04``
  SM4) and a fresh random(4) from os.urandom.
- ``80 DC 02 B8 40`` + 64 bytes UPDATE CAPP DATA CACHE (record 02 of SFI 17), only as the very next command after
  INITIALIZE FOR PURCHASE with P1 03 (else ``6985``; body not 64 bytes -> ``6700``; P2 not SFI 17 -> ``6A82``,
  P1 not 02 -> ``6A83``). The purchase stays open, and the 64 bytes wait in the cache: they are written to the
  record together with the debit, only if the DEBIT FOR PURCHASE that follows succeeds (any other outcome drops
  them). The card does not look inside them. A composite DEBIT without an UPDATE leaves the record as it was.
- ``80 54 01 00 0F`` DEBIT FOR PURCHASE, only right after INITIALIZE FOR PURCHASE or its UPDATE CAPP DATA CACHE
  (else ``6985``): checks MAC1 with SESPK (``9302`` and no debit if wrong); debits, increments the TTC, logs the
  transaction, writes the cached composite record, and answers TAC(4) MAC2(4).
- ``80 50 00 02 0B`` INITIALIZE FOR LOAD: answers balance(4) online TTC(2) key version ``01`` algorithm random(4)
  MAC1(4); ``6985`` if blocked or the new balance would pass ``max_balance``.
  ``80 52 00 00 0B`` CREDIT FOR LOAD, only right after it: checks the host's MAC2 (``9302``), credits, increments the
  online TTC, logs (type 02, ttc = online TTC) and answers the TAC(4).
- ``80 5A 00 06|09 02`` GET TRANSACTION PROVE + TTC(2): MAC2(4) TAC(4) of the card's last purchase if it has that
  type and TTC (the TTC INITIALIZE FOR PURCHASE gave), else ``9406``. ``80 5A 00 02 02`` + online TTC(2): the same
  for the card's last load (the host's MAC2 and the card's load TAC), which lets the issuer host settle a load whose
  TAC never reached it from an answer only the card can make.
- ``00 84 00 00 04`` GET CHALLENGE: 4 random bytes (Le other than ``04`` -> ``6C04``). The card remembers them for
  the next command only.
- ``84 1E 00 00 04`` + MAC(4) APPLICATION BLOCK: needs the application selected and a challenge from the command
  just before (else ``6985``); checks the MAC (``9302`` if wrong: nothing changes, the challenge is spent) =
  ``suite(algorithm).block_mac(DAMK, challenge)``; then blocks the application for good (this simulator has no
  APPLICATION UNBLOCK: that needs the issuer) and answers ``9000``. Blocked: SELECT answers ``6283``, INITIALIZE FOR
  PURCHASE / LOAD ``6985``; reading files, GET BALANCE and GET TRANSACTION PROVE still work.

Any command other than the matching next step ends an open purchase, load or challenge, as on a real card.
Keys: the card diversifies DPK, DLK, DTK and DAMK from the issuer's master keys with its ASN, with its algorithm's
suite (epurse.crypto.suite). Not simulated: overdraft, APPLICATION UNBLOCK, PIN.

Persistence: a card made with ``state_file=path`` (or opened with ``SimCard.load(path)``) writes its state to that
file after every change and before it answers, as a real card writes its EEPROM before it answers: the JSON goes
to a temporary file in the same folder, is fsynced, replaces the old file with os.replace, and the folder is
fsynced. A process killed at any moment leaves the old state or the new one. If the write fails the change is
undone and the card answers ``6581`` (memory failure). The state (``to_state()``) holds everything but the keys,
which always come from the issuer keys given to ``from_state`` / ``load``; of the log it keeps what a card keeps:
the newest 10 transactions (READ RECORD) and the newest purchase and load (GET TRANSACTION PROVE).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from epurse import crypto
from epurse.apdu import (
    AID,
    ALG_3DES,
    CAPP_RECORD_SIZE,
    SW_APP_BLOCKED,
    SW_CLA_NOT_SUPPORTED,
    SW_CONDITIONS_NOT_SATISFIED,
    SW_FILE_NOT_FOUND,
    SW_INS_NOT_SUPPORTED,
    SW_INSUFFICIENT_FUNDS,
    SW_KEY_NOT_FOUND,
    SW_MAC_INVALID,
    SW_MEMORY_FAILURE,
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
SFI_LOG = 0x18
SFI_CAPP = 0x17  # the composite-application (transit) file
CAPP_RECORD = 0x02  # the record UPDATE CAPP DATA CACHE writes
STATE_FORMAT = "farebox-simcard/1"
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
    capp: bytes | None = None  # UPDATE CAPP DATA CACHE's 64 bytes, waiting for the debit


@dataclass(frozen=True)
class _Load:
    amount: int
    terminal_id: bytes
    online_ttc: int
    session_key: bytes


def write_state(path: Path, state: dict) -> None:
    """Write ``state`` as JSON to ``path`` atomically and durably: temp file in the same folder, fsync, os.replace,
    fsync of the folder (so the rename itself survives a power cut)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _transaction_state(t: Transaction) -> dict:
    return {
        "ttc": t.ttc, "amount": t.amount, "tx_type": t.tx_type, "terminal_id": t.terminal_id.hex(),
        "date": t.date.hex(), "time": t.time.hex(), "tac": t.tac.hex(), "mac2": t.mac2.hex(),
        "terminal_seq": t.terminal_seq, "balance_after": t.balance_after,
    }  # fmt: skip


def _hex(value, size: int, what: str) -> bytes:
    raw = bytes.fromhex(value)
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _transaction_from_state(d: dict) -> Transaction:
    return Transaction(
        ttc=int(d["ttc"]), amount=int(d["amount"]), tx_type=int(d["tx_type"]),
        terminal_id=_hex(d["terminal_id"], 6, "log terminal_id"), date=_hex(d["date"], 4, "log date"),
        time=_hex(d["time"], 3, "log time"), tac=_hex(d["tac"], 4, "log tac"), mac2=_hex(d["mac2"], 4, "log mac2"),
        terminal_seq=int(d["terminal_seq"]), balance_after=int(d["balance_after"]),
    )  # fmt: skip


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
        algorithm: int = ALG_3DES,
        state_file: Path | str | None = None,
    ):
        """A card as issued. ``algorithm`` is ``ALG_3DES`` or ``ALG_SM4`` (ValueError otherwise).

        With ``state_file`` the new card writes its state there at once (overwriting what was there: this is a
        freshly issued card) and after every change; to carry on with a saved card use :meth:`load`.
        """
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
        self._suite = crypto.suite(algorithm)
        self.algorithm = algorithm
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
        self.capp_record: bytes | None = None  # record 02 of SFI 17, once a composite purchase wrote it
        self._dpk = self._suite.diversify(keys.purchase, self.asn)
        self._dlk = self._suite.diversify(keys.load, self.asn)
        self._dtk = self._suite.diversify(keys.tac, self.asn)
        self._damk = self._suite.diversify(keys.maintenance, self.asn)
        self._selected = False
        self._pending: _Purchase | _Load | None = None
        self._challenge: bytes | None = None
        self._handlers = {
            (0x00, 0xA4): self._select,
            (0x00, 0xB0): self._read_binary,
            (0x00, 0xB2): self._read_record,
            (0x00, 0x84): self._get_challenge,
            (0x84, 0x1E): self._application_block,
            (0x80, 0x5C): self._get_balance,
            (0x80, 0x50): self._initialize,
            (0x80, 0xDC): self._update_capp_cache,
            (0x80, 0x54): self._debit,
            (0x80, 0x52): self._credit,
            (0x80, 0x5A): self._transaction_prove,
        }
        self.state_file = Path(state_file) if state_file is not None else None
        if self.state_file is not None:
            write_state(self.state_file, self.to_state())

    def __repr__(self) -> str:
        return (
            f"SimCard(asn={self.asn.hex()}, type={self.card_type}, balance={self.balance}, ttc={self.ttc}, "
            f"algorithm={self.algorithm:02X})"
        )

    # --- state ----------------------------------------------------------------------------------------------

    def to_state(self) -> dict:
        """Everything the card remembers, JSON-ready (keys excepted: they come from the issuer keys).

        ``{"format": "farebox-simcard/1", "asn": hex, "type": int, "balance": fen, "ttc": int, "online_ttc": int,
        "max_balance": fen, "algorithm": 0 | 4, "blocked": bool, "issuer": hex, "start": "YYYY-MM-DD",
        "end": "YYYY-MM-DD", "staff_no": str, "holder_name": str, "capp_record": hex | null, "log": [newest first:
        {"ttc", "amount", "tx_type", "terminal_id" hex, "date" hex, "time" hex, "tac" hex, "mac2" hex,
        "terminal_seq", "balance_after"}]}``. The log keeps the newest 10 entries and the newest purchase and load.
        """
        kept = self.log[:LOG_RECORDS]
        for last in (next((t for t in self.log if t.tx_type != TX_LOAD), None),
                     next((t for t in self.log if t.tx_type == TX_LOAD), None)):
            if last is not None and last not in kept:
                kept = [*kept, last]
        return {
            "format": STATE_FORMAT,
            "asn": self.asn.hex(), "type": self.card_type, "balance": self.balance, "ttc": self.ttc,
            "online_ttc": self.online_ttc, "max_balance": self.max_balance, "algorithm": self.algorithm,
            "blocked": self.blocked, "issuer": self.issuer.hex(), "start": self.start.isoformat(),
            "end": self.end.isoformat(), "staff_no": self.staff_no, "holder_name": self.holder_name,
            "capp_record": None if self.capp_record is None else self.capp_record.hex(),
            "log": [_transaction_state(t) for t in kept],
        }  # fmt: skip

    @classmethod
    def from_state(
        cls, state: dict, *, keys: IssuerKeys = TEST_ISSUER_KEYS, state_file: Path | str | None = None
    ) -> SimCard:
        """A card from ``to_state()``'s dict, with its keys diversified from ``keys``. ``state_file``: where it
        writes its later changes (nothing is written now). ValueError if the state is not a card's."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a simulated card's state (format must be {STATE_FORMAT!r})")
        try:
            card = cls(
                _hex(state["asn"], 10, "asn"), int(state["type"]), int(state["balance"]),
                keys=keys, issuer=_hex(state["issuer"], 8, "issuer"),
                start=date.fromisoformat(state["start"]), end=date.fromisoformat(state["end"]),
                staff_no=str(state["staff_no"]), holder_name=str(state["holder_name"]),
                ttc=int(state["ttc"]), online_ttc=int(state["online_ttc"]),
                max_balance=int(state["max_balance"]), blocked=bool(state["blocked"]),
                algorithm=int(state["algorithm"]),
            )  # fmt: skip
            capp = state["capp_record"]
            card.capp_record = None if capp is None else _hex(capp, CAPP_RECORD_SIZE, "capp_record")
            card.log = [_transaction_from_state(t) for t in state["log"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"simulated card state is missing or mangles {exc}") from None
        card.state_file = Path(state_file) if state_file is not None else None
        return card

    @classmethod
    def load(cls, path: Path | str, *, keys: IssuerKeys = TEST_ISSUER_KEYS) -> SimCard:
        """The card saved in ``path``; it keeps writing its changes there."""
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not JSON: {exc}") from None
        return cls.from_state(state, keys=keys, state_file=path)

    def save(self, path: Path | str | None = None) -> None:
        """Write the state now, atomically, to ``path`` (default: the card's state file)."""
        target = path if path is not None else self.state_file
        if target is None:
            raise ValueError("no path given and the card has no state file")
        write_state(Path(target), self.to_state())

    def _commit(self, entry: Transaction | None = None, **changes) -> None:
        """Apply ``changes`` (attribute -> new value) and put ``entry`` at the head of the log, then write the state
        file before the card answers; if the write fails, undo all of it and answer 6581 (a card whose EEPROM write
        fails changes nothing)."""
        before = {name: getattr(self, name) for name in changes}
        for name, value in changes.items():
            setattr(self, name, value)
        if entry is not None:
            self.log.insert(0, entry)  # in place: a long-lived card's log is not copied on every tap
        if self.state_file is None:
            return
        try:
            write_state(self.state_file, self.to_state())
        except Exception:  # noqa: BLE001 - whatever stopped the write, the change must not stand
            for name, value in before.items():
                setattr(self, name, value)
            if entry is not None:
                del self.log[0]
            raise Refused(SW_MEMORY_FAILURE) from None

    # --- APDUs ----------------------------------------------------------------------------------------------

    def transmit(self, apdu: bytes) -> bytes:
        """Answer one command APDU: response data + SW1 SW2. Never raises."""
        # An open purchase, load or challenge survives only until the next command, whatever that command is.
        pending, self._pending = self._pending, None
        challenge, self._challenge = self._challenge, None
        try:
            command = parse_command(apdu, self._handlers)
            if command.cla == 0x84:
                return self._application_block(command, challenge)
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
            + bytes([self.card_type, self.algorithm])  # issuer data: card type, algorithm
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
        if not self._selected:
            raise Refused(SW_FILE_NOT_FOUND)
        if c.p2 & 0x07 != 0x04:  # only "record number in P1" is supported
            raise Refused(SW_WRONG_P1P2)
        sfi = c.p2 >> 3
        if sfi == SFI_LOG:
            if not 1 <= c.p1 <= min(len(self.log), LOG_RECORDS):
                raise Refused(SW_RECORD_NOT_FOUND)
            return self.log[c.p1 - 1].record() + sw_bytes(SW_OK)
        if sfi == SFI_CAPP:
            if c.p1 != CAPP_RECORD or self.capp_record is None:
                raise Refused(SW_RECORD_NOT_FOUND)
            if c.le not in (None, 0x00, CAPP_RECORD_SIZE):
                raise Refused(0x6C00 | CAPP_RECORD_SIZE)
            return self.capp_record + sw_bytes(SW_OK)
        raise Refused(SW_FILE_NOT_FOUND)

    def _get_challenge(self, c: Command, _pending) -> bytes:
        if (c.p1, c.p2) != (0x00, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_no_data()
        if c.le not in (None, 0x04):
            raise Refused(0x6C04)
        self._challenge = os.urandom(4)
        return self._challenge + sw_bytes(SW_OK)

    def _application_block(self, c: Command, challenge: bytes | None) -> bytes:
        if (c.p1, c.p2) != (0x00, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(4, 4)
        if not self._selected or challenge is None:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if c.data != self._suite.block_mac(self._damk, challenge):
            raise Refused(SW_MAC_INVALID)
        if not self.blocked:
            self._commit(blocked=True)
        return sw_bytes(SW_OK)

    def _get_balance(self, c: Command, _pending) -> bytes:
        self._need_selected()
        c.need_no_data()
        if (c.p1, c.p2) != (0x00, 0x02):
            raise Refused(SW_WRONG_P1P2)
        if c.le not in (None, 0x00, 0x04):
            raise Refused(0x6C04)  # the balance is 4 bytes: resend with Le 04
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
        if self.ttc >= 0xFFFF:  # the counter cannot count this purchase: the card is used up
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if amount > self.balance:
            raise Refused(SW_INSUFFICIENT_FUNDS)
        tx_type = TX_COMPOSITE if c.p1 == 0x03 else TX_PURCHASE
        self._pending = _Purchase(tx_type, amount, terminal_id, random, self.ttc)
        answer = (
            self.balance.to_bytes(4, "big")
            + self.ttc.to_bytes(2, "big")
            + bytes(3)  # no overdraft
            + bytes([KEY_VERSION, self.algorithm])
            + random
        )
        return answer + sw_bytes(SW_OK)

    def _initialize_load(self, amount: int, terminal_id: bytes, random: bytes) -> bytes:
        if self.balance + amount > self.max_balance or self.online_ttc >= 0xFFFF:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        session_key = self._suite.load_session_key(self._dlk, random, self.online_ttc)
        mac1 = self._suite.load_mac1(session_key, self.balance, amount, terminal_id)
        self._pending = _Load(amount, terminal_id, self.online_ttc, session_key)
        answer = (
            self.balance.to_bytes(4, "big")
            + self.online_ttc.to_bytes(2, "big")
            + bytes([KEY_VERSION, self.algorithm])
            + random
            + mac1
        )
        return answer + sw_bytes(SW_OK)

    def _update_capp_cache(self, c: Command, pending) -> bytes:
        if not isinstance(pending, _Purchase) or pending.tx_type != TX_COMPOSITE or pending.capp is not None:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if c.p2 & 0x07 != 0x00:
            raise Refused(SW_WRONG_P1P2)
        if c.p2 >> 3 != SFI_CAPP:
            raise Refused(SW_FILE_NOT_FOUND)
        if c.p1 != CAPP_RECORD:
            raise Refused(SW_RECORD_NOT_FOUND)
        c.need_data(CAPP_RECORD_SIZE, CAPP_RECORD_SIZE)
        # Nothing is written yet: the record changes only with the debit that follows.
        self._pending = replace(pending, capp=c.data)
        return sw_bytes(SW_OK)

    def _debit(self, c: Command, pending) -> bytes:
        if not isinstance(pending, _Purchase):
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if (c.p1, c.p2) != (0x01, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(15, 15)
        terminal_seq = int.from_bytes(c.data[0:4], "big")
        date4, time3, mac1 = c.data[4:8], c.data[8:11], c.data[11:15]
        p, suite = pending, self._suite
        sespk = suite.purchase_session_key(self._dpk, p.random, p.ttc, terminal_seq)
        if mac1 != suite.purchase_mac1(sespk, p.amount, p.tx_type, p.terminal_id, date4, time3):
            raise Refused(SW_MAC_INVALID)
        tac = suite.purchase_tac(self._dtk, p.amount, p.tx_type, p.terminal_id, terminal_seq, date4, time3)
        mac2 = suite.purchase_mac2(sespk, p.amount)
        balance = self.balance - p.amount
        entry = Transaction(
            p.ttc, p.amount, p.tx_type, p.terminal_id, date4, time3, tac, mac2, terminal_seq, balance
        )
        changes = {"balance": balance, "ttc": p.ttc + 1}
        if p.capp is not None:
            changes["capp_record"] = p.capp
        self._commit(entry, **changes)  # balance, counter, log and composite record: one write
        return tac + mac2 + sw_bytes(SW_OK)

    def _credit(self, c: Command, pending) -> bytes:
        if not isinstance(pending, _Load):
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)
        if (c.p1, c.p2) != (0x00, 0x00):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(11, 11)
        date4, time3, mac2 = c.data[0:4], c.data[4:7], c.data[7:11]
        p, suite = pending, self._suite
        if mac2 != suite.load_mac2(p.session_key, p.amount, p.terminal_id, date4, time3):
            raise Refused(SW_MAC_INVALID)
        new_balance = self.balance + p.amount
        tac = suite.load_tac(self._dtk, new_balance, p.online_ttc, p.amount, p.terminal_id, date4, time3)
        entry = Transaction(p.online_ttc, p.amount, TX_LOAD, p.terminal_id, date4, time3, tac, mac2, 0, new_balance)
        self._commit(entry, balance=new_balance, online_ttc=p.online_ttc + 1)
        return tac + sw_bytes(SW_OK)

    def _transaction_prove(self, c: Command, _pending) -> bytes:
        self._need_selected()
        if c.p1 != 0x00 or c.p2 not in (TX_PURCHASE, TX_COMPOSITE, TX_LOAD):
            raise Refused(SW_WRONG_P1P2)
        c.need_data(2, 2)
        ttc = int.from_bytes(c.data, "big")
        last = next((t for t in self.log if (t.tx_type == TX_LOAD) == (c.p2 == TX_LOAD)), None)
        if last is None or (last.tx_type, last.ttc) != (c.p2, ttc):
            raise Refused(SW_PROVE_NOT_AVAILABLE)
        return last.mac2 + last.tac + sw_bytes(SW_OK)

    def _need_selected(self) -> None:
        if not self._selected:
            raise Refused(SW_CONDITIONS_NOT_SATISFIED)

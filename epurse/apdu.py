"""The terminal's side of the e-purse APDUs: build command bytes, check status words, parse answers.

Pure functions over bytes, no I/O. A response is the data followed by the 2-byte status word (SW1 SW2); ``check``
splits it and turns any status other than ``9000`` into :class:`StatusError`, and every ``parse_*`` raises
:class:`ResponseError` for data of the wrong length or content. Layouts are DESIGN.md "The e-purse protocol"; numbers
are unsigned big-endian (amounts and balances 4 bytes, in fen).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from epurse.crypto import bcd_date, bcd_time, parse_bcd_date

AID = bytes.fromhex("A000000632010105")  # the transit e-purse application (JT/T 978)

TX_LOAD = 0x02
TX_PURCHASE = 0x06
# A transit purchase whose record cache was updated first (INIT FOR PURCHASE with P1 = 03).
TX_COMPOSITE = 0x09
CAPP_RECORD_SIZE = 64  # record 02 of the composite-application file (SFI 17), written by UPDATE CAPP DATA CACHE

ALG_3DES = 0x00
ALG_SM4 = 0x04

SW_OK = 0x9000
SW_APP_BLOCKED = 0x6283
SW_MEMORY_FAILURE = 0x6581
SW_WRONG_LENGTH = 0x6700
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_WRONG_DATA = 0x6A80
SW_FILE_NOT_FOUND = 0x6A82
SW_RECORD_NOT_FOUND = 0x6A83
SW_WRONG_P1P2 = 0x6B00
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_MAC_INVALID = 0x9302
SW_INSUFFICIENT_FUNDS = 0x9401
SW_KEY_NOT_FOUND = 0x9403
SW_PROVE_NOT_AVAILABLE = 0x9406

SW_MEANING = {
    SW_OK: "success",
    SW_APP_BLOCKED: "selected, but the application is blocked (deny-listed card)",
    SW_MEMORY_FAILURE: "memory failure: the card could not write its memory, nothing changed",
    SW_WRONG_LENGTH: "wrong length",
    SW_SECURITY_NOT_SATISFIED: "security status not satisfied",
    SW_CONDITIONS_NOT_SATISFIED: (
        "conditions of use not satisfied (wrong command order, no application selected, or application blocked)"
    ),
    SW_WRONG_DATA: "incorrect data in the command",
    SW_FILE_NOT_FOUND: "file or application not found",
    SW_RECORD_NOT_FOUND: "record not found",
    SW_WRONG_P1P2: "wrong parameters P1 P2",
    SW_INS_NOT_SUPPORTED: "instruction not supported",
    SW_CLA_NOT_SUPPORTED: "class not supported",
    SW_MAC_INVALID: "MAC invalid",
    SW_INSUFFICIENT_FUNDS: "insufficient funds",
    SW_KEY_NOT_FOUND: "key index not supported",
    SW_PROVE_NOT_AVAILABLE: "no MAC or TAC available for that transaction",
}


def sw_text(sw: int) -> str:
    """What a status word means, in words: SW_MEANING, plus the two families that carry a number in SW2."""
    if sw in SW_MEANING:
        return SW_MEANING[sw]
    if sw >> 8 == 0x6C:
        return f"wrong Le: the answer is {sw & 0xFF} bytes (resend with Le {sw & 0xFF:02X})"
    if sw >> 8 == 0x61:
        return f"{sw & 0xFF or 256} more bytes available (GET RESPONSE)"
    return "unknown status"


class StatusError(Exception):
    """The card or PSAM answered a status word other than 9000; ``.sw`` holds it."""

    def __init__(self, command: str, sw: int):
        self.command = command
        self.sw = sw
        super().__init__(f"{command} answered {sw:04X}: {sw_text(sw)}")


class ResponseError(Exception):
    """An answer that is not what the command returns (too short, wrong length, bad BCD ...)."""


def check(response: bytes, command: str) -> bytes:
    """Return the data of ``response`` (everything before the last 2 bytes) if its status word is 9000.

    Raises ResponseError if the response is shorter than a status word, StatusError for any other status word.
    """
    if len(response) < 2:
        raise ResponseError(f"{command} answered {len(response)} byte(s), less than a status word")
    sw = int.from_bytes(response[-2:], "big")
    if sw != SW_OK:
        raise StatusError(command, sw)
    return bytes(response[:-2])


# --- builders: card commands ----------------------------------------------------------------------------------


def _u(value: int, size: int, name: str) -> bytes:
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{name} {value} does not fit in {size} byte(s)")
    return value.to_bytes(size, "big")


def _fixed(value: bytes, size: int, name: str) -> bytes:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return bytes(value)


def select_aid(aid: bytes = AID) -> bytes:
    """SELECT by name: ``00 A4 04 00 Lc AID``."""
    if not 5 <= len(aid) <= 16:
        raise ValueError(f"an AID is 5 to 16 bytes, got {len(aid)}")
    return bytes([0x00, 0xA4, 0x04, 0x00, len(aid)]) + bytes(aid)


def read_public_info() -> bytes:
    """READ BINARY of the public information file 0015 (SFI 15), 30 bytes: ``00 B0 95 00 1E``."""
    return bytes.fromhex("00B095001E")


def read_holder_info() -> bytes:
    """READ BINARY of the holder file 0016 (SFI 16), 32 bytes: ``00 B0 96 00 20``."""
    return bytes.fromhex("00B0960020")


def read_log_record(number: int) -> bytes:
    """READ RECORD of the transaction log (SFI 18), record 1 = newest: ``00 B2 nn C4 17``."""
    return bytes([0x00, 0xB2, _u(number, 1, "record number")[0], 0xC4, 0x17])


def get_balance() -> bytes:
    """GET BALANCE of the e-purse: ``80 5C 00 02 04``."""
    return bytes.fromhex("805C000204")


def init_purchase(key_index: int, amount: int, terminal_id6: bytes, *, composite: bool = False) -> bytes:
    """INITIALIZE FOR PURCHASE: ``80 50 01 02 0B`` key index(1) amount(4) terminal(6) ``0F``.

    ``composite=True`` sends P1 = ``03`` (the transit composite purchase, transaction type 09).
    """
    p1 = 0x03 if composite else 0x01
    data = (
        _u(key_index, 1, "key index") + _u(amount, 4, "amount") + _fixed(terminal_id6, 6, "terminal number")
    )
    return bytes([0x80, 0x50, p1, 0x02, 0x0B]) + data + b"\x0f"


def debit_purchase(terminal_seq: int, date4: bytes, time3: bytes, mac1: bytes) -> bytes:
    """DEBIT FOR PURCHASE: ``80 54 01 00 0F`` terminal sequence(4) date(4) time(3) MAC1(4) ``08``."""
    data = (
        _u(terminal_seq, 4, "terminal sequence")
        + _fixed(date4, 4, "date")
        + _fixed(time3, 3, "time")
        + _fixed(mac1, 4, "MAC1")
    )
    return bytes.fromhex("805401000F") + data + b"\x08"


def init_load(key_index: int, amount: int, terminal_id6: bytes) -> bytes:
    """INITIALIZE FOR LOAD: ``80 50 00 02 0B`` key index(1) amount(4) terminal(6) ``10``."""
    data = (
        _u(key_index, 1, "key index") + _u(amount, 4, "amount") + _fixed(terminal_id6, 6, "terminal number")
    )
    return bytes.fromhex("805000020B") + data + b"\x10"


def credit_load(date4: bytes, time3: bytes, mac2: bytes) -> bytes:
    """CREDIT FOR LOAD: ``80 52 00 00 0B`` date(4) time(3) MAC2(4) ``04``."""
    data = _fixed(date4, 4, "date") + _fixed(time3, 3, "time") + _fixed(mac2, 4, "MAC2")
    return bytes.fromhex("805200000B") + data + b"\x04"


def update_capp_cache(record64: bytes) -> bytes:
    """UPDATE CAPP DATA CACHE: ``80 DC 02 B8 40`` record(64), record 02 of the composite-application file (SFI 17).

    Only accepted as the very next command after INITIALIZE FOR PURCHASE with P1 ``03``; the card keeps the 64
    bytes aside and writes them to the record only if the DEBIT FOR PURCHASE that follows succeeds. The card
    treats the content as opaque (its layout is the transit application's, epurse.transit).
    """
    return bytes.fromhex("80DC02B840") + _fixed(record64, CAPP_RECORD_SIZE, "composite record")


def read_capp_record() -> bytes:
    """READ RECORD 02 of the composite-application file (SFI 17), 64 bytes: ``00 B2 02 BC 40``."""
    return bytes.fromhex("00B202BC40")


def get_challenge() -> bytes:
    """GET CHALLENGE, 4 random bytes for the next secured command (APPLICATION BLOCK): ``00 84 00 00 04``."""
    return bytes.fromhex("0084000004")


def application_block(mac4: bytes) -> bytes:
    """APPLICATION BLOCK: ``84 1E 00 00 04`` MAC(4). The MAC is the PSAM's answer to :func:`psam_block_mac` for
    the card's last GET CHALLENGE (epurse.crypto ``CryptoSuite.block_mac``). The card blocks its application for
    good: SELECT answers ``6283`` afterwards and purchases and loads ``6985``."""
    return bytes.fromhex("841E000004") + _fixed(mac4, 4, "MAC")


def get_transaction_prove(tx_type: int, ttc: int) -> bytes:
    """GET TRANSACTION PROVE: ``80 5A 00 type 02`` TTC(2) ``08`` -> MAC2 and TAC of the card's last transaction of
    that kind: type 06 / 09 with the offline TTC for a purchase, 02 with the online TTC for a load."""
    return (
        bytes([0x80, 0x5A, 0x00, _u(tx_type, 1, "transaction type")[0], 0x02]) + _u(ttc, 2, "TTC") + b"\x08"
    )


# --- builders: PSAM commands ----------------------------------------------------------------------------------


def psam_read_terminal_id() -> bytes:
    """READ BINARY of the PSAM's terminal number file (SFI 16), 6 bytes: ``00 B0 96 00 06``."""
    return bytes.fromhex("00B0960006")


def psam_init_purchase(
    card_random4: bytes,
    ttc: int,
    amount: int,
    tx_type: int,
    when: datetime,
    key_version: int,
    algorithm: int,
    card_no8: bytes,
    issuer8: bytes,
) -> bytes:
    """PSAM INIT FOR PURCHASE (MAC1): ``80 70 00 00 24`` card random(4) TTC(2) amount(4) type(1) date(4) time(3)
    key version(1) algorithm(1) card number(8, the last 8 bytes of the ASN) issuer code(8) ``08``."""
    data = (
        _fixed(card_random4, 4, "card random")
        + _u(ttc, 2, "TTC")
        + _u(amount, 4, "amount")
        + _u(tx_type, 1, "transaction type")
        + bcd_date(when)
        + bcd_time(when)
        + _u(key_version, 1, "key version")
        + _u(algorithm, 1, "algorithm")
        + _fixed(card_no8, 8, "card number")
        + _fixed(issuer8, 8, "issuer code")
    )
    return bytes.fromhex("8070000024") + data + b"\x08"


def psam_verify_mac2(mac2: bytes) -> bytes:
    """PSAM VERIFY MAC2: ``80 72 00 00 04`` MAC2(4)."""
    return bytes.fromhex("8072000004") + _fixed(mac2, 4, "MAC2")


def psam_block_mac(card_number8: bytes, issuer8: bytes, challenge4: bytes, algorithm: int) -> bytes:
    """PSAM APPLICATION BLOCK MAC: ``80 FA 05 00 15`` algorithm(1) card number(8, the last 8 bytes of the ASN)
    issuer code(8) card challenge(4) ``04``.

    P1 ``05`` = "MAC for an issuer command with the diversified maintenance key". The PSAM diversifies DAMK from its
    maintenance master key by the card number with the card's algorithm (``00`` 3DES, ``04`` SM4; anything else
    ``6A80``) and answers the 4-byte MAC over ``84 1E 00 00 04`` with IV = challenge || zeros (epurse.crypto).
    """
    data = (
        _u(algorithm, 1, "algorithm")
        + _fixed(card_number8, 8, "card number")
        + _fixed(issuer8, 8, "issuer code")
        + _fixed(challenge4, 4, "challenge")
    )
    return bytes([0x80, 0xFA, 0x05, 0x00, len(data)]) + data + b"\x04"


# --- parsers --------------------------------------------------------------------------------------------------


def _length(data: bytes, size: int, what: str) -> bytes:
    if len(data) != size:
        raise ResponseError(f"{what} is {size} bytes, the card sent {len(data)}")
    return bytes(data)


def _date(b: bytes, what: str) -> date:
    try:
        return parse_bcd_date(b)
    except ValueError as exc:
        raise ResponseError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class PublicInfo:
    """The public information file 0015."""

    issuer: bytes  # 8-byte issuer code
    app_type: int
    app_version: int
    asn: bytes  # 10-byte application serial number
    start: date
    end: date
    card_type: (
        int  # issuer data byte 0, an epurse.cardtypes.CardType value (kept int: unknown types do not crash)
    )
    # Issuer data byte 1: the card's algorithm (ALG_3DES 00 / ALG_SM4 04), the same byte its INITIALIZE answers
    # carry; a terminal needs it before any INITIALIZE, e.g. to have the PSAM compute an APPLICATION BLOCK MAC.
    algorithm: int = ALG_3DES


def parse_public_info(data: bytes) -> PublicInfo:
    """30 bytes: issuer code(8) app type(1) app version(1) ASN(10) start date(4 BCD) end date(4 BCD) issuer data(2:
    card type(1) algorithm(1))."""
    data = _length(data, 30, "the public information file")
    return PublicInfo(
        issuer=data[0:8],
        app_type=data[8],
        app_version=data[9],
        asn=data[10:20],
        start=_date(data[20:24], "public information start date"),
        end=_date(data[24:28], "public information end date"),
        card_type=data[28],
        algorithm=data[29],
    )


@dataclass(frozen=True)
class HolderInfo:
    """The holder file 0016: who the card belongs to (a driver or staff member's number and name)."""

    staff_no: str
    name: str


def parse_holder_info(data: bytes) -> HolderInfo:
    """32 bytes: staff number(12, ASCII, space-padded) holder name(20, UTF-8, NUL-padded)."""
    data = _length(data, 32, "the holder file")
    try:
        staff_no = data[:12].decode("ascii").rstrip(" ")
        name = data[12:].rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResponseError(f"the holder file is not text: {exc}") from None
    return HolderInfo(staff_no=staff_no, name=name)


def parse_balance(data: bytes) -> int:
    """GET BALANCE answer: balance(4), fen."""
    return int.from_bytes(_length(data, 4, "the balance"), "big")


@dataclass(frozen=True)
class PurchaseInit:
    balance: int
    ttc: int  # the card's offline counter, before this purchase
    overdraft: int
    key_version: int
    algorithm: int
    random: bytes  # 4 bytes


def parse_init_purchase(data: bytes) -> PurchaseInit:
    """INITIALIZE FOR PURCHASE answer, 15 bytes: balance(4) TTC(2) overdraft limit(3) key version(1) algorithm(1)
    card random(4)."""
    data = _length(data, 15, "the INITIALIZE FOR PURCHASE answer")
    return PurchaseInit(
        balance=int.from_bytes(data[0:4], "big"),
        ttc=int.from_bytes(data[4:6], "big"),
        overdraft=int.from_bytes(data[6:9], "big"),
        key_version=data[9],
        algorithm=data[10],
        random=data[11:15],
    )


@dataclass(frozen=True)
class PsamPurchase:
    terminal_seq: int
    mac1: bytes


def parse_psam_init_purchase(data: bytes) -> PsamPurchase:
    """PSAM INIT FOR PURCHASE answer, 8 bytes: terminal sequence(4) MAC1(4)."""
    data = _length(data, 8, "the PSAM INIT FOR PURCHASE answer")
    return PsamPurchase(terminal_seq=int.from_bytes(data[:4], "big"), mac1=data[4:])


@dataclass(frozen=True)
class DebitResult:
    tac: bytes
    mac2: bytes


def parse_debit(data: bytes) -> DebitResult:
    """DEBIT FOR PURCHASE answer, 8 bytes: TAC(4) MAC2(4)."""
    data = _length(data, 8, "the DEBIT FOR PURCHASE answer")
    return DebitResult(tac=data[:4], mac2=data[4:])


@dataclass(frozen=True)
class LoadInit:
    balance: int
    online_ttc: int  # the card's online (load) counter, before this load
    key_version: int
    algorithm: int
    random: bytes  # 4 bytes
    mac1: bytes  # 4 bytes, for the host to check


def parse_init_load(data: bytes) -> LoadInit:
    """INITIALIZE FOR LOAD answer, 16 bytes: balance(4) online TTC(2) key version(1) algorithm(1) card random(4)
    MAC1(4)."""
    data = _length(data, 16, "the INITIALIZE FOR LOAD answer")
    return LoadInit(
        balance=int.from_bytes(data[0:4], "big"),
        online_ttc=int.from_bytes(data[4:6], "big"),
        key_version=data[6],
        algorithm=data[7],
        random=data[8:12],
        mac1=data[12:16],
    )


def parse_credit(data: bytes) -> bytes:
    """CREDIT FOR LOAD answer: TAC(4)."""
    return _length(data, 4, "the CREDIT FOR LOAD answer")


@dataclass(frozen=True)
class TransactionProve:
    mac2: bytes
    tac: bytes


def parse_transaction_prove(data: bytes) -> TransactionProve:
    """GET TRANSACTION PROVE answer, 8 bytes: MAC2(4) TAC(4)."""
    data = _length(data, 8, "the GET TRANSACTION PROVE answer")
    return TransactionProve(mac2=data[:4], tac=data[4:])


@dataclass(frozen=True)
class LogRecord:
    """One record of the card's transaction log (SFI 18)."""

    ttc: int  # offline TTC for purchases, online TTC for loads, before the transaction
    overdraft: int
    amount: int
    tx_type: int
    terminal_id: bytes
    date: bytes  # 4 bytes BCD, as the card stores it
    time: bytes  # 3 bytes BCD


def parse_log_record(data: bytes) -> LogRecord:
    """A transaction log record, 23 bytes: TTC(2) overdraft(3) amount(4) type(1) terminal(6) date(4) time(3)."""
    data = _length(data, 23, "a transaction log record")
    return LogRecord(
        ttc=int.from_bytes(data[0:2], "big"),
        overdraft=int.from_bytes(data[2:5], "big"),
        amount=int.from_bytes(data[5:9], "big"),
        tx_type=data[9],
        terminal_id=data[10:16],
        date=data[16:20],
        time=data[20:23],
    )


def parse_challenge(data: bytes) -> bytes:
    """GET CHALLENGE answer: the card's random challenge(4)."""
    return _length(data, 4, "the GET CHALLENGE answer")


def parse_psam_mac(data: bytes) -> bytes:
    """PSAM APPLICATION BLOCK MAC answer: MAC(4)."""
    return _length(data, 4, "the PSAM MAC answer")


def parse_capp_record(data: bytes) -> bytes:
    """READ RECORD of the composite-application record: its 64 bytes, as the transit application wrote them."""
    return _length(data, CAPP_RECORD_SIZE, "the composite-application record")

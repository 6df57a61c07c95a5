"""The e-purse's cryptography: key diversification, session keys, MAC1 / MAC2 / TAC, BCD date and time.

Everything here is the 3DES variant (algorithm id ``00``), byte for byte as DESIGN.md "The e-purse protocol" states:

- ``des3_encrypt``: two-key 3DES (K1 K2 K1, EDE) in ECB mode on one 8-byte block.
- ``diversify``: card key = 3DES(master, D) || 3DES(master, NOT D), D = the last 8 bytes of the ASN (which is the
  8-byte card number the terminal gives the PSAM).
- ``mac``: single-DES CBC-MAC (ISO 9797-1 algorithm 1) with an 8-byte key and a zero IV; the data is always padded with
  ``80`` and then ``00`` bytes up to a multiple of 8 (ISO 9797-1 padding method 2, so 8 data bytes become 16); the MAC
  is the first 4 bytes of the last cipher block.
- Purchase: SESPK = 3DES(DPK, random(4) || TTC(2) || low 2 bytes of the terminal sequence);
  MAC1 = mac(SESPK, amount(4) || type(1) || terminal(6) || date(4) || time(3)); MAC2 = mac(SESPK, amount(4));
  TAC = mac(DTK left XOR DTK right, amount(4) || type(1) || terminal(6) || terminal sequence(4) || date(4) || time(3)).
- Load: SESLK = 3DES(DLK, random(4) || online TTC(2) || ``8000``);
  MAC1 = mac(SESLK, old balance(4) || amount(4) || ``02`` || terminal(6));
  MAC2 = mac(SESLK, amount(4) || ``02`` || terminal(6) || date(4) || time(3));
  TAC = mac(DTK left XOR DTK right, new balance(4) || online TTC before the load(2) || amount(4) || ``02`` ||
  terminal(6) || date(4) || time(3)).

Numbers are unsigned big-endian: amounts and balances 4 bytes (fen), TTC 2 bytes, terminal sequence 4 bytes.
A wrong length or an out-of-range number raises ``ValueError``. The SM4 variant (algorithm ``04``) is not
implemented: farebox's cards and PSAMs say ``00``.
"""

from __future__ import annotations

from datetime import date, datetime, time

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

TX_LOAD = 0x02  # the transaction type a load's MACs and TAC cover (same value as epurse.apdu.TX_LOAD)


def _need(name: str, value: bytes, length: int) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, got {_describe(value)}")
    return bytes(value)


def _describe(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    return type(value).__name__


def _u(name: str, value: int, size: int) -> bytes:
    if not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{name} must be an integer from 0 to {(1 << (8 * size)) - 1}, got {value!r}")
    return value.to_bytes(size, "big")


def _ecb(key24: bytes, data: bytes) -> bytes:
    encryptor = Cipher(TripleDES(key24), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def des3_encrypt(key16: bytes, block8: bytes) -> bytes:
    """Encrypt one 8-byte block with two-key 3DES (EDE, keys K1 K2 K1), ECB."""
    key16 = _need("3DES key", key16, 16)
    block8 = _need("block", block8, 8)
    # cryptography 50 deprecates 16-byte TripleDES keys; K1|K2|K1 is the same cipher without the warning.
    return _ecb(key16 + key16[:8], block8)


def card_number(asn: bytes) -> bytes:
    """The 8-byte card number a terminal gives the PSAM: the last 8 bytes of the 10-byte ASN."""
    return _need("ASN", asn, 10)[2:]


def diversify(master16: bytes, asn10: bytes) -> bytes:
    """Card key = 3DES(master, D) || 3DES(master, NOT D), D = the last 8 bytes of ``asn10``.

    ``asn10`` may be the 10-byte ASN or already the 8-byte card number (then D is the card number itself), so the
    card (which knows its ASN) and the PSAM (which is given the card number) call the same function.
    """
    if not isinstance(asn10, (bytes, bytearray)) or len(asn10) not in (8, 10):
        raise ValueError(f"ASN must be 10 bytes (or the 8-byte card number), got {_describe(asn10)}")
    d = bytes(asn10[-8:])
    not_d = bytes(b ^ 0xFF for b in d)
    return des3_encrypt(master16, d) + des3_encrypt(master16, not_d)


def pad(data: bytes) -> bytes:
    """ISO 9797-1 padding method 2: append ``80``, then ``00`` bytes up to a multiple of 8 (always at least one byte)."""
    data = bytes(data) + b"\x80"
    return data + b"\x00" * (-len(data) % 8)


def mac(key8: bytes, data: bytes) -> bytes:
    """Single-DES CBC-MAC, zero IV, over ``pad(data)``; returns the first 4 bytes of the last block."""
    key8 = _need("MAC key", key8, 8)
    # Single DES is 3DES with K|K|K; CBC over the padded data, and only the last block counts.
    encryptor = Cipher(TripleDES(key8 * 3), modes.CBC(bytes(8))).encryptor()
    out = encryptor.update(pad(data)) + encryptor.finalize()
    return out[-8:-4]


def tac_key(dtk16: bytes) -> bytes:
    """The 8-byte TAC key: the left half of the card's TAC key DTK XOR its right half."""
    dtk16 = _need("DTK", dtk16, 16)
    return bytes(a ^ b for a, b in zip(dtk16[:8], dtk16[8:]))


# --- purchase -------------------------------------------------------------------------------------------------


def purchase_session_key(dpk16: bytes, card_random4: bytes, ttc: int, terminal_seq: int) -> bytes:
    """SESPK = 3DES(DPK, card random(4) || TTC(2) || low 2 bytes of the terminal sequence), 8 bytes."""
    block = (
        _need("card random", card_random4, 4)
        + _u("TTC", ttc, 2)
        + _u("terminal sequence", terminal_seq, 4)[2:]
    )
    return des3_encrypt(dpk16, block)


def purchase_mac1(
    sespk8: bytes, amount: int, tx_type: int, terminal_id6: bytes, date4: bytes, time3: bytes
) -> bytes:
    """MAC1 = mac(SESPK, amount(4) || type(1) || terminal(6) || date(4) || time(3)); the PSAM makes it, the card checks."""
    data = (
        _u("amount", amount, 4)
        + _u("transaction type", tx_type, 1)
        + _need("terminal number", terminal_id6, 6)
        + _need("date", date4, 4)
        + _need("time", time3, 3)
    )
    return mac(sespk8, data)


def purchase_mac2(sespk8: bytes, amount: int) -> bytes:
    """MAC2 = mac(SESPK, amount(4)); the card makes it, the PSAM checks."""
    return mac(sespk8, _u("amount", amount, 4))


def purchase_tac(
    dtk16: bytes,
    amount: int,
    tx_type: int,
    terminal_id6: bytes,
    terminal_seq: int,
    date4: bytes,
    time3: bytes,
) -> bytes:
    """TAC = mac(tac_key(DTK), amount(4) || type(1) || terminal(6) || terminal sequence(4) || date(4) || time(3))."""
    data = (
        _u("amount", amount, 4)
        + _u("transaction type", tx_type, 1)
        + _need("terminal number", terminal_id6, 6)
        + _u("terminal sequence", terminal_seq, 4)
        + _need("date", date4, 4)
        + _need("time", time3, 3)
    )
    return mac(tac_key(dtk16), data)


# --- load (over-the-air or counter top-up; computed by the host, never by a terminal) -------------------------


def load_session_key(dlk16: bytes, random4: bytes, online_ttc: int) -> bytes:
    """SESLK = 3DES(DLK, card random(4) || online TTC(2) || ``8000``), 8 bytes."""
    return des3_encrypt(
        dlk16, _need("card random", random4, 4) + _u("online TTC", online_ttc, 2) + b"\x80\x00"
    )


def load_mac1(sesk8: bytes, balance: int, amount: int, terminal_id6: bytes) -> bytes:
    """Load MAC1 = mac(SESLK, old balance(4) || amount(4) || ``02`` || terminal(6)); the card makes it, the host checks."""
    data = (
        _u("balance", balance, 4)
        + _u("amount", amount, 4)
        + bytes([TX_LOAD])
        + _need("terminal number", terminal_id6, 6)
    )
    return mac(sesk8, data)


def load_mac2(sesk8: bytes, amount: int, terminal_id6: bytes, date4: bytes, time3: bytes) -> bytes:
    """Load MAC2 = mac(SESLK, amount(4) || ``02`` || terminal(6) || date(4) || time(3)); the host makes it."""
    data = (
        _u("amount", amount, 4)
        + bytes([TX_LOAD])
        + _need("terminal number", terminal_id6, 6)
        + _need("date", date4, 4)
        + _need("time", time3, 3)
    )
    return mac(sesk8, data)


def load_tac(
    dtk16: bytes,
    new_balance: int,
    online_ttc: int,
    amount: int,
    terminal_id6: bytes,
    date4: bytes,
    time3: bytes,
) -> bytes:
    """Load TAC = mac(tac_key(DTK), new balance(4) || online TTC before the load(2) || amount(4) || ``02`` ||
    terminal(6) || date(4) || time(3))."""
    data = (
        _u("new balance", new_balance, 4)
        + _u("online TTC", online_ttc, 2)
        + _u("amount", amount, 4)
        + bytes([TX_LOAD])
        + _need("terminal number", terminal_id6, 6)
        + _need("date", date4, 4)
        + _need("time", time3, 3)
    )
    return mac(tac_key(dtk16), data)


# --- BCD dates and times --------------------------------------------------------------------------------------


def _bcd(digits: str) -> bytes:
    return bytes.fromhex(digits)


def _digits(b: bytes, what: str) -> str:
    text = bytes(b).hex()
    if not text.isdigit():
        raise ValueError(f"{what} {text.upper()} is not BCD (every nibble must be 0-9)")
    return text


def bcd_date(dt: date | datetime) -> bytes:
    """The date as 4 bytes BCD ``YYYYMMDD`` (2024-03-05 -> ``20 24 03 05``)."""
    return _bcd(f"{dt.year:04d}{dt.month:02d}{dt.day:02d}")


def bcd_time(dt: datetime | time) -> bytes:
    """The time of day as 3 bytes BCD ``HHMMSS`` (07:08:09 -> ``07 08 09``)."""
    return _bcd(f"{dt.hour:02d}{dt.minute:02d}{dt.second:02d}")


def parse_bcd_date(b: bytes) -> date:
    """4 bytes BCD ``YYYYMMDD`` -> date; ValueError if not 4 bytes, not BCD, or not a real calendar date."""
    if len(b) != 4:
        raise ValueError(f"a BCD date is 4 bytes, got {len(b)}")
    text = _digits(b, "date")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as exc:
        raise ValueError(f"date {text} is not a calendar date: {exc}") from None


def parse_bcd_time(b: bytes) -> time:
    """3 bytes BCD ``HHMMSS`` -> time; ValueError if not 3 bytes, not BCD, or out of range."""
    if len(b) != 3:
        raise ValueError(f"a BCD time is 3 bytes, got {len(b)}")
    text = _digits(b, "time")
    try:
        return time(int(text[:2]), int(text[2:4]), int(text[4:]))
    except ValueError as exc:
        raise ValueError(f"time {text} is not a time of day: {exc}") from None

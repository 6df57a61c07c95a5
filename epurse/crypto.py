"""The e-purse's cryptography: key diversification, session keys, MAC1 / MAC2 / TAC, block MAC, BCD date and time.

Two algorithms, as the card says in its INITIALIZE answers (DESIGN.md "The e-purse protocol"). ``suite(algorithm)``
returns the :class:`CryptoSuite` for an algorithm id; every suite has the same methods with the same arguments, and
the data each MAC covers is the same for both (written once, in :class:`CryptoSuite`). Only the cipher, the block
size, the diversification, the session-key block and the TAC key differ. The module-level functions
(``diversify``, ``purchase_mac1``, ... ``load_tac``, ``block_mac``) are ``suite(0)``'s, the 3DES suite's, bound.

The same :class:`epurse.keys.IssuerKeys` 16-byte master keys serve both algorithms: a 16-byte key is a two-key 3DES
key and an SM4 key alike, and the diversification makes different card keys from it for each algorithm.

3DES, algorithm id ``00`` (8-byte blocks):

- ``des3_encrypt``: two-key 3DES (K1 K2 K1, EDE) in ECB mode on one 8-byte block.
- ``diversify``: card key (16 bytes) = 3DES(master, D) || 3DES(master, NOT D), D = the last 8 bytes of the ASN
  (which is the 8-byte card number the terminal gives the PSAM).
- ``mac``: single-DES CBC-MAC (ISO 9797-1 algorithm 1) with an 8-byte key and a zero IV; the data is always padded with
  ``80`` and then ``00`` bytes up to a multiple of 8 (ISO 9797-1 padding method 2, so 8 data bytes become 16); the MAC
  is the first 4 bytes of the last cipher block.
- Session keys are 8 bytes: SESPK = 3DES(DPK, random(4) || TTC(2) || low 2 bytes of the terminal sequence),
  SESLK = 3DES(DLK, random(4) || online TTC(2) || ``8000``).
- TAC key (8 bytes) = DTK left half XOR DTK right half.
- Block MAC: ISO 9797-1 MAC algorithm 3 ("retail MAC") with the full 16-byte DAMK = K1 || K2: single-DES CBC with K1
  over the padded data, the IV being challenge(4) || ``00000000``; then the last block is decrypted with K2 and
  encrypted with K1 again; the MAC is the first 4 bytes of that block.

SM4, algorithm id ``04`` (16-byte blocks, GB/T 32907, 16-byte keys):

- card key (16 bytes) = SM4(master, D || NOT D), one block, D = the last 8 bytes of the ASN as above.
- ``mac``: SM4 CBC-MAC with a 16-byte key, zero IV, over the data padded with ``80`` then ``00`` bytes to a multiple
  of 16 (always at least one byte, so 16 data bytes become 32); the MAC is the first 4 bytes of the last block.
- Session keys are 16 bytes: SM4(card key, the same 8 bytes as for 3DES || ``80 00 00 00 00 00 00 00``), i.e.
  SESPK = SM4(DPK, random(4) || TTC(2) || seq low 2 || ``80`` || ``00`` x 7) and
  SESLK = SM4(DLK, random(4) || online TTC(2) || ``8000`` || ``80`` || ``00`` x 7).
- TAC key = DTK itself (SM4 takes the 16-byte key as it is; the 3DES left-XOR-right only exists to make a
  single-DES key).
- Block MAC: SM4 CBC-MAC with DAMK, IV = challenge(4) || ``00`` x 12, over the padded data; first 4 bytes.

What each MAC covers (both algorithms; ``mac`` is the suite's MAC):

- Purchase: MAC1 = mac(SESPK, amount(4) || type(1) || terminal(6) || date(4) || time(3)); MAC2 = mac(SESPK, amount(4));
  TAC = mac(TAC key, amount(4) || type(1) || terminal(6) || terminal sequence(4) || date(4) || time(3)).
- Load: MAC1 = mac(SESLK, old balance(4) || amount(4) || ``02`` || terminal(6));
  MAC2 = mac(SESLK, amount(4) || ``02`` || terminal(6) || date(4) || time(3));
  TAC = mac(TAC key, new balance(4) || online TTC before the load(2) || amount(4) || ``02`` || terminal(6) ||
  date(4) || time(3)).
- APPLICATION BLOCK (PBOC secure messaging, issuer command with a MAC and no other data): the MAC input is the
  command header with the MAC's length as Lc, ``84 1E 00 00 04``, padded as the suite pads (3DES:
  ``84 1E 00 00 04 80 00 00``; SM4: ``84 1E 00 00 04 80`` + ``00`` x 10), chained from IV = the card's last
  GET CHALLENGE answer (4 bytes) followed by zeros to the block size, with the card's maintenance key DAMK =
  diversify(maintenance master, ASN). No session key: the challenge makes each MAC single-use.

Numbers are unsigned big-endian: amounts and balances 4 bytes (fen), TTC 2 bytes, terminal sequence 4 bytes.
A wrong length or an out-of-range number raises ``ValueError``; so does ``suite()`` for an unknown algorithm id.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import date, datetime, time

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TX_LOAD = 0x02  # the transaction type a load's MACs and TAC cover (same value as epurse.apdu.TX_LOAD)
ALG_3DES = 0x00  # same values as epurse.apdu.ALG_3DES / ALG_SM4 (apdu imports crypto, not the other way round)
ALG_SM4 = 0x04
BLOCK_HEADER = bytes.fromhex("841E000004")  # APPLICATION BLOCK with its 4-byte MAC: what the block MAC covers


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


def _card_d(asn10: bytes) -> bytes:
    """D, the diversification input: the last 8 bytes of a 10-byte ASN, or the 8-byte card number itself."""
    if not isinstance(asn10, (bytes, bytearray)) or len(asn10) not in (8, 10):
        raise ValueError(f"ASN must be 10 bytes (or the 8-byte card number), got {_describe(asn10)}")
    return bytes(asn10[-8:])


def _not(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _pad(data: bytes, block: int) -> bytes:
    data = bytes(data) + b"\x80"
    return data + b"\x00" * (-len(data) % block)


def pad(data: bytes) -> bytes:
    """ISO 9797-1 padding method 2: append ``80``, then ``00`` bytes up to a multiple of 8 (always at least one byte)."""
    return _pad(data, 8)


def _single_des_cbc(key8: bytes, iv8: bytes, data: bytes) -> bytes:
    # Single DES is 3DES with K|K|K.
    encryptor = Cipher(TripleDES(key8 * 3), modes.CBC(iv8)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def mac(key8: bytes, data: bytes) -> bytes:
    """Single-DES CBC-MAC, zero IV, over ``pad(data)``; returns the first 4 bytes of the last block."""
    key8 = _need("MAC key", key8, 8)
    return _single_des_cbc(key8, bytes(8), pad(data))[-8:-4]


def tac_key(dtk16: bytes) -> bytes:
    """The 8-byte 3DES TAC key: the left half of the card's TAC key DTK XOR its right half."""
    dtk16 = _need("DTK", dtk16, 16)
    return _xor(dtk16[:8], dtk16[8:])


def retail_mac(key16: bytes, iv8: bytes, data: bytes) -> bytes:
    """ISO 9797-1 MAC algorithm 3 over ``pad(data)`` with the 16-byte key K1 || K2 and the IV ``iv8``:
    single-DES CBC with K1, then the last block decrypted with K2 and encrypted with K1; first 4 bytes."""
    key16 = _need("3DES key", key16, 16)
    k1, k2 = key16[:8], key16[8:]
    last = _single_des_cbc(k1, _need("IV", iv8, 8), pad(data))[-8:]
    decryptor = Cipher(TripleDES(k2 * 3), modes.ECB()).decryptor()
    last = decryptor.update(last) + decryptor.finalize()
    return _ecb(k1 * 3, last)[:4]


def sm4_encrypt(key16: bytes, block16: bytes) -> bytes:
    """Encrypt one 16-byte block with SM4 (GB/T 32907), ECB."""
    encryptor = Cipher(algorithms.SM4(_need("SM4 key", key16, 16)), modes.ECB()).encryptor()
    return encryptor.update(_need("block", block16, 16)) + encryptor.finalize()


def sm4_cbc_mac(key16: bytes, iv16: bytes, data: bytes) -> bytes:
    """SM4 CBC over ``data`` padded ``80 00..`` to a multiple of 16, from ``iv16``; the first 4 bytes of the last
    block."""
    key16 = _need("SM4 key", key16, 16)
    encryptor = Cipher(algorithms.SM4(key16), modes.CBC(_need("IV", iv16, 16))).encryptor()
    out = encryptor.update(_pad(data, 16)) + encryptor.finalize()
    return out[-16:-12]


class PreparedMac:
    """One MAC key made ready once, for many MACs with it: the suite's CBC-MAC (zero IV, data padded ``80 00..`` to
    the block size, the first 4 bytes of the last block), chained block by block through an ECB encryptor that is
    built here and never finalized. Building a cipher costs more than a TAC's three blocks, and the back office checks
    a rider's purchase TACs day after day with the same card key (its key service keeps one of these per card).
    Get one with ``CryptoSuite.prepared_mac(key)`` or ``CryptoSuite.tac_mac(dtk)``; it never shows its key."""

    __slots__ = ("_block", "_encrypt")

    def __init__(self, cipher, block_size: int):
        self._encrypt = Cipher(cipher, modes.ECB()).encryptor().update
        self._block = block_size

    def __repr__(self) -> str:
        return f"<PreparedMac {self._block * 8}-bit blocks: key hidden>"

    def __reduce__(self):
        raise TypeError("a prepared MAC key is not picklable: it stays in the process that holds the key")

    def __call__(self, data: bytes) -> bytes:
        size, encrypt = self._block, self._encrypt
        data = _pad(data, size)
        chain = 0
        for i in range(0, len(data), size):
            chain = int.from_bytes(encrypt((chain ^ int.from_bytes(data[i:i + size], "big")).to_bytes(size, "big")),
                                   "big")
        return chain.to_bytes(size, "big")[:4]


# --- the suites ---------------------------------------------------------------------------------------------


class CryptoSuite(ABC):
    """One algorithm's e-purse cryptography. Get one with :func:`suite`; the layouts are in the module docstring.

    Subclasses give the cipher (``encrypt_block``), ``mac``, ``tac_key``, ``diversify``, ``session`` and
    ``block_mac``; the data each purchase and load MAC covers is defined once here, for both algorithms.
    Key-argument names are today's 3DES ones (``sespk8`` ...) so that both suites keep one signature; for SM4
    every key is 16 bytes.
    """

    algorithm: int
    name: str
    block_size: int

    def __repr__(self) -> str:
        return f"<CryptoSuite {self.name} (algorithm {self.algorithm:02X})>"

    # --- what differs ---------------------------------------------------------------------------------------

    @abstractmethod
    def encrypt_block(self, key16: bytes, block: bytes) -> bytes:
        ...

    @abstractmethod
    def mac(self, key: bytes, data: bytes) -> bytes:
        ...

    @abstractmethod
    def tac_key(self, dtk16: bytes) -> bytes:
        ...

    @abstractmethod
    def prepared_mac(self, key: bytes) -> PreparedMac:
        """``mac`` with ``key``, made ready for many calls (:class:`PreparedMac`)."""
        ...

    def tac_mac(self, dtk16: bytes) -> PreparedMac:
        """A card's TAC key (from its DTK), ready to compute many of its TACs (:meth:`purchase_tac_with`)."""
        return self.prepared_mac(self.tac_key(dtk16))

    @abstractmethod
    def diversify(self, master16: bytes, asn10: bytes) -> bytes:
        ...

    @abstractmethod
    def session(self, card_key16: bytes, input8: bytes) -> bytes:
        """The session key from a card key and the 8-byte session input (random || counter || 2 bytes)."""
        ...

    @abstractmethod
    def block_mac(self, damk: bytes, challenge4: bytes) -> bytes:
        """The APPLICATION BLOCK MAC with the card's maintenance key DAMK and the card's 4-byte challenge."""
        ...

    # --- purchase -------------------------------------------------------------------------------------------

    def purchase_session_key(self, dpk16: bytes, card_random4: bytes, ttc: int, terminal_seq: int) -> bytes:
        """SESPK from DPK and card random(4) || TTC(2) || low 2 bytes of the terminal sequence."""
        block = (
            _need("card random", card_random4, 4)
            + _u("TTC", ttc, 2)
            + _u("terminal sequence", terminal_seq, 4)[2:]
        )
        return self.session(dpk16, block)

    def purchase_mac1(
        self, sespk8: bytes, amount: int, tx_type: int, terminal_id6: bytes, date4: bytes, time3: bytes
    ) -> bytes:
        """MAC1 = mac(SESPK, amount(4) || type(1) || terminal(6) || date(4) || time(3)); the PSAM makes it."""
        data = (
            _u("amount", amount, 4)
            + _u("transaction type", tx_type, 1)
            + _need("terminal number", terminal_id6, 6)
            + _need("date", date4, 4)
            + _need("time", time3, 3)
        )
        return self.mac(sespk8, data)

    def purchase_mac2(self, sespk8: bytes, amount: int) -> bytes:
        """MAC2 = mac(SESPK, amount(4)); the card makes it, the PSAM checks."""
        return self.mac(sespk8, _u("amount", amount, 4))

    def purchase_tac(
        self,
        dtk16: bytes,
        amount: int,
        tx_type: int,
        terminal_id6: bytes,
        terminal_seq: int,
        date4: bytes,
        time3: bytes,
    ) -> bytes:
        """TAC = mac(tac_key(DTK), amount(4) || type(1) || terminal(6) || terminal sequence(4) || date(4) ||
        time(3))."""
        return self.purchase_tac_with(self.tac_mac(dtk16), amount, tx_type, terminal_id6, terminal_seq, date4, time3)

    def purchase_tac_with(
        self,
        tac_mac: PreparedMac,
        amount: int,
        tx_type: int,
        terminal_id6: bytes,
        terminal_seq: int,
        date4: bytes,
        time3: bytes,
    ) -> bytes:
        """The purchase TAC (the one implementation: :meth:`purchase_tac` is this with a key made for one use) with
        a card's TAC key made ready by :meth:`tac_mac`, for a back office checking many of one card's TACs."""
        data = (
            _u("amount", amount, 4)
            + _u("transaction type", tx_type, 1)
            + _need("terminal number", terminal_id6, 6)
            + _u("terminal sequence", terminal_seq, 4)
            + _need("date", date4, 4)
            + _need("time", time3, 3)
        )
        return tac_mac(data)

    # --- load (computed by the host, never by a terminal) ---------------------------------------------------

    def load_session_key(self, dlk16: bytes, random4: bytes, online_ttc: int) -> bytes:
        """SESLK from DLK and card random(4) || online TTC(2) || ``8000``."""
        return self.session(
            dlk16, _need("card random", random4, 4) + _u("online TTC", online_ttc, 2) + b"\x80\x00"
        )

    def load_mac1(self, sesk8: bytes, balance: int, amount: int, terminal_id6: bytes) -> bytes:
        """Load MAC1 = mac(SESLK, old balance(4) || amount(4) || ``02`` || terminal(6)); the card makes it."""
        data = (
            _u("balance", balance, 4)
            + _u("amount", amount, 4)
            + bytes([TX_LOAD])
            + _need("terminal number", terminal_id6, 6)
        )
        return self.mac(sesk8, data)

    def load_mac2(self, sesk8: bytes, amount: int, terminal_id6: bytes, date4: bytes, time3: bytes) -> bytes:
        """Load MAC2 = mac(SESLK, amount(4) || ``02`` || terminal(6) || date(4) || time(3)); the host makes it."""
        data = (
            _u("amount", amount, 4)
            + bytes([TX_LOAD])
            + _need("terminal number", terminal_id6, 6)
            + _need("date", date4, 4)
            + _need("time", time3, 3)
        )
        return self.mac(sesk8, data)

    def load_tac(
        self,
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
        return self.mac(self.tac_key(dtk16), data)


class _Des3(CryptoSuite):
    algorithm, name, block_size = ALG_3DES, "3DES", 8

    def encrypt_block(self, key16: bytes, block: bytes) -> bytes:
        return des3_encrypt(key16, block)

    def mac(self, key: bytes, data: bytes) -> bytes:
        return mac(key, data)

    def tac_key(self, dtk16: bytes) -> bytes:
        return tac_key(dtk16)

    def prepared_mac(self, key: bytes) -> PreparedMac:
        return PreparedMac(TripleDES(_need("MAC key", key, 8) * 3), 8)  # single DES is 3DES with K|K|K

    def diversify(self, master16: bytes, asn10: bytes) -> bytes:
        """Card key = 3DES(master, D) || 3DES(master, NOT D), D = the last 8 bytes of ``asn10``.

        ``asn10`` may be the 10-byte ASN or already the 8-byte card number (then D is the card number itself), so
        the card (which knows its ASN) and the PSAM (which is given the card number) call the same function.
        """
        d = _card_d(asn10)
        return des3_encrypt(master16, d) + des3_encrypt(master16, _not(d))

    def session(self, card_key16: bytes, input8: bytes) -> bytes:
        return des3_encrypt(card_key16, input8)

    def block_mac(self, damk: bytes, challenge4: bytes) -> bytes:
        """Retail MAC (ISO 9797-1 alg. 3) with the 16-byte DAMK over ``84 1E 00 00 04 80 00 00``,
        IV = challenge(4) || ``00000000``."""
        return retail_mac(damk, _need("challenge", challenge4, 4) + bytes(4), BLOCK_HEADER)


class _Sm4(CryptoSuite):
    algorithm, name, block_size = ALG_SM4, "SM4", 16

    def encrypt_block(self, key16: bytes, block: bytes) -> bytes:
        return sm4_encrypt(key16, block)

    def mac(self, key: bytes, data: bytes) -> bytes:
        """SM4 CBC-MAC, 16-byte key, zero IV, data padded ``80 00..`` to a multiple of 16; first 4 bytes."""
        return sm4_cbc_mac(key, bytes(16), data)

    def tac_key(self, dtk16: bytes) -> bytes:
        """For SM4 the TAC key is DTK itself."""
        return _need("DTK", dtk16, 16)

    def prepared_mac(self, key: bytes) -> PreparedMac:
        return PreparedMac(algorithms.SM4(_need("SM4 key", key, 16)), 16)

    def diversify(self, master16: bytes, asn10: bytes) -> bytes:
        """Card key = SM4(master, D || NOT D), D = the last 8 bytes of ``asn10`` (or the 8-byte card number)."""
        d = _card_d(asn10)
        return sm4_encrypt(master16, d + _not(d))

    def session(self, card_key16: bytes, input8: bytes) -> bytes:
        """Session key = SM4(card key, input(8) || ``80 00 00 00 00 00 00 00``), 16 bytes."""
        return sm4_encrypt(card_key16, _pad(_need("session input", input8, 8), 16))

    def block_mac(self, damk: bytes, challenge4: bytes) -> bytes:
        """SM4 CBC-MAC with DAMK over ``84 1E 00 00 04 80`` + ``00`` x 10, IV = challenge(4) || ``00`` x 12."""
        return sm4_cbc_mac(damk, _need("challenge", challenge4, 4) + bytes(12), BLOCK_HEADER)


_SUITES: dict[int, CryptoSuite] = {ALG_3DES: _Des3(), ALG_SM4: _Sm4()}


def suite(algorithm: int) -> CryptoSuite:
    """The CryptoSuite for an algorithm id: ``00`` 3DES, ``04`` SM4; ValueError for any other id."""
    try:
        return _SUITES[algorithm]
    except (KeyError, TypeError):
        raise ValueError(f"unknown e-purse algorithm {algorithm!r} (known: 00 = 3DES, 04 = SM4)") from None


# The module-level functions are the 3DES suite's, so the back office, bench and older callers keep working and
# can never drift from suite(0).
_DES3 = _SUITES[ALG_3DES]
diversify = _DES3.diversify
purchase_session_key = _DES3.purchase_session_key
purchase_mac1 = _DES3.purchase_mac1
purchase_mac2 = _DES3.purchase_mac2
purchase_tac = _DES3.purchase_tac
load_session_key = _DES3.load_session_key
load_mac1 = _DES3.load_mac1
load_mac2 = _DES3.load_mac2
load_tac = _DES3.load_tac
block_mac = _DES3.block_mac


# --- BCD dates and times --------------------------------------------------------------------------------------


def _digits(b: bytes, what: str) -> str:
    text = bytes(b).hex()
    if not text.isdigit():
        raise ValueError(f"{what} {text.upper()} is not BCD (every nibble must be 0-9)")
    return text


_BCD_BYTE = [(i // 10) << 4 | i % 10 for i in range(100)]  # 0..99 -> one BCD byte (ingest calls these per tap)


def bcd_date(dt: date | datetime) -> bytes:
    """The date as 4 bytes BCD ``YYYYMMDD`` (2024-03-05 -> ``20 24 03 05``)."""
    year = dt.year
    return bytes((_BCD_BYTE[year // 100], _BCD_BYTE[year % 100], _BCD_BYTE[dt.month], _BCD_BYTE[dt.day]))


def bcd_time(dt: datetime | time) -> bytes:
    """The time of day as 3 bytes BCD ``HHMMSS`` (07:08:09 -> ``07 08 09``)."""
    return bytes((_BCD_BYTE[dt.hour], _BCD_BYTE[dt.minute], _BCD_BYTE[dt.second]))


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

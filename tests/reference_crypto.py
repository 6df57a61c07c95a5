"""The tests' own reference implementation of the e-purse crypto, to check epurse (and what uses it) against.

Why it exists: a test that computes its expected MAC or TAC with ``epurse.crypto`` checks the code under test
against itself and passes whatever that code does. These functions are written independently from DESIGN.md
("The e-purse protocol") on pycryptodome's single DES only: 3DES EDE, the ISO 9797-1 padding and the CBC chain
are done by hand here. It shares no code with epurse and imports nothing from farebox's packages; every key is
a parameter (tests pass the published test keys, ``epurse.keys.TEST_ISSUER_KEYS``, themselves).

Importable from any test as ``from reference_crypto import ...``: tests/conftest.py sits in a folder without
``__init__.py``, so pytest's default (prepend) import mode puts tests/ on ``sys.path``.
"""

from __future__ import annotations

from datetime import datetime

from Crypto.Cipher import DES


def be(n: int, size: int) -> bytes:
    """``n`` as ``size`` big-endian bytes (amounts, counters, sequences)."""
    return n.to_bytes(size, "big")


def ref_3des(key16: bytes, block8: bytes) -> bytes:
    """Two-key 3DES (EDE) of one 8-byte block, by hand with single DES: E(k1) D(k2) E(k1)."""
    k1, k2 = key16[:8], key16[8:]
    step = DES.new(k1, DES.MODE_ECB).encrypt(block8)
    step = DES.new(k2, DES.MODE_ECB).decrypt(step)
    return DES.new(k1, DES.MODE_ECB).encrypt(step)


def ref_mac(key8: bytes, data: bytes) -> bytes:
    """ISO 9797-1 algorithm 1, padding 2 (``80`` then ``00``s to a multiple of 8), zero IV, single-DES CBC
    chain written out here; the MAC is the first 4 bytes of the last block."""
    padded = data + b"\x80" + b"\x00" * ((-len(data) - 1) % 8)
    des, chain = DES.new(key8, DES.MODE_ECB), bytes(8)
    for i in range(0, len(padded), 8):
        chain = des.encrypt(bytes(a ^ b for a, b in zip(chain, padded[i : i + 8], strict=True)))
    return chain[:4]


def ref_card_key(master16: bytes, asn: bytes) -> bytes:
    """Diversified 16-byte card key: 3DES(master, D) || 3DES(master, NOT D), D = last 8 bytes of the ASN."""
    d = asn[-8:]
    return ref_3des(master16, d) + ref_3des(master16, bytes(b ^ 0xFF for b in d))


def ref_tac_key(dtk16: bytes) -> bytes:
    """The 8-byte TAC key: left half XOR right half of the card's 16-byte TAC key DTK."""
    return bytes(a ^ b for a, b in zip(dtk16[:8], dtk16[8:], strict=True))


def ref_purchase_tac(
    master_tac16: bytes,
    asn: bytes,
    amount: int,
    terminal6: bytes,
    terminal_seq: int,
    when: datetime,
    tx_type: int = 0x06,
) -> bytes:
    """The 4-byte purchase TAC from the TAC master key: MAC with ref_tac_key(DTK) over amount(4) || type(1) ||
    terminal(6) || terminal sequence(4) || date(4, BCD YYYYMMDD) || time(3, BCD HHMMSS)."""
    data = (
        be(amount, 4)
        + bytes([tx_type])
        + terminal6
        + be(terminal_seq, 4)
        + bytes.fromhex(when.strftime("%Y%m%d"))
        + bytes.fromhex(when.strftime("%H%M%S"))
    )
    return ref_mac(ref_tac_key(ref_card_key(master_tac16, asn)), data)

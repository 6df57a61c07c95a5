"""The tests' own reference implementation of the e-purse crypto, to check epurse (and what uses it) against.

SM4 here is the openssl command line's (``openssl enc -sm4-ecb`` / ``-sm4-cbc``), called as a subprocess: the
system's OpenSSL, a different build from the one the ``cryptography`` wheel bundles, with the diversification,
padding, CBC-MAC truncation and every data layout written here by hand. Both are OpenSSL code underneath, so the
tests also check the cipher itself against the published GB/T 32907 example, which depends on no OpenSSL.

Why it exists: a test that computes its expected MAC or TAC with ``epurse.crypto`` checks the code under test
against itself and passes whatever that code does. These functions are written independently from DESIGN.md
("The e-purse protocol") on pycryptodome's single DES only: 3DES EDE, the ISO 9797-1 padding and the CBC chain
are done by hand here. It shares no code with epurse and imports nothing from farebox's packages; every key is
a parameter (tests pass the published test keys, ``epurse.keys.TEST_ISSUER_KEYS``, themselves).

Importable from any test as ``from reference_crypto import ...``: tests/conftest.py sits in a folder without
``__init__.py``, so pytest's default (prepend) import mode puts tests/ on ``sys.path``.
"""

from __future__ import annotations

import subprocess
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


def ref_retail_mac(key16: bytes, iv8: bytes, data: bytes) -> bytes:
    """ISO 9797-1 MAC algorithm 3 ("retail MAC"), padding 2, written out on single DES: CBC with K1 from ``iv8``
    over every block, then the last block decrypted with K2 and encrypted with K1; the first 4 bytes."""
    k1, k2 = DES.new(key16[:8], DES.MODE_ECB), DES.new(key16[8:], DES.MODE_ECB)
    padded = data + b"\x80" + b"\x00" * ((-len(data) - 1) % 8)
    chain = iv8
    for i in range(0, len(padded), 8):
        chain = k1.encrypt(bytes(a ^ b for a, b in zip(chain, padded[i : i + 8], strict=True)))
    return k1.encrypt(k2.decrypt(chain))[:4]


# --- SM4, through the openssl command line (a second, unrelated SM4 implementation) ----------------------------


class OpensslUnavailable(Exception):
    """No openssl command, or one without SM4: tests using the SM4 reference skip."""


def openssl_sm4(mode: str, key16: bytes, data: bytes, iv16: bytes | None = None) -> bytes:
    """``openssl enc -sm4-<mode> -nopad`` (mode ``ecb`` or ``cbc``) over ``data``, a multiple of 16 bytes."""
    command = ["openssl", "enc", f"-sm4-{mode}", "-K", key16.hex(), "-nopad"]
    if iv16 is not None:
        command += ["-iv", iv16.hex()]
    try:
        run = subprocess.run(command, input=data, capture_output=True, check=False)
    except FileNotFoundError:
        raise OpensslUnavailable("no openssl command") from None
    if run.returncode != 0:
        raise OpensslUnavailable(f"openssl cannot do SM4 here: {run.stderr.decode(errors='replace')[:200]}")
    return run.stdout


def ref_sm4_pad(data: bytes) -> bytes:
    """``80`` then ``00``s up to a multiple of 16 (always at least one byte)."""
    return data + b"\x80" + b"\x00" * ((-len(data) - 1) % 16)


def ref_sm4_mac(key16: bytes, data: bytes, iv16: bytes = bytes(16)) -> bytes:
    """SM4 CBC-MAC: openssl SM4-CBC over the padded data from ``iv16``; the first 4 bytes of the last block."""
    return openssl_sm4("cbc", key16, ref_sm4_pad(data), iv16)[-16:-12]


def ref_sm4_card_key(master16: bytes, asn: bytes) -> bytes:
    """SM4 card key: SM4(master, D || NOT D), D = last 8 bytes of the ASN."""
    d = asn[-8:]
    return openssl_sm4("ecb", master16, d + bytes(b ^ 0xFF for b in d))


def ref_sm4_session(card_key16: bytes, input8: bytes) -> bytes:
    """SM4 session key: SM4(card key, the 8-byte session input || 80 00 00 00 00 00 00 00)."""
    return openssl_sm4("ecb", card_key16, input8 + b"\x80" + bytes(7))

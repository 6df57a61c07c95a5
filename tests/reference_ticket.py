"""The tests' own reference for the ticket token and pickup code (wire/ticket.py), written from PREAMBLE11 / the
module docstring's byte layout with ``struct`` and pycryptodome's Ed25519 (its own curve code, not OpenSSL's as the
``cryptography`` wheel uses). Shares no code with wire; imported by tests as ``from reference_ticket import ...``.

pycryptodome itself is pinned to RFC 8032 section 7.1 test 1 in tests/unit/test_ticket_token.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

from Crypto.Signature import eddsa

CONTEXT = b"farebox-ticket-v1"


def ref_keypair(seed: bytes) -> tuple[object, bytes]:
    """pycryptodome's key for a 32-byte seed and its raw 32-byte public key."""
    key = eddsa.import_private_key(seed)
    return key, key.public_key().export_key(format="raw")


def ref_body(*, key_id, ticket_id, operator, product, routes, valid_from, valid_to, uses, category) -> bytes:
    out = struct.pack(">BBQ", 1, key_id, ticket_id)
    op = operator.encode()
    out += struct.pack(">B", len(op)) + op + struct.pack(">BB", product, len(routes))
    for r in routes:
        rb = r.encode()
        out += struct.pack(">B", len(rb)) + rb
    return out + struct.pack(">IIBB", valid_from, valid_to, uses, category)


def ref_sign(body: bytes, seed: bytes) -> bytes:
    key, _ = ref_keypair(seed)
    return eddsa.new(key, "rfc8032").sign(CONTEXT + body)


def ref_verify(body: bytes, signature: bytes, public_raw: bytes) -> bool:
    pub = eddsa.import_public_key(public_raw)
    try:
        eddsa.new(pub, "rfc8032").verify(CONTEXT + body, signature)
        return True
    except ValueError:
        return False


def ref_text(body: bytes, signature: bytes) -> str:
    return "FT1." + base64.b32encode(body + signature).decode().rstrip("=")


def ref_untext(text: str) -> tuple[bytes, bytes]:
    data = text[4:]
    raw = base64.b32decode(data + "=" * (-len(data) % 8))
    return raw[:-64], raw[-64:]


def ref_pickup_code(ticket_id: int, key: bytes) -> str:
    """RFC 4226 dynamic truncation of HMAC-SHA256(key, serial) written out by hand."""
    serial = "%010d" % (ticket_id % 10_000_000_000)
    mac = hmac.new(key, serial.encode(), hashlib.sha256).digest()
    o = mac[31] & 15
    value = ((mac[o] & 0x7F) << 24) | (mac[o + 1] << 16) | (mac[o + 2] << 8) | mac[o + 3]
    return serial + "%06d" % (value % 1_000_000)


__all__ = ["ref_body", "ref_keypair", "ref_pickup_code", "ref_sign", "ref_text", "ref_untext", "ref_verify"]

"""Signed packages from the back office to validators: deny lists, parameters, software (Ed25519).

A bus must apply only what the back office made, even if the broker, the network or a stolen device's credentials
are not to be trusted, so every downlink package carries its own signature; the validator holds only the public key.

Layout (big-endian), format 1::

    magic ``FBPK`` (4) | format ``1`` (1) | kind (1: 1 denylist, 2 params, 3 software) | flags (1: bit 0 = a
    base version is given) | 0 (1) | activation time (8, signed microseconds since 1970-01-01 UTC) |
    base version (4; 0 unless flag bit 0) | body length (8) | SHA-256 of the body (32) |
    version length (1) | version (ASCII) | target length (1) | target (ASCII)
    body (body length bytes)
    Ed25519 signature (64) over everything before it

- ``version``: 1-32 printable ASCII characters. A deny list's and a parameter package's version is a decimal
  number (``Package.number``); a software version is any string (``"2.4.1"``).
- ``target``: who the package is for, 1-40 printable ASCII characters: ``_fleet`` (the operator's whole fleet),
  ``route:<route>``, or a device id. The topic it travels on says the same; the signature makes it binding.
- ``base_version``: for a deny-list delta, the version it applies to (the delta body says it again); None for a full
  list and for other kinds.
- Bodies: deny list, a full list file (``blacklist.denylist``, magic ``FBDL``) or an encoded delta
  (``blacklist.delta.encode_delta``, magic ``FBDD``); params, UTF-8 JSON (``params_body`` / ``parse_params``:
  ``{"fares": FareTable.to_dict(), "route": "r1", "tickets": TicketParams.to_dict()}``, any key may be left out;
  ``tickets`` replaces the ticket keys in force whole); software, opaque bytes (a
  tarball), the package version being the software version.

``verify_package`` is strict: a short or long payload, an unknown magic, format or kind, a bad string, a body whose
SHA-256 is not the header's, or a signature that does not verify raise ``PackageError`` saying which. It checks the
form and the signature only: whether a package applies (its base version, its target, its time) is the receiver's
business.

Test key: ``TEST_SIGNING_SEED`` below is published on purpose, like the issuer test keys (``epurse.keys``), so demo
fleets and tests can sign and anyone can check a package with their own tools; its public key is
``TEST_PUBLIC_KEY``, hex ``8ed09dfa69cd813e8129b03e9a6690880c9c853d3714df3890d1fa8f870f4df3``. A deployment
signs with its own seed (``FAREBOX_SIGNING_KEY``) and installs only the public key on the buses.

Checking a package by hand with OpenSSL 3 (the signature is the last 64 bytes)::

    head -c -64 pkg.bin > signed.bin; tail -c 64 pkg.bin > sig.bin
    # a raw Ed25519 public key in a DER SubjectPublicKeyInfo is 302a300506032b6570032100 || the 32 key bytes
    (echo 302a300506032b6570032100; echo $PUBLIC_HEX) | xxd -r -p > pub.der
    openssl pkeyutl -verify -pubin -inkey pub.der -keyform DER -rawin -in signed.bin -sigfile sig.bin
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAGIC = b"FBPK"
FORMAT = 1
KINDS = ("denylist", "params", "software")
_KIND_CODE = {k: i + 1 for i, k in enumerate(KINDS)}
_FIXED = struct.Struct(">4sBBBxqIQ32s")  # up to and including the body's SHA-256
SIGNATURE_LEN = 64
MAX_VERSION_LEN = 32
MAX_TARGET_LEN = 40
MAX_BASE_VERSION = 0xFFFFFFFF
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FLAG_BASE = 0x01

# 32 bytes, published: signs demo and test packages only, never a real fleet's.
TEST_SIGNING_SEED = b"farebox test package signing key"


class PackageError(ValueError):
    """A package that is malformed, damaged or not signed by the key we trust; the message says which."""


@dataclass(frozen=True)
class Package:
    kind: str  # denylist | params | software
    version: str
    target: str
    activate_at: datetime  # UTC; a receiver applies the package at or after this time
    body: bytes
    base_version: int | None = None  # a deny-list delta's base version

    def __post_init__(self):
        if isinstance(self.version, int) and not isinstance(self.version, bool):
            object.__setattr__(self, "version", str(self.version))  # the back office may hand a number
        if self.kind not in _KIND_CODE:
            raise PackageError(f"unknown package kind {self.kind!r}; farebox knows {', '.join(KINDS)}")
        _check_text(self.version, "version", MAX_VERSION_LEN)
        _check_text(self.target, "target", MAX_TARGET_LEN)
        if self.kind in ("denylist", "params") and not self.version.isdigit():
            raise PackageError(f"a {self.kind} package's version is a decimal number, not {self.version!r}")
        if not isinstance(self.activate_at, datetime) or self.activate_at.tzinfo is None:
            raise PackageError(f"activate_at must be a timezone-aware datetime, not {self.activate_at!r}")
        if not isinstance(self.body, bytes | bytearray | memoryview):
            raise PackageError(f"a package body is bytes, not {type(self.body).__name__}")
        object.__setattr__(self, "body", bytes(self.body))
        if self.base_version is not None:
            if self.kind != "denylist":
                raise PackageError(f"a {self.kind} package has no base version")
            if not isinstance(self.base_version, int) or not 0 <= self.base_version <= MAX_BASE_VERSION:
                raise PackageError(f"base version must be 0..{MAX_BASE_VERSION}, not {self.base_version!r}")

    @property
    def number(self) -> int:
        """The version as a number (deny lists and parameter packages)."""
        if not self.version.isdigit():
            raise PackageError(f"{self.kind} version {self.version!r} is not a number")
        return int(self.version)

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.body).digest()

    def describe(self) -> str:
        base = f" from {self.base_version}" if self.base_version is not None else ""
        return f"{self.kind} {self.version}{base} for {self.target}"


def _check_text(value, what: str, most: int) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= most or not value.isascii() \
            or not value.isprintable() or value != value.strip():
        raise PackageError(f"package {what} must be 1-{most} printable ASCII characters without surrounding "
                           f"spaces, not {value!r}")


def _micros(at: datetime) -> int:
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _header(pkg: Package) -> bytes:
    flags = _FLAG_BASE if pkg.base_version is not None else 0
    fixed = _FIXED.pack(MAGIC, FORMAT, _KIND_CODE[pkg.kind], flags, _micros(pkg.activate_at),
                        pkg.base_version or 0, len(pkg.body), pkg.sha256)
    version, target = pkg.version.encode("ascii"), pkg.target.encode("ascii")
    return fixed + bytes([len(version)]) + version + bytes([len(target)]) + target


def _private(seed: bytes) -> Ed25519PrivateKey:
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise ValueError("an Ed25519 signing seed is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key(seed: bytes) -> bytes:
    """The 32-byte raw Ed25519 public key of ``seed``: what a validator is configured with."""
    return _private(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


TEST_PUBLIC_KEY = public_key(TEST_SIGNING_SEED)


def sign_package(pkg: Package, seed: bytes) -> bytes:
    """The package on the wire: header, body, and the Ed25519 signature over both."""
    signed = _header(pkg) + pkg.body
    return signed + _private(seed).sign(signed)


def _text(payload: bytes, pos: int, what: str, most: int) -> tuple[str, int]:
    if pos >= len(payload):
        raise PackageError(f"package truncated: it ends before its {what}")
    n = payload[pos]
    raw = payload[pos + 1:pos + 1 + n]
    if len(raw) != n:
        raise PackageError(f"package truncated: its {what} should be {n} bytes, {len(raw)} are there")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise PackageError(f"package {what} is not ASCII: {raw!r}") from None
    _check_text(text, what, most)
    return text, pos + 1 + n


def verify_package(payload: bytes, public_key: bytes) -> Package:
    """The package in ``payload`` if it is well formed, its body matches its hash and the signature verifies with
    ``public_key`` (32 raw bytes); ``PackageError`` saying why not otherwise."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PackageError(f"a package is bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if payload[:4] != MAGIC[:len(payload[:4])] or not payload:
        raise PackageError(f"not a farebox package: it starts {payload[:4]!r}, not {MAGIC!r}")
    if len(payload) < _FIXED.size:
        raise PackageError(f"package truncated: {len(payload)} bytes, the fixed header alone is {_FIXED.size}")
    _magic, fmt, kind_code, flags, micros, base, body_len, digest = _FIXED.unpack_from(payload)
    if fmt != FORMAT:
        raise PackageError(f"package format {fmt} is not one this validator reads (format {FORMAT})")
    if not 1 <= kind_code <= len(KINDS):
        raise PackageError(f"unknown package kind code {kind_code}; farebox knows 1-{len(KINDS)} "
                           f"({', '.join(KINDS)})")
    if flags & ~_FLAG_BASE:
        raise PackageError(f"package flags {flags:#04x} has unknown bits set")
    if payload[7] != 0:
        raise PackageError("package header's reserved byte is not zero")
    version, pos = _text(payload, _FIXED.size, "version", MAX_VERSION_LEN)
    target, pos = _text(payload, pos, "target", MAX_TARGET_LEN)
    expected = pos + body_len + SIGNATURE_LEN
    if len(payload) < expected:
        raise PackageError(f"package truncated: header, {body_len}-byte body and signature make {expected} bytes, "
                           f"{len(payload)} arrived")
    if len(payload) > expected:
        raise PackageError(f"package has {len(payload) - expected} trailing byte(s) after its signature")
    body = payload[pos:pos + body_len]
    if hashlib.sha256(body).digest() != digest:
        raise PackageError(f"package body's SHA-256 {hashlib.sha256(body).hexdigest()} is not the header's "
                           f"{digest.hex()}: the body was damaged or altered")
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise PackageError("the package-signing public key must be 32 raw bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(payload[-SIGNATURE_LEN:], payload[:-SIGNATURE_LEN])
    except InvalidSignature:
        raise PackageError("package signature does not verify with the configured signing key: refused") from None
    try:
        activate_at = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise PackageError(f"package activation time {micros} us after 1970 is out of range") from None
    return Package(KINDS[kind_code - 1], version, target, activate_at, body,
                   base if flags & _FLAG_BASE else None)


# -- parameter bodies --------------------------------------------------------------------------------------------

PARAMS_KEYS = ("fares", "route", "tickets")


def params_body(*, fares: dict | None = None, route: str | None = None, tickets: dict | None = None) -> bytes:
    """A params package body: ``fares`` as ``FareTable.to_dict()``, ``route`` the vehicle's route assignment,
    ``tickets`` as ``wire.ticket.TicketParams.to_dict()`` (ticket public keys, pickup key, denied ticket ids)."""
    doc: dict = {}
    if tickets is not None:
        doc["tickets"] = tickets
    if fares is not None:
        doc["fares"] = fares
    if route is not None:
        doc["route"] = route
    if not doc:
        raise PackageError("a params package carries a fare table, a route assignment and/or ticket keys")
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_params(body: bytes) -> dict:
    """A params body back as ``{"fares": dict, "route": str}`` (keys present only when sent); PackageError if
    it is not one."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"params body is not UTF-8 JSON: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise PackageError("params body must be a JSON object with 'fares', 'route' and/or 'tickets'")
    unknown = set(doc) - set(PARAMS_KEYS)
    if unknown:
        raise PackageError(f"params body has unknown key(s) {sorted(unknown)}; it may carry {PARAMS_KEYS}")
    if "fares" in doc and not isinstance(doc["fares"], dict):
        raise PackageError("params 'fares' must be an object (FareTable.to_dict())")
    if "route" in doc and (not isinstance(doc["route"], str) or not doc["route"]):
        raise PackageError("params 'route' must be a non-empty string")
    if "tickets" in doc:
        from wire.ticket import TicketParams

        try:
            TicketParams.from_dict(doc["tickets"])
        except ValueError as e:
            raise PackageError(str(e)) from None
    return doc

"""Cardless tickets on the air: the signed QR token and the 16-digit pickup code (issue 11).

Both the back office (which issues tickets) and the validator (which checks them offline) use this module, so it
imports nothing but the standard library and ``cryptography`` (DESIGN.md: the validator imports only epurse, wire,
blacklist).

QR token, byte by byte
----------------------
The body::

    u8     version                 1
    u8     key id                  which of the back office's ticket keys signed it (0..255)
    u64be  ticket id
    u8 + UTF-8   operator code     1..16 bytes
    u8     product kind            1 single ride, 2 day pass, 3 month pass, 4 coach trip
    u8     routes                  count; 0 = any route; then each route code as u8 length (1..255) + UTF-8
    u32be  valid from              Unix seconds UTC, inclusive
    u32be  valid to                Unix seconds UTC, exclusive (half-open: valid while from <= now < to)
    u8     uses                    0 = unlimited within validity
    u8     rider category          an epurse.cardtypes.CardType value

signed with Ed25519 over ``b"farebox-ticket-v1" + body`` (the prefix keeps a ticket signature from passing for any
other message the same key might ever sign). The QR text is ``"FT1." + base32(body + signature)``: RFC 4648 base32,
upper case, no padding, so a QR code stores it in alphanumeric mode. A token longer than :data:`MAX_TEXT`
characters is refused before anything is decoded (a scanner may hand over 2 kB of garbage).

Decoding order: length and alphabet (``garbage`` / ``too_long``), version, key id (``unknown_key``), then the
signature over everything (``bad_signature``), and only then the body's fields; so an altered ticket is always
``bad_signature``, whatever field was changed, and no field of an unsigned body is ever believed.

Pickup code
-----------
16 decimal digits: the 10-digit ticket serial (ticket id mod 10^10, zero-padded; the back office keeps it unique per
operator) followed by a 6-digit check. The check is HMAC-SHA256(operator's pickup key, the serial's 10 ASCII digits)
truncated to 6 decimal digits by RFC 4226's dynamic truncation (offset = low nibble of the last byte; 31 bits from
there, big-endian; mod 10^6). The check only says "the back office made this code": which ticket it is and whether it
was used is the back office's (and, on the bus, the local used table's) business.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import hmac
import re
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION = 1
PREFIX = "FT1."
SIGNING_CONTEXT = b"farebox-ticket-v1"
SIG_LEN = 64
MAX_TEXT = 512  # characters of QR text, prefix included
MAX_OPERATOR = 16  # bytes of UTF-8
MAX_ROUTE = 255  # bytes of UTF-8 in one route code (a length byte)
MAX_ROUTES = 255
PICKUP_SERIAL_DIGITS = 10
PICKUP_CHECK_DIGITS = 6
PICKUP_DIGITS = PICKUP_SERIAL_DIGITS + PICKUP_CHECK_DIGITS

# reason codes of TicketError: stable strings the validator maps to rider messages and the back office logs
GARBAGE = "garbage"  # not a farebox ticket at all (wrong prefix, alphabet, structure)
TOO_LONG = "too_long"
BAD_VERSION = "bad_version"
UNKNOWN_KEY = "unknown_key"  # signed with a key this device does not hold (or no key at all)
BAD_SIGNATURE = "bad_signature"  # forged or altered
BAD_PICKUP = "bad_pickup_code"  # 16 digits whose check does not match
MALFORMED_PICKUP = "malformed_pickup_code"  # not 16 digits

_B32 = re.compile(r"[A-Z2-7]+")


class ProductKind(enum.IntEnum):
    SINGLE_RIDE = 1
    DAY_PASS = 2
    MONTH_PASS = 3
    COACH_TRIP = 4


class TicketError(ValueError):
    """A ticket or pickup code that is not good; ``reason_code`` is one of this module's reason constants."""

    def __init__(self, reason_code: str, message: str):
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message


def _as_utc(value) -> datetime:
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    raise TypeError("valid_from / valid_to are aware datetimes or Unix seconds")


@dataclasses.dataclass(frozen=True, slots=True)
class Ticket:
    """What a token says. ``valid_from`` / ``valid_to`` are aware UTC datetimes (Unix seconds accepted on
    construction); validity is half-open: ``valid_from <= now < valid_to``."""

    ticket_id: int
    operator: str
    product: ProductKind
    valid_from: datetime
    valid_to: datetime
    routes: tuple[str, ...] = ()  # () = any route
    uses: int = 1  # 0 = unlimited within validity
    rider_category: int = 1  # epurse.cardtypes.CardType.ADULT
    key_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "valid_from", _as_utc(self.valid_from))
        object.__setattr__(self, "valid_to", _as_utc(self.valid_to))
        object.__setattr__(self, "routes", tuple(self.routes))
        object.__setattr__(self, "product", ProductKind(self.product))

    @property
    def serial(self) -> int:
        """The 10-digit serial its pickup code starts with."""
        return self.ticket_id % 10**PICKUP_SERIAL_DIGITS

    def valid_at(self, at: datetime) -> bool:
        return self.valid_from <= at < self.valid_to

    def covers_route(self, route: str) -> bool:
        return not self.routes or route in self.routes


# The name the API uses for what goes into encode_ticket.
TicketFields = Ticket


def _u8(value: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= 255:
        raise ValueError(f"{name} {value!r} is not 0..255")
    return value


def _text(out: bytearray, value: str, name: str, limit: int) -> None:
    raw = value.encode("utf-8")
    if not 1 <= len(raw) <= limit:
        raise ValueError(f"{name} {value!r} must be 1..{limit} bytes of UTF-8")
    out.append(len(raw))
    out += raw


def encode_body(t: Ticket) -> bytes:
    """The unsigned body of ``t`` (see the module docstring)."""
    if not isinstance(t.ticket_id, int) or not 0 <= t.ticket_id < 1 << 64:
        raise ValueError(f"ticket id {t.ticket_id!r} is not a 64-bit unsigned number")
    out = bytearray([VERSION, _u8(t.key_id, "key id")])
    out += t.ticket_id.to_bytes(8, "big")
    _text(out, t.operator, "operator", MAX_OPERATOR)
    out.append(int(t.product))
    if len(t.routes) > MAX_ROUTES:
        raise ValueError(f"{len(t.routes)} routes: at most {MAX_ROUTES}")
    out.append(len(t.routes))
    for route in t.routes:
        _text(out, route, "route", MAX_ROUTE)
    start, end = int(t.valid_from.timestamp()), int(t.valid_to.timestamp())
    for name, value in (("valid from", start), ("valid to", end)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{name} {value} does not fit 32-bit Unix seconds")
    if end <= start:
        raise ValueError("valid to must be after valid from")
    out += start.to_bytes(4, "big") + end.to_bytes(4, "big")
    out.append(_u8(t.uses, "uses"))
    out.append(_u8(t.rider_category, "rider category"))
    return bytes(out)


def _private(key) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (bytes, bytearray)) and len(key) == 32:
        return Ed25519PrivateKey.from_private_bytes(bytes(key))
    raise TypeError("a ticket private key is an Ed25519PrivateKey or its 32-byte seed")


def public_key_bytes(private_key) -> bytes:
    """The 32-byte raw public key for a private key (or its 32-byte seed): what validators receive."""
    from cryptography.hazmat.primitives import serialization

    return _private(private_key).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode_ticket(fields: Ticket, private_key) -> str:
    """The QR text of ``fields``, signed with ``private_key`` (an Ed25519PrivateKey or its 32-byte seed); the key id
    written is ``fields.key_id``."""
    body = encode_body(fields)
    signature = _private(private_key).sign(SIGNING_CONTEXT + body)
    text = PREFIX + base64.b32encode(body + signature).decode("ascii").rstrip("=")
    if len(text) > MAX_TEXT:
        raise ValueError(f"ticket token of {len(text)} characters: at most {MAX_TEXT} (too many routes?)")
    return text


def _raw(text) -> bytes:
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_TEXT + 8:
            raise TicketError(TOO_LONG, f"code of {len(text)} bytes is too long to be a ticket")
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise TicketError(GARBAGE, "not a ticket: the code is not plain text") from None
    if not isinstance(text, str):
        raise TicketError(GARBAGE, "not a ticket")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise TicketError(TOO_LONG, f"code of {len(text)} characters is too long to be a ticket (at most {MAX_TEXT})")
    if not text.startswith(PREFIX):
        raise TicketError(GARBAGE, "not a farebox ticket (it does not start with FT1.)")
    data = text[len(PREFIX):]
    if not _B32.fullmatch(data) or len(data) % 8 in (1, 3, 6):
        raise TicketError(GARBAGE, "not a farebox ticket (not base32 text)")
    try:
        raw = base64.b32decode(data + "=" * (-len(data) % 8))
    except (binascii.Error, ValueError):
        raise TicketError(GARBAGE, "not a farebox ticket (not base32 text)") from None
    if len(raw) < 2 + SIG_LEN:
        raise TicketError(GARBAGE, "not a farebox ticket (too short)")
    return raw


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise TicketError(GARBAGE, "ticket body is truncated")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def text(self, name: str, limit: int) -> str:
        n = self.u8()
        if not 1 <= n <= limit:
            raise TicketError(GARBAGE, f"ticket {name} of {n} bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise TicketError(GARBAGE, f"ticket {name} is not UTF-8") from None


def _parse_body(body: bytes) -> Ticket:
    cur = _Cursor(body)
    cur.take(2)  # version and key id: checked before the signature
    ticket_id = int.from_bytes(cur.take(8), "big")
    operator = cur.text("operator", MAX_OPERATOR)
    product = cur.u8()
    if product not in ProductKind._value2member_map_:
        raise TicketError(GARBAGE, f"ticket of unknown product kind {product}")
    routes = tuple(cur.text("route", MAX_ROUTE) for _ in range(cur.u8()))
    start = int.from_bytes(cur.take(4), "big")
    end = int.from_bytes(cur.take(4), "big")
    uses, category = cur.u8(), cur.u8()
    if cur.pos != len(body):
        raise TicketError(GARBAGE, f"ticket body has {len(body) - cur.pos} bytes too many")
    if end <= start:
        raise TicketError(GARBAGE, "ticket validity ends before it starts")
    return Ticket(ticket_id=ticket_id, operator=operator, product=ProductKind(product), valid_from=start,
                  valid_to=end, routes=routes, uses=uses, rider_category=category, key_id=body[1])


def decode_ticket(text, public_keys: dict[int, bytes]) -> Ticket:
    """The ticket in QR ``text`` (str, or the scanner's bytes), its signature checked with ``public_keys[key id]``
    (raw 32-byte Ed25519 public keys). Raises :class:`TicketError` for anything else; never another exception.
    Whether the ticket is valid *now*, on this route, for this operator, unused, is the caller's business."""
    raw = _raw(text)
    body, signature = raw[:-SIG_LEN], raw[-SIG_LEN:]
    if body[0] != VERSION:
        raise TicketError(BAD_VERSION, f"ticket format version {body[0]} is not known here (this reads {VERSION})")
    key = public_keys.get(body[1]) if public_keys else None
    if key is None:
        raise TicketError(UNKNOWN_KEY, f"ticket signed with key {body[1]}, which this device does not hold")
    try:
        pub = key if isinstance(key, Ed25519PublicKey) else Ed25519PublicKey.from_public_bytes(bytes(key))
        pub.verify(signature, SIGNING_CONTEXT + body)
    except InvalidSignature:
        raise TicketError(BAD_SIGNATURE, "ticket signature does not verify: forged or altered") from None
    except (ValueError, TypeError):
        raise TicketError(UNKNOWN_KEY, f"ticket key {body[1]} held here is not a 32-byte Ed25519 key") from None
    return _parse_body(body)


# ------------------------------------------------------------------------------------------ pickup code


def _check_digits(serial_text: str, pickup_key: bytes) -> str:
    mac = hmac.new(bytes(pickup_key), serial_text.encode("ascii"), hashlib.sha256).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return f"{value % 10**PICKUP_CHECK_DIGITS:0{PICKUP_CHECK_DIGITS}d}"


def pickup_code(ticket_id: int, pickup_key: bytes) -> str:
    """The 16-digit pickup code of ticket ``ticket_id`` under the operator's ``pickup_key``."""
    if not pickup_key:
        raise ValueError("a pickup key is needed")
    serial = f"{ticket_id % 10**PICKUP_SERIAL_DIGITS:0{PICKUP_SERIAL_DIGITS}d}"
    return serial + _check_digits(serial, pickup_key)


def check_pickup_code(code: str, pickup_key: bytes) -> int:
    """The ticket serial (ticket id mod 10^10) of a pickup ``code`` whose check digits match; raises
    :class:`TicketError` (``malformed_pickup_code`` / ``bad_pickup_code``) otherwise. Spaces and dashes a person
    may type between groups are ignored."""
    digits = re.sub(r"[\s-]", "", code) if isinstance(code, str) else ""
    if len(digits) != PICKUP_DIGITS or not digits.isascii() or not digits.isdigit():
        raise TicketError(MALFORMED_PICKUP, f"a pickup code is {PICKUP_DIGITS} digits")
    if not pickup_key:
        raise TicketError(UNKNOWN_KEY, "no pickup key on this device")
    serial, check = digits[:PICKUP_SERIAL_DIGITS], digits[PICKUP_SERIAL_DIGITS:]
    if not hmac.compare_digest(_check_digits(serial, pickup_key), check):
        raise TicketError(BAD_PICKUP, "pickup code check digits do not match: mistyped or made up")
    return int(serial)


# ------------------------------------------------------------------------------------ on the deny list
#
# A ticket refused on sight (a use flagged as fraud at ingest, a ticket refunded after issue) travels to the buses
# on the ordinary deny list (blacklist.denylist, its deltas and their publisher), which holds 10-byte keys: a
# ticket is listed under two keys with prefixes no card ASN has (ASNs are BCD digits, and 0xFE is not), one for
# its id (checked on a QR scan) and one for its pickup serial (checked on a pickup code, where the bus knows only
# the serial). The back office lists both: ``deny_keys(ticket_id)``.

DENY_PREFIX_TICKET = bytes.fromhex("fe71")
DENY_PREFIX_SERIAL = bytes.fromhex("fe72")


def deny_key(ticket_id: int) -> bytes:
    """The deny-list key of a ticket id (what a QR scan looks up)."""
    return DENY_PREFIX_TICKET + ticket_id.to_bytes(8, "big")


def serial_deny_key(serial: int) -> bytes:
    """The deny-list key of a pickup serial (ticket id mod 10^10; what a pickup code looks up)."""
    return DENY_PREFIX_SERIAL + (serial % 10**PICKUP_SERIAL_DIGITS).to_bytes(8, "big")


def deny_keys(ticket_id: int) -> tuple[bytes, bytes]:
    """Both keys the back office puts on the deny list to refuse a ticket on every bus, by QR and by pickup code."""
    return deny_key(ticket_id), serial_deny_key(ticket_id)


# ------------------------------------------------------------------------------------ in the parameters


@dataclasses.dataclass(frozen=True, slots=True)
class TicketParams:
    """What a validator needs to check tickets offline, delivered in its signed parameters package (params key
    ``tickets``): the back office's ticket public keys by key id, the operator's pickup key, and the ids of
    tickets refused on sight (fraud, refunded after issue). A pickup-code use is recorded by serial, so
    ``denied`` holds ticket ids; a denied id's serial (id mod 10^10) refuses its pickup code too."""

    public_keys: dict[int, bytes] = dataclasses.field(default_factory=dict)
    pickup_key: bytes = b""
    denied: frozenset[int] = frozenset()

    def is_denied(self, ticket_id: int) -> bool:
        return ticket_id in self.denied

    def serial_denied(self, serial: int) -> bool:
        return any(t % 10**PICKUP_SERIAL_DIGITS == serial for t in self.denied)

    def to_dict(self) -> dict:
        out: dict = {"keys": {str(k): v.hex() for k, v in sorted(self.public_keys.items())}}
        if self.pickup_key:
            out["pickup_key"] = self.pickup_key.hex()
        if self.denied:
            out["denied"] = sorted(self.denied)
        return out

    @classmethod
    def from_dict(cls, doc) -> TicketParams:
        """Strict: ValueError saying what is wrong (the params parser turns it into a PackageError)."""
        if not isinstance(doc, dict) or set(doc) - {"keys", "pickup_key", "denied"}:
            raise ValueError("params 'tickets' must be an object with 'keys', 'pickup_key' and/or 'denied'")
        keys = {}
        raw_keys = doc.get("keys", {})
        if not isinstance(raw_keys, dict):
            raise ValueError("params 'tickets.keys' must map key ids to 64 hex digits")
        for k, v in raw_keys.items():
            if not (isinstance(k, str) and k.isdigit() and 0 <= int(k) <= 255):
                raise ValueError(f"ticket key id {k!r} is not 0..255")
            try:
                key = bytes.fromhex(v) if isinstance(v, str) else b""
            except ValueError:
                key = b""
            if len(key) != 32:
                raise ValueError(f"ticket key {k} must be 64 hex digits (a raw Ed25519 public key)")
            keys[int(k)] = key
        pickup = doc.get("pickup_key", "")
        try:
            pickup_key = bytes.fromhex(pickup) if isinstance(pickup, str) else None
        except ValueError:
            pickup_key = None
        if pickup_key is None or (pickup_key and not 16 <= len(pickup_key) <= 64):
            raise ValueError("params 'tickets.pickup_key' must be 32 to 128 hex digits")
        denied = doc.get("denied", [])
        if not isinstance(denied, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 64 for t in denied):
            raise ValueError("params 'tickets.denied' must be a list of ticket ids (0..2^64-1)")
        return cls(keys, pickup_key, frozenset(denied))

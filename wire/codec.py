"""Tap batches and acknowledgements on the air: format v2 (compact binary, MAC'd per device) and v1 (JSON).

The first byte of a payload tells the formats apart: ``{`` is v1 JSON, ``0xFB`` is binary (``0xFB`` never starts
UTF-8 text, so no JSON document can be mistaken for it). :func:`decode_batch` dispatches on it.

API
---
- ``encode_batch(records, *, key)`` -> v2 bytes. ``key=None`` gives v1 JSON: a transition aid so that callers not yet
  holding a device key keep working; it goes away once every caller passes a key (use :func:`encode_batch_json`
  when JSON is what you mean, e.g. a quarantine copy).
- ``decode_batch(payload, *, key)`` -> :class:`Batch`. v2 needs the device's key and raises :class:`MacError` if
  the MAC does not verify (or no key was given); v1 JSON decodes with ``Batch.signed = False`` and the caller
  decides whether an unsigned batch is acceptable.
- ``encode_ack(device_id, seqs, *, key)`` / ``decode_ack(payload, *, key)``: v2 binary, MAC'd. With ``key=None``
  both speak v1 JSON only (transition); with a key, ``decode_ack`` refuses unsigned JSON acks, because an ack
  makes a validator forget records and only the back office (which knows the device key) may send one.
- ``encode_batch_json`` / ``decode_batch_json`` / ``encode_ack_json`` / ``decode_ack_json``: v1 only.
- ``encode_set_aside(device_id, operator, epoch, items, *, key)``: records the validator could not encode (see "Set
  aside" below); ``decode_batch`` returns them in ``Batch.set_aside`` (and no records).
- ``sendable(record)``: the record with its texts cut to the limits below (``MAX_TEXT`` characters of valid UTF-8);
  the validator's journal writes every record through it, so whatever it keeps can be sent.
- Every malformed input raises :class:`WireError` (``MacError`` is one) with a reason a person can act on, never
  another exception; work and memory are bounded by the payload's length whatever its length fields say.

Format v2, byte by byte
-----------------------
Notation: ``u8`` one byte; ``u32be`` four bytes big-endian; ``uv`` an unsigned LEB128 varint (7 bits a byte, least
significant group first, high bit = more follows; at most 5 bytes, minimal: no trailing ``0x80 .. 0x00`` padding;
values above 2^32-1 are refused unless a field says otherwise); ``sv`` a signed delta as a zigzag varint
(0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ...; at most 5 bytes); ``str`` = ``uv`` byte length + UTF-8 bytes.

Tap batch::

    0      u8    0xFB                     magic
    1      u8    0x02                     format version (anything else: "unsupported format version N")
    2      u8    0x01 | 0x03              message type: tap batch; 0x03 = tap batch with the journal's epoch
                                          (0x02 is an ack; other messages use other types, so one device key can
                                          MAC them all without one passing for another)
    3..    str   device id                at most 32 characters
           str   operator                 at most 32 characters
           [0x03] u64be epoch             the journal's identity (records.TapRecord.epoch), 0..2^63-1; a 0x01
                                          batch is epoch 0 (validators from before epochs)
           uv    n                        records, 1..MAX_RECORDS
           u32be t0                       first record's occurred_at, POSIX seconds UTC
           uv    seq0                     first record's device_seq
           uv    ns, then ns x str        string table (route, vehicle, driver, reason), at most 64 characters each
           uv    nt, then nt x 6 bytes    terminal table (PSAM terminal numbers)
           uv    term0                    terminal index predicted for the first purchase (0 = none, k = table[k-1])
           uv    tseq0                    terminal_seq predicted for the first purchase
           uv uv uv uv                    first context: route, vehicle, driver (string indices), shift_no
           uv    tx0                      tx_type predicted for purchases
           uv    alg0                     algorithm predicted for purchases
           n x record
    -12    12 bytes                       MAC = HMAC-SHA256(device key, every byte before it)[:12]

A record is a flag word then only the fields that differ from what the decoder predicts::

    uv  flags   bits 0-2 kind (0 purchase, 1 shift_open, 2 shift_close, 3 denied, 4 ticket_use; 5-7 refused)
                bit 3  FULL   full_fare explicit           (predicted: amount for a purchase, else 0)
                bit 4  ALG    algorithm explicit           (predicted: alg0 for a purchase, else 0)
                bit 5  REASON reason explicit              (predicted: "")
                bit 6  SEQ    device_seq explicit          (predicted: previous record's + 1; seq0 for the first)
                bit 7  CTX    route/vehicle/driver/shift   (predicted: the previous record's; the header's for the first)
                bit 8  TERM   terminal explicit            (predicted for a purchase: the last terminal seen and its
                                                            terminal_seq + 1, from term0/tseq0; else "" and 0)
                bit 9  TX     tx_type explicit             (predicted: tx0 for a purchase, else 6)
                bit 10 STOPS  entry_stop, exit_stop        (predicted: 0, 0)
                bit 11 ASN    card_asn present    } a purchase always carries these and must not set the bits;
                bit 12 TAC    tac present         } other kinds carry them only when set (else "" / 0)
                bit 13 MONEY  card_type, card_ttc, amount, balance_after
                bits 14+ refused
    [SEQ]            sv   device_seq - predicted
                     sv   occurred_at - previous record's (t0 for the first)
    [CTX]            uv uv uv uv  route, vehicle, driver (string indices), shift_no
    [purchase|ASN]   10 bytes     card_asn (20 hex digits)
    [purchase|MONEY] uv uv uv uv  card_type, card_ttc, amount, balance_after
    [purchase|TAC]   4 bytes      tac (8 hex digits)
    [TERM]           uv sv        terminal index (0 = "", k = table[k-1]); terminal_seq - predicted
    [TX]             uv           tx_type
    [ALG]            uv           algorithm
    [FULL]           uv           full_fare
    [STOPS]          uv uv        entry_stop, exit_stop
    [REASON]         uv           string index
    [ticket_use]     8 bytes      ticket_id, u64be (a QR ticket's id, or a pickup code's 10-digit serial)
                     uv           ticket_use (1.., the use number on this validator)
                     u8           presented: 1 qr, 2 pickup
A ticket_use always carries these three (no flag); every other kind has ticket_id 0, ticket_use 0, presented "".

After a record whose terminal_id is not "", the predicted terminal becomes that one and its terminal_seq + 1.
A purchase must come out with a card ASN, a TAC and a terminal, or the batch is refused.

A typical purchase on a flat-fare route (same bus, next sequence, seconds later, same PSAM, adult full fare) is
flags(1) dt(1) ASN(10) card_type(1) TTC(1-3) amount(1-2) balance(2-3) TAC(4): about 23 bytes, plus its share of
the header and MAC (about 80 bytes for a batch of 50, i.e. under 2 bytes a tap).

Why a 12-byte MAC: forging a batch is an online attack (each guess must be sent through the broker and checked by
the back office, which quarantines and counts failures), so 96 bits leave a forger a 2^-96 chance a try, far beyond
any number of tries a GPRS link or a broker can carry, while costing 0.24 byte a tap in a batch of 50. 8 bytes
(2^-64) would also do against online guessing; 12 keeps a wide margin for batches of 1 over years of a fleet.
The MAC covers the device id and operator; the device key is derived from the device id (``wire.devicekeys``), and
ingest compares both with the topic, so a batch cannot be forged, altered or moved to another device's topic.

Ack::

    0      u8    0xFB, 0x02 (version), 0x02 | 0x05 (message type: ack; 0x05 = ack of an epoch's records)
    3..    str   device id
           [0x05] u64be epoch             the epoch of the records acknowledged
           uv    nr                       ranges, 0..MAX_RECORDS
           nr x (uv gap, uv extra)        first range: start = gap; later: start = previous end + 2 + gap
                                          (ranges are sorted and neither overlap nor touch); end = start + extra;
                                          at most MAX_RECORDS sequences in all, none above 2^32-1
           [0x05] ranges                  the same again: which of those the back office quarantined (safe in its
                                          database with a reason, not counted): a subset of the first
    -12    12 bytes                       MAC = HMAC-SHA256(device key, every byte before it)[:12]

The back office answers a 0x01 batch with a 0x02 ack and a 0x03 batch (or a set-aside message of a nonzero epoch)
with a 0x05 ack, so a validator from before epochs is never sent a message type it does not know. A validator
believes an ack only for its own journal's epoch: a late ack for a replaced journal's records names sequences that
mean other records now.

Set aside (message type 0x04): records a validator could not encode, so that one bad record never holds back those
behind it. The validator marks them in its journal, raises an alarm in its status, and sends them in this form; the
back office quarantines each with the reason and acknowledges its sequence (as quarantined)::

    0      u8    0xFB, 0x02 (version), 0x04 (message type: set aside)
    3..    str   device id, str operator, u64be epoch
           uv    n                        entries, 1..MAX_RECORDS
           n x (uv device_seq, str reason (at most MAX_NOTE characters), uv length + raw bytes (at most MAX_RAW))
    -12    12 bytes                       MAC
The raw bytes are what the journal holds of the record (its JSON body), cut to MAX_RAW: for people, not parsed.

Format v1 (JSON) is the previous contract: a batch is ``{"v": 1, "device": ..., "operator": ..., "records": [...]}``,
each record listing the fields that differ from their defaults; an ack is ``{"v": 1, "device": ..., "seqs": [...]}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime

from wire.records import PRESENTED_PICKUP, PRESENTED_QR, RecordKind, TapRecord

VERSION = 2  # the newest format this module writes
JSON_VERSION = 1
MAX_RECORDS = 1000
MAGIC = 0xFB
TYPE_BATCH = 0x01
TYPE_ACK = 0x02
TYPE_EPOCH_BATCH = 0x03
TYPE_SET_ASIDE = 0x04
TYPE_EPOCH_ACK = 0x05
MAX_EPOCH = (1 << 63) - 1  # fits a signed 64-bit database column
MAX_NOTE = 200  # characters in a set-aside reason
MAX_RAW = 2048  # bytes of a set-aside record's raw form
MAC_LEN = 12
MAX_PAYLOAD = 4 * 1024 * 1024  # far above the largest valid batch (1000 records, each with new 64-character strings)
MAX_TEXT = 64  # characters in a route, vehicle, driver, reason
MAX_ID = 32  # characters in a device id or operator
TEXT_FIELDS = ("route", "vehicle", "driver", "reason")  # the record's texts, each at most MAX_TEXT characters


class WireError(ValueError):
    """A message that cannot be decoded; the text says what is wrong with it."""


class MacError(WireError):
    """A v2 message whose MAC does not verify with the device's key (forged, altered, or sent for another device)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SetAside:
    """A record the validator could not encode: its sequence, why, and what its journal holds of it."""

    device_seq: int
    reason: str
    raw: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    device_id: str
    operator: str
    records: tuple[TapRecord, ...]
    version: int = VERSION
    signed: bool = True  # False for v1 JSON: nothing vouches for where it came from
    epoch: int = 0  # the journal the records come from (0: a message without one)
    set_aside: tuple[SetAside, ...] = ()  # a set-aside message's entries (then no records)


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    device_id: str
    seqs: tuple[int, ...]
    signed: bool = True
    epoch: int = 0
    quarantined: tuple[int, ...] = ()  # of seqs: quarantined by the back office (safe, with a reason; not counted)


def fit_text(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` as text the wire carries: lone surrogates replaced, cut to ``limit`` characters (an ellipsis
    says it was cut)."""
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value if len(value) <= limit else value[:limit - 1] + "\u2026"


def sendable(record: TapRecord) -> TapRecord:
    """The record with every text cut to the wire's limit: what a validator writes, so that it can always be sent."""
    changes = {}
    for name in TEXT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, str):
            fitted = fit_text(value)
            if fitted != value:
                changes[name] = fitted
    return dataclasses.replace(record, **changes) if changes else record


_U32 = 0xFFFFFFFF
_KINDS = (RecordKind.PURCHASE, RecordKind.SHIFT_OPEN, RecordKind.SHIFT_CLOSE, RecordKind.DENIED, RecordKind.TICKET_USE)
_PRESENTED_CODE = {PRESENTED_QR: 1, PRESENTED_PICKUP: 2}
_PRESENTED = {v: k for k, v in _PRESENTED_CODE.items()}
_U64 = (1 << 64) - 1
_KIND_CODE = {k: i for i, k in enumerate(_KINDS)}
F_FULL, F_ALG, F_REASON, F_SEQ, F_CTX = 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7
F_TERM, F_TX, F_STOPS, F_ASN, F_TAC, F_MONEY = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13
_F_KNOWN = (1 << 14) - 1
_PURCHASE_IMPLIED = F_ASN | F_TAC | F_MONEY
_DEFAULT_TX, _DEFAULT_ALG = 0x06, 0x00  # TapRecord's defaults: what a record other than a purchase carries
_HEX = re.compile(r"[0-9a-f]*")


# --------------------------------------------------------------------------------------- primitives


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_LEN]


def _check_key(key) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise TypeError("a device key is bytes of at least 16 bytes (wire.devicekeys.mac_key)")
    return bytes(key)


def _uv(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _sv(out: bytearray, delta: int) -> None:
    _uv(out, delta * 2 if delta >= 0 else -delta * 2 - 1)


def _str_out(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    _uv(out, len(raw))
    out += raw


class _Reader:
    """A cursor over the signed part of a message; every read checks bounds first, so nothing is allocated from a
    length field beyond the bytes actually present. ``record`` (the index being read, or None) is only formatted
    into a message when something is wrong: decoding a valid batch builds no strings."""

    __slots__ = ("data", "end", "pos", "record", "what")

    def __init__(self, data: bytes, pos: int, end: int, what: str):
        self.data, self.pos, self.end, self.what, self.record = data, pos, end, what, None

    def fail(self, message: str):
        where = self.what if self.record is None else f"{self.what}: record {self.record}"
        raise WireError(f"{where}: {message} (at byte {self.pos})")

    def u8(self, name: str) -> int:
        if self.pos >= self.end:
            self.fail(f"truncated: {name} missing")
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int, name: str) -> bytes:
        pos = self.pos
        if n > self.end - pos:
            self.fail(f"truncated: {name} needs {n} bytes, {self.end - pos} left")
        self.pos = pos + n
        return self.data[pos:pos + n]

    def uv(self, name: str, limit: int = _U32) -> int:
        pos = self.pos
        if pos < self.end:  # one byte: nearly every varint of a typical batch
            b = self.data[pos]
            if b < 0x80 and b <= limit:
                self.pos = pos + 1
                return b
        data, end = self.data, self.end
        value = shift = 0
        for i in range(5):
            if pos >= end:
                self.pos = pos
                self.fail(f"truncated: {name} missing")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                self.pos = pos
                if b == 0 and i:
                    self.fail(f"{name}: varint not in its shortest form")
                if value > limit:
                    self.fail(f"{name} {value} out of range (at most {limit})")
                return value
            shift += 7
        self.pos = pos
        self.fail(f"{name}: varint overflow (more than 5 bytes)")

    def epoch(self) -> int:
        value = int.from_bytes(self.take(8, "epoch"), "big")
        if value > MAX_EPOCH:
            self.fail(f"epoch {value} out of range (at most {MAX_EPOCH})")
        return value

    def sv(self, name: str) -> int:
        z = self.uv(name, (1 << 35) - 1)
        return (z >> 1) ^ -(z & 1)

    def text(self, name: str, max_chars: int) -> str:
        n = self.uv(f"{name} length", max_chars * 4)
        raw = self.take(n, name)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{name} is not UTF-8")
        if len(value) > max_chars:
            self.fail(f"{name} longer than {max_chars} characters")
        return value


def _u32(value: int, name: str, where: str) -> int:
    if not 0 <= value <= _U32:
        raise WireError(f"{where}: {name} {value} out of range 0..{_U32}")
    return value


# --------------------------------------------------------------------------------------- v2 batch


_INT_NAMES = ("device_seq", "shift_no", "card_type", "card_ttc", "amount", "balance_after", "terminal_seq",
              "tx_type", "algorithm", "full_fare", "entry_stop", "exit_stop")


def _check_record(r: TapRecord, i: int) -> None:
    """Refuse on encode what decode would refuse, so that nothing sent can come back as an error."""
    if not isinstance(r, TapRecord):
        raise WireError(f"record {i} is not a TapRecord")
    where = f"record {i} (device_seq {r.device_seq!r})"
    if r.kind not in _KIND_CODE:
        raise WireError(f"{where}: unknown kind {r.kind!r}")
    ints = (r.device_seq, r.shift_no, r.card_type, r.card_ttc, r.amount, r.balance_after, r.terminal_seq,
            r.tx_type, r.algorithm, r.full_fare, r.entry_stop, r.exit_stop)
    if not all(type(v) is int and 0 <= v <= _U32 for v in ints):  # the message is worth a second pass
        for name, value in zip(_INT_NAMES, ints, strict=True):
            if type(value) is not int or not 0 <= value <= _U32:
                raise WireError(f"{where}: {name} must be an integer from 0 to {_U32}, got {value!r}")
    for name, value in (("route", r.route), ("vehicle", r.vehicle), ("driver", r.driver), ("reason", r.reason)):
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise WireError(f"{where}: {name} must be a string of at most {MAX_TEXT} characters")
        if not value.isascii():  # ASCII is text; anything else may hide a lone surrogate
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError(f"{where}: {name} is not text (lone surrogate)") from None
    for name, width in (("card_asn", 20), ("terminal_id", 12), ("tac", 8)):
        value = getattr(r, name)
        if not isinstance(value, str) or len(value) not in (0, width) or not _HEX.fullmatch(value):
            raise WireError(f"{where}: {name} must be {width} lower-case hex digits or empty, got {value!r}")
    if r.kind is RecordKind.PURCHASE and not (r.card_asn and r.tac and r.terminal_id):
        raise WireError(f"{where}: a purchase needs card_asn, tac and terminal_id")
    _check_ticket_fields(r, where)
    if r.occurred_at.microsecond:
        raise WireError(f"{where}: occurred_at must be whole seconds")
    if type(r.epoch) is not int or not 0 <= r.epoch <= MAX_EPOCH:
        raise WireError(f"{where}: epoch must be an integer from 0 to {MAX_EPOCH}, got {r.epoch!r}")
    _u32(int(r.occurred_at.timestamp()), "occurred_at", where)


def _check_ticket_fields(r: TapRecord, where: str) -> None:
    if r.kind is RecordKind.TICKET_USE:
        if type(r.ticket_id) is not int or not 0 <= r.ticket_id <= _U64:
            raise WireError(f"{where}: ticket_id must be an integer from 0 to 2^64-1, got {r.ticket_id!r}")
        if type(r.ticket_use) is not int or not 1 <= r.ticket_use <= _U32:
            raise WireError(f"{where}: ticket_use must be an integer from 1 to {_U32}, got {r.ticket_use!r}")
        if r.presented not in _PRESENTED_CODE:
            raise WireError(f"{where}: presented must be 'qr' or 'pickup', got {r.presented!r}")
    elif (r.ticket_id, r.ticket_use, r.presented) != (0, 0, ""):
        raise WireError(f"{where}: only a ticket_use carries ticket_id, ticket_use and presented")


def _check_batch(records) -> tuple[TapRecord, ...]:
    records = tuple(records)
    if not records:
        raise WireError("a batch needs at least one record")
    if len(records) > MAX_RECORDS:
        raise WireError(f"a batch holds at most {MAX_RECORDS} records, got {len(records)}")
    head = records[0]
    for i, r in enumerate(records):
        _check_record(r, i)
        if (r.device_id, r.operator, r.epoch) != (head.device_id, head.operator, head.epoch):
            raise WireError("all records of a batch come from one device and one journal (epoch)")
    for name in ("device_id", "operator"):
        value = getattr(head, name)
        if not isinstance(value, str) or len(value) > MAX_ID:
            raise WireError(f"{name} must be a string of at most {MAX_ID} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise WireError(f"{name} is not text (lone surrogate)") from None
    return records


def _encode_v2(records: tuple[TapRecord, ...], key: bytes) -> bytes:
    head = records[0]
    strings: dict[str, int] = {}
    terminals: dict[str, int] = {}

    def sid(s: str) -> int:
        return strings.setdefault(s, len(strings))

    def tid(t: str) -> int:
        return 0 if not t else terminals.setdefault(t, len(terminals) + 1)

    first_term = next((r for r in records if r.terminal_id), None)
    ctx0 = (sid(head.route), sid(head.vehicle), sid(head.driver), head.shift_no)
    term0 = tid(first_term.terminal_id) if first_term else 0
    tseq0 = first_term.terminal_seq if first_term else 0
    first_purchase = next((r for r in records if r.kind is RecordKind.PURCHASE), None)
    tx0 = first_purchase.tx_type if first_purchase else _DEFAULT_TX
    alg0 = first_purchase.algorithm if first_purchase else _DEFAULT_ALG

    body = bytearray()
    seq_pred, t_prev, ctx, term, tseq = head.device_seq, int(head.occurred_at.timestamp()), ctx0, term0, tseq0
    for r in records:
        purchase = r.kind is RecordKind.PURCHASE
        flags = _KIND_CODE[r.kind]
        r_ctx = (sid(r.route), sid(r.vehicle), sid(r.driver), r.shift_no)
        r_term = tid(r.terminal_id)
        pred_term, pred_tseq = (term, tseq) if purchase else (0, 0)
        if r.full_fare != (r.amount if purchase else 0):
            flags |= F_FULL
        if r.algorithm != (alg0 if purchase else _DEFAULT_ALG):
            flags |= F_ALG
        if r.reason:
            flags |= F_REASON
        if r.device_seq != seq_pred:
            flags |= F_SEQ
        if r_ctx != ctx:
            flags |= F_CTX
        if (r_term, r.terminal_seq) != (pred_term, pred_tseq):
            flags |= F_TERM
        if r.tx_type != (tx0 if purchase else _DEFAULT_TX):
            flags |= F_TX
        if r.entry_stop or r.exit_stop:
            flags |= F_STOPS
        if not purchase:
            if r.card_asn:
                flags |= F_ASN
            if r.tac:
                flags |= F_TAC
            if r.card_type or r.card_ttc or r.amount or r.balance_after:
                flags |= F_MONEY
        _uv(body, flags)
        if flags & F_SEQ:
            _sv(body, r.device_seq - seq_pred)
        t = int(r.occurred_at.timestamp())
        _sv(body, t - t_prev)
        if flags & F_CTX:
            for v in r_ctx:
                _uv(body, v)
        if purchase or flags & F_ASN:
            body += bytes.fromhex(r.card_asn)
        if purchase or flags & F_MONEY:
            for v in (r.card_type, r.card_ttc, r.amount, r.balance_after):
                _uv(body, v)
        if purchase or flags & F_TAC:
            body += bytes.fromhex(r.tac)
        if flags & F_TERM:
            _uv(body, r_term)
            _sv(body, r.terminal_seq - pred_tseq)
        if flags & F_TX:
            _uv(body, r.tx_type)
        if flags & F_ALG:
            _uv(body, r.algorithm)
        if flags & F_FULL:
            _uv(body, r.full_fare)
        if flags & F_STOPS:
            _uv(body, r.entry_stop)
            _uv(body, r.exit_stop)
        if flags & F_REASON:
            _uv(body, sid(r.reason))
        if r.kind is RecordKind.TICKET_USE:
            body += r.ticket_id.to_bytes(8, "big")
            _uv(body, r.ticket_use)
            body.append(_PRESENTED_CODE[r.presented])
        seq_pred, t_prev, ctx = r.device_seq + 1, t, r_ctx
        if r_term:
            term, tseq = r_term, r.terminal_seq + 1

    out = bytearray((MAGIC, VERSION, TYPE_EPOCH_BATCH if head.epoch else TYPE_BATCH))
    _str_out(out, head.device_id)
    _str_out(out, head.operator)
    if head.epoch:
        out += head.epoch.to_bytes(8, "big")
    _uv(out, len(records))
    out += int(head.occurred_at.timestamp()).to_bytes(4, "big")
    _uv(out, head.device_seq)
    _uv(out, len(strings))
    for s in strings:  # dicts keep insertion order: index i is the i-th string added
        _str_out(out, s)
    _uv(out, len(terminals))
    for t in terminals:
        out += bytes.fromhex(t)
    for v in (term0, tseq0, *ctx0, tx0, alg0):
        _uv(out, v)
    out += body
    out += _mac(key, bytes(out))
    if len(out) > MAX_PAYLOAD:
        raise WireError(f"batch of {len(out)} bytes exceeds {MAX_PAYLOAD}: send fewer records")
    return bytes(out)


def _prefix(payload, message_types: tuple[int, ...], what: str, upgrade: str) -> bytes:
    """The dispatch bytes of a binary message, read (not trusted) only to pick the layout and the MAC's place."""
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"{what}: {len(payload)} bytes, more than the {MAX_PAYLOAD} any valid one has")
    if len(payload) < 2:
        raise WireError(f"{what}: truncated: {len(payload)} byte(s)")
    if payload[1] != VERSION:
        raise WireError(f"unsupported format version {payload[1]}: upgrade {upgrade}"
                        if payload[1] > VERSION else f"{what}: unknown format version {payload[1]}")
    if len(payload) < 3 + MAC_LEN:
        raise WireError(f"{what}: truncated: {len(payload)} bytes, shorter than the header and MAC")
    if payload[2] not in message_types:
        expected = " or ".join(f"{t:#04x}" for t in message_types)
        raise WireError(f"{what}: message type {payload[2]:#04x} where {expected} was expected "
                        "(an ack on the taps topic, a batch on the ack topic, or another message)")
    return bytes(payload)


def _verify(payload: bytes, key, what: str) -> None:
    if key is None:
        raise MacError(f"{what}: a v2 message is signed: the device's key is needed to check it")
    key = _check_key(key)
    if not hmac.compare_digest(_mac(key, payload[:-MAC_LEN]), payload[-MAC_LEN:]):
        raise MacError(f"{what}: MAC does not verify with this device's key (forged, altered, or meant for "
                       "another device)")


def _decode_v2(payload: bytes, key) -> Batch:
    payload = _prefix(payload, (TYPE_BATCH, TYPE_EPOCH_BATCH, TYPE_SET_ASIDE), "batch", "the back office")
    _verify(payload, key, "batch")
    rd = _Reader(payload, 3, len(payload) - MAC_LEN, "batch")
    device_id = rd.text("device id", MAX_ID)
    operator = rd.text("operator", MAX_ID)
    epoch = rd.epoch() if payload[2] != TYPE_BATCH else 0
    if payload[2] == TYPE_SET_ASIDE:
        return _decode_set_aside(rd, device_id, operator, epoch)
    n = rd.uv("record count", MAX_RECORDS)
    if n == 0:
        rd.fail("a batch needs at least one record")
    t0 = int.from_bytes(rd.take(4, "base time"), "big")
    seq0 = rd.uv("base device_seq")
    ns = rd.uv("string count", rd.end - rd.pos)  # each string takes at least its length byte
    strings = [rd.text(f"string {i}", MAX_TEXT) for i in range(ns)]
    nt = rd.uv("terminal count", (rd.end - rd.pos) // 6)
    terminals = [""] + [rd.take(6, f"terminal {i}").hex() for i in range(nt)]

    def string(name: str) -> str:
        i = rd.uv(name)
        if i >= len(strings):
            rd.fail(f"{name} {i} is outside the string table ({len(strings)} strings)")
        return strings[i]

    def terminal(name: str) -> int:
        i = rd.uv(name)
        if i >= len(terminals):
            rd.fail(f"{name} {i} is outside the terminal table ({nt} terminals)")
        return i

    term = terminal("first terminal index")
    tseq = rd.uv("first terminal_seq")
    ctx = (string("route index"), string("vehicle index"), string("driver index"), rd.uv("shift_no"))
    tx0, alg0 = rd.uv("tx_type"), rd.uv("algorithm")

    records = []
    seq_pred, t = seq0, t0
    for i in range(n):
        if rd.pos >= rd.end:
            rd.fail(f"count mismatch: the header says {n} records but the batch ends after {i}")
        rd.record = i
        flags = rd.uv("flags")
        if flags & ~_F_KNOWN:
            rd.fail(f"unknown flag bits {flags & ~_F_KNOWN:#x} (a newer format?)")
        code = flags & 7
        if code >= len(_KINDS):
            rd.fail(f"unknown record kind {code}")
        kind = _KINDS[code]
        purchase = code == 0
        if purchase and flags & _PURCHASE_IMPLIED:
            rd.fail("a purchase sets ASN/TAC/MONEY flags, which it always carries")
        seq = seq_pred + rd.sv("device_seq delta") if flags & F_SEQ else seq_pred
        if not 0 <= seq <= _U32:
            rd.fail(f"device_seq {seq} out of range 0..{_U32} (sequence overflow)")
        t += rd.sv("time delta")
        if not 0 <= t <= _U32:
            rd.fail(f"occurred_at {t} out of range 0..{_U32}")
        if flags & F_CTX:
            ctx = (string("route index"), string("vehicle index"), string("driver index"), rd.uv("shift_no"))
        asn = rd.take(10, "card_asn").hex() if purchase or flags & F_ASN else ""
        if purchase or flags & F_MONEY:
            money = (rd.uv("card_type"), rd.uv("card_ttc"), rd.uv("amount"), rd.uv("balance_after"))
        else:
            money = (0, 0, 0, 0)
        tac = rd.take(4, "tac").hex() if purchase or flags & F_TAC else ""
        r_term, r_tseq = (term, tseq) if purchase else (0, 0)
        if flags & F_TERM:
            r_term = terminal("terminal index")
            r_tseq += rd.sv("terminal_seq delta")
        if not 0 <= r_tseq <= _U32:
            rd.fail(f"terminal_seq {r_tseq} out of range 0..{_U32} (sequence overflow)")
        if purchase and not r_term:
            rd.fail("a purchase needs a terminal id")
        tx = rd.uv("tx_type") if flags & F_TX else (tx0 if purchase else _DEFAULT_TX)
        alg = rd.uv("algorithm") if flags & F_ALG else (alg0 if purchase else _DEFAULT_ALG)
        full = rd.uv("full_fare") if flags & F_FULL else (money[2] if purchase else 0)
        stops = (rd.uv("entry_stop"), rd.uv("exit_stop")) if flags & F_STOPS else (0, 0)
        reason = string("reason index") if flags & F_REASON else ""
        ticket = (0, 0, "")
        if code == 4:
            ticket_id = int.from_bytes(rd.take(8, "ticket_id"), "big")
            use = rd.uv("ticket_use")
            presented = _PRESENTED.get(rd.u8("presented"))
            if not use or presented is None:
                rd.fail("a ticket_use needs a use number from 1 and presented 1 (qr) or 2 (pickup)")
            ticket = (ticket_id, use, presented)
        records.append(TapRecord(
            device_id, seq, kind, datetime.fromtimestamp(t, tz=UTC), operator, ctx[0], ctx[1], ctx[2], ctx[3], asn,
            money[0], money[1], money[2], money[3], terminals[r_term], r_tseq, tac, reason, tx, alg, full, *stops,
            epoch, *ticket))
        seq_pred = seq + 1
        if r_term:
            term, tseq = r_term, r_tseq + 1
    rd.record = None
    if rd.pos != rd.end:
        rd.fail(f"count mismatch: {rd.end - rd.pos} trailing bytes after the {n} records the header announces")
    return Batch(device_id, operator, tuple(records), VERSION, True, epoch)


def _decode_set_aside(rd: _Reader, device_id: str, operator: str, epoch: int) -> Batch:
    n = rd.uv("set-aside count", MAX_RECORDS)
    if n == 0:
        rd.fail("a set-aside message needs at least one entry")
    items = []
    for i in range(n):
        rd.record = i
        seq = rd.uv("device_seq")
        reason = rd.text("reason", MAX_NOTE)
        raw = rd.take(rd.uv("raw length", MAX_RAW), "raw record")
        items.append(SetAside(seq, reason, raw))
    rd.record = None
    if rd.pos != rd.end:
        rd.fail(f"count mismatch: {rd.end - rd.pos} trailing bytes after the {n} entries the header announces")
    return Batch(device_id, operator, (), VERSION, True, epoch, tuple(items))


def encode_set_aside(device_id: str, operator: str, epoch: int, items, *, key: bytes) -> bytes:
    """Records that could not be encoded, as (device_seq, reason, raw bytes) or :class:`SetAside`; the reason is cut
    to MAX_NOTE characters and the raw bytes to MAX_RAW, so this message can always be built."""
    key = _check_key(key)
    items = [SetAside(*item) if not isinstance(item, SetAside) else item for item in items]
    if not items or len(items) > MAX_RECORDS:
        raise WireError(f"a set-aside message holds 1 to {MAX_RECORDS} entries, got {len(items)}")
    if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
        raise WireError(f"epoch must be an integer from 0 to {MAX_EPOCH}, got {epoch!r}")
    for name, value in (("device_id", device_id), ("operator", operator)):
        if not isinstance(value, str) or len(value) > MAX_ID:
            raise WireError(f"{name} must be a string of at most {MAX_ID} characters")
    out = bytearray((MAGIC, VERSION, TYPE_SET_ASIDE))
    _str_out(out, fit_text(device_id, MAX_ID))
    _str_out(out, fit_text(operator, MAX_ID))
    out += epoch.to_bytes(8, "big")
    _uv(out, len(items))
    for item in items:
        _uv(out, _u32(item.device_seq, "device_seq", "set aside"))
        _str_out(out, fit_text(str(item.reason), MAX_NOTE))
        raw = bytes(item.raw)[:MAX_RAW]
        _uv(out, len(raw))
        out += raw
    out += _mac(key, bytes(out))
    return bytes(out)


# --------------------------------------------------------------------------------------- public batch API


def encode_batch(records, *, key: bytes | None = None) -> bytes:
    """Format v2 signed with the device's ``key``; ``key=None`` writes v1 JSON (transition only, see the module)."""
    if key is None:
        return encode_batch_json(records)
    return _encode_v2(_check_batch(records), _check_key(key))


def decode_batch(payload: bytes, *, key: bytes | None = None) -> Batch:
    """Either format, told apart by the first byte; v2 needs ``key`` (the device's, from the topic)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError("payload must be bytes")
    payload = bytes(payload)
    if not payload:
        raise WireError("empty payload")
    if payload[0] == MAGIC:
        return _decode_v2(payload, key)
    if payload[:1] == b"{":
        return decode_batch_json(payload)
    raise WireError(f"unknown format: first byte {payload[0]:#04x}, expected '{{' (v1 JSON) or {MAGIC:#04x} "
                    "(v2 binary)")


# --------------------------------------------------------------------------------------- v2 ack


def _ack_seqs(seqs, what: str) -> list[int]:
    values = list(seqs)
    if any(type(s) is not int or not 0 <= s <= _U32 for s in values):
        raise WireError(f"{what} must be integers from 0 to {_U32}")
    values = sorted(set(values))
    if len(values) > MAX_RECORDS:
        raise WireError(f"an ack names at most {MAX_RECORDS} sequences, got {len(values)}")
    return values


def _ranges_out(out: bytearray, values: list[int]) -> None:
    ranges: list[list[int]] = []
    for s in values:
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    _uv(out, len(ranges))
    prev_end = None
    for start, end in ranges:
        _uv(out, start if prev_end is None else start - prev_end - 2)
        _uv(out, end - start)
        prev_end = end


def encode_ack(device_id: str, seqs, *, key: bytes | None = None, epoch: int = 0, quarantined=()) -> bytes:
    """The sequences the back office has committed, as ranges, MAC'd; ``key=None`` writes v1 JSON (transition).
    ``epoch`` names the journal the sequences belong to: nonzero makes a 0x05 ack, which also says which of them
    were ``quarantined``; epoch 0 makes the 0x02 ack every validator reads (it has no room for ``quarantined``)."""
    if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
        raise WireError(f"epoch must be an integer from 0 to {MAX_EPOCH}, got {epoch!r}")
    if key is None:
        return encode_ack_json(device_id, seqs, epoch=epoch, quarantined=quarantined)
    key = _check_key(key)
    if not isinstance(device_id, str) or len(device_id) > MAX_ID:
        raise WireError(f"device id must be a string of at most {MAX_ID} characters")
    values = _ack_seqs(seqs, "ack sequences")
    out = bytearray((MAGIC, VERSION, TYPE_EPOCH_ACK if epoch else TYPE_ACK))
    _str_out(out, device_id)
    if epoch:
        out += epoch.to_bytes(8, "big")
    _ranges_out(out, values)
    if epoch:
        held = _ack_seqs(quarantined, "quarantined sequences")
        if not set(held) <= set(values):
            raise WireError("an ack's quarantined sequences must be among those it acknowledges")
        _ranges_out(out, held)
    out += _mac(key, bytes(out))
    return bytes(out)


def _ranges_in(rd: _Reader, what: str) -> list[int]:
    nr = rd.uv(f"{what} range count", MAX_RECORDS)
    seqs: list[int] = []
    prev_end = None
    for i in range(nr):
        gap = rd.uv(f"{what} range {i} start")
        start = gap if prev_end is None else prev_end + 2 + gap
        end = start + rd.uv(f"{what} range {i} length")
        if end > _U32:
            rd.fail(f"{what} range {i} ends at {end}, beyond {_U32} (sequence overflow)")
        if len(seqs) + end - start + 1 > MAX_RECORDS:  # checked before expanding: bounded work
            rd.fail(f"more than {MAX_RECORDS} sequences")
        seqs.extend(range(start, end + 1))
        prev_end = end
    return seqs


def decode_ack(payload: bytes, *, key: bytes | None = None) -> Ack:
    """v2 with the device's ``key``; with ``key=None`` only a v1 JSON ack (transition, ``Ack.signed = False``)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError("payload must be bytes")
    payload = bytes(payload)
    if not payload:
        raise WireError("empty payload")
    if payload[:1] == b"{":
        if key is not None:
            raise MacError("ack: an unsigned v1 JSON ack is refused where the device key is known (anyone could "
                           "send one and make the validator forget records)")
        return decode_ack_json(payload)
    if payload[0] != MAGIC:
        raise WireError(f"unknown format: first byte {payload[0]:#04x}, expected {MAGIC:#04x} (v2 ack)")
    payload = _prefix(payload, (TYPE_ACK, TYPE_EPOCH_ACK), "ack", "the validator")
    _verify(payload, key, "ack")
    rd = _Reader(payload, 3, len(payload) - MAC_LEN, "ack")
    device_id = rd.text("device id", MAX_ID)
    with_epoch = payload[2] == TYPE_EPOCH_ACK
    epoch = rd.epoch() if with_epoch else 0
    seqs = _ranges_in(rd, "ack")
    held: list[int] = []
    if with_epoch:
        held = _ranges_in(rd, "quarantined")
        if not set(held) <= set(seqs):
            rd.fail("quarantined sequences that the ack does not acknowledge")
    if rd.pos != rd.end:
        rd.fail(f"count mismatch: {rd.end - rd.pos} trailing bytes after the ranges")
    return Ack(device_id, tuple(seqs), True, epoch, tuple(held))


# --------------------------------------------------------------------------------------- v1 JSON

_FIELDS = {f.name: f for f in dataclasses.fields(TapRecord)}
_SHARED = ("device_id", "operator", "epoch")  # batch-level in JSON
_INT_FIELDS = {"device_seq", "shift_no", "card_type", "card_ttc", "amount", "balance_after", "terminal_seq",
               "tx_type", "algorithm", "full_fare", "entry_stop", "exit_stop"}
_STR_FIELDS = {"route", "vehicle", "driver", "reason"}
_HEX_FIELDS = {"card_asn": 20, "terminal_id": 12, "tac": 8}


def encode_batch_json(records: list[TapRecord] | tuple[TapRecord, ...]) -> bytes:
    """Format v1: UTF-8 JSON, unsigned."""
    if not records:
        raise WireError("a batch needs at least one record")
    head = records[0]
    out = []
    for r in records:
        if (r.device_id, r.operator, r.epoch) != (head.device_id, head.operator, head.epoch):
            raise WireError("all records of a batch come from one device and one journal (epoch)")
        item = {}
        for name, f in _FIELDS.items():
            if name in _SHARED:
                continue
            value = getattr(r, name)
            if name == "occurred_at":
                item["t"] = int(value.timestamp())
            elif name == "kind":
                item["kind"] = value.value
            elif name == "device_seq" or value != f.default:
                item[name] = value
        out.append(item)
    doc = {"v": JSON_VERSION, "device": head.device_id, "operator": head.operator, "records": out}
    if head.epoch:
        doc["epoch"] = head.epoch
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _load(payload: bytes) -> dict:
    if not isinstance(payload, (bytes, bytearray)):
        raise WireError("payload must be bytes")
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, an integer literal of thousands of digits
        raise WireError(f"not UTF-8 JSON: {e}") from None
    if not isinstance(doc, dict):
        raise WireError("message is not a JSON object")
    version = doc.get("v")
    if type(version) is not int or version != JSON_VERSION:  # true and 1.0 equal 1 in Python; not on the wire
        raise WireError(f"unknown JSON message version {doc.get('v')!r}; JSON messages are version {JSON_VERSION}")
    return doc


def _str(doc: dict, key: str, where: str, max_len: int = MAX_TEXT) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) > max_len or not _is_text(value):
        raise WireError(f"{where}: {key!r} must be a string of at most {max_len} characters")
    return value


def _is_text(value: str) -> bool:
    """JSON can carry lone surrogates ("\\ud800"), which are not text and could never be stored or re-sent."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32:
        raise WireError(f"{where}: {name!r} must be an integer from 0 to {_U32}, got {value!r}")
    return value


def _epoch(doc: dict, where: str) -> int:
    value = doc.get("epoch", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EPOCH:
        raise WireError(f"{where}: 'epoch' must be an integer from 0 to {MAX_EPOCH}, got {value!r}")
    return value


def _record(item, device_id: str, operator: str, index: int, epoch: int = 0) -> TapRecord:
    where = f"record {index}"
    if not isinstance(item, dict):
        raise WireError(f"{where} is not an object")
    unknown = set(item) - (set(_FIELDS) - set(_SHARED) - {"occurred_at"}) - {"t"}
    if unknown:
        raise WireError(f"{where}: unknown fields {sorted(unknown)}")
    try:
        kind = RecordKind(item.get("kind"))
    except ValueError:
        raise WireError(f"{where}: unknown kind {item.get('kind')!r}") from None
    if "device_seq" not in item or "t" not in item:
        raise WireError(f"{where}: 'device_seq' and 't' are required")
    values = {"device_id": device_id, "operator": operator, "kind": kind, "epoch": epoch}
    values["occurred_at"] = datetime.fromtimestamp(_int(item["t"], "t", where), tz=UTC)
    for name in _INT_FIELDS:
        if name in item:
            values[name] = _int(item[name], name, where)
    for name in _STR_FIELDS:
        if name in item:
            values[name] = _str(item, name, where)
    for name, width in _HEX_FIELDS.items():
        if name in item:
            value = item[name]
            if not isinstance(value, str) or len(value) != width or not _HEX.fullmatch(value):
                raise WireError(f"{where}: {name!r} must be {width} lower-case hex digits")
            values[name] = value
    if "ticket_id" in item:
        value = item["ticket_id"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
            raise WireError(f"{where}: 'ticket_id' must be an integer from 0 to 2^64-1, got {value!r}")
        values["ticket_id"] = value
    if "ticket_use" in item:
        values["ticket_use"] = _int(item["ticket_use"], "ticket_use", where)
    if "presented" in item:
        values["presented"] = item["presented"]
    for name in ("route", "vehicle", "driver"):
        values.setdefault(name, "")
    values.setdefault("shift_no", 0)
    if kind is RecordKind.PURCHASE:
        missing = [n for n in ("card_asn", "terminal_id", "tac") if n not in values]
        if missing:
            raise WireError(f"{where}: a purchase needs {missing}")
    record = TapRecord(**values)
    _check_ticket_fields(record, where)
    return record


def decode_batch_json(payload: bytes) -> Batch:
    """Format v1 only; ``Batch.signed`` is False."""
    doc = _load(payload)
    device_id = _str(doc, "device", "batch", MAX_ID)
    operator = _str(doc, "operator", "batch", MAX_ID)
    records = doc.get("records")
    if not isinstance(records, list) or not records:
        raise WireError("batch: 'records' must be a non-empty list")
    if len(records) > MAX_RECORDS:
        raise WireError(f"batch: {len(records)} records, at most {MAX_RECORDS} allowed")
    epoch = _epoch(doc, "batch")
    return Batch(device_id, operator,
                 tuple(_record(it, device_id, operator, i, epoch) for i, it in enumerate(records)),
                 JSON_VERSION, False, epoch)


def encode_ack_json(device_id: str, seqs, *, epoch: int = 0, quarantined=()) -> bytes:
    """Format v1 ack: unsigned JSON (``epoch`` and ``quarantined`` only when there are any)."""
    doc = {"v": JSON_VERSION, "device": device_id, "seqs": sorted(seqs)}
    if epoch:
        doc["epoch"] = epoch
    if quarantined:
        doc["quarantined"] = sorted(quarantined)
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_ack_json(payload: bytes) -> Ack:
    """Format v1 ack only; ``Ack.signed`` is False."""
    doc = _load(payload)
    device_id = _str(doc, "device", "ack", MAX_ID)
    seqs = doc.get("seqs")
    if not isinstance(seqs, list) or len(seqs) > MAX_RECORDS:
        raise WireError("ack: 'seqs' must be a list of device sequences")
    held = doc.get("quarantined", [])
    if not isinstance(held, list) or len(held) > MAX_RECORDS:
        raise WireError("ack: 'quarantined' must be a list of device sequences")
    return Ack(device_id, tuple(_int(s, "seq", "ack") for s in seqs), False, _epoch(doc, "ack"),
               tuple(_int(s, "seq", "ack") for s in held))

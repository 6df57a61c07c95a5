"""Encoding of tap batches and acknowledgements, version 1: UTF-8 JSON with a strict decoder.

A batch is ``{"v": 1, "device": ..., "operator": ..., "records": [...]}``; each record lists the fields of
:class:`wire.records.TapRecord` that differ from their defaults, and the batch header holds what every record of the
batch shares (device, operator). An acknowledgement names the device and the device sequences the back office has
committed (stored, recognised as duplicates, or quarantined): the validator may forget exactly those.

The decoder never trusts its input: anything malformed raises :class:`WireError` with a reason a person can act on.
Later versions (a compact binary form) get a new ``v``; the decoder dispatches on it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime

from wire.records import RecordKind, TapRecord

VERSION = 1
MAX_RECORDS = 1000


class WireError(ValueError):
    """A message that cannot be decoded; the text says what is wrong with it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    device_id: str
    operator: str
    records: tuple[TapRecord, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    device_id: str
    seqs: tuple[int, ...]


_FIELDS = {f.name: f for f in dataclasses.fields(TapRecord)}
_SHARED = ("device_id", "operator")
_INT_FIELDS = {"device_seq", "shift_no", "card_type", "card_ttc", "amount", "balance_after", "terminal_seq"}
_STR_FIELDS = {"route", "vehicle", "driver", "reason"}
_HEX_FIELDS = {"card_asn": 20, "terminal_id": 12, "tac": 8}
_HEX = re.compile(r"^[0-9a-f]*$")
_U32 = 0xFFFFFFFF


def encode_batch(records: list[TapRecord] | tuple[TapRecord, ...]) -> bytes:
    if not records:
        raise WireError("a batch needs at least one record")
    head = records[0]
    out = []
    for r in records:
        if (r.device_id, r.operator) != (head.device_id, head.operator):
            raise WireError("all records of a batch come from one device")
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
    doc = {"v": VERSION, "device": head.device_id, "operator": head.operator, "records": out}
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
    if type(version) is not int or version != VERSION:  # true and 1.0 equal 1 in Python; not on the wire
        raise WireError(f"unknown message version {doc.get('v')!r}; this back office reads version {VERSION}")
    return doc


def _str(doc: dict, key: str, where: str, max_len: int = 64) -> str:
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


def _record(item, device_id: str, operator: str, index: int) -> TapRecord:
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
    values = {"device_id": device_id, "operator": operator, "kind": kind}
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
    for name in ("route", "vehicle", "driver"):
        values.setdefault(name, "")
    values.setdefault("shift_no", 0)
    if kind is RecordKind.PURCHASE:
        missing = [n for n in ("card_asn", "terminal_id", "tac") if n not in values]
        if missing:
            raise WireError(f"{where}: a purchase needs {missing}")
    return TapRecord(**values)


def decode_batch(payload: bytes) -> Batch:
    doc = _load(payload)
    device_id = _str(doc, "device", "batch", 32)
    operator = _str(doc, "operator", "batch", 32)
    records = doc.get("records")
    if not isinstance(records, list) or not records:
        raise WireError("batch: 'records' must be a non-empty list")
    if len(records) > MAX_RECORDS:
        raise WireError(f"batch: {len(records)} records, at most {MAX_RECORDS} allowed")
    return Batch(device_id, operator, tuple(_record(it, device_id, operator, i) for i, it in enumerate(records)))


def encode_ack(device_id: str, seqs) -> bytes:
    return json.dumps({"v": VERSION, "device": device_id, "seqs": sorted(seqs)}, separators=(",", ":")).encode()


def decode_ack(payload: bytes) -> Ack:
    doc = _load(payload)
    device_id = _str(doc, "device", "ack", 32)
    seqs = doc.get("seqs")
    if not isinstance(seqs, list) or len(seqs) > MAX_RECORDS:
        raise WireError("ack: 'seqs' must be a list of device sequences")
    return Ack(device_id, tuple(_int(s, "seq", "ack") for s in seqs))

"""Device status: what a validator says about itself on ``wire.topics.status(operator, device)`` (QoS 1, retained).

Three kinds share one message:

- ``birth``: published right after every connect;
- ``heartbeat``: every N seconds while connected (versions, journal backlog, oldest unsent tap, PSAM, last tap,
  alarms such as ``"denylist stale"`` or ``"journal 85% full"``);
- ``death``: set as the MQTT last will at connect, so the *broker* publishes it when the bus drops off without a
  DISCONNECT. Because it is signed at connect time, its ``at`` is the time of the connection it belongs to (the
  birth's ``at``), not the time of death: the back office uses that to ignore the will of an old connection that
  arrives after the device is back;
- ``goodbye``: published right before a clean DISCONNECT (the validator is stopped on purpose: end of service, a
  restart). The broker publishes no will then, so without it the back office would keep the device "online" with
  the backlog of its last heartbeat. Its ``at`` is the moment of leaving, and it carries the final backlog.

Encoding, version 1 (a heartbeat a minute is cheap, so plain JSON, kept small): the UTF-8 JSON object with short keys
and fields at their default left out, followed by 16 bytes of MAC::

    {"v":1,"k":"h","d":"bus0042","t":1709623800,"sw":"1.4.2","pv":12,"dv":305,"bl":3,"ou":1709623500,
     "ps":"010000000042","lt":1709623790,"al":["denylist stale"]} || MAC

``k`` is ``b``/``h``/``x``/``g`` (birth/heartbeat/death/goodbye); times are whole seconds since 1970 UTC; ``ou`` (oldest unsent
tap) and ``lt`` (last tap) may be absent (none). The MAC is HMAC-SHA256 under the device's key
(``wire.devicekeys.mac_key``), truncated to its first 16 bytes (128 bits), over ``b"farebox status v1\\n"`` followed
by the JSON bytes: the label keeps a status from ever being taken for any other message MAC'd with the same key.

The decoder is strict: every malformed input raises :class:`StatusError` (a ``WireError``) saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime

from wire.codec import WireError
from wire.topics import TopicError, check_segment

VERSION = 1
MAC_LEN = 16
MAX_PAYLOAD = 2048
MAX_ALARMS = 8
MAX_ALARM_LEN = 56  # 8 alarms joined by "; " fit the 500-character column the back office keeps them in
MAX_SOFTWARE_LEN = 64
_MAC_LABEL = b"farebox status v1\n"
_KINDS = {"birth": "b", "heartbeat": "h", "death": "x", "goodbye": "g"}
OFFLINE_KINDS = ("death", "goodbye")  # after these the device is not connected
_KIND_OF = {v: k for k, v in _KINDS.items()}
_PSAM = re.compile(r"[0-9a-f]{12}")
_SOFTWARE = re.compile(r"[0-9A-Za-z._+~-]*")
_MAX_INT = 2**31 - 1  # the back office stores versions and backlog as 32-bit integers
_MAX_TIME = 4102444800  # 2100-01-01: later is a broken clock, not a date


class StatusError(WireError):
    """A status message that cannot be decoded or whose MAC does not match; the text says which."""


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    kind: str  # birth | heartbeat | death | goodbye
    device_id: str
    at: datetime  # when it was said (death: when the connection it belongs to began), UTC
    software: str = ""
    params_version: int = 0
    denylist_version: int = 0
    backlog: int = 0  # journal records not yet acknowledged
    oldest_unsent: datetime | None = None
    psam: str = ""  # the PSAM's terminal number, 12 hex digits
    last_tap: datetime | None = None
    alarms: tuple[str, ...] = ()


def _time(value: datetime, what: str) -> int:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise StatusError(f"{what} must be a timezone-aware datetime, got {value!r}")
    seconds = int(value.timestamp())
    if not 0 <= seconds < _MAX_TIME:
        raise StatusError(f"{what} {value.isoformat()} is out of range")
    return seconds


def _check_alarm(alarm: object) -> str:
    if not isinstance(alarm, str) or not 1 <= len(alarm) <= MAX_ALARM_LEN:
        raise StatusError(f"an alarm is 1-{MAX_ALARM_LEN} characters of text, got {alarm!r}")
    if ";" in alarm or not alarm.isprintable():
        raise StatusError(f"alarm {alarm!r} holds ';' or an unprintable character")
    return alarm


def _check_int(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise StatusError(f"{what} must be an integer from 0 to {_MAX_INT}, got {value!r}")
    return value


def _check_fields(s: Status) -> None:
    if s.kind not in _KINDS:
        raise StatusError(f"status kind {s.kind!r} is not one of {', '.join(_KINDS)}")
    try:
        check_segment(s.device_id, "device")
    except TopicError as e:
        raise StatusError(str(e)) from None
    if not isinstance(s.software, str) or len(s.software) > MAX_SOFTWARE_LEN or not _SOFTWARE.fullmatch(s.software):
        raise StatusError(f"software version {s.software!r} must be at most {MAX_SOFTWARE_LEN} characters of "
                          "[0-9A-Za-z._+~-]")
    for name in ("params_version", "denylist_version", "backlog"):
        _check_int(getattr(s, name), name)
    if s.psam != "" and not (isinstance(s.psam, str) and _PSAM.fullmatch(s.psam)):
        raise StatusError(f"PSAM terminal id {s.psam!r} must be 12 lower-case hex digits (or empty)")
    if not isinstance(s.alarms, tuple) or len(s.alarms) > MAX_ALARMS:
        raise StatusError(f"alarms must be a tuple of at most {MAX_ALARMS}, got {s.alarms!r}")
    for alarm in s.alarms:
        _check_alarm(alarm)


def _mac(key: bytes, body: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise StatusError("a status MAC key is at least 16 bytes (wire.devicekeys.mac_key)")
    return hmac.new(bytes(key), _MAC_LABEL + body, hashlib.sha256).digest()[:MAC_LEN]


def encode_status(status: Status, *, key: bytes) -> bytes:
    _check_fields(status)
    doc: dict = {"v": VERSION, "k": _KINDS[status.kind], "d": status.device_id, "t": _time(status.at, "at")}
    optional = {"sw": status.software, "pv": status.params_version, "dv": status.denylist_version,
                "bl": status.backlog, "ps": status.psam, "al": list(status.alarms)}
    doc.update((k, v) for k, v in optional.items() if v)
    if status.oldest_unsent is not None:
        doc["ou"] = _time(status.oldest_unsent, "oldest_unsent")
    if status.last_tap is not None:
        doc["lt"] = _time(status.last_tap, "last_tap")
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return body + _mac(key, body)


_REQUIRED = {"v", "k", "d", "t"}
_KNOWN = _REQUIRED | {"sw", "pv", "dv", "bl", "ou", "ps", "lt", "al"}


def _decode_time(doc: dict, name: str, what: str) -> datetime | None:
    if name not in doc:
        return None
    value = doc[name]
    if type(value) is not int or not 0 <= value < _MAX_TIME:
        raise StatusError(f"{what} must be whole seconds since 1970 before 2100, got {value!r}")
    return datetime.fromtimestamp(value, UTC)


def decode_status(payload: bytes, *, key: bytes) -> Status:
    """The status in ``payload`` after checking its MAC with the device's ``key``; StatusError otherwise."""
    if not isinstance(payload, (bytes, bytearray)):
        raise StatusError(f"a status payload is bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise StatusError(f"status payload of {len(payload)} bytes is longer than the {MAX_PAYLOAD} allowed")
    if len(payload) < MAC_LEN + 2:
        raise StatusError(f"status payload of {len(payload)} bytes is too short to hold a message and its MAC")
    body, mac = payload[:-MAC_LEN], payload[-MAC_LEN:]
    # The MAC first: nothing of a forged or damaged message is believed, not even its version.
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise StatusError("status MAC does not match: forged, damaged, or signed with another device's key")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StatusError(f"status body is not UTF-8 JSON: {e}") from None
    if not isinstance(doc, dict):
        raise StatusError(f"status body must be a JSON object, got {type(doc).__name__}")
    if doc.get("v") != VERSION or type(doc.get("v")) is not int:
        raise StatusError(f"status format version {doc.get('v')!r} is not supported (this back office reads "
                          f"version {VERSION})")
    missing = _REQUIRED - doc.keys()
    if missing:
        raise StatusError(f"status lacks {', '.join(sorted(missing))}")
    unknown = doc.keys() - _KNOWN
    if unknown:
        raise StatusError(f"status has unknown fields {', '.join(sorted(unknown))}")
    if not isinstance(doc["k"], str) or doc["k"] not in _KIND_OF:  # a list would not even hash
        raise StatusError(f"status kind {doc['k']!r} is not one of {', '.join(_KIND_OF)}")
    alarms = doc.get("al", [])
    if not isinstance(alarms, list):
        raise StatusError(f"alarms must be a list, got {alarms!r}")
    status = Status(
        kind=_KIND_OF[doc["k"]],
        device_id=doc["d"],
        at=_decode_time(doc, "t", "at"),
        software=doc.get("sw", ""),
        params_version=doc.get("pv", 0),
        denylist_version=doc.get("dv", 0),
        backlog=doc.get("bl", 0),
        oldest_unsent=_decode_time(doc, "ou", "oldest_unsent"),
        psam=doc.get("ps", ""),
        last_tap=_decode_time(doc, "lt", "last_tap"),
        alarms=tuple(alarms),
    )
    _check_fields(status)
    return status

"""wire.status: round trips of birth, heartbeat and death; the bytes on the wire checked against a JSON body and an
HMAC computed here with hashlib; a strict decoder that refuses anything forged or malformed with StatusError."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.codec import WireError
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.status import MAC_LEN, Status, StatusError, decode_status, encode_status

KEY = mac_key(TEST_DEVICE_MASTER, "bus0042")
OTHER_KEY = mac_key(TEST_DEVICE_MASTER, "bus0043")
T0 = datetime(2024, 3, 5, 7, 30, 0, tzinfo=UTC)
T0_POSIX = calendar.timegm((2024, 3, 5, 7, 30, 0))


def heartbeat(**kw) -> Status:
    return Status(**{"kind": "heartbeat", "device_id": "bus0042", "at": T0, "software": "1.4.2",
                     "params_version": 12, "denylist_version": 305, "backlog": 3,
                     "oldest_unsent": T0 - timedelta(minutes=5), "psam": "010000000042",
                     "last_tap": T0 - timedelta(seconds=10), "alarms": ("denylist stale", "journal 85% full"),
                     **kw})


def sign(body: bytes, key: bytes = KEY) -> bytes:
    """The MAC as the module docstring specifies it, computed independently."""
    return body + hmac.new(key, b"farebox status v1\n" + body, hashlib.sha256).digest()[:16]


def body_of(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def test_heartbeat_bytes_are_the_documented_json_and_mac():
    payload = encode_status(heartbeat(), key=KEY)
    expected_doc = {"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "sw": "1.4.2", "pv": 12, "dv": 305, "bl": 3,
                    "ps": "010000000042", "al": ["denylist stale", "journal 85% full"],
                    "ou": T0_POSIX - 300, "lt": T0_POSIX - 10}
    body = payload[:-MAC_LEN]
    assert json.loads(body) == expected_doc
    assert payload == sign(body)
    assert len(payload) < 250  # a minute's heartbeat stays small on GPRS


@pytest.mark.parametrize("status", [
    heartbeat(),
    heartbeat(kind="birth", alarms=(), backlog=0),
    Status(kind="death", device_id="bus0042", at=T0),
    heartbeat(oldest_unsent=None, last_tap=None, psam="", software=""),
])
def test_round_trip(status):
    assert decode_status(encode_status(status, key=KEY), key=KEY) == status


def test_defaults_are_left_out():
    payload = encode_status(Status(kind="death", device_id="bus0042", at=T0), key=KEY)
    assert json.loads(payload[:-MAC_LEN]) == {"v": 1, "k": "x", "d": "bus0042", "t": T0_POSIX}


def test_decoded_times_are_utc():
    s = decode_status(encode_status(heartbeat(at=T0.astimezone(timezone_plus8())), key=KEY), key=KEY)
    assert s.at == T0 and s.at.tzinfo is UTC


def timezone_plus8():
    from datetime import timezone

    return timezone(timedelta(hours=8))


def test_another_devices_key_is_refused():
    payload = encode_status(heartbeat(), key=KEY)
    with pytest.raises(StatusError, match="MAC does not match"):
        decode_status(payload, key=OTHER_KEY)


def test_any_flipped_bit_is_refused():
    payload = encode_status(heartbeat(), key=KEY)
    for i in range(len(payload)):
        for bit in (0x01, 0x80):
            damaged = bytearray(payload)
            damaged[i] ^= bit
            with pytest.raises(StatusError):
                decode_status(bytes(damaged), key=KEY)


def test_status_error_is_a_wire_error():
    assert issubclass(StatusError, WireError)


@pytest.mark.parametrize("doc, reason", [
    ({"v": 2, "k": "h", "d": "bus0042", "t": T0_POSIX}, "version 2 is not supported"),
    ({"v": True, "k": "h", "d": "bus0042", "t": T0_POSIX}, "version True"),
    ({"v": 1, "k": "h", "d": "bus0042"}, "lacks t"),
    ({"v": 1, "k": "z", "d": "bus0042", "t": T0_POSIX}, "kind 'z'"),
    ({"v": 1, "k": "h", "d": "Bus 42", "t": T0_POSIX}, "cannot be a topic segment"),
    ({"v": 1, "k": "h", "d": 42, "t": T0_POSIX}, "cannot be a topic segment"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": "now"}, "whole seconds"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": 1.5}, "whole seconds"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": -1}, "whole seconds"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "x": 1}, "unknown fields x"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "pv": -1}, "params_version"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "bl": True}, "backlog"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "dv": 2**31}, "denylist_version"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "ps": "XYZ"}, "PSAM"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "sw": "1.0 beta"}, "software version"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "sw": 3}, "software version"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "al": "stale"}, "alarms must be a list"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "al": ["a;b"]}, "';'"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "al": [""]}, "an alarm is"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "al": ["x"] * 9}, "at most 8"),
    ({"v": 1, "k": "h", "d": "bus0042", "t": T0_POSIX, "lt": None}, "last_tap"),
])
def test_malformed_but_signed_bodies_are_refused_with_a_reason(doc, reason):
    with pytest.raises(StatusError, match=reason):
        decode_status(sign(body_of(doc)), key=KEY)


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[1,2]", "JSON object"),
    (b"{\"v\":1", "not UTF-8 JSON"),
])
def test_signed_garbage_is_refused(body, reason):
    with pytest.raises(StatusError, match=reason):
        decode_status(sign(body), key=KEY)


@pytest.mark.parametrize("payload, reason", [
    (b"", "too short"),
    (b"x" * 17, "too short"),
    (b"x" * 3000, "longer than"),
    ("text", "bytes"),
])
def test_wrong_sizes_and_types(payload, reason):
    with pytest.raises(StatusError, match=reason):
        decode_status(payload, key=KEY)


@pytest.mark.parametrize("status, reason", [
    (heartbeat(kind="alive"), "kind"),
    (heartbeat(at=datetime(2024, 3, 5, 7, 30)), "timezone-aware"),
    (heartbeat(alarms=["a list"]), "tuple"),
    (heartbeat(psam="0100000000FF"), "lower-case"),
])
def test_encoder_refuses_what_the_decoder_would(status, reason):
    with pytest.raises(StatusError, match=reason):
        encode_status(status, key=KEY)


def test_short_key_is_refused():
    with pytest.raises(StatusError, match="at least 16 bytes"):
        encode_status(heartbeat(), key=b"short")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_payloads_raise_only_status_error(data):
    with pytest.raises(StatusError):
        decode_status(data, key=KEY)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "k", "d", "t", "sw", "pv", "dv", "bl", "ou", "ps", "lt", "al", "q"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.text(max_size=20),
                                 st.lists(st.text(max_size=8), max_size=10), st.sampled_from(["h", "b", "x", 1])),
                       max_size=13))
def test_fuzzed_signed_documents_decode_or_raise_status_error(doc):
    try:
        status = decode_status(sign(body_of(doc)), key=KEY)
    except StatusError:
        return
    assert decode_status(encode_status(status, key=KEY), key=KEY) == status

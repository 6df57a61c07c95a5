"""The ticket_use record on the wire (wire/records.py, wire/codec.py): round trip, bytes pinned by hand, refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from wire import codec
from wire.records import RecordKind, TapRecord

KEY = bytes(range(32))
WHEN = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def use(**over) -> TapRecord:
    values = dict(device_id="bus0042", device_seq=7, kind=RecordKind.TICKET_USE, occurred_at=WHEN,
                  operator="citybus", route="12", vehicle="V7", driver="D1", shift_no=3,
                  ticket_id=0x0123456789ABCDEF, ticket_use=2, presented="qr")
    values.update(over)
    return TapRecord(**values)


def test_round_trip_v2_and_json():
    recs = [use(), use(device_seq=8, ticket_id=1234567890, ticket_use=1, presented="pickup")]
    assert codec.decode_batch(codec.encode_batch(recs, key=KEY), key=KEY).records == tuple(recs)
    assert codec.decode_batch_json(codec.encode_batch_json(recs)).records == tuple(recs)


def test_v2_bytes_by_hand():
    payload = codec.encode_batch([use()], key=KEY)
    assert payload[-12:] == hmac.new(KEY, payload[:-12], hashlib.sha256).digest()[:12]
    # the one record is the last bytes before the MAC: flags 0x04 (kind 4, nothing else), time delta 0,
    # ticket id u64be, use 2, presented 1 (qr)
    assert payload[-12 - 12:-12] == bytes([0x04, 0x00]) + bytes.fromhex("0123456789abcdef") + bytes([0x02, 0x01])


@pytest.mark.parametrize("over", [dict(ticket_use=0), dict(presented=""), dict(presented="nfc"),
                                  dict(ticket_id=-1), dict(ticket_id=1 << 64)])
def test_bad_ticket_use_is_refused_on_encode(over):
    with pytest.raises(codec.WireError):
        codec.encode_batch([use(**over)], key=KEY)


def test_other_kinds_carry_no_ticket_fields():
    with pytest.raises(codec.WireError):
        codec.encode_batch([use(kind=RecordKind.SHIFT_OPEN)], key=KEY)
    plain = dataclasses.replace(use(kind=RecordKind.SHIFT_OPEN), ticket_id=0, ticket_use=0, presented="")
    assert codec.decode_batch(codec.encode_batch([plain], key=KEY), key=KEY).records == (plain,)


def test_decoder_refuses_presented_byte_out_of_range():
    payload = bytearray(codec.encode_batch([use()], key=KEY))
    payload[-13] = 9  # presented
    body = bytes(payload[:-12])
    forged = body + hmac.new(KEY, body, hashlib.sha256).digest()[:12]
    with pytest.raises(codec.WireError, match="presented"):
        codec.decode_batch(forged, key=KEY)


def test_json_refuses_ticket_fields_on_a_tap():
    doc = codec.encode_batch_json([use()]).replace(b'"ticket_use"', b'"shift_open"', 1)
    with pytest.raises(codec.WireError):
        codec.decode_batch_json(doc)


def test_sendable_keeps_ticket_fields():
    r = use(route="R" * 100)
    assert codec.sendable(r).ticket_id == r.ticket_id and len(codec.sendable(r).route) == codec.MAX_TEXT

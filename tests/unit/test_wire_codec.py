"""wire.codec and wire.topics. Format v1 (JSON, kept for old validators) and format v2 (binary, MAC'd per device):
round trips of every record kind and of arbitrary valid records, and a strict decoder that refuses anything
malformed with WireError (never another exception). Expected JSON values and v2 bytes are written out by hand or
computed here with calendar.timegm and the standard hmac module, not read back from the codec."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import random
import struct
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import codec, topics
from wire.codec import MAX_RECORDS, Ack, Batch, MacError, WireError, decode_ack, decode_batch
from wire.codec import encode_ack_json as encode_ack
from wire.codec import encode_batch_json as encode_batch
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord

U32 = 0xFFFFFFFF
T0 = datetime(2024, 3, 5, 7, 30, 0, tzinfo=UTC)
T0_POSIX = calendar.timegm((2024, 3, 5, 7, 30, 0))  # 1709623800, independent of the codec


def rec(kind: RecordKind = RecordKind.PURCHASE, seq: int = 1, **kw) -> TapRecord:
    base = {
        "device_id": "bus0042",
        "device_seq": seq,
        "kind": kind,
        "occurred_at": T0,
        "operator": "citybus",
        "route": "r12",
        "vehicle": "v7",
        "driver": "D1001",
        "shift_no": 3,
    }
    if kind is RecordKind.PURCHASE:
        base.update(
            card_asn="31000000000000012345",
            card_type=1,
            card_ttc=7,
            amount=200,
            balance_after=800,
            terminal_id="010000000042",
            terminal_seq=9,
            tac="620098f7",
        )
    base.update(kw)
    return TapRecord(**base)


def valid_doc(**record_overrides) -> dict:
    """A hand-written valid batch document (one purchase), for mutating into malformed ones."""
    record = {
        "kind": "purchase",
        "device_seq": 1,
        "t": T0_POSIX,
        "route": "r12",
        "card_asn": "31000000000000012345",
        "amount": 200,
        "terminal_id": "010000000042",
        "tac": "620098f7",
    }
    record.update(record_overrides)
    return {"v": 1, "device": "bus0042", "operator": "citybus", "records": [record]}


def dump(doc) -> bytes:
    return json.dumps(doc).encode()


# --------------------------------------------------------------------------------------- v1 JSON round trips


@pytest.mark.parametrize(
    "record",
    [
        rec(RecordKind.PURCHASE),
        rec(RecordKind.PURCHASE, reason="MAC2 did not verify: 9302"),
        rec(RecordKind.SHIFT_OPEN, card_asn="31000000000000099999", card_type=5),
        rec(RecordKind.SHIFT_CLOSE, reason="handed over to D1002"),
        rec(
            RecordKind.DENIED,
            card_asn="31000000000000054321",
            card_type=2,
            reason="on deny list",
            driver="",
            shift_no=0,
        ),
    ],
    ids=lambda r: r.kind.value + ("+reason" if r.reason else ""),
)
def test_round_trip_every_kind(record):
    assert decode_batch(encode_batch([record])) == Batch("bus0042", "citybus", (record,), 1, False)


def test_encoded_form_is_the_documented_json():
    doc = json.loads(encode_batch([rec(RecordKind.PURCHASE), rec(RecordKind.SHIFT_CLOSE, seq=2)]))
    assert doc["v"] == 1 and doc["device"] == "bus0042" and doc["operator"] == "citybus"
    purchase, close = doc["records"]
    assert purchase == {
        "kind": "purchase",
        "device_seq": 1,
        "t": T0_POSIX,
        "route": "r12",
        "vehicle": "v7",
        "driver": "D1001",
        "shift_no": 3,
        "card_asn": "31000000000000012345",
        "card_type": 1,
        "card_ttc": 7,
        "amount": 200,
        "balance_after": 800,
        "terminal_id": "010000000042",
        "terminal_seq": 9,
        "tac": "620098f7",
    }
    # defaults are left out; the shared header fields never repeat per record
    assert close == {
        "kind": "shift_close",
        "device_seq": 2,
        "t": T0_POSIX,
        "route": "r12",
        "vehicle": "v7",
        "driver": "D1001",
        "shift_no": 3,
    }


def test_decoded_time_is_utc_whole_seconds():
    record = decode_batch(dump(valid_doc())).records[0]
    assert record.occurred_at == T0 and record.occurred_at.utcoffset().total_seconds() == 0


def test_device_seq_zero_survives_although_it_is_the_default():
    record = rec(RecordKind.SHIFT_OPEN, seq=0)
    assert decode_batch(encode_batch([record])).records[0].device_seq == 0


def test_max_records_is_accepted():
    records = [rec(RecordKind.SHIFT_OPEN, seq=i) for i in range(1, MAX_RECORDS + 1)]
    assert len(decode_batch(encode_batch(records)).records) == MAX_RECORDS


hexes = lambda n: st.text("0123456789abcdef", min_size=n, max_size=n)
names = st.text(max_size=64)
u32 = st.integers(0, U32)


@st.composite
def records(draw, device: str, operator: str):
    kind = draw(st.sampled_from(list(RecordKind)))
    purchase = kind is RecordKind.PURCHASE
    return TapRecord(
        device_id=device,
        device_seq=draw(u32),
        kind=kind,
        occurred_at=datetime.fromtimestamp(draw(u32), tz=UTC),
        operator=operator,
        route=draw(names),
        vehicle=draw(names),
        driver=draw(names),
        shift_no=draw(u32),
        card_asn=draw(hexes(20)) if purchase else draw(st.one_of(st.just(""), hexes(20))),
        card_type=draw(u32),
        card_ttc=draw(u32),
        amount=draw(u32),
        balance_after=draw(u32),
        terminal_id=draw(hexes(12)) if purchase else draw(st.one_of(st.just(""), hexes(12))),
        terminal_seq=draw(u32),
        tac=draw(hexes(8)) if purchase else draw(st.one_of(st.just(""), hexes(8))),
        reason=draw(names),
        **(dict(ticket_id=draw(st.integers(0, 2**64 - 1)), ticket_use=draw(st.integers(1, U32)),
                presented=draw(st.sampled_from(["qr", "pickup"]))) if kind is RecordKind.TICKET_USE else {}),
    )


@st.composite
def batches(draw):
    device, operator = draw(st.text(max_size=32)), draw(st.text(max_size=32))
    return device, operator, draw(st.lists(records(device, operator), min_size=1, max_size=8))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_round_trip_any_valid_batch(batch):
    device, operator, recs = batch
    assert decode_batch(encode_batch(recs)) == Batch(device, operator, tuple(recs), 1, False)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=32), st.lists(u32, max_size=50))
def test_ack_round_trip(device, seqs):
    assert decode_ack(encode_ack(device, seqs)) == Ack(device, tuple(sorted(seqs)), False)


# --------------------------------------------------------------------------------------- encode refusals


def test_encode_refuses_empty_batch():
    with pytest.raises(WireError):
        encode_batch([])


def test_encode_refuses_a_batch_mixing_devices():
    with pytest.raises(WireError, match="one device"):
        encode_batch([rec(seq=1), rec(seq=2, device_id="bus0043")])


def test_encode_refuses_a_batch_mixing_operators():
    with pytest.raises(WireError):
        encode_batch([rec(seq=1), rec(seq=2, operator="otherbus")])


# --------------------------------------------------------------------------------------- decode refusals

MALFORMED_BATCHES = {
    "not bytes": "a str, not bytes",
    "empty": b"",
    "not json": b"{v:1",
    "not utf-8": b'{"v":1,"device":"\xff\xfe"}',
    "json array": b"[1,2]",
    "json string": b'"hello"',
    "json null": b"null",
    "no version": dump({k: v for k, v in valid_doc().items() if k != "v"}),
    "version 2": dump({**valid_doc(), "v": 2}),
    "version string": dump({**valid_doc(), "v": "1"}),
    "version 0": dump({**valid_doc(), "v": 0}),
    "no device": dump({k: v for k, v in valid_doc().items() if k != "device"}),
    "device int": dump({**valid_doc(), "device": 42}),
    "device too long": dump({**valid_doc(), "device": "d" * 33}),
    "operator null": dump({**valid_doc(), "operator": None}),
    "records missing": dump({k: v for k, v in valid_doc().items() if k != "records"}),
    "records empty": dump({**valid_doc(), "records": []}),
    "records object": dump({**valid_doc(), "records": {"0": {}}}),
    "too many records": dump({**valid_doc(), "records": valid_doc()["records"] * (MAX_RECORDS + 1)}),
    "record not object": dump({**valid_doc(), "records": [[1, 2]]}),
    "unknown field": dump(valid_doc(colour="red")),
    "device_id inside record": dump(valid_doc(device_id="bus0042")),
    "occurred_at instead of t": dump(valid_doc(occurred_at=T0_POSIX)),
    "no kind": dump(
        {**valid_doc(), "records": [{k: v for k, v in valid_doc()["records"][0].items() if k != "kind"}]}
    ),
    "unknown kind": dump(valid_doc(kind="refund")),
    "kind list": dump(valid_doc(kind=["purchase"])),
    "kind object": dump(valid_doc(kind={"purchase": 1})),
    "no device_seq": dump(
        {
            **valid_doc(),
            "records": [{k: v for k, v in valid_doc()["records"][0].items() if k != "device_seq"}],
        }
    ),
    "no t": dump(
        {**valid_doc(), "records": [{k: v for k, v in valid_doc()["records"][0].items() if k != "t"}]}
    ),
    "seq string": dump(valid_doc(device_seq="1")),
    "seq float": dump(valid_doc(device_seq=1.0)),
    "seq true": dump(valid_doc(device_seq=True)),
    "amount false": dump(valid_doc(amount=False)),
    "amount negative": dump(valid_doc(amount=-1)),
    "amount over u32": dump(valid_doc(amount=U32 + 1)),
    "t negative": dump(valid_doc(t=-1)),
    "t over u32": dump(valid_doc(t=U32 + 1)),
    "t float": dump(valid_doc(t=1.5)),
    "shift_no null": dump(valid_doc(shift_no=None)),
    "card_ttc huge": dump(valid_doc(card_ttc=10**30)),
    "amount NaN": dump(valid_doc()).replace(b'"amount": 200', b'"amount": NaN'),
    "amount Infinity": dump(valid_doc()).replace(b'"amount": 200', b'"amount": Infinity'),
    "amount 1e400": dump(valid_doc()).replace(b'"amount": 200', b'"amount": 1e400'),
    "route int": dump(valid_doc(route=12)),
    "route too long": dump(valid_doc(route="r" * 65)),
    "tac upper-case": dump(valid_doc(tac="620098F7")),
    "tac not hex": dump(valid_doc(tac="62009zf7")),
    "tac short": dump(valid_doc(tac="620098f")),
    "tac long": dump(valid_doc(tac="620098f70")),
    "tac int": dump(valid_doc(tac=620098)),
    "asn 0x prefix": dump(valid_doc(card_asn="0x000000000000012345")),
    "asn spaces": dump(valid_doc(card_asn="3100 0000 0000 0001 23")),
    "terminal_id short": dump(valid_doc(terminal_id="0100000000")),
    "purchase without tac": dump(
        {**valid_doc(), "records": [{k: v for k, v in valid_doc()["records"][0].items() if k != "tac"}]}
    ),
    "purchase without asn": dump(
        {**valid_doc(), "records": [{k: v for k, v in valid_doc()["records"][0].items() if k != "card_asn"}]}
    ),
    "purchase without terminal": dump(
        {
            **valid_doc(),
            "records": [{k: v for k, v in valid_doc()["records"][0].items() if k != "terminal_id"}],
        }
    ),
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("payload", list(MALFORMED_BATCHES.values()), ids=list(MALFORMED_BATCHES))
def test_decode_batch_refuses_with_wire_error(payload):
    with pytest.raises(WireError):
        decode_batch(payload)


def test_the_valid_base_document_itself_decodes():
    # the refusals above differ from this document by one thing each
    batch = decode_batch(dump(valid_doc()))
    assert batch.records[0].amount == 200 and batch.records[0].tac == "620098f7"


MALFORMED_ACKS = {
    "not json": b"ack",
    "version 2": b'{"v":2,"device":"d","seqs":[1]}',
    "no device": b'{"v":1,"seqs":[1]}',
    "device list": b'{"v":1,"device":["d"],"seqs":[1]}',
    "no seqs": b'{"v":1,"device":"d"}',
    "seqs object": b'{"v":1,"device":"d","seqs":{"1":1}}',
    "seq string": b'{"v":1,"device":"d","seqs":["1"]}',
    "seq bool": b'{"v":1,"device":"d","seqs":[true]}',
    "seq negative": b'{"v":1,"device":"d","seqs":[-5]}',
    "seq over u32": b'{"v":1,"device":"d","seqs":[4294967296]}',
    "seq float": b'{"v":1,"device":"d","seqs":[2.0]}',
    "too many seqs": dump({"v": 1, "device": "d", "seqs": list(range(MAX_RECORDS + 1))}),
}


@pytest.mark.parametrize("payload", list(MALFORMED_ACKS.values()), ids=list(MALFORMED_ACKS))
def test_decode_ack_refuses_with_wire_error(payload):
    with pytest.raises(WireError):
        decode_ack(payload)


@pytest.mark.parametrize("decode", [decode_batch, decode_ack])
def test_decode_refuses_a_5000_digit_integer_with_wire_error(decode):
    payload = b'{"v":1,"device":"d","operator":"o","seqs":[' + b"7" * 5000 + b'],"records":[]}'
    with pytest.raises(WireError):
        decode(payload)


@pytest.mark.parametrize("version", [True, 1.0], ids=["true", "1.0"])
def test_decode_refuses_a_version_that_is_not_the_integer_1(version):
    with pytest.raises(WireError):
        decode_batch(dump({**valid_doc(), "v": version}))


def test_decode_refuses_hex_with_a_trailing_newline():
    with pytest.raises(WireError):
        decode_batch(dump(valid_doc(tac="620098f\n")))


def test_decode_refuses_strings_that_are_not_unicode_text():
    payload = dump(valid_doc(route="\ud800"))
    try:
        batch = decode_batch(payload)
    except WireError:
        return
    encode_batch(list(batch.records))  # whatever was accepted must go on to the next hop
    pytest.fail("a lone surrogate was accepted")


# --------------------------------------------------------------------------------------- fuzz

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)

RECORD_KEYS = [
    "kind",
    "device_seq",
    "t",
    "route",
    "vehicle",
    "driver",
    "shift_no",
    "card_asn",
    "card_type",
    "card_ttc",
    "amount",
    "balance_after",
    "terminal_id",
    "terminal_seq",
    "tac",
    "reason",
    "extra",
]


def _decodes_or_wire_error(decode, payload: bytes) -> None:
    try:
        decode(payload)
    except WireError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_bytes_raise_only_wire_error(payload):
    _decodes_or_wire_error(decode_batch, payload)
    _decodes_or_wire_error(decode_ack, payload)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_json_values_raise_only_wire_error(value):
    payload = json.dumps(value).encode()
    _decodes_or_wire_error(decode_batch, payload)
    _decodes_or_wire_error(decode_ack, payload)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(["v", "device", "operator", "records", "seqs"]), json_values, max_size=3),
    st.dictionaries(st.sampled_from(RECORD_KEYS), json_values, max_size=4),
)
def test_fuzz_near_valid_documents_raise_only_wire_error(top_changes, record_changes):
    doc = valid_doc(**record_changes)
    doc["seqs"] = [1, 2]
    doc.update(top_changes)
    payload = json.dumps(doc).encode()
    _decodes_or_wire_error(decode_batch, payload)
    _decodes_or_wire_error(decode_ack, payload)


# --------------------------------------------------------------------------------------- topics


def test_topic_names():
    assert topics.taps("citybus", "bus0042") == "farebox/v1/citybus/bus0042/taps"
    assert topics.ack("citybus", "bus0042") == "farebox/v1/citybus/bus0042/ack"
    assert topics.ALL_TAPS == "farebox/v1/+/+/taps"


@pytest.mark.parametrize("make", [topics.taps, topics.ack])
def test_topics_parse_round_trip(make):
    topic = make("op_1", "bus_0042")
    assert topics.parse(topic) == ("op_1", "bus_0042", topic.rsplit("/", 1)[1])


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"\A[0-9a-z][0-9a-z_]{0,31}\Z"), st.from_regex(r"\A[0-9a-z][0-9a-z_]{0,31}\Z"))
def test_topics_round_trip_any_valid_segments(operator, device):
    assert topics.parse(topics.taps(operator, device)) == (operator, device, "taps")
    assert topics.parse(topics.ack(operator, device)) == (operator, device, "ack")


BAD_SEGMENTS = ["", "Bus1", "bus-1", "bus/1", "bus 1", "+", "#", "bus.1", "d" * 33, "bü"]


@pytest.mark.parametrize("bad", BAD_SEGMENTS)
def test_topic_builders_refuse_bad_segments(bad):
    with pytest.raises(topics.TopicError):
        topics.taps(bad, "bus1")
    with pytest.raises(topics.TopicError):
        topics.ack("op", bad)


@pytest.mark.parametrize(
    "topic",
    [
        "farebox/v1/op/bus1",
        "farebox/v1/op/bus1/taps/x",
        "farebox/v2/op/bus1/taps",
        "fb/v1/op/bus1/taps",
        "farebox/v1/Op/bus1/taps",
        "farebox/v1/op/bus-1/taps",
        "farebox/v1//bus1/taps",
        "farebox/v1/+/bus1/taps",
        "/farebox/v1/op/bus1/taps",
        "",
        "farebox/v1/op/" + "d" * 33 + "/taps",
    ],
)
def test_parse_refuses_bad_topics(topic):
    with pytest.raises(topics.TopicError):
        topics.parse(topic)


def test_segments_with_a_trailing_newline_are_refused():
    with pytest.raises(topics.TopicError):
        topics.taps("op", "bus1\n")


@pytest.mark.parametrize("message", ["", "TAPS", "#", "ta ps"])
def test_parse_refuses_a_bad_message_segment(message):
    with pytest.raises(topics.TopicError):
        topics.parse(f"farebox/v1/op/bus1/{message}")


# ======================================================================================= format v2 (binary, MAC'd)

KEY = mac_key(TEST_DEVICE_MASTER, "bus0042")
OTHER_KEY = mac_key(TEST_DEVICE_MASTER, "bus0043")


def tag(data: bytes, key: bytes = KEY) -> bytes:
    """The MAC the layout documents, computed here with the standard library alone."""
    return hmac.new(key, data, hashlib.sha256).digest()[:12]


def signed(data: bytes, key: bytes = KEY) -> bytes:
    return data + tag(data, key)


def uv(n: int) -> bytes:
    """An unsigned LEB128 varint, written independently of the codec."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def lp(s: str) -> bytes:
    raw = s.encode()
    return uv(len(raw)) + raw


@pytest.mark.parametrize(
    "record",
    [
        rec(RecordKind.PURCHASE),
        rec(RecordKind.PURCHASE, reason="transfer from r7", full_fare=200, amount=100, algorithm=0x04),
        rec(RecordKind.PURCHASE, tx_type=0x09, entry_stop=3, exit_stop=11, amount=0, full_fare=0),
        rec(RecordKind.SHIFT_OPEN, card_asn="31000000000000099999", card_type=5),
        rec(RecordKind.SHIFT_CLOSE, reason="handed over to D1002"),
        rec(RecordKind.DENIED, card_asn="31000000000000054321", card_type=2, reason="on deny list", driver="",
            shift_no=0),
    ],
    ids=lambda r: r.kind.value + ("+reason" if r.reason else ""),
)
def test_v2_round_trip_every_kind(record):
    payload = codec.encode_batch([record], key=KEY)
    assert payload[:3] == b"\xfb\x02\x01"
    assert decode_batch(payload, key=KEY) == Batch("bus0042", "citybus", (record,), 2, True)


# Every field independently, on every kind: exact round trip is the contract.
@st.composite
def v2_records(draw, device: str, operator: str):
    kind = draw(st.sampled_from(list(RecordKind)))
    purchase = kind is RecordKind.PURCHASE
    small = st.one_of(st.integers(0, 300), u32)
    opt_hex = lambda n: hexes(n) if purchase else st.one_of(st.just(""), hexes(n))
    return TapRecord(
        device_id=device, device_seq=draw(small), kind=kind,
        occurred_at=datetime.fromtimestamp(draw(u32), tz=UTC), operator=operator,
        route=draw(names), vehicle=draw(names), driver=draw(names), shift_no=draw(small),
        card_asn=draw(opt_hex(20)), card_type=draw(small), card_ttc=draw(small), amount=draw(small),
        balance_after=draw(small), terminal_id=draw(opt_hex(12)), terminal_seq=draw(small), tac=draw(opt_hex(8)),
        reason=draw(names), tx_type=draw(st.sampled_from([0x06, 0x09]) | u32),
        algorithm=draw(st.sampled_from([0x00, 0x04]) | u32), full_fare=draw(small), entry_stop=draw(small),
        exit_stop=draw(small),
        **(dict(ticket_id=draw(st.integers(0, 2**64 - 1)), ticket_use=draw(st.integers(1, U32)),
                presented=draw(st.sampled_from(["qr", "pickup"]))) if kind is RecordKind.TICKET_USE else {}),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=32), st.text(max_size=32), st.data())
def test_v2_round_trip_any_valid_batch(device, operator, data):
    recs = data.draw(st.lists(v2_records(device, operator), min_size=1, max_size=12))
    payload = codec.encode_batch(recs, key=KEY)
    assert decode_batch(payload, key=KEY) == Batch(device, operator, tuple(recs), 2, True)
    assert payload[-12:] == tag(payload[:-12])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(-3, 3), st.integers(-2, 2), st.booleans()),
                min_size=1, max_size=60))
def test_v2_round_trip_realistic_runs(steps):
    """Runs like a bus makes them (seconds apart, sequences and PSAM counters mostly +1) with the odd gap,
    clock step back, repeated counter and a shift event in between: every prediction and its correction."""
    recs, t, seq, tseq = [], T0_POSIX, 100, 5000
    for dt, dseq, dtseq, shift_event in steps:
        t, seq, tseq = max(0, t + dt - 2 * (dt == 1)), max(0, seq + 1 + (dseq if dseq in (-3, 3) else 0)), \
            max(0, tseq + 1 + dtseq)
        kind = RecordKind.SHIFT_OPEN if shift_event else RecordKind.PURCHASE
        recs.append(rec(kind, seq=seq, occurred_at=datetime.fromtimestamp(t, tz=UTC), terminal_seq=tseq)
                    if not shift_event else rec(kind, seq=seq, occurred_at=datetime.fromtimestamp(t, tz=UTC)))
    assert decode_batch(codec.encode_batch(recs, key=KEY), key=KEY).records == tuple(recs)


def test_v2_byte_layout_of_a_small_batch_matches_bytes_built_by_hand():
    purchase = TapRecord(
        device_id="bus1", device_seq=7, kind=RecordKind.PURCHASE, occurred_at=T0, operator="op", route="r12",
        vehicle="v7", driver="D1", shift_no=3, card_asn="31000000000000012345", card_type=1, card_ttc=7,
        amount=200, balance_after=800, terminal_id="010000000042", terminal_seq=9, tac="620098f7", tx_type=0x09,
        full_fare=200)
    close = TapRecord(
        device_id="bus1", device_seq=8, kind=RecordKind.SHIFT_CLOSE,
        occurred_at=datetime(2024, 3, 5, 7, 30, 5, tzinfo=UTC), operator="op", route="r12", vehicle="v7",
        driver="D1", shift_no=3, reason="handed over")
    key = mac_key(TEST_DEVICE_MASTER, "bus1")
    header = (
        bytes([0xFB, 0x02, 0x01])  # magic, format version 2, message type tap batch
        + b"\x04bus1" + b"\x02op"  # device id, operator
        + b"\x02"  # two records
        + bytes.fromhex("65e6c9f8")  # 2024-03-05 07:30:00 UTC = 1709623800 (calendar.timegm), big-endian
        + b"\x07"  # first device_seq
        + b"\x04" + b"\x03r12" + b"\x02v7" + b"\x02D1" + b"\x0bhanded over"  # string table, in order of use
        + b"\x01" + bytes.fromhex("010000000042")  # terminal table
        + b"\x01\x09"  # first purchase: terminal 1 of the table, terminal_seq 9
        + b"\x00\x01\x02\x03"  # context: route r12, vehicle v7, driver D1, shift 3
        + b"\x09\x00"  # purchases are composite (09), 3DES (00)
    )
    rec1 = (
        b"\x00"  # flags: purchase, everything as predicted
        + b"\x00"  # time: +0 s
        + bytes.fromhex("31000000000000012345")  # ASN
        + b"\x01" + b"\x07" + b"\xc8\x01" + b"\xa0\x06"  # card_type 1, TTC 7, amount 200, balance 800
        + bytes.fromhex("620098f7")  # TAC
    )
    rec2 = (
        b"\x22"  # flags: kind 2 (shift_close) | REASON (bit 5)
        + b"\x0a"  # time: +5 s, zigzag
        + b"\x03"  # reason: string 3
    )
    body = header + rec1 + rec2
    expected = body + hmac.new(key, body, hashlib.sha256).digest()[:12]
    assert codec.encode_batch([purchase, close], key=key) == expected
    assert decode_batch(expected, key=key).records == (purchase, close)
    assert struct.unpack(">I", header[12:16])[0] == T0_POSIX


def typical_bus(n: int, seed: int = 7) -> list[TapRecord]:
    """What the issue calls typical: one bus, route, driver, PSAM; consecutive sequences; seconds apart; random
    cards; fares 0..500 fen."""
    rnd = random.Random(seed)
    t, out = T0_POSIX, []
    for i in range(n):
        t += rnd.randint(1, 40)
        amount = rnd.randint(0, 500)
        out.append(rec(seq=10_000 + i, occurred_at=datetime.fromtimestamp(t, tz=UTC),
                       card_asn=rnd.randbytes(10).hex(), card_type=rnd.choice([1, 1, 1, 2, 3]),
                       card_ttc=rnd.randint(0, 3000), amount=amount, full_fare=amount,
                       balance_after=rnd.randint(0, 50_000), terminal_seq=7_000 + i, tac=rnd.randbytes(4).hex(),
                       tx_type=0x09, algorithm=rnd.choice([0x00, 0x00, 0x00, 0x04])))
    return out


def test_v2_a_typical_batch_of_50_fits_the_32_bytes_a_tap_goal():
    recs = typical_bus(50)
    payload = codec.encode_batch(recs, key=KEY)
    assert len(payload) / 50 <= 32, len(payload)
    assert decode_batch(payload, key=KEY).records == tuple(recs)


def test_v2_mac_is_hmac_sha256_truncated_to_12_bytes_over_everything_before_it():
    payload = codec.encode_batch(typical_bus(5), key=KEY)
    assert payload[-12:] == hmac.new(KEY, payload[:-12], hashlib.sha256).digest()[:12]
    ack = codec.encode_ack("bus0042", [1, 2, 3], key=KEY)
    assert ack[-12:] == hmac.new(KEY, ack[:-12], hashlib.sha256).digest()[:12]


def test_v2_batch_moved_to_another_device_fails_its_mac():
    payload = codec.encode_batch([rec()], key=KEY)
    with pytest.raises(MacError):
        decode_batch(payload, key=OTHER_KEY)
    # and re-labelled as the other device inside, still under the first device's MAC: refused too
    forged = payload.replace(b"\x07bus0042", b"\x07bus0043")
    assert forged != payload
    with pytest.raises(MacError):
        decode_batch(forged, key=OTHER_KEY)


def test_v2_needs_the_key():
    with pytest.raises(MacError, match="key"):
        decode_batch(codec.encode_batch([rec()], key=KEY), key=None)


def test_v2_a_flipped_bit_anywhere_is_refused():
    payload = codec.encode_batch([rec(), rec(RecordKind.SHIFT_CLOSE, seq=2, reason="end")], key=KEY)
    for i in range(len(payload) * 8):
        flipped = bytearray(payload)
        flipped[i // 8] ^= 1 << (i % 8)
        expected = MacError if i >= 24 else WireError  # past magic, version and type, only the MAC can tell
        with pytest.raises(expected):
            decode_batch(bytes(flipped), key=KEY)


def test_key_none_still_writes_v1_json_during_the_transition():
    assert codec.encode_batch([rec()])[:1] == b"{"
    assert codec.encode_ack("bus0042", [1])[:1] == b"{"
    assert decode_batch(codec.encode_batch([rec()]), key=KEY).signed is False


# --- strict decoding: hand-made malformed messages, each signed correctly so the parser behind the MAC is reached

def good_header(n: int = 1, strings=("r12", "v7", "D1"), terminals=("010000000042",), seq0: bytes = b"\x07",
                ctx: bytes = b"\x00\x01\x02\x03", term: bytes = b"\x01\x09") -> bytes:
    return (b"\xfb\x02\x01" + lp("bus0042") + lp("citybus") + uv(n) + bytes.fromhex("65e6c9f8") + seq0
            + uv(len(strings)) + b"".join(lp(s) for s in strings)
            + uv(len(terminals)) + b"".join(bytes.fromhex(t) for t in terminals) + term + ctx + b"\x09\x00")


PURCHASE_BODY = b"\x00" + bytes.fromhex("31000000000000012345") + b"\x01\x07\xc8\x01\xa0\x06" + \
    bytes.fromhex("620098f7")


def purchase_rec(flags: bytes = b"\x00", extra: bytes = b"") -> bytes:
    return flags + PURCHASE_BODY + extra


MALFORMED_V2 = {  # name: (body before the MAC, what the error must say)
    "truncated record": (good_header() + purchase_rec()[:-1], "truncated"),
    "count mismatch: one record missing": (good_header(n=2) + purchase_rec(), "count mismatch"),
    "trailing bytes": (good_header() + purchase_rec() + b"\x00", "trailing bytes"),
    "zero records": (good_header(n=0), "at least one record"),
    "too many records announced": (good_header(n=MAX_RECORDS + 1) + purchase_rec(), "record count"),
    "varint overflow": (good_header(seq0=b"\xff\xff\xff\xff\xff\x01") + purchase_rec(), "varint overflow"),
    "varint not minimal": (good_header(seq0=b"\x87\x00") + purchase_rec(), "shortest form"),
    "seq0 over u32": (good_header(seq0=uv(2**32)) + purchase_rec(), "out of range"),
    "seq overflow in second record": (good_header(n=2, seq0=uv(2**32 - 1)) + purchase_rec() + purchase_rec(),
                                      "sequence overflow"),
    "seq below zero": (good_header(seq0=b"\x00") + b"\x40\x01" + PURCHASE_BODY, "sequence overflow"),
    "amount over u32": (good_header() + b"\x00\x00" + bytes.fromhex("31000000000000012345") + b"\x01\x07"
                        + uv(2**32) + b"\xa0\x06" + bytes.fromhex("620098f7"), "amount 4294967296 out of range"),
    "string index out of table": (good_header(ctx=b"\x00\x01\x09\x03") + purchase_rec(), "outside the string"),
    "terminal index out of table": (good_header(term=b"\x02\x09") + purchase_rec(), "outside the terminal"),
    "string not utf-8": (good_header().replace(b"\x02D1", b"\x02\xff\xfe") + purchase_rec(), "not UTF-8"),
    "string longer than 64 characters": (good_header(strings=("r" * 65, "v7", "D1")) + purchase_rec(),
                                         "longer than 64"),
    "string length beyond the message": (good_header().replace(b"\x03r12", b"\x7fr12") + purchase_rec(),
                                         "truncated"),
    "string count beyond the message": (good_header().replace(b"\x03\x03r12", b"\xff\x7f\x03r12") + purchase_rec(),
                                        "string count"),
    "unknown kind": (good_header() + purchase_rec(b"\x05"), "unknown record kind 5"),
    "unknown flag bit": (good_header() + purchase_rec(b"\x80\x80\x01"), "unknown flag bits"),
    "purchase setting its implied ASN flag": (good_header() + purchase_rec(b"\x80\x10"), "always carries"),
    "purchase without a terminal": (good_header(terminals=(), term=b"\x00\x00") + purchase_rec(),
                                    "purchase needs a terminal"),
    "purchase with terminal index 0": (good_header() + purchase_rec(b"\x80\x02", b"\x00\x00"),
                                       "purchase needs a terminal"),
    "terminal_seq overflow": (good_header(term=b"\x01" + uv(2**32 - 1)) + purchase_rec(b"\x80\x02", b"\x01\x02"),
                              "sequence overflow"),
}


def test_time_below_zero_is_refused():
    header = good_header().replace(bytes.fromhex("65e6c9f8"), b"\x00\x00\x00\x00")
    with pytest.raises(WireError, match="out of range"):
        decode_batch(signed(header + b"\x00\x01" + PURCHASE_BODY[1:]), key=KEY)


def test_the_hand_made_base_message_itself_decodes():
    # each malformed message above differs from this one by one thing
    batch = decode_batch(signed(good_header() + purchase_rec()), key=KEY)
    assert batch.records == (rec(seq=7, driver="D1", tx_type=9, full_fare=200),)


@pytest.mark.parametrize(("body", "match"), list(MALFORMED_V2.values()), ids=list(MALFORMED_V2))
def test_v2_decode_refuses_malformed_signed_messages(body, match):
    with pytest.raises(WireError, match=match) as info:
        decode_batch(signed(body), key=KEY)
    assert not isinstance(info.value, MacError)  # the parser refused it, not the MAC


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\xfb\x03\x01" + b"\x00" * 20, "unsupported format version 3: upgrade the back office"),
        (b"\xfb\x09", "unsupported format version 9: upgrade the back office"),
        (b"\xfb\x00\x01" + b"\x00" * 20, "unknown format version 0"),
        (b"\xfb", "truncated"),
        (b"\xfb\x02\x01", "truncated"),
        (b"\xfb\x02\x02" + b"\x00" * 20, "message type"),
        (b"\x00\x01\x02", "unknown format"),
        (b"", "empty"),
    ],
)
def test_v2_dispatch_refusals(payload, match):
    with pytest.raises(WireError, match=match):
        decode_batch(payload, key=KEY)


def test_a_newer_format_is_refused_before_its_mac_is_read():
    newer = signed(b"\xfb\x03\x01" + b"whatever a v3 holds")
    with pytest.raises(WireError, match="^unsupported format version 3: upgrade the back office$"):
        decode_batch(newer, key=KEY)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"amount": U32 + 1}, "amount"),
        ({"amount": -1}, "amount"),
        ({"device_seq": True}, "device_seq"),
        ({"tac": ""}, "purchase needs"),
        ({"card_asn": ""}, "purchase needs"),
        ({"terminal_id": ""}, "purchase needs"),
        ({"tac": "620098F7"}, "tac"),
        ({"route": "r" * 65}, "route"),
        ({"reason": "\ud800"}, "reason"),
        ({"occurred_at": datetime(2024, 3, 5, 7, 30, 0, 500, tzinfo=UTC)}, "whole seconds"),
        ({"occurred_at": datetime(2107, 1, 1, tzinfo=UTC)}, "occurred_at"),
    ],
)
def test_v2_encode_refuses_what_the_decoder_would_refuse(change, match):
    with pytest.raises(WireError, match=match):
        codec.encode_batch([rec(**change)], key=KEY)


def test_v2_encode_refuses_mixed_devices_and_too_many_records():
    with pytest.raises(WireError, match="one device"):
        codec.encode_batch([rec(seq=1), rec(seq=2, device_id="bus0043")], key=KEY)
    with pytest.raises(WireError, match="at most"):
        codec.encode_batch([rec(seq=i) for i in range(MAX_RECORDS + 1)], key=KEY)


def test_v2_max_records_round_trips():
    recs = [rec(RecordKind.SHIFT_OPEN, seq=i) for i in range(MAX_RECORDS)]
    assert decode_batch(codec.encode_batch(recs, key=KEY), key=KEY).records == tuple(recs)


# --- acks v2


def test_v2_ack_byte_layout_built_by_hand():
    body = (b"\xfb\x02\x02" + b"\x07bus0042"
            + b"\x02"  # two ranges
            + uv(1000) + uv(49)  # 1000..1049
            + uv(1060 - 1049 - 2) + uv(0))  # 1060 alone
    expected = body + hmac.new(KEY, body, hashlib.sha256).digest()[:12]
    seqs = list(range(1000, 1050)) + [1060]
    assert codec.encode_ack("bus0042", reversed(seqs), key=KEY) == expected
    assert decode_ack(expected, key=KEY) == Ack("bus0042", tuple(seqs), True)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=32), st.lists(st.one_of(st.integers(0, 200), u32), max_size=60))
def test_v2_ack_round_trip(device, seqs):
    assert decode_ack(codec.encode_ack(device, seqs, key=KEY), key=KEY) == Ack(device, tuple(sorted(set(seqs))))


def ack_body(*ranges: bytes, n: int | None = None) -> bytes:
    return b"\xfb\x02\x02" + b"\x07bus0042" + uv(len(ranges) if n is None else n) + b"".join(ranges)


MALFORMED_ACKS_V2 = {
    "truncated": ack_body(uv(5)),
    "count mismatch": ack_body(uv(5) + uv(0), n=2),
    "trailing bytes": ack_body(uv(5) + uv(0)) + b"\x00",
    "range beyond u32": ack_body(uv(2**32 - 1) + uv(1)),
    "more than MAX_RECORDS sequences in one range": ack_body(uv(0) + uv(2**31)),
    "more than MAX_RECORDS sequences in all": ack_body(*[uv(0) + uv(600)] * 2),
    "too many ranges": ack_body(uv(0) + uv(0), n=MAX_RECORDS + 1),
    "varint overflow": ack_body(b"\x80\x80\x80\x80\x80\x01"),
    "device id not utf-8": b"\xfb\x02\x02\x02\xc3\x28" + uv(0),
}


@pytest.mark.parametrize("body", list(MALFORMED_ACKS_V2.values()), ids=list(MALFORMED_ACKS_V2))
def test_v2_ack_decode_refuses_malformed_signed_messages(body):
    with pytest.raises(WireError) as info:
        decode_ack(signed(body), key=KEY)
    assert not isinstance(info.value, MacError)


def test_v2_ack_from_anyone_without_the_device_key_is_refused():
    with pytest.raises(MacError):
        decode_ack(codec.encode_ack("bus0042", [1, 2], key=OTHER_KEY), key=KEY)
    with pytest.raises(MacError, match="unsigned"):
        decode_ack(b'{"v":1,"device":"bus0042","seqs":[1,2]}', key=KEY)
    with pytest.raises(WireError, match="message type"):  # a batch is not an ack, though the same key MACs both
        decode_ack(codec.encode_batch([rec()], key=KEY), key=KEY)
    with pytest.raises(WireError, match="upgrade the validator"):
        decode_ack(b"\xfb\x03\x02" + b"\x00" * 20, key=KEY)


def test_v2_ack_flipped_bits_are_refused():
    payload = codec.encode_ack("bus0042", range(10, 60), key=KEY)
    for i in range(len(payload) * 8):
        flipped = bytearray(payload)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(WireError):
            decode_ack(bytes(flipped), key=KEY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_v2_fuzz_signed_bytes_behind_the_mac_raise_only_wire_error(body):
    for payload in (signed(b"\xfb\x02\x01" + body), signed(b"\xfb\x02\x02" + body)):
        _decodes_or_wire_error(lambda p: decode_batch(p, key=KEY), payload)
        _decodes_or_wire_error(lambda p: decode_ack(p, key=KEY), payload)


# ---------------------------------------------------------------------- journal epoch, set aside, sendable (issue 9)

EPOCH = 0x1234_5678_9ABC_DEF0 & codec.MAX_EPOCH


def test_a_batch_of_an_epoch_travels_as_type_0x03_and_comes_back_with_its_epoch():
    import dataclasses

    recs = [dataclasses.replace(rec(seq=s), epoch=EPOCH) for s in (1, 2, 3)]
    payload = codec.encode_batch(recs, key=KEY)
    assert payload[:3] == bytes([0xFB, 0x02, 0x03])
    assert payload[3 + 1 + 7 + 1 + 7:][:8] == EPOCH.to_bytes(8, "big")  # after "bus0042" and "citybus"
    batch = decode_batch(payload, key=KEY)
    assert batch.epoch == EPOCH and batch.records == tuple(recs)
    assert decode_batch(encode_batch(recs)).epoch == EPOCH  # v1 JSON carries it at batch level
    with pytest.raises(WireError, match="one journal"):
        codec.encode_batch([recs[0], rec(seq=4)], key=KEY)


def test_a_batch_without_an_epoch_is_still_type_0x01_and_epoch_0():
    payload = codec.encode_batch([rec()], key=KEY)
    assert payload[2] == 0x01 and decode_batch(payload, key=KEY).epoch == 0
    assert decode_batch(b'{"v":1,"device":"d","operator":"o","records":[{"kind":"shift_open","device_seq":1,'
                        b'"t":1}]}').records[0].epoch == 0


def test_an_epoch_ack_says_which_records_were_quarantined_and_an_old_ack_has_none():
    payload = codec.encode_ack("bus0042", [1, 2, 3, 7], key=KEY, epoch=EPOCH, quarantined=[2])
    assert payload[2] == 0x05
    assert decode_ack(payload, key=KEY) == Ack("bus0042", (1, 2, 3, 7), True, EPOCH, (2,))
    assert decode_ack(codec.encode_ack("bus0042", [1], key=KEY), key=KEY) == Ack("bus0042", (1,))
    with pytest.raises(WireError, match="among"):
        codec.encode_ack("bus0042", [1], key=KEY, epoch=EPOCH, quarantined=[9])
    assert decode_ack(encode_ack("d", [1, 2], epoch=5, quarantined=[2])) == Ack("d", (1, 2), False, 5, (2,))


def test_set_aside_entries_round_trip_and_are_bounded():
    items = [(5, "x" * 500, b"{" + b"y" * 5000), codec.SetAside(6, "bad amount", b"{}")]
    batch = decode_batch(codec.encode_set_aside("bus0042", "citybus", EPOCH, items, key=KEY), key=KEY)
    assert (batch.device_id, batch.operator, batch.epoch, batch.records) == ("bus0042", "citybus", EPOCH, ())
    first, second = batch.set_aside
    assert first.device_seq == 5 and len(first.reason) == codec.MAX_NOTE and len(first.raw) == codec.MAX_RAW
    assert second == codec.SetAside(6, "bad amount", b"{}")
    with pytest.raises(MacError):
        decode_batch(codec.encode_set_aside("bus0042", "citybus", 0, items, key=OTHER_KEY), key=KEY)


def test_sendable_cuts_every_text_to_the_wire_limit_so_the_record_encodes():
    long = rec(RecordKind.DENIED, reason="on deny list; could not block the application: " + "z" * 60,
               route="\ud800" + "r" * 70)
    with pytest.raises(WireError):
        codec.encode_batch([long], key=KEY)
    fitted = codec.sendable(long)
    assert len(fitted.reason) == codec.MAX_TEXT and fitted.reason.endswith("\u2026")
    assert fitted.reason.startswith("on deny list; could not block the application: ")
    assert len(fitted.route) == codec.MAX_TEXT and "\ud800" not in fitted.route
    assert decode_batch(codec.encode_batch([fitted], key=KEY), key=KEY).records == (fitted,)
    assert codec.sendable(rec()) is rec() or codec.sendable(rec()) == rec()

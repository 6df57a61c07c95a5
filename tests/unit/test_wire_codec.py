"""wire.codec and wire.topics: round trips of every record kind, and a strict decoder that refuses anything
malformed with WireError (never another exception). Expected JSON values are written out by hand or
computed here with calendar.timegm, not read back from the codec."""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import topics
from wire.codec import MAX_RECORDS, Ack, Batch, WireError, decode_ack, decode_batch, encode_ack, encode_batch
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


# --------------------------------------------------------------------------------------- round trips


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
    assert decode_batch(encode_batch([record])) == Batch("bus0042", "citybus", (record,))


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
    )


@st.composite
def batches(draw):
    device, operator = draw(st.text(max_size=32)), draw(st.text(max_size=32))
    return device, operator, draw(st.lists(records(device, operator), min_size=1, max_size=8))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_round_trip_any_valid_batch(batch):
    device, operator, recs = batch
    assert decode_batch(encode_batch(recs)) == Batch(device, operator, tuple(recs))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=32), st.lists(u32, max_size=50))
def test_ack_round_trip(device, seqs):
    assert decode_ack(encode_ack(device, seqs)) == Ack(device, tuple(sorted(seqs)))


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
@given(st.from_regex(r"\A[0-9a-z_]{1,32}\Z"), st.from_regex(r"\A[0-9a-z_]{1,32}\Z"))
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

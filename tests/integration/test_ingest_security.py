"""What ingest refuses, on SQLite and PostgreSQL: a forged MAC, a batch moved to another device's topic, an unknown
device, an unsigned v1 batch; each refused with its reason, counted, quarantined, never acknowledged and never in a
settlement. A replayed batch is duplicates, acknowledged again. A second record of a card's counter with other
content is fraud: quarantined, flagged naming both records, the card marked. Last, the same over a real Mosquitto
through the IngestConsumer: counts, and acknowledgements MAC'd with the device's key only for what was stored."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, date, datetime

import pytest
from reference_crypto import ref_purchase_tac, ref_sm4_card_key, ref_sm4_mac
from sqlalchemy import func, select

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest import DeviceDirectory, Ingest, _tac_ok
from backoffice.ingest_consumer import IngestConsumer, end_session
from backoffice.models import Card, FraudFlag, Quarantine, Tap
from backoffice.settle import settle
from epurse.apdu import ALG_SM4
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.records import RecordKind, TapRecord

OP = "op_s"
A, B = "dev_a", "dev_b"
TERMINALS = {A: "010000000001", B: "010000000002"}
WHEN = datetime(2026, 3, 5, 7, 30, 0, tzinfo=UTC)  # service day 2026-03-05 in Asia/Shanghai
DAY = date(2026, 3, 5)
ASN = "01020304050607080910"


def purchase(seq: int, device: str = A, asn: str = ASN, ttc: int | None = None, amount: int = 200,
             operator: str = OP) -> TapRecord:
    terminal, tseq = TERMINALS.get(device, "010000000009"), 1000 + seq
    return TapRecord(device_id=device, device_seq=seq, kind=RecordKind.PURCHASE, occurred_at=WHEN, operator=operator,
                     route="r1", vehicle="b1", driver="d1", shift_no=1, card_asn=asn, card_type=1,
                     card_ttc=seq if ttc is None else ttc, amount=amount, balance_after=5000, terminal_id=terminal,
                     terminal_seq=tseq, tac=ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(asn), amount,
                                                             bytes.fromhex(terminal), tseq, WHEN).hex())


def signed(records, device=None, master=TEST_DEVICE_MASTER) -> bytes:
    return codec.encode_batch(records, key=mac_key(master, device or records[0].device_id))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Security Bus")
        for device, terminal in TERMINALS.items():
            registry.add_device(conn, device_id=device, operator=OP, vehicle=None, terminal_id=terminal)
        registry.add_cards(conn, [{"asn": ASN, "card_type": 1}])
    yield engine
    engine.dispose()


def run(engine, messages, *, accept_unsigned=False):
    ingest = Ingest(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER, devices=DeviceDirectory(),
                    accept_unsigned=accept_unsigned)
    with engine.begin() as conn:
        return ingest.messages(conn, messages)


def one(engine, topic, payload, **kw):
    return run(engine, [(topic, payload)], **kw)[0]


def rows(engine, *columns):
    with engine.connect() as conn:
        return conn.execute(select(*columns)).all()


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def settled_amount(engine) -> int:
    with engine.connect() as conn:
        return settle(conn, operator=OP, day=DAY).settlement.amount


def assert_refused(result, reason_part, engine):
    assert result.refused and reason_part in result.refused
    assert result.ack_seqs == [] and result.stored == 0 and result.quarantined >= 1
    reasons = [r for (r,) in rows(engine, Quarantine.reason)]
    assert any(reason_part in r for r in reasons), reasons


def test_a_forged_mac_is_refused_quarantined_and_never_cleared(engine):
    forged = signed([purchase(1), purchase(2)], master=b"someone else's master secret!!!")
    result = one(engine, topics.taps(OP, A), forged)
    assert_refused(result, "MAC does not verify", engine)
    altered = bytearray(signed([purchase(3)]))
    altered[-20] ^= 0x01  # one bit of the body changed after signing
    assert_refused(one(engine, topics.taps(OP, A), bytes(altered)), "MAC does not verify", engine)
    assert count(engine, Tap) == 0 and settled_amount(engine) == 0
    (payload,) = {bytes(p) for (p,) in rows(engine, Quarantine.payload) if bytes(p) == forged}
    assert payload == forged  # kept whole for operations


def test_a_batch_on_another_devices_topic_is_refused(engine):
    moved = one(engine, topics.taps(OP, B), signed([purchase(5, device=A)]))  # A's batch replayed on B's topic
    assert_refused(moved, "MAC does not verify", engine)
    # A device that holds B's key yet writes A's records: the MAC passes, the batch still is not B's.
    insider = one(engine, topics.taps(OP, B), signed([purchase(6, device=A)], device=B))
    assert_refused(insider, "came on the topic of", engine)
    assert count(engine, Tap) == 0 and settled_amount(engine) == 0


def test_an_unknown_device_is_refused_until_registered(engine):
    stranger = purchase(1, device="dev_x")
    result = one(engine, topics.taps(OP, "dev_x"), signed([stranger]))
    assert_refused(result, "not registered", engine)
    assert count(engine, Tap) == 0
    with engine.begin() as conn:
        registry.add_device(conn, device_id="dev_x", operator=OP, vehicle=None, terminal_id="010000000009")
    later = one(engine, topics.taps(OP, "dev_x"), signed([stranger]))
    assert (later.stored, later.ack_seqs) == (1, [1])  # the bus kept it, sent it again, and now it counts


def test_an_unsigned_v1_batch_is_refused_unless_the_migration_window_is_open(engine):
    v1 = codec.encode_batch_json([purchase(1), purchase(2)])
    assert_refused(one(engine, topics.taps(OP, A), v1), "unsigned v1 batch refused", engine)
    assert count(engine, Tap) == 0
    opened = one(engine, topics.taps(OP, A), v1, accept_unsigned=True)
    assert (opened.stored, opened.ack_seqs, opened.signed) == (2, [1, 2], False)
    ingest = Ingest(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER)
    assert codec.decode_ack(ingest.encode_ack(opened)) == codec.Ack(A, (1, 2), False)  # what an old bus reads


def test_a_replayed_batch_is_duplicates_and_acknowledged_again(engine):
    payload = signed([purchase(s) for s in range(1, 51)])
    first = one(engine, topics.taps(OP, A), payload)
    again = one(engine, topics.taps(OP, A), payload)
    assert (first.stored, first.duplicates) == (50, 0)
    assert (again.stored, again.duplicates, again.fraud, again.ack_seqs) == (0, 50, 0, list(range(1, 51)))
    assert count(engine, Tap) == 50 and count(engine, FraudFlag) == 0 and count(engine, Quarantine) == 0
    assert settled_amount(engine) == 50 * 200
    # The same batch twice inside one transaction (a resend that arrived while the first was being gathered).
    both = run(engine, [(topics.taps(OP, B), signed([purchase(1, device=B, ttc=900)]))] * 2)
    assert [(r.stored, r.duplicates) for r in both] == [(1, 0), (0, 1)]


def test_a_second_record_of_a_card_counter_is_fraud_flagged_naming_both(engine):
    genuine = purchase(1, device=A, ttc=7)
    clone = purchase(40, device=B, ttc=7, amount=150)  # a cloned card: same ASN and counter, another bus
    assert one(engine, topics.taps(OP, A), signed([genuine])).stored == 1
    result = one(engine, topics.taps(OP, B), signed([clone]))
    assert (result.stored, result.quarantined, result.fraud, result.ack_seqs) == (0, 1, 1, [40])
    (flag,) = rows(engine, FraudFlag.card_asn, FraudFlag.card_ttc, FraudFlag.first_device_id,
                   FraudFlag.first_device_seq, FraudFlag.second_device_id, FraudFlag.second_device_seq,
                   FraudFlag.detail)
    assert flag[:6] == (ASN, 7, A, 1, B, 40)
    assert "amount" in flag.detail and "terminal" in flag.detail
    (reason,) = [r for (r,) in rows(engine, Quarantine.reason)]
    assert reason.startswith("fraud: ")
    assert rows(engine, Card.status) == [("fraud",)]  # the next deny list carries it
    assert settled_amount(engine) == 200  # the clone's fare is not revenue
    # Resent: flagged and quarantined once, not twice; the genuine record resent is a duplicate, not fraud.
    assert one(engine, topics.taps(OP, B), signed([clone])).fraud == 1
    assert one(engine, topics.taps(OP, A), signed([genuine])).duplicates == 1
    assert count(engine, FraudFlag) == 1 and count(engine, Quarantine) == 1


def test_fraud_within_one_transaction_and_a_copy_with_the_same_content(engine):
    first = purchase(1, device=A, ttc=3)
    clone = purchase(2, device=B, ttc=3, amount=1)
    results = run(engine, [(topics.taps(OP, A), signed([first])), (topics.taps(OP, B), signed([clone]))])
    assert [(r.stored, r.fraud) for r in results] == [(1, 0), (0, 1)]
    # The very same card transaction under another sequence of the same bus (a journal replayed under new
    # numbers): the content matches, so it is no fraud, but it is not counted twice either.
    copy = dataclasses.replace(first, device_seq=9)
    again = one(engine, topics.taps(OP, A), signed([copy]))
    assert (again.stored, again.fraud, again.quarantined) == (0, 0, 1)
    assert "not counted twice" in max(r for (r,) in rows(engine, Quarantine.reason) if "copy" in r)
    assert count(engine, Tap) == 1 and settled_amount(engine) == 200


def test_ingest_checks_tacs_through_the_key_service_as_the_reference_does_for_3des_and_sm4():
    """Ingest asks the key service (its LRU of prepared card keys, here smaller than the cards) and never holds a
    key; the answers agree with the independent implementation in tests/reference_crypto.py."""
    from backoffice.keyservice import LocalKeyService

    service = LocalKeyService(TEST_ISSUER_KEYS, tac_cards=2)
    records = [purchase(s, asn=f"0102030405060708{s:04d}") for s in range(1, 6)]  # more cards than the cache holds
    for r in records * 2:
        assert _tac_ok(service, r)  # purchase() signs with reference_crypto.ref_purchase_tac
        assert not _tac_ok(service, dataclasses.replace(r, amount=r.amount + 1))
    sm4 = dataclasses.replace(records[0], algorithm=ALG_SM4)
    data = ((200).to_bytes(4, "big") + b"\x06" + bytes.fromhex(sm4.terminal_id) + sm4.terminal_seq.to_bytes(4, "big")
            + bytes.fromhex(WHEN.strftime("%Y%m%d%H%M%S")))
    expected = ref_sm4_mac(ref_sm4_card_key(TEST_ISSUER_KEYS.tac, bytes.fromhex(sm4.card_asn)), data)
    assert _tac_ok(service, dataclasses.replace(sm4, tac=expected.hex()))
    assert not _tac_ok(service, dataclasses.replace(sm4, tac=expected.hex(), terminal_seq=sm4.terminal_seq + 1))
    ingest = Ingest(keys=service, master=TEST_DEVICE_MASTER)
    assert ingest.keys is service and not hasattr(ingest, "tacs")


def test_the_consumer_counts_refusals_and_acknowledges_only_what_it_stored(tmp_path, mosquitto_url, uid):
    operator = f"op_{uid}"
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Security Bus")
        registry.add_device(conn, device_id=A, operator=operator, vehicle=None, terminal_id=TERMINALS[A])
    target = parse_mqtt_url(mosquitto_url)
    consumer = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                              client_id=f"ingest_{uid}", operator=operator)
    acks, got = [], threading.Event()
    bus = new_client(target, f"bus_{uid}", persistent=False)

    def on_ack(client, userdata, message):
        acks.append((message.topic, message.payload))
        got.set()

    bus.on_message = on_ack
    bus.connect(target.host, target.port)
    bus.subscribe(f"{topics.PREFIX}/{operator}/+/ack", qos=1)
    bus.loop_start()
    consumer.start()
    try:
        assert consumer.wait_subscribed(10)
        good = [purchase(s, operator=operator) for s in (1, 2)]
        for topic, payload in [
            (topics.taps(operator, A), signed(good, master=b"not the fleet's master secret!!!")),  # forged
            (topics.taps(operator, A), codec.encode_batch_json(good)),  # unsigned
            (topics.taps(operator, "dev_x"), signed([purchase(1, device="dev_x", operator=operator)])),  # unknown
            (topics.taps(operator, A), signed(good)),  # the genuine one
            (topics.taps(operator, A), signed(good)),  # ... replayed
        ]:
            bus.publish(topic, payload, qos=1).wait_for_publish(5)
        deadline = threading.Event()
        for _ in range(100):
            if consumer.counts["messages"] >= 5 and len(acks) >= 2:
                break
            deadline.wait(0.1)
    finally:
        consumer.stop()
        bus.disconnect()
        bus.loop_stop()
        end_session(target, f"ingest_{uid}")
    counts = consumer.counts
    assert (counts["refused"], counts["stored"], counts["duplicates"], counts["errors"]) == (3, 2, 2, 0)
    assert [t for t, _ in acks] == [topics.ack(operator, A)] * 2  # nothing for the refused three
    for _, payload in acks:
        assert codec.decode_ack(payload, key=mac_key(TEST_DEVICE_MASTER, A)).seqs == (1, 2)
    assert count(engine, Tap) == 2 and count(engine, Quarantine) == 1 + 2 + 1  # forged whole, unsigned x2, unknown
    engine.dispose()

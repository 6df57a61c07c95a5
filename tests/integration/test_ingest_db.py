"""Ingest against real databases (SQLite file and PostgreSQL): stored once, duplicates dropped, bad records
quarantined with their reason, and the schema the migrations build matches the models."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from reference_crypto import ref_purchase_tac
from sqlalchemy import MetaData, func, select

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest import DeviceDirectory, ingest_batch
from backoffice.models import Base, Quarantine, Tap
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord

OP, DEV, TERMINAL = "op_t", "dev_t1", "010000000001"
WHEN = datetime(2026, 3, 5, 7, 30, 0, tzinfo=UTC)


def purchase(seq: int, amount: int = 200, asn: str = "01020304050607080910", terminal_seq: int | None = None,
             **over) -> TapRecord:
    tseq = terminal_seq if terminal_seq is not None else 1000 + seq
    values = {"device_id": DEV, "device_seq": seq, "kind": RecordKind.PURCHASE, "occurred_at": WHEN, "operator": OP,
                  "route": "r1", "vehicle": "b1", "driver": "d1", "shift_no": 1, "card_asn": asn, "card_type": 1, "card_ttc": seq,
                  "amount": amount, "balance_after": 5000, "terminal_id": TERMINAL, "terminal_seq": tseq,
                  "tac": ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(asn), amount,
                                          bytes.fromhex(TERMINAL), tseq, WHEN).hex()}
    values.update(over)
    return TapRecord(**values)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_schema_url"))
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Test Bus")
        registry.add_device(conn, device_id=DEV, operator=OP, vehicle=None, terminal_id=TERMINAL)
    yield engine
    engine.dispose()


def signed(records) -> bytes:
    """A v2 batch MAC'd with the key of the device the records come from, as that validator sends it."""
    return codec.encode_batch(records, key=mac_key(TEST_DEVICE_MASTER, records[0].device_id))


def ingest(engine, records, topic=None, payload=None):
    topic = topic or topics.taps(OP, DEV)
    payload = payload if payload is not None else signed(records)
    with engine.begin() as conn:
        return ingest_batch(conn, topic, payload, keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                            devices=DeviceDirectory())


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_stores_a_batch_once_and_acknowledges_every_record(engine):
    batch = [purchase(s) for s in range(1, 51)]
    first = ingest(engine, batch)
    assert (first.stored, first.duplicates, first.quarantined) == (50, 0, 0)
    assert first.ack_seqs == list(range(1, 51))
    again = ingest(engine, batch)  # the validator never got the ack and sends the batch again
    assert (again.stored, again.duplicates) == (0, 50)
    assert again.ack_seqs == list(range(1, 51))
    with engine.connect() as conn:
        rows = conn.execute(select(Tap.device_seq, Tap.amount, Tap.tac)).all()
    assert sorted(r.device_seq for r in rows) == list(range(1, 51))
    assert sum(r.amount for r in rows) == 50 * 200


def test_overlapping_batches_store_the_union(engine):
    ingest(engine, [purchase(s) for s in range(1, 31)])
    result = ingest(engine, [purchase(s) for s in range(21, 61)])
    assert (result.stored, result.duplicates) == (30, 10)
    assert count(engine, Tap) == 60


def test_forged_tac_and_altered_amount_go_to_quarantine_with_reason(engine):
    good = purchase(1)
    forged = dataclasses.replace(purchase(2), tac="00000000")
    altered = dataclasses.replace(purchase(3), amount=1)  # TAC was computed for 200 fen
    result = ingest(engine, [good, forged, altered])
    assert (result.stored, result.quarantined) == (1, 2)
    assert result.ack_seqs == [1, 2, 3]  # quarantined records are safe too: the bus may forget them
    with engine.connect() as conn:
        q = conn.execute(select(Quarantine.device_seq, Quarantine.reason).order_by(Quarantine.device_seq)).all()
    assert [r.device_seq for r in q] == [2, 3]
    assert all("TAC does not verify" in r.reason for r in q)
    ingest(engine, [forged])  # resent: quarantined once, not twice
    assert count(engine, Quarantine) == 2


def test_wrong_psam_unknown_device_and_foreign_topic(engine):
    wrong_terminal = purchase(1, terminal_id="010000000099")
    result = ingest(engine, [wrong_terminal])
    assert result.quarantined == 1 and result.stored == 0
    stranger = dataclasses.replace(purchase(1), device_id="dev_unknown")
    result = ingest(engine, [stranger], topic=topics.taps(OP, "dev_unknown"))
    assert result.quarantined == 1 and result.ack_seqs == []  # it stays on the bus until registered
    moved = ingest(engine, [purchase(5)], topic=topics.taps(OP, "dev_other"))  # replayed on another's topic
    assert moved.stored == 0 and moved.quarantined == 1
    assert moved.ack_seqs == []  # acknowledging would make dev_other forget its own record 5
    with engine.connect() as conn:
        reasons = [r for (r,) in conn.execute(select(Quarantine.reason).order_by(Quarantine.id))]
    assert "not the PSAM registered" in reasons[0]
    assert "not registered" in reasons[1] and "farebox device add" in reasons[1]
    assert "MAC does not verify" in reasons[2]  # signed with dev_t1's key, checked with dev_other's
    assert count(engine, Tap) == 0


def test_garbage_is_quarantined_whole_and_nothing_is_acknowledged(engine):
    for payload in (b"\xff\xfe", b"{}", b'{"v":1,"device":"dev_t1","operator":"op_t","records":[{"kind":"x"}]}'):
        result = ingest(engine, [], payload=payload)
        assert result.ack_seqs == [] and result.quarantined == 1
    result = ingest(engine, [], topic="not/a/farebox/topic", payload=b"x")
    assert result.ack_seqs == []
    assert count(engine, Quarantine) == 4 and count(engine, Tap) == 0


def test_shift_and_denied_records_are_stored_without_tac(engine):
    shift = TapRecord(device_id=DEV, device_seq=1, kind=RecordKind.SHIFT_OPEN, occurred_at=WHEN, operator=OP,
                      route="r1", vehicle="b1", driver="d1", shift_no=1)
    denied = dataclasses.replace(shift, device_seq=2, kind=RecordKind.DENIED, card_asn="0" * 20, reason="listed")
    assert ingest(engine, [shift, denied]).stored == 2


def test_migrations_build_the_schema_the_models_describe(engine):
    reflected = MetaData()
    reflected.reflect(engine)
    for table in Base.metadata.sorted_tables:
        got = reflected.tables[table.name]
        assert set(got.columns.keys()) == set(table.columns.keys()), table.name
        for column in table.columns:
            assert got.columns[column.name].nullable == column.nullable, f"{table.name}.{column.name}"


def test_a_forged_copy_cannot_take_the_place_of_the_genuine_record_in_quarantine(engine):
    forged = dataclasses.replace(purchase(7), device_id="dev_t1")
    ingest(engine, [forged], topic=topics.taps(OP, "dev_elsewhere"))  # forged copy on a foreign topic
    genuine_bad = dataclasses.replace(purchase(7), tac="00000000")
    result = ingest(engine, [genuine_bad])
    assert result.ack_seqs == [7] and result.quarantined == 1
    assert count(engine, Quarantine) == 2


def test_a_device_registered_later_gets_its_waiting_records_stored(engine):
    late = dataclasses.replace(purchase(1), device_id="dev_late")
    topic = topics.taps(OP, "dev_late")
    assert ingest(engine, [late], topic=topic).ack_seqs == []
    assert ingest(engine, [late], topic=topic).ack_seqs == []  # resent: still one quarantine row
    with engine.begin() as conn:
        registry.add_device(conn, device_id="dev_late", operator=OP, vehicle=None, terminal_id=TERMINAL)
    result = ingest(engine, [late], topic=topic)
    assert (result.stored, result.ack_seqs) == (1, [1])
    assert count(engine, Quarantine) == 1


# ---------------------------------------------------------------------- issue 9, hole 4: journal epochs, conflicts


def test_a_replaced_journal_without_an_epoch_is_quarantined_as_conflicts_never_acknowledged_as_duplicates(engine):
    """The issue's case: an old validator's new journal starts at seq 1 again; three genuine purchases of other
    cards came back 'stored 0, duplicates 3' on 846ff19, nothing quarantined, nothing logged."""
    first = ingest(engine, [purchase(s) for s in (1, 2, 3)])
    assert first.stored == 3
    replaced = [purchase(s, asn="01020304050607089999", amount=300) for s in (1, 2, 3)]
    result = ingest(engine, replaced)
    assert (result.stored, result.duplicates, result.quarantined) == (0, 0, 3)
    assert result.ack_seqs == [1, 2, 3] and sorted(result.quarantined_seqs) == [1, 2, 3]
    with engine.connect() as conn:
        reasons = conn.execute(select(Quarantine.device_seq, Quarantine.reason).order_by(Quarantine.device_seq)).all()
    assert [r.device_seq for r in reasons] == [1, 2, 3]
    assert all(r.reason.startswith(f"conflict: device {DEV} journal 0 seq {r.device_seq} is already stored with "
                                   "different card_asn") for r in reasons)
    assert count(engine, Tap) == 3


def test_a_new_epoch_keeps_the_same_sequences_apart(engine):
    old = [purchase(s) for s in (1, 2, 3)]
    new = [dataclasses.replace(purchase(s, asn="01020304050607089999"), epoch=77) for s in (1, 2, 3)]
    assert ingest(engine, old).stored == 3
    result = ingest(engine, new)
    assert (result.stored, result.duplicates, result.quarantined, result.epoch) == (3, 0, 0, 77)
    ack = codec.decode_ack(ingest_ack(result), key=mac_key(TEST_DEVICE_MASTER, DEV))
    assert (ack.epoch, ack.seqs, ack.quarantined) == (77, (1, 2, 3), ())
    again = ingest(engine, new)  # byte-equal resend of the new journal's batch
    assert (again.stored, again.duplicates, again.quarantined) == (0, 3, 0)
    with engine.connect() as conn:
        rows = conn.execute(select(Tap.epoch, func.count(), func.sum(Tap.amount)).group_by(Tap.epoch)).all()
    assert sorted(tuple(r) for r in rows) == [(0, 3, 600), (77, 3, 600)]
    # The day's settlement counts both journals' taps: the same sequences under two epochs are not a clash.
    from backoffice.settle import load_day_taps
    from clearing.settlement import settle_day

    with engine.connect() as conn:
        taps = load_day_taps(conn, operator=OP, day=WHEN.date(), tz="Asia/Shanghai", cutoff_hour=3)
    day = settle_day(taps, WHEN.date(), operator=OP, tz="Asia/Shanghai", cutoff_hour=3)
    assert (day.taps, day.amount) == (6, 1200)


def test_one_key_twice_in_a_message_is_a_duplicate_only_when_equal(engine):
    one = dataclasses.replace(purchase(1), epoch=5)
    twin = dataclasses.replace(purchase(1, asn="01020304050607089999"), epoch=5)
    result = ingest(engine, [one, one, twin])
    assert (result.stored, result.duplicates, result.quarantined) == (1, 1, 1)
    assert result.quarantined_seqs == [1]
    ack = codec.decode_ack(ingest_ack(result), key=mac_key(TEST_DEVICE_MASTER, DEV))
    assert ack.quarantined == (1,)


def test_records_set_aside_by_the_validator_are_quarantined_with_their_reason_and_acknowledged(engine):
    payload = codec.encode_set_aside(DEV, OP, 9, [(4, "record 0: amount out of range", b'{"amount":1e99}')],
                                     key=mac_key(TEST_DEVICE_MASTER, DEV))
    result = ingest(engine, None, payload=payload)
    assert (result.ack_seqs, result.quarantined_seqs, result.epoch, result.stored) == ([4], [4], 9, 0)
    with engine.connect() as conn:
        row = conn.execute(select(Quarantine.device_seq, Quarantine.reason, Quarantine.payload)).one()
    assert row.device_seq == 4 and row.payload == b'{"amount":1e99}'
    assert row.reason == "set aside by the validator (could not encode it): record 0: amount out of range"


def test_a_route_as_long_as_the_wire_allows_is_stored(engine):
    """Hole 3 on the back office's side: the wire carries 64 characters; the columns held 32 (PostgreSQL refused
    the whole batch, so the bus resent it for ever)."""
    long = purchase(1, route="R" * codec.MAX_TEXT, vehicle="V" * codec.MAX_TEXT, driver="D" * codec.MAX_TEXT)
    assert ingest(engine, [long]).stored == 1


def ingest_ack(result) -> bytes:
    from backoffice.ingest import Ingest

    return Ingest(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER).encode_ack(result)

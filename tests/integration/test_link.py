"""A validator and the back office over a real broker (the embedded amqtt and the machine's Mosquitto): every
completed tap reaches the database once, through a dead link and through an ingest outage. Batches travel as
wire.codec v2, MAC'd with the device's key (derived from the published TEST device master on both ends), and the
acknowledgements back are MAC'd too."""

from __future__ import annotations

import threading
import time

import pytest
from simbus import TERMINAL, Bus
from sqlalchemy import func, select

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest_consumer import IngestConsumer, end_session
from backoffice.models import Tap
from epurse.keys import TEST_ISSUER_KEYS
from validator.messages import Outcome
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER
from wire.mqtt_url import new_client, parse_mqtt_url


@pytest.fixture
def world(tmp_path, broker_url, uid):
    operator, device = f"op_{uid}", f"v_{uid}"
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Link Test Bus")
        registry.add_device(conn, device_id=device, operator=operator, vehicle=None, terminal_id=TERMINAL.hex())
    target = parse_mqtt_url(broker_url)
    consumer = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                              client_id=f"ingest_{uid}", operator=operator)
    consumer.start()
    assert consumer.wait_subscribed(10)
    bus = Bus(tmp_path, target, operator, device)
    bus.uplink.start()
    yield engine, consumer, bus, target, uid
    bus.uplink.stop()
    consumer.stop()
    end_session(target, f"ingest_{uid}")
    bus.journal.close()


def stored(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return conn.execute(select(func.count(), func.coalesce(func.sum(Tap.amount), 0))).one()


def test_every_tap_arrives_once_and_the_journal_empties(world):
    engine, _, bus, _, _ = world
    assert bus.tap(bus.driver) is Outcome.SHIFT_OPENED
    bus.ride(120)
    assert bus.uplink.wait_drained(30), f"backlog {bus.journal.backlog()}"
    count, amount = stored(engine)
    assert (count, amount) == (121, 120 * 200)
    assert sum(1_000_000 - c.balance for c in bus.riders) == amount


def test_a_dead_link_keeps_taps_on_the_bus_until_it_comes_back(world):
    engine, _, bus, _, _ = world
    bus.tap(bus.driver)
    assert bus.uplink.wait_drained(30)
    bus.uplink.go_offline()
    bus.ride(60)
    time.sleep(0.5)
    assert bus.journal.backlog() == 60
    assert stored(engine)[0] == 1
    bus.uplink.go_online()
    assert bus.uplink.wait_drained(30)
    assert stored(engine) == (61, 60 * 200)


def test_taps_sent_while_ingest_is_down_are_stored_when_it_returns(world):
    engine, consumer, bus, target, uid = world
    bus.tap(bus.driver)
    assert bus.uplink.wait_drained(30)
    consumer.stop()  # the broker keeps the persistent session and queues for it
    bus.ride(40)
    time.sleep(1.0)
    assert bus.journal.backlog() == 40  # nobody acknowledged: the bus forgets nothing
    again = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                           client_id=f"ingest_{uid}", operator=f"op_{uid}")
    again.start()
    try:
        assert bus.uplink.wait_drained(30)
        assert stored(engine) == (41, 40 * 200)
    finally:
        again.stop()


def test_batches_on_the_wire_are_v2_and_macd_with_the_device_key(world):
    engine, _, bus, target, uid = world
    seen: list[bytes] = []
    spy = new_client(target, f"spy_{uid}", persistent=False)
    subscribed = threading.Event()
    spy.on_connect = lambda c, *a: c.subscribe(topics.taps(bus.terminal.config.operator, bus.uplink.device_id), 1)
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.on_message = lambda c, u, m: seen.append(m.payload)
    spy.connect(target.host, target.port)
    spy.loop_start()
    try:
        assert subscribed.wait(10)
        bus.tap(bus.driver)
        bus.ride(5)
        assert bus.uplink.wait_drained(30)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        spy.disconnect()
        spy.loop_stop()
    assert seen and all(p[0] == codec.MAGIC and p[1] == 2 for p in seen)
    batches = [codec.decode_batch(p, key=bus.mac_key) for p in seen]
    assert {r.device_seq for b in batches for r in b.records} == {r.device_seq for r in bus.journal.records_since(0)}
    with pytest.raises(codec.MacError):
        codec.decode_batch(seen[0], key=b"another device's key, 32 bytes!")
    assert stored(engine) == (6, 5 * 200)


# ---------------------------------------------------------------------- issue 9, holes 3 and 4 (over the real link)


class _PulledDuringBlock:
    """A rider's card that leaves the field just before APPLICATION BLOCK: the refusal's reason grows long."""

    def __init__(self, card):
        self.card = card

    def transmit(self, apdu: bytes) -> bytes:
        from validator.readers.base import CardRemoved

        if apdu[:2] == b"\x84\x1e":
            raise CardRemoved("card left the field before APPLICATION BLOCK")
        return self.card.transmit(apdu)


class _Mac2RefusingPsam:
    """A PSAM session that refuses every MAC2 (80 72): the card has debited, the record says why it is odd."""

    def __init__(self, inner):
        self.inner = inner

    def exchange(self, apdu: bytes) -> bytes:
        if bytes(apdu[:2]) == b"\x80\x72":
            return b"\x93\x02"
        return self.inner.exchange(apdu)


def test_over_long_reasons_never_stop_a_bus_uploading(world):
    """Hole 3: a deny-listed card whose block fails (a 91-character reason on 846ff19) and a MAC2 failure (67)
    used to make every batch unencodable, so the bus resent its oldest batch for ever. Now they are stored."""
    from blacklist.denylist import DenyList

    engine, _, bus, _, _ = world
    assert bus.tap(bus.driver) is Outcome.SHIFT_OPENED
    bus.terminal.deny_list = DenyList.from_asns([bus.riders[0].asn.hex()])
    assert bus.tap(_PulledDuringBlock(bus.riders[0])) is Outcome.CARD_BLOCKED
    bus.terminal.psam = _Mac2RefusingPsam(bus.terminal.psam)
    assert bus.tap(bus.riders[1]) is Outcome.PAID
    bus.terminal.psam = bus.terminal.psam.inner
    for card in bus.riders[2:7]:
        assert bus.tap(card) is Outcome.PAID
    assert bus.uplink.wait_drained(30), f"stuck: backlog {bus.journal.backlog()}"
    with engine.connect() as conn:
        rows = conn.execute(select(Tap.kind, Tap.reason, Tap.amount)).all()
    assert len(rows) == 1 + 1 + 1 + 5
    assert sum(r.amount for r in rows) == 6 * 200 == sum(1_000_000 - c.balance for c in bus.riders)
    reasons = sorted(r.reason for r in rows if r.reason)
    assert [len(r) <= codec.MAX_TEXT for r in reasons] == [True, True]
    assert reasons[0].startswith("MAC2 did not verify") and reasons[1].startswith("on deny list; could not block")


def test_a_record_that_will_not_encode_is_set_aside_and_the_rest_goes_on(world):
    """Hole 3: a record the wire cannot carry (forced here: an amount beyond 32 bits, written past the terminal)
    is set aside with an alarm and sent for quarantine; the records behind it are stored."""
    import dataclasses

    from backoffice.models import Quarantine
    from wire.records import RecordKind

    engine, _, bus, _, _ = world
    bus.uplink.go_offline()
    assert bus.tap(bus.driver) is Outcome.SHIFT_OPENED
    opened = bus.journal.records_since(0)[-1]
    bad = bus.journal.append(dataclasses.replace(opened, kind=RecordKind.DENIED, amount=1 << 40, reason="odd"))
    bus.ride(4)
    bus.uplink.go_online()
    assert bus.uplink.wait_drained(30), f"stuck: backlog {bus.journal.backlog()}"
    assert bus.uplink.set_aside == 1
    assert stored(engine) == (5, 4 * 200)
    with engine.connect() as conn:
        held = conn.execute(select(Quarantine.device_seq, Quarantine.reason, Quarantine.payload)).all()
    assert [(h.device_seq, h.reason.startswith("set aside by the validator (could not encode it): ")) for h in held] \
        == [(bad.device_seq, True)]
    assert "amount" in held[0].reason and b'"amount":1099511627776' in held[0].payload
    assert "set aside" not in " ".join(bus.uplink.status("heartbeat").alarms)  # the back office has it now
    # While a set-aside record waits for the back office, the bus's status says so.
    bus.uplink.go_offline()
    again = bus.journal.append(dataclasses.replace(opened, kind=RecordKind.DENIED, amount=1 << 40))
    assert bus.journal.set_aside({again.device_seq: "amount out of range"}) == 1
    assert "1 records set aside (cannot encode)" in bus.uplink.status("heartbeat").alarms


def _new_journal_bus(old: Bus, tmp_path, target):
    """The same bus after its journal storage was replaced: a new, empty journal; the same riders' cards."""
    bus = Bus(tmp_path / "replaced", target, old.terminal.config.operator, old.uplink.device_id)
    bus.riders, bus.driver = old.riders, old.driver
    bus.clock_now = old.clock_now
    return bus


def test_a_replaced_journal_goes_on_under_a_new_epoch_and_every_tap_is_stored(world, tmp_path):
    """Hole 4: a new journal starts its sequence at 1 again. On 846ff19 its taps came back as 'duplicates' and
    were lost; now its epoch keys them apart and every fare the cards lost is stored."""
    engine, _, bus, target, _ = world
    assert bus.tap(bus.driver) is Outcome.SHIFT_OPENED
    bus.ride(3)
    assert bus.uplink.wait_drained(30)
    bus.uplink.stop()  # the storage is swapped mid-day
    new = _new_journal_bus(bus, tmp_path, target)
    new.uplink.start()
    try:
        assert new.tap(new.driver) is Outcome.SHIFT_OPENED
        new.ride(3)
        assert new.uplink.wait_drained(30)
        assert [r.device_seq for r in new.journal.records_since(0)] == [1, 2, 3, 4]
    finally:
        new.uplink.stop()
        new.journal.close()
    assert stored(engine) == (8, 6 * 200)
    assert sum(1_000_000 - c.balance for c in bus.riders) == 6 * 200
    assert new.journal.epoch not in (0, bus.journal.epoch)
    with engine.connect() as conn:
        epochs = conn.execute(select(Tap.epoch, func.count()).group_by(Tap.epoch)).all()
    assert sorted(epochs) == sorted([(bus.journal.epoch, 4), (new.journal.epoch, 4)])


def test_a_forged_record_on_a_taken_sequence_is_quarantined_and_the_ack_says_so(world):
    """Hole 4: same device, journal and sequence, different content: quarantined as a conflict, acknowledged as
    quarantined; a byte-equal resend of the genuine batch is still a duplicate."""
    import dataclasses

    from backoffice.models import Quarantine
    from wire.records import RecordKind

    engine, consumer, bus, target, uid = world
    assert bus.tap(bus.driver) is Outcome.SHIFT_OPENED
    bus.ride(2)
    assert bus.uplink.wait_drained(30)
    genuine = bus.journal.records_since(0)[-1]
    acks: list[codec.Ack] = []
    spy = new_client(target, f"spy_{uid}", persistent=False)
    subscribed = threading.Event()
    spy.on_connect = lambda c, *a: c.subscribe(topics.ack(bus.terminal.config.operator, bus.uplink.device_id), 1)
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.on_message = lambda c, u, m: acks.append(codec.decode_ack(m.payload, key=bus.mac_key))
    spy.connect(target.host, target.port)
    spy.loop_start()
    topic = topics.taps(bus.terminal.config.operator, bus.uplink.device_id)
    try:
        assert subscribed.wait(10)
        forged = dataclasses.replace(genuine, kind=RecordKind.SHIFT_CLOSE, card_asn="", card_ttc=0, amount=0,
                                     balance_after=0, terminal_id="", terminal_seq=0, tac="", card_type=0,
                                     full_fare=0)
        spy.publish(topic, codec.encode_batch([forged], key=bus.mac_key), qos=1)
        spy.publish(topic, codec.encode_batch([genuine], key=bus.mac_key), qos=1)  # a resend, byte-equal
        deadline = time.monotonic() + 15
        while len(acks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        spy.disconnect()
        spy.loop_stop()
    with engine.connect() as conn:
        held = conn.execute(select(Quarantine.device_seq, Quarantine.reason)).all()
        kinds = conn.execute(select(Tap.kind).where(Tap.device_seq == genuine.device_seq)).scalars().all()
    assert len(held) == 1 and held[0].device_seq == genuine.device_seq
    assert held[0].reason.startswith(f"conflict: device {bus.uplink.device_id} journal {bus.journal.epoch} "
                                     f"seq {genuine.device_seq}") and "kind" in held[0].reason
    assert kinds == ["purchase"] and stored(engine) == (3, 2 * 200)
    assert consumer.counts["duplicates"] >= 1
    assert [(a.epoch, a.seqs, a.quarantined) for a in acks] == [
        (bus.journal.epoch, (genuine.device_seq,), (genuine.device_seq,)),
        (bus.journal.epoch, (genuine.device_seq,), ())]

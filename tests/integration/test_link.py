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

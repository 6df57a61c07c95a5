"""A validator and the back office over a real broker (the embedded amqtt and the machine's Mosquitto): every
completed tap reaches the database once, through a dead link and through an ingest outage."""

from __future__ import annotations

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
from wire.mqtt_url import parse_mqtt_url


@pytest.fixture
def world(tmp_path, broker_url, uid):
    operator, device = f"op_{uid}", f"v_{uid}"
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Link Test Bus")
        registry.add_device(conn, device_id=device, operator=operator, vehicle=None, terminal_id=TERMINAL.hex())
    target = parse_mqtt_url(broker_url)
    consumer = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, client_id=f"ingest_{uid}", operator=operator)
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
    again = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, client_id=f"ingest_{uid}",
                           operator=f"op_{uid}")
    again.start()
    try:
        assert bus.uplink.wait_drained(30)
        assert stored(engine) == (41, 40 * 200)
    finally:
        again.stop()

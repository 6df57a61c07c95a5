"""The embedded amqtt broker (farebox.broker, farebox.broker_amqtt): a bus's session is its device id, a refused
login touches no session, and an oversized publish is dropped, as on the Mosquitto files (test_broker_acl.py).

Before issue 9: a bus logging in with client id ``farebox_ingest`` took ingest's session over; a client with a
WRONG password and that client id deleted ingest's session (amqtt 0.12 looks sessions up before it checks
passwords); a 20 MB message on a bus's own topic reached ingest whole.
"""

from __future__ import annotations

import pytest
from test_broker_acl import Client

from farebox.broker import EmbeddedBroker
from wire import topics

OP, A, B = "citybus", "bus_a", "bus_b"
PASSWORDS = {A: "pw-a", B: "pw-b"}


@pytest.fixture
def broker(tmp_path):
    b = EmbeddedBroker(tmp_path / "broker", devices=PASSWORDS)
    b.start()
    clients: list[Client] = []

    def connect(user, password=None, **kw) -> Client:
        password = password if password is not None else PASSWORDS.get(user) or b.users[user]
        c = Client(b.port, user, password, **kw)
        clients.append(c)
        return c

    b.connect = connect
    yield b
    for c in clients:
        c.close()
    b.stop()


def ingest_of(broker) -> Client:
    ingest = broker.connect("farebox", client_id="farebox_ingest", clean_session=False)
    assert ingest.connack.value == 0
    ingest.subscribe(topics.ALL_TAPS)
    return ingest


def test_a_bus_cannot_take_over_ingests_client_id(broker):
    ingest = ingest_of(broker)
    attacker = broker.connect(A, client_id="farebox_ingest", clean_session=False)
    assert attacker.connack.value == 0  # let in, as bus_a
    for i in range(15):
        attacker.publish(topics.taps(OP, A), b"batch %d" % i)
    got = ingest.until(topics.taps(OP, A), b"batch 14")
    assert [p for _, p in got] == [b"batch %d" % i for i in range(15)]
    assert ingest.disconnects == 0 and attacker.disconnects == 0


def test_a_refused_login_touches_no_session(broker):
    ingest = ingest_of(broker)
    for clean in (True, False):
        intruder = broker.connect(A, "wrong password", client_id="farebox_ingest", clean_session=clean)
        assert str(intruder.connack) == "Not authorized"
        intruder.close()
    bus = broker.connect(B)
    bus.publish(topics.taps(OP, B), b"after the intruder")
    assert ingest.until(topics.taps(OP, B), b"after the intruder") == [(topics.taps(OP, B), b"after the intruder")]
    assert ingest.disconnects == 0


def test_a_bus_session_is_its_device_id(broker):
    """The validator's own client id (dev_<id>) becomes its device id: two buses never share a session."""
    a = broker.connect(A, client_id="dev_bus_a", clean_session=False)
    b = broker.connect(B, client_id="dev_bus_a", clean_session=False)  # B tries A's client id
    ingest = ingest_of(broker)
    a.publish(topics.taps(OP, A), b"a")
    b.publish(topics.taps(OP, B), b"b")
    a.publish(topics.taps(OP, A), b"a again")
    got = ingest.until(topics.taps(OP, A), b"a again")
    assert (topics.taps(OP, B), b"b") in got and a.disconnects == 0 and b.disconnects == 0


def test_a_20_mb_message_is_dropped_and_the_bus_stays_connected(broker):
    ingest = ingest_of(broker)
    a = broker.connect(A)
    a.publish(topics.taps(OP, A), b"x" * 20_000_000)
    a.publish(topics.taps(OP, A), b"sentinel")
    assert ingest.until(topics.taps(OP, A), b"sentinel") == [(topics.taps(OP, A), b"sentinel")]
    assert a.disconnects == 0
    assert "over the 16777216-byte limit" in broker.log_path.read_text()


def test_device_ids_are_checked():
    with pytest.raises(ValueError):
        EmbeddedBroker("/nonexistent", devices={"farebox_ingest": "x"})

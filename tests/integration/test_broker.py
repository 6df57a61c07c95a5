"""The MQTT brokers farebox runs on: the embedded amqtt broker and the machine's Mosquitto.

Real brokers, real paho-mqtt 2.x clients over TCP. What must hold for the uplink (QoS 1, persistent
sessions) holds on both; the embedded broker can also be killed and restarted on its port.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from farebox.broker import BrokerStartError, EmbeddedBroker
from wire.mqtt_url import MqttTarget, configure_client, parse_mqtt_url

TIMEOUT = 10.0


class Client:
    """A paho client that records what it receives, with blocking connect/subscribe helpers."""

    def __init__(self, url: str, client_id: str, *, clean_session: bool = True) -> None:
        self.target = parse_mqtt_url(url)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected: queue.Queue[tuple[bool, int]] = queue.Queue()
        self.subacks: queue.Queue[list] = queue.Queue()
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        configure_client(self.mqtt, self.target)
        self.mqtt.max_inflight_messages_set(100)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.mqtt.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put(codes)

    def _on_connect(self, _c, _u, flags, reason_code, _p) -> None:
        self.connected.put((bool(flags.session_present), reason_code.value))

    def connect(self) -> bool:
        """Connect and wait for CONNACK; return session_present. Raises on refusal."""
        self.mqtt.connect(self.target.host, self.target.port, keepalive=30)
        self.mqtt.loop_start()
        session_present, rc = self.connected.get(timeout=TIMEOUT)
        if rc != 0:
            self.close()
            raise ConnectionRefusedError(f"CONNACK return code {rc}")
        return session_present

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.mqtt.subscribe(topic, qos)
        codes = self.subacks.get(timeout=TIMEOUT)
        assert [c.value for c in codes] == [qos], codes

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.mqtt.publish(topic, payload, qos=qos)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def receive(self, count: int) -> list[mqtt.MQTTMessage]:
        out = []
        deadline = time.monotonic() + TIMEOUT
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                out.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def _forget_session(url: str, client_id: str) -> None:
    """Connect once with clean_session so the shared Mosquitto does not keep our session forever."""
    c = Client(url, client_id, clean_session=True)
    try:
        c.connect()
    finally:
        c.close()


def _non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


# ---------------------------------------------------------------------- both brokers
def test_qos1_round_trip(broker_url: str, uid: str) -> None:
    topic = f"farebox-test/{uid}/roundtrip"
    sub = Client(broker_url, f"sub-{uid}")
    pub = Client(broker_url, f"pub-{uid}")
    try:
        sub.connect()
        sub.subscribe(topic, 1)
        pub.connect()
        payloads = [f"tap {i}".encode() for i in range(50)]
        for p in payloads:
            pub.publish(topic, p, qos=1)
        got = sub.receive(len(payloads))
        assert [m.payload for m in got] == payloads
        assert all(m.qos == 1 and m.topic == topic for m in got)
    finally:
        pub.close()
        sub.close()


def test_offline_persistent_session_gets_queued_qos1_messages(broker_url: str, uid: str) -> None:
    """The uplink's trap: a subscriber with clean_session=False that is offline must get the QoS 1
    messages published meanwhile when it reconnects with the same client id (and, on amqtt, a user name)."""
    topic = f"farebox-test/{uid}/queued"
    sub_id = f"ingest-{uid}"
    sub = Client(broker_url, sub_id, clean_session=False)
    try:
        assert sub.connect() is False  # new session
        sub.subscribe(topic, 1)
    finally:
        sub.close()

    pub = Client(broker_url, f"pub-{uid}")
    try:
        pub.connect()
        payloads = [f"batch {i}".encode() for i in range(100)]
        for p in payloads:
            pub.publish(topic, p, qos=1)
    finally:
        pub.close()

    sub = Client(broker_url, sub_id, clean_session=False)
    try:
        assert sub.connect() is True, "broker forgot the persistent session"
        got = sub.receive(len(payloads))
        assert [m.payload for m in got] == payloads, f"got {len(got)} of {len(payloads)} queued messages"
        assert all(m.qos == 1 for m in got)
        time.sleep(0.3)
        assert sub.messages.empty(), "more messages than were published"
    finally:
        sub.close()
        _forget_session(broker_url, sub_id)


# ---------------------------------------------------------------------- embedded broker only
def test_embedded_broker_binds_loopback_with_password_logins(embedded_broker: EmbeddedBroker, uid: str) -> None:
    target = parse_mqtt_url(embedded_broker.url)
    assert target.host == "127.0.0.1" and target.port == embedded_broker.port
    assert target.username == "farebox" and target.password
    assert not target.tls
    assert embedded_broker.running and embedded_broker.pid

    # anonymous (no user name) is refused: amqtt would never queue offline messages for it
    anon = Client(f"mqtt://127.0.0.1:{embedded_broker.port}", f"anon-{uid}")
    with pytest.raises(ConnectionRefusedError):
        anon.connect()
    # a wrong password is refused
    bad = Client(f"mqtt://farebox:wrong@127.0.0.1:{embedded_broker.port}", f"bad-{uid}")
    with pytest.raises(ConnectionRefusedError):
        bad.connect()
    # the right one works
    good = Client(embedded_broker.url, f"good-{uid}")
    try:
        good.connect()
    finally:
        good.close()

    # the password file holds hashes, not passwords, and is private
    passwd = embedded_broker.passwd_path
    assert target.password not in passwd.read_text()
    assert passwd.read_text().startswith("farebox:$argon2id$")
    assert passwd.stat().st_mode & 0o077 == 0
    # loopback only: the machine's other addresses do not answer on the broker's port
    other = _non_loopback_address()
    if other is not None:
        with socket.socket() as s:
            s.settimeout(0.5)
            assert s.connect_ex((other, embedded_broker.port)) != 0, f"broker answers on {other}"
    assert embedded_broker.config_path.exists() and embedded_broker.log_path.exists()


def test_several_users(tmp_path: Path, uid: str) -> None:
    broker = EmbeddedBroker(tmp_path, users={"backoffice": "b-pass", "bus-0001": "p@ss:w/rd"})
    broker.add_user("bus-0002", "two")
    with broker:
        assert broker.url == broker.url_for("backoffice")
        assert broker.url_for("bus-0001").startswith("mqtt://bus-0001:p%40ss%3Aw%2Frd@127.0.0.1:")
        assert parse_mqtt_url(broker.url_for("bus-0001")).password == "p@ss:w/rd"
        for user in ("backoffice", "bus-0001", "bus-0002"):
            c = Client(broker.url_for(user), f"{user}-{uid}")
            try:
                c.connect()
            finally:
                c.close()
        with pytest.raises(RuntimeError, match="before start"):
            broker.add_user("late", "x")
        with pytest.raises(KeyError, match="nobody"):
            broker.url_for("nobody")
    assert not broker.running
    with pytest.raises(ValueError):
        EmbeddedBroker(tmp_path, users={"a:b": "x"})
    with pytest.raises(ValueError):
        EmbeddedBroker(tmp_path, users={})


def test_sigkill_and_restart_on_the_same_port(embedded_broker: EmbeddedBroker, uid: str) -> None:
    port, url, pid = embedded_broker.port, embedded_broker.url, embedded_broker.pid
    topic = f"farebox-test/{uid}/restart"

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while embedded_broker.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not embedded_broker.running
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "port still answers after SIGKILL"

    assert embedded_broker.start() == url
    assert embedded_broker.port == port and embedded_broker.pid != pid

    sub = Client(url, f"sub-{uid}")
    pub = Client(url, f"pub-{uid}")
    try:
        sub.connect()
        sub.subscribe(topic)
        pub.connect()
        pub.publish(topic, b"after restart")
        assert [m.payload for m in sub.receive(1)] == [b"after restart"]
    finally:
        pub.close()
        sub.close()

    # kill() and restart() the same way
    embedded_broker.kill()
    assert not embedded_broker.running
    assert embedded_broker.restart() == url
    assert embedded_broker.running


def test_clients_reconnect_after_broker_restart(embedded_broker: EmbeddedBroker, uid: str) -> None:
    """A paho client with loop_start() reconnects by itself once the broker is back."""
    topic = f"farebox-test/{uid}/reconnect"
    sub = Client(embedded_broker.url, f"sub-{uid}")
    sub.mqtt.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
    # resubscribe on every connect: amqtt loses sessions when its process dies
    orig = sub.mqtt.on_connect

    def on_connect(c, u, flags, rc, p):
        c.subscribe(topic, 1)
        orig(c, u, flags, rc, p)

    sub.mqtt.on_connect = on_connect
    try:
        sub.connect()
        sub.subacks.get(timeout=TIMEOUT)
        embedded_broker.kill()
        embedded_broker.start()
        sub.connected.get(timeout=TIMEOUT)
        sub.subacks.get(timeout=TIMEOUT)
        pub = Client(embedded_broker.url, f"pub-{uid}")
        try:
            pub.connect()
            pub.publish(topic, b"hello again")
        finally:
            pub.close()
        assert [m.payload for m in sub.receive(1)] == [b"hello again"]
    finally:
        sub.close()


def test_start_failure_says_why(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        broker.port = squatter.getsockname()[1]  # someone else holds the port
        with pytest.raises(BrokerStartError) as err:
            broker.start(timeout=15)
    text = str(err.value)
    assert f"127.0.0.1:{broker.port}" in text
    assert "broker.log" in text
    assert "in use" in text.lower() or "errno 98" in text.lower(), text
    assert not broker.running


def test_fresh_port_taken_meanwhile_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import farebox.broker as fb

    real_free_port = fb.free_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(fb, "free_port", lambda host="127.0.0.1": next(ports, None) or real_free_port(host))
        with EmbeddedBroker(tmp_path) as broker:
            assert broker.port != taken
            assert "address already in use" in broker.log_path.read_text().lower()


def test_broker_process_exits_when_its_parent_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from farebox.broker import EmbeddedBroker
        b = EmbeddedBroker(Path({str(tmp_path)!r}))
        b.start()
        print(b.pid, flush=True)
        os._exit(0)  # no stop(), no atexit: a crashed demo
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    child = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the broker process outlived its parent")


def test_context_manager_stops_the_process(tmp_path: Path) -> None:
    with EmbeddedBroker(tmp_path) as broker:
        pid = broker.pid
        assert broker.running
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "stopped" in broker.log_tail()


# ---------------------------------------------------------------------- URL parsing
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1", MqttTarget("127.0.0.1", 1883, None, None, False)),
        ("mqtt://localhost:1884", MqttTarget("localhost", 1884, None, None, False)),
        ("mqtts://broker.example", MqttTarget("broker.example", 8883, None, None, True)),
        ("mqtts://broker.example:443/", MqttTarget("broker.example", 443, None, None, True)),
        ("MQTT://Broker.Example", MqttTarget("broker.example", 1883, None, None, False)),
        ("mqtt://bus-0042@h", MqttTarget("h", 1883, "bus-0042", None, False)),
        ("mqtt://bus-0042:s3cret@h:1", MqttTarget("h", 1, "bus-0042", "s3cret", False)),
        ("mqtt://u:p%40ss%3Aw%2Frd@h", MqttTarget("h", 1883, "u", "p@ss:w/rd", False)),
        ("mqtt://u:@h", MqttTarget("h", 1883, "u", "", False)),
        ("mqtt://[::1]:1883", MqttTarget("::1", 1883, None, None, False)),
        ("  mqtt://h:65535  ", MqttTarget("h", 65535, None, None, False)),
    ],
)
def test_parse_mqtt_url(url: str, expected: MqttTarget) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "non-empty"),
        ("127.0.0.1:1883", "no scheme"),
        ("http://h:1883", "only mqtt:// and mqtts://"),
        ("ws://h", "only mqtt:// and mqtts://"),
        ("tcp://h:1883", "only mqtt:// and mqtts://"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://h:0", "port 0"),
        ("mqtt://h:65536", "bad port"),
        ("mqtt://h:port", "bad port"),
        ("mqtt://h:", "empty port"),
        ("mqtt://h/devices", "path"),
        ("mqtt://h?x=1", "query"),
        ("mqtt://:pw@h", "no user name"),
    ],
)
def test_parse_mqtt_url_errors(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_mqtt_url(url)


def test_parse_errors_do_not_echo_passwords() -> None:
    with pytest.raises(ValueError) as err:
        parse_mqtt_url("mqtt://u:topsecret@h/path")
    assert "topsecret" not in str(err.value)
    assert "topsecret" not in repr(parse_mqtt_url("mqtt://u:topsecret@h"))


def test_target_url_round_trip() -> None:
    for url in ("mqtt://u:p%40ss@h:1884", "mqtts://h:8883", "mqtt://[::1]:1883"):
        assert parse_mqtt_url(parse_mqtt_url(url).url()) == parse_mqtt_url(url)
    assert parse_mqtt_url("mqtt://u:secret@h").url(with_password=False) == "mqtt://u:***@h:1883"


def test_configure_client_sets_login_and_tls() -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv311)
    t = configure_client(c, "mqtt://bus:pw@h:1")
    assert (t.host, t.port) == ("h", 1)
    assert c.username == "bus" and c.password == "pw"
    assert c._ssl_context is None

    c2 = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="y", protocol=mqtt.MQTTv311)
    configure_client(c2, parse_mqtt_url("mqtts://h"))
    assert c2._ssl_context is not None
    assert c2.username is None

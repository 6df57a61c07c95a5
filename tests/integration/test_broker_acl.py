"""The broker files `farebox broker config` writes, loaded by a real Mosquitto: a private `mosquitto -c <generated
conf>` on a free loopback port (persistence in tmp_path) with two registered devices, A and B.

Mosquitto drops a QoS 0/1 publish it does not authorise without telling an MQTT 3.1.1 client, and grants any
subscription, filtering what it delivers. So "nothing arrived" is proven by order, not by waiting: the forbidden
message is sent first and an allowed one after it by the same client; once the allowed one has arrived, the
forbidden one would have arrived before it. MQTT 5 clients are told outright (PUBACK reason 135, not authorised).
"""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from backoffice import devices, registry
from backoffice.db import make_engine, upgrade
from farebox.broker_config import MESSAGE_SIZE_LIMIT, SERVICE_ACL, check_password, write_broker_config
from wire import topics
from wire.devicekeys import TEST_DEVICE_MASTER, mqtt_password

OP = "citybus"
A, B = "bus_a", "bus_b"
NOT_AUTHORISED = "Not authorized"  # paho's name for a 3.1.1 CONNACK 5 and an MQTT 5 reason 135
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateMosquitto:
    """``mosquitto -c <conf>`` written by farebox.broker_config for the devices registered in ``db_url``."""

    def __init__(self, folder: Path, db_url: str):
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed: run scripts/ensure-services.sh")
        self.folder = folder
        self.port = _free_port()  # the buses' listener
        self.service_port = _free_port()  # the back office's listener
        engine = make_engine(db_url)
        with engine.connect() as conn:
            registered = devices.registered_devices(conn)
        engine.dispose()
        # run_as root: pytest's tmp_path (under a 0700 folder) is out of reach of the `mosquitto` user
        self.files = write_broker_config(devices=registered, master=TEST_DEVICE_MASTER, folder=folder / "broker",
                                         port=self.port, bind="127.0.0.1", persistence_dir=folder / "broker-data",
                                         run_as="root", service_port=self.service_port)
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def port_for(self, user: str | None) -> int:
        """The back office logs in on its own listener, a bus on the devices' one."""
        return self.service_port if user in devices.BACKOFFICE_USERS else self.port

    def start(self) -> PrivateMosquitto:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.files.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                for port in (self.port, self.service_port):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, user: str, password: str | None = None) -> str:
        password = mqtt_password(TEST_DEVICE_MASTER, user) if password is None else password
        return f"mqtt://{user}:{password}@127.0.0.1:{self.port_for(user)}"


def register(db_url: str, *device_ids: str, operator: str = OP) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        if conn.exec_driver_sql("SELECT 1 FROM operator WHERE code = ?" if db_url.startswith("sqlite") else
                                "SELECT 1 FROM operator WHERE code = %s", (operator,)).first() is None:
            registry.add_operator(conn, code=operator, name=operator.title())
        for i, d in enumerate(device_ids):
            devices.register_device(conn, device_id=d, operator=operator, terminal_id=f"0100000000{i + 1:02x}",
                                    master=TEST_DEVICE_MASTER)
    engine.dispose()


class Client:
    """A paho client logged in as ``user``, connected (or refused: ``.connack``), collecting what it receives."""

    def __init__(self, port: int, user: str | None, password: str | None = None, *,
                 protocol=mqtt.MQTTv311, will: tuple[str, bytes] | None = None, client_id: str | None = None,
                 clean_session: bool | None = None):
        self.messages: queue.Queue = queue.Queue()
        self.acks: dict[int, object] = {}
        self._connack: queue.Queue = queue.Queue()
        self._subacks: queue.Queue = queue.Queue()
        self.disconnects = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t_{user}_{time.monotonic_ns()}",
                             protocol=protocol, clean_session=clean_session)
        self.c.on_disconnect = self._on_disconnect
        if user is not None:
            self.c.username_pw_set(user, mqtt_password(TEST_DEVICE_MASTER, user) if password is None else password)
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.c.on_connect = lambda c, u, f, rc, p: self._connack.put(rc)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self._subacks.put(rcs)
        self.c.on_publish = self._on_publish
        self._published: queue.Queue = queue.Queue()
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        self.connack = self._connack.get(timeout=10)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects += 1

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acks[mid] = reason_code
        self._published.put(mid)

    def subscribe(self, topic: str):
        self.c.subscribe(topic, qos=1)
        return self._subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, retain: bool = False):
        """Publish QoS 1 and wait for the PUBACK; its reason code (MQTT 5 tells a refusal, 3.1.1 never does)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        return self.acks.get(info.mid)

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload)."""
        seen = []
        while True:
            item = self.messages.get(timeout=10)
            seen.append(item)
            if item == (topic, payload):
                return seen

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def broker(tmp_path, sqlite_url):
    register(sqlite_url, A, B)
    b = PrivateMosquitto(tmp_path, sqlite_url).start()
    clients: list[Client] = []

    def connect(user, password=None, *, port=None, **kw) -> Client:
        c = Client(b.port_for(user) if port is None else port, user, password, **kw)
        clients.append(c)
        return c

    b.connect = connect
    yield b
    for c in clients:
        c.close()
    b.stop()


def test_generated_files_say_what_the_acl_promises(broker):
    acl = broker.files.acl.read_text()
    assert f"user {A}\ntopic write farebox/v1/{OP}/{A}/taps\ntopic write farebox/v1/{OP}/{A}/status\n" in acl
    for m in ("ack", "denylist", "params", "software"):
        assert f"topic read farebox/v1/{OP}/{A}/{m}\n" in acl
    assert f"topic read farebox/v1/{OP}/_fleet/#\n" in acl
    # nothing before the first user line (it would apply to everyone)
    assert next(line for line in acl.splitlines() if line and not line.startswith("#")) == f"user {A}"
    service_acl = broker.files.service_acl.read_text()
    assert next(line for line in service_acl.splitlines() if line and not line.startswith("#")) == "user ingest"
    conf = broker.files.conf.read_text().splitlines()
    for line in ("allow_anonymous false", "persistence true", "max_queued_messages 1000000",
                 "per_listener_settings true", f"password_file {broker.files.passwd}",
                 f"password_file {broker.files.service_passwd}", "use_username_as_clientid true",
                 f"listener {broker.port} 127.0.0.1", f"listener {broker.service_port} 127.0.0.1",
                 f"message_size_limit {MESSAGE_SIZE_LIMIT}"):
        assert line in conf
    # the client id is tied to the user name on the buses' listener only (several ingest workers share `ingest`)
    devices_part = conf[conf.index(f"listener {broker.port} 127.0.0.1"):conf.index(f"listener {broker.service_port} "
                                                                                    "127.0.0.1")]
    assert "use_username_as_clientid true" in devices_part
    hashes = dict(line.split(":", 1) for line in broker.files.passwd.read_text().splitlines())
    assert set(hashes) == {A, B}
    service_hashes = dict(line.split(":", 1) for line in broker.files.service_passwd.read_text().splitlines())
    assert set(service_hashes) == {"ingest", "status", "publisher"}
    assert check_password(mqtt_password(TEST_DEVICE_MASTER, A), hashes[A])
    assert not check_password(mqtt_password(TEST_DEVICE_MASTER, B), hashes[A])


def test_our_hash_is_mosquitto_passwds(tmp_path):
    """mosquitto_passwd's own hash of a password, re-computed here from its salt, is the same string."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed (package mosquitto)")
    f = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(f), "bus_x", "s3cret pass"], check=True, capture_output=True)
    hashed = f.read_text().strip().split(":", 1)[1]
    assert hashed.startswith("$7$101$")
    assert check_password("s3cret pass", hashed)
    assert not check_password("s3cret pasS", hashed)


def test_device_publishes_its_own_taps_and_status(broker):
    ingest = broker.connect("ingest")
    status = broker.connect("status")
    assert ingest.subscribe(topics.ALL_TAPS)[0].value == 1
    assert status.subscribe(topics.ALL_STATUS)[0].value == 1
    a = broker.connect(A)
    assert a.connack.value == 0
    a.publish(topics.taps(OP, A), b"batch 1")
    a.publish(topics.status(OP, A), b"heartbeat", retain=True)
    assert ingest.until(topics.taps(OP, A), b"batch 1") == [(topics.taps(OP, A), b"batch 1")]
    assert status.until(topics.status(OP, A), b"heartbeat") == [(topics.status(OP, A), b"heartbeat")]


def test_device_cannot_publish_on_another_devices_topics(broker):
    ingest = broker.connect("ingest")
    status = broker.connect("status")
    ingest.subscribe(topics.ALL_TAPS)
    status.subscribe(topics.ALL_STATUS)
    a = broker.connect(A)
    a.publish(topics.taps(OP, B), b"forged batch")
    a.publish(topics.status(OP, B), b"forged status")
    a.publish(topics.taps(OP, A), b"sentinel")
    a.publish(topics.status(OP, A), b"sentinel")
    assert ingest.until(topics.taps(OP, A), b"sentinel") == [(topics.taps(OP, A), b"sentinel")]
    assert status.until(topics.status(OP, A), b"sentinel") == [(topics.status(OP, A), b"sentinel")]


def test_mqtt5_device_is_told_its_publish_on_another_device_is_not_authorised(broker):
    a5 = broker.connect(A, protocol=mqtt.MQTTv5)
    assert a5.publish(topics.taps(OP, B), b"forged").value == 135  # Not authorized
    assert a5.publish(topics.taps(OP, A), b"own").value in (0, 16)  # Success / no matching subscribers


def test_device_cannot_write_downlinks(broker):
    """A device forging its own acknowledgement or a fleet package: refused."""
    a5 = broker.connect(A, protocol=mqtt.MQTTv5)
    assert a5.publish(topics.ack(OP, A), b"forged ack").value == 135
    assert a5.publish(topics.fleet_topic(OP, "denylist"), b"forged list").value == 135
    assert a5.publish(topics.device_topic(OP, A, "software"), b"forged sw").value == 135


def test_device_reads_its_own_downlink_and_the_fleets_but_not_another_devices(broker):
    a = broker.connect(A)
    for sub in (topics.ack(OP, B), f"farebox/v1/{OP}/+/ack", topics.fleet_topic(OP, "denylist"), "farebox/#"):
        a.subscribe(sub)  # Mosquitto grants them all and filters what it delivers
    ingest = broker.connect("ingest")
    publisher = broker.connect("publisher")
    ingest.publish(topics.ack(OP, B), b"ack for b")
    publisher.publish(topics.device_topic(OP, B, "params"), b"params for b")
    ingest.publish(topics.ack(OP, A), b"ack for a")
    publisher.publish(topics.fleet_topic(OP, "denylist"), b"fleet list")
    got = a.until(topics.fleet_topic(OP, "denylist"), b"fleet list")
    assert all(b"for b" not in payload for _, payload in got)
    assert (topics.ack(OP, A), b"ack for a") in got
    b = broker.connect(B)
    b.subscribe(topics.ack(OP, A))
    b.subscribe(topics.ack(OP, B))
    ingest.publish(topics.ack(OP, A), b"second ack for a")
    ingest.publish(topics.ack(OP, B), b"second ack for b")
    assert b.until(topics.ack(OP, B), b"second ack for b") == [(topics.ack(OP, B), b"second ack for b")]


def test_device_reads_no_taps_or_status(broker):
    a = broker.connect(A)
    a.subscribe("farebox/#")
    b = broker.connect(B)
    b.publish(topics.taps(OP, B), b"b's batch")
    b.publish(topics.status(OP, B), b"b's status")
    broker.connect("publisher").publish(topics.fleet_topic(OP, "params"), b"sentinel")
    assert a.until(topics.fleet_topic(OP, "params"), b"sentinel") == [(topics.fleet_topic(OP, "params"), b"sentinel")]


@pytest.mark.parametrize("user, password", [(A, "wrong password"), (A, mqtt_password(TEST_DEVICE_MASTER, B)),
                                            ("bus_unknown", None), ("ingest", "")])
def test_wrong_credentials_are_refused(broker, user, password):
    assert str(broker.connect(user, password).connack) == NOT_AUTHORISED


def test_anonymous_is_refused(broker):
    assert str(broker.connect(None).connack) == NOT_AUTHORISED


def test_ingest_reads_taps_through_a_shared_subscription(broker):
    workers = [broker.connect("ingest"), broker.connect("ingest")]
    for w in workers:
        assert w.subscribe(topics.shared("ingest", topics.ALL_TAPS))[0].value == 1
    a, b = broker.connect(A), broker.connect(B)
    for i in range(20):
        a.publish(topics.taps(OP, A), b"a%d" % i)
        b.publish(topics.taps(OP, B), b"b%d" % i)
    got = []
    while len(got) < 40:
        got.append(_next(workers))
    assert sorted(p for _, p in got) == sorted([b"a%d" % i for i in range(20)] + [b"b%d" % i for i in range(20)])
    assert all(w.messages.empty() for w in workers)  # each batch went to one worker only


def _next(workers: list[Client]):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for w in workers:
            try:
                return w.messages.get(timeout=0.05)
            except queue.Empty:
                pass
    raise AssertionError("no message within 10 s")


def test_back_office_users_get_only_what_their_job_needs(broker):
    assert set(SERVICE_ACL) == set(devices.BACKOFFICE_USERS)
    status5 = broker.connect("status", protocol=mqtt.MQTTv5)
    assert status5.publish(topics.ack(OP, A), b"x").value == 135
    publisher5 = broker.connect("publisher", protocol=mqtt.MQTTv5)
    assert publisher5.publish(topics.taps(OP, A), b"x").value == 135
    ingest5 = broker.connect("ingest", protocol=mqtt.MQTTv5)
    assert ingest5.publish(topics.fleet_topic(OP, "software"), b"x").value == 135


def kill_socket(client: Client) -> None:
    """Drop the connection without DISCONNECT, as a bus losing its link does: the broker publishes the will."""
    client.c.loop_stop()
    client.c.socket().shutdown(socket.SHUT_RDWR)
    client.c.socket().close()


def test_will_on_another_devices_status_is_never_published(broker):
    """A device cannot leave a forged 'death' on B's retained status through its last will."""
    status = broker.connect("status")
    status.subscribe(topics.ALL_STATUS)
    forger = broker.connect(A, will=(topics.status(OP, B), b"forged death"))
    kill_socket(forger)
    honest = broker.connect(A, will=(topics.status(OP, A), b"death"))
    kill_socket(honest)
    assert status.until(topics.status(OP, A), b"death") == [(topics.status(OP, A), b"death")]
    # and nothing is retained on B's status: a new subscriber gets A's retained death and nothing of B's before it
    later = broker.connect("status")
    later.subscribe(topics.status(OP, B))
    later.subscribe(topics.status(OP, A))
    assert later.until(topics.status(OP, A), b"death") == [(topics.status(OP, A), b"death")]


# ---------------------------------------------------------------------- issue 9: client ids, logins, message size
def test_a_device_cannot_knock_ingest_off_by_taking_its_client_id(broker):
    """Before: bus A logging in with client id ``farebox_ingest`` took over ingest's session, the two knocked each
    other off in turns, and 2 of 15 batches reached ingest in 15 s. Now the bus's session is its device id."""
    ingest = broker.connect("ingest", client_id="farebox_ingest", clean_session=False)
    ingest.subscribe(topics.ALL_TAPS)
    attacker = broker.connect(A, client_id="farebox_ingest", clean_session=False)
    assert attacker.connack.value == 0  # let in, but as itself
    for i in range(15):
        attacker.publish(topics.taps(OP, A), b"batch %d" % i)
    got = ingest.until(topics.taps(OP, A), b"batch 14")
    assert [p for _, p in got] == [b"batch %d" % i for i in range(15)]
    assert ingest.disconnects == 0
    # and a second bus using that client id knocks neither ingest nor bus A off
    b = broker.connect(B, client_id="farebox_ingest")
    b.publish(topics.taps(OP, B), b"b's batch")
    attacker.publish(topics.taps(OP, A), b"a still here")
    got = ingest.until(topics.taps(OP, A), b"a still here")
    assert (topics.taps(OP, B), b"b's batch") in got
    assert ingest.disconnects == 0 and attacker.disconnects == 0


def test_a_device_password_does_not_open_the_back_office_listener_nor_the_reverse(broker):
    assert str(broker.connect(A, port=broker.service_port).connack) == NOT_AUTHORISED
    assert str(broker.connect("ingest", port=broker.port).connack) == NOT_AUTHORISED


def test_a_20_mb_message_on_a_devices_own_topic_is_not_passed_on(broker):
    ingest = broker.connect("ingest")
    ingest.subscribe(topics.ALL_TAPS)
    a = broker.connect(A)
    a.publish(topics.taps(OP, A), b"x" * 20_000_000)
    a.publish(topics.taps(OP, A), b"sentinel")
    assert ingest.until(topics.taps(OP, A), b"sentinel") == [(topics.taps(OP, A), b"sentinel")]
    assert a.disconnects == 0  # dropped, the bus not disconnected: it keeps its batch and its link


def test_devices_registered_under_bad_ids_before_the_check_are_left_out_not_fatal(tmp_path):
    files = write_broker_config(devices=[(A, OP), ("publisher", OP), ("Bad.Dev", OP), ("_fleet", OP)],
                                master=TEST_DEVICE_MASTER, folder=tmp_path / "b", port=1883, run_as="root")
    assert files.devices == 1 and [d for d, _ in files.skipped] == ["publisher", "Bad.Dev", "_fleet"]
    assert "publisher" not in files.passwd.read_text() and "user publisher" not in files.acl.read_text()

"""The tap link on a 3-node NATS cluster: buses on MQTT failing over between nodes, two JetStream ingest workers.

Three nats-server nodes on loopback (temp dirs, free ports) with the configuration ``farebox broker config --engine
nats`` writes (per-device permissions, JetStream, MQTT stream_replicas 3); real validators (tests/simbus.py:
Terminal, Journal, Uplink with simulated cards; up to 100 per child process, bench.cluster.shards), each given the three nodes' URLs (the first one spread over the
nodes); two JetStream ingest workers (backoffice.ingest_jetstream) on the one durable consumer. The buses ride all
along while: node 1 is SIGKILLed; it comes back and node 2 is SIGKILLed; it comes back and ingest worker 0 is
SIGKILLed (its unacknowledged deliveries go to worker 1 after ack_wait). After each blow every bus's backlog must
drain; the time from the blow until every bus is acknowledged again is printed and kept in
var/test-artefacts/nats_cluster.json.

Checked with plain SQL, the validators' journals (sqlite3) against the tap table (PostgreSQL): every record a
journal marks acknowledged is stored (nothing acknowledged is lost), (device_id, device_seq) is unique in the table
and its row count equals the journals' records (nothing stored twice), and at the end no journal has an
unacknowledged record (every backlog drained).

20 validators here; ``FAREBOX_NATS_VALIDATORS=500`` runs the issue's 500 (passes since the MQTT consumers are R1 and
a bus has five of them instead of seven: farebox.broker_config.MQTT_CONSUMER_REPLICAS; before, nats-server 2.9.10
timed out creating the 3,500 replicated consumers). tests/reliability/test_cluster_failures.py adds an ingest-worker
kill and a PostgreSQL crash (FAREBOX_SOAK=1: 500 validators).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from bench.cluster import NATS_SERVER, JetStreamWorker, NatsCluster, shards
from wire.devicekeys import TEST_DEVICE_MASTER

pytestmark = pytest.mark.slow
VALIDATORS = int(os.environ.get("FAREBOX_NATS_VALIDATORS", "20"))
ARTEFACT = Path(__file__).resolve().parents[2] / "var" / "test-artefacts" / "nats_cluster.json"


def _journal_rows(path) -> list[tuple[int, int]]:
    """(device_seq, acked) of the records a bus sends (state done), read with plain SQL from its journal file."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT device_seq, acked FROM record WHERE state = 'done'").fetchall()
    finally:
        db.close()


def _ride(shards, n=1):
    for shard in shards:
        shard.ride(n)


def _drain(shards, timeout: float) -> float:
    """Seconds until every bus has nothing unacknowledged (asserts it happens within ``timeout``)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        counts = [s.backlog() for s in shards]
        if not any(records for records, _ in counts):
            return time.monotonic() - t0
        assert time.monotonic() < deadline, (
            f"backlog not drained in {timeout} s: {sum(r for r, _ in counts)} records on "
            f"{sum(b for _, b in counts)} buses")
        time.sleep(0.2)


@pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server not installed (scripts/ensure-services.sh)")
def test_nats_cluster_loses_nothing_acknowledged_and_stores_nothing_twice(tmp_path, pg_schema_url, uid):
    operator = f"op_{uid}"
    devices = [(f"n{i:03d}_{uid}", operator) for i in range(VALIDATORS)]
    engine = make_engine(pg_schema_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Cluster Bus")
        for device, _ in devices:
            registry.add_device(conn, device_id=device, operator=operator, vehicle=None, terminal_id="010000000777")
    engine.dispose()

    cluster = NatsCluster(tmp_path / "nats", devices, TEST_DEVICE_MASTER)
    workers = [JetStreamWorker(tmp_path, pg_schema_url, cluster.nats_urls(), f"w{i}_{uid}", ack_wait=5.0)
               for i in (0, 1)]
    buses: list = []
    timings: dict[str, float] = {}
    failovers = 0
    try:
        cluster.start()
        cluster.wait_ready()
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        # real validators (tests/simbus.Bus), up to 100 per child process, each bus given all three nodes
        buses = shards(tmp_path, [d for d, _ in devices], operator, [n.mqtt_port for n in cluster.nodes])
        _ride(buses, 3)
        timings["first_drain_s"] = round(_drain(buses, 300), 1)

        acked_before = {(d, s) for d, _ in devices for s, a in _journal_rows(tmp_path / f"{d}.journal") if a}
        for blow, act in (("kill node n1", lambda: cluster.kill(0)),
                          ("kill node n2 (n1 back)", lambda: (cluster.start(0), cluster.wait_ready(), cluster.kill(1))),
                          ("kill ingest worker 0 (n2 back)",
                           lambda: (cluster.start(1), cluster.wait_ready(), workers[0].kill()))):
            _ride(buses, 2)  # in flight when the blow lands
            act()
            t0 = time.monotonic()
            _ride(buses, 2)  # and after it
            _drain(buses, 300)
            timings[f"{blow}: acks resume for every bus after (s)"] = round(time.monotonic() - t0, 1)
        workers[0].start()
        workers[0].wait_ready()
        _ride(buses, 2)
        timings["after worker 0 restarted: drain (s)"] = round(_drain(buses, 120), 1)
    finally:
        for shard in buses:
            failovers += shard.stop()
        for w in workers:
            w.stop()
        cluster.stop()

    written = {(d, s): a for d, _ in devices for s, a in _journal_rows(tmp_path / f"{d}.journal")}
    eng = create_engine(pg_schema_url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT device_id, device_seq FROM tap")).all()
        distinct = conn.execute(text("SELECT count(DISTINCT (device_id, device_seq)) FROM tap")).scalar_one()
    eng.dispose()
    stored = {(r.device_id, r.device_seq) for r in rows}
    report = {"validators": VALIDATORS, "records": len(written), "rows": len(rows), "failovers": failovers,
              **timings}
    ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTEFACT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    assert acked_before <= stored  # acknowledged before the blows: still there
    assert all(written.values()), "a journal still holds unacknowledged records"  # every backlog drained
    assert {k for k, a in written.items() if a} <= stored  # nothing acknowledged is lost
    assert len(rows) == distinct == len(written) and stored == set(written)  # nothing stored twice, nothing extra
    assert failovers >= VALIDATORS // 3  # the buses on n1 and n2 did move


@pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server not installed (scripts/ensure-services.sh)")
def test_broker_config_engine_nats_writes_valid_node_files_with_the_acl_as_permissions(tmp_path, sqlite_url):
    """`farebox broker config --engine nats` through the CLI: three files nats-server accepts (`-t`), each with the
    registered bus allowed exactly the topics the Mosquitto ACL gives it."""
    import re
    import subprocess
    import sys

    engine = make_engine(sqlite_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code="cfgbus", name="Config Bus")
        registry.add_device(conn, device_id="bus0042", operator="cfgbus", vehicle=None, terminal_id="010000000777")
    engine.dispose()
    env = {**os.environ, "FAREBOX_DATABASE_URL": sqlite_url}
    out = subprocess.run([sys.executable, "-m", "farebox.cli", "--insecure-test-keys", "broker", "config",
                          "--engine", "nats", "--out", str(tmp_path / "nats"), "--port", "21883"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    confs = sorted((tmp_path / "nats").glob("n*.conf"))
    assert [c.name for c in confs] == ["n1.conf", "n2.conf", "n3.conf"]
    for conf in confs:
        check = subprocess.run([NATS_SERVER, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        text_ = conf.read_text()
        assert "stream_replicas: 3" in text_ and text_.count("nats-route://") == 3
        line = next(ln for ln in text_.splitlines() if '"bus0042"' in ln)
        pub, sub = re.findall(r"allow: \[([^\]]*)\]", line)
        own = "farebox.v1.cfgbus.bus0042"
        assert pub == f'"{own}.taps", "{own}.status"'
        assert sub == (f'"{own}.ack", "{own}.denylist", "{own}.params", "{own}.software", '
                       '"farebox.v1.cfgbus._fleet", "farebox.v1.cfgbus._fleet.>", "$MQTT.sub.>"')


def _mqtt(target, client_id: str, *, persistent: bool = True, timeout: float = 90):
    """A connected paho client (retrying while the cluster elects leaders) and the list its messages land in."""
    import threading

    from wire.mqtt_url import new_client

    got: list[tuple[str, bytes, int]] = []
    connected = threading.Event()
    client = new_client(target, client_id, persistent=persistent)
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload, m.qos))
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    client.reconnect_delay_set(1, 2)
    client.connect_async(target.host, target.port, keepalive=30)
    client.loop_start()
    assert connected.wait(timeout), f"no CONNACK from {target.port} in {timeout} s"
    return client, got


def _wait(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server not installed (scripts/ensure-services.sh)")
def test_r1_consumer_node_down_delays_a_queued_package_and_never_the_acks(tmp_path, uid):
    """What ``consumer_replicas: 1`` gives up, shown: a bus's subscription is a JetStream consumer on one node. A
    per-device package published (QoS 1) while the bus is away is kept in the R3 stream; with that consumer's node
    SIGKILLed and the bus back on another node, the package waits until the node is back, then arrives once. A tap
    ack (ingest publishes it as core NATS) reaches the bus all along: acks never depend on those consumers."""
    import asyncio

    import nats

    from backoffice.devices import service_password
    from wire.devicekeys import mqtt_password
    from wire.mqtt_url import MqttTarget

    operator, bus = f"op_{uid}", f"r1_{uid}"
    own = f"farebox/v1/{operator}/{bus}"
    cluster = NatsCluster(tmp_path / "nats", [(bus, operator)], TEST_DEVICE_MASTER)
    report: dict = {}
    clients = []

    async def consumer_nodes() -> dict[str, str]:
        """filter subject -> the node holding that MQTT consumer (JetStream API, as the ingest login)."""
        nc = await nats.connect(servers=cluster.nats_urls(), user="ingest",
                                password=service_password(TEST_DEVICE_MASTER, "ingest"))
        try:
            js = nc.jetstream(timeout=10)
            return {c.config.filter_subject: c.cluster.leader for c in await js.consumers_info("$MQTT_msgs")}
        finally:
            await nc.close()

    async def core_ack(payload: bytes) -> None:
        nc = await nats.connect(servers=cluster.nats_urls(), user="ingest",
                                password=service_password(TEST_DEVICE_MASTER, "ingest"))
        try:
            await nc.publish(f"{own}/ack".replace("/", "."), payload)
            await nc.flush()
        finally:
            await nc.close()

    def bus_on(i: int) -> MqttTarget:
        return MqttTarget("127.0.0.1", cluster.nodes[i].mqtt_port, bus, mqtt_password(TEST_DEVICE_MASTER, bus))

    try:
        cluster.start()
        cluster.wait_ready()
        client, _ = _mqtt(bus_on(0), f"dev_{bus}")
        clients.append(client)
        subscribed = []
        client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.append(mid)
        client.subscribe([(f"{own}/params", 1), (f"{own}/ack", 1)])
        _wait(lambda: subscribed, 60, "SUBACK")
        client.disconnect()  # away: the session (and its consumers) stay
        client.loop_stop()
        clients.remove(client)
        holder = asyncio.run(consumer_nodes())[f"$MQTT.msgs.{own.replace('/', '.')}.params"]
        x = next(i for i, n in enumerate(cluster.nodes) if n.name == holder)
        others = [i for i in range(3) if i != x]
        report["consumer_node"] = holder

        pub, _ = _mqtt(MqttTarget("127.0.0.1", cluster.nodes[others[0]].mqtt_port, "publisher",
                                  service_password(TEST_DEVICE_MASTER, "publisher")), f"pub_{uid}", persistent=False)
        clients.append(pub)
        pub.publish(f"{own}/params", b"package-1", qos=1).wait_for_publish(30)

        cluster.kill(x)
        client, got = _mqtt(bus_on(others[1]), f"dev_{bus}", timeout=120)  # back, on another node
        clients.append(client)
        asyncio.run(core_ack(b"ack-1"))
        report["ack_with_consumer_node_down_s"] = round(
            _wait(lambda: any(t.endswith("/ack") for t, _, _ in got), 30, "the core ack"), 1)
        time.sleep(5)
        report["package_arrived_while_its_consumer_node_was_down"] = any(t.endswith("/params") for t, _, _ in got)

        t0 = time.monotonic()
        cluster.start(x)
        cluster.wait_ready()
        _wait(lambda: any(t.endswith("/params") for t, _, _ in got), 120, "the package after the node came back")
        report["package_after_node_restart_s"] = round(time.monotonic() - t0, 1)
        time.sleep(3)
        packages = [(p, q) for t, p, q in got if t.endswith("/params")]
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        cluster.stop()
    print(json.dumps(report, indent=2))
    ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
    (ARTEFACT.parent / "nats_r1_consumer.json").write_text(json.dumps(report, indent=2) + "\n")
    assert packages == [(b"package-1", 1)]  # kept through the node's death, delivered once, at QoS 1

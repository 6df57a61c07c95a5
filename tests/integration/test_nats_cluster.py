"""The tap link on a 3-node NATS cluster: buses on MQTT failing over between nodes, two JetStream ingest workers.

Three nats-server nodes on loopback (temp dirs, free ports) with the configuration ``farebox broker config --engine
nats`` writes (per-device permissions, JetStream, MQTT stream_replicas 3); real validators (tests/simbus.py:
Terminal, Journal, Uplink with simulated cards), each given the three nodes' URLs (the first one spread over the
nodes); two JetStream ingest workers (backoffice.ingest_jetstream) on the one durable consumer. The buses ride all
along while: node 1 is SIGKILLed; it comes back and node 2 is SIGKILLed; it comes back and ingest worker 0 is
SIGKILLed (its unacknowledged deliveries go to worker 1 after ack_wait). After each blow every bus's backlog must
drain; the time from the blow until every bus is acknowledged again is printed and kept in
var/test-artefacts/nats_cluster.json.

Checked with plain SQL, the validators' journals (sqlite3) against the tap table (PostgreSQL): every record a
journal marks acknowledged is stored (nothing acknowledged is lost), (device_id, device_seq) is unique in the table
and its row count equals the journals' records (nothing stored twice), and at the end no journal has an
unacknowledged record (every backlog drained).

20 validators here; ``FAREBOX_SOAK=1`` (``make soak``) runs 500.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from simbus import Bus
from sqlalchemy import create_engine, text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from bench.cluster import NATS_SERVER, JetStreamWorker, NatsCluster
from hardware_sim.card import SimCard
from wire.devicekeys import TEST_DEVICE_MASTER

pytestmark = pytest.mark.slow
VALIDATORS = 500 if os.environ.get("FAREBOX_SOAK") == "1" else 20
ARTEFACT = Path(__file__).resolve().parents[2] / "var" / "test-artefacts" / "nats_cluster.json"


def _buses(tmp_path, cluster, operator, uid):
    buses = []
    for i in range(VALIDATORS):
        device = f"n{i:03d}_{uid}"
        bus = Bus(tmp_path, cluster.mqtt_targets(device, TEST_DEVICE_MASTER, first=i % 3), operator, device)
        bus.riders = [SimCard(bytes.fromhex(f"96{i:04d}{k:014d}"), c.card_type, c.balance, start=c.start,
                              end=c.end) for k, c in enumerate(bus.riders, 1)]
        buses.append(bus)
    return buses


def _journal_rows(bus) -> list[tuple[int, int]]:
    """(device_seq, acked) of the records the bus sends (state done), read with plain SQL from the journal file."""
    db = sqlite3.connect(bus.journal.path)
    try:
        return db.execute("SELECT device_seq, acked FROM record WHERE state = 'done'").fetchall()
    finally:
        db.close()


def _ride(buses, n=1):
    for bus in buses:
        for _ in range(n):
            bus.tap(bus.riders[bus.journal._last_seq % len(bus.riders)])


def _drain(buses, timeout: float) -> float:
    """Seconds until every bus has nothing unacknowledged (asserts it happens within ``timeout``)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while any(b.journal.backlog() for b in buses):
        assert time.monotonic() < deadline, (
            f"backlog not drained in {timeout} s: {sum(b.journal.backlog() for b in buses)} records on "
            f"{sum(1 for b in buses if b.journal.backlog())} buses")
        time.sleep(0.1)
    return time.monotonic() - t0


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
    buses = []
    timings: dict[str, float] = {}
    try:
        cluster.start()
        cluster.wait_ready()
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        buses = _buses(tmp_path, cluster, operator, uid)
        for bus in buses:
            bus.uplink.start()
            bus.tap(bus.driver)
        _ride(buses, 3)
        timings["first_drain_s"] = _drain(buses, 120)

        acked_before = {(b.terminal.config.device_id, s) for b in buses for s, a in _journal_rows(b) if a}
        for blow, act in (("kill node n1", lambda: cluster.kill(0)),
                          ("kill node n2 (n1 back)", lambda: (cluster.start(0), cluster.wait_ready(), cluster.kill(1))),
                          ("kill ingest worker 0 (n2 back)",
                           lambda: (cluster.start(1), cluster.wait_ready(), workers[0].kill()))):
            _ride(buses, 2)  # in flight when the blow lands
            act()
            t0 = time.monotonic()
            _ride(buses, 2)  # and after it
            _drain(buses, 240)
            timings[f"{blow}: acks resume for every bus after (s)"] = round(time.monotonic() - t0, 1)
        workers[0].start()
        workers[0].wait_ready()
        _ride(buses, 2)
        timings["after worker 0 restarted: drain (s)"] = round(_drain(buses, 120), 1)
    finally:
        for bus in buses:
            bus.uplink.stop(goodbye_timeout=1)
        for w in workers:
            w.stop()
        cluster.stop()

    failovers = sum(b.uplink.failovers for b in buses)
    written = {(b.terminal.config.device_id, s): a for b in buses for s, a in _journal_rows(b)}
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
    for bus in buses:
        bus.journal.close()

    assert acked_before <= stored  # acknowledged before the blows: still there
    assert all(written.values()), "a journal still holds unacknowledged records"  # every backlog drained
    assert {k for k, a in written.items() if a} <= stored  # nothing acknowledged is lost
    assert len(rows) == distinct == len(written) and stored == set(written)  # nothing stored twice, nothing extra
    assert failovers >= VALIDATORS // 3  # the buses on n1 and n2 did move

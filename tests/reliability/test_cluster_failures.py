"""Failure at scale on the NATS cluster: broker nodes, an ingest worker and PostgreSQL itself killed under load.

Three nats-server nodes on loopback with the configuration ``farebox broker config --engine nats`` writes (MQTT on
every node, JetStream R3 streams, R1 MQTT consumers), real validators (tests/simbus.Bus in child processes of up to
100, bench.cluster.shards; each bus given all three nodes, its first one spread over them), and two JetStream ingest
workers (backoffice.ingest_jetstream) homed on different nodes (w0 on n1, w1 on n2). The database is a **private**
PostgreSQL (initdb into a temp dir, its own port and socket), so it can be crashed without touching the shared one.

The buses ride all along while, one after the other (each time after the previous blow has healed):

1. node n1 is SIGKILLed (w0's home node and a third of the buses');
2. n1 is back, node n2 is SIGKILLed (w1's home);
3. n2 is back, ingest worker w0 is SIGKILLed (its unacknowledged deliveries go to w1 after ack_wait, 5 s);
4. w0 is back, PostgreSQL is stopped with ``pg_ctl -m immediate`` (a crash: no checkpoint, WAL recovery at start),
   kept down ``PG_DOWN`` seconds while the buses go on tapping, and started again.

After each blow every bus's backlog must drain (timeout ``DRAIN``, generous: no timing is asserted); how long it took,
from the blow until every bus was acknowledged again, is printed and written to
var/test-artefacts/cluster_failures.json. At the end, with plain SQL on the private database and sqlite3 on the
validators' journals: every record a journal marks acknowledged is in ``tap`` (nothing acknowledged is lost, through
the database crash too: what was acknowledged before it is checked right after it), no (device_id, device_seq)
twice and exactly the journals' records (nothing stored twice, nothing extra), no unacknowledged record left (every
backlog drained), and the buses did send batches again (the resend-and-dedupe path ran).

50 validators in the default suite; ``FAREBOX_SOAK=1`` runs 500 (``FAREBOX_CLUSTER_VALIDATORS`` sets any number).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from bench.cluster import NATS_SERVER, JetStreamWorker, NatsCluster, free_ports, shards
from wire.devicekeys import TEST_DEVICE_MASTER

pytestmark = pytest.mark.slow
SOAK = os.environ.get("FAREBOX_SOAK") == "1"
VALIDATORS = int(os.environ.get("FAREBOX_CLUSTER_VALIDATORS", "500" if SOAK else "50"))
DRAIN = 600 if SOAK else 300  # seconds a backlog may take to drain after a blow before the test fails
PG_DOWN = 5.0  # seconds PostgreSQL stays down
ARTEFACT = Path(__file__).resolve().parents[2] / "var" / "test-artefacts" / "cluster_failures.json"


def _pg_bin() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


class PrivatePostgres:
    """A PostgreSQL server of the test's own: initdb into a temp dir, 127.0.0.1:<free port>, trust, its socket in
    that dir. As root it runs as the ``postgres`` account (PostgreSQL refuses root)."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="farebox-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_ports(1)[0]
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            import pwd

            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> None:
        out = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=self.root)
        assert out.returncode == 0, f"{args[0]}: {out.stdout}{out.stderr}"

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=100"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120",
                  "-o", opts, "start", timeout=180)

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except (AssertionError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _journal_rows(path) -> list[tuple[int, int]]:
    """(device_seq, acked) of the records a bus sends (state done), with plain SQL on its journal file."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT device_seq, acked FROM record WHERE state = 'done'").fetchall()
    finally:
        db.close()


def _acked(work: Path, devices) -> set[tuple[str, int]]:
    return {(d, s) for d, _ in devices for s, a in _journal_rows(work / f"{d}.journal") if a}


def _stored(db_url: str) -> tuple[set[tuple[str, int]], int, int]:
    """(device_id, device_seq) in tap, its row count and its distinct count: plain SQL."""
    eng = create_engine(db_url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(text("SELECT device_id, device_seq FROM tap")).all()
            distinct = conn.execute(text("SELECT count(DISTINCT (device_id, device_seq)) FROM tap")).scalar_one()
    finally:
        eng.dispose()
    return {(r.device_id, r.device_seq) for r in rows}, len(rows), distinct


def _ride(buses, n=1):
    for shard in buses:
        shard.ride(n)


def _drain(buses, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = [s.backlog() for s in buses]
        if not any(records for records, _ in counts):
            return
        assert time.monotonic() < deadline, (
            f"backlog not drained in {timeout} s: {sum(r for r, _ in counts)} records on "
            f"{sum(b for _, b in counts)} buses")
        time.sleep(0.2)


def _duplicates(log: Path) -> int:
    """Duplicates a worker turned away, from the counts it logs when it stops (SIGTERM)."""
    return sum(int(m) for m in re.findall(r"'duplicates': (\d+)", log.read_text(errors="replace")))


@pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server not installed (scripts/ensure-services.sh)")
@pytest.mark.skipif(_pg_bin() is None, reason="PostgreSQL server binaries (initdb, pg_ctl) not installed")
def test_cluster_loses_nothing_acknowledged_through_node_worker_and_database_kills(tmp_path, uid):
    pg = PrivatePostgres(_pg_bin())
    operator = f"op_{uid}"
    devices = [(f"k{i:04d}_{uid}", operator) for i in range(VALIDATORS)]
    cluster = workers = None
    buses: list = []
    timings: dict[str, float] = {}
    failovers = resends = 0
    try:
        pg.init()
        pg.start()
        db_url = pg.create_database("farebox")
        engine = make_engine(db_url)
        upgrade(engine)
        with engine.begin() as conn:
            registry.add_operator(conn, code=operator, name="Failure Bus")
            for device, _ in devices:
                registry.add_device(conn, device_id=device, operator=operator, vehicle=None,
                                    terminal_id="010000000777")
        engine.dispose()

        cluster = NatsCluster(tmp_path / "nats", devices, TEST_DEVICE_MASTER)
        cluster.start()
        cluster.wait_ready()
        workers = [JetStreamWorker(tmp_path, db_url, cluster.nats_urls(), f"w{i}_{uid}", ack_wait=5.0, home=i)
                   for i in (0, 1)]
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        for i, w in enumerate(workers):  # on different nodes: w0 on n1, w1 on n2
            assert f"connected to NATS at 127.0.0.1:{cluster.nodes[i].client_port}" in w.log.read_text()
        t0 = time.monotonic()
        buses = shards(tmp_path, [d for d, _ in devices], operator, [n.mqtt_port for n in cluster.nodes])
        _ride(buses, 2)
        _drain(buses, DRAIN)
        timings["start: connect and first taps acknowledged (s)"] = round(time.monotonic() - t0, 1)

        def restart_pg():
            pg.stop("immediate")  # a crash: no shutdown checkpoint, WAL recovery at start
            _ride(buses, 2)  # taps while the database is down
            time.sleep(PG_DOWN)
            pg.start()

        blows = (
            ("SIGKILL node n1", lambda: cluster.kill(0)),
            ("SIGKILL node n2 (n1 back)", lambda: (cluster.start(0), cluster.wait_ready(), cluster.kill(1))),
            ("SIGKILL ingest worker w0 (n2 back)",
             lambda: (cluster.start(1), cluster.wait_ready(), workers[0].kill())),
            (f"PostgreSQL crash-stopped, down {PG_DOWN:.0f} s (w0 back)",
             lambda: (workers[0].start(), workers[0].wait_ready(), restart_pg())),
        )
        for blow, act in blows:
            _ride(buses, 2)  # in flight when the blow lands
            acked_before = _acked(tmp_path, devices)
            t_blow = time.monotonic()
            act()
            t_acted = time.monotonic()
            _ride(buses, 2)  # and after it
            _drain(buses, DRAIN)
            done = time.monotonic()
            timings[f"{blow}: every bus acknowledged again after (s)"] = round(done - t_acted, 1)
            if blow.startswith("PostgreSQL"):
                timings["PostgreSQL: from the crash (s)"] = round(done - t_blow, 1)
                stored, _, _ = _stored(db_url)
                lost = acked_before - stored
                assert not lost, f"acknowledged before the database crash, gone after it: {sorted(lost)[:5]}"
    finally:
        for shard in buses:
            failovers += shard.stop()
            resends += shard.resends
        for w in workers or ():
            w.stop()
        if cluster is not None:
            cluster.stop()

    try:
        written = {(d, s): a for d, _ in devices for s, a in _journal_rows(tmp_path / f"{d}.journal")}
        stored, rows, distinct = _stored(db_url)
    finally:
        pg.destroy()
    report = {"validators": VALIDATORS, "records": len(written), "rows": rows, "failovers": failovers,
              "resends": resends, "duplicates_turned_away": sum(_duplicates(w.log) for w in workers), **timings}
    ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTEFACT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    assert all(written.values()), "a journal still holds unacknowledged records"  # every backlog drained
    assert {k for k, a in written.items() if a} <= stored  # nothing acknowledged is lost
    assert rows == distinct == len(written) and stored == set(written)  # nothing stored twice, nothing extra
    assert failovers >= VALIDATORS // 3  # the buses on n1 and n2 did move
    assert resends > 0  # batches whose ack was lost with a node or a worker were sent again (and turned away)

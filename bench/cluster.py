"""`python -m bench cluster`: ack latency through a 3-node NATS cluster beside single Mosquitto, same validators.

For each engine, a fresh PostgreSQL database with N validators registered, then N real validators (tests/simbus.Bus:
Terminal, Journal, Uplink with simulated cards; every bus its own paho client with a persistent session), up to
``SHARD`` per child process (:func:`shards`), and the engine's ingest:

- **mosquitto**: a private Mosquitto (free port, the bench.fleet ``Broker``: nothing dropped silently) and one
  ``IngestConsumer`` worker process (what ``farebox ingest`` runs).
- **nats**: three nats-server nodes on loopback (``farebox.broker_config.write_nats_config``: MQTT listener per
  node, JetStream, stream_replicas 3), the buses spread over the nodes (each with the three URLs, failing over), and
  ``workers`` JetStream ingest workers (``backoffice.ingest_jetstream``, what ``farebox ingest --engine nats``
  runs) on the one durable consumer.

Each bus taps ``taps`` times, one tap every ``interval`` seconds (spread over the fleet); latency = a record's
journal write -> its acknowledgement marked in the journal (publish, broker, ingest, commit, ack back), timed in
each bus's ``Journal.mark_acked`` (in the bus's own process). Out: p50/p95/p99/max per engine, taps/s, JSON in
bench/results/cluster.json.

:class:`NatsCluster` (start, SIGKILL and restart nodes) is also what tests/integration/test_nats_cluster.py uses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class NatsCluster:
    """Three (or ``n``) nats-server nodes on loopback with the farebox configuration for ``devices``."""

    def __init__(self, work: Path, devices: list[tuple[str, str]], master: bytes, n: int = 3):
        from farebox.broker_config import write_nats_config

        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        ports = free_ports(3 * n)
        # write_nats_config counts ports up from the given ones; free ones are not consecutive, so one file per node
        self.files = []
        self.nodes = []
        from farebox.broker_config import NatsNode, nats_conf, _write_private  # noqa: F401

        base = write_nats_config(devices=devices, master=master, folder=self.work, nodes=n)
        nodes = [NatsNode(node.name, "127.0.0.1", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2], node.store_dir)
                 for i, node in enumerate(base.nodes)]
        users = _users(devices, master)
        for node, conf in zip(nodes, base.confs, strict=True):
            _write_private(conf, nats_conf(node, nodes, users=users), None)
        self.nodes = nodes
        self.confs = list(base.confs)
        self.procs: list[subprocess.Popen | None] = [None] * n

    def start(self, i: int | None = None) -> None:
        for k in ([i] if i is not None else range(len(self.nodes))):
            log = open(self.work / f"{self.nodes[k].name}.log", "ab")
            self.procs[k] = subprocess.Popen([NATS_SERVER, "-c", str(self.confs[k])], stdout=log, stderr=log)
            log.close()

    def wait_ready(self, timeout: float = 60) -> None:
        """Every running node answers on its MQTT and client ports."""
        deadline = time.monotonic() + timeout
        for k, node in enumerate(self.nodes):
            if self.procs[k] is None:
                continue
            while not (_answers(node.mqtt_port) and _answers(node.client_port)):
                if time.monotonic() > deadline or self.procs[k].poll() is not None:
                    raise RuntimeError(f"nats node {node.name} did not start: see {self.work / node.name}.log")
                time.sleep(0.1)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            self.procs[i] = None

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                self.procs[i] = None

    def mqtt_targets(self, device: str, master: bytes, *, first: int = 0):
        """The device's login on every node, starting with node ``first``."""
        from wire.devicekeys import mqtt_password
        from wire.mqtt_url import MqttTarget

        n = len(self.nodes)
        return [MqttTarget("127.0.0.1", self.nodes[(first + k) % n].mqtt_port, device, mqtt_password(master, device))
                for k in range(n)]

    def nats_urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{node.client_port}" for node in self.nodes]


def _users(devices, master):
    from backoffice.devices import BACKOFFICE_USERS, service_password
    from farebox.broker_config import NATS_SERVICE_PERMISSIONS, nats_device_permissions
    from wire.devicekeys import mqtt_password

    users = [(u, service_password(master, u), NATS_SERVICE_PERMISSIONS[u]) for u in BACKOFFICE_USERS]
    return users + [(d, mqtt_password(master, d), nats_device_permissions(d, op)) for d, op in devices]


# A JetStream ingest worker process (tests and the bench): test keys, accept_unsigned as the simulated buses need.
JETSTREAM_WORKER = """
import logging, sys
from pathlib import Path
from backoffice.db import make_engine
from backoffice.devices import service_password
from backoffice.ingest_jetstream import JetStreamIngest, nats_urls, run_forever
from epurse.keys import TEST_ISSUER_KEYS
from wire.devicekeys import TEST_DEVICE_MASTER

database_url, urls, name, ready, ack_wait = sys.argv[1:6]
in_order = sys.argv[6:7] == ["in-order"]  # the first URL is the worker's home node
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
worker = JetStreamIngest(make_engine(database_url),
                         nats_urls(urls, user="ingest", password=service_password(TEST_DEVICE_MASTER, "ingest")),
                         keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER, name=name, accept_unsigned=True,
                         ack_wait=float(ack_wait), randomize=not in_order)
worker.on_ready = lambda: Path(ready).touch()
run_forever(worker)
"""


class JetStreamWorker:
    """A JetStream ingest worker process on ``urls``; ``home``: connect to ``urls[home]`` first, then the others in
    order (a worker on a chosen node), else nats-py's random order."""

    def __init__(self, work: Path, database_url: str, urls: list[str], name: str, ack_wait: float = 5.0,
                 home: int | None = None):
        self.work, self.name = Path(work), name
        if home is not None:
            urls = urls[home:] + urls[:home]
        self.args = [database_url, ",".join(urls), name, str(self.work / f"{name}.ready"), str(ack_wait)]
        if home is not None:
            self.args.append("in-order")
        self.ready = self.work / f"{name}.ready"
        self.log = self.work / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", JETSTREAM_WORKER, *self.args], stdout=log,
                                         stderr=log)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JetStream ingest worker {self.name} did not start: see {self.log}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------- the bench


def _measure(buses, taps: int, interval: float, drain: float = 120.0, *, driver: bool = True,
             raw: bool = False) -> dict:
    """Each bus taps ``taps`` times, the fleet's taps spread over ``interval``; ack latency per record: from the
    tap's journal write to the moment the bus's journal marks it acknowledged (timed in the bus's own
    ``Journal.mark_acked``, which the uplink calls when a verified ack arrives; no polling of the journals, which at
    2,000 buses cost more CPU than the brokers)."""
    written: list[dict[int, float]] = [{} for _ in buses]  # per bus: device_seq -> when written (still unacked)
    early: list[dict[int, float]] = [{} for _ in buses]  # acked before the tap loop noted it was written
    latencies: list[float] = []
    lock = threading.Lock()
    counting = threading.Event()

    def hook(i, original):
        def mark_acked(seqs, *args, **kwargs):
            out = original(seqs, *args, **kwargs)
            if counting.is_set():
                now = time.monotonic()
                with lock:
                    for seq in seqs:
                        t = written[i].pop(seq, None)
                        if t is None:
                            early[i][seq] = now
                        else:
                            latencies.append((now - t) * 1000)
            return out
        return mark_acked

    for i, bus in enumerate(buses):
        bus.journal.mark_acked = hook(i, bus.journal.mark_acked)
        if driver:
            bus.tap(bus.driver)
    # Warm up: every bus's shift record acknowledged first (on NATS an MQTT subscription is a JetStream consumer
    # made after the CONNACK; an ack published before it exists is lost and costs the bus a resend).
    deadline = time.monotonic() + drain
    while any(b.journal.backlog() for b in buses) and time.monotonic() < deadline:
        time.sleep(0.1)
    counting.set()
    t0 = time.monotonic()
    gap = interval / max(1, len(buses))
    taps_written = 0
    for k in range(taps):
        for i, bus in enumerate(buses):
            bus.tap(bus.riders[k % len(bus.riders)])
            now = time.monotonic()
            seq = bus.journal._last_seq  # the record just written
            with lock:
                acked = early[i].pop(seq, None)
                if acked is None:
                    written[i][seq] = now
                else:
                    latencies.append(max(0.0, acked - now) * 1000)
            taps_written += 1
            time.sleep(gap)
    sent = time.monotonic() - t0
    deadline = time.monotonic() + drain
    while any(written) and time.monotonic() < deadline:
        time.sleep(0.1)
    counting.clear()
    lat = sorted(latencies)
    if raw:
        return {"latencies": lat, "taps": taps_written, "seconds": sent}

    def q(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    return {"validators": len(buses), "taps": taps_written, "acked": len(lat), "seconds": round(sent, 1),
            "taps_per_s": round(taps_written / sent, 1), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99),
            "max_ms": round(lat[-1], 1) if lat else None}


def _database(pg_url: str, operator: str, devices: list[str]) -> str:
    import secrets

    import psycopg
    from sqlalchemy.engine import make_url

    from backoffice import registry
    from backoffice.db import make_engine, upgrade

    name = f"bench_cluster_{secrets.token_hex(3)}"
    url = make_url(pg_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    db_url = url.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Cluster bench")
        for d in devices:
            registry.add_device(conn, device_id=d, operator=operator, vehicle=None, terminal_id="010000000777")
    engine.dispose()
    return db_url


def _drop(pg_url: str, db_url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{make_url(db_url).database}" WITH (FORCE)')


def _one(engine: str, validators: int, *, taps: int, interval: float, workers: int, pg_url: str) -> dict:
    """One run of one engine: a fresh database, the broker(s) and ingest, ``validators`` real buses; their ack
    latencies."""
    from bench.fleet import Broker, _mosquitto_program
    from wire.devicekeys import TEST_DEVICE_MASTER
    from wire.mqtt_url import MqttTarget

    operator = "cbench"
    devices = [f"c{i:05d}" for i in range(validators)]
    work = Path(tempfile.mkdtemp(prefix=f"bench-cluster-{engine}-"))
    db_url = _database(pg_url, operator, devices)
    procs: list = []
    cluster = broker = None
    buses = []
    try:
        t0 = time.monotonic()
        if engine == "mosquitto":
            broker = Broker(_mosquitto_program(), work / "broker")
            from bench.fleet import _start_ingest

            ingest = _start_ingest(db_url, MqttTarget("127.0.0.1", broker.port), None, work / "ingest.ready")
            procs.append(ingest)
            ports = [broker.port]
        else:
            cluster = NatsCluster(work / "nats", [(d, operator) for d in devices], TEST_DEVICE_MASTER)
            cluster.start()
            cluster.wait_ready()
            ws = [JetStreamWorker(work, db_url, cluster.nats_urls(), f"w{i}", home=i % 3) for i in range(workers)]
            for w in ws:
                w.start()
            for w in ws:
                w.wait_ready()
            procs.extend(ws)
            ports = [n.mqtt_port for n in cluster.nodes]
        buses = shards(work, devices, operator, ports)  # real validators, up to SHARD per child process
        for shard in buses:  # every shard taps its buses at once, each spread over the interval
            shard.proc.stdin.write(json.dumps(["measure", taps, interval]) + "\n")
            shard.proc.stdin.flush()
        parts = [shard._ask() for shard in buses]
        lat = sorted(x for p in parts for x in p["latencies"])
        written = sum(p["taps"] for p in parts)
        sent = max(p["seconds"] for p in parts)

        def q(p, lat=lat):
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

        return {"validators": validators, "taps": written, "acked": len(lat), "seconds": round(sent, 1),
                "taps_per_s": round(written / sent, 1), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99),
                "max_ms": round(lat[-1], 1) if lat else None, "run_s": round(time.monotonic() - t0, 1)}
    finally:
        for shard in buses:
            shard.stop()
        for p in procs:
            if hasattr(p, "stop"):
                p.stop()
            else:
                from bench.fleet import _stop

                _stop(p)
        if cluster is not None:
            cluster.stop()
        if broker is not None:
            broker.stop()
        _drop(pg_url, db_url)
        shutil.rmtree(work, ignore_errors=True)


def _median(values):
    import statistics

    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def run(*, validators: int | list[int] = (500, 2000), rounds: int = 3, taps: int = 5, interval: float = 2.0,
        workers: int = 2, pg_url: str | None = None, out: Path | None = None) -> dict:
    """For each fleet size, ``rounds`` runs of each engine, alternating which goes first; per engine the median of
    each percentile over the rounds, and NATS over Mosquitto as the ratio of the medians (and the median of each
    round's ratio). JSON written after every run, so a stopped bench keeps what it measured."""
    import platform
    import resource

    from farebox.broker_config import MQTT_CONSUMER_REPLICAS

    pg_url = pg_url or os.environ.get("FAREBOX_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    sizes = [validators] if isinstance(validators, int) else list(validators)
    out = out or Path(__file__).resolve().parent / "results" / "cluster.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result: dict = {"command": "python -m bench.cluster " + " ".join(map(str, sizes)) + f" --rounds {rounds}",
                    "taps_per_validator": taps, "interval_s": interval, "rounds": rounds,
                    "nats": {"nodes": 3, "stream_replicas": 3, "consumer_replicas": MQTT_CONSUMER_REPLICAS,
                             "consumers_per_bus": 5, "ingest_workers": workers},
                    "mosquitto": {"ingest_workers": 1}, "cpus": os.cpu_count(), "machine": platform.node(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sizes": {}}
    for n in sizes:
        runs: dict[str, list] = {"mosquitto": [], "nats": []}
        entry = result["sizes"][str(n)] = {"runs": runs}
        for r in range(rounds):
            for engine in (("mosquitto", "nats") if r % 2 == 0 else ("nats", "mosquitto")):
                try:
                    one = _one(engine, n, taps=taps, interval=interval, workers=workers, pg_url=pg_url)
                except Exception as e:  # noqa: BLE001 - a run that fails is reported, the others go on
                    one = {"validators": n, "error": f"{type(e).__name__}: {e}"}
                one["round"] = r
                runs[engine].append(one)
                print(engine, n, one, flush=True)
                _summarise(entry)
                out.write_text(json.dumps(result, indent=2) + "\n")
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({n: {k: v for k, v in e.items() if k != "runs"} for n, e in result["sizes"].items()}, indent=2))
    return result


def _summarise(entry: dict) -> None:
    runs = entry["runs"]
    for engine in ("mosquitto", "nats"):
        ok = [r for r in runs[engine] if "p99_ms" in r]
        entry[engine] = {f"median_{k}": _median([r[k] for r in ok]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")}
        entry[engine]["unacked_taps"] = [r["taps"] - r["acked"] for r in ok]
        entry[engine]["failed_runs"] = len(runs[engine]) - len(ok)
    m, n = entry["mosquitto"]["median_p99_ms"], entry["nats"]["median_p99_ms"]
    entry["p99_ratio_nats_over_mosquitto"] = round(n / m, 2) if m and n else None
    pairs = [(a["p99_ms"], b["p99_ms"]) for a, b in zip(runs["mosquitto"], runs["nats"], strict=False)
             if a.get("p99_ms") and b.get("p99_ms")]
    import statistics

    entry["median_of_round_p99_ratios"] = round(statistics.median([b / a for a, b in pairs]), 2) if pairs else None
    m, n = entry["mosquitto"]["median_p50_ms"], entry["nats"]["median_p50_ms"]
    entry["p50_ratio_nats_over_mosquitto"] = round(n / m, 2) if m and n else None


# ---------------------------------------------------------------------- many real validators: one process per shard

# paho's loop_start() select()s, which cannot take a descriptor numbered 1024 or above: one process holds about 150
# real validators (socket, wake-up pair, journal with its WAL). A shard is a child process with up to SHARD buses,
# driven over stdin/stdout, one JSON line each way: ["ride", n] -> {"ok": true}; ["backlog"] -> {"backlog": n,
# "buses": k}; ["stop"] -> {"failovers": n} and it exits. Journals stay in ``work`` (tests read them with sqlite3).
SHARD = 100
BUS_SHARD = """
import json, logging, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, str(Path(sys.argv[1]).parent))
logging.basicConfig(level=logging.ERROR)
from pathlib import Path
from simbus import Bus
from hardware_sim.card import SimCard
from wire.devicekeys import TEST_DEVICE_MASTER, mqtt_password
from wire.mqtt_url import MqttTarget

spec = json.loads(sys.argv[2])
work, operator = Path(spec["work"]), spec["operator"]
buses = []
for i, device in spec["devices"]:
    ports = spec["ports"]
    targets = [MqttTarget("127.0.0.1", ports[(i + k) % len(ports)], device,
                          mqtt_password(TEST_DEVICE_MASTER, device)) for k in range(len(ports))]
    bus = Bus(work, targets, operator, device)
    bus.riders = [SimCard(bytes.fromhex(f"96{i:04d}{k:014d}"), c.card_type, c.balance, start=c.start, end=c.end)
                  for k, c in enumerate(bus.riders, 1)]
    buses.append(bus)
for bus in buses:
    bus.uplink.start()
    bus.tap(bus.driver)
print(json.dumps({"ok": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd[0] == "ride":
        for bus in buses:
            for _ in range(cmd[1]):
                bus.tap(bus.riders[bus.journal._last_seq % len(bus.riders)])
        out = {"ok": True}
    elif cmd[0] == "measure":
        from bench.cluster import _measure
        out = _measure(buses, cmd[1], cmd[2], driver=False, raw=True)
    elif cmd[0] == "backlog":
        out = {"backlog": sum(b.journal.backlog() for b in buses), "buses": sum(1 for b in buses if b.journal.backlog())}
    else:
        for bus in buses:
            bus.uplink.stop(goodbye_timeout=0.5)
        out = {"failovers": sum(b.uplink.failovers for b in buses), "resends": sum(b.uplink.resends for b in buses)}
        for bus in buses:
            bus.journal.close()
        print(json.dumps(out), flush=True)
        break
    print(json.dumps(out), flush=True)
"""


class BusShard:
    """Up to SHARD real validators (tests/simbus.Bus) in a child process; ``devices``: (index, device id), the
    index choosing the bus's first node and its riders' card numbers."""

    def __init__(self, work: Path, devices: list[tuple[int, str]], operator: str, mqtt_ports: list[int]):
        tests = str(Path(__file__).resolve().parents[1] / "tests")
        spec = {"work": str(work), "operator": operator, "devices": devices, "ports": mqtt_ports}
        self.devices = [d for _, d in devices]
        self.resends = 0
        self.proc = subprocess.Popen([sys.executable, "-c", BUS_SHARD, tests, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, *cmd) -> dict:
        if cmd:
            self.proc.stdin.write(json.dumps(list(cmd)) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bus shard {self.devices[0]}.. ended (exit {self.proc.poll()})")
        return json.loads(line)

    def started(self) -> None:
        self._ask()

    def ride(self, n: int) -> None:
        self._ask("ride", n)

    def backlog(self) -> tuple[int, int]:
        out = self._ask("backlog")
        return out["backlog"], out["buses"]

    def stop(self) -> int:
        if self.proc.poll() is not None:
            return 0
        try:
            out = self._ask("stop")
        except (RuntimeError, BrokenPipeError):
            out = {"failovers": 0}
        self.proc.wait(30)
        self.resends = out.get("resends", 0)  # batches sent again after an ack timeout
        return out["failovers"]


def shards(work: Path, devices: list[str], operator: str, mqtt_ports: list[int]) -> list[BusShard]:
    indexed = list(enumerate(devices))
    out = [BusShard(work, indexed[k:k + SHARD], operator, mqtt_ports) for k in range(0, len(indexed), SHARD)]
    for s in out:
        s.started()
    return out


if __name__ == "__main__":  # python -m bench.cluster [N ...] [--rounds R] [--taps T]
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.cluster")
    ap.add_argument("validators", nargs="*", type=int, default=[500, 2000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--taps", type=int, default=5)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    run(validators=a.validators, rounds=a.rounds, taps=a.taps, interval=a.interval, out=a.out)

"""`python -m bench fleet`: how many validators one machine carries against one broker, beside the bare broker.

Set-up: a fresh PostgreSQL database with N validators registered and, for every phase, a private Mosquitto of its
own (``Broker``: a free loopback port, ``max_queued_messages 0`` so nothing is dropped silently, its connection
log counted into the JSON) and, in the farebox phase, one ingest worker process (``backoffice.ingest_consumer.
run_worker``, what ``farebox ingest`` runs: device MAC, TAC per purchase, dedupe, fraud look-up, commit, then a
MAC'd acknowledgement). A broker per phase because persistent sessions outlive their clients: a stopped ingest
worker's session stays subscribed to every tap and queues each later batch without limit, an earlier phase's
validators stay subscribed to their ack topics.

A simulated validator is a light one, not the whole Terminal (the point is the link at scale, and a real one costs
a journal and two threads): one paho client with a persistent session (clean_session=False, fixed client id,
QoS 1) that subscribes to its own ``ack`` topic, publishes a v2 batch (``wire.codec.encode_batch``, MAC'd with its
device key, ``batch`` valid purchases whose TACs come from the published issuer test keys) every ``interval``
seconds and a MAC'd heartbeat (``wire.status``, retained) every ``heartbeat`` seconds, the fleet's sends spread
evenly over the interval. All payloads are built before the clock starts.

The clients run in ceil(N / ``per_process``) driver processes, each ONE thread driving its share through paho's
external-loop calls over epoll (``Shard``). Not ``loop_start``: that is a thread and a select() per client, and
select() cannot take a descriptor numbered 1024 or above; paho reads the ValueError as a lost connection, closes
the socket before its CONNECT goes out and retries after 1, 2, 4, 8, 16 s. With three descriptors per client
(socket + wake-up pair, the pair kept until the client is garbage) a few hundred clients in one process were
enough: the first version of this bench lost 146 of 250 clients that way and blamed the machine.

For each N of the ramp (``steps``, stopping at the first N past the limit), two phases of ``seconds`` each, with
the same devices and the same bytes (fresh client ids and a fresh broker for each):

- **baseline**: the N clients publish and nothing reads the taps: what the broker and the clients cost alone.
  Latency = publish -> PUBACK from the broker.
- **farebox**: ingest running. Latency = publish -> the back office's acknowledgement arriving at the validator
  (broker in, ingest, database commit, broker out); PUBACK latency beside it.

Backlog = batches published and not yet acknowledged, summed over the drivers at the same instants (every 0.5 s
on the shared monotonic clock). "Bounded" = the second half of the phase averages no more than twice the first
half (+ N/10 for noise) and everything is acknowledged within the grace period after the last send. The limit (the
ramp stops after the first N that hits it): farebox p99 ack latency above ``limit_ms``, an unbounded backlog, or
clients that could not connect.

Nothing is asserted; the table prints per N the rates, latencies and the ratio farebox / baseline, and
``bench/results/fleet.json`` keeps everything.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import secrets
import selectors
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt

from bench.common import fmt_ratio, percentile, ratio, table, write_result
from bench.ingest import (
    DEFAULT_PG_URL,
    Fleet,
    Unavailable,
    make_fleet,
    make_payloads,
    postgres,
)
from bench.ingest import register as register_fleet
from wire import codec, topics
from wire import status as wstatus
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import MqttTarget, configure_client, parse_mqtt_url

DEFAULT_STEPS = (100, 250, 500, 1000, 2000)
QUICK_STEPS = (10, 25)
CLIENTS_PER_PROCESS = 500  # one network loop drives this many validators; more validators, more driver processes
SAMPLE_S = 0.5  # backlog sampling period


# ---------------------------------------------------------------------------------------------- private broker

def _mosquitto_program() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


class Broker:
    """A Mosquitto of our own for one phase, so no phase inherits another's persistent sessions (a stopped ingest
    worker's session stays subscribed to every tap and queues each one without limit; an earlier phase's
    validators stay subscribed to their ack topics). Its log (connections, not every packet: that would cost the
    broker more than the fleet) is counted after the phase: TCP connections accepted, CONNECTs accepted, and
    sockets that closed before sending a CONNECT."""

    def __init__(self, program: str, work: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        work.mkdir(parents=True, exist_ok=True)
        # Mosquitto started as root drops to the mosquitto user: the log's folder must be writable for it.
        # Its folder is the run's mkdtemp folder (0700): let others through it, not read it.
        work.chmod(0o777)
        work.parent.chmod(work.parent.stat().st_mode | 0o011)
        self.log = work / "mosquitto.log"
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_connections -1\nmax_queued_messages 0\nmax_queued_bytes 0\n"
                        "max_inflight_messages 100\n"
                        f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
                        "log_type information\n")
        self.proc = subprocess.Popen([program, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(f"private mosquitto did not start (see {self.log})") from None
                time.sleep(0.05)
        self.target = parse_mqtt_url(f"mqtt://127.0.0.1:{self.port}")

    def stop(self) -> dict:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        # Less the one readiness check that got through (the refused ones never reach the log); the ingest
        # worker, in the farebox phase, is one of the CONNECTs.
        return {"log_written": self.log.exists(), "tcp_accepted": max(0, text.count("New connection from") - 1),
                "connects_accepted": text.count("New client connected"),
                "closed_before_connect": max(0, text.count("Client <unknown> closed its connection") - 1),
                "dropped_warnings": text.count("dropped")}


# ------------------------------------------------------------------------------- simulated validators (shards)

@dataclass
class Sim:
    """One simulated validator: its client, its batches in order, and what it has seen."""

    index: int  # its place in the whole fleet: its sends are spread by it
    device_id: str
    key: bytes
    client: mqtt.Client
    taps_topic: str
    status_topic: str
    heartbeat: bytes
    batches: list[tuple[int, bytes]]  # (first device_seq, payload)
    connected: bool = False
    dropped: bool = False
    next_batch: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)  # first seq -> when published (awaiting the ack)
    mid_at: dict[int, float | None] = field(default_factory=dict)  # paho message id -> when published (PUBACK)


@dataclass
class ShardSpec:
    """What one driver process needs: its share of the fleet and the phase's parameters (picklable)."""

    url: str
    tag: str
    operator: str
    devices: list[tuple[int, str, str, list[tuple[int, bytes]]]]  # (fleet index, device id, terminal, batches)
    fleet_size: int
    acks: bool
    seconds: float
    interval: float
    heartbeat: float
    grace: float
    connect_timeout: float


class Shard:
    """Up to a few hundred validators driven by ONE thread: paho's external-loop interface (loop_read /
    loop_write / loop_misc) over an epoll selector. paho's loop_start would give each client its own thread and
    its own select() - and select() cannot watch a descriptor numbered 1024 or more: paho takes the ValueError
    for a lost connection, closes the socket before the CONNECT goes out and retries after 1, 2, 4, 8, 16 s.
    No locks: callbacks run on this thread, inside loop_read."""

    def __init__(self, spec: ShardSpec):
        self.spec = spec
        self.sel = selectors.DefaultSelector()  # epoll on Linux: no descriptor limit but the process's ulimit
        self.target = parse_mqtt_url(spec.url)
        self.puback_ms: list[float] = []
        self.ack_ms: list[float] = []
        self.bad_acks = 0
        self.published = 0
        self.heartbeats = 0
        self.drops = 0
        self.sims: list[Sim] = []
        now = datetime.now(UTC)
        for index, device_id, terminal, batches in spec.devices:
            key = mac_key(TEST_DEVICE_MASTER, device_id)
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fl_{spec.tag}_{device_id}",
                                 clean_session=False, protocol=mqtt.MQTTv311)
            configure_client(client, self.target)
            client.max_inflight_messages_set(20)
            heartbeat = wstatus.encode_status(wstatus.Status(kind="heartbeat", device_id=device_id, at=now,
                                                             software="bench", psam=terminal), key=key)
            sim = Sim(index, device_id, key, client, topics.taps(spec.operator, device_id),
                      topics.status(spec.operator, device_id), heartbeat, batches)
            client.user_data_set(sim)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.on_message = self._on_message
            client.on_socket_open = self._sock_open
            client.on_socket_close = self._sock_close
            client.on_socket_register_write = self._want_write
            client.on_socket_unregister_write = self._done_writing
            self.sims.append(sim)

    # the selector follows paho's sockets

    def _sock_open(self, client, sim, sock):
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _sock_close(self, client, sim, sock):
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client, sim, sock):
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _done_writing(self, client, sim, sock):
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    # paho callbacks

    def _on_connect(self, client, sim, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        if self.spec.acks:
            client.subscribe(topics.ack(self.spec.operator, sim.device_id), qos=1)
        sim.connected = True

    def _on_disconnect(self, client, sim, flags, reason_code, properties):
        if sim.connected and not sim.dropped and reason_code.is_failure:
            sim.dropped = True
            self.drops += 1

    def _on_publish(self, client, sim, mid, reason_code, properties):
        at = sim.mid_at.pop(mid, None)
        if at is not None:  # None: a heartbeat's (not timed) or the subscription's
            self.puback_ms.append((time.monotonic() - at) * 1000)

    def _on_message(self, client, sim, message):
        t = time.monotonic()
        try:
            ack = codec.decode_ack(message.payload, key=sim.key)
        except codec.WireError:
            self.bad_acks += 1
            return
        for seq in ack.seqs:
            at = sim.sent_at.pop(seq, None)
            if at is not None:
                self.ack_ms.append((t - at) * 1000)

    # the loop

    def pump(self, timeout: float) -> None:
        for key, events in self.sel.select(timeout):
            client = key.data
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()

    def misc(self) -> None:
        for sim in self.sims:
            if sim.client.socket() is not None:
                sim.client.loop_misc()  # keepalive pings, retries of unacknowledged QoS 1

    def connect(self) -> tuple[int, float]:
        """Connect every client, serving the ones already connected meanwhile (a TCP connect at a time, so the
        broker's accept queue never overflows). Returns (how many could not connect, seconds)."""
        t = time.monotonic()
        deadline = t + self.spec.connect_timeout
        for sim in self.sims:
            try:
                sim.client.connect(self.target.host, self.target.port, keepalive=60)
            except OSError:
                continue
            self.pump(0)
        while time.monotonic() < deadline and not all(s.connected for s in self.sims):
            self.pump(0.05)
        return sum(not s.connected for s in self.sims), time.monotonic() - t

    def backlog(self) -> int:
        return sum(len(s.sent_at) for s in self.sims)

    def drive(self, t0: float) -> dict:
        """From ``t0`` (time.monotonic, the same clock in every process) send for ``seconds``, then wait up to
        ``grace`` for the last acknowledgements. Backlog sampled every SAMPLE_S on the shared clock."""
        spec = self.spec
        n = spec.fleet_size
        due = [t0 + spec.interval * s.index / n for s in self.sims]
        beat = [t0 + spec.heartbeat * s.index / n for s in self.sims]
        samples: list[tuple[int, int]] = []
        next_sample = 0
        next_misc = t0 + 1
        end = t0 + spec.seconds
        while time.monotonic() < t0:
            self.pump(max(0.0, min(0.05, t0 - time.monotonic())))
        while True:
            now = time.monotonic()
            if now >= end:
                break
            for i, sim in enumerate(self.sims):
                if not sim.connected:
                    continue
                if now >= due[i] and sim.next_batch < len(sim.batches):
                    first, payload = sim.batches[sim.next_batch]
                    sim.next_batch += 1
                    at = time.monotonic()
                    if spec.acks:
                        sim.sent_at[first] = at
                    info = sim.client.publish(sim.taps_topic, payload, qos=1)
                    sim.mid_at[info.mid] = at  # single thread: its PUBACK cannot be handled before this line
                    self.published += 1
                    due[i] += spec.interval
                if now >= beat[i]:
                    info = sim.client.publish(sim.status_topic, sim.heartbeat, qos=1, retain=True)
                    sim.mid_at[info.mid] = None
                    self.heartbeats += 1
                    beat[i] += spec.heartbeat
            while now >= t0 + next_sample * SAMPLE_S:
                samples.append((next_sample, self.backlog()))
                next_sample += 1
            if now >= next_misc:
                self.misc()
                next_misc = now + 1
            self.pump(0.005)
        deadline = time.monotonic() + spec.grace
        while time.monotonic() < deadline and (self.backlog() if spec.acks else len(self.puback_ms) < self.published):
            self.pump(0.05)
            if time.monotonic() >= next_misc:
                self.misc()
                next_misc = time.monotonic() + 1
        left = self.backlog() if spec.acks else self.published - len(self.puback_ms)
        return {"puback_ms": self.puback_ms, "ack_ms": self.ack_ms, "bad_acks": self.bad_acks,
                "published": self.published, "heartbeats": self.heartbeats, "drops": self.drops, "left": left,
                "samples": samples}

    def close(self) -> None:
        for sim in self.sims:
            if sim.client.socket() is not None:
                sim.client.disconnect()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(s.client.socket() is not None for s in self.sims):
            self.pump(0.05)
        self.sel.close()


def _raise_nofile() -> int:
    """Soft limit of open files up to the hard one (a validator costs a descriptor here and one in the broker)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _shard_main(spec: ShardSpec, conn) -> None:
    """A driver process: connect, report, wait for the common start time, drive, report."""
    _raise_nofile()
    shard = Shard(spec)
    try:
        failed, seconds = shard.connect()
        conn.send(("connected", failed, seconds))
        while not conn.poll(0):  # keep the connected clients served while the other drivers connect
            shard.pump(0.02)
        _msg, t0 = conn.recv()
        conn.send(("done", shard.drive(t0)))
    finally:
        shard.close()
        conn.close()


def _summary(samples_ms: list[float]) -> dict:
    if not samples_ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(samples_ms), "p50_ms": round(percentile(samples_ms, 50), 1),
            "p99_ms": round(percentile(samples_ms, 99), 1), "max_ms": round(max(samples_ms), 1)}


def _bounded(samples: list[tuple[float, int]], n: int) -> bool:
    values = [b for _, b in samples]
    if len(values) < 4:
        return True
    half = len(values) // 2
    return statistics.fmean(values[half:]) <= 2 * statistics.fmean(values[:half]) + n / 10


def _batches_per_device(fleet: Fleet, per_device: int, batch: int, seq_base: int, dtks: dict):
    payloads = make_payloads(fleet, per_device * batch * len(fleet.devices), batch, seq_base=seq_base, dtks=dtks)
    out: dict[str, list[tuple[int, bytes]]] = {d: [] for d, _ in fleet.devices}
    for d, _topic, payload, _n in payloads:
        device_id = fleet.devices[d][0]
        out[device_id].append((seq_base + len(out[device_id]) * batch + 1, payload))
    return out


def _start_ingest(database_url: str, target: MqttTarget, operator: str, ready: Path):
    from backoffice.ingest_consumer import WorkerSpec, run_worker
    from farebox.keys import published_test_keys

    spec = WorkerSpec(database_url, target, published_test_keys, TEST_DEVICE_MASTER, f"fleet_ingest_{ready.stem}",
                      operator=operator, ready_file=str(ready), log_level=40)
    proc = multiprocessing.get_context("spawn").Process(target=run_worker, args=(spec,), daemon=True)
    proc.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the ingest worker did not subscribe")
        time.sleep(0.05)
    return proc


def _stop(proc) -> None:
    proc.terminate()
    proc.join(15)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _phase(program: str, work: Path, tag: str, fleet: Fleet, batches, *, acks: bool, seconds: float,
           interval: float, heartbeat: float, grace: float, per_process: int,
           ingest: tuple[str, Path] | None = None) -> dict:
    """One phase on a broker of its own: the clients in ceil(N / per_process) driver processes (spawned, each one
    network thread), the ingest worker in its own process when ``ingest`` = (database URL, ready file)."""
    n = len(fleet.devices)
    procs_n = max(1, math.ceil(n / per_process))
    broker = Broker(program, work)
    ctx = multiprocessing.get_context("spawn")
    worker = None
    shards: list[tuple[multiprocessing.Process, object]] = []
    try:
        if ingest is not None:
            worker = _start_ingest(ingest[0], broker.target, fleet.operator, ingest[1])
        url = broker.target.url(with_password=True)
        for p in range(procs_n):
            devices = [(i, d, term, batches[d]) for i, (d, term) in enumerate(fleet.devices) if i % procs_n == p]
            spec = ShardSpec(url, tag, fleet.operator, devices, n, acks, seconds, interval, heartbeat, grace,
                             connect_timeout=30 + n / 50)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_shard_main, args=(spec, child), daemon=True)
            proc.start()
            child.close()
            shards.append((proc, parent))
        t = time.monotonic()
        failed = 0
        for _proc, conn in shards:
            if not conn.poll(120 + n / 10):
                raise RuntimeError("a driver process did not report its connections")
            _msg, f, _s = conn.recv()
            failed += f
        connect_s = time.monotonic() - t
        t0 = time.monotonic() + 0.5
        for _proc, conn in shards:
            conn.send(("start", t0))
        parts = []
        for _proc, conn in shards:
            if not conn.poll(seconds + grace + 60):
                raise RuntimeError("a driver process did not report its phase")
            parts.append(conn.recv()[1])
        for proc, _conn in shards:
            proc.join(15)
    finally:
        for proc, conn in shards:
            conn.close()
            if proc.is_alive():
                proc.kill()
                proc.join()
        if worker is not None:
            _stop(worker)
        log = broker.stop()
    puback = [x for part in parts for x in part["puback_ms"]]
    acked = [x for part in parts for x in part["ack_ms"]]
    published = sum(part["published"] for part in parts)
    backlog: dict[int, int] = {}
    for part in parts:
        for k, b in part["samples"]:
            backlog[k] = backlog.get(k, 0) + b
    samples = [(round(k * SAMPLE_S, 2), backlog[k]) for k in sorted(backlog)]
    left = sum(part["left"] for part in parts)
    return {"validators": n, "driver_processes": procs_n, "connect_failed": failed, "connect_s": round(connect_s, 2),
            "broker_log": log, "batches": published, "heartbeats": sum(part["heartbeats"] for part in parts),
            "batches_per_s": round(published / seconds, 1), "puback": _summary(puback),
            "ack": _summary(acked) if acks else None, "bad_acks": sum(part["bad_acks"] for part in parts),
            "connections_dropped": sum(part["drops"] for part in parts), "unacknowledged_after_grace": left,
            "backlog_max": max((b for _, b in samples), default=0), "backlog_samples": samples,
            "bounded": _bounded(samples, n) and left == 0}


def run(*, steps=DEFAULT_STEPS, seconds: float = 30.0, interval: float = 5.0, heartbeat: float = 15.0,
        batch: int = 10, limit_ms: float = 2000.0, grace: float = 20.0, per_process: int = CLIENTS_PER_PROCESS,
        console=None, results_dir: Path | None = None) -> dict:
    from backoffice.db import make_engine, upgrade

    def log(text: str) -> None:
        if console is not None:
            console.print(text)

    uid = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix="farebox_bench_fleet_"))
    pg_url = os.environ.get("FAREBOX_BENCH_PG_URL", DEFAULT_PG_URL)
    rows_out: list[dict] = []
    doc: dict = {"params": {"steps": list(steps), "seconds": seconds, "interval_s": interval, "heartbeat_s": heartbeat,
                            "batch_records": batch, "limit_p99_ack_ms": limit_ms, "grace_s": grace}}
    program = _mosquitto_program()
    if program is None:
        raise Unavailable("no mosquitto program: the fleet bench needs private brokers (max_queued_messages 0)")
    doc["params"]["open_files_limit"] = _raise_nofile()
    doc["params"]["clients_per_process"] = per_process
    try:
        with postgres(pg_url) as backend:
            engine = make_engine(backend.database_url)
            upgrade(engine)
            full = make_fleet(uid, max(steps))
            register_fleet(engine, full)
            dtks: dict = {}
            per_device = int(seconds // interval) + 1
            limit_hit = None
            for k, n in enumerate(steps):
                fleet = Fleet(full.operator, full.devices[:n])
                t = time.perf_counter()
                batches = _batches_per_device(fleet, per_device, batch, seq_base=k * 1_000_000, dtks=dtks)
                log(f"N={n}: {per_device * n} batches of {batch} purchases built in {time.perf_counter() - t:.1f} s")
                common = {"seconds": seconds, "interval": interval, "heartbeat": heartbeat, "grace": grace,
                          "per_process": per_process}
                base = _phase(program, work / f"b{k}", f"b{uid}{k}", fleet, batches, acks=False, **common)
                with engine.begin() as conn:  # each step's cards start their counters again: no false fraud
                    conn.exec_driver_sql("TRUNCATE tap, quarantine, fraud_flag")
                fb = _phase(program, work / f"f{k}", f"f{uid}{k}", fleet, batches, acks=True,
                            ingest=(backend.database_url, work / f"ingest{k}.ready"), **common)
                with engine.connect() as conn:
                    fb["rows_stored"] = conn.exec_driver_sql("SELECT count(*) FROM tap").scalar_one()
                    fb["quarantined"] = conn.exec_driver_sql("SELECT count(*) FROM quarantine").scalar_one()
                row = {"validators": n, "baseline": base, "farebox": fb,
                       "ack_p99_over_puback_p99": ratio(fb["ack"]["p99_ms"], base["puback"]["p99_ms"])}
                rows_out.append(row)
                log(f"N={n}: baseline PUBACK p50 {base['puback']['p50_ms']} ms p99 {base['puback']['p99_ms']} ms; "
                    f"farebox ack p50 {fb['ack']['p50_ms']} ms p99 {fb['ack']['p99_ms']} ms, backlog max "
                    f"{fb['backlog_max']}, bounded {fb['bounded']}, rows {fb['rows_stored']}, not connected "
                    f"{base['connect_failed']} / {fb['connect_failed']}")
                reasons = []
                if fb["connect_failed"] or base["connect_failed"]:
                    reasons.append("clients could not connect")
                if fb["ack"]["p99_ms"] is None or fb["ack"]["p99_ms"] > limit_ms:
                    reasons.append(f"p99 ack latency over {limit_ms:.0f} ms")
                if not fb["bounded"]:
                    reasons.append("backlog not bounded")
                if reasons:
                    limit_hit = {"validators": n, "why": reasons}
                    break
            engine.dispose()
            doc["limit"] = limit_hit
            doc["sustained"] = max((r["validators"] for r in rows_out
                                    if limit_hit is None or r["validators"] < limit_hit["validators"]), default=0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["steps"] = rows_out
    rows = [[str(r["validators"]), f"{r['farebox']['batches_per_s']:.0f}",
             f"{r['baseline']['puback']['p50_ms']} / {r['baseline']['puback']['p99_ms']}",
             f"{r['farebox']['puback']['p50_ms']} / {r['farebox']['puback']['p99_ms']}",
             f"{r['farebox']['ack']['p50_ms']} / {r['farebox']['ack']['p99_ms']}",
             fmt_ratio(r["ack_p99_over_puback_p99"]), str(r["farebox"]["backlog_max"]),
             "yes" if r["farebox"]["bounded"] else "NO",
             f"{r['baseline']['connect_failed']} / {r['farebox']['connect_failed']}",
             str(r["farebox"]["driver_processes"])] for r in rows_out]
    caption = (f"each validator: a {batch}-purchase v2 batch every {interval:g} s and a heartbeat every "
               f"{heartbeat:g} s, {seconds:g} s a phase; one ingest worker into PostgreSQL. "
               f"Sustained: {doc.get('sustained')} validators"
               + (f"; limit at {doc['limit']['validators']}: {', '.join(doc['limit']['why'])}" if doc.get("limit")
                  else " (no limit reached)"))
    if console is not None:
        console.print(table("fleet: validators on one broker (latencies p50 / p99 ms)",
                            ["validators", "batches/s", "baseline PUBACK", "farebox PUBACK", "farebox ack",
                             "ack p99 / base p99", "backlog max", "bounded", "not connected", "drivers"],
                            rows, caption))
    path = write_result("fleet", doc, **({"results_dir": results_dir} if results_dir else {}))
    log(f"written {path}")
    return doc

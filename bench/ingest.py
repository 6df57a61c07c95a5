"""`python -m bench ingest`: taps per second from MQTT into the back office's database, beside a bare baseline.

Set-up, per back end (PostgreSQL, and SQLite as the embedded default opens it):

- a private Mosquitto on a free loopback port, its config in a temp dir with ``max_queued_messages 0``: the
  machine's broker keeps Mosquitto's default of 1000 queued messages per client and silently drops the rest for a
  subscriber that falls behind (PLATFORM.md). Without the ``mosquitto`` program the bench uses
  ``$FAREBOX_BENCH_MQTT_URL`` (default the machine's broker) and publishers hold back (``window``) so no queue ever
  passes 1000;
- a fresh database (PostgreSQL: ``CREATE DATABASE farebox_bench_<pid>_<hex>``, dropped afterwards; SQLite: a file in
  a temp dir), migrated with Alembic; one operator and N validators registered;
- N simulated validators, each its own paho client (QoS 1), publishing real v2 batches (``wire.codec.encode_batch``
  MAC'd with each device's key, 50 records each, as the uplink sends) of valid purchases whose TACs are computed
  with ``epurse.crypto`` from the published issuer test keys; all payloads are built before the clock starts.

Phases, each on empty tables with the same payloads, timed from the first publish until a poll (``SELECT count(*)``
every 20 ms) sees every row; the order of the phases turns round from one round to the next:

- **raw**: a bare subscriber in a process of its own: decode each batch and COPY its records (PostgreSQL;
  ``executemany`` on SQLite) into a plain table without keys or indexes, one commit per batch; no checks at all.
- **farebox x1**: one ingest worker process (``backoffice.ingest_consumer.run_worker``, what ``farebox ingest``
  runs): device MAC, device and PSAM checks, TAC per purchase, fraud look-up by card counter, dedupe, quarantine,
  several messages per transaction, acknowledgement after commit.
- **farebox x2**: two worker processes on one shared subscription (``$share/<group>/...``).

On PostgreSQL ``tap`` is partitioned by service day (revision 0026, backoffice.partitions): before the rounds the
bench makes ``partition_days`` day partitions (default 90, a quarter kept attached) so ingest writes into its day's
partition with the others beside it, as in production; the farebox x2 / raw ratio is the figure "ingest into the
partitioned table beside the bare COPY subscriber" (goal >= 0.8). After the rounds it times ingest's card counter
look-up (``purchases_by_card_counter``: 2,000 (card, counter) pairs, the fraud check of every batch) over the
partitioned table as ingest does it (the days within ``CARD_WINDOW_DAYS``) and over every attached day, beside the
same SQL over an unpartitioned copy of the same rows with the same index, at 90 and at 365 attached days.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt

from bench.common import fmt_ratio, ratio, table, write_result
from epurse import crypto
from epurse.apdu import TX_PURCHASE
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import MqttTarget, configure_client, parse_mqtt_url
from wire.records import RecordKind, TapRecord

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DB_PREFIX = "farebox_bench_"
FARE = 200
PHASES = ("raw", "farebox_x1", "farebox_x2")

RAW_COLUMNS = ("device_id", "device_seq", "kind", "occurred_at", "received_at", "operator", "route", "vehicle",
               "driver", "shift_no", "card_asn", "card_type", "card_ttc", "amount", "balance_after", "terminal_id",
               "terminal_seq", "tac", "reason")
RAW_TABLE = ("CREATE TABLE IF NOT EXISTS bench_raw (device_id text, device_seq bigint, kind text, "
             "occurred_at timestamptz, received_at timestamptz, operator text, route text, vehicle text, "
             "driver text, shift_no integer, card_asn text, card_type integer, card_ttc integer, amount bigint, "
             "balance_after bigint, terminal_id text, terminal_seq bigint, tac text, reason text)")


# ---------------------------------------------------------------------- services


@dataclass
class Backend:
    label: str
    kind: str  # "postgresql" | "sqlite"
    database_url: str  # SQLAlchemy form
    sqlite_path: Path | None = None
    libpq_url: str | None = None


class Unavailable(RuntimeError):
    """A service the back end needs does not answer; the back end is skipped with this reason."""


def _libpq(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme.split("+", 1)[0] + sep + rest


def _with_database(url: str, name: str) -> str:
    base, q, query = url.partition("?")
    head = base.rpartition("/")[0] if "/" in base.partition("://")[2] else base
    return f"{head}/{name}" + (q + query if q else "")


def _tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def private_mosquitto(work: Path) -> Iterator[tuple[str, bool]]:
    """(URL, private?): a Mosquitto of our own with unlimited queues, or the shared one when there is no program."""
    program = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if program is None:
        url = os.environ.get("FAREBOX_BENCH_MQTT_URL", DEFAULT_MQTT_URL)
        target = parse_mqtt_url(url)
        if not _tcp_answers(target.host, target.port):
            raise Unavailable(f"no mosquitto program and no broker at {target.url(with_password=False)}")
        yield url, False
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 100\n"
                    f"log_dest file {work / 'mosquitto.log'}\n")
    proc = subprocess.Popen([program, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _tcp_answers("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"private mosquitto did not start (see {work / 'mosquitto.log'})")
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}", True
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def postgres(pg_url: str) -> Iterator[Backend]:
    import psycopg

    admin = _libpq(pg_url)
    name = f"{DB_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            _drop_orphans(conn)
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    except psycopg.Error as e:
        raise Unavailable(f"PostgreSQL at {pg_url}: {str(e).strip().splitlines()[0] if str(e).strip() else e}")
    url = _with_database(pg_url, name)
    try:
        yield Backend("PostgreSQL", "postgresql", url, libpq_url=_libpq(url))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_orphans(conn) -> None:
    """Databases of earlier bench runs on this machine whose process is gone (a run killed half-way)."""
    import psycopg

    rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (DB_PREFIX + "%",)).fetchall()
    for (name,) in rows:
        parts = name[len(DB_PREFIX):].split("_")
        if len(parts) == 2 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            with contextlib.suppress(psycopg.Error):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def sqlite_file(work: Path) -> Iterator[Backend]:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "backoffice.db"
    yield Backend("SQLite", "sqlite", f"sqlite:///{path}", sqlite_path=path)


# ---------------------------------------------------------------------- the taps


@dataclass
class Fleet:
    operator: str
    devices: list[tuple[str, str]]  # (device_id, terminal_id hex)
    rounds: list = field(default_factory=list)


def make_fleet(uid: str, validators: int) -> Fleet:
    operator = f"bench_{uid}"
    devices = [(f"bv{uid}_{i:03d}", (0x020000000000 + i + 1).to_bytes(6, "big").hex()) for i in range(validators)]
    return Fleet(operator, devices)


def make_payloads(fleet: Fleet, total: int, batch_size: int, *, seq_base: int, cards: int = 2000,
                  dtks: dict | None = None) -> list[tuple[int, str, bytes, int]]:
    """``total`` valid purchases spread over the fleet as v2 batches MAC'd with each device's key, interleaved
    device by device (the order they are published in). Every (card, counter) pair is used once, as on real cards."""
    dtks = {} if dtks is None else dtks
    n = len(fleet.devices)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    per_device: list[list[tuple[bytes, int]]] = []
    ttc: dict[bytes, int] = {}
    for d, (device_id, terminal_hex) in enumerate(fleet.devices):
        terminal = bytes.fromhex(terminal_hex)
        key = mac_key(TEST_DEVICE_MASTER, device_id)
        count = total // n + (1 if d < total % n else 0)
        records = []
        for k in range(count):
            seq = seq_base + k + 1
            asn = b"\x20\x01" + ((d * 7919 + k * 104729) % cards).to_bytes(8, "big")
            dtk = dtks.get(asn)
            if dtk is None:
                dtk = dtks[asn] = crypto.diversify(TEST_ISSUER_KEYS.tac, asn)
            at = base + timedelta(seconds=seq * 7 + d)
            card_ttc = ttc.get(asn, 0)
            ttc[asn] = card_ttc + 1
            tac = crypto.purchase_tac(dtk, FARE, TX_PURCHASE, terminal, seq, crypto.bcd_date(at), crypto.bcd_time(at))
            records.append(TapRecord(
                device_id=device_id, device_seq=seq, kind=RecordKind.PURCHASE, occurred_at=at,
                operator=fleet.operator, route="r1", vehicle=f"bus{d}", driver="D0001", shift_no=1,
                card_asn=asn.hex(), card_type=1, card_ttc=card_ttc, amount=FARE, balance_after=100_000,
                terminal_id=terminal_hex, terminal_seq=seq, tac=tac.hex()))
        per_device.append([(codec.encode_batch(records[i:i + batch_size], key=key), len(records[i:i + batch_size]))
                           for i in range(0, len(records), batch_size)])
    out = []
    for j in range(max(len(p) for p in per_device)):
        for d, batches in enumerate(per_device):
            if j < len(batches):
                payload, n_records = batches[j]
                out.append((d, topics.taps(fleet.operator, fleet.devices[d][0]), payload, n_records))
    return out


def register(engine, fleet: Fleet) -> None:
    from backoffice import registry

    with engine.begin() as conn:
        registry.add_operator(conn, code=fleet.operator, name="farebox bench")
        for device_id, terminal in fleet.devices:
            registry.add_device(conn, device_id=device_id, operator=fleet.operator, vehicle=None,
                                terminal_id=terminal)


# ---------------------------------------------------------------------- MQTT clients


def _client(target: MqttTarget, client_id: str, *, clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                         protocol=mqtt.MQTTv311)
    configure_client(client, target)
    return client


def _set_when_accepted(event: threading.Event):
    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            event.set()

    return on_connect


class Publishers:
    """One paho client per simulated validator, QoS 1."""

    def __init__(self, target: MqttTarget, uid: str, n: int, tag: str):
        self.target = target
        self.clients = [_client(target, f"bench_{uid}_{tag}_v{i}") for i in range(n)]
        self._connected = [threading.Event() for _ in range(n)]
        for client, ev in zip(self.clients, self._connected, strict=True):
            client.max_inflight_messages_set(20)
            client.on_connect = _set_when_accepted(ev)

    def connect(self, timeout: float = 20) -> None:
        for c in self.clients:
            c.connect_async(self.target.host, self.target.port, keepalive=30)
            c.loop_start()
        deadline = time.monotonic() + timeout
        for ev in self._connected:
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"simulated validators could not connect to {self.target.url(with_password=False)}")

    def publish(self, payloads, stored: Callable[[], int], window_records: int | None, stop: threading.Event) -> float:
        """Publish everything in order (never more than ``window_records`` beyond ``stored()`` when set)."""
        t0 = time.perf_counter()
        sent = 0
        infos = []
        for d, topic, payload, n in payloads:
            while window_records is not None and sent - stored() > window_records and not stop.is_set():
                time.sleep(0.002)
            if stop.is_set():
                break
            infos.append(self.clients[d].publish(topic, payload, qos=1))
            sent += n
        for info in infos:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")
        return time.perf_counter() - t0

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def _raw_main(kind: str, db: str, mqtt_url: str, client_id: str, topic: str, ready: str) -> None:
    """The baseline, in a process of its own like the workers: decode each batch and bulk-insert its records."""
    import signal

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    if kind == "postgresql":
        import psycopg

        conn = psycopg.connect(db)
        copy_sql = f"COPY bench_raw ({', '.join(RAW_COLUMNS)}) FROM STDIN"

        def store(payload: bytes, key: bytes) -> None:
            now = datetime.now(UTC)
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                for row in _raw_rows(payload, key, now):
                    copy.write_row(row)
            conn.commit()
    else:
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        insert = f"INSERT INTO bench_raw ({', '.join(RAW_COLUMNS)}) VALUES ({', '.join('?' * len(RAW_COLUMNS))})"

        def store(payload: bytes, key: bytes) -> None:
            now = datetime.now(UTC).isoformat()
            rows = [(*r[:3], r[3].isoformat(), now, *r[5:]) for r in _raw_rows(payload, key, now)]
            conn.execute("BEGIN")
            conn.executemany(insert, rows)
            conn.execute("COMMIT")

    keys: dict[str, bytes] = {}

    def on_message(client, userdata, message):
        device = message.topic.split("/")[3]
        key = keys.get(device) or keys.setdefault(device, mac_key(TEST_DEVICE_MASTER, device))
        store(message.payload, key)

    client = _client(parse_mqtt_url(mqtt_url), client_id)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: Path(ready).touch()
    client.on_message = on_message
    target = parse_mqtt_url(mqtt_url)
    client.connect(target.host, target.port, keepalive=30)
    client.loop_start()
    done.wait()
    client.disconnect()
    client.loop_stop()
    conn.close()


def _raw_rows(payload: bytes, key: bytes, now):
    batch = codec.decode_batch(payload, key=key)
    for r in batch.records:
        yield (r.device_id, r.device_seq, r.kind.value, r.occurred_at, now, r.operator, r.route, r.vehicle,
               r.driver, r.shift_no, r.card_asn, r.card_type, r.card_ttc, r.amount, r.balance_after, r.terminal_id,
               r.terminal_seq, r.tac, r.reason)


class Counter:
    """``SELECT count(*)`` of one table, on a connection of its own (the tables are emptied before each phase)."""

    def __init__(self, backend: Backend, table_name: str):
        if backend.kind == "postgresql":
            import psycopg

            self.conn = psycopg.connect(backend.libpq_url, autocommit=True)
        else:
            self.conn = sqlite3.connect(backend.sqlite_path, isolation_level=None, timeout=30)
        self._sql = f"SELECT count(*) FROM {table_name}"

    def __call__(self) -> int:
        return self.conn.execute(self._sql).fetchone()[0]

    def close(self) -> None:
        self.conn.close()


def forget_session(target: MqttTarget, client_id: str) -> None:
    """Connect once with clean_session=True so the broker drops a persistent session and its queue."""
    client = _client(target, client_id, clean=True)
    try:
        client.connect(target.host, target.port, keepalive=10)
        client.loop_start()
        time.sleep(0.2)
        client.disconnect()
        client.loop_stop()
    except OSError:
        pass


# ---------------------------------------------------------------------- one timed phase


def _timed_phase(payloads, expected: int, count: Counter, publishers: Publishers, window: int | None,
                 timeout: float) -> dict:
    """From the first publish until ``count()`` reaches ``expected`` (or ``timeout``)."""
    latest = [0]
    stop = threading.Event()
    published: dict = {}

    def publish():
        try:
            published["seconds"] = publishers.publish(payloads, lambda: latest[0], window, stop)
        except Exception as e:  # noqa: BLE001 - reported in the result
            published["error"] = str(e)

    thread = threading.Thread(target=publish, name="bench-publish", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    deadline = t0 + timeout
    while True:
        latest[0] = n = count()
        now = time.perf_counter()
        if n >= expected or now > deadline or "error" in published:
            break
        time.sleep(0.02)
    elapsed = now - t0
    stop.set()
    thread.join(timeout=10)
    rows = latest[0]
    return {
        "rows": rows,
        "expected": expected,
        "complete": rows >= expected,
        "seconds": round(elapsed, 3),
        "publish_seconds": round(published.get("seconds", float("nan")), 3),
        "taps_per_s": round(rows / elapsed, 1) if elapsed > 0 else None,
        **({"error": published["error"]} if "error" in published else {}),
    }


def _wait_files(paths: list[Path], procs: list, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if any(not p.is_alive() for p in procs) or time.monotonic() > deadline:
            raise RuntimeError("a subscriber process did not get its subscription")
        time.sleep(0.05)


def _stop_procs(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(20)
        if p.is_alive():
            p.kill()
            p.join()


def _empty_tables(backend: Backend) -> None:
    if backend.kind == "postgresql":
        import psycopg

        with psycopg.connect(backend.libpq_url, autocommit=True) as conn:
            conn.execute("TRUNCATE tap, quarantine, fraud_flag, bench_raw")
            conn.execute("VACUUM ANALYZE tap")
    else:
        with contextlib.closing(sqlite3.connect(backend.sqlite_path, isolation_level=None, timeout=30)) as conn:
            for name in ("tap", "quarantine", "fraud_flag", "bench_raw"):
                conn.execute(f"DELETE FROM {name}")


PARTITION_DAYS = 90
LOOKUP_PAIRS = 2_000
LOOKUP_SAMPLES = 25


def make_partitions(engine, days: int) -> int:
    """Day partitions of tap for ``days`` days back from today (and the week ahead the migration made)."""
    from backoffice import partitions

    today = datetime.now(UTC).date()
    for n in range(days):
        with engine.begin() as conn:
            partitions.make_day(conn, "tap", today - timedelta(days=n))
    with engine.connect() as conn:
        return len(partitions.attached(conn, "tap"))


def _median_ms(fn, samples: int) -> float:
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def lookup_figures(engine, more_days: int, log: Callable[[str], None]) -> dict:
    """Ingest's card counter look-up over the partitioned tap beside the same SQL over an unpartitioned copy."""
    from backoffice.ingest import CARD_WINDOW_DAYS, _PgCopyStore

    with engine.begin() as conn:
        pairs = {tuple(r) for r in conn.exec_driver_sql(
            f"SELECT card_asn, card_ttc FROM tap ORDER BY random() LIMIT {LOOKUP_PAIRS}")}
        low, high = conn.exec_driver_sql("SELECT min(service_day), max(service_day) FROM tap").one()
        window = (low - timedelta(days=CARD_WINDOW_DAYS), high + timedelta(days=CARD_WINDOW_DAYS))
        conn.exec_driver_sql("DROP TABLE IF EXISTS bench_tap_flat")
        conn.exec_driver_sql("CREATE TABLE bench_tap_flat AS SELECT * FROM tap")
        conn.exec_driver_sql("CREATE INDEX ON bench_tap_flat (card_asn, card_ttc)")
        conn.exec_driver_sql("ANALYZE tap")
        conn.exec_driver_sql("ANALYZE bench_tap_flat")
    asns, ttcs = (list(x) for x in zip(*sorted(pairs), strict=True))
    flat_sql = ("SELECT t.card_asn, t.card_ttc, t.device_id, t.device_seq, t.amount, t.terminal_id, t.terminal_seq, "
                "t.tac, t.occurred_at, t.epoch FROM unnest(%s::text[], %s::int[]) AS q(asn, ttc) "
                "JOIN bench_tap_flat t ON t.card_asn = q.asn AND t.card_ttc = q.ttc WHERE t.kind = 'purchase'")

    def measure() -> dict:
        with engine.connect() as conn:
            store = _PgCopyStore(conn, copy=True)
            pg = store.pg
            found = len(list(store.purchases_by_card_counter(pairs, window)))
            found_all = len(list(store.purchases_by_card_counter(pairs)))
            flat_found = len(pg.execute(flat_sql, (asns, ttcs), prepare=False).fetchall())
            windowed = _median_ms(lambda: list(store.purchases_by_card_counter(pairs, window)), LOOKUP_SAMPLES)
            every_day = _median_ms(lambda: list(store.purchases_by_card_counter(pairs)), LOOKUP_SAMPLES)
            flat = _median_ms(lambda: pg.execute(flat_sql, (asns, ttcs), prepare=False).fetchall(), LOOKUP_SAMPLES)
            conn.rollback()
        if not found == found_all == flat_found == len(pairs):
            raise RuntimeError(f"card look-up found {found} / {found_all} / {flat_found} of {len(pairs)} pairs")
        return {"pairs": len(pairs), "window_days": CARD_WINDOW_DAYS, "partitioned_ms": windowed,
                "every_day_ms": every_day, "flat_ms": flat}

    out = {}
    with engine.connect() as conn:
        from backoffice import partitions

        out["attached_before"] = len(partitions.attached(conn, "tap"))
    out[f"at_{out['attached_before']}"] = first = measure()
    log(f"  card look-up, {first['pairs']} pairs: partitioned ({out['attached_before']} days) "
        f"{first['partitioned_ms']} ms (every day: {first['every_day_ms']} ms), unpartitioned copy "
        f"{first['flat_ms']} ms (medians of {LOOKUP_SAMPLES})")
    if not more_days:
        return out
    attached = make_partitions(engine, more_days)
    out[f"at_{attached}"] = second = measure()
    out["attached_after"] = attached
    log(f"  card look-up, {second['pairs']} pairs: partitioned ({attached} days) {second['partitioned_ms']} ms "
        f"(every day: {second['every_day_ms']} ms), unpartitioned copy {second['flat_ms']} ms")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE bench_tap_flat")
    return out


def unpartition(engine) -> None:
    """The baseline of the partitioning figure: tap as one table again, with the same columns, keys, indexes and
    insert trigger (whatever later revisions put on it), so the same ingest code runs over it."""
    with engine.begin() as conn:
        triggers = [r[0] for r in conn.exec_driver_sql(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'tap'::regclass AND NOT tgisinternal")]
        conn.exec_driver_sql("CREATE TABLE tap_flat (LIKE tap INCLUDING ALL)")
        conn.exec_driver_sql("ALTER SEQUENCE tap_id_seq OWNED BY NONE")
        conn.exec_driver_sql("DROP TABLE tap CASCADE")  # with its partitions (and views over it: not used here)
        conn.exec_driver_sql("ALTER TABLE tap_flat RENAME TO tap")
        for definition in triggers:
            conn.exec_driver_sql(definition)


def run_backend(backend: Backend, *, mqtt_url: str, private: bool, uid: str, validators: int, taps: int,
                batch: int, rounds: int, window: int, timeout: float, phases=PHASES,
                log: Callable[[str], None], partition_days: int = PARTITION_DAYS, flat: bool = False,
                lookup_days: int = 365) -> dict:
    from backoffice.db import make_engine, upgrade
    from backoffice.ingest_consumer import WorkerSpec, run_worker
    from farebox.keys import published_test_keys  # each worker opens it: no key crosses to a process

    ctx = multiprocessing.get_context("spawn")
    target = parse_mqtt_url(mqtt_url)
    engine = make_engine(backend.database_url)
    upgrade(engine)
    fleet = make_fleet(uid, validators)
    register(engine, fleet)
    with engine.begin() as conn:
        conn.exec_driver_sql(RAW_TABLE if backend.kind == "postgresql" else RAW_TABLE.replace("timestamptz", "text"))
    attached = None
    if flat:
        unpartition(engine)
        log("  tap as one table (unpartitioned baseline)")
    elif backend.kind == "postgresql":
        attached = make_partitions(engine, partition_days)
        log(f"  tap partitioned by service day: {attached} day partitions attached")
    engine.dispose()
    scoped = f"{topics.PREFIX}/{fleet.operator}/+/taps"
    db = backend.libpq_url if backend.kind == "postgresql" else str(backend.sqlite_path)
    count_raw, count_taps = Counter(backend, "bench_raw"), Counter(backend, "tap")
    results: dict[str, list] = {p: [] for p in phases}
    ready_dir = Path(tempfile.mkdtemp(prefix="farebox_bench_ready_"))
    try:
        t = time.perf_counter()
        payloads = make_payloads(fleet, taps, batch, seq_base=0)
        log(f"  {len(payloads)} v2 batches of up to {batch} records from {validators} validators built in "
            f"{time.perf_counter() - t:.1f} s")
        for r in range(rounds):
            order = list(phases) if r % 2 == 0 else list(reversed(phases))
            for phase in order:
                _empty_tables(backend)
                tag = f"{phase}{r}"
                if phase == "raw":
                    ready = [ready_dir / f"{tag}.ready"]
                    ids = [f"bench_{uid}_{tag}"]
                    procs = [ctx.Process(target=_raw_main, args=(backend.kind, db, mqtt_url, ids[0], scoped,
                                                                 str(ready[0])), daemon=True)]
                    counter = count_raw
                else:
                    workers = int(phase[-1])
                    ids = [f"bench_{uid}_{tag}_{i}" for i in range(workers)]
                    ready = [ready_dir / f"{cid}.ready" for cid in ids]
                    specs = [WorkerSpec(backend.database_url, target, published_test_keys, TEST_DEVICE_MASTER, cid,
                                        operator=fleet.operator, share_group=f"b{uid}{tag}" if workers > 1 else None,
                                        ready_file=str(rf), log_level=30)
                             for cid, rf in zip(ids, ready, strict=True)]
                    procs = [ctx.Process(target=run_worker, args=(spec,), daemon=True) for spec in specs]
                    counter = count_taps
                for p in procs:
                    p.start()
                publishers = Publishers(target, uid, validators, tag)
                try:
                    _wait_files(ready, procs)
                    publishers.connect()
                    result = _timed_phase(payloads, taps, counter, publishers, None if private else window * batch,
                                          timeout)
                finally:
                    publishers.close()
                    _stop_procs(procs)
                    for cid in ids:
                        forget_session(target, cid)
                if phase != "raw":
                    result["quarantined"] = _count(backend, "quarantine")
                results[phase].append(result)
                flag = "" if result["complete"] else f" [INCOMPLETE: {result['rows']}/{result['expected']} rows]"
                log(f"  round {r + 1} {phase:>10}: {result['taps_per_s']:>9,.0f} taps/s "
                    f"({result['rows']} rows in {result['seconds']:.2f} s){flag}")
    finally:
        count_raw.close()
        count_taps.close()
        shutil.rmtree(ready_dir, ignore_errors=True)

    def med(name):
        rates = [p["taps_per_s"] for p in results.get(name, []) if p["complete"]]
        return round(statistics.median(rates), 1) if rates else None

    out = {"backend": backend.label, "database": backend.kind, "broker": target.url(with_password=False),
           "private_broker": private, "operator": fleet.operator, "raw_taps_per_s": med("raw"), "phases": results}
    for phase in phases:
        if phase == "raw":
            continue
        # Each round's phases ran back to back, so the per-round ratio is the figure least moved by the machine.
        per_round = [ratio(f["taps_per_s"], w["taps_per_s"]) for f, w in zip(results[phase], results["raw"])
                     if f["complete"] and w["complete"]] if "raw" in results else []
        out[f"{phase}_taps_per_s"] = med(phase)
        out[f"{phase}_ratio_to_raw"] = round(statistics.median(per_round), 3) if per_round else None
        out[f"{phase}_ratio_per_round"] = per_round
    out["tap_partitions_attached"] = attached
    if backend.kind == "postgresql" and not flat and "farebox_x1" in results:
        engine = make_engine(backend.database_url)
        try:
            out["card_lookup"] = lookup_figures(engine, lookup_days, log)
        finally:
            engine.dispose()
    return out


def _count(backend: Backend, table_name: str) -> int:
    counter = Counter(backend, table_name)
    try:
        return counter()
    finally:
        counter.close()


# ---------------------------------------------------------------------- entry point

GOAL_TAPS_PER_S = 30_000
GOAL_RATIO = 0.5
GOAL_PARTITIONED_X2 = 0.8  # issue 12: ingest into the partitioned table, two workers, beside the bare COPY subscriber


def run(*, taps: int = 50_000, validators: int = 100, batch: int = 50, rounds: int = 3,
        backends=("postgres", "sqlite"), window: int = 500, timeout: float = 180.0, console=None,
        results_dir=None, flat_baseline: bool = False, lookup_days: int = 365) -> dict:
    """``flat_baseline``: also run PostgreSQL with tap as one table (what partitioning costs ingest, same sitting)."""
    if flat_baseline and "postgres" in backends:
        backends = (*backends, "postgres_flat")
    if not 1 <= batch <= codec.MAX_RECORDS:
        raise ValueError(f"--batch must be 1 to {codec.MAX_RECORDS}")
    if taps < validators:
        raise ValueError("--taps must be at least the number of validators")
    started = time.monotonic()
    uid = secrets.token_hex(4)
    log = console.print if console is not None else (lambda s: None)
    pg_url = os.environ.get("FAREBOX_BENCH_PG_URL", DEFAULT_PG_URL)
    results, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="farebox_bench_ingest_") as tmp:
        for name in backends:
            label = {"postgres": "PostgreSQL", "postgres_flat": "PostgreSQL, tap unpartitioned"}.get(name, "SQLite")
            try:
                with private_mosquitto(Path(tmp) / f"mqtt_{name}") as (mqtt_url, private), \
                        (postgres(pg_url) if name.startswith("postgres") else sqlite_file(Path(tmp) / name)) \
                        as backend:
                    broker = "private Mosquitto (max_queued_messages 0)" if private else mqtt_url
                    log(f"[bold]ingest[/] on {label} + {broker}: {taps} taps from {validators} validators, "
                        f"run id {uid}")
                    backend.label = f"{label} + Mosquitto"
                    results.append(run_backend(backend, mqtt_url=mqtt_url, private=private, uid=uid,
                                               validators=validators, taps=taps, batch=batch, rounds=rounds,
                                               window=window, timeout=timeout, log=log,
                                               flat=name == "postgres_flat", lookup_days=lookup_days))
            except Unavailable as e:
                skipped[label] = str(e)
                log(f"[yellow]  skipped: {e}")
    doc = {
        "params": {"taps": taps, "validators": validators, "batch": batch, "rounds": rounds, "window": window},
        "goals": {"taps_per_s": GOAL_TAPS_PER_S, "ratio_to_raw": GOAL_RATIO,
                  "partitioned_x2_ratio_to_raw": GOAL_PARTITIONED_X2,
                  "note": "PostgreSQL + Mosquitto, 100 validators; the best of 1 and 2 workers"},
        "results": results,
        "skipped": skipped,
        "seconds": round(time.monotonic() - started, 1),
    }
    path = write_result("ingest", doc, **({"results_dir": results_dir} if results_dir else {}))
    if console is not None:
        print_result(console, doc, path)
    return doc


def print_result(console, doc: dict, path) -> None:
    def fmt(rate):
        return "-" if rate is None else f"{rate:,.0f}"

    rows = []
    for r in doc["results"]:
        for phase in ("farebox_x1", "farebox_x2"):
            rate = r.get(f"{phase}_taps_per_s")
            quarantined = sum(p.get("quarantined", 0) for p in r["phases"].get(phase, []))
            met = (rate is not None and rate >= GOAL_TAPS_PER_S and (r.get(f"{phase}_ratio_to_raw") or 0) >= GOAL_RATIO)
            rows.append([r["backend"], phase.replace("farebox_", "farebox "), fmt(rate), fmt(r["raw_taps_per_s"]),
                         f"[bold]{fmt_ratio(r.get(f'{phase}_ratio_to_raw'))}", str(quarantined),
                         "yes" if met else "no"])
    for label in doc["skipped"]:
        rows.append([label, "skipped", "-", "-", "-", "-", "-"])
    p = doc["params"]
    rounds = f"medians of {p['rounds']} rounds" if p["rounds"] > 1 else "1 round"
    console.print(table(
        f"ingest: taps/s, MQTT -> database ({p['taps']} taps, {p['validators']} validators, batches of "
        f"{p['batch']}, {rounds})",
        ["back end", "ingest", "farebox taps/s", "raw taps/s", "farebox / raw", "quarantined",
         f"goal (>= {GOAL_TAPS_PER_S:,}/s and >= {GOAL_RATIO}x)"], rows,
        caption="farebox: worker process(es) of `farebox ingest` (device MAC, device/PSAM and TAC checks, fraud "
                "look-up, dedupe, several batches per transaction, COPY on PostgreSQL, ack after commit); x2 = two "
                "workers on one $share subscription. raw: a bare subscriber process decoding each batch and "
                "writing it with COPY (PostgreSQL) / executemany (SQLite) into a plain table, one commit per batch. "
                f"Timed from the first publish to the last row counted; ratios are medians of per-round ratios. "
                f"{doc['seconds']} s. {path}"))
    flat = next((r for r in doc["results"] if r["backend"].startswith("PostgreSQL, tap unpartitioned")), None)
    for r in doc["results"]:
        if flat is not None and r.get("tap_partitions_attached"):
            console.print(f"two workers into the partitioned tap {fmt(r.get('farebox_x2_taps_per_s'))} taps/s "
                          f"({fmt_ratio(r.get('farebox_x2_ratio_to_raw'))} of raw) beside tap as one table "
                          f"{fmt(flat.get('farebox_x2_taps_per_s'))} taps/s "
                          f"({fmt_ratio(flat.get('farebox_x2_ratio_to_raw'))} of its raw), one after the other")
        if r.get("tap_partitions_attached"):
            x2 = r.get("farebox_x2_ratio_to_raw")
            met = "yes" if x2 is not None and x2 >= GOAL_PARTITIONED_X2 else "no"
            console.print(f"ingest into the partitioned tap ({r['tap_partitions_attached']} day partitions attached) "
                          f"beside the bare COPY subscriber, two workers: {fmt(r.get('farebox_x2_taps_per_s'))} "
                          f"taps/s vs {fmt(r['raw_taps_per_s'])} taps/s = [bold]{fmt_ratio(x2)}[/] "
                          f"(per round {r.get('farebox_x2_ratio_per_round')}; goal >= {GOAL_PARTITIONED_X2}x: {met})")
        look = r.get("card_lookup")
        if look:
            rows = [[f"{k[3:]} days attached", str(v["pairs"]), f"{v['partitioned_ms']:.2f}",
                     f"{v['every_day_ms']:.2f}", f"{v['flat_ms']:.2f}",
                     fmt_ratio(ratio(v["partitioned_ms"], v["flat_ms"])),
                     fmt_ratio(ratio(v["every_day_ms"], v["flat_ms"]))]
                    for k, v in look.items() if k.startswith("at_")]
            days = next(v["window_days"] for k, v in look.items() if k.startswith("at_"))
            console.print(table("ingest's card counter look-up (the fraud check of each transaction): partitioned "
                                "tap beside an unpartitioned copy of the same rows and index",
                                ["tap", "pairs", f"ingest (days +-{days}) ms", "every day ms", "unpartitioned ms",
                                 "ingest / unpartitioned", "every day / unpartitioned"],
                                rows, caption=f"medians of {LOOKUP_SAMPLES} runs "
                                              "(backoffice.ingest._PgCopyStore.purchases_by_card_counter; the "
                                              "unpartitioned copy with the same SQL)"))

"""`python -m bench ingest`: taps per second from MQTT into the back office's database, beside a bare baseline.

Set-up, per back end (PostgreSQL + Mosquitto, and SQLite + the embedded amqtt broker):

- a fresh database (PostgreSQL: ``CREATE DATABASE farebox_bench_<pid>_<hex>``, dropped afterwards; SQLite: a file in
  a temp dir), migrated with Alembic; one operator and N validators registered with ``backoffice.registry``;
- N simulated validators, each its own paho client (QoS 1), publish pre-encoded batches
  (``wire.codec.encode_batch``, 50 records each by default, as the uplink sends) of valid purchases whose TACs are
  computed with ``epurse.crypto`` from the published issuer test keys; all payloads are built before the clock starts.

Two phases on the same broker with the same payloads, each timed from the first publish to the moment a poll
(``SELECT count(*)``, every 5 ms on its own connection) sees every row of this run:

- **farebox**: one ``backoffice.ingest_consumer.IngestConsumer``: decode, device check, TAC check with the issuer's
  key, multi-row insert skipping duplicates, quarantine, commit per batch, acknowledgement.
- **raw**: a bare paho subscriber that ``json.loads`` each payload and bulk-inserts its records, no checks, into a
  plain table without keys or indexes: psycopg ``cursor.copy`` on PostgreSQL, ``executemany`` on SQLite (WAL,
  synchronous=FULL, as the back office opens it); one commit per batch, as farebox does.

Isolation on a shared Mosquitto: client ids and the operator (a topic segment) carry a random run id, and both
subscribers subscribe to ``farebox/v1/<this run's operator>/+/taps`` only (the IngestConsumer through its
``operator`` argument). Only this run's operator's rows are counted. The consumer's persistent session is removed from the broker afterwards (a clean-session connect).

Publishers keep at most ``window`` batches beyond what the database holds, so that Mosquitto's default
``max_queued_messages 1000`` never drops a message for the subscriber however large --taps is.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sqlite3
import statistics
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
from wire.mqtt_url import MqttTarget, configure_client, parse_mqtt_url
from wire.records import RecordKind, TapRecord

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DB_PREFIX = "farebox_bench_"
FARE = 200

RAW_COLUMNS = ("device_id", "device_seq", "kind", "occurred_at", "received_at", "operator", "route", "vehicle",
               "driver", "shift_no", "card_asn", "card_type", "card_ttc", "amount", "balance_after", "terminal_id",
               "terminal_seq", "tac", "reason")
RAW_TABLE = ("CREATE TABLE bench_raw (device_id text, device_seq bigint, kind text, occurred_at timestamptz, "
             "received_at timestamptz, operator text, route text, vehicle text, driver text, shift_no integer, "
             "card_asn text, card_type integer, card_ttc integer, amount bigint, balance_after bigint, "
             "terminal_id text, terminal_seq bigint, tac text, reason text)")
_DEFAULTS = {"route": "", "vehicle": "", "driver": "", "shift_no": 0, "card_asn": "", "card_type": 0,
             "card_ttc": 0, "amount": 0, "balance_after": 0, "terminal_id": "", "terminal_seq": 0, "tac": "",
             "reason": ""}


# ---------------------------------------------------------------------- back ends


@dataclass
class Backend:
    label: str
    kind: str  # "postgresql" | "sqlite"
    database_url: str  # SQLAlchemy form
    mqtt_url: str
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
def postgres_mosquitto(pg_url: str, mqtt_url: str) -> Iterator[Backend]:
    import psycopg

    target = parse_mqtt_url(mqtt_url)
    if not _tcp_answers(target.host, target.port):
        raise Unavailable(f"no MQTT broker answers at {target.url(with_password=False)}")
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
        yield Backend("PostgreSQL + Mosquitto", "postgresql", url, mqtt_url, libpq_url=_libpq(url))
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
def sqlite_amqtt(work: Path) -> Iterator[Backend]:
    from farebox.broker import BrokerStartError, EmbeddedBroker

    broker = EmbeddedBroker(work / "broker")
    try:
        url = broker.start()
    except BrokerStartError as e:
        raise Unavailable(f"embedded amqtt broker: {e}") from None
    try:
        path = work / "backoffice.db"
        yield Backend("SQLite + amqtt (embedded)", "sqlite", f"sqlite:///{path}", url, sqlite_path=path)
    finally:
        broker.stop()


# ---------------------------------------------------------------------- the taps


@dataclass
class Fleet:
    operator: str
    devices: list[tuple[str, str]]  # (device_id, terminal_id hex)
    rounds: list[list[tuple[int, str, bytes, int]]] = field(default_factory=list)  # (device idx, topic, payload, n)


def make_fleet(uid: str, validators: int) -> Fleet:
    operator = f"bench_{uid}"
    devices = [(f"bv{uid}_{i:03d}", (0x020000000000 + i + 1).to_bytes(6, "big").hex()) for i in range(validators)]
    return Fleet(operator, devices)


def make_payloads(fleet: Fleet, total: int, batch_size: int, *, seq_base: int, cards: int = 1000,
                  dtks: dict | None = None) -> list[tuple[int, str, bytes, int]]:
    """``total`` valid purchases spread over the fleet, encoded as batches, interleaved device by device (the order
    they are published in). ``seq_base`` keeps device sequences of later rounds apart from earlier ones."""
    dtks = {} if dtks is None else dtks
    n = len(fleet.devices)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    per_device: list[list[tuple[bytes, int]]] = []
    ttc: dict[bytes, int] = {}
    for d, (device_id, terminal_hex) in enumerate(fleet.devices):
        terminal = bytes.fromhex(terminal_hex)
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
        per_device.append([(codec.encode_batch(records[i:i + batch_size]), len(records[i:i + batch_size]))
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

    def publish(self, payloads, stored: Callable[[], int], window_records: int, stop: threading.Event) -> float:
        """Publish everything in order, never more than ``window_records`` beyond ``stored()``; seconds it took."""
        t0 = time.perf_counter()
        sent = 0
        infos = []
        for d, topic, payload, n in payloads:
            while sent - stored() > window_records and not stop.is_set():
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


class RawSubscriber:
    """The baseline: a bare paho subscriber that bulk-inserts whatever arrives, without a single check."""

    def __init__(self, target: MqttTarget, client_id: str, topic: str, store: Callable[[bytes], None]):
        self.target = target
        self.topic = topic
        self.store = store
        self.errors = 0
        self.client = _client(target, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, message):
        try:
            self.store(message.payload)
        except Exception:  # noqa: BLE001 - counted and reported; the run then ends incomplete
            self.errors += 1

    def start(self) -> None:
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()

    def wait_subscribed(self, timeout: float = 20) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _raw_rows(payload: bytes, stamp: Callable[[datetime], object]):
    doc = json.loads(payload)
    device, operator = doc["device"], doc["operator"]
    now = stamp(datetime.now(UTC))
    for it in doc["records"]:
        g = it.get
        yield (device, it["device_seq"], it["kind"], stamp(datetime.fromtimestamp(it["t"], UTC)), now,
               operator, g("route", ""), g("vehicle", ""), g("driver", ""), g("shift_no", 0), g("card_asn", ""),
               g("card_type", 0), g("card_ttc", 0), g("amount", 0), g("balance_after", 0), g("terminal_id", ""),
               g("terminal_seq", 0), g("tac", ""), g("reason", ""))


class RawStore:
    """The raw table and its writer (COPY on PostgreSQL, executemany on SQLite), plus a row counter."""

    def __init__(self, backend: Backend):
        self.backend = backend
        if backend.kind == "postgresql":
            import psycopg

            self.conn = psycopg.connect(backend.libpq_url)
            self.conn.execute(RAW_TABLE)
            self.conn.commit()
            copy_sql = f"COPY bench_raw ({', '.join(RAW_COLUMNS)}) FROM STDIN"

            def store(payload: bytes) -> None:
                with self.conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    for row in _raw_rows(payload, lambda dt: dt):
                        copy.write_row(row)
                self.conn.commit()
        else:
            self.conn = sqlite3.connect(backend.sqlite_path, isolation_level=None, check_same_thread=False,
                                        timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute(RAW_TABLE)
            insert = f"INSERT INTO bench_raw ({', '.join(RAW_COLUMNS)}) VALUES ({', '.join('?' * len(RAW_COLUMNS))})"

            def store(payload: bytes) -> None:
                rows = list(_raw_rows(payload, datetime.isoformat))
                self.conn.execute("BEGIN")
                self.conn.executemany(insert, rows)
                self.conn.execute("COMMIT")
        self.store = store

    def close(self) -> None:
        self.conn.close()


class Counter:
    """``SELECT count(*)`` of one operator's rows in one table, on a connection of its own."""

    def __init__(self, backend: Backend, table_name: str, operator: str):
        if backend.kind == "postgresql":
            import psycopg

            self.conn = psycopg.connect(backend.libpq_url, autocommit=True)
            sql = f"SELECT count(*) FROM {table_name} WHERE operator = %s"
        else:
            self.conn = sqlite3.connect(backend.sqlite_path, isolation_level=None, timeout=30)
            sql = f"SELECT count(*) FROM {table_name} WHERE operator = ?"
        self._sql, self._args = sql, (operator,)

    def __call__(self) -> int:
        return self.conn.execute(self._sql, self._args).fetchone()[0]

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


def _timed_phase(payloads, expected: int, count: Counter, publishers: Publishers, window: int,
                 timeout: float) -> dict:
    """From the first publish until ``count()`` reaches ``expected`` (or ``timeout``)."""
    start_rows = count()
    latest = [start_rows]
    stop = threading.Event()
    published: dict = {}

    def publish():
        try:
            published["seconds"] = publishers.publish(payloads, lambda: latest[0] - start_rows, window, stop)
        except Exception as e:  # noqa: BLE001 - reported in the result
            published["error"] = str(e)

    thread = threading.Thread(target=publish, name="bench-publish", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    deadline = t0 + timeout
    while True:
        latest[0] = n = count()
        now = time.perf_counter()
        if n - start_rows >= expected or now > deadline or "error" in published:
            break
        time.sleep(0.005)
    elapsed = now - t0
    stop.set()
    thread.join(timeout=10)
    rows = latest[0] - start_rows
    return {
        "rows": rows,
        "expected": expected,
        "complete": rows >= expected,
        "seconds": round(elapsed, 3),
        "publish_seconds": round(published.get("seconds", float("nan")), 3),
        "taps_per_s": round(rows / elapsed, 1) if elapsed > 0 else None,
        **({"error": published["error"]} if "error" in published else {}),
    }


def run_backend(backend: Backend, *, uid: str, validators: int, taps: int, batch: int, rounds: int,
                window: int, timeout: float, log: Callable[[str], None]) -> dict:
    from sqlalchemy import func, select

    from backoffice.db import make_engine, upgrade
    from backoffice.ingest_consumer import IngestConsumer
    from backoffice.models import Quarantine

    target = parse_mqtt_url(backend.mqtt_url)
    engine = make_engine(backend.database_url)
    upgrade(engine)
    fleet = make_fleet(uid, validators)
    register(engine, fleet)
    scoped = f"{topics.PREFIX}/{fleet.operator}/+/taps"
    raw = RawStore(backend)
    count_raw, count_taps = Counter(backend, "bench_raw", fleet.operator), Counter(backend, "tap", fleet.operator)
    dtks: dict = {}
    phases = {"raw": [], "farebox": []}
    consumer_counts = {}
    try:
        for r in range(rounds):
            t = time.perf_counter()
            payloads = make_payloads(fleet, taps, batch, seq_base=r * taps, dtks=dtks)
            log(f"  round {r + 1}: {len(payloads)} batches of up to {batch} records built in "
                f"{time.perf_counter() - t:.1f} s")
            order = ("raw", "farebox") if r % 2 == 0 else ("farebox", "raw")
            for phase in order:
                publishers = Publishers(target, uid, validators, f"{phase}{r}")
                if phase == "raw":
                    sub = RawSubscriber(target, f"bench_{uid}_raw{r}", scoped, raw.store)
                    sub.start()
                    if not sub.wait_subscribed():
                        raise RuntimeError("the raw subscriber did not get its subscription")
                    try:
                        publishers.connect()
                        result = _timed_phase(payloads, taps, count_raw, publishers, window * batch, timeout)
                    finally:
                        publishers.close()
                        sub.stop()
                    result["store_errors"] = sub.errors
                else:
                    client_id = f"bench_{uid}_ingest"
                    consumer = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, client_id=client_id,
                                              operator=fleet.operator)
                    consumer.start()
                    try:
                        if not consumer.wait_subscribed(20):
                            raise RuntimeError("the IngestConsumer did not get its subscription")
                        publishers.connect()
                        result = _timed_phase(payloads, taps, count_taps, publishers, window * batch, timeout)
                    finally:
                        publishers.close()
                        consumer.stop()
                        forget_session(target, client_id)
                    for k, v in consumer.counts.items():
                        consumer_counts[k] = consumer_counts.get(k, 0) + v
                phases[phase].append(result)
                flag = "" if result["complete"] else f" [INCOMPLETE: {result['rows']}/{result['expected']} rows]"
                log(f"  round {r + 1} {phase:>7}: {result['taps_per_s']:>9,.0f} taps/s "
                    f"({result['rows']} rows in {result['seconds']:.2f} s){flag}")
        with engine.connect() as conn:
            devices = [d for d, _ in fleet.devices]
            quarantined = conn.execute(select(func.count()).select_from(Quarantine)
                                       .where(Quarantine.device_id.in_(devices))).scalar_one()
    finally:
        count_raw.close()
        count_taps.close()
        raw.close()
        engine.dispose()

    def med(name):
        rates = [p["taps_per_s"] for p in phases[name] if p["complete"]]
        return round(statistics.median(rates), 1) if rates else None

    raw_rate, fb_rate = med("raw"), med("farebox")
    # Each round's two phases ran back to back, so the per-round ratio is the figure least moved by the machine.
    round_ratios = [ratio(f["taps_per_s"], r["taps_per_s"]) for f, r in zip(phases["farebox"], phases["raw"])
                    if f["complete"] and r["complete"]]
    return {
        "backend": backend.label,
        "database": backend.kind,
        "broker": target.url(with_password=False),
        "operator": fleet.operator,
        "raw_taps_per_s": raw_rate,
        "farebox_taps_per_s": fb_rate,
        "ratio_farebox_to_raw": round(statistics.median(round_ratios), 3) if round_ratios else None,
        "ratio_per_round": round_ratios,
        "phases": phases,
        "consumer_counts": consumer_counts,
        "quarantined_own_devices": quarantined,
    }


# ---------------------------------------------------------------------- entry point


def run(*, taps: int = 20_000, validators: int = 20, batch: int = 50, rounds: int = 1, backends=("postgres",
        "sqlite"), window: int = 500, timeout: float = 120.0, console=None, results_dir=None) -> dict:
    if not 1 <= batch <= codec.MAX_RECORDS:
        raise ValueError(f"--batch must be 1 to {codec.MAX_RECORDS}")
    if taps < validators:
        raise ValueError("--taps must be at least the number of validators")
    started = time.monotonic()
    uid = secrets.token_hex(5)
    log = console.print if console is not None else (lambda s: None)
    pg_url = os.environ.get("FAREBOX_BENCH_PG_URL", DEFAULT_PG_URL)
    mqtt_url = os.environ.get("FAREBOX_BENCH_MQTT_URL", DEFAULT_MQTT_URL)
    results, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="farebox_bench_ingest_") as tmp:
        for name in backends:
            setup = (postgres_mosquitto(pg_url, mqtt_url) if name == "postgres"
                     else sqlite_amqtt(Path(tmp) / name))
            label = "PostgreSQL + Mosquitto" if name == "postgres" else "SQLite + amqtt (embedded)"
            log(f"[bold]ingest[/] on {label}: {taps} taps from {validators} validators, run id {uid}")
            try:
                with setup as backend:
                    results.append(run_backend(backend, uid=uid, validators=validators, taps=taps, batch=batch,
                                               rounds=rounds, window=window, timeout=timeout, log=log))
            except Unavailable as e:
                skipped[label] = str(e)
                log(f"[yellow]  skipped: {e}")
    doc = {
        "params": {"taps": taps, "validators": validators, "batch": batch, "rounds": rounds, "window": window},
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
        rows.append([r["backend"], fmt(r["farebox_taps_per_s"]), fmt(r["raw_taps_per_s"]),
                     f"[bold]{fmt_ratio(r['ratio_farebox_to_raw'])}", str(r["quarantined_own_devices"])])
    for label in doc["skipped"]:
        rows.append([label, "skipped", "-", "-", "-"])
    p = doc["params"]
    rounds = f"medians of {p['rounds']} rounds" if p["rounds"] > 1 else "1 round"
    console.print(table(
        f"ingest: taps/s, MQTT -> database ({p['taps']} taps per round, {p['validators']} validators, "
        f"batches of {p['batch']}, {rounds})",
        ["back end", "farebox taps/s", "raw taps/s", "farebox / raw", "quarantined"], rows,
        caption="farebox: IngestConsumer (decode, device and TAC checks, insert skipping duplicates, commit and "
                "ack per batch). raw: bare paho subscriber, json.loads + COPY (PostgreSQL) / executemany (SQLite) "
                f"into a plain table. Timed from the first publish to the last row counted; the ratio is the median "
                f"of the rounds' own ratios. {doc['seconds']} s. "
                f"{path}"))

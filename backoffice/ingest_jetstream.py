"""Ingest from a NATS cluster: tap batches from a durable JetStream work-queue consumer, stored, committed, then
acknowledged to JetStream and to the device.

The buses keep speaking MQTT 3.1.1 to the nats-server MQTT listener on any node (``farebox broker config --engine
nats``). A topic ``farebox/v1/<op>/<dev>/taps`` is the NATS subject ``farebox.v1.<op>.<dev>.taps``; the stream
``FAREBOX_TAPS`` (work-queue retention, file storage, ``replicas`` copies, made here if it is missing) captures
those subjects, and every worker pulls from the one durable consumer ``ingest``: JetStream hands each batch to one
worker, and redelivers it after ``ack_wait`` if that worker dies before acknowledging. Scaling out = starting more
workers (on any machine) with the same durable name.

Per fetch (up to ``max_messages``), what :class:`backoffice.ingest_consumer.IngestConsumer` does for MQTT: decode,
verify (device MAC, TAC per purchase), store in one transaction (:meth:`backoffice.ingest.Ingest.messages`),
commit; only then acknowledge each message to JetStream (``+ACK``), and publish the device's MAC'd ack. A crash
anywhere before the JetStream ack makes JetStream deliver the batch again; a crash after it but before the device's
ack makes the bus send the batch again (its journal keeps every record until acknowledged): either way the records
come back as duplicates, which the database's unique keys turn away, and the device is acknowledged then.

The device's ack (``ack_via``):
- ``"core"`` (default): a core NATS publish on ``farebox.v1.<op>.<dev>.ack``. nats-server 2.9.10 delivers it to
  the bus's MQTT subscription as QoS 0, and only to a bus connected at that moment; a bus that misses it (its node
  died, it was reconnecting) sends the batch again after its ack timeout, and that duplicate is turned away and
  acknowledged. Measured: 4 buses, 3 nodes, drained in 3 s.
- ``"jetstream"``: a JetStream publish to ``$MQTT.msgs.farebox.v1.<op>.<dev>.ack``, the stream in which
  nats-server keeps MQTT QoS 1 messages, meant to reach a persistent session even while it is away. NOT the
  default: on nats-server 2.9.10, in the same run as above, 2 of 4 buses never received one in 60 s (30 resends
  each; their taps were stored), although a manual check saw one delivered to an offline session's consumer. A
  JetStream message without nats-server's own MQTT headers is evidently not handled like an MQTT publish.

Why the guarantee still holds when a node dies between a bus's PUBACK and the capture into ``FAREBOX_TAPS``:
nats-server PUBACKs an MQTT QoS 1 publish once it is in its own ``$MQTT_msgs`` stream; the copy into the work queue
follows. A batch lost there is never acknowledged to the bus, which sends it again: a delay, not a loss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

from backoffice import ingest_commit
from backoffice.ingest import DeviceDirectory, Ingest, IngestResult
from backoffice.keyservice import KeyService
from epurse.keys import IssuerKeys
from wire import topics

log = logging.getLogger(__name__)

STREAM = "FAREBOX_TAPS"
DURABLE = "ingest"
SUBJECTS = f"{topics.PREFIX.replace('/', '.')}.*.*.taps"
MQTT_MSGS_PREFIX = "$MQTT.msgs."
JETSTREAM_WAIT = 120.0  # seconds a starting worker waits for JetStream to answer  # nats-server's stream of MQTT QoS 1 messages


def nats_urls(value: str | list[str], *, user: str | None = None, password: str | None = None) -> list[str]:
    """``nats://host:port`` URLs from a comma-separated string or a list; a URL without a login gets ``user`` and
    ``password`` (the back office's ``ingest`` login, derived from the device master like the Mosquitto one)."""
    from urllib.parse import quote, urlsplit

    items = [value] if isinstance(value, str) else list(value)
    urls = [u.strip() for item in items for u in item.split(",") if u.strip()]
    if not urls:
        raise ValueError("no NATS URL given: write nats://host:4222, or several separated by commas")
    out = []
    for url in urls:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if parts.scheme not in ("nats", "tls"):
            raise ValueError(f"NATS URL {url!r}: the scheme must be nats:// or tls://")
        if parts.username is None and user is not None:
            auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
            url = f"{parts.scheme}://{auth}@{parts.netloc}"
        else:
            url = f"{parts.scheme}://{parts.netloc}"
        out.append(url)
    return out


def _split_login(urls: list[str]) -> tuple[list[str], dict]:
    """The URLs without their login, and the first login found as nats.connect's user/password options."""
    from urllib.parse import unquote, urlsplit

    plain, login = [], {}
    for url in urls:
        parts = urlsplit(url)
        if parts.username is not None and not login:
            login = {"user": unquote(parts.username), "password": unquote(parts.password or "")}
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        plain.append(f"{parts.scheme}://{host}:{parts.port or 4222}")
    return plain, login


def _where(url) -> str | None:
    """host:port of a connected URL (never its login: these go to the log)."""
    return f"{url.hostname}:{url.port}" if url is not None else None


def topic_of(subject: str) -> str:
    return subject.replace(".", "/")


@dataclass
class JetStreamIngest:
    """One ingest worker on a NATS cluster (see the module's text)."""

    engine: Engine
    servers: list[str]
    keys: KeyService | IssuerKeys
    master: bytes
    durable: str = DURABLE
    stream: str = STREAM
    replicas: int = 3
    operator: str | None = None
    accept_unsigned: bool = False
    write: str = "copy"
    max_messages: int = 100
    linger: float = 0.02  # seconds to wait for more messages after the first of a group
    ack_wait: float = 30.0
    ack_via: str = "core"
    name: str = "ingest"
    randomize: bool = True  # False: try ``servers`` in the given order (the first is this worker's home node)
    on_ready: Callable[[], None] | None = None
    counts: dict = field(default_factory=ingest_commit.new_counts)

    def __post_init__(self):
        if self.ack_via not in ("jetstream", "core"):
            raise ValueError("ack_via is 'jetstream' or 'core'")
        self.ingest = Ingest(keys=self.keys, master=self.master, devices=DeviceDirectory(),
                             accept_unsigned=self.accept_unsigned,
                             write=self.write if self.engine.dialect.name == "postgresql" else "insert")
        self.nc = None
        self.js = None
        self._sub = None
        self.connected_url: str | None = None

    # -- connection

    async def connect(self) -> None:
        import nats
        from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError, ServiceUnavailableError

        async def disconnected():
            log.warning("%s: NATS connection lost; reconnecting to another node", self.name)

        async def reconnected():
            self.connected_url = _where(self.nc.connected_url)
            log.warning("%s: NATS reconnected to %s", self.name, self.connected_url)

        async def error(e):
            log.info("%s: NATS: %s", self.name, e)

        # The login goes as connect options, not only in the URLs: nats-py also reconnects to the nodes the cluster
        # tells it about, whose URLs carry no login (seen: 'Authorization Violation' on the way to another node).
        servers, login = _split_login(self.servers)
        self.nc = await nats.connect(servers=servers, name=self.name, max_reconnect_attempts=-1, **login,
                                     reconnect_time_wait=0.5, connect_timeout=2, allow_reconnect=True,
                                     disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
                                     dont_randomize=not self.randomize)
        self.connected_url = _where(self.nc.connected_url)
        log.info("%s: connected to NATS at %s", self.name, self.connected_url)
        self.js = self.nc.jetstream(timeout=10)
        subject = SUBJECTS if self.operator is None else SUBJECTS.replace(".*.*.", f".{self.operator}.*.", 1)
        # A cluster that has just started (or lost its meta leader) answers JetStream API requests with a timeout
        # or "unavailable" until it has elected one (seen: a worker started with the nodes died on its first
        # stream_info): ask again, for up to JETSTREAM_WAIT seconds.
        deadline = time.monotonic() + JETSTREAM_WAIT
        while True:
            try:
                try:
                    await self.js.stream_info(self.stream)
                except NotFoundError:
                    await self.js.add_stream(StreamConfig(
                        name=self.stream, subjects=[SUBJECTS], retention=RetentionPolicy.WORK_QUEUE,
                        storage=StorageType.FILE, num_replicas=self.replicas, max_msg_size=8 * 1024 * 1024))
                    log.info("%s: stream %s created (%d replicas)", self.name, self.stream, self.replicas)
                self._sub = await self.js.pull_subscribe(
                    subject, durable=self.durable, stream=self.stream,
                    config=ConsumerConfig(ack_wait=self.ack_wait, max_deliver=-1, max_ack_pending=20_000,
                                          filter_subject=subject))
                return
            except (TimeoutError, asyncio.TimeoutError, nats.errors.TimeoutError, ServiceUnavailableError) as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: JetStream not answering yet (%s); asking again", self.name, type(e).__name__)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        """Close the connection. Not drain(): nats-py's drain of a pull subscription waited past 15 s here (the
        worker was SIGKILLed by its supervisor before it could log its counts), and there is nothing to drain:
        every message handed to this worker is stored and acknowledged, or JetStream redelivers it."""
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except Exception:  # noqa: BLE001 - closing a connection to a dead cluster
                pass

    # -- the loop

    async def run(self, stop: asyncio.Event) -> None:
        await self.connect()
        if self.on_ready is not None:
            self.on_ready()
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                msgs = await self._gather()
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except Exception as e:  # noqa: BLE001 - a node gone, a leader election: fetch again
                log.info("%s: fetch failed (%s); again", self.name, e)
                await asyncio.sleep(0.2)
                continue
            if not msgs:
                continue
            messages = [(topic_of(m.subject), m.data) for m in msgs]
            results = await loop.run_in_executor(None, self.store, messages)
            await self._acknowledge(msgs, results)
            if all(r is None for r in results):  # the database is away: wait before the next fetch, not spin
                await asyncio.sleep(1.0)

    async def _gather(self) -> list:
        """Wait (up to 1 s) for one message, then take whatever else comes within ``linger`` (up to
        ``max_messages``), like IngestConsumer. Not one fetch(max_messages, timeout=1): nats-server 2.9 keeps such a
        pull open until the batch is full or it expires, so at a few hundred taps/s every message waited up to the
        whole second (bench cluster at 500 validators: p95 about 1 s)."""
        msgs = await self._sub.fetch(1, timeout=1.0)
        if self.max_messages > 1:
            try:
                msgs += await self._sub.fetch(self.max_messages - 1, timeout=self.linger)
            except (TimeoutError, asyncio.TimeoutError):
                pass
        return msgs

    def store(self, messages: list[tuple[str, bytes]]) -> list[IngestResult | None]:
        """Commit the messages together; if that fails, each in a transaction of its own
        (backoffice.ingest_commit.store, as IngestConsumer). None for a message that could not be stored."""
        return ingest_commit.store(self.engine, self.ingest, self.counts, messages, name=self.name,
                                   again="JetStream delivers it again")

    async def _acknowledge(self, msgs, results) -> None:
        """After the commit: the JetStream ack of every stored message, then the devices' acks."""
        device_acks = []
        for msg, result in zip(msgs, results, strict=True):
            if result is None:
                try:
                    await msg.nak(delay=1.0)
                except Exception:  # noqa: BLE001 - redelivered after ack_wait anyway
                    pass
                continue
            try:
                await msg.ack()
            except Exception:  # noqa: BLE001 - redelivered: a duplicate, turned away and acknowledged then
                log.info("%s: JetStream ack failed; the batch comes again as a duplicate", self.name)
            ingest_commit.count(self.counts, result)
            if result.ack_seqs:
                subject = topics.ack(result.operator, result.device_id).replace("/", ".")
                device_acks.append((subject, self.ingest.encode_ack(result)))
        if not device_acks:
            return
        if self.ack_via == "core":
            for subject, payload in device_acks:
                await self.nc.publish(subject, payload)
            return
        outcomes = await asyncio.gather(*(self.js.publish(MQTT_MSGS_PREFIX + s, p) for s, p in device_acks),
                                        return_exceptions=True)
        for (subject, payload), outcome in zip(device_acks, outcomes, strict=True):
            if isinstance(outcome, Exception):  # the MQTT stream unavailable for a moment: at least say it now
                log.info("%s: ack to %s not stored (%s); sent as QoS 0", self.name, subject, outcome)
                try:
                    await self.nc.publish(subject, payload)
                except Exception:  # noqa: BLE001 - the bus sends the batch again
                    pass


def run_forever(worker: JetStreamIngest) -> None:
    """Run one worker until SIGTERM / SIGINT."""
    import signal

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await worker.run(stop)
        finally:
            await worker.close()

    started = time.monotonic()
    asyncio.run(main())
    log.info("%s: stopped after %.0f s: %s", worker.name, time.monotonic() - started, worker.counts)


@dataclass(frozen=True)
class JetStreamWorkerSpec:
    """What a worker process needs (picklable): keys is an opener, as in ingest_consumer.WorkerSpec."""

    database_url: str
    servers: tuple[str, ...]
    keys: Callable[[], KeyService]
    master: bytes
    name: str
    operator: str | None = None
    accept_unsigned: bool = False
    durable: str = DURABLE
    ready_file: str | None = None
    log_level: int = logging.INFO

    @property
    def client_id(self) -> str:  # what IngestPool names a worker by
        return self.name


def run_worker(spec: JetStreamWorkerSpec) -> None:
    from pathlib import Path

    from backoffice.db import make_engine

    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = JetStreamIngest(make_engine(spec.database_url), list(spec.servers), keys=spec.keys(),
                             master=spec.master, name=spec.name, operator=spec.operator,
                             accept_unsigned=spec.accept_unsigned, durable=spec.durable)
    if spec.ready_file:
        worker.on_ready = lambda: Path(spec.ready_file).touch()
    run_forever(worker)


def run_pool(specs: list[JetStreamWorkerSpec], *, ready_file: str | None = None) -> None:
    """N worker processes on the one durable consumer; one that dies is started again (IngestPool's supervision)."""
    from backoffice.ingest_consumer import IngestPool

    class Pool(IngestPool):
        def _start(self, i: int) -> None:
            proc = self._ctx.Process(target=run_worker, args=(self.specs[i],), name=f"ingest-{i}", daemon=True)
            proc.start()
            self.procs[i] = proc

    Pool(specs, ready_file=ready_file).run_forever()

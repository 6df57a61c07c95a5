"""The ingest process: subscribe to every validator's tap batches, store them, commit, then acknowledge.

One :class:`IngestConsumer` is one worker: a paho client (the network thread puts each message on a bounded queue)
and one database thread that takes whatever arrived in the last few milliseconds (up to ``max_messages``), stores it
in one transaction (:meth:`backoffice.ingest.Ingest.messages`), commits, and only then publishes each batch's
acknowledgement, MAC'd with its device's key. A crash anywhere before an acknowledgement leaves makes the validator
send the batch again (its journal is the outbox), and the records come back as duplicates.

Several workers share the load through an MQTT shared subscription (``$share/<group>/farebox/v1/+/+/taps``,
Mosquitto and the cluster brokers; amqtt has none, so the embedded default runs one worker): the broker hands each
batch to one member. :class:`IngestPool` runs N workers as child processes of one command (``farebox ingest
--workers N``) and restarts one that dies; more machines join the same group with their own client ids.

A persistent session (clean_session=False, a fixed client id per worker) makes the broker keep batches that arrive
while a worker is down. Whatever happens to one message (a database error, a poison payload) is logged and the
process goes on: the validator has not been acknowledged, so it sends the batch again.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from backoffice import ingest_commit
from backoffice.ingest import DeviceDirectory, Ingest, IngestResult
from backoffice.keyservice import KeyService
from backoffice.mqtt_service import MqttService
from backoffice.signals import stop_requested
from epurse.keys import IssuerKeys
from wire import topics
from wire.mqtt_url import MqttTarget, new_client

log = logging.getLogger(__name__)


class IngestConsumer(MqttService):
    """One ingest worker. ``keys`` is the issuer key service that checks purchase TACs (raw ``IssuerKeys`` are
    wrapped, for tests); ``master`` is the device master secret (``farebox.keys.device_master``) every device's
    MAC key derives from; ``share_group`` subscribes through ``$share/<group>/...`` so several workers split the
    batches; ``accept_unsigned`` takes v1 JSON batches from validators not yet upgraded (the migration window)."""

    def __init__(self, engine: Engine, target: MqttTarget, *, keys: KeyService | IssuerKeys, master: bytes,
                 client_id: str = "farebox_ingest", operator: str | None = None, share_group: str | None = None,
                 accept_unsigned: bool = False, write: str = "copy", max_messages: int = 100,
                 linger: float = 0.005):
        taps = topics.operator_taps(operator)  # one operator's buses, or every operator's
        super().__init__(target, client_id, name="ingest",
                         subscription=topics.shared(share_group, taps) if share_group else taps,
                         # only the ingest subscribes through $share/..., which amqtt refuses
                         refusal_hint="; a shared subscription needs Mosquitto or a cluster broker, amqtt has none")
        self.engine = engine
        self.ingest = Ingest(keys=keys, master=master, devices=DeviceDirectory(), accept_unsigned=accept_unsigned,
                             write=write if engine.dialect.name == "postgresql" else "insert")
        self.max_messages = max_messages
        self.linger = linger
        self.counts = ingest_commit.new_counts()
        # Bounded: when the database falls behind, the network thread blocks here and the broker keeps the rest
        # (queued for this persistent session) instead of this process holding them in memory.
        self._inbox: queue.Queue = queue.Queue(maxsize=4 * max_messages)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # -- MQTT (paho's network thread)

    def _on_message(self, client, userdata, message):
        while not self._stop.is_set():
            try:
                self._inbox.put((message.topic, message.payload), timeout=0.5)
                return
            except queue.Full:
                continue

    # -- the database thread

    def _gather(self) -> list[tuple[str, bytes]]:
        try:
            first = self._inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        messages = [first]
        deadline = time.monotonic() + self.linger
        while len(messages) < self.max_messages:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.001))
        return messages

    def _run(self) -> None:
        while not self._stop.is_set():
            messages = self._gather()
            if messages:
                self.store(messages)

    def store(self, messages: list[tuple[str, bytes]]) -> list[IngestResult | None]:
        """Commit the messages together, then acknowledge each; if the transaction fails (a deadlock, a database
        gone for a moment), each message gets a transaction of its own, so one cannot hold back the others
        (backoffice.ingest_commit.store)."""
        results = ingest_commit.store(self.engine, self.ingest, self.counts, messages, name="ingest",
                                      again="the device will send it again")
        for result in results:
            if result is not None:
                self._acknowledge(result)
        return results

    def _acknowledge(self, result: IngestResult) -> None:
        ingest_commit.count(self.counts, result)
        if result.ack_seqs:
            self.client.publish(topics.ack(result.operator, result.device_id), self.ingest.encode_ack(result),
                                qos=1)

    # -- life cycle

    def start(self) -> None:
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, name="ingest-db", daemon=True)
        self._worker.start()
        super().start()

    def stop(self) -> None:
        """Disconnect first (no new messages), then let the database thread finish what it holds."""
        super().stop()
        deadline = time.monotonic() + 10
        while not self._inbox.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=10)


def end_session(target: MqttTarget, client_id: str, timeout: float = 10.0) -> None:
    """Drop the broker's persistent session of ``client_id`` (what it queued and its subscriptions), for an
    ingest that is retired for good; otherwise the broker keeps queueing every batch for it."""
    client = new_client(target, client_id, persistent=False)
    client.connect(target.host, target.port, keepalive=10)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()


# ---------------------------------------------------------------------- several workers


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (picklable: it crosses into a spawned process).

    ``keys`` is how the worker opens the issuer key service itself, never the keys: a picklable callable such as
    ``functools.partial(farebox.keys.key_service, settings)`` (the key file's path; its passphrase or KEK comes from
    the worker's own environment) or ``farebox.keys.published_test_keys`` (demo, tests, benches)."""

    database_url: str
    target: MqttTarget
    keys: Callable[[], KeyService]
    master: bytes
    client_id: str
    operator: str | None = None
    share_group: str | None = None
    accept_unsigned: bool = False
    write: str = "copy"
    ready_file: str | None = None
    log_level: int = logging.INFO

    def __post_init__(self):
        if isinstance(self.keys, IssuerKeys) or not callable(self.keys):
            raise TypeError("WorkerSpec.keys opens the key service in the worker (e.g. functools.partial("
                            "farebox.keys.key_service, settings)): raw issuer keys never cross a process boundary")


def worker_client_ids(client_id: str, workers: int) -> list[str]:
    """One persistent session per worker: the same ids after a restart, so a worker finds what was queued for it."""
    return [client_id] if workers == 1 else [f"{client_id}_{i}" for i in range(workers)]


def run_worker(spec: WorkerSpec) -> None:
    """A worker process's body: one IngestConsumer until SIGTERM."""
    from pathlib import Path

    from backoffice.db import make_engine

    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    consumer = IngestConsumer(make_engine(spec.database_url), spec.target, keys=spec.keys(), master=spec.master,
                              client_id=spec.client_id, operator=spec.operator, share_group=spec.share_group,
                              accept_unsigned=spec.accept_unsigned, write=spec.write)
    if spec.ready_file:
        consumer.on_ready = lambda: Path(spec.ready_file).touch()
    consumer.run_forever()


class IngestPool:
    """N workers as child processes on one shared subscription; a worker that dies is started again (same client
    id, so it picks up its persistent session) after a second."""

    def __init__(self, specs: list[WorkerSpec], *, ready_file: str | None = None):
        """``ready_file`` is touched once every worker is subscribed (each worker touches ``<ready_file>.<i>``)."""
        import dataclasses

        self.ready_file = ready_file
        if ready_file:
            specs = [dataclasses.replace(s, ready_file=f"{ready_file}.{i}") for i, s in enumerate(specs)]
        self.specs = specs
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and sockets
        self.procs: list = [None] * len(specs)
        self.restarts = 0

    def start(self) -> None:
        for i in range(len(self.specs)):
            self._start(i)

    def _start(self, i: int) -> None:
        proc = self._ctx.Process(target=run_worker, args=(self.specs[i],), name=f"ingest-{i}", daemon=True)
        proc.start()
        self.procs[i] = proc

    def supervise(self, done: threading.Event) -> None:
        from pathlib import Path

        ready = not self.ready_file
        while not done.wait(0.2 if not ready else 1.0):
            if not ready and all(Path(s.ready_file).exists() for s in self.specs):
                Path(self.ready_file).touch()
                ready = True
            for i, proc in enumerate(self.procs):
                if proc is not None and not proc.is_alive():
                    log.warning("ingest worker %s ended (exit code %s); starting it again", self.specs[i].client_id,
                                proc.exitcode)
                    self.restarts += 1
                    self._start(i)

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.procs:
            if proc is not None and proc.is_alive():
                proc.terminate()  # SIGTERM: the worker finishes what it holds, then leaves
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout)
                if proc.is_alive():
                    proc.kill()
                    proc.join()

    def run_forever(self) -> None:
        done = stop_requested()
        self.start()
        self.supervise(done)
        self.stop()

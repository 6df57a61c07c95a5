"""The ingest process: subscribe to every validator's tap batches, store each batch, commit, then acknowledge.

A persistent session (clean_session=False, a fixed client id) makes the broker keep batches that arrive while
ingest is down. Whatever happens to one message (a database error, a poison payload) is logged and the process
goes on: the validator has not been acknowledged, so it sends the batch again.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from sqlalchemy import Engine

from backoffice.ingest import DeviceDirectory, ingest_batch
from epurse.keys import IssuerKeys
from wire import codec, topics
from wire.mqtt_url import MqttTarget, new_client

log = logging.getLogger(__name__)


class IngestConsumer:
    def __init__(self, engine: Engine, target: MqttTarget, *, keys: IssuerKeys, client_id: str = "farebox_ingest",
                 operator: str | None = None):
        self.engine = engine
        self.subscription = topics.operator_taps(operator)  # one operator's buses, or every operator's
        self.target = target
        self.keys = keys
        self.devices = DeviceDirectory()
        self.counts = {"batches": 0, "stored": 0, "duplicates": 0, "quarantined": 0, "errors": 0}
        self._subscribed = threading.Event()
        client = new_client(target, client_id, max_inflight=100)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.on_ready = lambda: None  # called once subscribed (the demo waits for it)
        self.client = client

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("ingest: broker refused the connection: %s", reason_code)
            return
        client.subscribe(self.subscription, qos=1)
        log.info("ingest: connected to %s, subscribed to %s", self.target.url(with_password=False),
                 self.subscription)

    def _on_subscribe(self, *args):
        self._subscribed.set()
        self.on_ready()

    def _on_message(self, client, userdata, message):
        try:
            with self.engine.begin() as conn:  # commits on leaving the block
                result = ingest_batch(conn, message.topic, message.payload, keys=self.keys, devices=self.devices)
        except Exception:
            self.counts["errors"] += 1
            log.exception("ingest: batch on %s not stored; the device will send it again", message.topic)
            return
        self.counts["batches"] += 1
        self.counts["stored"] += result.stored
        self.counts["duplicates"] += result.duplicates
        self.counts["quarantined"] += result.quarantined
        if result.ack_seqs:
            client.publish(topics.ack(result.operator, result.device_id),
                           codec.encode_ack(result.device_id, result.ack_seqs), qos=1)

    def start(self) -> None:
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def run_forever(self) -> None:
        """Until SIGTERM or SIGINT."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        self.stop()
        log.info("ingest: stopped after %s", self.counts)


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

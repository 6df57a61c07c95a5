"""Store-and-forward from the journal to the back office over MQTT (paho-mqtt, QoS 1, persistent session).

The journal is the outbox: paho keeps nothing on disk, so a batch is built from the journal, published, and
nothing is forgotten until the back office's acknowledgement names its sequences (it sends one only after its
database commit). One batch is in flight at a time, oldest records first; an unacknowledged batch is sent again
after a timeout that doubles up to a ceiling, so a bus back from a dead zone catches up without flooding the link.
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt

from validator.journal import Journal
from wire import codec, topics
from wire.mqtt_url import MqttTarget, new_client

log = logging.getLogger(__name__)


class Uplink:
    def __init__(self, journal: Journal, target: MqttTarget, *, device_id: str, operator: str,
                 batch_size: int = 50, ack_timeout: float = 5.0, max_backoff: float = 60.0):
        self.journal = journal
        self.target = target
        self.device_id = device_id
        self.batch_size = batch_size
        self.ack_timeout = ack_timeout
        self.max_backoff = max_backoff
        self._taps_topic = topics.taps(operator, device_id)
        self._ack_topic = topics.ack(operator, device_id)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._inflight: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._offline = False
        self.batches_sent = 0
        self.resends = 0

        client = new_client(target, f"dev_{device_id}", max_inflight=4)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name=f"uplink-{self.device_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()

    def go_offline(self) -> None:
        """The bus drives into a dead zone: the link drops and stays down until :meth:`go_online`."""
        self._offline = True
        self.client.disconnect()
        self.client.loop_stop()  # a user disconnect ends paho's network thread; go_online starts a new one

    def go_online(self) -> None:
        self._offline = False
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()

    def notify(self) -> None:
        """A new record is in the journal: send without waiting for the next poll."""
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the back office has acknowledged everything in the journal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.journal.backlog() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return self.journal.backlog() == 0

    # -- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("device %s: broker refused the connection: %s (check the device's MQTT user and password)",
                      self.device_id, reason_code)
            return
        client.subscribe(self._ack_topic, qos=1)
        self._connected.set()
        with self._lock:
            self._inflight.clear()  # whatever was in flight is sent again; the back office drops duplicates
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        if not self._offline and not self._stop.is_set():
            log.warning("device %s: link to the broker lost (%s); records stay in the journal", self.device_id,
                        reason_code)

    def _on_message(self, client, userdata, message):
        try:
            ack = codec.decode_ack(message.payload)
        except codec.WireError as e:
            log.error("device %s: unreadable acknowledgement on %s: %s", self.device_id, message.topic, e)
            return
        if ack.device_id != self.device_id:
            log.error("device %s: acknowledgement for device %s ignored", self.device_id, ack.device_id)
            return
        self.journal.mark_acked(ack.seqs)
        with self._lock:
            self._inflight.difference_update(ack.seqs)
        self._wake.set()

    # -- sender thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.ack_timeout
        sent_at = 0.0
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if not self._connected.is_set():
                continue
            with self._lock:
                waiting = bool(self._inflight)
            if waiting and time.monotonic() - sent_at < backoff:
                continue
            if waiting:
                self.resends += 1
                backoff = min(backoff * 2, self.max_backoff)
            else:
                backoff = self.ack_timeout
            try:
                batch = self.journal.unsent(self.batch_size)
            except Exception:  # a journal error must not kill the sender; it is retried on the next wake
                log.exception("device %s: cannot read the journal", self.device_id)
                continue
            if not batch:
                continue
            with self._lock:
                self._inflight = {r.device_seq for r in batch}
            info = self.client.publish(self._taps_topic, codec.encode_batch(batch), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("device %s: publish failed (%s); will retry", self.device_id, mqtt.error_string(info.rc))
            sent_at = time.monotonic()
            self.batches_sent += 1

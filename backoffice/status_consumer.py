"""The status consumer: subscribe to every validator's status topic and keep device_status current.

A persistent session under a fixed client id keeps what arrives while it is down; status messages are retained, so
each (re)subscription also hands it every device's latest message again, which backoffice.devices.record_status
takes as a no-op. A bad message (unknown device, forged MAC, malformed, a clock in the future) is logged with its
reason, counted, and kept out of the table; a database error is logged and counted, and nothing stops the process.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Engine

from backoffice.devices import StatusRefused, record_status, status_subscription
from backoffice.signals import stop_requested
from wire.mqtt_url import MqttTarget, new_client

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class StatusConsumer:
    def __init__(self, engine: Engine, target: MqttTarget, *, master: bytes, client_id: str = "farebox_status",
                 operator: str | None = None, clock: Callable[[], datetime] = _utc_now):
        self.engine = engine
        self.target = target
        self.master = master
        self.clock = clock
        self.subscription = status_subscription(operator)
        # applied / superseded (an older copy) / refused (bad message) / errors (the database failed)
        self.counts = Counter({"applied": 0, "superseded": 0, "refused": 0, "errors": 0})
        self.refusals: list[tuple[str, str]] = []  # (topic, reason), the last 100, for operations and tests
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self.on_ready = lambda: None
        client = new_client(target, client_id, max_inflight=100)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("status: broker refused the connection: %s", reason_code)
            return
        client.subscribe(self.subscription, qos=1)
        log.info("status: connected to %s, subscribed to %s", self.target.url(with_password=False),
                 self.subscription)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            log.error("status: broker refused the subscription to %s: %s", self.subscription, reason_codes)
            return
        self._subscribed.set()
        self.on_ready()

    def _on_message(self, client, userdata, message):
        try:
            with self.engine.begin() as conn:
                outcome = record_status(conn, topic=message.topic, payload=message.payload, master=self.master,
                                        now=self.clock())
        except StatusRefused as e:
            self._count("refused")
            with self._lock:
                self.refusals = [*self.refusals[-99:], (message.topic, str(e))]
            log.warning("status: refused a message on %s: %s", message.topic, e)
            return
        except Exception:
            self._count("errors")
            log.exception("status: message on %s not stored", message.topic)
            return
        self._count("applied" if outcome.applied else "superseded")
        if not outcome.applied:
            log.info("status: %s %s changes nothing: %s", outcome.device_id, outcome.kind, outcome.why)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

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
        done = stop_requested()
        self.start()
        done.wait()
        self.stop()
        log.info("status: stopped after %s", dict(self.counts))

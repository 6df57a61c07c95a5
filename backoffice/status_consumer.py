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
from backoffice.mqtt_service import MqttService
from wire.mqtt_url import MqttTarget

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class StatusConsumer(MqttService):
    def __init__(self, engine: Engine, target: MqttTarget, *, master: bytes, client_id: str = "farebox_status",
                 operator: str | None = None, clock: Callable[[], datetime] = _utc_now):
        super().__init__(target, client_id, name="status", subscription=status_subscription(operator))
        self.engine = engine
        self.master = master
        self.clock = clock
        # applied / superseded (an older copy) / refused (bad message) / errors (the database failed)
        self.counts = Counter({"applied": 0, "superseded": 0, "refused": 0, "errors": 0})
        self.refusals: list[tuple[str, str]] = []  # (topic, reason), the last 100, for operations and tests
        self._lock = threading.Lock()

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

"""The status consumer: subscribe to every validator's status topic and keep device_status current.

A persistent session under a fixed client id keeps what arrives while it is down; status messages are retained, so
each (re)subscription also hands it every device's latest message again, which backoffice.devices.record_status
takes as a no-op. A bad message (unknown device, forged MAC, malformed, a clock in the future) is logged with its
reason, counted, and kept out of the table; a database error is logged and counted, and nothing stops the process.

The same transaction keeps the device's link history (backoffice.devices) and the alarms its status carries
(backoffice.alarms.sync_device); at most once a minute the back office's own alarms are refreshed too (quarantine
waiting, buses behind on the deny list). ``wait_for_goodbyes`` lets a caller that stopped validators cleanly wait
until their goodbyes are stored (the demo does, before it prints the fleet).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from backoffice import alarms
from backoffice.devices import StatusRefused, record_status, status_subscription
from wire import topics
from backoffice.mqtt_service import MqttService
from wire.mqtt_url import MqttTarget

log = logging.getLogger(__name__)
REFRESH_EVERY = timedelta(minutes=1)  # the back office's own alarms, re-checked at most this often


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
        self.goodbyes: set[str] = set()  # devices whose goodbye this consumer stored
        self._refreshed: datetime | None = None

    def wait_for_goodbyes(self, device_ids, timeout: float = 10.0) -> list[str]:
        """Wait until the goodbye of each device is stored; returns those still missing after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = [d for d in device_ids if d not in self.goodbyes]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.05)

    def _on_message(self, client, userdata, message):
        try:
            with self.engine.begin() as conn:
                now = self.clock()
                outcome = record_status(conn, topic=message.topic, payload=message.payload, master=self.master,
                                        now=now)
                if outcome.applied and outcome.status is not None and outcome.kind != "death":
                    alarms.sync_device(conn, operator=topics.parse(message.topic)[0], device_id=outcome.device_id,
                                       alarms=outcome.status.alarms, now=now)
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
        if self._refreshed is None or now - self._refreshed >= REFRESH_EVERY:
            self._refreshed = now
            try:  # its own transaction: a failure here never loses a status
                with self.engine.begin() as conn:
                    alarms.refresh(conn, now=now)
            except Exception:
                log.exception("status: the back office's alarms were not refreshed")
        if outcome.applied and outcome.kind == "goodbye":
            with self._lock:
                self.goodbyes.add(outcome.device_id)
        if not outcome.applied:
            log.info("status: %s %s changes nothing: %s", outcome.device_id, outcome.kind, outcome.why)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

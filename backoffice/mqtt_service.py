"""What every long-running back-office MQTT process (ingest, status consumer, publisher) does with its broker.

One paho client that reconnects by itself, subscribes again on every connection (a broker may have lost the
session), says in the log when the broker refuses it, and signals "subscribed" for whoever waits on the service
(``serve``, the demo, ``--ready-file``). A service subclasses :class:`MqttService`, handles ``_on_message`` and adds
its own work to ``start`` and ``stop``.
"""

from __future__ import annotations

import abc
import logging
import threading

from backoffice.signals import stop_requested
from wire.mqtt_url import MqttTarget, new_client


class MqttService(abc.ABC):
    """``name`` prefixes the service's log lines; ``subscription`` (QoS 1) is None for a client that only publishes;
    ``persistent`` keeps the broker session (and what is queued for it) under ``client_id`` while the process is
    down; ``refusal_hint`` ends the log line of a refused subscription."""

    counts: dict  # the service's tallies, logged when run_forever ends

    def __init__(self, target: MqttTarget, client_id: str, *, name: str, subscription: str | None,
                 persistent: bool = True, max_delay: float = 10, refusal_hint: str = ""):
        self.target = target
        self.subscription = subscription
        self._name = name
        self._log = logging.getLogger(type(self).__module__)  # the service's lines keep their logger name
        self._refusal_hint = refusal_hint
        self._subscribed = threading.Event()
        self.on_ready = lambda: None  # called once subscribed (serve, the demo and --ready-file wait for it)
        client = new_client(target, client_id, persistent=persistent, max_inflight=100)
        client.reconnect_delay_set(min_delay=1, max_delay=max_delay)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    # -- MQTT (paho's network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._log.error("%s: broker refused the connection: %s", self._name, reason_code)
            return
        if self.subscription is None:  # nothing to wait for: ready as soon as connected
            self._on_subscribe(client, userdata, None, [], properties)
            return
        client.subscribe(self.subscription, qos=1)
        self._log.info("%s: connected to %s, subscribed to %s", self._name, self.target.url(with_password=False),
                       self.subscription)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            self._log.error("%s: broker refused the subscription to %s: %s%s", self._name, self.subscription,
                            reason_codes, self._refusal_hint)
            return
        self._subscribed.set()
        self.on_ready()

    @abc.abstractmethod
    def _on_message(self, client, userdata, message):
        """One message on the subscription, in paho's network thread."""

    # -- life cycle

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
        self._log.info("%s: stopped after %s", self._name, dict(self.counts))

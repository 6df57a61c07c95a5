"""The validator's MQTT link (paho-mqtt, QoS 1, persistent session): taps up, status up, packages down.

Taps, store-and-forward: the journal is the outbox. paho keeps nothing on disk, so a batch is built from the
journal, encoded as ``wire.codec`` v2 and MAC'd with the device's key, published, and nothing is forgotten until the
back office's acknowledgement names its sequences (it sends one only after its database commit). An acknowledgement
is believed only if its MAC verifies with the same key: a forged one is logged and ignored, so nobody on the broker
can make a bus forget taps. One batch is in flight at a time, oldest records first; an unacknowledged batch is sent
again after a timeout that doubles up to a ceiling, so a bus back from a dead zone catches up without flooding the
link.

A batch that cannot be encoded never blocks those behind it (the journal writes every record within the wire's
limits, so this is a fault, not an expected event): the records that fail on their own are set aside in the journal
(:meth:`validator.journal.Journal.set_aside`) with a log line saying which and why, the status carries the alarm
"N records set aside" until the back office has them, and they go up first as a ``wire.codec`` set-aside message,
which the back office quarantines with its reason and acknowledges; then the other records go on as usual.

Every batch names the journal's epoch, and an acknowledgement is believed only for that epoch: a late ack meant for
a replaced journal's records names sequences that are other records now. An ack that says some records were
quarantined is logged (they are safe at the back office, with a reason, for operations to review).

Status (``wire.status``, retained, MAC'd with the device key): a birth right after every connect, a heartbeat every
``heartbeat_seconds`` and at once when something a back office acts on changes (a package applied or refused, a
deny-list delta from another base: the heartbeat carries the version the bus has, so the back office sends the right
delta or the full list), and a death set as the MQTT last will before every (re)connect, which the broker publishes
when the bus vanishes without a DISCONNECT. The death carries the ``at`` of the connection it belongs to.
A heartbeat also goes out when an acknowledgement empties the journal (so the back office does not keep showing the
backlog of the last periodic heartbeat), and :meth:`Uplink.stop` says ``goodbye`` (final backlog, its own time)
before its DISCONNECT: a clean stop publishes no will, and without a goodbye the bus would read "online" for ever.
Heartbeats are due every ``heartbeat_seconds`` of elapsed time or of the bus's own clock, whichever comes first
(the same on a bus; a simulated day that runs faster than the wall clock still gets its heartbeats).

Downlink: the device's own ``ack``, ``denylist``, ``params`` and ``software`` topics and the fleet's (one
``_fleet/+`` filter), all QoS 1.
Packages go to a :class:`validator.downlink.Downlink` (checked and staged on this thread, applied between taps by the
main loop); without one they are logged and dropped.

Failover: ``target`` may be a list of broker URLs' targets (the nodes of a cluster, e.g. NATS with its MQTT listener
on each node and the sessions kept in JetStream). The client connects to the first; when its connection drops or a
connect fails, the next (re)connect goes to the next node in the list, round and round. The session is persistent
(clean_session=False, the same client id), so on a cluster that keeps sessions the new node has the bus's
subscriptions and queued downlink; the batch in flight is sent again on the new connection (the back office drops
duplicates), and everything else is still in the journal until acknowledged.

The broker user and password come from the MQTT URL (``mqtt://<device>:<password>@host``; ``farebox device add``
prints both). Without ``mac_key`` the key is derived from the published TEST device master, with a warning: right
for the demo fleet, never for a real bus.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt

from validator.journal import Journal
from wire import codec, devicekeys, topics
from wire import status as wstatus
from wire.mqtt_url import MqttTarget, new_client

log = logging.getLogger(__name__)

JOURNAL_ALARM_FRACTION = 0.85  # the journal's disk budget this full raises an alarm
# A rider who pulls the card mid-purchase taps again within seconds, and the grey record settles. One still grey
# after this long belongs to a card that has left the bus: the fare may be off the card with no record at the back
# office until that card is seen on a validator again, so operations is told (and the issuer's daily file shows it).
GREY_ALARM_AFTER = timedelta(minutes=10)


class Uplink:
    def __init__(self, journal: Journal, target: MqttTarget | Sequence[MqttTarget], *, device_id: str, operator: str,
                 mac_key: bytes | None = None, terminal=None, downlink=None, software: str | None = None,
                 heartbeat_seconds: float = 60.0, batch_size: int = 50, ack_timeout: float = 5.0,
                 max_backoff: float = 60.0, clock: Callable[[], datetime] | None = None):
        self.journal = journal
        self.targets = [target] if isinstance(target, MqttTarget) else list(target)
        if not self.targets:
            raise ValueError("Uplink needs at least one broker")
        self._node = 0  # index in self.targets of the node connected to (or being tried)
        self.target = self.targets[0]
        self.failovers = 0
        self.device_id = device_id
        self.operator = operator
        if mac_key is None:
            log.warning("device %s: MAC key derived from the published TEST device master: demo fleets only",
                        device_id)
            mac_key = devicekeys.mac_key(devicekeys.TEST_DEVICE_MASTER, device_id)
        self.mac_key = mac_key
        self.terminal = terminal
        self.downlink = downlink
        if downlink is not None:
            downlink.on_change = self.send_status_now
        self.software = software or (downlink.software if downlink is not None else _running_software())
        self.heartbeat_seconds = heartbeat_seconds
        self.batch_size = batch_size
        self.ack_timeout = ack_timeout
        self.max_backoff = max_backoff
        # One bus, one clock: its statuses are dated by the clock its taps are (GPS-set on a bus), so "a grey
        # purchase 10 minutes old" and the link history compare like with like.
        self.clock = clock or (terminal.clock if terminal is not None else (lambda: datetime.now(UTC)))
        self.last_tap: datetime | None = None
        self._taps_topic = topics.taps(operator, device_id)
        self._status_topic = topics.status(operator, device_id)
        self._subscriptions = [(topics.device_topic(operator, device_id, m), 1) for m in topics.DOWNLINK]
        # The fleet's packages through one filter, not one per kind: on a NATS cluster every QoS 1 subscription is
        # a JetStream consumer, so a bus costs the cluster five of them instead of seven (_on_message drops a kind
        # it does not know).
        self._subscriptions += [(f"{topics.PREFIX}/{topics.check_segment(operator, 'operator')}/{topics.FLEET}/+", 1)]
        self._wake = threading.Event()
        self._status_due = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._inflight: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._offline = False
        self._connection_at: datetime | None = None
        self._reported_backlog: int | None = None  # the backlog the last status sent said
        self._stopped = False
        self.batches_sent = 0
        self.resends = 0
        self.forged_acks = 0
        self.statuses_sent = 0
        self.set_aside = 0  # records this uplink set aside because they would not encode
        self.quarantined = 0  # records the back office acknowledged as quarantined

        client = new_client(self.target, f"dev_{device_id}", max_inflight=4)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect_fail = self._on_connect_fail
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client
        self._sub_mids: dict[int, list[tuple[str, int]]] = {}  # SUBSCRIBE packet id -> its filters

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name=f"uplink-{self.device_id}", daemon=True)
        self._thread.start()

    def stop(self, goodbye_timeout: float = 5.0) -> bool:
        """A clean shutdown: a ``goodbye`` status (its final backlog), then a DISCONNECT, so the broker does not
        publish the death. Returns whether the broker took the goodbye (False: offline, or it did not answer within
        ``goodbye_timeout`` seconds; the retained heartbeat and, on a lost link, the will tell the rest). Calling it
        again does nothing."""
        if self._stopped:
            return False
        self._stopped = True
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        said = False
        if self._connected.is_set() and not self._offline:
            info = self._publish_status("goodbye")
            if info is not None:
                try:
                    info.wait_for_publish(timeout=goodbye_timeout)
                    said = info.is_published()
                except (RuntimeError, ValueError):  # the link dropped meanwhile: nothing more to say
                    said = False
        self.client.disconnect()
        self.client.loop_stop()
        return said

    def go_offline(self) -> None:
        """The bus drives into a dead zone: the link drops and stays down until :meth:`go_online`."""
        self._offline = True
        self.client.disconnect()
        self.client.loop_stop()  # a user disconnect ends paho's network thread; go_online starts a new one

    def go_online(self) -> None:
        self._offline = False
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()

    def notify(self, at: datetime | None = None) -> None:
        """A new record is in the journal (a tap at ``at``): send without waiting for the next poll."""
        self.last_tap = at or (self.terminal.clock() if self.terminal is not None else self.clock())
        self._wake.set()

    def send_status_now(self) -> None:
        """Send a heartbeat at the next turn of the sender (something the back office acts on changed)."""
        self._status_due.set()
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

    # -- status --------------------------------------------------------------------------------------------

    def status(self, kind: str, at: datetime | None = None) -> wstatus.Status:
        """What the bus says about itself now."""
        usage = self.journal.usage()
        alarms: list[str] = []
        if usage.refusing:
            alarms.append("journal full")
        elif usage.fraction is not None and usage.fraction >= JOURNAL_ALARM_FRACTION:
            alarms.append(f"journal {int(usage.fraction * 100)}% full")
        now = at or self.clock()
        if usage.set_aside:
            alarms.append(f"{usage.set_aside} records set aside (cannot encode)")
        if usage.oldest_pending is not None and now - usage.oldest_pending >= GREY_ALARM_AFTER:
            plural = "s" if usage.pending != 1 else ""
            alarms.append(f"{usage.pending} grey purchase{plural} since {usage.oldest_pending:%Y-%m-%d %H:%M}Z")
        params_version = denylist_version = 0
        psam = ""
        terminal = self.terminal
        if terminal is not None:
            params_version = terminal.fares.version
            denylist_version = terminal.deny_list.version
            psam = terminal.terminal_id.hex()
        if self.downlink is not None:
            params_version = self.downlink.params_version
            alarms.extend(self.downlink.alarms())
        return wstatus.Status(kind=kind, device_id=self.device_id, at=now, software=self.software,
                             params_version=params_version, denylist_version=denylist_version,
                             backlog=usage.unsent, oldest_unsent=usage.oldest_unsent, psam=psam,
                             last_tap=self.last_tap, alarms=tuple(alarms[:wstatus.MAX_ALARMS]))

    def _publish_status(self, kind: str, at: datetime | None = None):
        try:
            status = self.status(kind, at)
            payload = wstatus.encode_status(status, key=self.mac_key)
        except Exception:  # a bad field must not stop the taps
            log.exception("device %s: cannot build its %s status", self.device_id, kind)
            return None
        info = self.client.publish(self._status_topic, payload, qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.statuses_sent += 1
            self._reported_backlog = status.backlog
        return info

    def _set_will(self) -> None:
        self._connection_at = self.clock()
        try:
            will = wstatus.encode_status(self.status("death", self._connection_at), key=self.mac_key)
        except Exception:
            log.exception("device %s: cannot build its last will", self.device_id)
            return
        self.client.will_set(self._status_topic, will, qos=1, retain=True)

    # -- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_pre_connect(self, client, userdata):
        # Before every (re)connect: the will names this connection, so a late will of an old one can be told apart.
        self._set_will()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("device %s: broker refused the connection: %s (check the device's MQTT user and password)",
                      self.device_id, reason_code)
            return
        self._subscribe(self._subscriptions)
        self._publish_status("birth", self._connection_at)
        self._connected.set()
        with self._lock:
            self._inflight.clear()  # whatever was in flight is sent again; the back office drops duplicates
        self._wake.set()

    def _subscribe(self, filters: list[tuple[str, int]]) -> None:
        rc, mid = self.client.subscribe(filters)
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_mids[mid] = filters

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        """A filter the broker refused (SUBACK 0x80) is asked for again a few seconds later: without its ``ack``
        subscription a bus would send its batches for ever and never hear back (seen on a NATS cluster under load:
        the JetStream consumer behind a subscription timed out, and the SUBACK said so)."""
        filters = self._sub_mids.pop(mid, [])
        failed = [f for f, rc in zip(filters, reason_codes, strict=False) if rc.is_failure]
        if failed and not self._stop.is_set():
            log.warning("device %s: broker refused subscriptions %s; asking again in 5 s", self.device_id,
                        [f for f, _ in failed])
            timer = threading.Timer(5.0, self._resubscribe, args=(failed,))
            timer.daemon = True
            timer.start()

    def _resubscribe(self, filters: list[tuple[str, int]]) -> None:
        if self._connected.is_set() and not self._stop.is_set():
            self._subscribe(filters)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        if not self._offline and not self._stop.is_set():
            log.warning("device %s: link to the broker lost (%s); records stay in the journal", self.device_id,
                        reason_code)
            self._next_node()

    def _on_connect_fail(self, client, userdata):
        if not self._offline and not self._stop.is_set():
            self._next_node()

    def _next_node(self) -> None:
        """The next (re)connect goes to the next broker of the list (nothing changes with one broker)."""
        if len(self.targets) < 2:
            return
        self._node = (self._node + 1) % len(self.targets)
        self.target = self.targets[self._node]
        try:
            self.client.host, self.client.port = self.target.host, self.target.port
        except RuntimeError:  # paho has not marked the socket closed yet: set what reconnect() reads
            self.client._host, self.client._port = self.target.host, self.target.port
        self.failovers += 1
        log.warning("device %s: failing over to broker %s", self.device_id, self.target.url(with_password=False))

    def _on_message(self, client, userdata, message):
        try:
            _operator, target, kind = topics.parse(message.topic)
        except topics.TopicError as e:
            log.error("device %s: message on an unexpected topic ignored: %s", self.device_id, e)
            return
        if not ((target == self.device_id and kind in topics.DOWNLINK)
                or (target == topics.FLEET and kind in topics.FLEET_MESSAGES)):
            # Not something this device subscribed to (amqtt has been seen to deliver other clients' retained
            # status messages): not a package, and not worth an error line per message.
            log.debug("device %s: message on %s ignored: not this device's downlink", self.device_id,
                      message.topic)
            return
        if kind == "ack":
            self._on_ack(message)
        elif self.downlink is not None:
            self.downlink.receive(kind, message.payload, fleet=target == topics.FLEET)
        else:
            log.info("device %s: %s package on %s ignored (no downlink configured)", self.device_id, kind,
                     message.topic)

    def _on_ack(self, message) -> None:
        try:
            ack = codec.decode_ack(message.payload, key=self.mac_key)
        except codec.MacError as e:
            self.forged_acks += 1
            log.error("device %s: acknowledgement with a bad MAC on %s ignored (forged, or sent with another key): "
                      "%s", self.device_id, message.topic, e)
            return
        except codec.WireError as e:
            log.error("device %s: unreadable acknowledgement on %s: %s", self.device_id, message.topic, e)
            return
        if ack.device_id != self.device_id:
            log.error("device %s: acknowledgement for device %s ignored", self.device_id, ack.device_id)
            return
        if ack.epoch != self.journal.epoch:
            log.warning("device %s: acknowledgement for journal %d ignored: this journal is %d (an ack meant for a "
                        "replaced journal's records)", self.device_id, ack.epoch, self.journal.epoch)
            return
        if ack.quarantined:
            self.quarantined += len(ack.quarantined)
            log.warning("device %s: the back office quarantined records %s (kept there with the reason; operations "
                        "reviews them)", self.device_id, list(ack.quarantined))
        self.journal.mark_acked(ack.seqs)
        with self._lock:
            self._inflight.difference_update(ack.seqs)
        if self._reported_backlog and self.journal.backlog() == 0:
            self._status_due.set()  # all caught up: say so now, not at the next periodic heartbeat
        self._wake.set()

    # -- sender thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.ack_timeout
        sent_at = 0.0
        every = timedelta(seconds=self.heartbeat_seconds)
        next_heartbeat = time.monotonic() + self.heartbeat_seconds
        next_by_clock = self.clock() + every
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if not self._connected.is_set():
                continue
            now = self.clock()
            if self._status_due.is_set() or time.monotonic() >= next_heartbeat or now >= next_by_clock:
                self._status_due.clear()
                self._publish_status("heartbeat")
                next_heartbeat = time.monotonic() + self.heartbeat_seconds
                next_by_clock = now + every
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
                payload, seqs = self._next_message()
            except Exception:  # a journal error must not kill the sender; it is retried on the next wake
                log.exception("device %s: cannot read the journal", self.device_id)
                continue
            if payload is None:
                continue
            with self._lock:
                self._inflight = set(seqs)
            info = self.client.publish(self._taps_topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("device %s: publish failed (%s); will retry", self.device_id, mqtt.error_string(info.rc))
            sent_at = time.monotonic()
            self.batches_sent += 1

    def _next_message(self) -> tuple[bytes | None, list[int]]:
        """The next message and the sequences it carries: records set aside first (for the back office's
        quarantine), else the oldest unsent batch. A batch that does not encode is split: records that fail on
        their own are set aside, and the rest is sent."""
        journal = self.journal
        aside = journal.set_aside_unsent(self.batch_size)
        if aside:
            return (codec.encode_set_aside(self.device_id, self.operator, journal.epoch, aside, key=self.mac_key),
                    [seq for seq, _, _ in aside])
        batch = journal.unsent(self.batch_size)
        if not batch:
            return None, []
        try:
            return codec.encode_batch(batch, key=self.mac_key), [r.device_seq for r in batch]
        except codec.WireError as e:
            failed = e
        bad: dict[int, str] = {}
        for r in batch:
            try:
                codec.encode_batch([r], key=self.mac_key)
            except codec.WireError as e:
                bad[r.device_seq] = str(e)
        if not bad:  # each record encodes alone but not together: send them one at a time
            log.error("device %s: records %d-%d cannot be encoded together (%s); sending them one by one",
                      self.device_id, batch[0].device_seq, batch[-1].device_seq, failed)
            return codec.encode_batch(batch[:1], key=self.mac_key), [batch[0].device_seq]
        self.set_aside += journal.set_aside(bad)
        log.error("device %s: records %s cannot be encoded (%s); set aside: they go to the back office's "
                  "quarantine and the records behind them are sent as usual. This is a validator software fault: "
                  "report it with the journal file", self.device_id, sorted(bad), "; ".join(bad.values())[:500])
        self._status_due.set()  # the alarm goes out with the next heartbeat
        return self._next_message()


def _running_software() -> str:
    from validator.downlink import running_software

    return running_software()

"""The back office's downlink: deny lists, parameters and software to the buses over MQTT, every package signed.

Design (what travels where, and what it costs on a bus's GPRS bill):

| topic | QoS / retained | payload | bytes (version n digits, device id d characters) |
|---|---|---|---|
| ``.../_fleet/denylist`` | 1, retained | the **announcement** of the current version (below) | 272 + 2n + digits of the card count |
| ``.../<device>/denylist`` | 1 | a **delta** from the version the device reported | 182 + n + d + 10 per changed card |
| ``.../<device>/denylist`` | 1 | or the **full list** | 198 + n + d + 8 per card (one issuer prefix) |
| ``.../_fleet/params``, ``.../_fleet/software`` | 1, retained | the fleet's newest package (``packages_publish``) | 132 + n + body |
| ``.../<device>/params``, ``.../<device>/software`` | 1 | a package for that device (or its route) | 126 + n + d + body |

(Package overhead, ``wire.packages``: 60-byte fixed header, 1 + n version, 1 + d target, 64-byte signature; a delta
body has a 56-byte header and 10 bytes per card added or removed; a list file a 56-byte header, 16 bytes of group
table for one prefix and 8 bytes per card. The test checks the announcement and a delta's figures.)

Why a small announcement and a per-device delta, not the full list retained on ``_fleet/denylist``: a broker hands a
retained message to every subscriber on every subscribe, i.e. on every reconnect of every bus (GPRS links drop many
times a day). With a city list of 100,000 cards the full list is ~800 kB per reconnect per bus; the announcement is
~275 bytes, and the list itself then travels once per version as a delta of 10 bytes per card that changed (a
dozen cards a day: ~320 bytes). A bus that is too far behind (``max_behind`` versions), new (version 0), or reports a
version we never made gets the full list once, on its own topic; so does one whose delta would not be smaller than
the list.

The announcement is a ``wire.packages`` package (signed, so a bus can trust "you are behind" and its stale-list
alarm can trust the date) with kind ``denylist``, target ``_fleet``, version N, activation time the version's creation
time, no base version, and a compact UTF-8 JSON body ``{"checksum":"<sha-256 hex of the list content>","count":
<cards>,"created_at":"<ISO UTC>","version":N}``. A bus tells it from a list by its body, which starts with ``{``,
not ``FBDL`` or ``FBDD`` (``validator.downlink`` does so; a bus behind reports its version at once). The checksum lets
a bus at version N see that its list is not the office's N (a database restored from another history).
``parse_announcement`` reads one back.

How a bus gets its delta: it reports its version in its status (birth and every heartbeat, retained on its status
topic). The publisher subscribes to every status topic (decoding each with the device's MAC key, so nobody can ask
in a device's name) and, when the version is not the current one, sends the device its delta (or the full list),
signed for that device, on its own ``denylist`` topic. It sends again to a device that still reports the old
version after ``retry_after`` seconds or that connects again (a birth); a delta for a version the bus has meanwhile
left is refused by the bus (its base is not the bus's version), never applied twice. A bus whose status carries a
"refused denylist ..." alarm gets the full list: its list is not what our delta was made for. On a new version it sends to
every device known to be online and behind, from what it heard and from the ``device_status`` table, so a one-shot
``farebox denylist publish`` updates the fleet too.

Nobody has to run ``farebox denylist publish`` after a change: every ``rebuild_every`` seconds (default 30,
``FAREBOX_DENYLIST_REBUILD_SECONDS``; and once at start) the publisher asks whether the cards to deny (lost, blocked,
fraud, withdrawn driver cards; a card found again leaves) differ from the newest version
(``denylist_publish.denylist_changed``: two small queries and a hash, nothing written when nothing changed) and, when
they do, builds the next version and sends it as above. So a card reported lost at the counter, or a retired
driver's card, reaches every bus online within ``rebuild_every`` seconds plus a delivery, whatever process changed
it (a page, the API, the CLI). Two publishers on one database both notice; the second one's insert of the same
version number fails and it builds again on top (``publish_denylist``), which then finds nothing new.

Per-device parameter and software packages are re-sent the same way to a device that reports in (birth, or the
periodic sweep) still running another version: after the package's activation time at each birth and every
``retry_after``; before it only once (a bus that has it staged keeps reporting its old version until then). Fleet
packages need no re-send: they are retained.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from backoffice import models
from backoffice.denylist_publish import (
    DEFAULT_MAX_BEHIND,
    DenyListVersion,
    Update,
    build_version,
    denylist_changed,
    prune_versions,
    update_for,
)
from backoffice.denylist_publish import get_version as _get_version
from backoffice.devices import status_subscription
from backoffice.mqtt_service import MqttService
from backoffice.packages_publish import Outgoing, expected_versions
from blacklist.delta import encode_delta
from wire import topics
from wire.devicekeys import mac_key
from wire.mqtt_url import MqttTarget
from wire.packages import Package, PackageError, sign_package, verify_package

log = logging.getLogger(__name__)



def announcement_package(version: DenyListVersion) -> Package:
    """The fleet announcement of ``version``: a signed deny-list package for ``_fleet`` with a JSON body (see the
    module)."""
    body = json.dumps({"version": version.version, "count": version.count, "checksum": version.checksum,
                       "created_at": version.created_at.astimezone(UTC).isoformat()},
                      sort_keys=True, separators=(",", ":")).encode()
    return Package("denylist", str(version.version), topics.FLEET, version.created_at, body)


ANNOUNCEMENT_KEYS = {"version", "count", "checksum", "created_at"}


def parse_announcement(payload: bytes, public_key: bytes) -> dict:
    """An announcement's ``{"version", "count", "checksum", "created_at"}`` once its signature verifies;
    ``PackageError`` for anything else."""
    pkg = verify_package(payload, public_key)
    if pkg.kind != "denylist" or pkg.target != topics.FLEET or pkg.base_version is not None:
        raise PackageError(f"not a deny-list announcement: {pkg.describe()}")
    try:
        doc = json.loads(pkg.body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"deny-list announcement body is not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != ANNOUNCEMENT_KEYS or doc["version"] != pkg.number:
        raise PackageError(f"deny-list announcement body is not the documented one: {doc!r}")
    return doc


def denylist_package(update: Update, device_id: str) -> Package:
    """The deny-list package for one device: a delta (base version set) or the full list (no base version)."""
    v = update.version
    if update.kind == "delta":
        return Package("denylist", str(v.version), device_id, v.created_at, encode_delta(update.delta),
                       base_version=update.delta.base_version)
    return Package("denylist", str(v.version), device_id, v.created_at, v.body)


class Publisher(MqttService):
    """One MQTT client that sends every downlink package; see the module for the design.

    ``operator`` limits it to one operator's buses (None: every operator's). ``listen_status`` subscribes to the
    buses' status topics and answers each bus that reports an old deny list; a one-shot command turns it off and
    works from the ``device_status`` table alone.
    """

    def __init__(self, engine: Engine, target: MqttTarget, *, seed: bytes, device_master: bytes,
                 operator: str | None = None, client_id: str = "farebox_publisher",
                 max_behind: int = DEFAULT_MAX_BEHIND, retry_after: float = 600.0, listen_status: bool = True,
                 sweep_every: float = 60.0, rebuild_every: float = 0.0):
        subscription = None  # a one-shot command works from the device_status table alone
        if listen_status:
            subscription = status_subscription(operator)
        # No session to keep: on reconnecting, the retained statuses say again where every bus stands.
        super().__init__(target, client_id, name="publisher", subscription=subscription, persistent=False,
                         max_delay=30)
        self.engine = engine
        self.seed = seed
        self.master = device_master
        self.operator = operator
        self.max_behind = max_behind
        self.retry_after = retry_after
        self.listen_status = listen_status
        self.sweep_every = sweep_every
        self.rebuild_every = rebuild_every  # seconds between "did the denied cards change?"; 0: never by itself
        self.counts = {"announcements": 0, "deltas": 0, "full_lists": 0, "packages": 0, "bytes": 0,
                       "status_refused": 0, "errors": 0}
        self._lock = threading.RLock()
        self._current: DenyListVersion | None = None
        self._updates: dict[int, Update | None] = {}  # device version -> what it gets, for self._current
        self._sent: dict[tuple[str, str], tuple[object, float]] = {}  # (device, kind) -> (what, when)
        self._heard: dict[str, tuple[str, int, bool]] = {}  # device -> (operator, deny-list version, online)
        self._devices: dict[str, str] = {}  # device -> operator (registered devices seen so far)
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._rebuilder: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- MQTT

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        # Ready even if the broker refused the status subscription: publishing still works, and start() calls
        # on_ready once; but say so, or nobody learns why buses' versions never prompt a delta.
        if any(rc.is_failure for rc in reason_codes):
            self._log.error("publisher: broker refused the subscription to %s: %s; packages are still published, "
                            "but bus status is not heard (check the publisher's broker ACL)", self.subscription,
                            reason_codes)
        self._subscribed.set()

    def start(self, timeout: float = 10.0) -> None:
        super().start()
        if not self.wait_subscribed(timeout):
            raise TimeoutError(f"publisher: no connection to {self.target.url(with_password=False)} in {timeout} s")
        self.on_ready()
        if self.sweep_every:
            self._sweeper = threading.Thread(target=self._sweep_loop, name="publisher-sweep", daemon=True)
            self._sweeper.start()
        if self.rebuild_every:
            self._rebuilder = threading.Thread(target=self._rebuild_loop, name="publisher-rebuild", daemon=True)
            self._rebuilder.start()

    def stop(self) -> None:
        self._stop.set()
        super().stop()

    def send(self, messages: list[Outgoing], *, wait: float | None = None) -> None:
        """Publish ``messages`` (QoS 1); with ``wait``, block until the broker has taken each one (never call it
        with ``wait`` from an MQTT callback: the callback runs in the thread that would have to do the sending)."""
        infos = []
        for m in messages:
            infos.append(self.client.publish(m.topic, m.payload, qos=1, retain=m.retain))
            with self._lock:
                self.counts["bytes"] += len(m.payload)
            log.info("publisher: %s on %s (%d bytes%s)", m.description, m.topic, len(m.payload),
                     ", retained" if m.retain else "")
        if wait is not None:
            for info in infos:
                info.wait_for_publish(wait)
                if not info.is_published():
                    raise TimeoutError(f"publisher: the broker did not take a message within {wait} s")

    @property
    def current(self) -> DenyListVersion | None:
        """The current deny-list version as this publisher last read it."""
        with self._lock:
            return self._current

    def reported(self, device_id: str) -> int | None:
        """The deny-list version ``device_id`` last reported to this publisher (None: not heard, or offline)."""
        with self._lock:
            heard = self._heard.get(device_id)
        return None if heard is None or not heard[2] else heard[1]

    # ------------------------------------------------------------------------------------------- deny lists

    def publish_denylist(self, now: datetime | None = None, *, wait: float | None = None) -> DenyListVersion | None:
        """Build a new version if the cards changed, announce the current one to every fleet (again, if it is not
        new: the announcement is retained, so re-sending it mends a broker that lost it), and send every known
        online device that is behind its update. Returns the new version, or None when nothing changed."""
        now = now or datetime.now(UTC)
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    new = build_version(conn, now)
                    prune_versions(conn, keep_behind=self.max_behind)
                break
            except IntegrityError:
                # Another back office stored the same version number a moment ago; build again on top of it.
                if attempt == 2:
                    raise
        current = self._refresh_current()
        if current is None:
            return None
        with self.engine.connect() as conn:
            operators = self._operators(conn)
        payload = sign_package(announcement_package(current), self.seed)
        self.send([Outgoing(topics.fleet_topic(op, "denylist"), payload, True, topics.FLEET,
                            f"deny-list announcement {current.version}") for op in operators], wait=wait)
        with self._lock:
            self.counts["announcements"] += len(operators)
        self.catch_up(wait=wait)
        return new

    def rebuild_if_changed(self, now: datetime | None = None) -> DenyListVersion | None:
        """Build and send a new version when the cards to deny changed since the newest one; None (and nothing
        sent) when they did not."""
        with self.engine.connect() as conn:
            if not denylist_changed(conn, now):
                return None
        new = self.publish_denylist(now)
        if new is not None:
            log.info("publisher: deny list changed: version %d (%d cards) built and sent", new.version, new.count)
        return new

    def _rebuild_loop(self) -> None:
        """See the module: a new version within ``rebuild_every`` seconds of any change of the denied cards."""
        while not self._stop.is_set():
            try:
                self.rebuild_if_changed()
            except Exception:  # a database hiccup or a bad card number: said in the log, tried again next time
                with self._lock:
                    self.counts["errors"] += 1
                log.exception("publisher: deny-list rebuild failed; trying again in %s s", self.rebuild_every)
            if self._stop.wait(self.rebuild_every):
                return

    def _operators(self, conn) -> list[str]:
        if self.operator is not None:
            return [self.operator]
        return list(conn.execute(select(models.Operator.code).order_by(models.Operator.code)).scalars())

    def _refresh_current(self) -> DenyListVersion | None:
        """The current version, re-read only when its number changed (a list of a million cards is 8 MB)."""
        table = models.DenyListVersion.__table__
        with self.engine.connect() as conn:
            number = conn.execute(select(table.c.version).order_by(table.c.version.desc()).limit(1)).scalar()
            with self._lock:
                if number is None or (self._current is not None and self._current.version == number):
                    return self._current
            current = _get_version(conn, number)
        with self._lock:
            self._current = current
            self._updates.clear()  # updates were made for the old version
        return current

    def catch_up(self, *, wait: float | None = None) -> int:
        """Send every online device that is behind its deny-list update (and per-device packages it has not
        reported); returns how many messages went out."""
        versions: dict[str, tuple[str, int]] = {}
        dev, st = models.Device.__table__, models.DeviceStatus.__table__
        query = select(dev.c.device_id, dev.c.operator, st.c.denylist_version, st.c.params_version,
                       st.c.software).join(st, st.c.device_id == dev.c.device_id).where(st.c.online.is_(True))
        if self.operator is not None:
            query = query.where(dev.c.operator == self.operator)
        out: list[Outgoing] = []
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            expected = {(op, kind): expected_versions(conn, op, kind)
                        for op in {r.operator for r in rows} for kind in ("params", "software")}
            for r in rows:
                versions[r.device_id] = (r.operator, r.denylist_version)
                want = {kind: expected[(r.operator, kind)].get(r.device_id) for kind in ("params", "software")}
                out += self._packages_for(conn, r.operator, r.device_id,
                                          {"params": str(r.params_version), "software": r.software}, want,
                                          again=False)
        with self._lock:
            for device_id, (operator, version, online) in self._heard.items():  # fresher than the table
                if online:
                    versions[device_id] = (operator, version)
                else:
                    versions.pop(device_id, None)
        for device_id, (operator, version) in sorted(versions.items()):
            out.extend(self._denylist_for(operator, device_id, version, again=False))
        self.send(out, wait=wait)
        return len(out)

    def _denylist_for(self, operator: str, device_id: str, version: int, *, again: bool,
                      full: bool = False) -> list[Outgoing]:
        """The deny-list package for a device at ``version``, unless it was sent lately; ``full`` asks for the
        whole list even when a delta would do (the bus refused a delta)."""
        current = self._current
        if current is None or version == current.version:
            with self._lock:
                self._sent.pop((device_id, "denylist"), None)
            return []
        what = (current.version, version, full)
        with self._lock:
            last = self._sent.get((device_id, "denylist"))
            if last is not None and last[0] == what and not again and time.monotonic() - last[1] < self.retry_after:
                return []  # sent already; the bus has not had time to apply it and say so
            if full:
                update = Update("full", current)
            else:
                if version not in self._updates:
                    with self.engine.connect() as conn:
                        self._updates[version] = update_for(conn, version, max_behind=self.max_behind,
                                                            current=current)
                update = self._updates[version]
            if update is None:
                return []
            self._sent[(device_id, "denylist")] = (what, time.monotonic())
            self.counts["deltas" if update.kind == "delta" else "full_lists"] += 1
        pkg = denylist_package(update, device_id)
        return [Outgoing(topics.device_topic(operator, device_id, "denylist"), sign_package(pkg, self.seed), False,
                         device_id, pkg.describe())]

    # ------------------------------------------------------------------------------------------- packages

    def _packages_for(self, conn, operator: str, device_id: str, running: dict[str, str],
                      expected: dict[str, tuple[str, datetime, bool] | None], *, again: bool) -> list[Outgoing]:
        """The device's own params / software packages that it has not reported running (fleet packages are
        retained: the device has them). ``expected``: kind -> what ``expected_versions`` says for this device."""
        now = datetime.now(UTC)
        out = []
        pkg = models.Package.__table__
        for kind in ("params", "software"):
            want = expected.get(kind)
            if want is None or not want[2] or want[0] == running.get(kind):
                continue
            version = want[0]
            # Before its activation time a bus that has the package staged still reports the old version: send it
            # once (a bus that missed it can stage it in time), not at every reconnect (software is megabytes).
            pending = want[1] > now
            with self._lock:
                last = self._sent.get((device_id, kind))
                if last is not None and last[0] == version and (
                        pending or (not again and time.monotonic() - last[1] < self.retry_after)):
                    continue
            payload = conn.execute(select(pkg.c.payload).where(
                pkg.c.kind == kind, pkg.c.operator == operator, pkg.c.version == version,
                pkg.c.target == device_id)).scalar()
            if payload is None:
                continue
            with self._lock:
                self._sent[(device_id, kind)] = (version, time.monotonic())
                self.counts["packages"] += 1
            out.append(Outgoing(topics.device_topic(operator, device_id, kind), bytes(payload), False, device_id,
                                f"{kind} {version} for {device_id} (again)"))
        return out

    # ------------------------------------------------------------------------------------------- status

    def _on_message(self, client, userdata, message):
        try:
            self._status(message.topic, message.payload)
        except Exception:
            # Nothing a bus sends may stop the publisher: count it, log it, go on with the next message.
            with self._lock:
                self.counts["errors"] += 1
            log.exception("publisher: status on %s not handled", message.topic)

    def _operator_of(self, device_id: str) -> str | None:
        with self._lock:
            if device_id in self._devices:
                return self._devices[device_id]
        with self.engine.connect() as conn:
            operator = conn.execute(select(models.Device.operator)
                                    .where(models.Device.device_id == device_id)).scalar()
        if operator is not None:
            with self._lock:
                self._devices[device_id] = operator
        return operator

    def _status(self, topic: str, payload: bytes) -> None:
        from wire.status import StatusError, decode_status

        if not payload:
            return  # a retained status cleared by an operator
        try:
            operator, device_id, _message = topics.parse(topic)
        except topics.TopicError:
            return
        if self._operator_of(device_id) != operator:
            with self._lock:
                self.counts["status_refused"] += 1
            log.warning("publisher: status on %s: %s is not a registered device of %s", topic, device_id, operator)
            return
        try:
            status = decode_status(payload, key=mac_key(self.master, device_id))
        except StatusError as e:
            with self._lock:
                self.counts["status_refused"] += 1
            log.warning("publisher: status on %s refused: %s", topic, e)
            return
        if status.device_id != device_id:
            with self._lock:
                self.counts["status_refused"] += 1
            log.warning("publisher: status on %s names device %s", topic, status.device_id)
            return
        online = status.kind not in ("death", "goodbye")  # a goodbye: stopped cleanly (wire.status)
        with self._lock:
            self._heard[device_id] = (operator, status.denylist_version, online)
        if not online:
            return
        self._refresh_current()
        birth = status.kind == "birth"
        # A bus that refused a deny-list package says so in its alarms ("refused denylist 7: ..."): its list is not
        # the one our delta was made for (or the delta was damaged), so the same delta would be refused again.
        refused = any(a.startswith("refused denylist") for a in status.alarms)
        out = self._denylist_for(operator, device_id, status.denylist_version, again=birth, full=refused)
        if birth:
            running = {"params": str(status.params_version), "software": status.software}
            with self.engine.connect() as conn:
                expected = {kind: expected_versions(conn, operator, kind, devices=[device_id])[device_id]
                            for kind in ("params", "software")}
                out += self._packages_for(conn, operator, device_id, running, expected, again=True)
        self.send(out)

    def _sweep_loop(self) -> None:
        """Pick up versions published by another process (``farebox denylist publish``) and retry devices that
        have not moved."""
        while not self._stop.wait(self.sweep_every):
            try:
                self._refresh_current()
                self.catch_up()
            except Exception:
                with self._lock:
                    self.counts["errors"] += 1
                log.exception("publisher: sweep failed; next one in %s s", self.sweep_every)

"""Device management: registering validators with their credentials, what they say about themselves (device status),
and the fleet view operations watch (last seen, versions, backlog, alarms, stale devices).

Use cases with keyword-only arguments, run inside the caller's transaction, like backoffice.registry.

Status ordering: a validator's ``at`` (its own clock, GPS-set on a bus) orders its messages. A birth or heartbeat older
than what is stored is a late or replayed copy and changes nothing. A death (the MQTT last will) is signed when the
connection begins and carries that time, so it marks the device offline only if no newer connection has been born
since: the will of an old connection delivered late cannot knock a device that is back offline. A goodbye (the
validator stopped cleanly, wire.status) is dated when it was said and carries the final backlog: it marks the device
offline and "signed off", which is not stale however long the bus then stays in the depot.

Link history (table ``device_link``): one row per connection, opened by a birth (or the first heartbeat heard of
it), extended by each heartbeat (``last_heard``), closed by a goodbye, by the connection's last will, or by the next
birth when the link dropped with neither (a dead zone where the broker's will came late, or never). The time a lost
link ended is the last thing heard on it; the gap to the next connection is when the bus was off the air. All times
are the device's own (GPS-set on a bus), the clock its taps carry.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Connection, select

from backoffice import registry
from backoffice.models import Base, Device, DeviceStatus, Operator, Vehicle
from wire import devicekeys, topics
from wire.status import OFFLINE_KINDS, Status, StatusError, decode_status

# The back office's own broker users. Their passwords derive from the device master like a device's, so they are
# reserved: a device with one of these ids would share the service's login and its ACL.
BACKOFFICE_USERS = ("ingest", "status", "publisher")
DEFAULT_STALE_AFTER = timedelta(minutes=5)
MAX_CLOCK_AHEAD = timedelta(minutes=5)
_TERMINAL = re.compile(r"[0-9a-f]{12}")

# One row per connection of a validator (revision 2026_12_03_0018); see the module's docstring.
device_link = sa.Table(
    "device_link", Base.metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(32), sa.ForeignKey("device.device_id"), nullable=False),
    sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_heard", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ended_by", sa.String(16), nullable=True),  # goodbye | lost
    sa.Index("ix_device_link_device", "device_id", "connected_at"),
)


class DeviceError(ValueError):
    """A device cannot be registered as asked; the text says why and what to do."""


class StatusRefused(ValueError):
    """A status message the back office will not store; the text is the reason (logged and counted)."""


@dataclasses.dataclass(frozen=True)
class DeviceCredentials:
    """What a validator is provisioned with. Secret: shown once at registration, derivable again from the master."""

    device_id: str
    operator: str
    mqtt_username: str
    mqtt_password: str
    mac_key: bytes

    def __repr__(self) -> str:  # never print the secrets into a log by accident
        return f"DeviceCredentials(device_id={self.device_id!r}, operator={self.operator!r}, secrets=***)"


def credentials(master: bytes, *, device_id: str, operator: str) -> DeviceCredentials:
    return DeviceCredentials(device_id=device_id, operator=operator, mqtt_username=device_id,
                             mqtt_password=devicekeys.mqtt_password(master, device_id),
                             mac_key=devicekeys.mac_key(master, device_id))


def service_password(master: bytes, user: str) -> str:
    """The broker password of a back-office user (ingest, status, publisher): derived like a device's."""
    if user not in BACKOFFICE_USERS:
        raise ValueError(f"{user!r} is not a back-office broker user ({', '.join(BACKOFFICE_USERS)})")
    return devicekeys.mqtt_password(master, user)


def register_device(conn: Connection, *, device_id: str, operator: str, terminal_id: str, master: bytes,
                    vehicle: str | None = None) -> DeviceCredentials:
    """Register a validator and return its credentials. The device id becomes its broker user name and a topic
    segment, so it must be one; the operator code too."""
    try:
        topics.check_device_id(device_id)  # refuses the BACKOFFICE_USERS' names too (topics.RESERVED_NAMES)
        topics.check_segment(operator, "operator code")
    except topics.TopicError as e:
        raise DeviceError(str(e)) from None
    if not _TERMINAL.fullmatch(terminal_id):
        raise DeviceError(f"PSAM terminal number {terminal_id!r} must be 12 lower-case hex digits")
    registry.add_device(conn, device_id=device_id, operator=operator, vehicle=vehicle, terminal_id=terminal_id)
    return credentials(master, device_id=device_id, operator=operator)


def registered_devices(conn: Connection, operator: str | None = None) -> list[tuple[str, str]]:
    """(device_id, operator) of every registered validator (of one operator), sorted."""
    query = select(Device.device_id, Device.operator).order_by(Device.operator, Device.device_id)
    if operator is not None:
        query = query.where(Device.operator == operator)
    return [(r.device_id, r.operator) for r in conn.execute(query)]


# ---------------------------------------------------------------------------------------------- status messages
@dataclasses.dataclass(frozen=True)
class StatusOutcome:
    device_id: str
    kind: str
    applied: bool  # False: an older copy than what is stored, nothing changed
    why: str = ""
    status: Status | None = None  # what the device said (its alarms go to backoffice.alarms)


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands timezone-aware columns back naive; they were stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def status_subscription(operator: str | None = None) -> str:
    """What the status consumer subscribes to: every device's status, or one operator's."""
    if operator is None:
        return topics.ALL_STATUS
    return f"{topics.PREFIX}/{topics.check_segment(operator, 'operator')}/+/status"


def record_status(conn: Connection, *, topic: str, payload: bytes, master: bytes, now: datetime,
                  max_clock_ahead: timedelta = MAX_CLOCK_AHEAD) -> StatusOutcome:
    """Check one status message (topic, registered device, MAC under that device's key, clock) and upsert the
    device's row. Raises StatusRefused with the reason for anything it will not store."""
    try:
        operator, device_id, message = topics.parse(topic)
    except topics.TopicError as e:
        raise StatusRefused(str(e)) from None
    if message != "status" or device_id == topics.FLEET:
        raise StatusRefused(f"{topic} is not a device status topic")
    registered = conn.execute(select(Device.operator).where(Device.device_id == device_id)).scalar_one_or_none()
    if registered is None:
        raise StatusRefused(f"device {device_id} is not registered: add it with `farebox device add`")
    if registered != operator:
        raise StatusRefused(f"device {device_id} belongs to operator {registered}, not {operator} (topic {topic})")
    try:
        status = decode_status(payload, key=devicekeys.mac_key(master, device_id))
    except StatusError as e:
        raise StatusRefused(f"device {device_id}: {e}") from None
    if status.device_id != device_id:  # signed by this device's key yet naming another: refuse, never guess
        raise StatusRefused(f"status names device {status.device_id} but came on {device_id}'s topic")
    if status.at > now + max_clock_ahead:
        raise StatusRefused(f"device {device_id}: status dated {status.at:%Y-%m-%d %H:%M:%S}Z is ahead of the back "
                            f"office's clock ({now:%Y-%m-%d %H:%M:%S}Z): the device's clock is wrong")
    outcome = _upsert(conn, status)
    if outcome.applied:
        _record_link(conn, status)
    return dataclasses.replace(outcome, status=status)


def _values(status: Status) -> dict:
    return {"software": status.software, "params_version": status.params_version,
            "denylist_version": status.denylist_version, "backlog": status.backlog,
            "oldest_unsent": status.oldest_unsent, "psam": status.psam, "last_tap": status.last_tap,
            "alarms": "; ".join(status.alarms)}


def _upsert(conn: Connection, status: Status) -> StatusOutcome:
    table = DeviceStatus.__table__
    row = conn.execute(select(table).where(table.c.device_id == status.device_id).with_for_update()).first()
    if row is None:
        values = {"device_id": status.device_id, "online": status.kind not in OFFLINE_KINDS, "last_seen": status.at,
                  "last_birth": status.at if status.kind in ("birth", "death") else None, **_values(status)}
        conn.execute(table.insert().values(**values))
        return StatusOutcome(status.device_id, status.kind, True)
    last_seen, last_birth = _utc(row.last_seen), _utc(row.last_birth)
    where = table.c.device_id == status.device_id
    if status.kind == "death":
        if last_birth is not None and status.at < last_birth:
            return StatusOutcome(status.device_id, status.kind, False,
                                 f"last will of a connection from {status.at:%H:%M:%S}; the device has "
                                 f"connected again since {last_birth:%H:%M:%S}")
        # the device was last seen at its last heartbeat, or when this connection began if that is later
        conn.execute(table.update().where(where).values(online=False, last_seen=max(last_seen, status.at)))
        return StatusOutcome(status.device_id, status.kind, True)
    if status.at < last_seen:
        return StatusOutcome(status.device_id, status.kind, False,
                             f"{status.kind} from {status.at:%Y-%m-%d %H:%M:%S} is older than the "
                             f"stored {last_seen:%Y-%m-%d %H:%M:%S}")
    if status.kind == "heartbeat" and not row.online and status.at == last_seen:
        # said in the same second as the goodbye (or will) stored: a copy from before it, not a new connection
        return StatusOutcome(status.device_id, status.kind, False,
                             f"heartbeat from {status.at:%Y-%m-%d %H:%M:%S} is no newer than the device's going "
                             "offline")
    values = {"online": status.kind != "goodbye", "last_seen": status.at, **_values(status)}
    if status.kind == "birth":
        values["last_birth"] = status.at
    conn.execute(table.update().where(where).values(**values))
    return StatusOutcome(status.device_id, status.kind, True)


def _record_link(conn: Connection, status: Status) -> None:
    """Keep the link history of one applied status (see the module's docstring)."""
    t = device_link.c
    latest = conn.execute(select(device_link).where(t.device_id == status.device_id)
                          .order_by(t.connected_at.desc(), t.id.desc()).limit(1)).first()
    is_open = latest is not None and latest.ended_at is None
    at = status.at
    if status.kind == "death":
        if is_open:  # the connection ended without a goodbye; it was last heard at its last heartbeat
            conn.execute(device_link.update().where(t.id == latest.id)
                         .values(ended_at=_utc(latest.last_heard), ended_by="lost"))
        return
    if status.kind == "birth" and is_open and _utc(latest.connected_at) == at:
        return  # the same birth again (a retained copy): the same connection
    if status.kind == "birth" and is_open:
        # a new connection while the last is still open: that link dropped with no goodbye and no will (yet)
        conn.execute(device_link.update().where(t.id == latest.id)
                     .values(ended_at=_utc(latest.last_heard), ended_by="lost"))
        is_open = False
    if not is_open:
        if latest is not None and status.kind != "birth" and at <= _utc(latest.ended_at or latest.last_heard):
            return  # a late copy from a connection already closed
        ended = {"ended_at": at, "ended_by": "goodbye"} if status.kind == "goodbye" else {}
        conn.execute(device_link.insert().values(device_id=status.device_id, connected_at=at, last_heard=at,
                                                 **ended))
        return
    values = {"last_heard": max(at, _utc(latest.last_heard))}
    if status.kind == "goodbye":
        values.update(ended_at=at, ended_by="goodbye")
    conn.execute(device_link.update().where(t.id == latest.id).values(**values))


@dataclasses.dataclass(frozen=True)
class LinkPeriod:
    """One stretch of a validator's day: ``online`` (connected) or off the air (the gap between two connections,
    or after the last one). ``until`` None: still so now. ``how`` says how an online stretch ended: ``goodbye``
    (stopped cleanly), ``lost`` (the link dropped), or "" (still connected)."""

    device_id: str
    online: bool
    since: datetime
    until: datetime | None
    how: str = ""
    last_heard: datetime | None = None  # an online stretch: the last thing heard on it

    @property
    def length(self) -> timedelta | None:
        return None if self.until is None else self.until - self.since


def link_history(conn: Connection, device_ids: list[str], *, since: datetime | None = None,
                 limit: int = 50) -> dict[str, list[LinkPeriod]]:
    """Each device's online stretches and the gaps between them, oldest first: the last ``limit`` connections (and
    only those still connected at or after ``since``)."""
    t = device_link.c
    out: dict[str, list[LinkPeriod]] = {d: [] for d in device_ids}
    for device_id in device_ids:
        query = select(device_link).where(t.device_id == device_id)
        if since is not None:
            query = query.where(sa.or_(t.ended_at.is_(None), t.ended_at >= since))
        rows = list(conn.execute(query.order_by(t.connected_at.desc(), t.id.desc()).limit(limit)))[::-1]
        periods = out[device_id]
        for i, r in enumerate(rows):
            start, end = _utc(r.connected_at), _utc(r.ended_at)
            periods.append(LinkPeriod(device_id, True, start, end, r.ended_by or "", _utc(r.last_heard)))
            if end is not None:
                following = _utc(rows[i + 1].connected_at) if i + 1 < len(rows) else None
                if following is None or following > end:
                    periods.append(LinkPeriod(device_id, False, end, following, r.ended_by or ""))
    return out


# ---------------------------------------------------------------------------------------------- the fleet view
@dataclasses.dataclass(frozen=True)
class FleetRow:
    device_id: str
    operator: str
    vehicle: str | None
    plate: str | None
    operator_name: str
    online: bool | None  # None: never heard from
    last_seen: datetime | None
    software: str
    params_version: int | None
    denylist_version: int | None
    backlog: int | None
    oldest_unsent: datetime | None
    psam: str
    last_tap: datetime | None
    alarms: tuple[str, ...]
    stale: bool  # never heard from, or silent for longer than stale_after without a goodbye
    silent_for: timedelta | None
    signed_off: bool = False  # its last word was a goodbye: stopped cleanly, its backlog is its final one
    link_lost: datetime | None = None  # the link dropped (will, or a new connection) and was last heard then


def fleet_status(conn: Connection, operator: str | None, now: datetime,
                 stale_after: timedelta = DEFAULT_STALE_AFTER) -> list[FleetRow]:
    """Every registered validator (of ``operator``, or all) with its last status, flagged stale when nothing was
    heard for longer than ``stale_after`` (a device still marked online whose heartbeats stopped is stale too: its
    last will may not have come yet, or been lost with a broker that kept no state). A validator that said goodbye
    is offline and signed off, not stale: it told the back office it stopped, with its final backlog."""
    s = DeviceStatus.__table__.c
    link = device_link.c
    newest = (select(link.device_id, sa.func.max(link.id).label("id")).group_by(link.device_id).subquery())
    query = (select(Device.device_id, Device.operator, Operator.name.label("operator_name"), Device.vehicle,
                    Vehicle.plate, s.online, s.last_seen, s.software, s.params_version, s.denylist_version,
                    s.backlog, s.oldest_unsent, s.psam, s.last_tap, s.alarms, link.ended_by, link.ended_at)
             .select_from(Device)
             .join(Operator, Operator.code == Device.operator)
             .outerjoin(DeviceStatus, DeviceStatus.device_id == Device.device_id)
             .outerjoin(Vehicle, Vehicle.code == Device.vehicle)
             .outerjoin(newest, newest.c.device_id == Device.device_id)
             .outerjoin(device_link, device_link.c.id == newest.c.id)
             .order_by(Device.operator, Device.device_id))
    if operator is not None:
        query = query.where(Device.operator == operator)
    rows = []
    for r in conn.execute(query):
        last_seen = _utc(r.last_seen)
        silent_for = None if last_seen is None else now - last_seen
        signed_off = r.online is False and r.ended_by == "goodbye"
        rows.append(FleetRow(
            device_id=r.device_id, operator=r.operator, operator_name=r.operator_name, vehicle=r.vehicle,
            plate=r.plate, online=r.online,
            last_seen=last_seen, software=r.software or "", params_version=r.params_version,
            denylist_version=r.denylist_version, backlog=r.backlog, oldest_unsent=_utc(r.oldest_unsent),
            psam=r.psam or "", last_tap=_utc(r.last_tap),
            alarms=tuple(a for a in (r.alarms or "").split("; ") if a),
            stale=silent_for is None or (silent_for > stale_after and not signed_off), silent_for=silent_for,
            signed_off=signed_off,
            link_lost=_utc(r.ended_at) if r.online is False and r.ended_by == "lost" else None))
    return rows


def version_counts(rows: list[FleetRow]) -> dict[str, Counter]:
    """How many devices run which software, parameter and deny-list version (the progress of a rollout); devices
    never heard from count under None."""
    return {
        "software": Counter((r.software or None) if r.online is not None else None for r in rows),
        "params": Counter(r.params_version for r in rows),
        "denylist": Counter(r.denylist_version for r in rows),
    }

"""Parameter and software packages: publish to a fleet, a route or one device, and follow the rollout.

``publish(conn, kind, operator, target, version, body, activate_at, seed=...)`` checks the package (a params body
must be one ``wire.packages.parse_params`` reads; the version must not have been published to that target before),
signs it (``wire.packages.sign_package``), stores it in the ``package`` table exactly as it will travel, and returns
the messages to send:

- ``target="_fleet"``: one package for the whole fleet, sent **retained** on ``.../_fleet/<kind>``, so a bus that
  connects next week still receives it the moment it subscribes;
- a device id: one package signed for that device, sent on ``.../<device>/<kind>`` (QoS 1, not retained: the
  device's persistent session queues it while the bus is away, and the publisher sends it again to a device that
  comes back still running something else; see ``backoffice.publisher``);
- ``route:<code>``: the devices on that route (``devices_on_route``), one package each, as for a device.

A params package for an operator that sells tickets (has a ticket product) carries the ``tickets`` section the buses
check QR tickets and pickup codes with (``with_ticket_keys``: the ticket public key, the operator's pickup key, the
refunded tickets still in validity), unless the body brings its own. ``ticket_keys`` is asked for only then, so an
operator without tickets needs no ticket keys.

Send the returned messages after the transaction commits (``Publisher.send`` does), so nothing is on the air that
the database does not hold; a crash in between leaves a stored package that the publisher's re-send delivers.

``rollout(conn, operator, kind)`` is the progress: how many of the operator's devices run which version (from
``device_status``, filled from the devices' own heartbeats), which version each device should run (its newest
package, whether it was sent to the fleet, its route or itself), and which devices have not reported it yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, and_, func, select

from backoffice import models
from backoffice.denylist_publish import current_version, utc
from wire import topics
from wire.packages import Package, PackageError, parse_params, public_key, sign_package, verify_package

KINDS = ("params", "software")
ROUTE_PREFIX = "route:"
ROUTE_FROM_TAPS_WINDOW = timedelta(days=7)  # a device that tapped nothing for a week is on no route by its taps


class PublishError(ValueError):
    """A package that cannot be published as asked; the text says why. Nothing was stored or sent."""


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One MQTT message to send: a signed package for ``target`` on ``topic``."""

    topic: str
    payload: bytes
    retain: bool
    target: str
    description: str


def _check_operator(conn: Connection, operator: str) -> None:
    if conn.execute(select(models.Operator.code).where(models.Operator.code == operator)).first() is None:
        raise PublishError(f"operator {operator!r} is not registered")


def _operator_devices(conn: Connection, operator: str) -> list[str]:
    return list(conn.execute(select(models.Device.device_id).where(models.Device.operator == operator)
                             .order_by(models.Device.device_id)).scalars())


def devices_on_route(conn: Connection, operator: str, route: str, *, now: datetime | None = None,
                     signing_public_key: bytes | None = None) -> list[str]:
    """The operator's devices on ``route``: a device whose newest params package assigns it a route is on that
    route; a device without such an assignment is on the route of its latest tap within the last week (taps carry
    the route the driver signed on to)."""
    now = now or datetime.now(UTC)
    devices = _operator_devices(conn, operator)
    assigned: dict[str, str] = {}
    if signing_public_key is not None and devices:
        pkg = models.Package.__table__
        rows = conn.execute(select(pkg.c.target, pkg.c.payload).where(
            pkg.c.operator == operator, pkg.c.kind == "params", pkg.c.target.in_(devices))
            .order_by(pkg.c.created_at, pkg.c.id)).all()
        for target, payload in rows:  # oldest first: the newest assignment wins
            try:
                doc = parse_params(verify_package(bytes(payload), signing_public_key).body)
            except PackageError:
                continue  # signed with another key (a key rollover): it says nothing we can trust
            if "route" in doc:
                assigned[target] = doc["route"]
    tap = models.Tap.__table__
    latest = (select(tap.c.device_id, func.max(tap.c.occurred_at).label("at"))
              .where(tap.c.operator == operator, tap.c.occurred_at >= now - ROUTE_FROM_TAPS_WINDOW)
              .group_by(tap.c.device_id).subquery())
    by_taps: dict[str, set[str]] = {}
    for device_id, tap_route in conn.execute(
            select(tap.c.device_id, tap.c.route).join(latest, and_(tap.c.device_id == latest.c.device_id,
                                                                   tap.c.occurred_at == latest.c.at))):
        by_taps.setdefault(device_id, set()).add(tap_route)
    return [d for d in devices
            if (assigned[d] == route if d in assigned else route in by_taps.get(d, ()))]


def resolve_targets(conn: Connection, operator: str, target: str, *, signing_public_key: bytes | None = None,
                    now: datetime | None = None) -> list[str]:
    """``_fleet``, a device id or ``route:<code>`` as the list of package targets (``_fleet`` or device ids)."""
    if target == topics.FLEET:
        return [target]
    if target.startswith(ROUTE_PREFIX):
        route = target[len(ROUTE_PREFIX):]
        known = conn.execute(select(models.Route.code).where(models.Route.code == route,
                                                             models.Route.operator == operator)).first()
        if known is None:
            raise PublishError(f"route {route!r} is not one of operator {operator!r}'s routes")
        devices = devices_on_route(conn, operator, route, now=now, signing_public_key=signing_public_key)
        if not devices:
            raise PublishError(f"no device of {operator!r} is on route {route!r} (by its route assignment, or "
                               f"by its taps in the last {ROUTE_FROM_TAPS_WINDOW.days} days): nothing to send to")
        return devices
    row = conn.execute(select(models.Device.operator).where(models.Device.device_id == target)).first()
    if row is None:
        raise PublishError(f"device {target!r} is not registered")
    if row.operator != operator:
        raise PublishError(f"device {target!r} belongs to operator {row.operator!r}, not {operator!r}")
    return [target]


def sells_tickets(conn: Connection, operator: str) -> bool:
    return conn.execute(select(models.Product.id).where(models.Product.operator == operator).limit(1)
                        ).first() is not None


def with_ticket_keys(conn: Connection, operator: str, body: bytes, ticket_keys, *, now: datetime | None = None
                     ) -> bytes:
    """``body`` (params JSON) with the operator's ``tickets`` section added when the operator sells tickets and the
    body has none. ``ticket_keys``: a backoffice.tickets.keys.TicketKeys, or a function returning one (called only
    when the section is added)."""
    import json

    from backoffice.tickets.orders import denied_tickets

    doc = parse_params(body)
    if "tickets" in doc or not sells_tickets(conn, operator):
        return body
    keys = ticket_keys() if callable(ticket_keys) else ticket_keys
    section = keys.validator_params(operator, denied_tickets(conn, operator, now=now)).to_dict()
    return json.dumps({**json.loads(body), "tickets": section}, ensure_ascii=False, sort_keys=True).encode("utf-8")


def publish(conn: Connection, kind: str, operator: str, target: str, version: str | int, body: bytes,
            activate_at: datetime | None = None, *, seed: bytes, now: datetime | None = None,
            ticket_keys=None) -> list[Outgoing]:
    """Sign, store and return the messages for a params or software package (see the module). Raises
    ``PublishError`` (or ``PackageError`` for a malformed package) and stores nothing when it cannot.
    ``ticket_keys`` (a TicketKeys or a function returning one): params for an operator that sells tickets carry
    its ticket keys (``with_ticket_keys``)."""
    now = now or datetime.now(UTC)
    activate_at = activate_at or now
    if kind not in KINDS:
        raise PublishError(f"package kind {kind!r} cannot be published here; use {' or '.join(KINDS)} "
                           "(deny lists are built from the card table: farebox denylist publish)")
    if activate_at.tzinfo is None:
        raise PublishError("activate_at needs a timezone (times on the wire are UTC)")
    version = str(version)
    if kind == "params":
        if not version.isdigit():
            raise PublishError(f"a params version is a decimal number (buses report it as one), not {version!r}")
        parse_params(body)  # refuse a body the buses would refuse, before anything is stored
        if ticket_keys is not None:
            body = with_ticket_keys(conn, operator, body, ticket_keys, now=now)
    _check_operator(conn, operator)
    targets = resolve_targets(conn, operator, target, signing_public_key=public_key(seed), now=now)
    pkg = models.Package.__table__
    clash = conn.execute(select(pkg.c.target).where(pkg.c.kind == kind, pkg.c.operator == operator,
                                                    pkg.c.version == version, pkg.c.target.in_(targets))).scalars()
    clash = sorted(clash)
    if clash:
        raise PublishError(f"{kind} version {version} was published to {', '.join(clash)} already: give the "
                           "new package a new version")
    if kind == "params":
        _check_params_version_rises(conn, operator, targets, int(version))
    out, rows = [], []
    sha = hashlib.sha256(body).hexdigest()
    for t in targets:
        package = Package(kind, version, t, activate_at.astimezone(UTC), body)
        payload = sign_package(package, seed)
        fleet = t == topics.FLEET
        topic = topics.fleet_topic(operator, kind) if fleet else topics.device_topic(operator, t, kind)
        out.append(Outgoing(topic, payload, fleet, t, package.describe()))
        rows.append({"kind": kind, "operator": operator, "target": t, "version": version,
                     "activate_at": activate_at, "created_at": now, "sha256": sha, "payload": payload})
    conn.execute(pkg.insert(), rows)
    return out


def _check_params_version_rises(conn: Connection, operator: str, targets: list[str], number: int) -> None:
    """A bus runs the params package with the highest number it has; a lower number would never be applied."""
    pkg = models.Package.__table__
    for t in targets:
        versions = conn.execute(select(pkg.c.version).where(
            pkg.c.kind == "params", pkg.c.operator == operator, pkg.c.target.in_([t, topics.FLEET]))).scalars()
        highest = max((int(v) for v in versions if v.isdigit()), default=None)
        if highest is not None and number <= highest:
            raise PublishError(f"params version {number} for {t} is not above version {highest}, which "
                               f"{'the fleet' if t == topics.FLEET else t} has already been sent")


def expected_versions(conn: Connection, operator: str, kind: str, *, devices: list[str] | None = None
                      ) -> dict[str, tuple[str, datetime, bool] | None]:
    """device id -> (version, activate_at, sent to the device itself) of the newest package it has been sent (its
    own or its fleet's), or None when it has been sent none; for ``devices`` (default: all the operator's)."""
    pkg = models.Package.__table__
    query = select(pkg.c.target, pkg.c.version, pkg.c.activate_at).where(pkg.c.kind == kind,
                                                                         pkg.c.operator == operator)
    if devices is not None:
        query = query.where(pkg.c.target.in_([*devices, topics.FLEET]))
    rows = conn.execute(query.order_by(pkg.c.created_at, pkg.c.id)).all()
    last: dict[str, tuple[int, str, datetime, bool]] = {}  # target -> (row order, version, activate_at, own)
    for i, (target, version, activate_at) in enumerate(rows):  # oldest first: later rows replace earlier ones
        last[target] = (i, version, utc(activate_at), target != topics.FLEET)
    fleet = last.get(topics.FLEET)
    result = {}
    for device in (_operator_devices(conn, operator) if devices is None else devices):
        # Whichever came last wins: a fleet package published after a device's own replaces it, and the other
        # way round.
        newest = max((x for x in (last.get(device), fleet) if x is not None), default=None)
        result[device] = None if newest is None else newest[1:]
    return result


@dataclasses.dataclass(frozen=True)
class DeviceProgress:
    device_id: str
    running: str | None  # None: the device never reported
    expected: str | None
    online: bool
    last_seen: datetime | None


@dataclasses.dataclass(frozen=True)
class Rollout:
    operator: str
    kind: str
    latest: str | None  # the fleet's newest version (or the current deny list)
    by_version: dict[str | None, int]  # running version -> devices (None: never reported)
    devices: list[DeviceProgress]

    @property
    def behind(self) -> list[DeviceProgress]:
        """Devices that have not reported the version they were sent (awaiting activation included)."""
        return [d for d in self.devices if d.expected is not None and d.running != d.expected]

    @property
    def done(self) -> int:
        return sum(1 for d in self.devices if d.expected is not None and d.running == d.expected)


def rollout(conn: Connection, operator: str, kind: str) -> Rollout:
    """How many of ``operator``'s devices run which version of ``kind`` (params, software or denylist), and which
    have not reported the version they should run."""
    if kind not in (*KINDS, "denylist"):
        raise PublishError(f"unknown package kind {kind!r}; farebox publishes params, software and denylist")
    _check_operator(conn, operator)
    dev, st = models.Device.__table__, models.DeviceStatus.__table__
    column = {"params": st.c.params_version, "software": st.c.software, "denylist": st.c.denylist_version}[kind]
    rows = conn.execute(select(dev.c.device_id, column.label("running"), st.c.online, st.c.last_seen)
                        .select_from(dev.outerjoin(st, st.c.device_id == dev.c.device_id))
                        .where(dev.c.operator == operator).order_by(dev.c.device_id)).all()
    if kind == "denylist":
        current = current_version(conn)
        latest = None if current is None else str(current.version)
        expected = {r.device_id: latest for r in rows}
    else:
        sent = expected_versions(conn, operator, kind)
        expected = {d: (None if v is None else v[0]) for d, v in sent.items()}
        fleet = conn.execute(select(models.Package.version).where(
            models.Package.kind == kind, models.Package.operator == operator, models.Package.target == topics.FLEET)
            .order_by(models.Package.created_at.desc(), models.Package.id.desc()).limit(1)).scalar()
        latest = fleet
    devices, by_version = [], {}
    for r in rows:
        reported = r.last_seen is not None
        # A device that never reported a software version says "" in its status: that is "unknown", not a version.
        running = None if not reported or (kind == "software" and not r.running) else str(r.running)
        devices.append(DeviceProgress(r.device_id, running, expected.get(r.device_id), bool(r.online),
                                      None if r.last_seen is None else utc(r.last_seen)))
        by_version[running] = by_version.get(running, 0) + 1
    return Rollout(operator, kind, latest, by_version, devices)

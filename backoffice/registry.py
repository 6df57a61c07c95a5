"""The registry: bus companies, their fleets, routes (stops and fares), vehicles, drivers with their driver cards,
validators, and cards. Small use cases with keyword-only arguments, run inside the caller's transaction (the caller
commits once).

History is kept. The tables ``operator``, ``route``, ``vehicle``, ``driver`` and ``device`` say how things are now;
every add or edit also opens a version (``<kind>_version``: valid_from, valid_to) and closes the one before, so
``names(conn, operator, at=...)`` gives the names a settlement of last month must print, and
``fare_table(conn, operator, version, at=...)`` the fares in force then. Retiring sets ``retired_at`` and closes the
open version; nothing is deleted. Every add, edit and retire writes an audit line (who, when, what) to
``registry_audit``.

Errors: a rule of the registry broken (a retired vehicle given a validator, a fare that is not whole fen, an edit
dated before the version it replaces) is a ``RegistryError`` saying what to do; a duplicate key is left to the
database (IntegrityError), as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, select, update

from backoffice import clearing_runs, partitions
from backoffice.models import (
    Card,
    CardTypeDiscount,
    Device,
    DeviceVersion,
    Driver,
    DriverCard,
    DriverVersion,
    Fleet,
    Operator,
    OperatorVersion,
    RegistryAudit,
    Route,
    RouteFareStage,
    RouteStop,
    RouteVersion,
    Stop,
    Vehicle,
    VehicleVersion,
)
from wire import topics

MAX_FEN = 0xFFFFFFFF  # a card's 4-byte amount field


class RegistryError(ValueError):
    """A registry rule was broken; the message says which and what to do instead."""


@dataclasses.dataclass(frozen=True)
class _Kind:
    table: type
    version: type
    key: str  # the key column, the same name in both tables
    fields: tuple[str, ...]  # the versioned columns (besides operator, valid_from, valid_to)


KINDS = {
    "operator": _Kind(Operator, OperatorVersion, "code",
                      ("name", "timezone", "cutoff_hour", "transfer_window_minutes", "transfer_discount",
                       "min_balance")),
    "route": _Kind(Route, RouteVersion, "code", ("name", "flat_fare", "max_trip_minutes")),
    "vehicle": _Kind(Vehicle, VehicleVersion, "code", ("plate",)),
    "driver": _Kind(Driver, DriverVersion, "staff_no", ("name", "card_asn")),
    "device": _Kind(Device, DeviceVersion, "device_id", ("vehicle", "terminal_id")),
}
# The columns of the "now" tables that mirror a version's fields.
_MIRRORED = {"operator": ("name", "timezone", "cutoff_hour"), "route": ("name", "flat_fare"), "vehicle": ("plate",),
             "driver": ("name", "card_asn"), "device": ("vehicle", "terminal_id")}


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _when(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    if at.tzinfo is None:
        raise RegistryError(f"time {at.isoformat()} has no time zone: registry times are UTC-aware datetimes")
    return at.astimezone(UTC)


def _fen(value, what: str, *, positive: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (1 if positive else 0) <= value <= MAX_FEN:
        low = "a positive" if positive else "a non-negative"
        raise RegistryError(f"{what} must be {low} whole number of fen, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ the machinery
def _row(conn: Connection, kind: str, key: str):
    k = KINDS[kind]
    row = conn.execute(select(k.table.__table__).where(getattr(k.table, k.key) == key)).first()
    if row is None:
        raise RegistryError(f"{kind} {key!r} is not registered")
    return row


def _live(conn: Connection, kind: str, key: str):
    row = _row(conn, kind, key)
    if row.retired_at is not None:
        raise RegistryError(f"{kind} {key!r} was retired at {_utc(row.retired_at):%Y-%m-%d %H:%M}Z: "
                            "a retired entry is kept for history and cannot be changed; register a new one")
    return row


def _operator_of(kind: str, row) -> str:
    return row.code if kind == "operator" else row.operator


def _open_version(conn: Connection, kind: str, key: str):
    k = KINDS[kind]
    v = k.version
    return conn.execute(select(v.__table__).where(getattr(v, k.key) == key, v.valid_to.is_(None))
                        .order_by(v.valid_from.desc(), v.id.desc()).limit(1)).first()


def _close(conn: Connection, kind: str, key: str, when: datetime) -> int | None:
    """Close the open version at ``when``; its id, or None when there was none (a row from before history)."""
    k = KINDS[kind]
    old = _open_version(conn, kind, key)
    if old is None:
        return None
    if when < _utc(old.valid_from):
        raise RegistryError(f"{kind} {key!r}: a change at {when.isoformat()} would come before the version in force "
                            f"since {_utc(old.valid_from).isoformat()}; date it at or after that")
    conn.execute(update(k.version).where(k.version.id == old.id).values(valid_to=when))
    return old.id


def _open(conn: Connection, kind: str, key: str, operator: str, values: dict, when: datetime) -> int:
    k = KINDS[kind]
    extra = {} if kind == "operator" else {"operator": operator}
    result = conn.execute(k.version.__table__.insert().values(
        **{k.key: key}, **extra, valid_from=when, **{f: values[f] for f in k.fields}))
    return result.inserted_primary_key[0]


def _mirror(conn: Connection, kind: str, key: str, values: dict) -> None:
    k = KINDS[kind]
    now = {f: values[f] for f in _MIRRORED[kind]}
    if kind == "route":
        now["flat_fare"] = values["flat_fare"] or 0  # the "now" table's column is NOT NULL; 0 = not a flat fare
    conn.execute(update(k.table).where(getattr(k.table, k.key) == key).values(**now))


def _audit(conn: Connection, *, by: str, operator: str, action: str, kind: str, key: str, when: datetime,
           detail: str) -> None:
    if not by or not by.strip():
        raise RegistryError("say who makes the change: by=<user name>")
    conn.execute(RegistryAudit.__table__.insert().values(
        recorded_at=datetime.now(UTC), effective_at=when, by=by, operator=operator, action=action, kind=kind,
        key=key, detail=detail[:2000]))


def _added(conn: Connection, kind: str, key: str, operator: str, values: dict, *, by: str, when: datetime) -> int:
    """History and audit for a row just inserted into the "now" table."""
    vid = _open(conn, kind, key, operator, values, when)
    shown = ", ".join(f"{f}={values[f]!r}" for f in KINDS[kind].fields if values.get(f) is not None)
    _audit(conn, by=by, operator=operator, action="add", kind=kind, key=key, when=when, detail=shown)
    return vid


def _edit(conn: Connection, kind: str, key: str, changes: dict, *, by: str, when: datetime,
          also_changed: Sequence[str] = ()) -> tuple[int, int | None] | None:
    """A new version with ``changes`` (the fields given; see _given); (new id, old id), or None when nothing
    would change."""
    row = _live(conn, kind, key)
    operator = _operator_of(kind, row)
    old = _open_version(conn, kind, key)
    base = old._mapping if old is not None else row._mapping
    values = {f: base[f] for f in KINDS[kind].fields}
    values.update(changes)
    diff = [f"{f}: {base[f]!r} -> {values[f]!r}" for f in KINDS[kind].fields if values[f] != base[f]]
    diff += list(also_changed)
    if not diff:
        return None
    old_id = _close(conn, kind, key, when)
    new_id = _open(conn, kind, key, operator, values, when)
    _mirror(conn, kind, key, values)
    _audit(conn, by=by, operator=operator, action="edit", kind=kind, key=key, when=when, detail="; ".join(diff))
    return new_id, old_id


def _given(**fields) -> dict:
    """The keyword arguments a caller gave: None means "keep as it is"."""
    return {f: v for f, v in fields.items() if v is not None}


def _retire(conn: Connection, kind: str, key: str, *, by: str, when: datetime, reason: str) -> str:
    k = KINDS[kind]
    row = _live(conn, kind, key)
    operator = _operator_of(kind, row)
    _close(conn, kind, key, when)
    conn.execute(update(k.table).where(getattr(k.table, k.key) == key).values(retired_at=when))
    _audit(conn, by=by, operator=operator, action="retire", kind=kind, key=key, when=when,
           detail=reason or "retired")
    return operator


def _live_keys(conn: Connection, kind: str, operator: str) -> list[str]:
    k = KINDS[kind]
    return list(conn.execute(select(getattr(k.table, k.key)).where(
        k.table.operator == operator, k.table.retired_at.is_(None))).scalars())


# --------------------------------------------------------------------------------------------------- operators
def _check_service_day(timezone: str | None, cutoff_hour: int | None) -> None:
    if timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # "Asia" is a folder: IsADirectoryError
            raise RegistryError(f"time zone {timezone!r} is not known: give an IANA name such as Asia/Shanghai") \
                from None
    if cutoff_hour is not None and (isinstance(cutoff_hour, bool) or not isinstance(cutoff_hour, int)
                                    or not 0 <= cutoff_hour <= 23):
        raise RegistryError(f"cut-off hour must be a whole hour 0 to 23 (local time the service day ends), "
                            f"got {cutoff_hour!r}")


def add_operator(conn: Connection, *, code: str, name: str, timezone: str = "Asia/Shanghai",
                 cutoff_hour: int = 3, by: str = "system", at: datetime | None = None) -> None:
    """A bus company: its code (in topics, tokens and reports), name, time zone and the local hour its service day
    ends (a bus out after midnight belongs to the day it started)."""
    when = _when(at)
    try:  # the code is a segment of every MQTT topic of its buses
        topics.check_segment(code, "operator code")
    except topics.TopicError as e:
        raise RegistryError(str(e)) from None
    if not name or not name.strip():
        raise RegistryError("give the operator's name")
    _check_service_day(timezone, cutoff_hour)
    if conn.execute(select(Operator.code).where(Operator.code == code)).first() is not None:
        raise RegistryError(f"operator {code!r} is registered already (farebox registry operators lists them)")
    conn.execute(Operator.__table__.insert().values(code=code, name=name, timezone=timezone,
                                                    cutoff_hour=cutoff_hour))
    _added(conn, "operator", code, code, {"name": name, "timezone": timezone, "cutoff_hour": cutoff_hour,
                                          "transfer_window_minutes": 0, "transfer_discount": 0, "min_balance": 0},
           by=by, when=when)


def edit_operator(conn: Connection, *, code: str, by: str, name: str | None = None, timezone: str | None = None,
                  cutoff_hour: int | None = None, at: datetime | None = None) -> bool:
    """Rename an operator or change its service day; False when nothing changed."""
    _check_service_day(timezone, cutoff_hour)
    frozen = partitions.day_rule_change_problem(conn, code, timezone, cutoff_hour)  # the day is in the taps' key
    if frozen:
        raise RegistryError(frozen)
    return _operator_version(conn, code=code, by=by, at=at, discounts=None,
                             changes=_given(name=name, timezone=timezone, cutoff_hour=cutoff_hour))


def set_fare_rules(conn: Connection, *, operator: str, by: str, discounts: Mapping[int, int] | None = None,
                   transfer_window_minutes: int | None = None, transfer_discount: int | None = None,
                   min_balance: int | None = None, at: datetime | None = None) -> bool:
    """The operator-wide part of its fare table: the percent of the fare each card type pays (``discounts`` replaces
    the whole set; types not listed pay 100), the transfer rule and the minimum balance to board."""
    if discounts is not None:
        for card_type, percent in discounts.items():
            if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
                raise RegistryError(f"card type {card_type} pays {percent!r} percent of the fare: must be 0 to 100")
    if transfer_window_minutes is not None and (not isinstance(transfer_window_minutes, int)
                                                or transfer_window_minutes < 0):
        raise RegistryError(f"transfer window must be whole minutes >= 0, got {transfer_window_minutes!r}")
    if transfer_discount is not None:
        _fen(transfer_discount, "transfer discount", positive=False)
    if min_balance is not None:
        _fen(min_balance, "minimum balance", positive=False)
    return _operator_version(conn, code=operator, by=by, at=at, discounts=discounts,
                             changes=_given(transfer_window_minutes=transfer_window_minutes,
                                            transfer_discount=transfer_discount, min_balance=min_balance))


def _operator_version(conn: Connection, *, code: str, by: str, at: datetime | None,
                      discounts: Mapping[int, int] | None, changes: dict) -> bool:
    when = _when(at)
    old = _open_version(conn, "operator", code)
    old_discounts = _discounts(conn, old.id) if old is not None else {}
    new_discounts = {int(k): v for k, v in discounts.items()} if discounts is not None else old_discounts
    also = [f"discounts: {old_discounts} -> {new_discounts}"] if new_discounts != old_discounts else []
    ids = _edit(conn, "operator", code, changes, by=by, when=when, also_changed=also)
    if ids is None:
        return False
    if new_discounts:
        conn.execute(CardTypeDiscount.__table__.insert(),
                     [{"operator_version_id": ids[0], "card_type": t, "percent": p}
                      for t, p in sorted(new_discounts.items())])
    return True


def _discounts(conn: Connection, operator_version_id: int) -> dict[int, int]:
    return dict(conn.execute(select(CardTypeDiscount.card_type, CardTypeDiscount.percent)
                             .where(CardTypeDiscount.operator_version_id == operator_version_id)).all())


def retire_operator(conn: Connection, *, code: str, by: str, at: datetime | None = None, reason: str = "") -> None:
    """Retire a bus company once it has nothing left running."""
    left = {kind: keys for kind in ("route", "vehicle", "driver", "device")
            if (keys := _live_keys(conn, kind, code))}
    if left:
        listed = "; ".join(f"{kind}s {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for kind, keys in left.items())
        raise RegistryError(f"operator {code!r} still has {listed}: retire them first")
    _retire(conn, "operator", code, by=by, when=_when(at), reason=reason)


def operators(conn: Connection, *, include_retired: bool = False) -> list[dict]:
    """The bus companies: code, name, timezone, cutoff_hour, retired_at, and the commission rate in force now
    (``rate_bp``, None when none is set) with the service day it applies from (``rate_from``)."""
    query = select(Operator.__table__).order_by(Operator.code)
    if not include_retired:
        query = query.where(Operator.retired_at.is_(None))
    out = []
    for r in conn.execute(query):
        rates = commission_rates(conn, operator=r.code)
        today = _service_day_now(r.timezone, r.cutoff_hour)
        now = [x for x in rates if x["valid_from"] <= today]
        out.append({"code": r.code, "name": r.name, "timezone": r.timezone, "cutoff_hour": r.cutoff_hour,
                    "retired_at": _utc(r.retired_at), "rate_bp": now[-1]["rate_bp"] if now else None,
                    "rate_from": now[-1]["valid_from"] if now else None})
    return out


def _service_day_now(tz: str, cutoff_hour: int) -> date:
    from zoneinfo import ZoneInfo

    return (datetime.now(UTC).astimezone(ZoneInfo(tz)) - timedelta(hours=cutoff_hour)).date()


# -------------------------------------------------------------------------------------- the issuer's commission
def set_commission_rate(conn: Connection, *, operator: str, rate_bp: int, valid_from: date, by: str) -> None:
    """The card issuer's commission on ``operator``'s gross from service day ``valid_from`` on, in basis points
    (60 = 0.60 %). A day cleared already keeps the rate it was cleared at (a signed-off day never changes), so the
    new rate must start after the operator's last cleared day; a rate set for the same day before is replaced."""
    from backoffice.models import ClearingRun, CommissionRate
    from clearing import commission

    try:
        commission.check_rate(rate_bp)
    except (TypeError, ValueError) as e:
        raise RegistryError(str(e)) from None
    if not isinstance(valid_from, date) or isinstance(valid_from, datetime):
        raise RegistryError(f"valid_from must be a service day (a date), got {valid_from!r}")
    _live(conn, "operator", operator)
    last = conn.execute(select(ClearingRun.service_day).where(ClearingRun.operator == operator)
                        .order_by(ClearingRun.service_day.desc()).limit(1)).scalar()
    if last is not None and valid_from <= last:
        raise RegistryError(f"operator {operator!r}: service day {last} is cleared already at the rate then in "
                            f"force; a new rate can start on {last + timedelta(days=1)} at the earliest")
    old = conn.execute(select(CommissionRate.rate_bp).where(CommissionRate.operator == operator,
                                                            CommissionRate.valid_from == valid_from)).scalar()
    if old is not None:
        conn.execute(update(CommissionRate).where(CommissionRate.operator == operator,
                                                  CommissionRate.valid_from == valid_from).values(rate_bp=rate_bp))
    else:
        clearing_runs.set_commission_rate(conn, operator=operator, rate_bp=rate_bp, valid_from=valid_from)
    detail = (f"rate {commission.percent_text(rate_bp)} ({rate_bp} bp) from service day {valid_from.isoformat()}"
              + (f", was {commission.percent_text(old)}" if old is not None else ""))
    _audit(conn, by=by, operator=operator, action="set", kind="commission", key=valid_from.isoformat(),
           when=datetime.combine(valid_from, datetime.min.time(), UTC), detail=detail)


def commission_rates(conn: Connection, *, operator: str) -> list[dict]:
    """The operator's commission rates, oldest first: valid_from (service day) and rate_bp."""
    from backoffice.models import CommissionRate

    return [{"valid_from": r.valid_from, "rate_bp": int(r.rate_bp)} for r in conn.execute(
        select(CommissionRate.valid_from, CommissionRate.rate_bp).where(CommissionRate.operator == operator)
        .order_by(CommissionRate.valid_from))]


# ------------------------------------------------------------------------------------------------------ fleets
def add_fleet(conn: Connection, *, code: str, operator: str, name: str, by: str = "system") -> None:
    """A fleet (depot, branch company) of an operator; the table is clearing's (backoffice.clearing_runs)."""
    _live(conn, "operator", operator)
    clearing_runs.add_fleet(conn, code=code, operator=operator, name=name)
    _audit(conn, by=by, operator=operator, action="add", kind="fleet", key=code, when=datetime.now(UTC),
           detail=f"name={name!r}")


def assign_fleet(conn: Connection, *, vehicle: str, fleet: str, valid_from: date, by: str) -> None:
    """Put a vehicle in a fleet from service day ``valid_from`` on; earlier days keep the fleet they had."""
    row = _live(conn, "vehicle", vehicle)
    owner = conn.execute(select(Fleet.operator).where(Fleet.code == fleet)).scalar()
    if owner is None:
        raise RegistryError(f"fleet {fleet!r} is not registered: add it with `farebox registry add-fleet`")
    if owner != row.operator:
        raise RegistryError(f"fleet {fleet!r} belongs to operator {owner!r}, vehicle {vehicle!r} to {row.operator!r}")
    clearing_runs.assign_vehicle(conn, vehicle=vehicle, fleet=fleet, valid_from=valid_from)
    _audit(conn, by=by, operator=row.operator, action="assign", kind="vehicle", key=vehicle,
           when=datetime.combine(valid_from, datetime.min.time(), UTC),
           detail=f"fleet {fleet} from service day {valid_from.isoformat()}")


# ------------------------------------------------------------------------------------------------------- stops
def set_stop(conn: Connection, *, operator: str, code: str, name: str, lat: float | None = None,
             lon: float | None = None, by: str = "system") -> bool:
    """Add a stop or change its name or position; False when it is there already as given."""
    old = conn.execute(select(Stop.name, Stop.lat, Stop.lon).where(Stop.operator == operator, Stop.code == code)
                       ).first()
    if old is not None and (old.name, old.lat, old.lon) == (name, lat, lon):
        return False
    if old is None:
        conn.execute(Stop.__table__.insert().values(operator=operator, code=code, name=name, lat=lat, lon=lon))
        detail = f"name={name!r}, lat={lat}, lon={lon}"
    else:
        conn.execute(update(Stop).where(Stop.operator == operator, Stop.code == code)
                     .values(name=name, lat=lat, lon=lon))
        detail = f"{(old.name, old.lat, old.lon)} -> {(name, lat, lon)}"
    _audit(conn, by=by, operator=operator, action="add" if old is None else "edit", kind="stop", key=code,
           when=datetime.now(UTC), detail=detail)
    return True


# ------------------------------------------------------------------------------------------------------ routes
Stops = Mapping[int, Sequence[str]] | Sequence[str]


def _stops(conn: Connection, operator: str, stops: Stops | None) -> dict[int, list[str]] | None:
    if stops is None:
        return None
    by_direction = {0: list(stops)} if not isinstance(stops, Mapping) else {int(d): list(s) for d, s in
                                                                              stops.items()}
    known = set(conn.execute(select(Stop.code).where(Stop.operator == operator)).scalars())
    for direction, codes in by_direction.items():
        if direction not in (0, 1):
            raise RegistryError(f"direction {direction}: a route runs in direction 0 (outbound) or 1 (inbound)")
        missing = sorted(set(codes) - known)
        if missing:
            raise RegistryError(f"stops {', '.join(missing)} are not registered for operator {operator!r}: "
                                "add them with set_stop (or import the GTFS feed)")
    return {d: s for d, s in sorted(by_direction.items()) if s}


def _stages(stages: Iterable[tuple[int, int]] | None, route: str) -> list[tuple[int, int]] | None:
    if stages is None:
        return None
    out = [(int(u), _fen(f, f"stage fare of route {route!r}")) for u, f in stages]
    ups = [u for u, _ in out]
    if not out or ups != sorted(set(ups)) or ups[0] < 0:
        raise RegistryError(f"route {route!r}: distance stages must be (up to stops, fare) going up in stops, "
                            f"got {ups}")
    return out


def _route_children(conn: Connection, version_id: int) -> tuple[list[tuple[int, int]], dict[int, list[str]]]:
    stages = [(r.up_to_stops, r.fare) for r in conn.execute(
        select(RouteFareStage.up_to_stops, RouteFareStage.fare)
        .where(RouteFareStage.route_version_id == version_id).order_by(RouteFareStage.up_to_stops))]
    stops: dict[int, list[str]] = {}
    for r in conn.execute(select(RouteStop.direction, RouteStop.stop).where(RouteStop.route_version_id == version_id)
                          .order_by(RouteStop.direction, RouteStop.seq)):
        stops.setdefault(r.direction, []).append(r.stop)
    return stages, stops


def _write_route_children(conn: Connection, version_id: int, stages: list[tuple[int, int]],
                          stops: dict[int, list[str]]) -> None:
    if stages:
        conn.execute(RouteFareStage.__table__.insert(),
                     [{"route_version_id": version_id, "up_to_stops": u, "fare": f} for u, f in stages])
    rows = [{"route_version_id": version_id, "direction": d, "seq": i, "stop": s}
            for d, codes in stops.items() for i, s in enumerate(codes)]
    if rows:
        conn.execute(RouteStop.__table__.insert(), rows)


def add_route(conn: Connection, *, code: str, operator: str, name: str, flat_fare: int | None = None,
              stages: Sequence[tuple[int, int]] | None = None, max_trip_minutes: int = 180,
              stops: Stops | None = None, by: str = "system", at: datetime | None = None) -> None:
    """A route with a flat fare (fen), or distance ``stages`` [(up to stops, fare fen), ...], or (from a GTFS
    import) no fare yet: such a route is left out of fare_table() until it gets one. ``stops``: the stop codes in
    riding order, one list or {direction: list}."""
    when = _when(at)
    if flat_fare is not None and stages is not None:
        raise RegistryError(f"route {code}: give a flat fare or distance stages, not both")
    if flat_fare is not None:
        _fen(flat_fare, f"route {code}: the flat fare")
    stage_list = _stages(stages, code) or []
    stop_lists = _stops(conn, operator, stops) or {}
    _live(conn, "operator", operator)
    conn.execute(Route.__table__.insert().values(code=code, operator=operator, name=name, flat_fare=flat_fare or 0))
    vid = _added(conn, "route", code, operator,
                 {"name": name, "flat_fare": flat_fare, "max_trip_minutes": max_trip_minutes}, by=by, when=when)
    _write_route_children(conn, vid, stage_list, stop_lists)


def edit_route(conn: Connection, *, code: str, by: str, name: str | None = None, flat_fare: int | None = None,
               stages: Sequence[tuple[int, int]] | None = None, max_trip_minutes: int | None = None,
               stops: Stops | None = None, at: datetime | None = None) -> bool:
    """Change a route from ``at`` (default now); what is not given stays. A flat fare replaces distance stages and
    stages replace a flat fare. False when nothing changed."""
    when = _when(at)
    if flat_fare is not None and stages is not None:
        raise RegistryError(f"route {code}: give a flat fare or distance stages, not both")
    row = _live(conn, "route", code)
    old = _open_version(conn, "route", code)
    old_stages, old_stops = _route_children(conn, old.id) if old is not None else ([], {})
    new_stages = _stages(stages, code) if stages is not None else ([] if flat_fare is not None else old_stages)
    new_stops = _stops(conn, row.operator, stops) if stops is not None else old_stops
    changes = _given(name=name, max_trip_minutes=max_trip_minutes)
    if flat_fare is not None:
        changes["flat_fare"] = _fen(flat_fare, f"route {code}: the flat fare")
    elif stages is not None:
        changes["flat_fare"] = None  # distance stages replace a flat fare
    also = []
    if new_stages != old_stages:
        also.append(f"stages: {old_stages} -> {new_stages}")
    if new_stops != old_stops:
        also.append("stops: " + "; ".join(f"direction {d}: {len(old_stops.get(d, []))} -> {len(new_stops.get(d, []))}"
                                          f" stops" for d in sorted(set(old_stops) | set(new_stops))))
    ids = _edit(conn, "route", code, changes, by=by, when=when, also_changed=also)
    if ids is None:
        return False
    _write_route_children(conn, ids[0], new_stages, new_stops)
    return True


def retire_route(conn: Connection, *, code: str, by: str, at: datetime | None = None, reason: str = "") -> None:
    """Take a route out of service: it leaves the fare table; its names stay for the reports of its days."""
    _retire(conn, "route", code, by=by, when=_when(at), reason=reason)


def route_stops(conn: Connection, *, route: str, at: datetime | None = None) -> dict[int, list[str]]:
    """The route's stop codes in riding order per direction, as they were at ``at`` (default now)."""
    version = _version_at(conn, "route", route, _when(at))
    return _route_children(conn, version.id)[1] if version is not None else {}


# ---------------------------------------------------------------------------------------------------- vehicles
def add_vehicle(conn: Connection, *, code: str, operator: str, plate: str, by: str = "system",
                at: datetime | None = None) -> None:
    when = _when(at)
    _live(conn, "operator", operator)
    conn.execute(Vehicle.__table__.insert().values(code=code, operator=operator, plate=plate))
    _added(conn, "vehicle", code, operator, {"plate": plate}, by=by, when=when)


def edit_vehicle(conn: Connection, *, code: str, by: str, plate: str | None = None,
                 at: datetime | None = None) -> bool:
    return _edit(conn, "vehicle", code, _given(plate=plate), by=by, when=_when(at)) is not None


def retire_vehicle(conn: Connection, *, code: str, by: str, at: datetime | None = None, reason: str = "") -> None:
    """Take a vehicle out of service. Its validators must be moved or retired first (a validator must not keep
    sending taps for a bus that no longer runs)."""
    row = _live(conn, "vehicle", code)
    mounted = [d for d in _live_keys(conn, "device", row.operator)
               if _row(conn, "device", d).vehicle == code]
    if mounted:
        raise RegistryError(f"vehicle {code!r} still carries validators {', '.join(mounted)}: move them with "
                            "move_device or retire them first")
    _retire(conn, "vehicle", code, by=by, when=_when(at), reason=reason)


# ----------------------------------------------------------------------------------------------------- drivers
def add_driver(conn: Connection, *, staff_no: str, operator: str, name: str, card_asn: str, by: str = "system",
               at: datetime | None = None) -> None:
    when = _when(at)
    _live(conn, "operator", operator)
    conn.execute(Driver.__table__.insert().values(staff_no=staff_no, operator=operator, name=name,
                                                  card_asn=card_asn))
    conn.execute(DriverCard.__table__.insert().values(asn=card_asn, staff_no=staff_no, issued_at=when))
    _added(conn, "driver", staff_no, operator, {"name": name, "card_asn": card_asn}, by=by, when=when)


def edit_driver(conn: Connection, *, staff_no: str, by: str, name: str | None = None, card_asn: str | None = None,
                at: datetime | None = None) -> bool:
    """Rename a driver or give them a new driver card (the old card is marked withdrawn)."""
    when = _when(at)
    old_card = _live(conn, "driver", staff_no).card_asn
    ids = _edit(conn, "driver", staff_no, _given(name=name, card_asn=card_asn), by=by, when=when)
    if ids is not None and card_asn is not None and card_asn != old_card:
        _withdraw_card(conn, old_card, when, f"replaced by {card_asn}")
        conn.execute(DriverCard.__table__.insert().values(asn=card_asn, staff_no=staff_no, issued_at=when))
    return ids is not None


def retire_driver(conn: Connection, *, staff_no: str, by: str, at: datetime | None = None,
                  reason: str = "") -> None:
    """A driver leaves: their card is marked withdrawn (the deny-list publisher takes it from driver_card)."""
    when = _when(at)
    card = _live(conn, "driver", staff_no).card_asn
    _retire(conn, "driver", staff_no, by=by, when=when, reason=reason)
    _withdraw_card(conn, card, when, "driver retired")


def _withdraw_card(conn: Connection, asn: str, when: datetime, reason: str) -> None:
    conn.execute(update(DriverCard).where(DriverCard.asn == asn, DriverCard.withdrawn_at.is_(None))
                 .values(withdrawn_at=when, reason=reason))


def withdrawn_driver_cards(conn: Connection, operator: str | None = None) -> list[dict]:
    """Driver cards no longer valid (replaced, driver retired): asn, staff_no, withdrawn_at, reason."""
    query = (select(DriverCard.asn, DriverCard.staff_no, DriverCard.withdrawn_at, DriverCard.reason)
             .where(DriverCard.withdrawn_at.is_not(None)).order_by(DriverCard.withdrawn_at, DriverCard.asn))
    if operator is not None:
        query = query.join(Driver, Driver.staff_no == DriverCard.staff_no).where(Driver.operator == operator)
    return [{**r._mapping, "withdrawn_at": _utc(r.withdrawn_at)} for r in conn.execute(query)]


# ---------------------------------------------------------------------------------------------------- validators
def _check_vehicle(conn: Connection, vehicle: str | None, operator: str, device_id: str) -> None:
    if vehicle is None:
        return
    row = conn.execute(select(Vehicle.operator, Vehicle.retired_at).where(Vehicle.code == vehicle)).first()
    if row is None:
        return  # the database refuses an unknown vehicle (IntegrityError), as `farebox device add` expects
    if row.retired_at is not None:
        raise RegistryError(f"vehicle {vehicle!r} is retired: validator {device_id} cannot be mounted in it")
    if row.operator != operator:
        raise RegistryError(f"vehicle {vehicle!r} belongs to operator {row.operator!r}, not {operator!r}")


def add_device(conn: Connection, *, device_id: str, operator: str, vehicle: str | None, terminal_id: str,
               by: str = "system", at: datetime | None = None) -> None:
    # The id becomes a topic segment, the device's broker login and its client id: one rule for every entry point
    try:
        topics.check_device_id(device_id)
    except topics.DeviceIdError as e:
        raise RegistryError(str(e)) from None
    when = _when(at)
    _check_vehicle(conn, vehicle, operator, device_id)
    conn.execute(Device.__table__.insert().values(device_id=device_id, operator=operator, vehicle=vehicle,
                                                  terminal_id=terminal_id))
    _added(conn, "device", device_id, operator, {"vehicle": vehicle, "terminal_id": terminal_id}, by=by, when=when)


def move_device(conn: Connection, *, device_id: str, vehicle: str | None, by: str,
                at: datetime | None = None) -> bool:
    """Mount a validator in another vehicle (None: taken out, in the workshop)."""
    when = _when(at)
    row = _live(conn, "device", device_id)
    _check_vehicle(conn, vehicle, row.operator, device_id)
    return _edit(conn, "device", device_id, {"vehicle": vehicle}, by=by, when=when) is not None


def edit_device(conn: Connection, *, device_id: str, by: str, terminal_id: str | None = None,
                at: datetime | None = None) -> bool:
    """A new PSAM in the validator."""
    return _edit(conn, "device", device_id, _given(terminal_id=terminal_id), by=by, when=_when(at)) is not None


def retire_device(conn: Connection, *, device_id: str, by: str, at: datetime | None = None, reason: str = "") -> None:
    _retire(conn, "device", device_id, by=by, when=_when(at), reason=reason)


# ------------------------------------------------------------------------------------------------------- cards
def add_cards(conn: Connection, cards: list[dict]) -> None:
    """Cards as issued: dicts with asn, card_type and optionally status."""
    if cards:
        conn.execute(Card.__table__.insert(), [{"status": "active", **c} for c in cards])


# ---------------------------------------------------------------------------------------------------- reading
def _version_at(conn: Connection, kind: str, key: str, when: datetime):
    """The version in force at ``when``; after retirement the last one, before the first one the first one."""
    k = KINDS[kind]
    v = k.version
    rows = conn.execute(select(v.__table__).where(getattr(v, k.key) == key).order_by(v.valid_from, v.id)).all()
    chosen = None
    for r in rows:
        if chosen is None or _utc(r.valid_from) <= when:
            chosen = r
    return chosen


def names(conn: Connection, operator: str, at: datetime | None = None) -> dict[str, dict[str, str]]:
    """Display names for reports: route code -> name, vehicle code -> plate, staff number -> driver name, as they
    were at ``at`` (default now). Retired entries keep their last name; an entry registered after ``at`` (taps came
    before the clerk typed it in) gets its first."""
    when = _when(at)
    out: dict[str, dict[str, str]] = {}
    for kind, field in (("route", "name"), ("vehicle", "plate"), ("driver", "name")):
        k = KINDS[kind]
        key_col = getattr(k.table, k.key)
        # Rows from before history (none once the migration ran, but cheap to honour) keep their current name.
        chosen = dict(conn.execute(select(key_col, getattr(k.table, field)).where(k.table.operator == operator)).all())
        key_v = getattr(k.version, k.key)
        first_seen: set[str] = set()
        for r in conn.execute(select(key_v, k.version.valid_from, getattr(k.version, field))
                              .where(k.version.operator == operator).order_by(key_v, k.version.valid_from,
                                                                              k.version.id)):
            if r[0] not in first_seen or _utc(r[1]) <= when:
                chosen[r[0]] = r[2]
                first_seen.add(r[0])
        out[kind] = chosen
    return out


def _in_force(version, when: datetime):
    return (version.valid_from <= when) & (version.valid_to.is_(None) | (version.valid_to > when))


def fare_table(conn: Connection, operator: str, version: int, *, at: datetime | None = None) -> dict:
    """The operator's fare table in force at ``at`` (default now), as its parameter file: the dict that
    ``validator.fares.FareTable.from_dict`` reads (the back office does not import the validator; this is what it
    publishes). Routes retired, not yet registered, or without a fare at ``at`` are not in it."""
    when = _when(at)
    ov = conn.execute(select(OperatorVersion.__table__).where(OperatorVersion.code == operator,
                                                             _in_force(OperatorVersion, when))
                      .order_by(OperatorVersion.valid_from.desc(), OperatorVersion.id.desc()).limit(1)).first()
    if ov is None:
        raise RegistryError(f"operator {operator!r} was not registered (or was retired) at {when.isoformat()}")
    flat: dict[str, int] = {}
    distance: dict[str, dict] = {}
    stops: dict[str, list[list]] = {}
    places = {r.code: (r.lat, r.lon) for r in conn.execute(select(Stop.code, Stop.lat, Stop.lon)
                                                           .where(Stop.operator == operator))}
    for rv in conn.execute(select(RouteVersion.__table__).where(RouteVersion.operator == operator,
                                                               _in_force(RouteVersion, when))
                           .order_by(RouteVersion.code)):
        stages, route_stops = _route_children(conn, rv.id)
        if stages:
            distance[rv.code] = {"stages": [[u, f] for u, f in stages], "max_trip_minutes": rv.max_trip_minutes}
        elif rv.flat_fare:
            flat[rv.code] = rv.flat_fare
        else:
            continue
        located = _located_stops(route_stops, places)
        if located:
            stops[rv.code] = located
    return {"version": version, "flat": flat, "distance": distance,
            "discounts": {str(t): p for t, p in sorted(_discounts(conn, ov.id).items())},
            "transfer": {"window_minutes": ov.transfer_window_minutes, "discount": ov.transfer_discount},
            "min_balance": ov.min_balance, **({"stops": stops} if stops else {})}


def _located_stops(route_stops: dict[int, list[str]], places: dict[str, tuple]) -> list[list]:
    """[stop number, lat, lon] for the stops of the route's first direction (GTFS direction 0) that have
    coordinates: the number is the stop's place in riding order, what a distance fare counts and what the bus's GPS
    is snapped to (validator/gps.py). Riding the other way the same stops count down, so the stops ridden come out
    the same. A stop with no coordinates is left out (the driver's stop button covers it); a stop beyond the 256th
    cannot be told on the card (one byte) and is left out too."""
    if not route_stops:
        return []
    out = []
    for number, code in enumerate(route_stops[min(route_stops)]):
        lat, lon = places.get(code, (None, None))
        if lat is not None and lon is not None and number <= 0xFF:
            out.append([number, lat, lon])
    return out


def history(conn: Connection, *, kind: str, key: str) -> list[dict]:
    """Every version of one entry, oldest first, with valid_from / valid_to (UTC; valid_to None = in force)."""
    k = KINDS[kind]
    v = k.version
    rows = conn.execute(select(v.__table__).where(getattr(v, k.key) == key).order_by(v.valid_from, v.id))
    return [{**r._mapping, "valid_from": _utc(r.valid_from), "valid_to": _utc(r.valid_to)} for r in rows]


def audit_lines(conn: Connection, *, operator: str, kind: str | None = None, key: str | None = None) -> list[dict]:
    """The registry's audit lines of an operator, oldest first (optionally of one kind / one entry)."""
    query = select(RegistryAudit.__table__).where(RegistryAudit.operator == operator)
    if kind is not None:
        query = query.where(RegistryAudit.kind == kind)
    if key is not None:
        query = query.where(RegistryAudit.key == key)
    return [{**r._mapping, "recorded_at": _utc(r.recorded_at), "effective_at": _utc(r.effective_at)}
            for r in conn.execute(query.order_by(RegistryAudit.id))]

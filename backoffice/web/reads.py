"""The back office's read use cases that the API and pages need and no domain module has yet: registry lists, one
operator's taps of a service day, the quarantine, a card with its records, the dashboard's figures.

Keyword-only functions run inside the caller's connection, like backoffice.registry; ``operator=None`` means every
operator (the caller decides who may ask for that, see backoffice.web.auth.Principal.scope). When the cards work
(backoffice/cards/) lands, ``card`` belongs there, with the ledger and cases.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
from sqlalchemy import Connection, func, select

from backoffice.devices import DEFAULT_STALE_AFTER, fleet_status
from backoffice.models import Card, Device, Driver, Operator, Quarantine, Route, Tap, Vehicle
from clearing.service_day import day_bounds, service_day

# kind -> (table, key column); every registry table has an ``operator`` column but the operator table itself
REGISTRY = {
    "operators": (Operator, "code"),
    "routes": (Route, "code"),
    "vehicles": (Vehicle, "code"),
    "drivers": (Driver, "staff_no"),
    "devices": (Device, "device_id"),
}
TAP_FIELDS = ("id", "device_id", "device_seq", "kind", "occurred_at", "received_at", "operator", "route", "vehicle",
              "driver", "shift_no", "card_asn", "card_type", "card_ttc", "amount", "balance_after", "terminal_id",
              "terminal_seq", "tac", "reason", "full_fare")


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands timezone-aware columns back naive; they were stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _plain(row) -> dict:
    return {k: utc(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}


def _operator_column(table):
    return table.code if table is Operator else table.operator


def registry_list(conn: Connection, *, kind: str, operator: str | None = None) -> list[dict]:
    table, key = REGISTRY[kind]
    query = select(table.__table__).order_by(getattr(table, key))
    if operator is not None:
        query = query.where(_operator_column(table) == operator)
    return [_plain(r) for r in conn.execute(query)]


def registry_item(conn: Connection, *, kind: str, key: str, operator: str | None = None) -> dict | None:
    """One registry row by its key; None when it does not exist or belongs to another operator than ``operator``."""
    table, key_name = REGISTRY[kind]
    query = select(table.__table__).where(getattr(table, key_name) == key)
    if operator is not None:
        query = query.where(_operator_column(table) == operator)
    row = conn.execute(query).first()
    return None if row is None else _plain(row)


def operator_day(conn: Connection, *, operator: str) -> tuple[str, str, int] | None:
    """(name, time zone, cut-off hour) of an operator, None when it is not registered."""
    row = conn.execute(select(Operator.name, Operator.timezone, Operator.cutoff_hour)
                       .where(Operator.code == operator)).first()
    return None if row is None else (row.name, row.timezone, row.cutoff_hour)


def taps_of_day(conn: Connection, *, operator: str, day: date, tz: str, cutoff_hour: int, limit: int = 100,
                offset: int = 0, kind: str | None = None) -> tuple[list[dict], int]:
    """One page of an operator's records of a service day, in the order they happened, and how many there are."""
    start, end = day_bounds(day, tz, cutoff_hour)
    where = [Tap.operator == operator, Tap.occurred_at >= start, Tap.occurred_at < end]
    if kind is not None:
        where.append(Tap.kind == kind)
    total = conn.execute(select(func.count()).select_from(Tap).where(*where)).scalar_one()
    rows = conn.execute(select(*[getattr(Tap, f) for f in TAP_FIELDS]).where(*where)
                        .order_by(Tap.occurred_at, Tap.id).limit(limit).offset(offset))
    return [_plain(r) for r in rows], total


def _quarantine_where(operator: str | None) -> list:
    # By the registered device, not the topic: a topic is what the sender claims, the device table is ours. Records
    # from devices nobody registered are seen by operations and admins only.
    if operator is None:
        return []
    return [Quarantine.device_id.in_(select(Device.device_id).where(Device.operator == operator))]


def quarantine(conn: Connection, *, operator: str | None = None, limit: int = 100,
               offset: int = 0) -> tuple[list[dict], int]:
    """What ingest could not accept, newest first (without the raw payload, only its size), and the count."""
    where = _quarantine_where(operator)
    total = conn.execute(select(func.count()).select_from(Quarantine).where(*where)).scalar_one()
    rows = conn.execute(select(Quarantine.id, Quarantine.received_at, Quarantine.topic, Quarantine.device_id,
                               Quarantine.device_seq, Quarantine.reason, Quarantine.status,
                               Quarantine.recheck_reason, func.length(Quarantine.payload).label("payload_bytes"))
                        .where(*where).order_by(Quarantine.id.desc()).limit(limit).offset(offset))
    return [_plain(r) for r in rows], total


def card(conn: Connection, *, asn: str, limit: int = 50, named: bool = False) -> dict | None:
    """A card as issued (may be missing: a card of another issuer still rides) with its newest records (``named``:
    each with its route's name, bus plate and operator's zone, ``_name_records``, for the page); the balance is the
    one the card reported in its latest purchase. None when farebox knows nothing of it."""
    asn = asn.strip().lower()
    issued = conn.execute(select(Card.asn, Card.card_type, Card.status).where(Card.asn == asn)).first()
    rows = [_plain(r) for r in conn.execute(
        select(*[getattr(Tap, f) for f in TAP_FIELDS]).where(Tap.card_asn == asn)
        .order_by(Tap.occurred_at.desc(), Tap.card_ttc.desc(), Tap.id.desc()).limit(limit))]
    if issued is None and not rows:
        return None
    total = conn.execute(select(func.count()).select_from(Tap).where(Tap.card_asn == asn)).scalar_one()
    if named:  # the page's rows; the API's stay as stored
        _name_records(conn, rows)
    latest = next((r for r in rows if r["kind"] == "purchase"), None)
    return {"asn": asn, "issued": issued is not None,
            "card_type": issued.card_type if issued else (rows[0]["card_type"] if rows else None),
            "status": issued.status if issued else "unknown",
            "balance": None if latest is None else latest["balance_after"],
            "balance_at": None if latest is None else latest["occurred_at"],
            "records": rows, "records_total": total}


def _name_records(conn: Connection, rows: list[dict]) -> None:
    """Give each record what a person reads: its bus company's, route's names and its bus's plate (the registry's
    current ones; the codes, which may carry a run tag, stay in ``operator``/``route``/``vehicle``) and its
    operator's zone (``tz``), in which its time is shown."""
    def lookup(column_key, *columns, keys):
        keys = sorted({k for k in keys if k})
        if not keys:
            return {}
        return {r[0]: r[1] for r in conn.execute(select(*columns).where(column_key.in_(keys)))}

    routes = lookup(Route.code, Route.code, Route.name, keys=(r["route"] for r in rows))
    plates = lookup(Vehicle.code, Vehicle.code, Vehicle.plate, keys=(r["vehicle"] for r in rows))
    zones = lookup(Operator.code, Operator.code, Operator.timezone, keys=(r["operator"] for r in rows))
    names = lookup(Operator.code, Operator.code, Operator.name, keys=(r["operator"] for r in rows))
    for r in rows:
        r["route_name"] = routes.get(r["route"])
        r["plate"] = plates.get(r["vehicle"])
        r["tz"] = zones.get(r["operator"])
        r["operator_name"] = names.get(r["operator"])


def day_state(day: date, *, now: datetime, tz: str, cutoff_hour: int) -> str:
    """``future`` (not started), ``running`` (now is in it) or ``ended``: what a page says of a service day."""
    start, end = day_bounds(day, tz, cutoff_hour)
    return "future" if now < start else "running" if now < end else "ended"


def dashboard(conn: Connection, *, operator: str, now: datetime,
              stale_after: timedelta = DEFAULT_STALE_AFTER, day: date | None = None) -> dict | None:
    """An operator's service day at a glance: fares and revenue as settlement counts them (the stored clearing run
    when the day has one, else provisional figures from the stored taps), validators offline / stale / never
    heard, and the quarantine count. ``day`` None: the latest service day with any record (up to today), so that
    the morning after a quiet night does not open on an empty today. None when the operator is unknown."""
    from backoffice.settle import settle
    from backoffice.taps_browser import latest_day_with_data

    info = operator_day(conn, operator=operator)
    if info is None:
        return None
    name, tz, cutoff = info
    today = current_service_day(now, tz=tz, cutoff_hour=cutoff)
    latest = latest_day_with_data(conn, operator=operator, tz=tz, cutoff_hour=cutoff, now=now)
    if day is None:
        day = latest or today
    state = day_state(day, now=now, tz=tz, cutoff_hour=cutoff)
    records = 0
    result = None
    if state != "future":
        start, end = day_bounds(day, tz, cutoff)
        records = conn.execute(select(func.count()).select_from(Tap).where(
            Tap.operator == operator, Tap.occurred_at >= start, Tap.occurred_at < end)).scalar_one()
        result = settle(conn, operator=operator, day=day, now=now, close_day=False)  # reading never clears
    fleet = fleet_status(conn, operator, now, stale_after=stale_after)
    quarantined = conn.execute(select(func.count()).select_from(Quarantine)
                               .where(*_quarantine_where(operator))).scalar_one()
    return {"operator": operator, "name": name, "day": day, "today": today, "latest": latest, "state": state,
            "tz": tz, "records": records, "fares": result.settlement.taps if result else 0,
            "revenue": result.settlement.amount if result else 0,
            "run": None if result is None or result.run is None else result.run.id,
            "devices": len(fleet),
            "online": sum(r.online is True for r in fleet), "offline": sum(r.online is False for r in fleet),
            "never_heard": sum(r.online is None for r in fleet), "stale": sum(r.stale for r in fleet),
            "quarantined": quarantined}


def current_service_day(now: datetime, *, tz: str, cutoff_hour: int) -> date:
    """The service day ``now`` belongs to, by the same rule settlement uses."""
    return service_day(pd.Series([pd.Timestamp(now).tz_convert("UTC")]), tz, cutoff_hour).iloc[0]

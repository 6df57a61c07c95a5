"""Registry writes: add, edit and retire routes, vehicles, drivers and validators, and each entry's history; a new
bus company and the card issuer's commission on its fares (admin only: ``POST /operators``,
``POST /operators/{operator}/commission-rates``; the rates are read by clerks for their own company and operations);
its fleets (``POST /fleets``) and fare rules (``POST /operators/{operator}/fare-rules``), clerks for their own company.

Each view turns its request into one call of a ``backoffice.registry`` use case, signed with the token holder's
name (``by=``) and dated by the app's clock unless the body gives ``at``. A clerk writes their own operator's
entries only: another operator's entry is "not found" (404), as for reads. A registry rule broken
(``RegistryError``: a retired vehicle given a validator, a fare that is not whole fen, a vehicle that still carries
validators) is answered 409 with the registry's own words; a code taken already is 409 too. The pages
(backoffice.web.pages_registry) call the same functions.
"""

# No ``from __future__ import annotations``: the views are made in a loop and FastAPI must see each one's
# body model as a class, not as the name of a closure variable it cannot resolve.
import contextlib
from collections.abc import Iterator
from datetime import date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from backoffice import registry
from backoffice.web import reads
from backoffice.web.api.types import (
    Code,
    CutoffHour,
    DeviceId,
    Fen,
    FenOrZero,
    Name,
    OperatorCode,
    Plate,
    RateBp,
    Reason,
    ServiceDay,
    StopCode,
    Text,
)
from backoffice.web.deps import Services, connection, scoped, services
from backoffice.web.auth import Principal, owned_by
from wire.topics import DEVICE_ID_RULE

router = APIRouter(tags=["registry"])
OWNERS = ("clerk", "operations")
Kind = Literal["routes", "vehicles", "drivers", "devices"]
# page/API kind -> (registry kind, key field in the "now" table)
KINDS = {"routes": ("route", "code"), "vehicles": ("vehicle", "code"), "drivers": ("driver", "staff_no"),
         "devices": ("device", "device_id")}
When = Annotated[datetime | None, Field(description="effective from (UTC); default: now")]
Stages = Annotated[list[tuple[Annotated[int, Field(ge=0, le=10_000)], Fen]] | None,
                   Field(max_length=100, description="[[up to stops, fare fen], ...]")]
Stops = Annotated[dict[Annotated[int, Field(ge=0, le=1)], Annotated[list[StopCode], Field(max_length=500)]] | None,
                  Field(description="{direction 0|1: [stop codes in order]}")]


class RegistryRefused(Exception):
    """A write the registry or the database refused; ``status`` and the words for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def writing(svc: Services) -> Iterator[Connection]:
    """One transaction for one write: committed when the use case stood, rolled back on any refusal."""
    with svc.engine.connect() as conn:
        trans = conn.begin()
        try:
            yield conn
        except registry.RegistryError as e:
            trans.rollback()
            raise RegistryRefused(409, str(e)) from None
        except IntegrityError as e:
            trans.rollback()
            # a code taken already, or a reference to something that does not exist: say which, not the SQL
            raise RegistryRefused(409, "refused by the database: the code is taken already or names something "
                                       f"that is not registered ({type(e.orig).__name__})") from None
        except BaseException:
            trans.rollback()
            raise
        trans.commit()


def _http(e: RegistryRefused) -> HTTPException:
    return HTTPException(e.status, {"reason": "registry_refused", "message": str(e)})


# ------------------------------------------------------------------------------------------------ bodies
class RouteIn(BaseModel):
    operator: Annotated[OperatorCode | None, Field(description="default: a clerk's own operator")] = None
    code: Code
    name: Name
    flat_fare: Fen | None = None
    stages: Stages = None
    stops: Stops = None
    at: When = None


class RouteEdit(BaseModel):
    name: Name | None = None
    flat_fare: Fen | None = None
    stages: Stages = None
    stops: Stops = None
    at: When = None


class VehicleIn(BaseModel):
    operator: OperatorCode | None = None
    code: Code
    plate: Plate
    fleet: Annotated[Code | None, Field(description="put it in this fleet from the current service day")] = None
    at: When = None


class VehicleEdit(BaseModel):
    plate: Plate | None = None
    fleet: Code | None = None
    fleet_from: Annotated[date | None, Field(description="service day the fleet applies from; default today")] = None
    at: When = None


class DriverIn(BaseModel):
    operator: OperatorCode | None = None
    staff_no: Code
    name: Name
    card_asn: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{20}$", description="the driver card's ASN, 20 hex")]
    at: When = None


class DriverEdit(BaseModel):
    name: Name | None = None
    card_asn: Annotated[str | None, Field(pattern=r"^[0-9a-fA-F]{20}$")] = None
    at: When = None


class DeviceIn(BaseModel):
    operator: OperatorCode | None = None
    device_id: Annotated[DeviceId, Field(description=f"the validator's id: {DEVICE_ID_RULE}")]
    vehicle: Code | None = None
    terminal_id: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{12}$", description="the PSAM's terminal number")]
    at: When = None


class DeviceEdit(BaseModel):
    vehicle: Annotated[Code | None, Field(description="mount it in this vehicle; null: taken out")] = None
    terminal_id: Annotated[str | None, Field(pattern=r"^[0-9a-fA-F]{12}$")] = None
    at: When = None


class Retire(BaseModel):
    reason: Reason = ""
    at: When = None


BODIES = {"routes": (RouteIn, RouteEdit), "vehicles": (VehicleIn, VehicleEdit), "drivers": (DriverIn, DriverEdit),
          "devices": (DeviceIn, DeviceEdit)}


# ------------------------------------------------------------------------------------------------ use cases
def owner_of(conn: Connection, who: Principal, kind: str, key: str) -> str:
    """The operator of an entry the caller may change; 404 for one that does not exist or is another's."""
    item = reads.registry_item(conn, kind=kind, key=key, operator=who.scope(None))
    if item is None:
        raise HTTPException(404, f"{KINDS[kind][0]} {key!r} not found")
    return item["operator"]


def _today(conn: Connection, operator: str, now: datetime) -> date:
    _name, tz, cutoff = reads.operator_day(conn, operator=operator)
    return reads.current_service_day(now, tz=tz, cutoff_hour=cutoff)


def add(conn: Connection, *, who: Principal, kind: str, body: BaseModel, now: datetime) -> str:
    """Register a new entry; its key."""
    operator = scoped(who, body.operator) or who.operator
    if operator is None or reads.operator_day(conn, operator=operator) is None:
        raise HTTPException(404 if operator else 422, f"operator {operator!r} not found" if operator
                            else "say which operator the entry belongs to (operator)")
    at = body.at or now
    if kind == "routes":
        registry.add_route(conn, code=body.code, operator=operator, name=body.name, flat_fare=body.flat_fare,
                           stages=body.stages, stops=body.stops, by=who.name, at=at)
        return body.code
    if kind == "vehicles":
        registry.add_vehicle(conn, code=body.code, operator=operator, plate=body.plate, by=who.name, at=at)
        if body.fleet:
            registry.assign_fleet(conn, vehicle=body.code, fleet=body.fleet, by=who.name,
                                  valid_from=_today(conn, operator, at))
        return body.code
    if kind == "drivers":
        registry.add_driver(conn, staff_no=body.staff_no, operator=operator, name=body.name,
                            card_asn=body.card_asn.lower(), by=who.name, at=at)
        return body.staff_no
    registry.add_device(conn, device_id=body.device_id, operator=operator, vehicle=body.vehicle or None,
                        terminal_id=body.terminal_id.lower(), by=who.name, at=at)
    return body.device_id


def edit(conn: Connection, *, who: Principal, kind: str, key: str, body: BaseModel, now: datetime) -> bool:
    """Change an entry from ``at`` (default now); False when nothing changed."""
    operator = owner_of(conn, who, kind, key)
    at = body.at or now
    if kind == "routes":
        return registry.edit_route(conn, code=key, by=who.name, name=body.name, flat_fare=body.flat_fare,
                                   stages=body.stages, stops=body.stops, at=at)
    if kind == "vehicles":
        changed = registry.edit_vehicle(conn, code=key, by=who.name, plate=body.plate, at=at)
        if body.fleet:
            registry.assign_fleet(conn, vehicle=key, fleet=body.fleet, by=who.name,
                                  valid_from=body.fleet_from or _today(conn, operator, at))
            changed = True
        return changed
    if kind == "drivers":
        return registry.edit_driver(conn, staff_no=key, by=who.name, name=body.name,
                                    card_asn=body.card_asn.lower() if body.card_asn else None, at=at)
    changed = False
    if "vehicle" in body.model_fields_set:  # null is a request too: the validator taken out of its bus
        changed = registry.move_device(conn, device_id=key, vehicle=body.vehicle or None, by=who.name, at=at)
    if body.terminal_id:
        changed = registry.edit_device(conn, device_id=key, by=who.name, terminal_id=body.terminal_id.lower(),
                                       at=at) or changed
    return changed


def retire(conn: Connection, *, who: Principal, kind: str, key: str, body: Retire, now: datetime) -> None:
    owner_of(conn, who, kind, key)
    fn = {"routes": registry.retire_route, "vehicles": registry.retire_vehicle, "drivers": registry.retire_driver,
          "devices": registry.retire_device}[kind]
    fn(conn, **{"staff_no" if kind == "drivers" else "device_id" if kind == "devices" else "code": key},
       by=who.name, at=body.at or now, reason=body.reason)


def history(conn: Connection, *, who: Principal, kind: str, key: str) -> dict:
    """The entry as it is, every version (oldest first) and its audit lines."""
    operator = owner_of(conn, who, kind, key)
    singular = KINDS[kind][0]
    return {"item": reads.registry_item(conn, kind=kind, key=key),
            "versions": registry.history(conn, kind=singular, key=key),
            "audit": registry.audit_lines(conn, operator=operator, kind=singular, key=key)}


# ------------------------------------------------------------------------------------------------ routes
Who = Annotated[Principal, Depends(owned_by(*OWNERS))]
Svc = Annotated[Services, Depends(services)]


def _add_view(kind: str):
    model = BODIES[kind][0]

    def view(*, body: model, who: Who, svc: Svc) -> dict:
        try:
            with writing(svc) as conn:
                key = add(conn, who=who, kind=kind, body=body, now=svc.clock())
        except RegistryRefused as e:
            raise _http(e) from None
        with svc.engine.connect() as conn:
            return reads.registry_item(conn, kind=kind, key=key)

    view.__name__ = f"add_{KINDS[kind][0]}"
    view.__doc__ = f"Register a {KINDS[kind][0]} (a clerk: for their own operator); signed with the token's name."
    return view


def _edit_view(kind: str):
    model = BODIES[kind][1]

    def view(*, key: Code, body: model, who: Who, svc: Svc) -> dict:
        try:
            with writing(svc) as conn:
                changed = edit(conn, who=who, kind=kind, key=key, body=body, now=svc.clock())
        except RegistryRefused as e:
            raise _http(e) from None
        with svc.engine.connect() as conn:
            return {"changed": changed, **history(conn, who=who, kind=kind, key=key)}

    view.__name__ = f"edit_{KINDS[kind][0]}"
    view.__doc__ = (f"Change a {KINDS[kind][0]} from ``at`` (default now): a new version, the old one kept for the "
                    "reports of its days. Fields left out stay as they are.")
    return view


def _retire_view(kind: str):
    def view(*, key: Code, body: Retire, who: Who, svc: Svc) -> dict:
        try:
            with writing(svc) as conn:
                retire(conn, who=who, kind=kind, key=key, body=body, now=svc.clock())
        except RegistryRefused as e:
            raise _http(e) from None
        with svc.engine.connect() as conn:
            return history(conn, who=who, kind=kind, key=key)

    view.__name__ = f"retire_{KINDS[kind][0]}"
    view.__doc__ = f"Retire a {KINDS[kind][0]}: kept, with its names, for the reports of the days it served."
    return view


def _history_view(kind: str):
    def view(*, key: Code, who: Who, conn: Annotated[Connection, Depends(connection)]) -> dict:
        return history(conn, who=who, kind=kind, key=key)

    view.__name__ = f"history_of_{KINDS[kind][0]}"
    view.__doc__ = f"A {KINDS[kind][0]} with every version (valid_from / valid_to, UTC) and its audit lines."
    return view


for _kind in KINDS:
    router.add_api_route(f"/{_kind}", _add_view(_kind), methods=["POST"], status_code=201)
    router.add_api_route(f"/{_kind}/{{key}}", _edit_view(_kind), methods=["PATCH"])
    router.add_api_route(f"/{_kind}/{{key}}/retire", _retire_view(_kind), methods=["POST"])
    router.add_api_route(f"/{_kind}/{{key}}/history", _history_view(_kind), methods=["GET"])


# ------------------------------------------------------------------------------------------------ a new company
class OperatorIn(BaseModel):
    code: Annotated[str, Field(pattern=r"^[0-9a-z][0-9a-z_]{0,31}$",
                               description="1-32 characters of a-z, 0-9 and _ (a segment of its buses' MQTT topics)")]
    name: Name
    timezone: Annotated[Text(64, min_length=1), Field(description="IANA time zone of its service day")] = \
        "Asia/Shanghai"
    cutoff_hour: CutoffHour = 3


class CommissionIn(BaseModel):
    rate_bp: RateBp
    valid_from: Annotated[ServiceDay, Field(description="the first service day it applies to (after the last "
                                                        "cleared day)")]


Admin = Annotated[Principal, Depends(owned_by())]  # admin only
RateReader = Annotated[Principal, Depends(owned_by(*OWNERS))]


@router.post("/operators", status_code=201)
def add_operator(*, body: OperatorIn, who: Admin, svc: Svc) -> dict:
    """Register a bus company (admin): code, name, time zone and the local hour its service day ends. Next: its
    commission rate, then its routes, vehicles, drivers and validators."""
    try:
        with writing(svc) as conn:
            registry.add_operator(conn, code=body.code, name=body.name, timezone=body.timezone,
                                  cutoff_hour=body.cutoff_hour, by=who.name, at=svc.clock())
    except RegistryRefused as e:
        raise _http(e) from None
    with svc.engine.connect() as conn:
        return reads.registry_item(conn, kind="operators", key=body.code)


def _rates(conn: Connection, operator: str) -> dict:
    return {"operator": operator,
            "rates": [{"valid_from": r["valid_from"], "rate_bp": r["rate_bp"]}
                      for r in registry.commission_rates(conn, operator=operator)]}


@router.post("/operators/{operator}/commission-rates", status_code=201)
def set_commission_rate(*, operator: OperatorCode, body: CommissionIn, who: Admin, svc: Svc) -> dict:
    """Set the card issuer's commission on the operator's gross, in basis points (integer; 60 = 0.60 %), from a
    service day on (admin). A day cleared already keeps its rate: 409 for a ``valid_from`` on or before the last
    cleared day. The same ``valid_from`` again replaces that rate."""
    try:
        with writing(svc) as conn:
            if reads.operator_day(conn, operator=operator) is None:
                raise HTTPException(404, f"operator {operator!r} not found")
            registry.set_commission_rate(conn, operator=operator, rate_bp=body.rate_bp, valid_from=body.valid_from,
                                         by=who.name)
    except RegistryRefused as e:
        raise _http(e) from None
    with svc.engine.connect() as conn:
        return _rates(conn, operator)


@router.get("/operators/{operator}/commission-rates")
def commission_rates(*, operator: OperatorCode, who: RateReader,
                     conn: Annotated[Connection, Depends(connection)]) -> dict:
    """The operator's commission rates over time, oldest first (a clerk: their own company only)."""
    if reads.registry_item(conn, kind="operators", key=operator, operator=who.scope(None)) is None:
        raise HTTPException(404, f"operator {operator!r} not found")
    return _rates(conn, operator)


# ------------------------------------------------------------------------------------------------ fleets, fare rules
class FleetIn(BaseModel):
    operator: Annotated[OperatorCode | None, Field(description="default: a clerk's own operator")] = None
    code: Code
    name: Name


class FareRulesIn(BaseModel):
    discounts: Annotated[dict[Annotated[int, Field(ge=1, le=255)],  # a JSON object's keys are text: "2"
                              Annotated[int, Field(strict=True, ge=0, le=100)]] | None,
                         Field(max_length=50, description="{card type: percent of the fare it pays}; replaces the "
                                                          "whole set (types left out pay 100)")] = None
    transfer_window_minutes: Annotated[int | None, Field(strict=True, ge=0, le=24 * 60)] = None
    transfer_discount: FenOrZero | None = None
    min_balance: FenOrZero | None = None
    at: When = None


@router.post("/fleets", status_code=201)
def add_fleet(*, body: FleetIn, who: Who, svc: Svc) -> dict:
    """A fleet (depot, branch) of an operator (a clerk: their own); vehicles join it with ``fleet`` on add / edit."""
    try:
        with writing(svc) as conn:
            operator = scoped(who, body.operator) or who.operator
            if operator is None or reads.operator_day(conn, operator=operator) is None:
                raise HTTPException(404 if operator else 422, f"operator {operator!r} not found" if operator
                                    else "say which operator the fleet belongs to (operator)")
            registry.add_fleet(conn, code=body.code, operator=operator, name=body.name, by=who.name)
    except RegistryRefused as e:
        raise _http(e) from None
    return {"code": body.code, "operator": operator, "name": body.name}


@router.post("/operators/{operator}/fare-rules")
def set_fare_rules(*, operator: OperatorCode, body: FareRulesIn, who: Who, svc: Svc) -> dict:
    """The operator-wide part of its fare table (a clerk: their own company): the percent of the fare each card type
    pays, the transfer window and discount (integer fen), the minimum balance to board (integer fen). Fields left
    out stay as they are; the answer is the rules from ``at`` on (fen)."""
    at = body.at or svc.clock()
    try:
        with writing(svc) as conn:
            if reads.registry_item(conn, kind="operators", key=operator, operator=who.scope(None)) is None:
                raise HTTPException(404, f"operator {operator!r} not found")
            changed = registry.set_fare_rules(conn, operator=operator, by=who.name, at=at,
                                              discounts=body.discounts,
                                              transfer_window_minutes=body.transfer_window_minutes,
                                              transfer_discount=body.transfer_discount, min_balance=body.min_balance)
            # the rules from when they apply; ``at`` before the operator was registered is a 409, nothing written
            table = registry.fare_table(conn, operator, 0, at=at)
    except RegistryRefused as e:
        raise _http(e) from None
    return {"changed": changed, "discounts": table["discounts"], "transfer": table["transfer"],
            "min_balance": table["min_balance"]}

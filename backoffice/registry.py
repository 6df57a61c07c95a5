"""The registry: bus companies, routes, vehicles, drivers, validators and cards. Small use cases with keyword-only
arguments, run inside the caller's transaction."""

from __future__ import annotations

from sqlalchemy import Connection, select

from backoffice.models import Card, Device, Driver, Operator, Route, Vehicle


def add_operator(conn: Connection, *, code: str, name: str, timezone: str = "Asia/Shanghai",
                 cutoff_hour: int = 3) -> None:
    conn.execute(Operator.__table__.insert().values(code=code, name=name, timezone=timezone,
                                                    cutoff_hour=cutoff_hour))


def add_route(conn: Connection, *, code: str, operator: str, name: str, flat_fare: int) -> None:
    if flat_fare <= 0:
        raise ValueError(f"route {code}: a fare is a positive number of fen, got {flat_fare}")
    conn.execute(Route.__table__.insert().values(code=code, operator=operator, name=name, flat_fare=flat_fare))


def add_vehicle(conn: Connection, *, code: str, operator: str, plate: str) -> None:
    conn.execute(Vehicle.__table__.insert().values(code=code, operator=operator, plate=plate))


def add_driver(conn: Connection, *, staff_no: str, operator: str, name: str, card_asn: str) -> None:
    conn.execute(Driver.__table__.insert().values(staff_no=staff_no, operator=operator, name=name,
                                                  card_asn=card_asn))


def add_device(conn: Connection, *, device_id: str, operator: str, vehicle: str | None, terminal_id: str) -> None:
    conn.execute(Device.__table__.insert().values(device_id=device_id, operator=operator, vehicle=vehicle,
                                                  terminal_id=terminal_id))


def add_cards(conn: Connection, cards: list[dict]) -> None:
    """Cards as issued: dicts with asn, card_type and optionally status."""
    if cards:
        conn.execute(Card.__table__.insert(), [{"status": "active", **c} for c in cards])


def names(conn: Connection, operator: str) -> dict[str, dict[str, str]]:
    """Display names for reports: route code -> name, vehicle code -> plate, staff number -> driver name."""
    return {
        "route": dict(conn.execute(select(Route.code, Route.name).where(Route.operator == operator)).all()),
        "vehicle": dict(conn.execute(select(Vehicle.code, Vehicle.plate).where(Vehicle.operator == operator)).all()),
        "driver": dict(conn.execute(select(Driver.staff_no, Driver.name).where(Driver.operator == operator)).all()),
    }

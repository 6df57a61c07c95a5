"""The registry on SQLite and PostgreSQL: create / edit / retire with the names of a past time, audit lines, the fare
table built from the registry, retire rules, fleets, the GTFS import (and a malformed feed refused with nothing
written), and the migration giving rows from before history a first version."""

from __future__ import annotations

import csv
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, select, text

from backoffice import registry
from backoffice.db import alembic_config, make_engine, upgrade
from backoffice.gtfs import GtfsError, import_gtfs
from backoffice.models import (
    DriverCard,
    FleetVehicle,
    RegistryAudit,
    Route,
    RouteStop,
    RouteVersion,
    Stop,
)
from backoffice.registry import RegistryError
from validator.fares import DistanceFare, FareTable, Stage, Transfer

OP = "op_r"
JAN, FEB, MAR = (datetime(2026, m, 1, tzinfo=UTC) for m in (1, 2, 3))
FEED = Path(__file__).resolve().parents[1] / "data" / "gtfs"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_schema_url"))
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Registry Bus", at=JAN)
    yield engine
    engine.dispose()


def count(conn, table) -> int:
    return conn.execute(select(func.count()).select_from(table)).scalar_one()


def seed(conn) -> None:
    registry.add_route(conn, code="r1", operator=OP, name="1路", flat_fare=200, at=JAN)
    registry.add_route(conn, code="r2", operator=OP, name="2路", stages=[(3, 100), (8, 200), (20, 300)], at=JAN)
    registry.add_vehicle(conn, code="v1", operator=OP, plate="沪A-10001", at=JAN)
    registry.add_driver(conn, staff_no="d1", operator=OP, name="王伟", card_asn="d1" + "0" * 18, at=JAN)
    registry.add_device(conn, device_id="dev_r1", operator=OP, vehicle="v1", terminal_id="0a0000000001", at=JAN)


def test_names_at_a_past_time_survive_edits_and_retirement(engine):
    with engine.begin() as conn:
        seed(conn)
        assert registry.edit_route(conn, code="r1", by="clerk_li", name="1路 (火车站—机场)", at=FEB)
        assert registry.edit_vehicle(conn, code="v1", by="clerk_li", plate="沪A-20002", at=FEB)
        assert registry.edit_driver(conn, staff_no="d1", by="clerk_li", name="王伟明", at=FEB)
        assert not registry.edit_route(conn, code="r1", by="clerk_li", name="1路 (火车站—机场)", at=FEB)
        registry.retire_route(conn, code="r1", by="clerk_li", at=MAR, reason="merged into r2")
    with engine.connect() as conn:
        mid_jan = registry.names(conn, OP, at=JAN + timedelta(days=14))
        assert mid_jan == {"route": {"r1": "1路", "r2": "2路"}, "vehicle": {"v1": "沪A-10001"},
                           "driver": {"d1": "王伟"}}
        now = registry.names(conn, OP)  # the existing call keeps working: names as they are now
        assert now["route"] == {"r1": "1路 (火车站—机场)", "r2": "2路"}  # a retired route keeps its last name
        assert now["vehicle"] == {"v1": "沪A-20002"} and now["driver"] == {"d1": "王伟明"}
        # taps from before the clerk typed the route in still get a name: its first
        assert registry.names(conn, OP, at=JAN - timedelta(days=30))["route"]["r1"] == "1路"
        assert registry.names(conn, OP, at=FEB)["route"]["r1"] == "1路 (火车站—机场)"  # valid_from is inclusive
        versions = registry.history(conn, kind="route", key="r1")
        assert [(v["name"], v["valid_from"], v["valid_to"]) for v in versions] == [
            ("1路", JAN, FEB), ("1路 (火车站—机场)", FEB, MAR)]
        retired = conn.execute(select(Route.retired_at).where(Route.code == "r1")).scalar_one()
        assert retired.replace(tzinfo=UTC) == MAR
    with engine.begin() as conn, pytest.raises(RegistryError, match="retired"):
        registry.edit_route(conn, code="r1", by="clerk_li", name="again")
    with engine.begin() as conn, pytest.raises(RegistryError, match="before the version in force"):
        registry.edit_vehicle(conn, code="v1", by="clerk_li", plate="x", at=JAN)


def test_every_change_writes_an_audit_line_saying_who_when_and_what(engine):
    with engine.begin() as conn:
        seed(conn)
        before = datetime.now(UTC)
        registry.edit_route(conn, code="r1", by="clerk_li", flat_fare=250, at=FEB)
        registry.edit_driver(conn, staff_no="d1", by="clerk_zhao", card_asn="d1" + "1" * 18, at=FEB)
        registry.move_device(conn, device_id="dev_r1", vehicle=None, by="ops_chen", at=FEB)
        registry.retire_vehicle(conn, code="v1", by="clerk_li", at=MAR, reason="scrapped")
    with engine.connect() as conn:
        lines = registry.audit_lines(conn, operator=OP)
        ours = [(a["by"], a["action"], a["kind"], a["key"]) for a in lines if a["by"] != "system"]
        assert ours == [("clerk_li", "edit", "route", "r1"), ("clerk_zhao", "edit", "driver", "d1"),
                        ("ops_chen", "edit", "device", "dev_r1"), ("clerk_li", "retire", "vehicle", "v1")]
        by_key = {a["key"]: a for a in lines if a["by"] != "system"}
        assert by_key["r1"]["detail"] == "flat_fare: 200 -> 250"
        assert by_key["r1"]["effective_at"] == FEB and by_key["r1"]["recorded_at"] >= before
        assert by_key["dev_r1"]["detail"] == "vehicle: 'v1' -> None"
        assert by_key["v1"]["detail"] == "scrapped"
        adds = [(a["action"], a["kind"], a["key"]) for a in lines if a["by"] == "system"]
        assert adds == [("add", "operator", OP), ("add", "route", "r1"), ("add", "route", "r2"),
                        ("add", "vehicle", "v1"), ("add", "driver", "d1"), ("add", "device", "dev_r1")]
        assert count(conn, RegistryAudit) == len(lines)
    with engine.begin() as conn, pytest.raises(RegistryError, match="say who"):
        registry.edit_route(conn, code="r2", by=" ", name="nobody")


def test_fare_table_from_the_registry_equals_the_hand_built_one(engine):
    with engine.begin() as conn:
        seed(conn)
        registry.add_route(conn, code="r3", operator=OP, name="3路 (no fare yet)", at=JAN)
        registry.set_fare_rules(conn, operator=OP, by="clerk_li", discounts={2: 50, 3: 0, 4: 80},
                                transfer_window_minutes=90, transfer_discount=100, min_balance=50, at=FEB)
        registry.edit_route(conn, code="r1", by="clerk_li", flat_fare=250, at=FEB)
        registry.edit_route(conn, code="r2", by="clerk_li", max_trip_minutes=120, at=FEB)
        registry.add_route(conn, code="r4", operator=OP, name="4路", flat_fare=150, at=FEB)
        registry.edit_route(conn, code="r4", by="clerk_li", stages=[(5, 120), (30, 240)], at=MAR)
        registry.retire_route(conn, code="r1", by="clerk_li", at=MAR)
    hand_jan = FareTable(version=7, flat={"r1": 200},
                         distance={"r2": DistanceFare((Stage(3, 100), Stage(8, 200), Stage(20, 300)))})
    hand_feb = FareTable(version=8, flat={"r1": 250, "r4": 150},
                         distance={"r2": DistanceFare((Stage(3, 100), Stage(8, 200), Stage(20, 300)), 120)},
                         discounts={2: 50, 3: 0, 4: 80}, transfer=Transfer(90, 100), min_balance=50)
    hand_now = FareTable(version=9, flat={},
                         distance={"r2": DistanceFare((Stage(3, 100), Stage(8, 200), Stage(20, 300)), 120),
                                   "r4": DistanceFare((Stage(5, 120), Stage(30, 240)))},
                         discounts={2: 50, 3: 0, 4: 80}, transfer=Transfer(90, 100), min_balance=50)
    with engine.connect() as conn:
        assert FareTable.from_dict(registry.fare_table(conn, OP, 7, at=JAN + timedelta(days=3))) == hand_jan
        assert FareTable.from_dict(registry.fare_table(conn, OP, 8, at=FEB + timedelta(hours=1))) == hand_feb
        assert FareTable.from_dict(registry.fare_table(conn, OP, 9)) == hand_now
        with pytest.raises(RegistryError, match="not registered"):
            registry.fare_table(conn, OP, 1, at=JAN - timedelta(days=1))
    with engine.begin() as conn:
        for bad in (0, -5, 1.5, True):
            with pytest.raises(RegistryError, match="whole number of fen"):
                registry.edit_route(conn, code="r2", by="clerk_li", flat_fare=bad)
        with pytest.raises(RegistryError, match="going up in stops"):
            registry.edit_route(conn, code="r2", by="clerk_li", stages=[(8, 200), (3, 100)])
        with pytest.raises(RegistryError, match="0 to 100"):
            registry.set_fare_rules(conn, operator=OP, by="clerk_li", discounts={2: 150})
    with engine.begin() as conn, pytest.raises(ValueError):  # the existing contract: a bad fare is a ValueError
        registry.add_route(conn, code="r9", operator=OP, name="9", flat_fare=0)


def test_retire_rules_for_vehicles_validators_drivers_and_operators(engine):
    with engine.begin() as conn:
        seed(conn)
        with pytest.raises(RegistryError, match="still carries validators dev_r1"):
            registry.retire_vehicle(conn, code="v1", by="clerk_li", at=FEB)
    with engine.begin() as conn:
        registry.move_device(conn, device_id="dev_r1", vehicle=None, by="ops_chen", at=FEB)
        registry.retire_vehicle(conn, code="v1", by="clerk_li", at=FEB)
    with engine.begin() as conn, pytest.raises(RegistryError, match="retired"):
        registry.add_device(conn, device_id="dev_r2", operator=OP, vehicle="v1", terminal_id="0a0000000002")
    with engine.begin() as conn, pytest.raises(RegistryError, match="retired"):
        registry.move_device(conn, device_id="dev_r1", vehicle="v1", by="ops_chen")
    with engine.begin() as conn:
        registry.edit_driver(conn, staff_no="d1", by="clerk_li", card_asn="d1" + "2" * 18, at=FEB)
        registry.retire_driver(conn, staff_no="d1", by="clerk_li", at=MAR)
    with engine.connect() as conn:
        withdrawn = registry.withdrawn_driver_cards(conn, OP)
        assert [(c["asn"], c["withdrawn_at"], c["reason"]) for c in withdrawn] == [
            ("d1" + "0" * 18, FEB, f"replaced by d1{'2' * 18}"), ("d1" + "2" * 18, MAR, "driver retired")]
        assert count(conn, DriverCard) == 2
        assert registry.history(conn, kind="device", key="dev_r1")[0]["vehicle"] == "v1"
    with engine.begin() as conn, pytest.raises(RegistryError, match="still has routes r1, r2; devices dev_r1"):
        registry.retire_operator(conn, code=OP, by="admin")


def test_fleets_are_clearings_table_used_through_the_registry(engine):
    with engine.begin() as conn:
        seed(conn)
        registry.add_fleet(conn, code="f_east", operator=OP, name="东站车队", by="clerk_li")
        registry.assign_fleet(conn, vehicle="v1", fleet="f_east", valid_from=date(2026, 2, 1), by="clerk_li")
        assert conn.execute(select(FleetVehicle.fleet).where(FleetVehicle.vehicle == "v1")).scalar_one() == "f_east"
        assert [a["kind"] for a in registry.audit_lines(conn, operator=OP, key="f_east")] == ["fleet"]
        with pytest.raises(RegistryError, match="not registered"):
            registry.assign_fleet(conn, vehicle="v1", fleet="f_none", valid_from=date(2026, 3, 1), by="clerk_li")


# ------------------------------------------------------------------------------------------------------ GTFS
def csv_rows(folder: Path, name: str) -> list[dict]:
    with open(folder / name, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def longest_trips(folder: Path) -> dict[tuple[str, int], list[str]]:
    """Independently of backoffice.gtfs: (route, direction) -> stops of its longest trip, for bus routes."""
    bus = {r["route_id"] for r in csv_rows(folder, "routes.txt") if r["route_type"] == "3"}
    trips = {r["trip_id"]: (r["route_id"], int(r["direction_id"] or 0)) for r in csv_rows(folder, "trips.txt")}
    calls: dict[str, list[tuple[int, str]]] = {}
    for r in csv_rows(folder, "stop_times.txt"):
        calls.setdefault(r["trip_id"], []).append((int(r["stop_sequence"]), r["stop_id"]))
    best: dict[tuple[str, int], str] = {}
    for trip in sorted(calls):
        key = trips[trip]
        if key[0] in bus and (key not in best or len(calls[trip]) > len(calls[best[key]])):
            best[key] = trip
    return {key: [s for _, s in sorted(calls[trip])] for key, trip in best.items()}


def stored_stops(conn, route: str) -> dict[int, list[str]]:
    open_version = select(RouteVersion.id).where(RouteVersion.code == route, RouteVersion.valid_to.is_(None))
    out: dict[int, list[str]] = {}
    for r in conn.execute(select(RouteStop.direction, RouteStop.stop)
                          .where(RouteStop.route_version_id == open_version.scalar_subquery())
                          .order_by(RouteStop.direction, RouteStop.seq)):
        out.setdefault(r.direction, []).append(r.stop)
    return out


def test_gtfs_import_of_the_fixture(engine, tmp_path):
    expected = longest_trips(FEED)
    routes_in_csv = {r["route_id"]: r for r in csv_rows(FEED, "routes.txt")}
    with engine.begin() as conn:
        report = import_gtfs(conn, operator=OP, folder_or_zip=FEED, by="clerk_li", default_fare=200, at=FEB)
    expected_routes = sorted({route for route, _ in expected})
    assert report.added == expected_routes == ["R1", "R2"]
    assert set(report.skipped) == set(routes_in_csv) - set(expected_routes)
    used_stops = {s for stops in expected.values() for s in stops}
    assert report.stops_added == len(used_stops) and report.stops_changed == 0
    with engine.connect() as conn:
        for route in expected_routes:
            want = {d: stops for (r, d), stops in expected.items() if r == route}
            assert stored_stops(conn, route) == want
            assert registry.route_stops(conn, route=route) == want
        assert count(conn, Stop) == len(used_stops)
        csv_names = {r["stop_id"]: r["stop_name"] for r in csv_rows(FEED, "stops.txt")}
        assert dict(conn.execute(select(Stop.code, Stop.name)).all()) == {s: csv_names[s] for s in used_stops}
        r1 = routes_in_csv["R1"]
        assert registry.names(conn, OP)["route"]["R1"] == f"{r1['route_short_name']} {r1['route_long_name']}"
        assert registry.fare_table(conn, OP, 1)["flat"] == {"R1": 200, "R2": 200}

    with engine.begin() as conn:  # the same feed again changes nothing
        again = import_gtfs(conn, operator=OP, folder_or_zip=FEED, by="clerk_li")
    assert (again.added, again.changed, again.unchanged) == ([], {}, ["R1", "R2"])

    changed = tmp_path / "feed"
    shutil.copytree(FEED, changed)
    (changed / "routes.txt").write_text((changed / "routes.txt").read_text("utf-8").replace(
        "Old Town Loop", "Old Town Circle"), "utf-8")
    (changed / "stop_times.txt").write_text("\n".join(
        line for line in (changed / "stop_times.txt").read_text("utf-8").splitlines() if ",S8," not in line) + "\n",
        "utf-8")
    with engine.begin() as conn:
        update = import_gtfs(conn, operator=OP, folder_or_zip=changed, by="clerk_zhao", at=MAR)
    assert update.changed == {"R2": "name '2 Old Town Loop' -> '2 Old Town Circle'; direction 0: 4 -> 3 stops"}
    with engine.connect() as conn:
        assert registry.route_stops(conn, route="R2") == {0: ["S6", "S7", "S6"]}
        assert registry.route_stops(conn, route="R2", at=FEB) == {0: ["S6", "S7", "S8", "S6"]}  # history kept
        assert registry.names(conn, OP, at=FEB)["route"]["R2"] == "2 Old Town Loop"
        assert registry.fare_table(conn, OP, 2)["flat"]["R2"] == 200  # an import keeps the fare


def test_a_malformed_feed_is_refused_with_nothing_written(engine, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(FEED, bad)
    with open(bad / "stop_times.txt", "a", encoding="utf-8") as f:
        f.write("R2_T1,10:30:00,10:30:00,S404,5\n")
    tables = (Route, RouteVersion, RouteStop, Stop, RegistryAudit)
    with engine.connect() as conn:
        before = [count(conn, t) for t in tables]
    with engine.begin() as conn, pytest.raises(GtfsError, match="stop_id 'S404' is not in stops.txt"):
        import_gtfs(conn, operator=OP, folder_or_zip=bad, by="clerk_li")
    with engine.connect() as conn:
        assert [count(conn, t) for t in tables] == before
    # a route id another operator owns is refused the same way, before anything is written
    with engine.begin() as conn:
        registry.add_operator(conn, code="op_other", name="Other Bus")
        registry.add_route(conn, code="R2", operator="op_other", name="theirs", flat_fare=100)
    with engine.connect() as conn:
        before = [count(conn, t) for t in tables]
    with engine.begin() as conn, pytest.raises(GtfsError, match="'R2' is registered for operator 'op_other'"):
        import_gtfs(conn, operator=OP, folder_or_zip=FEED, by="clerk_li")
    with engine.connect() as conn:
        assert [count(conn, t) for t in tables] == before


# ------------------------------------------------------------------------------------------------- migration
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rows_from_before_history_get_a_first_version(backend, request, tmp_path):
    url = f"sqlite:///{tmp_path}/old.db" if backend == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "2026_11_22_0003")
        conn.execute(text("INSERT INTO operator (code, name, timezone, cutoff_hour) "
                          "VALUES ('old', 'Old Bus', 'Asia/Shanghai', 3)"))
        conn.execute(text("INSERT INTO route (code, operator, name, flat_fare) VALUES ('o1', 'old', 'Old 1', 150)"))
        conn.execute(text("INSERT INTO driver (staff_no, operator, name, card_asn) "
                          "VALUES ('od', 'old', 'Old Driver', '09090909090909090909')"))
    upgrade(engine)
    with engine.begin() as conn:
        assert registry.names(conn, "old", at=datetime(2000, 1, 1, tzinfo=UTC))["route"] == {"o1": "Old 1"}
        assert registry.fare_table(conn, "old", 1, at=datetime(2020, 1, 1, tzinfo=UTC))["flat"] == {"o1": 150}
        registry.edit_route(conn, code="o1", by="clerk_li", name="Old One", at=FEB)
        assert registry.names(conn, "old", at=JAN)["route"] == {"o1": "Old 1"}
        assert conn.execute(select(DriverCard.staff_no)).scalar_one() == "od"
    with engine.begin() as conn:  # and back down, and up again: history starts afresh from the rows as they are
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "2026_11_22_0006-1")
        command.upgrade(cfg, "heads")
    with engine.connect() as conn:
        assert registry.names(conn, "old", at=JAN)["route"] == {"o1": "Old One"}
    engine.dispose()

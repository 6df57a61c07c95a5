"""The route parameters a validator gets carry the route's stops with their coordinates (issue 9, hole 8): from a
GTFS import (coordinates checked against stops.txt read here with csv) and from stops set by hand, numbered as the
route's direction 0 rides them, which is what a distance fare counts; the validator's FareTable reads them back.
SQLite and PostgreSQL."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.gtfs import import_gtfs
from validator.fares import FareTable, StopPoint

FEED = Path(__file__).resolve().parents[1] / "data" / "gtfs"
THEN = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_a_gtfs_route_with_stages_carries_its_located_stops_in_the_fare_table(engine):
    with open(FEED / "stops.txt", encoding="utf-8") as f:
        places = {r["stop_id"]: (float(r["stop_lat"]), float(r["stop_lon"])) for r in csv.DictReader(f)}
    with engine.begin() as conn:
        registry.add_operator(conn, code="citybus", name="City Bus", at=THEN)
        import_gtfs(conn, operator="citybus", folder_or_zip=FEED, at=THEN)
        registry.edit_route(conn, code="R1", by="clerk", stages=[(2, 200), (4, 300)], at=THEN + timedelta(days=1))
        registry.edit_route(conn, code="R2", by="clerk", flat_fare=200, at=THEN + timedelta(days=1))
        codes = registry.route_stops(conn, route="R1")[0]
        doc = registry.fare_table(conn, "citybus", 5)
    assert codes == ["S1", "S2", "S3", "S4", "S5"]
    assert doc["stops"]["R1"] == [[n, *places[code]] for n, code in enumerate(codes)]
    assert set(doc["stops"]) == {"R1", "R2"}  # routes with a fare; M1 and R7 have none yet
    table = FareTable.from_dict(doc)
    assert table.stops["R1"][4] == StopPoint(4, *places["S5"])


def test_stops_without_coordinates_are_left_out_and_the_numbers_stay_the_riding_order(engine):
    with engine.begin() as conn:
        registry.add_operator(conn, code="citybus", name="City Bus", at=THEN)
        for n, (lat, lon) in enumerate([(31.1, 121.1), (None, None), (31.3, 121.3), (31.4, 121.4)]):
            registry.set_stop(conn, operator="citybus", code=f"P{n}", name=f"stop {n}", lat=lat, lon=lon)
        registry.add_route(conn, code="r9", operator="citybus", name="nine", stages=[(3, 200)],
                           stops={0: ["P0", "P1", "P2", "P3"], 1: ["P3", "P2", "P1", "P0"]}, at=THEN)
        registry.add_route(conn, code="r1", operator="citybus", name="no stops", flat_fare=100, at=THEN)
        doc = registry.fare_table(conn, "citybus", 1)
    assert doc["stops"] == {"r9": [[0, 31.1, 121.1], [2, 31.3, 121.3], [3, 31.4, 121.4]]}
    assert FareTable.from_dict(doc).flat == {"r1": 100}

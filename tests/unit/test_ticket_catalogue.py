"""The ticket catalogue on a SQLite file (backoffice.tickets.catalogue): products refused with the reason (a coach
trip with routes, a route of another operator, a price of 0), departures on the operator's clock (a night coach at
25:10 leaves the next calendar day), and departures from a GTFS feed's trips: calendar.txt weekdays with a
calendar_dates.txt exception, a trip on a route the operator does not have skipped with the reason, a second import
adding nothing, a broken calendar refusing the feed with nothing written. Checked with plain SQL."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.gtfs import GtfsError
from backoffice.tickets import catalogue
from backoffice.tickets.catalogue import CatalogueError

NOW = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
OP = "coachco"


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=NOW - timedelta(days=30))
        registry.add_operator(conn, code="other", name="Other", at=NOW - timedelta(days=30))
        for code, name in (("S1", "Station"), ("S2", "Airport"), ("S3", "Harbour")):
            registry.set_stop(conn, operator=OP, code=code, name=name, by="clerk")
        registry.add_route(conn, code="AIR", operator=OP, name="Airport", flat_fare=200, at=NOW - timedelta(days=30),
                           stops={0: ["S1", "S2"], 1: ["S2", "S1"]})
        registry.add_route(conn, code="X9", operator="other", name="Theirs", flat_fare=200,
                           at=NOW - timedelta(days=30))
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Airport coach",
                              price_fen=3000, by="clerk", now=NOW)
    yield engine
    engine.dispose()


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(query), params)]


@pytest.mark.parametrize("kwargs, words", [
    ({"kind": "coach_trip", "routes": ["AIR"]}, "route comes with each departure"),
    ({"kind": "single", "routes": ["X9"]}, "X9 not registered for coachco"),
    ({"kind": "single", "price_fen": 0}, "a whole number of fen"),
    ({"kind": "single", "price_fen": 2.5}, "a whole number of fen"),
    ({"kind": "weekly"}, "one of single, day_pass"),
    ({"kind": "single", "code": "has space"}, "product code"),
    ({"kind": "month_pass", "validity_days": 0}, "1 to 400 service days"),
])
def test_a_product_that_cannot_be_sold_is_refused_with_the_reason(engine, kwargs, words):
    args = {"operator": OP, "code": "p1", "name": "P", "price_fen": 500, "by": "clerk", "now": NOW} | kwargs
    with engine.begin() as conn, pytest.raises(CatalogueError) as refused:
        catalogue.add_product(conn, **args)
    assert words in str(refused.value)
    assert sql(engine, "SELECT COUNT(*) FROM product WHERE code = 'p1'") == [(0,)]


def test_kinds_get_their_usual_validity_and_rides(engine):
    with engine.begin() as conn:
        for kind in ("single", "day_pass", "month_pass"):
            catalogue.add_product(conn, operator=OP, code=kind, kind=kind, name=kind, price_fen=100, by="c", now=NOW)
    assert sql(engine, "SELECT code, validity_days, uses FROM product WHERE code <> 'coach' ORDER BY code") == [
        ("day_pass", 1, 0), ("month_pass", 30, 0), ("single", 1, 1)]


def test_a_night_departure_after_midnight_leaves_the_next_calendar_day(engine):
    with engine.begin() as conn:
        d = catalogue.add_departure(conn, operator=OP, product="coach", route="AIR", service_date=date(2026, 12, 5),
                                    departs="25:10", seats=30)
        with pytest.raises(CatalogueError, match="already departs"):
            catalogue.add_departure(conn, operator=OP, product="coach", route="AIR", service_date=date(2026, 12, 6),
                                    departs="01:10", seats=30)
    assert d.departs_at == datetime(2026, 12, 5, 17, 10, tzinfo=UTC)  # 01:10 on the 6th in Shanghai
    assert d.service_date == date(2026, 12, 5) and d.seats_free == 30


def write_feed(folder, *, calendar="WKDY,1,1,1,1,1,0,0,20261201,20261231\n", dates="WKDY,20261203,2\n"):
    folder.mkdir()
    (folder / "routes.txt").write_text("route_id,route_short_name,route_type\nAIR,Airport,3\nX9,Theirs,3\n")
    (folder / "stops.txt").write_text("stop_id,stop_name\nS1,Station\nS2,Airport\n")
    (folder / "trips.txt").write_text("route_id,service_id,trip_id\nAIR,WKDY,A1\nAIR,WKDY,A2\nX9,WKDY,X1\n")
    (folder / "stop_times.txt").write_text(
        "trip_id,arrival_time,departure_time,stop_id,stop_sequence\n"
        "A1,08:05:00,08:05:00,S2,2\nA1,07:30:00,07:30:00,S1,1\n"
        "A2,24:40:00,24:40:00,S1,1\nA2,25:20:00,25:20:00,S2,2\n"
        "X1,09:00:00,09:00:00,S1,1\n")
    (folder / "calendar.txt").write_text("service_id,monday,tuesday,wednesday,thursday,friday,saturday,sunday,"
                                         "start_date,end_date\n" + calendar)
    (folder / "calendar_dates.txt").write_text("service_id,date,exception_type\n" + dates)
    return folder


def test_departures_come_from_the_feeds_trips_on_the_days_its_calendar_says(engine, tmp_path):
    feed = write_feed(tmp_path / "feed")
    with engine.begin() as conn:  # Tue 1 .. Sun 6 December 2026; Thursday the 3rd is taken out
        report = catalogue.import_gtfs_departures(conn, operator=OP, product="coach", folder_or_zip=feed,
                                                  start=date(2026, 12, 1), end=date(2026, 12, 6), seats=45)
    assert "X1" in report.skipped and "not a registered route of coachco" in report.skipped["X1"]
    rows = sql(engine, "SELECT service_date, departs_local, trip_id, seats, seats_taken FROM departure "
                       "ORDER BY service_date, departs_local")
    days = ["2026-12-01", "2026-12-02", "2026-12-04"]
    assert rows == [(d, t, trip, 45, 0) for d in days for t, trip in (("07:30", "A1"), ("24:40", "A2"))]
    assert len(report.added) == 6
    with engine.begin() as conn:
        again = catalogue.import_gtfs_departures(conn, operator=OP, product="coach", folder_or_zip=feed,
                                                 start=date(2026, 12, 1), end=date(2026, 12, 6), seats=45)
    assert again.added == [] and again.already == 6
    with engine.connect() as conn:
        listed = catalogue.list_departures(conn, OP, day=date(2026, 12, 4))
    assert [(d.departs_local, d.departs_at) for d in listed] == [
        ("07:30", datetime(2026, 12, 3, 23, 30, tzinfo=UTC)), ("24:40", datetime(2026, 12, 4, 16, 40, tzinfo=UTC))]


def test_a_broken_calendar_refuses_the_feed_and_writes_nothing(engine, tmp_path):
    feed = write_feed(tmp_path / "feed", dates="WKDY,2026-12-03,2\n")
    with engine.begin() as conn, pytest.raises(GtfsError) as refused:
        catalogue.import_gtfs_departures(conn, operator=OP, product="coach", folder_or_zip=feed,
                                         start=date(2026, 12, 1), end=date(2026, 12, 6), seats=45)
    assert "calendar_dates.txt line 2" in str(refused.value)
    assert sql(engine, "SELECT COUNT(*) FROM departure") == [(0,)]


def test_a_riders_origin_and_destination_find_the_departures_going_that_way(engine):
    day = date(2026, 12, 5)
    with engine.begin() as conn:
        out = catalogue.add_departure(conn, operator=OP, product="coach", route="AIR", service_date=day,
                                      departs="09:00", seats=30)
        back = catalogue.add_departure(conn, operator=OP, product="coach", route="AIR", service_date=day,
                                       departs="09:00", seats=30, direction=1)
        late = catalogue.add_departure(conn, operator=OP, product="coach", route="AIR", service_date=day,
                                       departs="18:00", seats=30)
    with engine.connect() as conn:
        def find(origin, destination, after=None):
            return [d.id for d in catalogue.departures_between(conn, operator=OP, origin=origin,
                                                               destination=destination, day=day, after=after,
                                                               now=NOW)]
        assert find("Station", "airport") == [out.id, late.id]  # a stop's name, any case, or its code
        assert find("S2", "S1") == [back.id]
        assert find("Station", "Airport", after="12:00") == [late.id]
        assert find("Station", "Harbour") == [] and find("Nowhere", "Airport") == []
        gone = catalogue.departures_between(conn, operator=OP, origin="S1", destination="S2", day=day,
                                            now=datetime(2026, 12, 5, 2, 0, tzinfo=UTC))  # 10:00 local
        assert [d.id for d in gone] == [late.id]

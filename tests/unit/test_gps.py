"""validator.gps, the pure parts: NMEA sentences (checked against the textbook examples with their published
checksums), stop snapping with radius and hysteresis, the stop button's words, and the stops in the fare table."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from hardware_sim.gps import interpolate, sentences
from validator.fares import FareError, FareTable, StopPoint
from validator.gps import NmeaError, Position, StopButton, StopLocator, distance_m, parse_sentence

# The classic examples of the NMEA 0183 references, checksums as published.
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"


def test_textbook_sentences_give_their_position():
    for line in (RMC, GGA, RMC.encode() + b"\r\n"):
        fix = parse_sentence(line)
        assert math.isclose(fix.lat, 48 + 7.038 / 60) and math.isclose(fix.lon, 11 + 31.0 / 60)


def test_damaged_sentences_are_refused_and_no_fix_is_none():
    with pytest.raises(NmeaError, match="checksum"):
        parse_sentence(RMC.replace("4807", "4808"))
    with pytest.raises(NmeaError):
        parse_sentence(RMC[:-3])  # no checksum
    with pytest.raises(NmeaError):
        parse_sentence("garbage on the line")
    assert parse_sentence(sentences(None, None, datetime(2026, 12, 3, tzinfo=UTC))[0]) is None  # RMC status V
    assert parse_sentence(sentences(None, None, datetime(2026, 12, 3, tzinfo=UTC))[1]) is None  # GGA quality 0
    assert parse_sentence("$GPGSV,1,1,00*79") is None  # another sentence


def test_the_simulator_writes_what_the_parser_reads_in_every_hemisphere():
    for lat, lon in ((31.230416, 121.473701), (-33.8688, 151.2093), (40.7128, -74.0060), (-22.9, -43.2)):
        for line in sentences(lat, lon, datetime(2026, 12, 3, 8, tzinfo=UTC)):
            fix = parse_sentence(line)
            assert abs(fix.lat - lat) < 1e-6 and abs(fix.lon - lon) < 1e-6


def test_distance():
    assert abs(distance_m(31.0, 121.0, 32.0, 121.0) - 111_195) < 5  # one degree of latitude, R = 6371.0088 km
    assert distance_m(31.2, 121.4, 31.2, 121.4) == 0


STOPS = [StopPoint(0, 31.2300, 121.4700), StopPoint(1, 31.2320, 121.4700), StopPoint(2, 31.2340, 121.4700),
         StopPoint(3, 31.23415, 121.4700)]  # stop 3 is 17 m from stop 2 (the other side of a loop)


def metres_north(stop: StopPoint, m: float) -> tuple[float, float]:
    return stop.lat + m / 111_195, stop.lon


def test_snapping_radius_and_keeping_the_last_stop_between_stops():
    loc = StopLocator(STOPS, radius_m=40, margin_m=15)
    assert loc.update(*metres_north(STOPS[0], 30)) == 0  # within 40 m
    assert loc.update(*metres_north(STOPS[0], 10)) is None  # still there: no change to report
    assert loc.update(*metres_north(STOPS[0], 110)) is None and loc.current.number == 0  # between stops
    assert loc.update(*metres_north(STOPS[1], -45)) is None  # 45 m short of stop 1
    assert loc.update(*metres_north(STOPS[1], -20)) == 1


def test_hysteresis_between_two_close_stops():
    loc = StopLocator(STOPS, radius_m=40, margin_m=15)
    assert loc.update(STOPS[2].lat, STOPS[2].lon) == 2
    # jitter around the middle of stops 2 and 3 (16.7 m apart): nearer to 3 by less than the margin, no flip
    for m in (9, 10, 11, 12, 9):
        assert loc.update(*metres_north(STOPS[2], m)) is None
    assert loc.current.number == 2
    assert loc.update(STOPS[3].lat, STOPS[3].lon) == 3  # at stop 3: 16.7 m nearer than stop 2, beyond the margin
    assert loc.update(*metres_north(STOPS[2], 5)) is None  # and back near the middle: stays at 3
    assert loc.update(STOPS[2].lat, STOPS[2].lon) == 2


def test_stop_button_words(tmp_path):
    position = Position()
    button = StopButton(tmp_path / "stop.fifo", position)
    assert [button.press(w) for w in ("next", "\n", "n", "back", "7", "next", "later", "300")] == \
        [0, 1, 2, 1, 7, 8, None, None]
    assert position.take() == 8 and position.take() is None
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match="not a named pipe"):
        StopButton(tmp_path / "plain", position)


def test_stops_travel_in_the_fare_table():
    doc = {"version": 3, "distance": {"r9": {"stages": [[2, 200], [5, 300]]}},
           "stops": {"r9": [[0, 31.23, 121.47], [1, 31.232, 121.47], [4, 31.24, 121.47]]}}
    table = FareTable.from_dict(doc)
    assert table.stops["r9"][2] == StopPoint(4, 31.24, 121.47)
    assert FareTable.from_dict(table.to_dict()) == table
    assert "stops" not in FareTable(1, {"r1": 200}).to_dict()  # a table without stops reads as before
    for bad in ([[0, 91.0, 0.0]], [[256, 0.0, 0.0]], [[1, 0, 0], [1, 0, 0]], [[True, 0, 0]], [["a", 0, 0]]):
        with pytest.raises(FareError):
            FareTable.from_dict({**doc, "stops": {"r9": bad}})


def test_interpolate():
    assert interpolate((0.0, 0.0), (3.0, 6.0), 2) == [(1.0, 2.0), (2.0, 4.0)]

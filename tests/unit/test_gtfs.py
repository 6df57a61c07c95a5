"""GTFS reading: the fixture feed read back against a plain parse of its CSVs, zip = folder, every kind of bad row
refused with file and line."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import pytest

from backoffice.gtfs import GtfsError, read_feed

FEED = Path(__file__).resolve().parents[1] / "data" / "gtfs"


def plain_patterns(folder: Path) -> dict[str, dict[int, list[str]]]:
    """Independently: for each bus route and direction, the stops of its longest trip (ties: smallest trip_id)."""
    with open(folder / "routes.txt", encoding="utf-8-sig", newline="") as f:
        bus = {r["route_id"] for r in csv.DictReader(f) if r["route_type"] == "3"}
    with open(folder / "trips.txt", encoding="utf-8-sig", newline="") as f:
        trips = {r["trip_id"]: (r["route_id"], int(r["direction_id"] or 0)) for r in csv.DictReader(f)}
    calls: dict[str, list[tuple[int, str]]] = {}
    with open(folder / "stop_times.txt", encoding="utf-8-sig", newline="") as f:
        for r in csv.DictReader(f):
            calls.setdefault(r["trip_id"], []).append((int(r["stop_sequence"]), r["stop_id"]))
    out: dict[str, dict[int, list[str]]] = {}
    chosen: dict[tuple[str, int], str] = {}
    for trip in sorted(trips):
        route, direction = trips[trip]
        if route not in bus or trip not in calls:
            continue
        best = chosen.get((route, direction))
        if best is None or len(calls[trip]) > len(calls[best]):
            chosen[(route, direction)] = trip
    for (route, direction), trip in chosen.items():
        out.setdefault(route, {})[direction] = [stop for _, stop in sorted(calls[trip])]
    return out


def copy_feed(tmp_path: Path) -> Path:
    target = tmp_path / "feed"
    shutil.copytree(FEED, target)
    return target


def test_the_fixture_reads_as_its_csvs_say():
    feed = read_feed(FEED)
    assert feed.patterns == plain_patterns(FEED)
    # the short-turn trip R1_T2 lost to the full R1_T1; stop_sequence gaps and row order did not matter
    assert feed.patterns["R1"][0] == ["S1", "S2", "S3", "S4", "S5"]
    assert feed.patterns["R2"] == {0: ["S6", "S7", "S8", "S6"]}  # empty direction_id is direction 0; a loop
    assert set(feed.skipped) == {"M1", "R7"}
    assert "not a bus" in feed.skipped["M1"] and "no trips" in feed.skipped["R7"]
    assert feed.routes["R1"].name == "1 火车站—机场"
    assert feed.stops["S2"].name == "人民广场" and feed.stops["S2"].lat == pytest.approx(31.2328)
    assert any("R1_T1" in n for n in feed.notes)


def test_a_zip_reads_the_same_as_the_folder(tmp_path):
    archive = tmp_path / "feed.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in FEED.iterdir():
            z.write(f, f"city_gtfs/{f.name}")  # feeds are often zipped inside a folder
    a, b = read_feed(archive), read_feed(FEED)
    assert (a.routes, a.stops, a.patterns, a.skipped) == (b.routes, b.stops, b.patterns, b.skipped)


def edit(folder: Path, name: str, old: str, new: str) -> None:
    path = folder / name
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.mark.parametrize(("name", "old", "new", "expected"), [
    ("stop_times.txt", "R1_T1,07:20:00,07:20:00,S3,5", "R1_T1,07:20:00,07:20:00,S99,5",
     "stop_times.txt line 3: stop_id 'S99' is not in stops.txt"),
    ("stop_times.txt", "R1_T1,07:20:00,07:20:00,S3,5", "R1_T1,07:20:00,07:20:00,S3,2",
     "stop_times.txt line 4: trip 'R1_T1' has stop_sequence 2 twice"),
    ("stop_times.txt", "R2_T1,10:05:00,10:05:00,S7,2", "R2_T1,10:05:00,10:05:00,S7,two",
     "stop_times.txt line 16: stop_sequence 'two' is not a non-negative whole number"),
    ("trips.txt", "R1,WKDY,R1_T3,1,", "R1,WKDY,R1_T3,2,", "trips.txt line 4: trip 'R1_T3' has direction_id '2'"),
    ("trips.txt", "R2,WKDY,R2_T1", "R5,WKDY,R2_T1", "trips.txt line 5: trip 'R2_T1' names route_id 'R5'"),
    ("stops.txt", "S4,龙阳路,31.2032", "S4,龙阳路,131.2032", "stops.txt line 5: stop 'S4' has position"),
    ("stops.txt", "S5,机场,", "S5,,", "stops.txt line 6: stop 'S5' has no stop_name"),
    ("routes.txt", "R2,CITYBUS,2,", "R1,CITYBUS,2,", "routes.txt line 3: route_id 'R1' appears twice"),
    ("routes.txt", "route_type\n", "route_kind\n", "routes.txt: missing column route_type"),
])
def test_a_bad_row_refuses_the_feed_saying_where(tmp_path, name, old, new, expected):
    folder = copy_feed(tmp_path)
    edit(folder, name, old, new)
    with pytest.raises(GtfsError) as e:
        read_feed(folder)
    assert any(err.startswith(expected) for err in e.value.errors), e.value.errors
    assert "nothing imported" in str(e.value)


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    folder = copy_feed(tmp_path)
    edit(folder, "stop_times.txt", "R1_T1,07:00:00,07:00:00,S1,1", "R1_T1,07:00:00,07:00:00,SX,1")
    edit(folder, "stop_times.txt", "M1_T1,06:00:00,06:00:00,S2,1", "M9_T1,06:00:00,06:00:00,S2,1")
    with pytest.raises(GtfsError) as e:
        read_feed(folder)
    assert len(e.value.errors) == 2


def test_a_missing_file_or_a_folder_that_is_not_there(tmp_path):
    folder = copy_feed(tmp_path)
    (folder / "trips.txt").unlink()
    with pytest.raises(GtfsError, match="trips.txt is missing"):
        read_feed(folder)
    with pytest.raises(GtfsError, match="no such folder"):
        read_feed(tmp_path / "nowhere")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(GtfsError, match="not a GTFS folder or zip"):
        read_feed(tmp_path / "junk.zip")


def test_a_bom_and_spaces_around_fields_are_tolerated(tmp_path):
    folder = copy_feed(tmp_path)
    text = (folder / "stops.txt").read_text(encoding="utf-8").replace("S1,火车站", " S1 , 火车站 ")
    (folder / "stops.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_feed(folder).stops["S1"].name == "火车站"

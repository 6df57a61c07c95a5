"""GTFS archive limits: a zip bomb (a few hundred KB expanding to hundreds of MB) is refused from the zip's own
directory with a clear message, and the peak memory of the process that tried stays small (measured with
resource.getrusage in a subprocess, over the same process's peak once its imports are done)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from backoffice.gtfs import ArchiveLimits, GtfsError, read_feed

FEED = Path(__file__).resolve().parents[1] / "data" / "gtfs"
ROOT = Path(__file__).resolve().parents[2]
MIB = 1024**2
PEAK = """
import json, resource, sys
from backoffice.gtfs import GtfsError, read_feed
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
message = ""
try:
    read_feed(sys.argv[1])
except GtfsError as e:
    message = str(e)
print(json.dumps({"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "message": message}))
"""


def _bomb(path: Path, *, mib: int = 250) -> Path:
    """The fixture feed with a stop_times.txt of ``mib`` MB of one row repeated: about 1,000 times smaller zipped."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for name in ("routes.txt", "stops.txt", "trips.txt"):
            z.write(FEED / name, name)
        row = b"T1,08:00:00,08:00:00,S1,1," + b"x" * 4000 + b"\n"  # long runs: deflate's best ratio
        block = row * (MIB // len(row))
        with z.open("stop_times.txt", "w", force_zip64=True) as f:
            f.write(b"trip_id,arrival_time,departure_time,stop_id,stop_sequence,stop_headsign\n")
            for _ in range(mib):
                f.write(block)
    return path


def _peak(path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK, path], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_a_zip_bomb_is_refused_before_it_is_decompressed_and_memory_stays_small(tmp_path):
    bomb = _bomb(tmp_path / "bomb.zip")
    size = bomb.stat().st_size
    with zipfile.ZipFile(bomb) as z:
        expanded = z.getinfo("stop_times.txt").file_size
    assert size < 450 * 1024 and expanded > 240 * MIB  # a few hundred KB that expand to 250 MB
    tried = _peak(str(bomb))
    assert "looks like a zip bomb" in tried["message"] and "stop_times.txt expands" in tried["message"]
    grown_mb = (tried["peak_kb"] - tried["before_kb"]) / 1024  # peak RSS over the peak after the imports
    assert grown_mb < 30, f"reading the bomb took the process {grown_mb:.0f} MB above its imports"


def test_too_many_entries_too_big_a_file_or_feed_are_refused(tmp_path):
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as z:
        for name in ("routes.txt", "stops.txt", "trips.txt", "stop_times.txt"):
            z.write(FEED / name, name)
        for i in range(1200):
            z.writestr(f"junk/{i}.txt", b"")
    with pytest.raises(GtfsError, match="holds 1,204 entries; a feed has at most 1,000"):
        read_feed(many)
    fine = tmp_path / "fine.zip"
    with zipfile.ZipFile(fine, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("routes.txt", "stops.txt", "trips.txt", "stop_times.txt"):
            z.write(FEED / name, name)
    assert read_feed(fine).routes == read_feed(FEED).routes
    biggest = max((FEED / n).stat().st_size for n in ("routes.txt", "stops.txt", "trips.txt", "stop_times.txt"))
    with pytest.raises(GtfsError, match=f"is {biggest:,} bytes uncompressed; a feed file may have at most 100"):
        read_feed(fine, limits=ArchiveLimits(member_bytes=100))
    with pytest.raises(GtfsError, match="at most 100"):  # a folder has the same limits
        read_feed(FEED, limits=ArchiveLimits(member_bytes=100))
    with pytest.raises(GtfsError, match="together; at most 1,000"):
        read_feed(fine, limits=ArchiveLimits(total_bytes=1000))


def test_a_file_of_junk_stops_being_read_after_enough_problems(tmp_path):
    folder = tmp_path / "feed"
    folder.mkdir()
    for name in ("routes.txt", "stops.txt", "trips.txt"):
        (folder / name).write_bytes((FEED / name).read_bytes())
    with (folder / "stop_times.txt").open("w") as f:
        f.write("trip_id,arrival_time,departure_time,stop_id,stop_sequence\n")
        f.write("nope,08:00:00,08:00:00,S1,1\n" * 200_000)
    with pytest.raises(GtfsError) as refused:
        read_feed(folder)
    errors = refused.value.errors
    assert len(errors) == 1001 and "reading stopped" in errors[-1] and "... and 951 more" in str(refused.value)


def test_a_line_too_long_for_a_csv_is_a_problem_not_a_crash(tmp_path):
    folder = tmp_path / "feed"
    folder.mkdir()
    for name in ("routes.txt", "stops.txt", "trips.txt", "stop_times.txt"):
        (folder / name).write_bytes((FEED / name).read_bytes())
    with (folder / "stops.txt").open("a") as f:
        f.write('X1,"' + "x" * 300_000 + '",0,0\n')
    with pytest.raises(GtfsError, match=r"stops.txt line \d+: not a CSV line \(field larger than field limit"):
        read_feed(folder)

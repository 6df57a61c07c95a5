"""Routes and stops from a GTFS feed (a folder or a .zip): routes.txt, stops.txt, trips.txt, stop_times.txt.

Each bus route becomes a registry route (code = route_id) with its stops in riding order per direction; the stops
come from one representative trip per route and direction: the trip with the most stops (ties: the smallest
trip_id), so the list covers the route's full length when some trips short-turn. Fares are not in these files: a new
route gets ``default_fare`` (or none, and stays out of the fare table until a clerk sets one); an existing route
keeps its fare and gets the feed's name and stops as a new version (history kept).

A zip is checked before anything in it is decompressed (``ArchiveLimits``: entries, each file's and the total
uncompressed size, the compression ratio), so a zip bomb is refused from its own directory; the files are then read
as streams, row by row, never whole into memory.

All or nothing: the whole feed is read and checked first; any bad row refuses the feed with every error listed
(file, line, what is wrong) and nothing is written. The writes then run in one savepoint of the caller's
transaction. Routes that are well formed but not imported (not a bus, no trips, retired in the registry) are
reported as skipped with the reason.
"""

from __future__ import annotations

import contextlib
import csv
import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, select

from backoffice import registry
from backoffice.models import Operator, Route, Stop

FILES = ("routes.txt", "stops.txt", "trips.txt", "stop_times.txt")
REQUIRED = {"routes.txt": ("route_id", "route_type"), "stops.txt": ("stop_id",),
            "trips.txt": ("route_id", "service_id", "trip_id"), "stop_times.txt": ("trip_id", "stop_id", "stop_sequence")}
# route_type: 3 bus, 11 trolleybus (basic); 700-717 bus services, 800 trolleybus service (extended types)
BUS_TYPES = {3, 11, 800, *range(700, 718)}
MAX_ERRORS_SHOWN = 50


class GtfsError(ValueError):
    """The feed was refused; ``errors`` lists every problem found (file, line, what)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        super().__init__(f"GTFS feed refused, nothing imported ({len(errors)} problem"
                         f"{'s' if len(errors) != 1 else ''}):\n  " + "\n  ".join(shown) + more)


@dataclass(frozen=True)
class GtfsRoute:
    route_id: str
    name: str
    route_type: int


@dataclass(frozen=True)
class GtfsStop:
    stop_id: str
    name: str
    lat: float | None
    lon: float | None


@dataclass
class Feed:
    routes: dict[str, GtfsRoute]
    stops: dict[str, GtfsStop]
    patterns: dict[str, dict[int, list[str]]]  # route_id -> direction -> stop ids of the representative trip
    skipped: dict[str, str]  # route_id -> why it is not imported
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)
    changed: dict[str, str] = field(default_factory=dict)  # route -> what changed
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # route -> why
    not_in_feed: list[str] = field(default_factory=list)  # the operator's live routes the feed does not have
    stops_added: int = 0
    stops_changed: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [(f"routes: {len(self.added)} added, {len(self.changed)} changed, {len(self.unchanged)} unchanged, "
                f"{len(self.skipped)} skipped; stops: {self.stops_added} added, {self.stops_changed} changed")]
        out += [f"  added    {r}" for r in self.added]
        out += [f"  changed  {r}: {what}" for r, what in self.changed.items()]
        out += [f"  skipped  {r}: {why}" for r, why in self.skipped.items()]
        if self.not_in_feed:
            out.append(f"  not in the feed (left as they are): {', '.join(self.not_in_feed)}")
        out += [f"  note     {n}" for n in self.notes]
        return out


# ------------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class ArchiveLimits:
    """What a feed may take before it is read: a zip bomb (a few hundred KB that expand to gigabytes, or a
    directory of a million entries) is refused from the zip's own directory, before anything is decompressed.
    A big city's stop_times.txt is a few hundred MB and compresses about 5 to 20 times; these leave room for that."""

    members: int = 1000  # entries in the zip (a feed has a few dozen files at most)
    member_bytes: int = 512 * 1024**2  # one of the four files, uncompressed
    total_bytes: int = 1024**3  # the four files together, uncompressed
    ratio: int = 100  # uncompressed / compressed, for a file over ratio_from bytes
    ratio_from: int = 1024**2


LIMITS = ArchiveLimits()
MAX_ERRORS_KEPT = 1000  # a feed with more problems is refused with these (and a note that reading stopped)
_EOCD = b"PK\x05\x06"  # the zip's end-of-central-directory record


def _declared_entries(path: Path) -> int | None:
    """The number of entries the zip's end record declares, read before zipfile parses its directory (which
    holds every entry in memory). None when there is no end record (not a zip); 0xFFFF for a zip64 archive,
    which a feed never needs."""
    with path.open("rb") as f:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (22 + 65535)))  # the record, after at most a 64 KB comment
        tail = f.read()
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return None
    return int.from_bytes(tail[at + 10:at + 12], "little")


def _check_sizes(path: Path, sizes: dict[str, tuple[int, int | None]], limits: ArchiveLimits) -> None:
    """sizes: file name -> (uncompressed bytes, compressed bytes or None for a folder's file)."""
    errors = []
    for name, (size, packed) in sizes.items():
        if size > limits.member_bytes:
            errors.append(f"{path}: {name} is {size:,} bytes uncompressed; a feed file may have at most "
                          f"{limits.member_bytes:,}")
        elif packed is not None and size > limits.ratio_from and size > limits.ratio * max(packed, 1):
            errors.append(f"{path}: {name} expands {size / max(packed, 1):,.0f} times ({packed:,} -> {size:,} "
                          f"bytes); a GTFS text file compresses at most about {limits.ratio} times: this looks "
                          "like a zip bomb")
    total = sum(size for size, _ in sizes.values())
    if not errors and total > limits.total_bytes:
        errors.append(f"{path}: the feed's files are {total:,} bytes uncompressed together; at most "
                      f"{limits.total_bytes:,}")
    if errors:
        raise GtfsError(errors)


@contextlib.contextmanager
def _open_feed(folder_or_zip: str | Path, limits: ArchiveLimits = LIMITS) -> Iterator[dict[str, Callable]]:
    """file name -> a function opening it as text (UTF-8, BOM dropped), read as a stream, never whole; a missing
    file is left out. A zip is checked against ``limits`` first."""
    path = Path(folder_or_zip)
    if path.is_dir():
        found = {name: path / name for name in FILES if (path / name).is_file()}
        _check_sizes(path, {name: (p.stat().st_size, None) for name, p in found.items()}, limits)
        yield {name: (lambda p=p: p.open(encoding="utf-8-sig", newline="")) for name, p in found.items()}
        return
    if not path.exists():
        raise GtfsError([f"{path}: no such folder or file"])
    entries = _declared_entries(path)
    if entries is None:
        raise GtfsError([f"{path}: not a GTFS folder or zip file"])
    if entries > limits.members:
        raise GtfsError([f"{path}: the zip holds {entries:,} entries; a feed has at most {limits.members:,}"])
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise GtfsError([f"{path}: not a GTFS folder or zip file, or a damaged one ({e})"]) from None
    with z:
        if len(z.infolist()) > limits.members:
            raise GtfsError([f"{path}: the zip holds {len(z.infolist()):,} entries; a feed has at most "
                             f"{limits.members:,}"])
        infos = [i for i in z.infolist() if Path(i.filename).name in FILES and not i.is_dir()]
        chosen = {}
        for name in FILES:
            found = [i for i in infos if Path(i.filename).name == name]
            if len(found) > 1:
                raise GtfsError([f"{path}: {name} appears {len(found)} times "
                                 f"({', '.join(i.filename for i in found)})"])
            if found:
                chosen[name] = found[0]
        _check_sizes(path, {n: (i.file_size, i.compress_size) for n, i in chosen.items()}, limits)
        # zipfile never hands out more than an entry's declared size (and checks its CRC at the end), so the
        # sizes checked above bound what is decompressed, whatever the compressed data says.
        yield {name: (lambda i=i: io.TextIOWrapper(z.open(i), encoding="utf-8-sig", newline=""))
               for name, i in chosen.items()}


def _rows(name: str, open_text: Callable, errors: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of one file, read as a stream. A broken file (not UTF-8, a field too long for a CSV, a damaged
    zip entry) adds one error and ends the file; so do too many errors in all."""
    line = 0
    try:
        with open_text() as stream:
            reader = csv.DictReader(stream)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED[name] if c not in header]
            if missing:
                errors.append(f"{name}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
                return
            reader.fieldnames = header
            for row in reader:
                line = reader.line_num
                if len(errors) >= MAX_ERRORS_KEPT:
                    errors.append(f"{name} line {line}: reading stopped, {MAX_ERRORS_KEPT} problems are enough to "
                                  "refuse the feed")
                    return
                if None in row:  # more fields than the header has
                    errors.append(f"{name} line {line}: {len(header) + len(row[None])} fields, the header has "
                                  f"{len(header)}")
                    continue
                yield line, {k: (v or "").strip() for k, v in row.items()}
    except UnicodeDecodeError as e:
        errors.append(f"{name}: not UTF-8 after line {line} ({e})")
    except csv.Error as e:
        errors.append(f"{name} line {line + 1}: not a CSV line ({e})")
    except zipfile.BadZipFile as e:
        errors.append(f"{name}: the zip entry is damaged ({e})")
    except (RuntimeError, NotImplementedError) as e:  # zipfile: encrypted, or a compression it does not have
        errors.append(f"{name}: cannot be read from the zip ({e}); give an unencrypted, deflated zip")


def _number(value: str, low: float, high: float) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if low <= x <= high else None


def read_feed(folder_or_zip: str | Path, *, limits: ArchiveLimits = LIMITS) -> Feed:
    """Read and check a feed; GtfsError listing every problem, or the routes, stops and representative trips."""
    with _open_feed(folder_or_zip, limits) as files:
        return _read(files)


def _read(texts: dict[str, Callable]) -> Feed:
    errors = [f"{name} is missing from the feed" for name in FILES if name not in texts]
    if errors:
        raise GtfsError(errors)

    routes: dict[str, GtfsRoute] = {}
    for line, r in _rows("routes.txt", texts["routes.txt"], errors):
        where, rid = f"routes.txt line {line}", r["route_id"]
        name = " ".join(x for x in (r.get("route_short_name", ""), r.get("route_long_name", "")) if x)
        if not rid:
            errors.append(f"{where}: empty route_id")
        elif len(rid) > 32:
            errors.append(f"{where}: route_id {rid!r} is longer than 32 characters (the registry's route code)")
        elif rid in routes:
            errors.append(f"{where}: route_id {rid!r} appears twice")
        elif not name:
            errors.append(f"{where}: route {rid!r} has neither route_short_name nor route_long_name")
        elif not r["route_type"].isdigit():
            errors.append(f"{where}: route {rid!r} has route_type {r['route_type']!r}, not a number")
        else:
            routes[rid] = GtfsRoute(rid, name[:200], int(r["route_type"]))

    stops: dict[str, GtfsStop] = {}
    for line, r in _rows("stops.txt", texts["stops.txt"], errors):
        where, sid = f"stops.txt line {line}", r["stop_id"]
        lat_text, lon_text = r.get("stop_lat", ""), r.get("stop_lon", "")
        lat = _number(lat_text, -90, 90) if lat_text else None
        lon = _number(lon_text, -180, 180) if lon_text else None
        if not sid:
            errors.append(f"{where}: empty stop_id")
        elif len(sid) > 64:
            errors.append(f"{where}: stop_id {sid!r} is longer than 64 characters")
        elif sid in stops:
            errors.append(f"{where}: stop_id {sid!r} appears twice")
        elif not r.get("stop_name") and r.get("location_type", "") in ("", "0", "1", "2"):
            errors.append(f"{where}: stop {sid!r} has no stop_name")
        elif (lat_text and lat is None) or (lon_text and lon is None):
            errors.append(f"{where}: stop {sid!r} has position {lat_text!r}, {lon_text!r}: not a latitude "
                          "(-90..90) and longitude (-180..180)")
        else:
            stops[sid] = GtfsStop(sid, (r.get("stop_name") or sid)[:200], lat, lon)

    trips: dict[str, tuple[str, int]] = {}  # trip_id -> (route_id, direction)
    route_ids_seen_in_trips: set[str] = set()
    for line, r in _rows("trips.txt", texts["trips.txt"], errors):
        where, tid = f"trips.txt line {line}", r["trip_id"]
        direction = r.get("direction_id", "") or "0"
        if not tid:
            errors.append(f"{where}: empty trip_id")
        elif tid in trips:
            errors.append(f"{where}: trip_id {tid!r} appears twice")
        elif r["route_id"] not in routes:
            errors.append(f"{where}: trip {tid!r} names route_id {r['route_id']!r}, which routes.txt does not have")
        elif direction not in ("0", "1"):
            errors.append(f"{where}: trip {tid!r} has direction_id {direction!r}: must be 0 or 1")
        else:
            trips[tid] = (r["route_id"], int(direction))
            route_ids_seen_in_trips.add(r["route_id"])

    calls: dict[str, dict[int, str]] = {}  # trip_id -> stop_sequence -> stop_id
    for line, r in _rows("stop_times.txt", texts["stop_times.txt"], errors):
        where, tid, sid, seq = f"stop_times.txt line {line}", r["trip_id"], r["stop_id"], r["stop_sequence"]
        if tid not in trips:
            errors.append(f"{where}: trip_id {tid!r} is not in trips.txt")
        elif sid not in stops:
            errors.append(f"{where}: stop_id {sid!r} is not in stops.txt")
        elif not seq.isdigit():
            errors.append(f"{where}: stop_sequence {seq!r} is not a non-negative whole number")
        elif int(seq) in calls.get(tid, {}):
            errors.append(f"{where}: trip {tid!r} has stop_sequence {seq} twice")
        else:
            calls.setdefault(tid, {})[int(seq)] = sid
    if errors:
        raise GtfsError(errors)

    # One representative trip per route and direction: the most stops, then the smallest trip_id.
    best: dict[tuple[str, int], tuple[int, str]] = {}
    variants: dict[tuple[str, int], set[tuple[str, ...]]] = {}
    for tid, (rid, direction) in trips.items():
        if tid not in calls:
            continue
        pattern = tuple(sid for _, sid in sorted(calls[tid].items()))
        variants.setdefault((rid, direction), set()).add(pattern)
        rank = (-len(pattern), tid)
        if (rid, direction) not in best or rank < (-best[(rid, direction)][0], best[(rid, direction)][1]):
            best[(rid, direction)] = (len(pattern), tid)
    patterns: dict[str, dict[int, list[str]]] = {}
    notes = []
    for (rid, direction), (_, tid) in sorted(best.items()):
        patterns.setdefault(rid, {})[direction] = [sid for _, sid in sorted(calls[tid].items())]
        if len(variants[(rid, direction)]) > 1:
            notes.append(f"route {rid} direction {direction}: {len(variants[(rid, direction)])} stop patterns; "
                         f"trip {tid} ({len(patterns[rid][direction])} stops) kept")

    skipped: dict[str, str] = {}
    for rid, route in routes.items():
        if route.route_type not in BUS_TYPES:
            skipped[rid] = f"route_type {route.route_type} is not a bus or trolleybus route"
        elif rid not in route_ids_seen_in_trips:
            skipped[rid] = "no trips in trips.txt"
        elif rid not in patterns:
            skipped[rid] = "its trips have no stop times"
    return Feed(routes, stops, {r: p for r, p in patterns.items() if r not in skipped}, skipped, notes)


# ---------------------------------------------------------------------------------------------------- importing
def import_gtfs(conn: Connection, *, operator: str, folder_or_zip: str | Path, by: str = "gtfs import",
                at: datetime | None = None, default_fare: int | None = None) -> ImportReport:
    """Create or update the operator's routes and stops from a GTFS feed; see the module's docstring."""
    feed = read_feed(folder_or_zip)
    operator_row = conn.execute(select(Operator.retired_at).where(Operator.code == operator)
                                ).first()
    if operator_row is None or operator_row.retired_at is not None:
        raise GtfsError([f"operator {operator!r} is not registered (or retired): add it before importing its feed"])
    existing = {r.code: r for r in conn.execute(select(Route.code, Route.operator, Route.name, Route.retired_at)
                                                .where(Route.code.in_(list(feed.routes))))}
    foreign = [f"route_id {code!r} is registered for operator {r.operator!r}, not {operator!r}"
               for code, r in sorted(existing.items()) if r.operator != operator]
    if foreign:
        raise GtfsError(foreign)
    if default_fare is not None:
        registry._fen(default_fare, "default fare")

    report = ImportReport(skipped=dict(feed.skipped), notes=list(feed.notes))
    with conn.begin_nested():  # a failure half way leaves nothing of the import behind
        used = sorted({sid for p in feed.patterns.values() for codes in p.values() for sid in codes})
        known = {s.code for s in conn.execute(select(Stop.code).where(Stop.operator == operator))}
        for sid in used:
            s = feed.stops[sid]
            if registry.set_stop(conn, operator=operator, code=sid, name=s.name, lat=s.lat, lon=s.lon, by=by):
                if sid in known:
                    report.stops_changed += 1
                else:
                    report.stops_added += 1
        for rid in sorted(feed.patterns):
            route, stops = feed.routes[rid], feed.patterns[rid]
            old = existing.get(rid)
            if old is None:
                registry.add_route(conn, code=rid, operator=operator, name=route.name, flat_fare=default_fare,
                                   stops=stops, by=by, at=at)
                report.added.append(rid)
            elif old.retired_at is not None:
                report.skipped[rid] = "retired in the registry; an import does not bring a route back"
            else:
                old_stops = registry.route_stops(conn, route=rid)
                if registry.edit_route(conn, code=rid, by=by, name=route.name, stops=stops, at=at):
                    what = [f"name {old.name!r} -> {route.name!r}"] if old.name != route.name else []
                    what += [f"direction {d}: {len(old_stops.get(d, []))} -> {len(stops.get(d, []))} stops"
                             for d in sorted(set(old_stops) | set(stops)) if old_stops.get(d) != stops.get(d)]
                    report.changed[rid] = "; ".join(what)
                else:
                    report.unchanged.append(rid)
    live = conn.execute(select(Route.code).where(Route.operator == operator, Route.retired_at.is_(None))).scalars()
    report.not_in_feed = sorted(set(live) - set(feed.routes))
    return report

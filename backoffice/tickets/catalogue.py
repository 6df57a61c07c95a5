"""The ticket catalogue: what each operator sells (products) and the coach departures with their seats.

A product is a single ride (one route, a few, or any), a day pass, a month pass or a coach trip. Its price is
integer fen; its validity is a number of the operator's service days (the day from the operator's cut-off hour to
the next, in its time zone, as clearing counts days); its rider category is a card type (epurse.cardtypes), so a
student ticket is priced and checked as a student card is.

A coach trip is sold on a departure: a route, a service date, a local departure time and a number of seats.
Departures come one by one (``add_departure``) or from a GTFS feed's trips (``import_gtfs_departures``), read with
backoffice.gtfs's checked reader (zip-bomb limits, every bad row listed, nothing half imported).
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, insert, select, update

from backoffice import gtfs, registry
from backoffice.models import Departure, Operator, Product, Route
from backoffice.tickets.orders import split_routes

KINDS = ("single", "day_pass", "month_pass", "coach_trip")
# kind -> (validity days, uses) a product gets when the clerk says nothing: one ride on the day bought, unlimited
# rides for a day or for 30 days, one seat on one departure
DEFAULTS = {"single": (1, 1), "day_pass": (1, 0), "month_pass": (30, 0), "coach_trip": (1, 1)}
MAX_VALIDITY_DAYS = 400
MAX_SEATS = 1000
MAX_OPERATOR_BYTES = 16  # wire.ticket.MAX_OPERATOR: the operator code as the token carries it
MAX_PRICE_FEN = 10_000_000  # 100,000 yuan: far above any ticket, low enough to catch a price typed in fen as yuan
CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
HHMM = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")


class CatalogueError(ValueError):
    """A product or departure that cannot be added, with what to do instead."""


@dataclass(frozen=True)
class ProductView:
    id: int
    operator: str
    code: str
    kind: str
    name: str
    price_fen: int
    routes: tuple[str, ...]  # () = any route
    validity_days: int
    uses: int
    rider_category: int
    active: bool


@dataclass(frozen=True)
class DepartureView:
    id: int
    operator: str
    product: str
    route: str
    direction: int
    service_date: date
    departs_local: str
    departs_at: datetime
    seats: int
    seats_taken: int
    trip_id: str | None
    active: bool

    @property
    def seats_free(self) -> int:
        return self.seats - self.seats_taken


def _operator(conn: Connection, code: str):
    row = conn.execute(select(Operator.code, Operator.timezone, Operator.cutoff_hour, Operator.retired_at)
                       .where(Operator.code == code)).first()
    if row is None or row.retired_at is not None:
        raise CatalogueError(f"operator {code!r} is not registered (or retired): add it with `farebox registry`")
    return row


def _product_view(row) -> ProductView:
    return ProductView(row.id, row.operator, row.code, row.kind, row.name, row.price_fen, split_routes(row.routes),
                       row.validity_days, row.uses, row.rider_category, bool(row.active))


def add_product(conn: Connection, *, operator: str, code: str, kind: str, name: str, price_fen: int,
                routes: Iterable[str] = (), validity_days: int | None = None, uses: int | None = None,
                rider_category: int = 1, by: str, now: datetime | None = None) -> ProductView:
    """Add a product to ``operator``'s catalogue; CatalogueError says what is wrong."""
    _operator(conn, operator)
    if len(operator.encode("utf-8")) > MAX_OPERATOR_BYTES:
        raise CatalogueError(f"operator code {operator!r} is longer than the {MAX_OPERATOR_BYTES} bytes a ticket "
                             "token carries: tickets cannot be sold under it")
    if not isinstance(code, str) or not CODE.fullmatch(code):
        raise CatalogueError(f"product code {code!r}: 1-32 letters, digits, '_', '.', '-', starting with a letter "
                             "or digit")
    if kind not in KINDS:
        raise CatalogueError(f"product kind {kind!r}: one of {', '.join(KINDS)}")
    if not name or not name.strip() or len(name) > 200:
        raise CatalogueError("a product needs a name of 1-200 characters")
    if isinstance(price_fen, bool) or not isinstance(price_fen, int) or not 0 < price_fen <= MAX_PRICE_FEN:
        raise CatalogueError(f"price {price_fen!r}: a whole number of fen, 1 to {MAX_PRICE_FEN}")
    days, rides = DEFAULTS[kind]
    validity_days = days if validity_days is None else validity_days
    uses = rides if uses is None else uses
    if not isinstance(validity_days, int) or not 1 <= validity_days <= MAX_VALIDITY_DAYS:
        raise CatalogueError(f"validity {validity_days!r}: 1 to {MAX_VALIDITY_DAYS} service days")
    if not isinstance(uses, int) or not 0 <= uses <= 255:
        raise CatalogueError(f"uses {uses!r}: 0 (unlimited within the validity) to 255 rides")
    if not isinstance(rider_category, int) or not 1 <= rider_category <= 255:
        raise CatalogueError(f"rider category {rider_category!r}: a card type number (1 adult, 2 student, ...)")
    routes = tuple(dict.fromkeys(routes))
    if kind == "coach_trip" and routes:
        raise CatalogueError("a coach trip's route comes with each departure: give no routes for the product")
    if routes:
        known = {r.code: r for r in conn.execute(select(Route.code, Route.operator, Route.retired_at)
                                                 .where(Route.code.in_(routes)))}
        bad = [r for r in routes if r not in known or known[r].operator != operator or known[r].retired_at]
        if bad:
            raise CatalogueError(f"route{'s' if len(bad) > 1 else ''} {', '.join(bad)} not registered for "
                                 f"{operator} (or retired)")
    if len(" ".join(routes)) > 1000 or len(routes) > 255:
        raise CatalogueError("too many routes for one product: leave them out for any route")
    if conn.execute(select(Product.id).where(Product.operator == operator, Product.code == code)).first():
        raise CatalogueError(f"{operator} already has a product {code!r}")
    now = now or datetime.now(UTC)
    pid = conn.execute(insert(Product).values(
        operator=operator, code=code, kind=kind, name=name.strip(), price_fen=price_fen, routes=" ".join(routes),
        validity_days=validity_days, uses=uses, rider_category=rider_category, active=True, created_at=now,
        created_by=by).returning(Product.id)).scalar_one()
    return get_product(conn, pid)


def get_product(conn: Connection, product_id: int) -> ProductView:
    row = conn.execute(select(Product).where(Product.id == product_id)).first()
    if row is None:
        raise CatalogueError(f"no product {product_id}")
    return _product_view(row)


def find_product(conn: Connection, operator: str, code: str) -> ProductView:
    row = conn.execute(select(Product).where(Product.operator == operator, Product.code == code)).first()
    if row is None:
        raise CatalogueError(f"{operator} has no product {code!r}: see `farebox ticket product list --operator "
                             f"{operator}`")
    return _product_view(row)


def list_products(conn: Connection, operator: str, *, active_only: bool = False) -> list[ProductView]:
    q = select(Product).where(Product.operator == operator).order_by(Product.kind, Product.code)
    if active_only:
        q = q.where(Product.active.is_(True))
    return [_product_view(r) for r in conn.execute(q)]


def set_product_active(conn: Connection, *, operator: str, code: str, active: bool) -> ProductView:
    """Stop (or start again) selling a product; tickets already sold stay good."""
    p = find_product(conn, operator, code)
    conn.execute(update(Product).where(Product.id == p.id).values(active=active))
    return get_product(conn, p.id)


# -------------------------------------------------------------------------------------------------- departures
def departure_time(service_date: date, hhmm: str, tz: str) -> tuple[str, datetime]:
    """("HH:MM", UTC instant) of a departure at local ``hhmm`` on ``service_date``. As in GTFS, an hour of 24 or more
    is the next calendar day's (a night coach on the day it began). A wall time a DST change skips or repeats takes
    the first instant that reads it."""
    m = HHMM.fullmatch(hhmm.strip()) if isinstance(hhmm, str) else None
    if not m or int(m.group(2)) > 59 or int(m.group(1)) > 47:
        raise CatalogueError(f"departure time {hhmm!r}: HH:MM on the operator's clock (GTFS style 24:00-47:59 for "
                             "after midnight)")
    hours, minutes = int(m.group(1)), int(m.group(2))
    day = service_date + timedelta(days=hours // 24)
    local = datetime.combine(day, time(hours % 24, minutes))
    zone = ZoneInfo(tz)
    at = local.replace(tzinfo=zone, fold=0).astimezone(UTC)
    return f"{hours:02d}:{minutes:02d}", at


def _departure_view(row, product_code: str) -> DepartureView:
    at = row.departs_at if row.departs_at.tzinfo else row.departs_at.replace(tzinfo=UTC)
    return DepartureView(row.id, row.operator, product_code, row.route, row.direction, row.service_date,
                         row.departs_local, at, row.seats, row.seats_taken, row.trip_id, bool(row.active))


def _coach_product(conn: Connection, operator: str, product: str) -> ProductView:
    p = find_product(conn, operator, product)
    if p.kind != "coach_trip":
        raise CatalogueError(f"product {product!r} is a {p.kind}, not a coach_trip: departures are for coach trips")
    return p


def _route_of(conn: Connection, operator: str, route: str) -> None:
    row = conn.execute(select(Route.operator, Route.retired_at).where(Route.code == route)).first()
    if row is None or row.operator != operator or row.retired_at is not None:
        raise CatalogueError(f"route {route!r} is not registered for {operator} (or retired)")


def add_departure(conn: Connection, *, operator: str, product: str, route: str, service_date: date, departs: str,
                  seats: int, direction: int = 0, trip_id: str | None = None) -> DepartureView:
    """A coach departure with ``seats`` seats for sale; ``direction`` says which of the route's stop orders it
    rides (GTFS direction_id, 0 or 1)."""
    op = _operator(conn, operator)
    p = _coach_product(conn, operator, product)
    _route_of(conn, operator, route)
    if isinstance(seats, bool) or not isinstance(seats, int) or not 1 <= seats <= MAX_SEATS:
        raise CatalogueError(f"seats {seats!r}: 1 to {MAX_SEATS}")
    if direction not in (0, 1):
        raise CatalogueError(f"direction {direction!r}: 0 or 1 (GTFS direction_id)")
    local, at = departure_time(service_date, departs, op.timezone)
    exists = conn.execute(select(Departure.id).where(Departure.product_id == p.id, Departure.route == route,
                                                     Departure.direction == direction,
                                                     Departure.departs_at == at)).first()
    if exists:
        raise CatalogueError(f"{product} on route {route} already departs at {local} on {service_date} "
                             f"(departure {exists.id})")
    did = conn.execute(insert(Departure).values(
        operator=operator, product_id=p.id, route=route, direction=direction, service_date=service_date,
        departs_local=local, departs_at=at, seats=seats, seats_taken=0, trip_id=trip_id, active=True
    ).returning(Departure.id)).scalar_one()
    return get_departure(conn, did)


def get_departure(conn: Connection, departure_id: int) -> DepartureView:
    row = conn.execute(select(Departure, Product.code.label("product_code"))
                       .join(Product, Product.id == Departure.product_id)
                       .where(Departure.id == departure_id)).first()
    if row is None:
        raise CatalogueError(f"no departure {departure_id}")
    return _departure_view(row, row.product_code)


def list_departures(conn: Connection, operator: str, *, day: date | None = None, until: date | None = None,
                    route: str | None = None, product: str | None = None) -> list[DepartureView]:
    q = (select(Departure, Product.code.label("product_code")).join(Product, Product.id == Departure.product_id)
         .where(Departure.operator == operator).order_by(Departure.departs_at, Departure.route, Departure.id))
    if day is not None:
        q = q.where(Departure.service_date >= day, Departure.service_date <= (until or day))
    if route:
        q = q.where(Departure.route == route)
    if product:
        q = q.where(Product.code == product)
    return [_departure_view(r, r.product_code) for r in conn.execute(q)]


def _stop_codes(conn: Connection, operator: str, text_: str) -> set[str]:
    """The operator's stop codes a rider's word names: the code itself, or the stop's name (exactly, any case)."""
    from backoffice.models import Stop

    word = text_.strip()
    rows = conn.execute(select(Stop.code, Stop.name).where(Stop.operator == operator)).all()
    return {r.code for r in rows if r.code == word or r.name.casefold() == word.casefold()}


def departures_between(conn: Connection, *, operator: str, origin: str, destination: str, day: date,
                       after: str | None = None, now: datetime | None = None) -> list[DepartureView]:
    """Departures on service day ``day`` (at or after local ``after`` HH:MM, and not yet gone at ``now``) whose
    route, in the departure's direction, calls at ``origin`` before ``destination`` (stop codes or names):
    what a rider's SMS ``C#origin#destination#date#time`` asks for. Earliest first, sold-out ones included (the
    caller says "sold out" rather than "no coach")."""

    froms, tos = _stop_codes(conn, operator, origin), _stop_codes(conn, operator, destination)
    if not froms or not tos:
        return []
    now = now or datetime.now(UTC)
    out = []
    stops_of: dict[str, dict[int, list[str]]] = {}
    for d in list_departures(conn, operator, day=day):
        if not d.active or d.departs_at <= now or (after and d.departs_local < _hhmm(after)):
            continue
        if d.route not in stops_of:
            stops_of[d.route] = registry.route_stops(conn, route=d.route)
        calls = stops_of[d.route].get(d.direction, [])
        first = next((i for i, s in enumerate(calls) if s in froms), None)
        if first is not None and any(s in tos for s in calls[first + 1:]):
            out.append(d)
    return out


def _hhmm(text_: str) -> str:
    m = HHMM.fullmatch(text_.strip())
    if not m:
        raise CatalogueError(f"time {text_!r}: HH:MM")
    return f"{int(m.group(1)):02d}:{m.group(2)}"


# ------------------------------------------------------------------------------------------------ GTFS trips
@dataclass
class DepartureImport:
    added: list[DepartureView] = field(default_factory=list)
    already: int = 0  # departures the catalogue had (a second import of the same feed adds nothing)
    skipped: dict[str, str] = field(default_factory=dict)  # trip_id -> why

    def lines(self) -> list[str]:
        out = [f"departures: {len(self.added)} added, {self.already} already there, {len(self.skipped)} trips "
               "skipped"]
        out += [f"  skipped  {t}: {why}" for t, why in sorted(self.skipped.items())[:50]]
        return out


def _calendar_rows(path: Path, name: str) -> list[tuple[int, dict[str, str]]]:
    """calendar.txt / calendar_dates.txt of the feed, when it has them (backoffice.gtfs reads only the four files
    of routes and stops). Size-checked the way gtfs checks its own files."""
    limits = gtfs.LIMITS
    if path.is_dir():
        f = path / name
        if not f.is_file():
            return []
        gtfs._check_sizes(path, {name: (f.stat().st_size, None)}, limits)
        text = f.read_text(encoding="utf-8-sig")
    else:
        with zipfile.ZipFile(path) as z:
            found = [i for i in z.infolist() if Path(i.filename).name == name and not i.is_dir()]
            if not found:
                return []
            gtfs._check_sizes(path, {name: (found[0].file_size, found[0].compress_size)}, limits)
            text = z.read(found[0]).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
    return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]


def _service_days(path: Path, start: date, end: date) -> dict[str, set[date]] | None:
    """service_id -> the dates in [start, end] it runs, from calendar.txt and calendar_dates.txt; None when the feed
    has neither (then every trip is taken to run every day asked for)."""
    cal, dates = _calendar_rows(path, "calendar.txt"), _calendar_rows(path, "calendar_dates.txt")
    if not cal and not dates:
        return None
    days: dict[str, set[date]] = {}
    weekdays = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    errors = []

    def ymd(text: str, where: str) -> date | None:
        try:
            return datetime.strptime(text, "%Y%m%d").date()
        except ValueError:
            errors.append(f"{where}: date {text!r} is not YYYYMMDD")
            return None

    for line, r in cal:
        first, last = ymd(r.get("start_date", ""), f"calendar.txt line {line}"), ymd(
            r.get("end_date", ""), f"calendar.txt line {line}")
        if first is None or last is None:
            continue
        d = max(first, start)
        while d <= min(last, end):
            if r.get(weekdays[d.weekday()], "0") == "1":
                days.setdefault(r.get("service_id", ""), set()).add(d)
            d += timedelta(days=1)
    for line, r in dates:
        d = ymd(r.get("date", ""), f"calendar_dates.txt line {line}")
        if d is None or not start <= d <= end:
            continue
        sid, what = r.get("service_id", ""), r.get("exception_type", "")
        if what == "1":
            days.setdefault(sid, set()).add(d)
        elif what == "2":
            days.setdefault(sid, set()).discard(d)
        else:
            errors.append(f"calendar_dates.txt line {line}: exception_type {what!r} must be 1 or 2")
    if errors:
        raise gtfs.GtfsError(errors)
    return days


def _first_departures(path: Path) -> tuple[dict[str, tuple[str, str, int]], dict[str, str]]:
    """trip_id -> (route_id, service_id, direction) and trip_id -> its first stop's departure time, read with
    gtfs's reader."""
    errors: list[str] = []
    trips: dict[str, tuple[str, str, int]] = {}
    first: dict[str, tuple[int, str]] = {}
    with gtfs._open_feed(path) as files:
        for name in ("trips.txt", "stop_times.txt"):
            if name not in files:
                raise gtfs.GtfsError([f"{name} is missing from the feed"])
        for line, r in gtfs._rows("trips.txt", files["trips.txt"], errors):
            direction = r.get("direction_id") or "0"
            if direction not in ("0", "1"):
                errors.append(f"trips.txt line {line}: direction_id {direction!r} must be 0 or 1")
            elif r["trip_id"]:
                trips[r["trip_id"]] = (r["route_id"], r["service_id"], int(direction))
        for line, r in gtfs._rows("stop_times.txt", files["stop_times.txt"], errors):
            tid, seq, dep = r["trip_id"], r["stop_sequence"], r.get("departure_time") or r.get("arrival_time", "")
            if tid not in trips or not seq.isdigit():
                continue
            if tid not in first or int(seq) < first[tid][0]:
                first[tid] = (int(seq), dep)
    if errors:
        raise gtfs.GtfsError(errors)
    return trips, {t: dep for t, (_, dep) in first.items()}


def import_gtfs_departures(conn: Connection, *, operator: str, product: str, folder_or_zip: str | Path,
                           start: date, end: date, seats: int, routes: Iterable[str] = ()) -> DepartureImport:
    """Departures of ``product`` (a coach trip) from a GTFS feed's trips: one per trip and service date in
    [start, end], leaving at its first stop's departure time, each with ``seats`` seats. Only trips on the
    operator's registered routes (and on ``routes``, when given) are taken. A departure the catalogue already has
    is left as it is (its seats sold stay sold). All or nothing, in a savepoint of the caller's transaction."""
    op = _operator(conn, operator)
    p = _coach_product(conn, operator, product)
    if end < start or (end - start).days > 366:
        raise CatalogueError(f"dates {start}..{end}: the first no later than the last, at most a year apart")
    if isinstance(seats, bool) or not isinstance(seats, int) or not 1 <= seats <= MAX_SEATS:
        raise CatalogueError(f"seats {seats!r}: 1 to {MAX_SEATS}")
    path = Path(folder_or_zip)
    trips, first = _first_departures(path)
    service = _service_days(path, start, end)
    wanted = set(routes)
    ours = {r.code for r in conn.execute(select(Route.code).where(Route.operator == operator,
                                                                  Route.retired_at.is_(None)))}
    every_day = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    report = DepartureImport()
    # all or nothing by the caller's transaction (no savepoint: pysqlite's would commit on release)
    for tid, (route, service_id, direction) in sorted(trips.items()):
        if wanted and route not in wanted:
            continue
        if route not in ours:
            report.skipped[tid] = f"route {route!r} is not a registered route of {operator}"
            continue
        if not first.get(tid):
            report.skipped[tid] = "no departure time at its first stop"
            continue
        days = every_day if service is None else sorted(service.get(service_id, ()))
        for day in days:
            try:
                local, at = departure_time(day, first[tid], op.timezone)
            except CatalogueError as e:
                report.skipped[tid] = str(e)
                break
            exists = conn.execute(select(Departure.id).where(and_(
                Departure.product_id == p.id, Departure.route == route, Departure.departs_at == at))).first()
            if exists:
                report.already += 1
                continue
            did = conn.execute(insert(Departure).values(
                operator=operator, product_id=p.id, route=route, direction=direction, service_date=day,
                departs_local=local, departs_at=at, seats=seats, seats_taken=0, trip_id=tid[:64], active=True
            ).returning(Departure.id)).scalar_one()
            report.added.append(get_departure(conn, did))
    return report

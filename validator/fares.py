"""Fares, as the back office sends them to the fleet: one versioned table, and the pure rule that prices a tap.

A route charges either a flat fare or a distance fare by stages (the rider taps on entry and on exit; the entry stop
travels on the card in its transit record, see epurse.transit). On top of the route's fare:

- a card type pays a percentage of it (``discounts``: student 50, elderly 0 ...), rounded to the nearest fen;
- a boarding on another route within ``transfer.window_minutes`` of the last one gets ``transfer.discount`` fen off
  (flat routes; never below zero);
- a card still "on board" from an unfinished distance-fare trip pays that route's maximum fare first (evaded-fare
  recovery), in the same transaction as this tap;
- a card holding less than ``min_balance`` (or, boarding a distance-fare route, less than its maximum fare) is told
  "insufficient balance" and charged nothing.

Where the bus is: the table also carries each route's stops with their coordinates (``stops``: route -> stop number,
latitude, longitude; WGS-84 degrees, as GTFS and GPS give them). The stop number is the one a distance fare counts
(``route_stop.seq`` of the route's direction 0 in the back office); validator/gps.py snaps the bus's GPS position
to the nearest of them and tells the terminal (``Terminal.at_stop``).

``quote()`` is pure: it sees the table, the route, the card type, the card's last transit record and the clock, and
says what to charge and what to write back on the card. The terminal only carries it out.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime, timedelta

from epurse.transit import TransitRecord, TripState, route_matches


class FareError(LookupError):
    """The fare table cannot price this tap (unknown route, malformed table): the validator takes no fares."""


@dataclasses.dataclass(frozen=True)
class Stage:
    up_to_stops: int  # a ride of at most this many stops ...
    fare: int  # ... costs this many fen


@dataclasses.dataclass(frozen=True)
class DistanceFare:
    stages: tuple[Stage, ...]  # ascending; a ride longer than the last stage pays the last stage's fare
    max_trip_minutes: int = 180  # an entry older than this is an unfinished trip, not this trip's start

    @property
    def max_fare(self) -> int:
        return max(s.fare for s in self.stages)

    def fare_for(self, stops: int) -> int:
        for stage in self.stages:
            if stops <= stage.up_to_stops:
                return stage.fare
        return self.stages[-1].fare


@dataclasses.dataclass(frozen=True)
class StopPoint:
    """One stop of a route: its number on the route (what a distance fare counts) and where it is."""

    number: int  # 0..255, the transit record's one byte
    lat: float  # degrees north, WGS-84
    lon: float  # degrees east


@dataclasses.dataclass(frozen=True)
class Transfer:
    window_minutes: int = 0
    discount: int = 0  # fen off a boarding on another route within the window


@dataclasses.dataclass(frozen=True)
class FareTable:
    version: int
    flat: dict[str, int] = dataclasses.field(default_factory=dict)  # route code -> fare in fen
    distance: dict[str, DistanceFare] = dataclasses.field(default_factory=dict)  # route code -> stages
    discounts: dict[int, int] = dataclasses.field(default_factory=dict)  # card type -> percent of the fare paid
    transfer: Transfer = Transfer()
    min_balance: int = 0  # fen a card must hold to board at all
    stops: dict[str, tuple[StopPoint, ...]] = dataclasses.field(default_factory=dict)  # route -> its stops

    def __post_init__(self):
        if not isinstance(self.version, int) or self.version < 0:
            raise FareError(f"fare table version must be a non-negative integer, got {self.version!r}")
        for route, fare in self.flat.items():
            _need_fen(fare, f"flat fare of route {route!r}")
        for route, d in self.distance.items():
            if not d.stages:
                raise FareError(f"route {route!r} has no fare stages")
            if route in self.flat:
                raise FareError(f"route {route!r} has both a flat and a distance fare")
            ups = [s.up_to_stops for s in d.stages]
            if ups != sorted(set(ups)) or ups[0] < 0:
                raise FareError(f"route {route!r}: stages must go up in stops, got {ups}")
            for s in d.stages:
                _need_fen(s.fare, f"stage fare of route {route!r}")
        for card_type, percent in self.discounts.items():
            if not isinstance(percent, int) or not 0 <= percent <= 100:
                raise FareError(f"card type {card_type} pays {percent!r}%: must be 0 to 100")
        for route, points in self.stops.items():
            numbers = [p.number for p in points]
            if len(set(numbers)) != len(numbers):
                raise FareError(f"route {route!r}: a stop number appears twice in its stops: {numbers}")
            for p in points:
                if isinstance(p.number, bool) or not isinstance(p.number, int) or not 0 <= p.number <= 0xFF:
                    raise FareError(f"route {route!r}: stop number {p.number!r} must be 0..255")
                if not (-90 <= p.lat <= 90 and -180 <= p.lon <= 180):
                    raise FareError(f"route {route!r} stop {p.number}: ({p.lat}, {p.lon}) is not a place on earth")
        _need_fen(self.transfer.discount, "transfer discount")
        _need_fen(self.min_balance, "minimum balance")

    def max_fare(self, route: str) -> int:
        if route in self.distance:
            return self.distance[route].max_fare
        return self._flat(route)

    def _flat(self, route: str) -> int:
        try:
            return self.flat[route]
        except KeyError:
            raise FareError(f"fare table v{self.version} has no fare for route {route!r}: "
                            "push a fare table that includes it") from None

    def _discounted(self, fare: int, card_type: int) -> int:
        percent = self.discounts.get(card_type, 100)
        return (fare * percent + 50) // 100  # to the nearest fen, halves up

    # --- the parameter file ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"version": self.version, "flat": dict(self.flat),
                "distance": {r: {"stages": [[s.up_to_stops, s.fare] for s in d.stages],
                                 "max_trip_minutes": d.max_trip_minutes} for r, d in self.distance.items()},
                "discounts": {str(k): v for k, v in self.discounts.items()},
                "transfer": {"window_minutes": self.transfer.window_minutes, "discount": self.transfer.discount},
                "min_balance": self.min_balance,
                **({"stops": {r: [[p.number, p.lat, p.lon] for p in pts] for r, pts in self.stops.items()}}
                   if self.stops else {})}

    @classmethod
    def from_dict(cls, doc: dict) -> FareTable:
        """A fare table from its parameter file (JSON or TOML); anything malformed is a FareError saying what."""
        try:
            distance = {str(r): DistanceFare(tuple(Stage(int(u), int(f)) for u, f in d["stages"]),
                                             int(d.get("max_trip_minutes", 180)))
                        for r, d in doc.get("distance", {}).items()}
            transfer = doc.get("transfer", {})
            return cls(version=doc["version"], flat={str(r): v for r, v in doc.get("flat", {}).items()},
                       distance=distance, discounts={int(k): v for k, v in doc.get("discounts", {}).items()},
                       transfer=Transfer(int(transfer.get("window_minutes", 0)), transfer.get("discount", 0)),
                       min_balance=doc.get("min_balance", 0),
                       stops={str(r): tuple(StopPoint(_stop_number(n), float(lat), float(lon)) for n, lat, lon in pts)
                              for r, pts in doc.get("stops", {}).items()})
        except FareError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FareError(f"malformed fare table: {type(e).__name__}: {e}") from None


def _stop_number(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FareError(f"a stop number must be a whole number, got {value!r}")
    return value


def _need_fen(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise FareError(f"{what} must be a whole number of fen, got {value!r}")


class Step(str, enum.Enum):
    RIDE = "ride"  # flat fare, paid on boarding
    ENTRY = "entry"  # boarding a distance-fare route: nothing yet, the entry stop goes on the card
    EXIT = "exit"  # alighting from a distance-fare route: the fare for the stops ridden


@dataclasses.dataclass(frozen=True)
class Quote:
    step: Step
    amount: int  # what the card pays now, fen
    full_fare: int  # the same before card-type and transfer discounts
    required_balance: int  # the card must hold at least this much, or it is refused
    entry_stop: int = 0
    exit_stop: int = 0
    note: str = ""  # why the amount is what it is, when it is not the plain fare (goes into the record)


def quote(table: FareTable, *, route: str, stop: int, card_type: int, last: TransitRecord | None,
          now: datetime) -> Quote:
    """Price one rider tap. ``last`` is the transit record read from the card (None for a new card)."""
    notes: list[str] = []
    # An unfinished distance-fare trip that this tap does not end is charged at that route's maximum fare.
    recovery = 0
    if last is not None and last.state is TripState.ON_BOARD:
        if route in table.distance and route_matches(last.route, route) and \
                now - last.at <= timedelta(minutes=table.distance[route].max_trip_minutes):
            d = table.distance[route]
            stops = abs(stop - last.entry_stop)
            full = d.fare_for(stops)
            amount = table._discounted(full, card_type)
            return Quote(Step.EXIT, amount, full, required_balance=amount, entry_stop=last.entry_stop,
                         exit_stop=stop, note=f"{stops} stops")
        known = _route_named(table, last.route)
        unfinished_full = table.max_fare(known if known is not None else route)
        recovery = table._discounted(unfinished_full, card_type)
        notes.append(f"unfinished trip on {last.route} from {last.at:%Y-%m-%d %H:%MZ}: {recovery} fen recovered")

    if route in table.distance:
        max_fare = table._discounted(table.distance[route].max_fare, card_type)
        return Quote(Step.ENTRY, recovery, recovery, required_balance=max(table.min_balance, recovery + max_fare),
                     entry_stop=stop, note="; ".join(notes))

    full = table._flat(route)
    amount = table._discounted(full, card_type)
    t = table.transfer
    # A transfer follows a paid ride; an unfinished (evaded) trip earns none.
    if (t.discount and last is not None and last.state is TripState.DONE and not route_matches(last.route, route)
            and timedelta(0) <= now - last.at <= timedelta(minutes=t.window_minutes)):
        off = min(t.discount, amount)
        amount -= off
        notes.append(f"transfer from {last.route}: {off} fen off")
    return Quote(Step.RIDE, amount + recovery, full + recovery, required_balance=max(table.min_balance,
                 amount + recovery), note="; ".join(notes))


def _route_named(table: FareTable, route_on_card: str) -> str | None:
    """The table's route whose code the card kept (first 12 bytes), or None if the table has no such route."""
    return next((r for r in (*table.flat, *table.distance) if route_matches(route_on_card, r)), None)

"""Where the bus is: a GPS receiver (NMEA 0183 on a serial port) snapped to the route's stops, and the driver's stop
button when there is no fix. A distance fare counts the stops between a rider's entry and exit taps, so the terminal
must know the stop (``Terminal.at_stop``); the route's stops and their coordinates come with the fare table
(``validator.fares.FareTable.stops``).

NMEA 0183, the two sentences every receiver sends (any talker: GP, GN, BD, GL, GA):

- ``$--RMC,hhmmss.ss,A,ddmm.mmmm,N,dddmm.mmmm,E,knots,course,ddmmyy,...*hh``: status ``A`` is a fix, ``V`` none;
- ``$--GGA,hhmmss.ss,ddmm.mmmm,N,dddmm.mmmm,E,quality,satellites,hdop,altitude,M,...*hh``: quality 0 is no fix.

The checksum ``hh`` is the XOR of every character between ``$`` and ``*``; a sentence without it, or with a wrong
one, is dropped (a serial line picks up noise). Written here rather than taken from pynmea2: two sentences, ~60 lines,
and the checksum rule is the part that matters; the parser is pure (``parse_sentence``), tested on its own.

Snapping (``StopLocator``): the nearest stop within ``radius_m`` (default 40 m) becomes the bus's stop. Between
stops the bus keeps the last one it reached (a rider tapping off just after the doors close pays to that stop).
Hysteresis: a bus at stop A moves to stop B only when B is nearer than A by more than ``margin_m`` (default 15 m),
so the jitter of a fix (a few metres to tens of metres in a street canyon) between two close stops (the two sides
of a road, a terminus loop) does not flip the stop back and forth.

The stop button (``StopButton``): a named pipe (FIFO) the driver's console or a GPIO button daemon writes lines
into: ``next`` (or an empty line: one press), ``back``, or a stop number. It works with or without GPS; the last
word wins until the next one.

The GPS receiver and the button run in their own threads and only post the stop into a ``Position``; the main loop
(validator.app) hands it to the terminal between taps, never in the middle of one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from validator.fares import StopPoint

log = logging.getLogger(__name__)

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG)
DEFAULT_RADIUS_M = 40.0
DEFAULT_MARGIN_M = 15.0


class NmeaError(ValueError):
    """A line that is not a well-formed NMEA sentence (bad checksum, missing fields)."""


@dataclasses.dataclass(frozen=True)
class Fix:
    lat: float  # degrees, north positive
    lon: float  # degrees, east positive
    sentence: str  # "RMC" or "GGA"


def checksum(body: str) -> int:
    """The NMEA checksum of the characters between ``$`` and ``*``."""
    value = 0
    for ch in body.encode("ascii"):
        value ^= ch
    return value


def _degrees(value: str, hemisphere: str, width: int) -> float:
    """``ddmm.mmmm`` (``width`` = 2) or ``dddmm.mmmm`` (3) and N/S/E/W as signed degrees."""
    if len(value) < width + 2 or hemisphere not in ("N", "S", "E", "W"):
        raise NmeaError(f"not a position: {value!r} {hemisphere!r}")
    try:
        degrees, minutes = int(value[:width]), float(value[width:])
    except ValueError:
        raise NmeaError(f"not a position: {value!r}") from None
    if not 0 <= minutes < 60:
        raise NmeaError(f"minutes out of range in {value!r}")
    signed = degrees + minutes / 60
    return -signed if hemisphere in ("S", "W") else signed


def parse_sentence(line: str | bytes) -> Fix | None:
    """The position an RMC or GGA sentence reports; None for a sentence without a fix or of another kind.
    NmeaError for a line that is not a sentence or whose checksum is wrong."""
    if isinstance(line, bytes):
        line = line.decode("ascii", errors="replace")
    line = line.strip()
    if not line.startswith("$") or len(line) < 9 or line[-3] != "*":
        raise NmeaError(f"not an NMEA sentence with a checksum: {line[:80]!r}")
    body, given = line[1:-3], line[-2:]
    try:
        expected = int(given, 16)
    except ValueError:
        raise NmeaError(f"checksum {given!r} is not hex") from None
    if checksum(body) != expected:
        raise NmeaError(f"checksum {given} does not match {checksum(body):02X}: {line[:80]!r}")
    fields = body.split(",")
    kind = fields[0][2:] if len(fields[0]) == 5 else ""
    try:
        if kind == "RMC":
            if fields[2] != "A":
                return None
            return Fix(_degrees(fields[3], fields[4], 2), _degrees(fields[5], fields[6], 3), "RMC")
        if kind == "GGA":
            if not fields[6] or fields[6] == "0":
                return None
            return Fix(_degrees(fields[2], fields[3], 2), _degrees(fields[4], fields[5], 3), "GGA")
    except IndexError:
        raise NmeaError(f"{kind} sentence is missing fields: {line[:80]!r}") from None
    return None


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (haversine): good to a few metres at a stop's scale."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


class StopLocator:
    """Snap positions to a route's stops, with a radius and hysteresis (see the module)."""

    def __init__(self, stops: Sequence[StopPoint], *, radius_m: float = DEFAULT_RADIUS_M,
                 margin_m: float = DEFAULT_MARGIN_M):
        self.stops = tuple(stops)
        self.radius_m = radius_m
        self.margin_m = margin_m
        self.current: StopPoint | None = None

    def update(self, lat: float, lon: float) -> int | None:
        """The stop number when this position changes the bus's stop, else None."""
        if not self.stops:
            return None
        nearest, away = min(((s, distance_m(lat, lon, s.lat, s.lon)) for s in self.stops), key=lambda x: x[1])
        if away > self.radius_m or nearest == self.current:
            return None
        if self.current is not None and distance_m(lat, lon, self.current.lat, self.current.lon) - away \
                <= self.margin_m:
            return None
        self.current = nearest
        return nearest.number


class Position:
    """The bus's stop as the GPS or the stop button last said, handed from their threads to the main loop."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stop: int | None = None
        self._new = False
        self.source = ""

    def set(self, number: int, source: str) -> None:
        if not 0 <= number <= 0xFF:
            log.warning("stop %d from %s ignored: a stop number is 0..255", number, source)
            return
        with self._lock:
            self._stop, self._new, self.source = number, True, source

    @property
    def stop(self) -> int | None:
        with self._lock:
            return self._stop

    def take(self) -> int | None:
        """The stop set since the last take (None if none was)."""
        with self._lock:
            if not self._new:
                return None
            self._new = False
            return self._stop


class GpsReceiver:
    """Read NMEA from a serial port (pyserial) in a thread; post each new stop to ``position``. ``stops()`` gives the
    current route's stops (read again at every fix, so a new fare table's stops are used from its first fix)."""

    def __init__(self, device: str, position: Position, stops: Callable[[], Sequence[StopPoint]], *,
                 baud: int = 9600, radius_m: float = DEFAULT_RADIUS_M, margin_m: float = DEFAULT_MARGIN_M):
        self.device, self.baud = device, baud
        self.position = position
        self._stops = stops
        self.radius_m, self.margin_m = radius_m, margin_m
        self._locator = StopLocator((), radius_m=radius_m, margin_m=margin_m)
        self.counts = {"sentences": 0, "fixes": 0, "bad": 0, "stops": 0}
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpsReceiver:
        self._thread = threading.Thread(target=self._run, name=f"gps {self.device}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def feed(self, line: bytes | str) -> int | None:
        """Handle one line from the receiver; the new stop number, if it changed the stop."""
        self.counts["sentences"] += 1
        try:
            fix = parse_sentence(line)
        except NmeaError as e:
            self.counts["bad"] += 1
            log.debug("gps %s: %s", self.device, e)
            return None
        if fix is None:
            return None
        self.counts["fixes"] += 1
        stops = tuple(self._stops())
        if stops != self._locator.stops:  # a new fare table (or route): start over from its stops
            self._locator = StopLocator(stops, radius_m=self.radius_m, margin_m=self.margin_m)
        number = self._locator.update(fix.lat, fix.lon)
        if number is not None:
            self.counts["stops"] += 1
            log.info("gps: at stop %d (%.6f, %.6f)", number, fix.lat, fix.lon)
            self.position.set(number, "gps")
        return number

    def _run(self) -> None:
        import serial

        while not self._halt.is_set():
            try:
                with serial.Serial(self.device, self.baud, timeout=0.5) as port:
                    while not self._halt.is_set():
                        line = port.readline()
                        if line:
                            self.feed(line)
            except (serial.SerialException, OSError) as e:
                log.error("gps %s: %s; trying again in 2 s (check the receiver's cable); the stop button still "
                          "works", self.device, e)
                self._halt.wait(2.0)


class StopButton:
    """The driver's stop button as lines on a named pipe (see the module): ``next``/empty, ``back``, a number."""

    def __init__(self, path: str | Path, position: Position):
        self.path = Path(path)
        self.position = position
        if not self.path.exists():
            os.mkfifo(self.path, 0o620)
        elif not stat.S_ISFIFO(self.path.stat().st_mode):
            raise ValueError(f"stop button {self.path} exists and is not a named pipe (FIFO): remove it or give "
                             "another path")
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StopButton:
        self._thread = threading.Thread(target=self._run, name=f"stop button {self.path}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        try:  # wake a reader blocked in open(): open the write end without waiting
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=3)

    def press(self, word: str) -> int | None:
        """One line from the pipe; the stop it sets (None for a word not understood)."""
        word = word.strip().lower()
        here = self.position.stop
        if word in ("", "next", "n"):
            number = 0 if here is None else here + 1
        elif word in ("back", "prev", "b"):
            number = max(0, (here or 0) - 1)
        elif word.isdigit():
            number = int(word)
        else:
            log.warning("stop button: %r is not next, back or a stop number; ignored", word)
            return None
        if number > 0xFF:
            log.warning("stop button: stop %d is beyond 255; ignored", number)
            return None
        log.info("stop button: at stop %d", number)
        self.position.set(number, "button")
        return number

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                with open(self.path, encoding="utf-8", errors="replace") as pipe:  # blocks until a writer opens
                    for line in pipe:
                        if self._halt.is_set():
                            return
                        self.press(line)
            except OSError as e:
                log.error("stop button %s: %s", self.path, e)
                self._halt.wait(1.0)

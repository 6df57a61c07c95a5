"""A GPS receiver on a pseudo-terminal, speaking NMEA 0183 as a bus's receiver does: an RMC and a GGA sentence with
valid checksums for its current position, ``rate`` times a second (real receivers: once a second; tests go faster).

``SimGps()`` opens a pty pair and talks on the master side from a thread; ``.path`` is the slave device to give the
validator (``farebox validator run --gps /dev/pts/N``). The test moves it:

- ``move_to(lat, lon)``: the position of the next sentences (``drive(points)`` walks a list, ``dwell`` s each);
- ``lose_fix()``: RMC status ``V`` and GGA quality 0 (a tunnel) until the next ``move_to``;
- ``corrupt_next(n)``: the next ``n`` sentences go out with a wrong checksum (line noise); the validator must drop
  them. ``sent`` counts sentences, ``corrupted`` the damaged ones.

``interpolate(a, b, n)`` gives ``n`` points between two stops, for a bus between them.
"""

from __future__ import annotations

import os
import threading
import time
import tty
from datetime import UTC, datetime
from typing import Self


def _checksum(body: str) -> str:
    value = 0
    for ch in body.encode("ascii"):
        value ^= ch
    return f"{value:02X}"


def _lat(value: float) -> tuple[str, str]:
    d = abs(value)
    return f"{int(d):02d}{(d - int(d)) * 60:07.4f}", "N" if value >= 0 else "S"


def _lon(value: float) -> tuple[str, str]:
    d = abs(value)
    return f"{int(d):03d}{(d - int(d)) * 60:07.4f}", "E" if value >= 0 else "W"


def sentences(lat: float | None, lon: float | None, at: datetime, *, talker: str = "GN") -> list[str]:
    """The RMC and GGA sentences (with ``$``, checksum and CR LF) for a position; no fix when ``lat`` is None."""
    hms, dmy = at.strftime("%H%M%S") + ".00", at.strftime("%d%m%y")
    if lat is None or lon is None:
        rmc = f"{talker}RMC,{hms},V,,,,,,,{dmy},,,N"
        gga = f"{talker}GGA,{hms},,,,,0,00,99.9,,M,,M,,"
    else:
        (la, ns), (lo, ew) = _lat(lat), _lon(lon)
        rmc = f"{talker}RMC,{hms},A,{la},{ns},{lo},{ew},12.5,87.0,{dmy},,,A"
        gga = f"{talker}GGA,{hms},{la},{ns},{lo},{ew},1,09,0.9,18.2,M,-3.1,M,,"
    return [f"${body}*{_checksum(body)}\r\n" for body in (rmc, gga)]


def interpolate(a: tuple[float, float], b: tuple[float, float], n: int) -> list[tuple[float, float]]:
    """``n`` points strictly between ``a`` and ``b``, evenly spaced."""
    return [(a[0] + (b[0] - a[0]) * i / (n + 1), a[1] + (b[1] - a[1]) * i / (n + 1)) for i in range(1, n + 1)]


class SimGps:
    def __init__(self, lat: float | None = None, lon: float | None = None, *, rate: float = 10.0):
        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        # A UART does not wait for a listener: what nobody reads in time is lost, not queued until the pty is full.
        os.set_blocking(self._master, False)
        self.rate = rate
        self._lock = threading.Lock()
        self._where: tuple[float, float] | None = (lat, lon) if lat is not None and lon is not None else None
        self._corrupt = 0
        self.sent = 0
        self.corrupted = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._talk, name=f"sim gps {self.path}", daemon=True)
        self._thread.start()

    def move_to(self, lat: float, lon: float) -> None:
        with self._lock:
            self._where = (lat, lon)

    def drive(self, points, dwell: float = 0.3) -> None:
        for lat, lon in points:
            self.move_to(lat, lon)
            time.sleep(dwell)

    def lose_fix(self) -> None:
        with self._lock:
            self._where = None

    def corrupt_next(self, n: int = 1) -> None:
        with self._lock:
            self._corrupt += n

    def _talk(self) -> None:
        while not self._halt.wait(1.0 / self.rate):
            with self._lock:
                where, corrupt = self._where, self._corrupt > 0
                if corrupt:
                    self._corrupt -= 1
            lines = sentences(*(where or (None, None)), datetime.now(UTC))
            if corrupt:  # one character flipped after the checksum was computed, as noise on the line does
                lines = [line.replace(",", ";", 1) for line in lines]
                self.corrupted += len(lines)
            try:
                os.write(self._master, "".join(lines).encode("ascii"))
            except BlockingIOError:  # the validator is not reading (yet): these sentences are lost, as on a wire
                continue
            except OSError:  # the slave side is gone (closed): nothing more to say
                return
            self.sent += len(lines)

    def close(self) -> None:
        if self._halt.is_set():
            return
        self._halt.set()
        self._thread.join(timeout=2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:  # already closed
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

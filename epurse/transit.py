"""The transit record a validator keeps on the card: where and when this card last boarded or alighted.

JT/T 978 validators write it with UPDATE CAPP DATA CACHE inside a composite purchase (INITIALIZE FOR PURCHASE with
P1 = 03, transaction type 09), so the record and the debit change together or not at all. The next validator reads it
back (READ RECORD 2 of the composite-application file, SFI 17) to:

- charge a distance fare on the way out (the entry stop is on the card, not in any database the bus can reach);
- recover an evaded fare: a card still "on board" from an earlier trip pays that route's maximum fare;
- give a transfer discount: the last boarding was on another route a few minutes ago;
- tell a second tap on the same validator "already paid".

The card stores the 64 bytes as they are; their layout is farebox's, written down here (all numbers big-endian)::

    offset size  field
    0      1     record tag 02
    1      1     length of what follows, 3E (62)
    2      1     state: 00 empty, 01 on board (entered a distance-fare route), 02 trip done (flat fare or exit)
    3      1     entry stop (index on the route, 0 on flat routes)
    4      1     exit stop (0 until the rider alights)
    5      12    route code, ASCII, NUL-padded (longer codes keep their first 12 bytes)
    17     12    vehicle code, ASCII, NUL-padded
    29     12    driver staff number, ASCII, NUL-padded
    41     6     terminal number (the PSAM's)
    47     4     date, BCD YYYYMMDD, UTC (the same instant the TAC covers)
    51     3     time, BCD HHMMSS, UTC
    54     4     amount this transaction took, fen
    58     4     full fare before discounts, fen
    62     2     reserved, 0000
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime

from epurse.crypto import bcd_date, bcd_time, parse_bcd_date, parse_bcd_time

RECORD_LEN = 64
TAG = 0x02
CODE_LEN = 12


class TripState(enum.IntEnum):
    EMPTY = 0x00
    ON_BOARD = 0x01
    DONE = 0x02


class TransitRecordError(ValueError):
    pass


def _code(text: str, name: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise TransitRecordError(f"{name} {text!r} is not ASCII") from None
    return raw[:CODE_LEN].ljust(CODE_LEN, b"\x00")


def _text(raw: bytes, name: str) -> str:
    raw = raw.rstrip(b"\x00")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise TransitRecordError(f"{name} is not ASCII: {raw.hex()}") from None


@dataclasses.dataclass(frozen=True)
class TransitRecord:
    state: TripState
    route: str
    vehicle: str
    driver: str
    terminal_id: bytes  # 6 bytes
    at: datetime  # aware UTC, whole seconds
    amount: int
    full_fare: int
    entry_stop: int = 0
    exit_stop: int = 0

    def encode(self) -> bytes:
        """The 64 bytes UPDATE CAPP DATA CACHE writes."""
        if len(self.terminal_id) != 6:
            raise TransitRecordError("terminal number must be 6 bytes")
        for name in ("entry_stop", "exit_stop"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise TransitRecordError(f"{name} must fit in one byte")
        for name in ("amount", "full_fare"):
            if not 0 <= getattr(self, name) <= 0xFFFFFFFF:
                raise TransitRecordError(f"{name} must fit in 4 bytes")
        at = self.at.astimezone(UTC)
        out = (bytes([TAG, RECORD_LEN - 2, int(self.state), self.entry_stop, self.exit_stop])
               + _code(self.route, "route") + _code(self.vehicle, "vehicle") + _code(self.driver, "driver")
               + bytes(self.terminal_id) + bcd_date(at) + bcd_time(at)
               + self.amount.to_bytes(4, "big") + self.full_fare.to_bytes(4, "big") + bytes(2))
        assert len(out) == RECORD_LEN
        return out

    @classmethod
    def decode(cls, data: bytes) -> TransitRecord | None:
        """The record read from a card; None for a card that has never been written (all zero, or tag 00)."""
        if len(data) != RECORD_LEN:
            raise TransitRecordError(f"a transit record is {RECORD_LEN} bytes, got {len(data)}")
        if data[0] == 0x00 and not any(data):
            return None
        if data[0] != TAG or data[1] != RECORD_LEN - 2:
            raise TransitRecordError(f"not a farebox transit record (tag {data[0]:02X}, length {data[1]:02X})")
        try:
            state = TripState(data[2])
        except ValueError:
            raise TransitRecordError(f"unknown trip state {data[2]:02X}") from None
        if state is TripState.EMPTY:
            return None
        try:
            day, clock = parse_bcd_date(data[47:51]), parse_bcd_time(data[51:54])
        except ValueError as e:
            raise TransitRecordError(f"bad date or time in the transit record: {e}") from None
        return cls(state=state, entry_stop=data[3], exit_stop=data[4], route=_text(data[5:17], "route"),
                   vehicle=_text(data[17:29], "vehicle"), driver=_text(data[29:41], "driver"),
                   terminal_id=bytes(data[41:47]), at=datetime.combine(day, clock, tzinfo=UTC),
                   amount=int.from_bytes(data[54:58], "big"), full_fare=int.from_bytes(data[58:62], "big"))


def route_matches(record_route: str, route: str) -> bool:
    """Whether the route code kept on a card (first 12 bytes) names ``route``."""
    return record_route == route.encode("ascii", "replace")[:CODE_LEN].decode("ascii", "replace")

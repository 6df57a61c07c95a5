"""The API's input types, one set for every router: each says what it accepts, and anything else is a 422 that names
the field and the rule, before a use case or the database sees it.

Why these and not bare ``str``/``int``: PostgreSQL refuses a NUL byte in text, a bigint holds 64 bits, a column
holds so many characters, and a JSON ``30.00`` is not a number of fen. Each of those used to reach the database (or
the money) and come back as a 500, or worse, as 30 fen. Use them in bodies (pydantic fields) and in path and query
parameters alike::

    def view(*, operator: OperatorCode, item_id: RowId, body: Decision) -> dict: ...

    class Money(BaseModel):
        amount: SignedFen
        why: Text(500, min_length=1)
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, ValidationInfo

from wire import topics

MAX_FEN = 0xFFFFFFFF  # a card's 4-byte amount field (backoffice.registry.MAX_FEN)
MAX_ROW_ID = 2**63 - 1  # a BIGINT primary key
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline and carriage return are text


def _no_control(value: str) -> str:
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"text must not contain control characters such as NUL (found {found.group()!r} at "
                         f"position {found.start()})")
    return value


def Text(max_length: int, *, min_length: int = 0) -> Any:  # noqa: N802 (a type factory, read as a type)
    """Free text of at most ``max_length`` characters (its column's size), no NUL or other control characters."""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length),
                     AfterValidator(_no_control)]


def _whole_fen(value: object, info: ValidationInfo) -> object:
    # bool is an int in Python, 30.0 == 30 and "3000" parses: refuse all three, money is integer fen, sent as a
    # JSON integer. The message names the field (the 422's loc does too) and the unit.
    if isinstance(value, bool) or not isinstance(value, int):
        field = info.field_name or "amount"
        raise ValueError(f"{field} is integer fen, a JSON whole number (3000 for 30 yuan), not "
                         f"{type(value).__name__} {value!r}")
    return value


def _device_id(value: str) -> str:
    try:
        return topics.check_device_id(value)
    except topics.DeviceIdError as e:
        raise ValueError(str(e)) from None


# Money: integer fen only (a JSON 30.00 or "30" is refused, never read as 30 fen), within a card's 4-byte field
Fen = Annotated[int, Field(ge=1, le=MAX_FEN, description="integer fen (a JSON whole number; 2.5, \"200\" and true "
                                                        "are refused)"), BeforeValidator(_whole_fen)]
SignedFen = Annotated[int, Field(ge=-MAX_FEN, le=MAX_FEN, description="integer fen with its sign"),
                      BeforeValidator(_whole_fen)]
FenOrZero = Annotated[int, Field(ge=0, le=MAX_FEN, description="integer fen, 0 or more"), BeforeValidator(_whole_fen)]
# A commission rate in basis points (60 = 0.60 %): an integer, never a float percentage
RateBp = Annotated[int, Field(strict=True, ge=0, le=10_000, description="basis points, 0-10000 (60 = 0.60 %), a "
                                                                         "JSON whole number")]
# An operator's service-day cut-off: the local hour its day ends
CutoffHour = Annotated[int, Field(strict=True, ge=0, le=23, description="local hour the service day ends (0-23)")]


def FenUpTo(limit: int) -> Any:  # noqa: N802 (a type factory)
    """Fen, a whole number from 1 to ``limit`` (a top-up's ceiling, say)."""
    return Annotated[int, Field(ge=1, le=min(limit, MAX_FEN), description="integer fen"),
                     BeforeValidator(_whole_fen)]
# Codes and keys
Code = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
OperatorCode = Code
DeviceId = Annotated[str, StringConstraints(min_length=1, max_length=32), AfterValidator(_device_id)]
Asn = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{20}$"), Field(description="20 hex digits")]
OrderId = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")]
TerminalId = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{12}$"), Field(description="12 hex digits")]
Plate = Text(32, min_length=1)  # vehicle.plate is VARCHAR(32)
Name = Text(200, min_length=1)  # route, driver, fleet names: VARCHAR(200)
Reason = Text(500)  # audit reasons, notes, resolutions: VARCHAR(500)
StopCode = Text(64, min_length=1)  # stop.code is VARCHAR(64)
# Numbers the database stores as BIGINT / INTEGER
RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]
SmallCount = Annotated[int, Field(ge=0, le=2**31 - 1)]
MAX_OFFSET = 2**31 - 1  # a page's offset: far past any table, and never past what the database's LIMIT/OFFSET take


# A service day the back office can work with: its bounds (the next day's cut-off, a month's end) stay inside what a
# date holds. 9999-12-31 used to overflow into a 500.
ServiceDay = Annotated[date, Field(ge=date(2000, 1, 1), le=date(2099, 12, 31),
                                   description="a service day, YYYY-MM-DD (2000-01-01 to 2099-12-31)")]

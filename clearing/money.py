"""Integer fen shown as yuan, by integer arithmetic only (never through a float): the one formatter of the back
office's pages, the reports (PDF, CSV, XLSX) and the command line.

The validator keeps its screen's own (``validator.messages.yuan``): by DESIGN.md it imports only epurse, wire and
blacklist, and the reports only clearing, so no module can serve both; it prints the same text as
``yuan(fen, grouping=False)`` (tests/unit/test_money.py holds them to that).
"""

from __future__ import annotations

import operator
from decimal import Decimal


def whole_fen(fen) -> int:
    """``fen`` as a Python int: an int, a numpy integer or a whole Decimal (PostgreSQL's SUM hands those back).
    A float, a bool or a fraction of a fen is refused (TypeError): it means money was rounded somewhere."""
    if isinstance(fen, bool):
        raise TypeError(f"an amount in fen is an integer, not {fen!r}")
    if isinstance(fen, Decimal):
        if fen != fen.to_integral_value():
            raise TypeError(f"an amount in fen is a whole number, got {fen}")
        return int(fen)
    try:
        return operator.index(fen)  # ints and numpy integers; floats and text are refused here
    except TypeError:
        raise TypeError(f"an amount in fen is an integer, got {fen!r} ({type(fen).__name__})") from None


def yuan(fen, *, grouping: bool = True, symbol: str = "") -> str:
    """Fen as yuan with two decimals: 123450 -> "1,234.50"; ``grouping=False`` -> "1234.50" (what a spreadsheet
    parses); -5 -> "-0.05"; ``symbol="¥"`` -> "-¥0.05". None (a figure not known) -> "-"."""
    if fen is None:
        return "-"
    fen = whole_fen(fen)
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{symbol}{whole:,}.{cents:02d}" if grouping else f"{sign}{symbol}{whole}.{cents:02d}"


def yuan_decimal(fen) -> Decimal:
    """Fen as an exact Decimal yuan with two places: 123450 -> Decimal("1234.50")."""
    return Decimal(whole_fen(fen)).scaleb(-2)


def parse_yuan(text: str, *, allow_negative: bool = False) -> int:
    """What a person typed as yuan, as integer fen: "50" -> 5000, "2.00" -> 200, "¥1,234.5" -> 123450.
    More than two decimals, an exponent, words or (unless ``allow_negative``) a minus sign are refused with a
    ValueError that says what to type; nothing is rounded."""
    raw = str(text).strip()
    cleaned = raw.replace("¥", "").replace("￥", "").replace(",", "").replace(" ", "")
    sign = 1
    if cleaned.startswith("-"):
        if not allow_negative:
            raise ValueError(f"{raw!r}: an amount here cannot be negative")
        sign, cleaned = -1, cleaned[1:]
    whole, dot, cents = cleaned.partition(".")
    if not whole.isdigit() and not (dot and whole == "" and cents.isdigit()):
        raise ValueError(f"{raw!r} is not an amount in yuan: type e.g. 50 or 2.00")
    if dot and not (cents.isdigit() and len(cents) <= 2):
        raise ValueError(f"{raw!r}: yuan take at most two decimals (fen), e.g. 2.50")
    return sign * (int(whole or "0") * 100 + int((cents or "0").ljust(2, "0")))

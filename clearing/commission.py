"""The card issuer's commission and the operator's net, in integer fen.

The rate is in basis points (1 bp = 0.01 %) per operator. The rounding rule, written once here and used for every
figure a report prints:

1. **One invoice figure, rounded once.** The commission of a total is ``gross * rate_bp / 10000`` rounded half away
   from zero to whole fen (``commission_of``). Half away from zero (not banker's rounding) because the clerk's
   calculator does it that way, and it makes the commission of a reversal exactly the negative of the original.
2. **Rows share that figure by largest remainder.** A breakdown (by route, by vehicle, ...) does not round each row
   on its own (a thousand rows rounded separately can drift by hundreds of fen from the total and from each other);
   ``allocate`` gives each row the floor of its exact share ``gross_i * C / G`` and hands the fen left over, one each,
   to the rows with the largest remainders (ties: the row that comes first in the given order, i.e. by key). So every
   breakdown of the same gross sums to the same commission, to the fen.
3. **net = gross - commission**, per row and in total, so ``commission + net == gross`` holds exactly everywhere.

Python ints throughout: ``gross * commission`` of a big city's day does not fit comfortably in int64.
"""

from __future__ import annotations

from collections.abc import Sequence

BP_DENOMINATOR = 10_000  # basis points in one whole


def check_rate(rate_bp: int) -> int:
    if isinstance(rate_bp, bool) or not isinstance(rate_bp, int):
        raise TypeError(f"commission rate must be an int number of basis points, got {rate_bp!r}")
    if not 0 <= rate_bp <= BP_DENOMINATOR:
        raise ValueError(f"commission rate must be 0..{BP_DENOMINATOR} bp (0..100 %), got {rate_bp}")
    return rate_bp


def commission_of(gross: int, rate_bp: int) -> int:
    """``gross * rate_bp / 10000`` rounded half away from zero, in fen."""
    check_rate(rate_bp)
    gross = int(gross)
    quotient, remainder = divmod(abs(gross) * rate_bp, BP_DENOMINATOR)
    if 2 * remainder >= BP_DENOMINATOR:
        quotient += 1
    return quotient if gross >= 0 else -quotient


def split(gross: int, rate_bp: int) -> tuple[int, int]:
    """(commission, net) of one gross amount; commission + net == gross."""
    commission = commission_of(gross, rate_bp)
    return commission, int(gross) - commission


def allocate(grosses: Sequence[int], commission: int) -> list[int]:
    """Share ``commission`` among rows in proportion to their gross, by largest remainder (see the module doc).

    The rows must all have the same sign as their total (a day's purchases are all >= 0); the result sums to
    ``commission`` exactly. Rows with zero gross get zero.
    """
    grosses = [int(g) for g in grosses]
    total = sum(grosses)
    if total == 0:
        if commission:
            raise ValueError(f"cannot share a commission of {commission} fen among rows whose gross sums to 0")
        return [0] * len(grosses)
    if any(g * total < 0 for g in grosses):
        raise ValueError("allocate needs rows of one sign; settle refunds and reversals as their own lines")
    sign = -1 if total < 0 else 1
    total, commission = abs(total), commission * sign
    shares = []
    for i, g in enumerate(grosses):
        q, r = divmod(abs(g) * commission, total)
        shares.append([q, r, i])
    left = commission - sum(s[0] for s in shares)
    # Largest remainder first; on a tie the earlier row (sorted by key upstream) gets the fen.
    for s in sorted(shares, key=lambda s: (-s[1], s[2]))[:left]:
        s[0] += 1
    return [sign * s[0] for s in shares]


def split_rows(grosses: Sequence[int], rate_bp: int) -> tuple[list[int], list[int]]:
    """(commissions, nets) of the rows of one breakdown: the commission of their total, shared by ``allocate``."""
    commission = commission_of(sum(int(g) for g in grosses), rate_bp)
    commissions = allocate(grosses, commission)
    return commissions, [int(g) - c for g, c in zip(grosses, commissions, strict=True)]


def percent_text(rate_bp: int) -> str:
    """A rate as people read it: 60 bp -> "0.60%"."""
    whole, part = divmod(check_rate(rate_bp), 100)
    return f"{whole}.{part:02d}%"


def parse_percent(text: str) -> int:
    """What a person types for a rate ("0.6", "0.60%", "1.5 %") as basis points, exactly: at most two decimals (a
    basis point is 0.01 %), 0 to 100 %. ValueError saying what to type otherwise; never a float in between."""
    raw = text.strip().removesuffix("%").strip()
    whole, dot, part = raw.partition(".")
    if not whole.isdigit() and not (whole == "" and dot and part.isdigit()) or (dot and not part.isdigit()):
        raise ValueError(f"{text!r} is not a percentage: give e.g. 0.6 or 0.60% (the card issuer's commission)")
    if len(part) > 2:
        raise ValueError(f"{text!r}: a commission rate has at most two decimals (0.01 % = 1 basis point)")
    rate_bp = int(whole or "0") * 100 + int((part or "0").ljust(2, "0"))
    if rate_bp > BP_DENOMINATOR:
        raise ValueError(f"{text!r}: a commission rate is 0 to 100 %")
    return rate_bp

"""Ticket revenue in a clearing run: the recognition rules and the run's ticket rows. Pure: values and frames in,
int fen out (``backoffice.tickets.revenue`` loads and stores).

Money from a ticket sale is deferred (owed to riders as rides) until it is earned. It is recognised:

- **single ride, coach trip** (and any product that is not a pass): at each counting use, at the price paid. A
  ticket of ``n`` uses earns use ``k`` its share ``price*k//n - price*(k-1)//n`` (the shares add up to the price
  exactly); a ticket of unlimited uses earns its whole price at its first use.
- **a pass, rule ``per_ride``** (stated in the product with its ride value): each counting use earns the ride
  value, until the price is used up (use ``k`` earns ``clamp(price - (k-1)*value, 0, value)``).
- **a pass, rule ``spread``** (the default for passes): the price spread over the service days of validity, day
  ``i`` of ``n`` earning ``price*(i+1)//n - price*i//n``, recognised on that day whether ridden or not. Its uses are
  counted (rides by route / vehicle / driver) at 0 fen; its day shares carry route, vehicle and driver "" (a day of
  a pass is no ride).
- **breakage**: what an unused (or not used up) ticket still holds when its validity ends is recognised on its last
  service day of validity, on a line of its own (source ``breakage``). A use made within validity that arrives
  after that moves its value from breakage to the use (a negative breakage line beside it), so a ticket never earns
  more than its price.
- **refund**: a refunded ticket earns nothing; should revenue have been recognised on it before the refund (a
  spread pass refunded in its validity), the run after the refund takes it back on a ``refund`` line.
- **fraud**: a use that does not count (``ticket_use.revenue`` false: a second use of a single ride on another
  bus, a use after a refund, outside validity) never earns anything and is not in the run.

The card issuer's commission does not apply: ticket money comes through the payment platform, not the card
issuer, so every ticket row has commission 0 and net = gross, and ticket revenue is not part of what the issuer
pays the operator (``payable_*`` stays the card figure).

Each use, pass day, breakage and refund is recognised once, by the run that claims it (the unique ``ref``), like a
tap: a use of an earlier day that arrives after its day's run lands in the next run, section ``ticket_late``.
"""

from __future__ import annotations

from datetime import date

import pandas as pd

PASS_KINDS = ("day_pass", "month_pass")
# A pickup code redeemed at a station counter is a use on no bus: it lands on the ticket's route when the ticket has
# exactly one, else on this route line of its own (never a real route code: those have no spaces); its vehicle is
# the station's name, its driver "" (backoffice.tickets.redeem).
COUNTER_ROUTE = "station counter"
RULES = ("per_ride", "spread")
SOURCES = ("use", "pass_day", "breakage", "refund")
DIMENSIONS = ("operator", "route", "vehicle", "driver", "product", "channel", "source")
SECTION_DAY, SECTION_LATE = "ticket", "ticket_late"
LEDGER_COLUMNS = ("source", "ticket_id", "for_day", "route", "vehicle", "driver", "product", "channel", "amount")


def default_rule(kind: str) -> str:
    """What a product without a stated rule follows: passes spread over their days; others at use."""
    return "spread" if kind in PASS_KINDS else "at_use"


def share(price: int, parts: int, index: int) -> int:
    """Part ``index`` (0-based) of ``price`` fen split in ``parts``: the parts are int fen and add up to ``price``."""
    if parts <= 0:
        raise ValueError("a price is split in one part or more")
    return price * (index + 1) // parts - price * index // parts


def use_value(*, rule: str, price: int, uses_allowed: int, use_no: int, ride_value: int = 0) -> int:
    """Fen a counting use (``use_no`` 1, 2, ...) of a ticket earns under ``rule`` (see the module doc)."""
    if use_no < 1:
        raise ValueError("use numbers start at 1")
    if rule == "spread":
        return 0
    if rule == "per_ride":
        return max(0, min(ride_value, price - (use_no - 1) * ride_value))
    if uses_allowed <= 0:
        return price if use_no == 1 else 0
    return share(price, uses_allowed, use_no - 1) if use_no <= uses_allowed else 0


def ticket_rows(ledger: pd.DataFrame, operator: str, day: date) -> list[tuple]:
    """A run's ticket rows in ``clearing.runs.ROW_COLUMNS`` (section, dimension, key, for_day, taps, gross,
    commission, net) from the ledger lines it recognised (``LEDGER_COLUMNS``): section ``ticket`` for ``day``,
    ``ticket_late`` for each earlier day; ``taps`` counts the uses; commission 0 (see the module doc)."""
    out: list[tuple] = []
    if ledger.empty:
        return out
    frame = ledger.assign(uses=(ledger["source"] == "use").astype("int64"),
                          amount=ledger["amount"].astype("int64"))
    for for_day, part in sorted(frame.groupby("for_day"), key=lambda kv: kv[0]):
        section = SECTION_DAY if for_day == day else SECTION_LATE
        if for_day > day:
            raise ValueError(f"ticket revenue of {for_day} handed to the run of {day}: it belongs to a later run")
        gross = int(part["amount"].sum())
        out.append((section, "operator", operator, for_day, int(part["uses"].sum()), gross, 0, gross))
        for dim in DIMENSIONS[1:]:
            sums = part.groupby(part[dim].astype(str))[["uses", "amount"]].sum().sort_index()
            for key, row in sums.iterrows():
                out.append((section, dim, str(key), for_day, int(row["uses"]), int(row["amount"]), 0,
                            int(row["amount"])))
    return out

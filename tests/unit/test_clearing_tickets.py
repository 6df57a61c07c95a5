"""The ticket revenue rules (clearing.tickets), pure: a price split in parts adds up exactly, a ticket never earns
more than its price whatever the rule, and a run's ticket rows add up in every dimension with no commission."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearing.tickets import LEDGER_COLUMNS, default_rule, share, ticket_rows, use_value

DAY = date(2026, 12, 3)


@given(st.integers(0, 10**9), st.integers(1, 400))
def test_a_price_split_in_parts_adds_up_to_the_price(price, parts):
    shares = [share(price, parts, i) for i in range(parts)]
    assert sum(shares) == price and max(shares) - min(shares) <= 1


@given(st.integers(1, 10**7), st.integers(0, 255), st.integers(0, 10**6), st.sampled_from(["at_use", "per_ride",
                                                                                          "spread"]))
def test_a_ticket_never_earns_more_than_its_price(price, uses_allowed, ride_value, rule):
    rides = range(1, (uses_allowed or 3) + 5)
    earned = [use_value(rule=rule, price=price, uses_allowed=uses_allowed, use_no=k, ride_value=ride_value)
              for k in rides]
    assert all(v >= 0 for v in earned) and sum(earned) <= price
    if rule == "at_use":
        assert sum(earned) == price  # every ride it allows taken: the whole price
    if rule == "spread":
        assert sum(earned) == 0  # a spread pass earns by its days, not its rides


def test_the_rules_as_stated():
    assert default_rule("single") == default_rule("coach_trip") == "at_use"
    assert default_rule("day_pass") == default_rule("month_pass") == "spread"
    assert use_value(rule="at_use", price=3000, uses_allowed=1, use_no=1) == 3000
    assert use_value(rule="at_use", price=3000, uses_allowed=1, use_no=2) == 0  # a second use earns nothing
    assert [use_value(rule="at_use", price=1000, uses_allowed=3, use_no=k) for k in (1, 2, 3)] == [333, 333, 334]
    assert [use_value(rule="per_ride", price=600, uses_allowed=0, use_no=k, ride_value=250)
            for k in (1, 2, 3, 4)] == [250, 250, 100, 0]
    with pytest.raises(ValueError):
        use_value(rule="at_use", price=1, uses_allowed=1, use_no=0)


def test_a_runs_ticket_rows_add_up_in_every_dimension_with_no_commission():
    lines = pd.DataFrame([
        ("use", 1, DAY, "R1", "V1", "D1", "ride", "web", 200),
        ("use", 2, DAY, "R2", "V2", "D2", "month", "sms", 250),
        ("pass_day", 3, DAY, "", "", "", "day3", "partner", 500),
        ("use", 4, date(2026, 12, 2), "R2", "V1", "D3", "ride", "web", 200),
        ("breakage", 4, date(2026, 12, 2), "", "", "", "ride", "web", -200),
    ], columns=list(LEDGER_COLUMNS))
    rows = pd.DataFrame(ticket_rows(lines, "op", DAY),
                        columns=["section", "dimension", "key", "for_day", "taps", "gross", "commission", "net"])
    assert (rows["commission"] == 0).all() and (rows["net"] == rows["gross"]).all()
    for (section, _day), part in rows.groupby(["section", "for_day"]):
        top = part[part["dimension"] == "operator"][["taps", "gross"]].sum()
        for _dim, by in part.groupby("dimension"):
            assert by[["taps", "gross"]].sum().tolist() == top.tolist()
    day = rows[rows["section"] == "ticket"]
    assert day[day["dimension"] == "operator"][["taps", "gross"]].values.tolist() == [[2, 950]]
    late = rows[rows["section"] == "ticket_late"]
    assert late[late["dimension"] == "route"].set_index("key")["gross"].to_dict() == {"": -200, "R2": 200}
    with pytest.raises(ValueError, match="later run"):
        ticket_rows(lines, "op", date(2026, 12, 1))

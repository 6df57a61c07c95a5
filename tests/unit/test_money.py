"""Money as people read it: one formatter (clearing.money) for the back office's pages, reports and exports, held to
text worked out here by string slicing, and the validator's screen formatter held to the same text."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearing import money

ROOT = Path(__file__).resolve().parents[2]


def by_hand(fen: int, grouping: bool = True) -> str:
    """Yuan text by slicing the digits, not by divmod."""
    digits = str(abs(fen)).rjust(3, "0")
    whole, cents = digits[:-2], digits[-2:]
    if grouping:
        groups = []
        while len(whole) > 3:
            groups.insert(0, whole[-3:])
            whole = whole[:-3]
        whole = ",".join([whole, *groups])
    return ("-" if fen < 0 else "") + f"{whole}.{cents}"


@pytest.mark.parametrize("fen, grouped, plain", [
    (0, "0.00", "0.00"), (5, "0.05", "0.05"), (-5, "-0.05", "-0.05"), (100, "1.00", "1.00"),
    (123450, "1,234.50", "1234.50"), (-123456789, "-1,234,567.89", "-1234567.89")])
def test_yuan_text(fen, grouped, plain):
    assert money.yuan(fen) == grouped and money.yuan(fen, grouping=False) == plain
    assert money.yuan(-5, symbol="¥") == "-¥0.05" and money.yuan(123450, symbol="¥") == "¥1,234.50"
    assert money.yuan(None) == "-"


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_every_amount_against_the_digits(fen):
    assert money.yuan(fen) == by_hand(fen)
    assert money.yuan(fen, grouping=False) == by_hand(fen, grouping=False)
    assert money.yuan_decimal(fen) == Decimal(by_hand(fen, grouping=False))


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_the_validator_screen_shows_the_same_text(fen):
    from validator.messages import yuan as screen_yuan

    assert screen_yuan(fen) == money.yuan(fen, grouping=False)


def test_what_the_database_and_pandas_hand_over_is_taken_and_floats_are_refused():
    assert money.yuan(Decimal("123450")) == "1,234.50"  # PostgreSQL's SUM of a bigint column
    assert money.yuan(np.int64(-5)) == "-0.05"
    for bad in (12.5, 200.0, True, Decimal("1.5"), "200", np.float64(3.0)):
        with pytest.raises(TypeError):
            money.yuan(bad)


def test_the_pages_reports_and_exports_use_this_formatter():
    from backoffice.web import pages
    from reports import pdf, tables

    assert pdf.yuan is money.yuan and tables.yuan_decimal is money.yuan_decimal
    assert tables.yuan_text(-123450) == "-1234.50" and tables.yuan_text.func is money.yuan
    assert pages.yuan.func is money.yuan and pages.yuan(-123450) == "-¥1,234.50" and pages.yuan(None) == "-"
    defined = sorted(str(p.relative_to(ROOT)) for part in ("backoffice", "clearing", "reports", "farebox",
                                                            "validator")
                     for p in (ROOT / part).rglob("*.py") if re.search(r"^def yuan", p.read_text(), re.M))
    # the validator's screen keeps its own: by DESIGN.md it may not import clearing
    assert defined == ["clearing/money.py", "validator/messages.py"]

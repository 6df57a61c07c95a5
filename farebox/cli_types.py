"""Argument types shared by the `farebox` subcommands: each turns a typed text into a value, or says what to type."""

from __future__ import annotations

import argparse


def iso_time(text: str):
    from datetime import datetime

    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time, e.g. 2026-12-01T02:00:00+08:00") from None


def terminal_id(text: str) -> str:
    if len(text) != 12 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError("a PSAM terminal number is 12 hex digits, e.g. 010000000042")
    return text


def year_month(text: str) -> tuple[int, int]:
    year, _, month = text.partition("-")
    if not (year.isdigit() and month.isdigit() and 1 <= int(month) <= 12):
        raise argparse.ArgumentTypeError(f"{text!r} is not a month: give YYYY-MM")
    return int(year), int(month)


def fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = (-1.0,)
    if any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError("give fractions of the day from 0 to 1, e.g. 0.3,0.6")
    return values


def amount_in_yuan(text: str) -> int:
    """An amount a person types in yuan ("50", "2.00") as integer fen; the CLI never takes fen."""
    from clearing.money import parse_yuan

    try:
        return parse_yuan(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None

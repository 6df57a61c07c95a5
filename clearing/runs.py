"""A clearing run: one operator's service day settled by operator, fleet, route, vehicle, driver and card type, with
the card issuer's commission and the operator's net, plus the adjustments it carries for earlier days.

Which taps a run takes is decided in one place, when the run is stored: ``backoffice.clearing_runs`` claims the
stored taps no run has taken yet (see ``claim_taps`` there for why that, and not a time window, makes every tap
land in exactly one run). ``clear`` settles the taps handed to it, all of them, and only sorts them:

- **day**: purchases of service day ``day`` (``occurred_at`` in the day's half-open window ``[start, end)``, so a
  tap at exactly the 03:00:00 cut-off belongs to the day that starts then, and to no other).
- **late**: purchases of an earlier service day: they arrived after their own day's run was made, so they land
  here, on the day they were taken, as "adjustments for earlier days" (by the day they belong to), and the closed
  day is never changed.
- **reconciliation**: adjustments a clerk decided on reconciliation items (``Adjustment``), carried once.

A purchase of a later day is refused: no run may take it before its day is cleared. The same inputs give the same
rows and the same ``fingerprint``, so re-clearing a closed day (from the taps it claimed) can be checked, not
trusted. ``ClearingWindow`` records the run's moment (``as_of``) and the previous run's (``carried_from``); they
are part of the fingerprint, and no longer pick taps.

Pure: works on frames and values handed in; money is int fen; times are UTC. The rounding rule is
``clearing.commission``'s.

E-tickets are a second source beside taps: their revenue (recognised at use, passes by the operator's rule,
breakage of unused expired tickets) is ``clearing.tickets``'s, stored beside these rows in sections ``ticket`` and
``ticket_late`` with no issuer commission; ``clear`` and its fingerprint stay the card fares'.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np
import pandas as pd

from clearing import commission as fee
from clearing.service_day import day_bounds, service_day

RUN_TAP_COLUMNS = ("device_id", "device_seq", "kind", "occurred_at", "received_at", "route", "vehicle", "driver",
                   "fleet", "card_type", "amount")
DIMENSIONS = ("operator", "fleet", "route", "vehicle", "driver", "card_type")
ROW_COLUMNS = ("section", "dimension", "key", "for_day", "taps", "gross", "commission", "net")
PURCHASE = "purchase"
NO_FLEET = ""  # a vehicle not (yet) in any fleet: still counted, under this key


@dataclass(frozen=True)
class ClearingWindow:
    operator: str
    day: date
    as_of: datetime  # when the run was made (UTC, aware); it claimed taps received before this moment
    carried_from: datetime | None  # the previous run's as_of; None for an operator's first run (a record only)
    rate_bp: int  # the card issuer's commission, basis points
    tz: str = "Asia/Shanghai"
    cutoff_hour: int = 3

    def params(self) -> dict:
        return {"operator": self.operator, "day": self.day.isoformat(), "as_of": self.as_of.isoformat(),
                "carried_from": self.carried_from.isoformat() if self.carried_from else None,
                "rate_bp": self.rate_bp, "tz": self.tz, "cutoff_hour": self.cutoff_hour}


@dataclass(frozen=True)
class Adjustment:
    """A clerk's decision on a reconciliation item, carried into this run: signed fen (+ owed to the operator)."""

    item_id: int
    for_day: date
    amount: int


@dataclass(frozen=True, eq=False)
class ClearingResult:
    window: ClearingWindow
    rows: pd.DataFrame  # ROW_COLUMNS, sorted by section, for_day, dimension, key
    fingerprint: str
    totals: dict = field(default_factory=dict)

    def table(self, dimension: str, section: str = "day") -> pd.DataFrame:
        """One breakdown, e.g. ``table("route")``: key, for_day, taps, gross, commission, net."""
        sel = self.rows[(self.rows["section"] == section) & (self.rows["dimension"] == dimension)]
        return sel.drop(columns=["section", "dimension"]).reset_index(drop=True)


def _check(taps: pd.DataFrame) -> None:
    missing = [c for c in RUN_TAP_COLUMNS if c not in taps.columns]
    if missing:
        raise ValueError(f"tap frame is missing column(s) {missing}; a clearing run needs {list(RUN_TAP_COLUMNS)}")
    for col in ("occurred_at", "received_at"):
        if len(taps) and not isinstance(taps[col].dtype, pd.DatetimeTZDtype):
            raise TypeError(f"{col} must be timezone-aware UTC timestamps, got {taps[col].dtype}")
    amount = taps["amount"]
    if not pd.api.types.is_integer_dtype(amount) or pd.api.types.is_bool_dtype(amount):
        raise TypeError(f"amount must be integer fen, got dtype {amount.dtype}")


def _codes(col: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes 0..k-1 of a key column and the k labels (missing values get the label "")."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes, labels = col.cat.codes.to_numpy(), [str(c) for c in col.cat.categories]
    elif pd.api.types.is_integer_dtype(col) and len(col):
        values = col.to_numpy()
        low, high = int(values.min()), int(values.max())
        if high - low < 1 << 20:  # card types and the like: offsets, no hashing
            return (values - low).astype(np.int64), [str(v) for v in range(low, high + 1)]
        codes, uniques = pd.factorize(col)
        labels = [str(u) for u in uniques]
    else:
        codes, uniques = pd.factorize(col)
        labels = [str(u) for u in uniques]
    if (codes < 0).any():
        codes = np.where(codes < 0, len(labels), codes)
        labels = [*labels, ""]
    return codes, labels


# float64 adds integers exactly while every partial sum stays below 2**53 fen (90 trillion yuan); below that
# bound np.bincount's weighted sum is exact and far faster than an integer group-by. Above it, pandas' int64.
_EXACT_FLOAT = 1 << 53


class _Section:
    """The purchases of one section, taken once: selection, amounts (int64 and, when exact, float64)."""

    def __init__(self, select: np.ndarray, amount: np.ndarray):
        self.select = select  # a boolean mask or an index array
        self.amount = amount[select]
        self.gross = int(self.amount.sum(dtype=np.int64))
        self.exact_float = int(np.abs(self.amount).sum(dtype=np.int64)) < _EXACT_FLOAT
        self.weights = self.amount.astype(np.float64) if self.exact_float else None

    def sums(self, codes: np.ndarray, k: int) -> np.ndarray:
        """Exact int64 sum of the section's amounts per code."""
        if self.exact_float:
            out = np.rint(np.bincount(codes, weights=self.weights, minlength=k)).astype(np.int64)
        else:
            out = (pd.Series(self.amount).groupby(codes).sum().reindex(range(k), fill_value=0)
                   .to_numpy(dtype=np.int64))
        if int(out.sum()) != self.gross:  # cannot happen below the bound; never print wrong money
            raise ArithmeticError("per-key sums do not add up to the total; refusing to settle")
        return out


def _breakdowns(section_taps: _Section, keys: dict, operator: str, rate_bp: int, section: str,
                for_day: date) -> list[tuple]:
    """Rows of every dimension of one section's purchases; every dimension shares the same commission."""
    n = len(section_taps.amount)
    per_dim = {} if not n else {
        dim: _per_key(section_taps, keys[dim][0][section_taps.select], keys[dim][1]) for dim in DIMENSIONS[1:]}
    return section_rows(operator, rate_bp, section, for_day, n, section_taps.gross, per_dim)


def section_rows(operator: str, rate_bp: int, section: str, for_day: date, n: int, gross_total: int,
                 per_dim: dict[str, list[tuple[str, int, int]]]) -> list[tuple]:
    """A section's rows from its sums: the operator row (``n`` purchases, ``gross_total`` fen) and, per dimension,
    (key, taps, gross) of each key sorted by key, the commission of the section allocated over the keys. The one
    place a run's rows are made, from frames (``clear``) or from sums a database computed (``clear_sums``)."""
    commission_total = fee.commission_of(gross_total, rate_bp)
    out = [(section, "operator", operator, for_day, n, gross_total, commission_total,
            gross_total - commission_total)]
    if not n:
        return out
    for dim in DIMENSIONS[1:]:
        per_key = per_dim[dim]
        if sum(t for _k, t, _g in per_key) != n or sum(g for _k, _t, g in per_key) != gross_total:
            raise ArithmeticError(f"{section} {for_day}: the {dim} sums do not add up to the section's total; "
                                  "refusing to settle")
        commissions = fee.allocate([gross for _label, _taps, gross in per_key], commission_total)
        for (label, taps, gross), com in zip(per_key, commissions, strict=True):
            out.append((section, dim, label, for_day, taps, gross, com, gross - com))
    return out


def clear_sums(sections: dict[tuple[str, date], dict[str, list[tuple[str, int, int]]]], window: ClearingWindow,
               adjustments: list[Adjustment] | tuple = (), *, fingerprint: str) -> ClearingResult:
    """``clear``'s result from sums a database computed over the purchases a run took: ``sections`` maps
    ("day" | "late", service day) to each dimension of ``DIMENSIONS[1:]``'s (key, taps, gross) rows (keys as
    text, a missing key ""); the "day" section is always there (empty when nothing was bought). Rows, commission
    allocation and totals are ``clear``'s (``section_rows``); ``fingerprint`` is the caller's
    (``fingerprint_of_sums``)."""
    fee.check_rate(window.rate_bp)
    rows = []
    keys = sorted(sections, key=lambda k: (k[0] != "day", k[1]))
    if ("day", window.day) not in sections:
        keys.insert(0, ("day", window.day))
    for section, for_day in keys:
        if section == "late" and for_day >= window.day:
            raise ValueError(f"late purchases of {for_day} handed to the run of {window.day}")
        per_dim = {dim: sorted(sections.get((section, for_day), {}).get(dim, []), key=lambda r: r[0])
                   for dim in DIMENSIONS[1:]}
        card = per_dim["card_type"]
        rows += section_rows(window.operator, window.rate_bp, section, for_day, sum(t for _k, t, _g in card),
                             sum(g for _k, _t, g in card), per_dim)
    for adj in sorted(adjustments, key=lambda a: a.item_id):
        com, net = fee.split(adj.amount, window.rate_bp)
        rows.append(("reconciliation", "item", str(adj.item_id), adj.for_day, 0, int(adj.amount), com, net))
    frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    frame = frame.sort_values(["section", "for_day", "dimension", "key"], kind="stable").reset_index(drop=True)
    for col in ("taps", "gross", "commission", "net"):
        frame[col] = frame[col].astype("int64")
    return ClearingResult(window, frame, fingerprint, _totals(frame))


def _per_key(section_taps: _Section, codes: np.ndarray, labels: list[str]) -> list[tuple[str, int, int]]:
    """(key, taps, gross) of each key present, sorted by key: the one place fares are summed by a key."""
    taps = np.bincount(codes, minlength=len(labels))
    grosses = section_taps.sums(codes, len(labels))
    present = sorted(np.flatnonzero(taps).tolist(), key=labels.__getitem__)
    return [(labels[i], int(taps[i]), int(grosses[i])) for i in present]


def revenue_by(taps: pd.DataFrame, key: str) -> pd.DataFrame:
    """The purchases among ``taps`` by ``key``: columns key (text; a missing key is ""), taps, gross (int64 fen),
    sorted by key. The same sums as a run's rows (``_per_key``), for figures a run does not store (a provisional
    day, one vehicle's routes or shifts)."""
    purchases = taps[(taps["kind"] == PURCHASE).to_numpy()] if "kind" in taps.columns else taps
    amount = purchases["amount"]
    if not pd.api.types.is_integer_dtype(amount) or pd.api.types.is_bool_dtype(amount):
        raise TypeError(f"amount must be integer fen, got dtype {amount.dtype}")
    codes, labels = _codes(purchases[key].reset_index(drop=True))
    rows = _per_key(_Section(np.arange(len(purchases)), amount.to_numpy(dtype=np.int64)), codes, labels) \
        if len(purchases) else []
    return pd.DataFrame({key: pd.Series([r[0] for r in rows], dtype="str"),
                         "taps": pd.Series([r[1] for r in rows], dtype="int64"),
                         "gross": pd.Series([r[2] for r in rows], dtype="int64")})


def clear(taps: pd.DataFrame, window: ClearingWindow, adjustments: list[Adjustment] | tuple = ()) -> ClearingResult:
    """Settle the taps a run took (``taps``: that operator's stored taps the run claimed, unique by
    (device_id, device_seq), as the tap table guarantees; other kinds than purchases are ignored) as
    ``window.day``'s run; see the module doc."""
    _check(taps)
    fee.check_rate(window.rate_bp)
    start, end = (pd.Timestamp(t) for t in day_bounds(window.day, window.tz, window.cutoff_hour))
    occurred = taps["occurred_at"]
    purchase = (taps["kind"] == PURCHASE).to_numpy()
    after = purchase & (occurred >= end).to_numpy()
    if after.any():
        first = occurred[after].min()
        raise ValueError(f"{int(after.sum())} purchase(s) handed to the run of {window.day} happened after that "
                         f"day's end {end.isoformat()} (first at {first.isoformat()}): a run takes only taps of "
                         "its day and earlier ones; they belong to a later day's run")
    day_mask = purchase & (occurred >= start).to_numpy()
    late_mask = purchase & (occurred < start).to_numpy()

    amount = taps["amount"].to_numpy(dtype=np.int64)
    keys = {dim: _codes(taps[dim]) for dim in DIMENSIONS[1:]}
    rows = _breakdowns(_Section(day_mask, amount), keys, window.operator, window.rate_bp, "day", window.day)
    if late_mask.any():  # few rows: index arrays, and service days computed for them only
        late_idx = np.flatnonzero(late_mask)
        late_days = service_day(occurred.iloc[late_idx], tz=window.tz, cutoff_hour=window.cutoff_hour).to_numpy()
        for d in sorted(set(late_days)):
            rows += _breakdowns(_Section(late_idx[late_days == d], amount), keys, window.operator, window.rate_bp,
                                "late", d)
    for adj in sorted(adjustments, key=lambda a: a.item_id):
        com, net = fee.split(adj.amount, window.rate_bp)
        rows.append(("reconciliation", "item", str(adj.item_id), adj.for_day, 0, int(adj.amount), com, net))

    frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    frame = frame.sort_values(["section", "for_day", "dimension", "key"], kind="stable").reset_index(drop=True)
    for col in ("taps", "gross", "commission", "net"):
        frame[col] = frame[col].astype("int64")
    totals = _totals(frame)
    fp = fingerprint(taps, day_mask | late_mask, window, adjustments)
    return ClearingResult(window, frame, fp, totals)


def _totals(rows: pd.DataFrame) -> dict:
    out = {}
    for section in ("day", "late", "reconciliation"):
        dim = "item" if section == "reconciliation" else "operator"
        sel = rows[(rows["section"] == section) & (rows["dimension"] == dim)]
        for col in ("taps", "gross", "commission", "net"):
            out[f"{section}_{col}"] = int(sel[col].sum())
    for col in ("gross", "commission", "net"):
        out[f"payable_{col}"] = out[f"day_{col}"] + out[f"late_{col}"] + out[f"reconciliation_{col}"]
    return out


# ---------------------------------------------------------------------------------------------- fingerprint
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised: a well-mixed 64-bit value per element (uint64 wraps by design)."""
    x = x + _GOLDEN
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _text_hash(values) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little")
                     for v in values], dtype=np.uint64)


_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


def _column_hash(col: pd.Series, k: np.uint64) -> np.ndarray:
    """``k`` times one uint64 per row that depends on the value only (not on category codes, dtype or time
    unit); a new array, never a view of the frame."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        # Multiply the small table, not the column: one pass over the rows fewer.
        table = np.append(_text_hash(col.cat.categories), np.uint64(0)) * k  # code -1 (missing) -> last slot
        return table[col.cat.codes.to_numpy()]
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        # Whole seconds: the unit a frame arrives in (ns, us) must not change the fingerprint.
        return (col.array.asi8 // _PER_SECOND[col.dtype.unit]).view(np.uint64) * k
    if pd.api.types.is_integer_dtype(col):
        return col.to_numpy(dtype="int64").view(np.uint64) * k
    codes, uniques = pd.factorize(col.astype(str))
    return (np.append(_text_hash(uniques), np.uint64(0)) * k)[codes]


# One odd multiplier per column (from SplitMix64 itself), so that equal values in different columns differ.
_MULTIPLIERS = [np.uint64(int(_splitmix(np.array([i], dtype=np.uint64))[0]) | 1) for i in range(1, 16)]


FINGERPRINT_V2 = "2:"  # fingerprints made by ``fingerprint_of_sums`` start so; older ones are ``fingerprint``'s


def fingerprint_of_sums(window: ClearingWindow, taps: int, total: int, xor: int, adjustments=()) -> str:
    """The run's fingerprint from a summary of the taps it took that a database computed: ``taps`` purchases,
    the wrapping sum (mod 2**64) and the XOR of one 64-bit value per tap (the first 8 bytes of the MD5 of the
    tap's content as text: device, sequence, both times in whole seconds, route, vehicle, driver, card
    type, amount; see ``backoffice.clearing_runs``). Same role as ``fingerprint``; marked ``2:`` so a run stored
    with the older fingerprint is checked the older way."""
    doc = {"window": window.params(), "taps": int(taps), "sum": int(total) % (1 << 64),
           "xor": int(xor) % (1 << 64), "scheme": 2,
           "adjustments": sorted([a.item_id, a.for_day.isoformat(), int(a.amount)] for a in adjustments)}
    return FINGERPRINT_V2 + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:62]


def fingerprint(taps: pd.DataFrame, mask: np.ndarray, window: ClearingWindow, adjustments=()) -> str:
    """SHA-256 (hex) of the run's parameters and of the multiset of taps it took (``mask``), content and all.

    Each tap's columns are combined into one 64-bit value (text by BLAKE2b of its value, so nothing depends on
    category codes or row order; columns weighted by distinct odd multipliers, then mixed by SplitMix64); the set
    is summarised by count, wrapping sum and XOR of those values. It tells "same inputs" from "changed inputs"
    across runs and machines; it is not a signature.
    """
    n = int(mask.sum())
    h = np.zeros(len(taps), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name, k in zip(RUN_TAP_COLUMNS, _MULTIPLIERS, strict=False):
            if name != "kind":  # every tap a run takes is a purchase: the column says nothing here
                h += _column_hash(taps[name], k)
        h = _splitmix(h[mask])
        total = int(h.sum(dtype=np.uint64)) if n else 0
    xor = int(np.bitwise_xor.reduce(h)) if n else 0
    doc = {"window": window.params(), "taps": n, "sum": total, "xor": xor,
           "adjustments": sorted([a.item_id, a.for_day.isoformat(), int(a.amount)] for a in adjustments)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

"""`python -m bench clearing`: a city's service day cleared (settlement + shift reconciliation), beside a bare
pandas group-by of the same frame.

The frame: 10,000,000 taps (``--quick``: 200,000) of one operator over 300 routes, 2,000 vehicles (one validator
each, in 20 fleets) and 3,000 drivers, built with numpy as the back office's loader hands taps over: categoricals
for the codes, int64 fen, UTC timestamps. Each validator's records run in device-sequence order through shifts
(sign-in, purchases, sign-out; a driver per shift); about 1 in 10,000 records never arrived (gaps), 1 shift in 100
has no sign-out, and 1 % of the purchases belong to the day before and arrived after that day's run (late taps).

Measured, alternating and each ``--repeat`` times (medians reported):

- **clearing**: ``clearing.runs.clear`` (day and late sections, all six breakdowns, commission shared by largest
  remainder, the inputs' fingerprint) + ``clearing.reconcile.reconcile_shifts`` (per-shift totals, gaps, unclosed
  shifts, discrepancy items).
- **bare group-by**: the same frame, no filter, no commission, no fingerprint: ``groupby(col)["amount"]
  .agg(["size", "sum"])`` for fleet, route, vehicle, driver and card type, and ``groupby(["device_id",
  "shift_no"])["device_seq"].agg(["min", "max", "size"])``.
- **peak memory**: tracemalloc's peak above the frame during one more clearing (numpy and pandas report their
  buffers to it), beside the frame's own size.

Goals (printed and in the JSON; nothing asserted): clearing <= 20 s and <= 2x the bare group-by.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from datetime import date, timedelta
from pathlib import Path
from statistics import median

import numpy as np
import pandas as pd

from bench.common import ratio, table, write_result
from clearing.reconcile import reconcile_shifts
from clearing.runs import ClearingWindow, clear
from clearing.service_day import day_bounds

TAPS, QUICK_TAPS = 10_000_000, 200_000
ROUTES, VEHICLES, DRIVERS, FLEETS = 300, 2_000, 3_000, 20
SHIFTS_PER_DEVICE = 3
DAY = date(2026, 3, 5)
TZ, CUTOFF = "Asia/Shanghai", 3
GOAL_SECONDS, GOAL_RATIO = 20.0, 2.0
RATE_BP = 60  # 0.6 % card-issuer commission


def _utc(ns: np.ndarray) -> pd.Series:
    # From datetime64 directly: pd.to_datetime on plain integers goes through Python objects (seconds per 10 M).
    return pd.Series(ns.astype("datetime64[ns]")).dt.tz_localize("UTC")


def build_frame(n: int, seed: int = 5) -> pd.DataFrame:
    """The day's taps, as described in the module doc; vectorised, a few seconds for 10 M rows."""
    rng = np.random.default_rng(seed)
    start, end = (pd.Timestamp(t) for t in day_bounds(DAY, TZ, CUTOFF))
    per_device = rng.multinomial(n, np.full(VEHICLES, 1 / VEHICLES))
    device = np.repeat(np.arange(VEHICLES, dtype=np.int32), per_device)
    first = np.repeat(np.cumsum(per_device) - per_device, per_device)
    pos = np.arange(n, dtype=np.int64) - first  # place in the device's day, 0-based
    count = np.repeat(per_device, per_device)
    shift = (pos * SHIFTS_PER_DEVICE // count).astype(np.int32) + 1
    shift_start = np.r_[True, (shift[1:] != shift[:-1]) | (device[1:] != device[:-1])]
    shift_end = np.r_[shift_start[1:], True]
    kind = np.full(n, 2, dtype=np.int8)  # categories below: 0 shift_open, 1 shift_close, 2 purchase, 3 denied
    kind[rng.random(n) < 0.002] = 3
    kind[shift_start] = 0
    kind[shift_end] = 1
    span = (end - start).value - 4 * 3600 * 10**9  # a bus day of 20 h from the cut-off
    occurred_ns = start.value + (pos * span // count) + rng.integers(0, 10**9, n)
    received_ns = occurred_ns + rng.integers(5, 600, n) * 10**9
    late = (kind == 2) & (rng.random(n) < 0.01)  # yesterday's taps that arrived after yesterday's run
    occurred_ns[late] -= 86_400 * 10**9
    amount = np.where(kind == 2, rng.choice(np.array([100, 150, 200, 200, 200, 300], dtype=np.int64), n), 0)
    driver = ((device.astype(np.int64) * SHIFTS_PER_DEVICE + shift) * 7919 % DRIVERS).astype(np.int32)
    frame = pd.DataFrame({
        "device_id": pd.Categorical.from_codes(device, [f"VAL{i:05d}" for i in range(VEHICLES)]),
        "device_seq": pos + 1,
        "kind": pd.Categorical.from_codes(kind, ["shift_open", "shift_close", "purchase", "denied"]),
        "shift_no": shift,
        "occurred_at": _utc(occurred_ns),
        "received_at": _utc(received_ns),
        "route": pd.Categorical.from_codes(device % ROUTES, [f"R{i:03d}" for i in range(ROUTES)]),
        "vehicle": pd.Categorical.from_codes(device, [f"BUS{i:05d}" for i in range(VEHICLES)]),
        "driver": pd.Categorical.from_codes(driver, [f"D{i:05d}" for i in range(DRIVERS)]),
        "fleet": pd.Categorical.from_codes(device % FLEETS, [f"F{i:02d}" for i in range(FLEETS)]),
        "card_type": rng.choice(np.array([1, 1, 1, 2, 3, 4], dtype=np.int16), n),
        "amount": amount,
    })
    lost = rng.random(n) < 0.0001  # records that never arrived
    unclosed = shift_end & (rng.random(n) < 0.01)
    return frame.loc[~(lost | unclosed)].reset_index(drop=True)


def window() -> ClearingWindow:
    start, end = day_bounds(DAY, TZ, CUTOFF)
    return ClearingWindow("CITYBUS", DAY, as_of=end + timedelta(hours=1), carried_from=start + timedelta(hours=1),
                          rate_bp=RATE_BP, tz=TZ, cutoff_hour=CUTOFF)


def clearing(frame: pd.DataFrame):
    result = clear(frame, window())
    totals, items = reconcile_shifts(frame)
    return result, totals, items


def bare(frame: pd.DataFrame) -> int:
    n = 0
    for col in ("fleet", "route", "vehicle", "driver", "card_type"):
        n += len(frame.groupby(col, observed=True)["amount"].agg(["size", "sum"]))
    n += len(frame.groupby(["device_id", "shift_no"], observed=True)["device_seq"].agg(["min", "max", "size"]))
    return n


def _timed(fn, *args) -> float:
    gc.collect()
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def run(*, taps: int = TAPS, repeat: int = 3, console, results_dir: Path) -> dict:
    t = time.perf_counter()
    frame = build_frame(taps)
    built = time.perf_counter() - t
    frame_mb = frame.memory_usage(deep=True).sum() / 2**20
    clearing(frame.head(1000))  # warm imports and caches outside the timing
    bare(frame.head(1000))
    clear_s, bare_s = [], []
    for _ in range(repeat):
        clear_s.append(_timed(clearing, frame))
        bare_s.append(_timed(bare, frame))
    tracemalloc.start()
    result, totals, items = clearing(frame)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    c, b = median(clear_s), median(bare_s)
    doc = {
        "taps": len(frame), "routes": ROUTES, "vehicles": VEHICLES, "drivers": DRIVERS, "fleets": FLEETS,
        "frame_build_s": round(built, 2), "frame_mb": round(frame_mb, 1), "repeat": repeat,
        "clearing_s": round(c, 3), "bare_groupby_s": round(b, 3), "ratio": ratio(c, b),
        "clearing_runs_s": [round(x, 3) for x in clear_s], "bare_runs_s": [round(x, 3) for x in bare_s],
        "clearing_peak_mb": round(peak / 2**20, 1),
        "day_taps": result.totals["day_taps"], "late_taps": result.totals["late_taps"],
        "day_gross_fen": result.totals["day_gross"], "commission_fen": result.totals["payable_commission"],
        "shifts": len(totals), "shift_items": len(items),
        "goals": {"clearing_s_max": GOAL_SECONDS, "ratio_max": GOAL_RATIO},
        "met": {"time": c <= GOAL_SECONDS, "ratio": (ratio(c, b) or 0) <= GOAL_RATIO},
    }
    path = write_result("clearing", doc, results_dir)
    console.print(table(
        f"clearing: {len(frame):,} taps, {ROUTES} routes, {VEHICLES:,} vehicles, {DRIVERS:,} drivers "
        f"(median of {repeat})",
        ["", "seconds", "× bare", "goal"],
        [["settlement + shift reconciliation", f"{c:.2f}", f"{ratio(c, b):.2f}",
          f"<= {GOAL_SECONDS:.0f} s, <= {GOAL_RATIO:.0f}×"],
         ["bare pandas group-by (baseline)", f"{b:.2f}", "1.00", ""]],
        caption=f"frame {frame_mb:,.0f} MiB built in {built:.1f} s; clearing peak {peak / 2**20:,.0f} MiB above it; "
                f"{len(totals):,} shifts, {len(items):,} flagged; {result.totals['late_taps']:,} late taps; "
                f"JSON: {path}"))
    return doc


if __name__ == "__main__":
    import argparse

    from bench.common import RESULTS_DIR, console

    p = argparse.ArgumentParser(prog="python -m bench.clearing", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TAPS:,} taps instead of {TAPS:,}")
    p.add_argument("--taps", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    a = p.parse_args()
    run(taps=a.taps or (QUICK_TAPS if a.quick else TAPS), repeat=a.repeat, console=console(), results_dir=a.results)

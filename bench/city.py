"""The nightly path at city size: a service day of 1 M and 10 M taps in PostgreSQL (300 routes, 10,000 vehicles,
15,000 drivers) settled end to end by ``backoffice.settle.settle`` (claim, clear, store the run, reconcile shifts,
PDF, CSV, XLSX) beside a baseline in the same sitting: COPY the day's rows out (binary, discarded) and one bare SQL
GROUP BY per breakdown (route, vehicle, driver, card type, hour).

The day is written with COPY into a fresh database (``CREATE DATABASE farebox_bench_<pid>_<hex>``, dropped
afterwards), migrated by Alembic as the back office's is, with the bench day's partitions. Each size clears the
same day ``repeat`` times (3, and 2 from 10 M taps up): a run is undone between repeats (its row deleted, the taps it
claimed one by one released; its block of the day is only its watermark), then ``VACUUM ANALYZE``. ``claim_s`` is
``clearing_runs.claim_taps``'s share (before revision 0027 an UPDATE of every tap, 812 s of 869 s at 10 M). Peak memory is the
process's peak RSS during the settle (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``).
Nothing is asserted: figures go to ``bench/results/city.json``.
"""

from __future__ import annotations

import gc
import io
import os
import tempfile
import time
from datetime import UTC, date, timedelta
from pathlib import Path
from statistics import median

import numpy as np
import pandas as pd

from bench.common import ratio, table, write_result

SIZES = (1_000_000, 10_000_000)
QUICK_SIZES = (100_000,)
ROUTES, VEHICLES, DRIVERS = 300, 10_000, 15_000
OPERATOR, TZ, CUTOFF, RATE_BP = "CITY", "Asia/Shanghai", 3, 60
DAY = date(2026, 11, 2)
LATE_SHARE, DENIED_SHARE, FREE_SHARE = 0.002, 0.01, 0.05
GOAL_RATIO, GOAL_SECONDS, GOAL_MB = 3.0, 60.0, 2048
COPY_COLUMNS = ("device_id", "device_seq", "epoch", "kind", "occurred_at", "received_at", "operator", "route",
                "vehicle", "driver", "shift_no", "card_asn", "card_type", "card_ttc", "amount", "balance_after",
                "terminal_id", "terminal_seq", "tac", "reason", "service_day")
CHUNK = 500_000


def _peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _chunk(rng: np.random.Generator, first: int, n: int, start, day_seconds: int) -> pd.DataFrame:
    """Taps ``first``..``first+n-1`` of the day: one validator per vehicle, its own sequence; a vehicle keeps its
    route, drivers change through the day (no shift records: shift_no 0); late taps (earlier days), refused cards and free rides among them."""
    idx = np.arange(first, first + n, dtype=np.int64)
    vehicle = idx % VEHICLES
    seq = idx // VEHICLES + 1
    late = rng.random(n) < LATE_SHARE
    offset = rng.integers(0, day_seconds, n)
    offset = np.where(late, -rng.integers(60, 3 * 86_400, n), offset)  # late taps: up to 3 days back
    occurred = pd.Timestamp(start) + pd.to_timedelta(offset, unit="s")
    received = occurred + pd.to_timedelta(rng.integers(1, 600, n), unit="s")
    denied = rng.random(n) < DENIED_SHARE
    free = rng.random(n) < FREE_SHARE
    card_type = rng.choice(np.array([1, 1, 1, 2, 3, 4]), n)
    amount = np.where(free | (card_type == 4), 0, rng.choice(np.array([100, 150, 200, 200, 300]), n))
    amount = np.where(denied, 0, amount)
    driver = (vehicle + VEHICLES * (offset % 2 == 0)) % DRIVERS
    return pd.DataFrame({
        "device_id": [f"V{v:05d}" for v in vehicle],
        "device_seq": seq, "epoch": 1,
        "kind": np.where(denied, "denied", "purchase"),
        "occurred_at": occurred.strftime("%Y-%m-%d %H:%M:%S+00"),
        "received_at": received.strftime("%Y-%m-%d %H:%M:%S+00"),
        "operator": OPERATOR,
        "route": [f"R{r:03d}" for r in vehicle % ROUTES],
        "vehicle": [f"BUS{v:05d}" for v in vehicle],
        "driver": [f"D{d:05d}" for d in driver],
        "shift_no": 0, "card_asn": [f"{c:016d}" for c in rng.integers(0, 10**12, n)],
        "card_type": card_type, "card_ttc": seq % 65_536, "amount": amount, "balance_after": 5000,
        "terminal_id": "000000000001", "terminal_seq": seq, "tac": "00000000",
        "reason": np.where(denied, "insufficient balance", ""),
        # The operator's service day (its wall clock, cut-off hours back): the partition key since revision 0026.
        "service_day": (occurred.tz_convert(TZ).tz_localize(None) - pd.Timedelta(hours=CUTOFF)).strftime("%Y-%m-%d"),
    })


def load_day(libpq_url: str, taps: int, seed: int = 12) -> float:
    """COPY a day of ``taps`` taps into the (migrated) database; returns seconds."""
    import psycopg

    from clearing.service_day import day_bounds

    start, end = day_bounds(DAY, TZ, CUTOFF)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    with psycopg.connect(libpq_url) as conn:
        conn.execute("INSERT INTO operator (code, name, timezone, cutoff_hour) VALUES (%s, %s, %s, %s)",
                     (OPERATOR, "City Bus", TZ, CUTOFF))
        conn.execute("INSERT INTO commission_rate (operator, valid_from, rate_bp) VALUES (%s, %s, %s)",
                     (OPERATOR, DAY - timedelta(days=30), RATE_BP))
        conn.execute("INSERT INTO vehicle (code, operator, plate) SELECT 'BUS' || lpad(i::text, 5, '0'), %s, "
                     "'P' || i FROM generate_series(0, %s) i", (OPERATOR, VEHICLES - 1))
        conn.execute("INSERT INTO fleet (code, operator, name) VALUES ('F1', %s, 'North'), ('F2', %s, 'South')",
                     (OPERATOR, OPERATOR))
        conn.execute("INSERT INTO fleet_vehicle (vehicle, valid_from, fleet) SELECT 'BUS' || lpad(i::text, 5, '0'), "
                     "%s, CASE WHEN i %% 2 = 0 THEN 'F1' ELSE 'F2' END FROM generate_series(0, %s, 3) i",
                     (DAY - timedelta(days=10), VEHICLES - 1))
        if conn.execute("SELECT relkind FROM pg_class WHERE relname = 'tap'").fetchone()[0] == "p":
            for n in range(-4, 2):  # the day's partition and its late taps' days (backoffice.partitions makes these
                d = DAY + timedelta(days=n)  # ahead in service; a bench day a month back has none yet)
                conn.execute(f"CREATE TABLE IF NOT EXISTS tap_{d:%Y_%m_%d} PARTITION OF tap FOR VALUES FROM "
                             f"('{d.isoformat()}') TO ('{(d + timedelta(days=1)).isoformat()}')")
        with conn.cursor().copy(f"COPY tap ({', '.join(COPY_COLUMNS)}) FROM STDIN WITH (FORMAT csv, FORCE_NOT_NULL (reason))") as copy:
            for first in range(0, taps, CHUNK):
                buf = io.StringIO()
                _chunk(rng, first, min(CHUNK, taps - first), start,
                       int((end - start).total_seconds())).to_csv(buf, header=False, index=False)
                copy.write(buf.getvalue())
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE tap")
    return time.perf_counter() - t


def baseline(libpq_url: str) -> float:
    """COPY the day's taps out (binary, as a reader of Arrow would) and one bare GROUP BY per breakdown."""
    import psycopg

    from clearing.service_day import day_bounds

    start, end = day_bounds(DAY, TZ, CUTOFF)
    gc.collect()
    t = time.perf_counter()
    with psycopg.connect(libpq_url) as conn:
        cols = "device_id, device_seq, kind, occurred_at, received_at, route, vehicle, driver, card_type, amount"
        with conn.cursor().copy(f"COPY (SELECT {cols} FROM tap WHERE operator = %s AND occurred_at < %s) TO STDOUT "
                                "WITH (FORMAT binary)", (OPERATOR, end)) as copy:
            for _block in copy:
                pass
        for key in ("route", "vehicle", "driver", "card_type", f"extract(hour FROM occurred_at AT TIME ZONE '{TZ}')"):
            conn.execute(f"SELECT {key}, count(*), sum(amount) FROM tap WHERE operator = %s AND kind = 'purchase' "
                         f"AND occurred_at < %s GROUP BY 1", (OPERATOR, end)).fetchall()
    return time.perf_counter() - t


def _undo(libpq_url: str) -> None:
    import psycopg

    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute("UPDATE tap SET clearing_run_id = NULL WHERE clearing_run_id IS NOT NULL")
        for t in ("clearing_row", "recon_item", "ticket_revenue"):
            conn.execute(f"DELETE FROM {t}")
        conn.execute("DELETE FROM clearing_run")
        conn.execute("VACUUM ANALYZE tap")


def nightly(url: str, reports: Path) -> tuple[float, float, dict]:
    """``backoffice.settle.settle`` of the day, reports and all; seconds, peak RSS MiB and the run's totals."""
    from sqlalchemy import text

    from backoffice.db import make_engine
    from backoffice.settle import settle
    from clearing.service_day import day_bounds

    from backoffice import clearing_runs

    claim_s = []
    claim = clearing_runs.claim_taps

    def timed_claim(*args, **kwargs):  # the claim's share of the path (before revision 0027: an UPDATE of every tap)
        t0 = time.perf_counter()
        try:
            return claim(*args, **kwargs)
        finally:
            claim_s.append(time.perf_counter() - t0)

    clearing_runs.claim_taps = timed_claim
    engine = make_engine(url)
    now = day_bounds(DAY, TZ, CUTOFF)[1] + timedelta(hours=2)
    gc.collect()
    _peak_reset()
    t = time.perf_counter()
    with engine.begin() as conn:
        result = settle(conn, operator=OPERATOR, day=DAY, reports_dir=reports, now=now.astimezone(UTC))
    seconds = time.perf_counter() - t
    peak = _peak_mb()
    clearing_runs.claim_taps = claim
    with engine.connect() as conn:
        audit = conn.execute(text(
            "SELECT count(*), coalesce(sum(amount), 0) FROM tap_claimed WHERE clearing_run_id = :r "
            "AND kind = 'purchase' AND occurred_at >= :s"), {"r": result.run.id, "s": day_bounds(DAY, TZ, CUTOFF)[0]}).one()
    engine.dispose()
    totals = dict(result.run.totals)
    totals["agrees_with_sql"] = (int(audit[0]), int(audit[1])) == (totals["day_taps"], totals["day_gross"])
    totals["files"] = [p.name for p in result.files]
    totals["claim_s"] = sum(claim_s)
    return seconds, peak, totals


def run_size(pg_url: str, taps: int, repeat: int) -> dict:
    from bench.ingest import postgres
    from backoffice.db import make_engine, upgrade

    with postgres(pg_url) as backend:
        engine = make_engine(backend.database_url)
        upgrade(engine)
        engine.dispose()
        loaded = load_day(backend.libpq_url, taps)
        ours, peaks, base, claims = [], [], [], []
        totals = {}
        with tempfile.TemporaryDirectory(prefix="farebox-city-") as work:
            for i in range(repeat):
                if i:
                    _undo(backend.libpq_url)
                base.append(baseline(backend.libpq_url))
                s, peak, totals = nightly(backend.database_url, Path(work) / f"r{i}")
                ours.append(s)
                claims.append(totals["claim_s"])
                peaks.append(peak)
    o, b = median(ours), median(base)
    return {"taps": taps, "load_s": round(loaded, 1), "repeat": repeat,
            "nightly_s": round(o, 2), "baseline_s": round(b, 2), "ratio": ratio(o, b),
            "nightly_runs_s": [round(x, 2) for x in ours], "baseline_runs_s": [round(x, 2) for x in base],
            "claim_s": round(median(claims), 2), "nightly_without_claim_s": round(o - median(claims), 2),
            "ratio_without_claim": ratio(o - median(claims), b),
            "peak_rss_mb": round(max(peaks), 0), "us_per_tap": round(o / taps * 1e6, 2),
            "baseline_us_per_tap": round(b / taps * 1e6, 2),
            "day_taps": totals.get("day_taps"), "late_taps": totals.get("late_taps"),
            "day_gross_fen": totals.get("day_gross"), "agrees_with_sql": totals.get("agrees_with_sql"),
            "files": totals.get("files"),
            "met": {"ratio": (ratio(o, b) or 99) <= GOAL_RATIO, "seconds": o <= GOAL_SECONDS,
                    "memory": max(peaks) <= GOAL_MB}}


def _growth(results: list[dict]) -> dict | None:
    """How the smallest size's figures grow to the largest's: taps, time, baseline, cost per tap, peak memory."""
    if len(results) < 2:
        return None
    a, b = results[0], results[-1]
    keys = ("taps", "nightly_s", "baseline_s", "claim_s", "us_per_tap", "baseline_us_per_tap", "peak_rss_mb")
    return {k: ratio(b[k], a[k]) for k in keys}


def run(*, sizes=SIZES, repeat: int | None = None, console, results_dir: Path, pg_url: str | None = None) -> dict:
    """Each size in one sitting, ``repeat`` times (default: 3, and 2 from 10 M taps up, where a sitting of three
    takes most of an hour on this machine); the JSON is written after each size, so a long run keeps what it did."""
    pg_url = pg_url or os.environ.get("FAREBOX_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    results: list[dict] = []
    doc: dict = {}
    for n in sizes:
        results.append(run_size(pg_url, n, repeat or (2 if n >= 10_000_000 else 3)))
        doc = {"routes": ROUTES, "vehicles": VEHICLES, "drivers": DRIVERS, "results": results,
               "goals": {"ratio_max": GOAL_RATIO, "seconds_max": GOAL_SECONDS, "peak_rss_mb_max": GOAL_MB},
               "growth_us_per_tap": ratio(results[-1]["us_per_tap"], results[0]["us_per_tap"])
               if len(results) > 1 else None,
               "growth": _growth(results)}
        path = write_result("city", doc, results_dir)
    console.print(table(
        f"city: the nightly path (settle: claim, clear, store, PDF/CSV/XLSX) beside COPY out + bare GROUP BYs "
        f"(median of {', '.join(str(r['repeat']) for r in results)})",
        ["taps", "nightly s", "of it claim s", "baseline s", "ratio", "ratio w/o claim", "peak RSS MiB", "µs/tap",
         "baseline µs/tap", "= SQL"],
        [[f"{r['taps']:,}", f"{r['nightly_s']:.2f}", f"{r['claim_s']:.2f}", f"{r['baseline_s']:.2f}",
          f"{r['ratio']:.2f}", f"{r['ratio_without_claim']:.2f}",
          f"{r['peak_rss_mb']:,.0f}", f"{r['us_per_tap']:.2f}", f"{r['baseline_us_per_tap']:.2f}",
          "yes" if r["agrees_with_sql"] else "NO"] for r in results],
        caption=f"goals: <= {GOAL_RATIO:.0f}× baseline, <= {GOAL_SECONDS:.0f} s, <= {GOAL_MB} MiB; JSON: {path}"))
    growth = {k: (v if v is not None else float("nan")) for k, v in (doc.get("growth") or {}).items()}
    if growth:
        console.print(f"{results[0]['taps']:,} -> {results[-1]['taps']:,} taps (×{growth['taps']:.0f}): nightly "
                      f"×{growth['nightly_s']:.2f}, baseline ×{growth['baseline_s']:.2f}, claim ×{growth['claim_s']:.2f}, "
                      f"cost per tap ×{growth['us_per_tap']:.2f} (baseline's ×{growth['baseline_us_per_tap']:.2f}), "
                      f"peak RSS ×{growth['peak_rss_mb']:.2f}")
    return doc


if __name__ == "__main__":
    import argparse

    from bench.common import RESULTS_DIR, console

    p = argparse.ArgumentParser(prog="python -m bench.city", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SIZES[0]:,} taps, once")
    p.add_argument("--taps", type=int, nargs="+", default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    a = p.parse_args()
    run(sizes=a.taps or (QUICK_SIZES if a.quick else SIZES), repeat=a.repeat or (1 if a.quick else None),
        console=console(), results_dir=a.results)

"""What every benchmark shares: percentiles, the machine it ran on, rich tables, JSON results.

The machines are shared and noisy, so a benchmark never stands alone: it runs a baseline beside itself in the same
process, at the same time, and reports medians, p99 and the ratio. No figure here is ever asserted.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).with_name("results")


def percentile(samples, q: float) -> float:
    """The q-th percentile (0-100) of ``samples``, nearest-rank on the sorted values; nan for no samples."""
    values = sorted(samples)
    if not values:
        return float("nan")
    rank = max(1, min(len(values), round(q / 100 * len(values) + 0.5)))
    return values[rank - 1]


def summary_us(samples_ns) -> dict:
    """p50 / p99 / mean / min / max in microseconds of samples in nanoseconds, and how many there were."""
    samples = list(samples_ns)
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "p50_us": round(percentile(samples, 50) / 1000, 1),
        "p99_us": round(percentile(samples, 99) / 1000, 1),
        "mean_us": round(sum(samples) / len(samples) / 1000, 1),
        "min_us": round(min(samples) / 1000, 1),
        "max_us": round(max(samples) / 1000, 1),
    }


def ratio(a: float, b: float) -> float | None:
    """a / b to 3 decimals; None when b is zero or either is missing."""
    if a is None or b is None or not b:
        return None
    return round(a / b, 3)


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.3f}× (1/{1 / r:.0f})" if r > 0 else "0×"


def machine() -> dict:
    """Where and what ran: enough to tell two result files apart, nothing secret."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "load_avg": load,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "commit": commit,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, doc: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """``results_dir/<name>.json``, written atomically (tmp file, then rename)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"benchmark": name, "machine": machine(), **doc}, indent=1, ensure_ascii=False)
                   + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def table(title: str, columns: list[str], rows: list[list[str]], caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption, caption_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t


def console() -> Console:
    return Console(highlight=False)

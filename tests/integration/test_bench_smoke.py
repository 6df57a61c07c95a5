"""The benchmarks still run (a quick round of each) and write their JSON. No timing is asserted: only that each
produced figures for itself and for its baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_benchmarks_run_and_write_json(tmp_path, pg_url, mosquitto_url):
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tap = json.loads((tmp_path / "tap.json").read_text())
    ingest = json.loads((tmp_path / "ingest.json").read_text())
    assert tap and ingest
    text = json.dumps([tap, ingest])
    assert "floor" in text and "raw" in text


def test_quick_city_bench_clears_a_day_and_writes_json(tmp_path, pg_url):
    env = {**os.environ, "FAREBOX_BENCH_PG_URL": pg_url}
    done = subprocess.run([sys.executable, "-m", "bench", "city", "--quick", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (result,) = json.loads((tmp_path / "city.json").read_text())["results"]
    assert result["taps"] == 100_000 and result["nightly_s"] > 0 and result["baseline_s"] > 0
    assert result["agrees_with_sql"] and result["peak_rss_mb"] > 0
    assert {"settlement-CITY-2026-11-02.pdf", "settlement-CITY-2026-11-02.xlsx"} <= set(result["files"])

"""The benchmarks still run (a quick round of each) and write their JSON. No timing is asserted: only that each
produced figures for itself and for its baseline."""

from __future__ import annotations

import json
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

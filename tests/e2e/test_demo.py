"""The demo end to end: `farebox demo` on its embedded defaults (own broker, SQLite), and the same day on
PostgreSQL + Mosquitto with the ingest process SIGKILLed and restarted several times.

Every number is checked against the sources themselves, not against the demo's own arithmetic: the validators'
journal files, the back office's tables read with plain SQL, and what the simulated cards lost.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from pypdf import PdfReader
from sqlalchemy import bindparam, create_engine, text

from farebox.config import Settings
from farebox.demo import run_demo

pytestmark = pytest.mark.slow


def journal_records(run_dir: Path, devices: list[str]) -> dict[tuple[str, int], dict]:
    """Completed records straight from each validator's SQLite journal."""
    out = {}
    for device in devices:
        db = sqlite3.connect(run_dir / f"{device}.journal")
        for seq, body in db.execute("SELECT device_seq, body FROM record WHERE state = 'done'"):
            out[(device, seq)] = json.loads(body)
        db.close()
    return out


def stored_records(url: str, devices: list[str]) -> list[dict]:
    engine = create_engine(url)
    with engine.connect() as conn:
        query = text("SELECT device_id, device_seq, kind, amount, route, vehicle, driver FROM tap "
                     "WHERE device_id IN :d").bindparams(bindparam("d", expanding=True))
        rows = conn.execute(query, {"d": devices}).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def yuan(fen: int) -> str:
    return f"{fen // 100:,}.{fen % 100:02d}"


def check_run(summary: dict, run_dir: Path, database_url: str) -> None:
    devices = summary["devices"]
    written = journal_records(run_dir, devices)
    rows = stored_records(database_url, devices)
    keys = [(r["device_id"], r["device_seq"]) for r in rows]
    assert len(keys) == len(set(keys)), "a record was stored twice"
    assert set(keys) == set(written), "stored records differ from what the validators wrote"
    lost = sum(c["initial"] - c["final"] for c in summary["cards"].values())
    purchases = [r for r in rows if r["kind"] == "purchase"]
    assert sum(r["amount"] for r in purchases) == lost > 0
    for key in ("route", "vehicle", "driver"):
        expected = defaultdict(int)
        for r in purchases:
            expected[r[key]] += r["amount"]
        got = {row[key]: row["amount"] for row in summary[f"by_{key}"]}
        assert got == dict(expected), key
        assert sum(got.values()) == lost
    assert summary["settled_amount"] == lost and summary["settled_taps"] == len(purchases)
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["shift_open"] == kinds["shift_close"] == len(devices)
    assert kinds["denied"] >= 1, "the deny-listed card was never refused"
    text_ = "".join(page.extract_text() for page in PdfReader(summary["pdf"]).pages)
    assert yuan(lost) in text_
    for section in ("By route", "By vehicle", "By driver"):
        assert section in text_


def test_make_demo_on_embedded_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env["FAREBOX_VAR_DIR"] = str(tmp_path / "var")
    proc = subprocess.run([sys.executable, "-m", "farebox.cli", "demo"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "agree" in proc.stdout and "DO NOT AGREE" not in proc.stdout
    assert "(embedded)" in proc.stdout and "took" in proc.stdout
    [run_dir] = (tmp_path / "var" / "demo").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["pdf"]).resolve().parent == (tmp_path / "var" / "reports").resolve()
    check_run(summary, run_dir, f"sqlite:///{tmp_path / 'var' / 'backoffice.db'}")
    assert summary["taps_by_outcome"]["insufficient_balance"] > 0


def test_ingest_killed_mid_day_loses_nothing_and_counts_nothing_twice(tmp_path, pg_schema_url, mosquitto_url):
    settings = Settings(var_dir=tmp_path / "var", database_url=pg_schema_url, mqtt_url=mosquitto_url)
    result = run_demo(settings, kill_ingest_at=(0.15, 0.35, 0.55, 0.75, 0.9))
    assert result.ingest_kills == 5
    assert result.consistent
    summary = json.loads((result.run_dir / "summary.json").read_text())
    check_run(summary, result.run_dir, pg_schema_url)

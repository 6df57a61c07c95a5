"""README "A new bus company", run as written: every ``sh`` block of that section, in order, as one bash script in an
empty folder, with only the environment a newcomer has (no FAREBOX_* setting, no test keys, ``farebox`` and
``mosquitto`` on PATH), on SQLite (the README's default; PostgreSQL with ``FAREBOX_DATABASE_URL`` set first, as the
section says, under ``FAREBOX_SOAK=1``). Then the first settlement's stored totals and the figures the command
printed are checked against a plain SQL sum over the stored taps and against the fares the section registered,
worked out here by hand.

The only things the test adds around the blocks: ``set -euo pipefail``, a trap that stops what the section started
if a step fails, and ``BUS_PORT`` (a free port: the machine's own Mosquitto holds 1883; the section reads
``${BUS_PORT:-1883}``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SECTION = "## A new bus company"
# What the section registers, written out here: route r1 flat 2.00 yuan, students pay 50 %, rider1 (adult) rides
# twice and rider2 (student) once; the issuer's commission is 0.60 %.
FARE, STUDENT_SHARE, RATE_BP = 200, 50, 60
EXPECTED_FARES = [FARE, FARE * STUDENT_SHARE // 100, FARE]


def section_blocks(readme: str) -> list[str]:
    """The ``sh`` code blocks of the README's "A new bus company" section, in order."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    text = readme[start:end if end != -1 else None]
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


def free_port_pair() -> int:
    """A port p with p and p + 1 free a moment ago (buses' listener and the back office's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two free ports next to each other")


def run_section(folder: Path, database_url: str | None) -> subprocess.CompletedProcess:
    blocks = section_blocks((ROOT / "README.md").read_text("utf-8"))
    assert len(blocks) >= 8, "the section's steps are sh blocks"
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n" + "\n".join(blocks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}  # no test keys, no test database
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin:/sbin"
    env["BUS_PORT"] = str(free_port_pair())
    if database_url is not None:
        env["FAREBOX_DATABASE_URL"] = database_url
    return subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def plain_sql(database_url: str | None, folder: Path, query: str) -> list[tuple]:
    if database_url is None:
        with sqlite3.connect(folder / "var" / "backoffice.db") as conn:
            return conn.execute(query).fetchall()
    import psycopg

    libpq = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request):
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed: run scripts/ensure-services.sh")
    if request.param == "sqlite":
        return None
    # ~25 farebox commands, each a fresh interpreter: the gate runs the README's own default (SQLite) only
    if os.environ.get("FAREBOX_SOAK") != "1":
        pytest.skip("the PostgreSQL run of the section is in make soak (FAREBOX_SOAK=1); make test runs SQLite")
    return request.getfixturevalue("pg_schema_url")


def test_the_readme_takes_a_new_company_from_an_empty_database_to_its_first_settlement(database, tmp_path):
    done = run_section(tmp_path, database)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert "TEST KEYS" not in done.stderr and "INSECURE" not in done.stderr  # the company's own keys throughout
    # the section's DAY (`date -u -d yesterday`), as settle printed it: a run that straddles midnight UTC still holds
    day = date.fromisoformat(re.search(r"^zhixing (\d{4}-\d{2}-\d{2}): clearing run", out, re.M).group(1))
    assert timedelta(days=1) <= datetime.now(UTC).date() - day <= timedelta(days=2)

    # The stored taps, by plain SQL: what the cards paid on the trial day, and that nothing was quarantined
    taps = plain_sql(database, tmp_path, "SELECT amount, card_type FROM tap WHERE kind = 'purchase' "
                                         "AND device_id = 'bus001' ORDER BY device_seq")
    assert [int(a) for a, _t in taps] == EXPECTED_FARES, taps
    assert plain_sql(database, tmp_path, "SELECT count(*) FROM quarantine")[0][0] == 0
    gross = sum(int(a) for a, _t in taps)

    # The first settlement: one stored clearing run for DAY, its totals against the SQL sum and the rate
    runs = plain_sql(database, tmp_path, "SELECT service_day, day_taps, day_gross, day_commission, day_net "
                                         "FROM clearing_run WHERE operator = 'zhixing'")
    assert len(runs) == 1, runs
    run_day, run_taps, run_gross, run_commission, run_net = runs[0]
    assert str(run_day)[:10] == day.isoformat()
    commission = (gross * RATE_BP + 5000) // 10000  # half away from zero, positive gross
    assert (int(run_taps), int(run_gross), int(run_commission), int(run_net)) == (
        len(EXPECTED_FARES), gross, commission, gross - commission)

    # ... and what `farebox settle` printed, in yuan
    line = next(x for x in out.splitlines() if x.startswith(f"zhixing {day}: clearing run"))
    assert (f"{len(EXPECTED_FARES)} fares, gross ¥{gross // 100}.{gross % 100:02d}, issuer commission "
            f"¥{commission // 100}.{commission % 100:02d}, net ¥{(gross - commission) // 100}."
            f"{(gross - commission) % 100:02d}") in line, line
    assert "no differences" in out  # farebox audit
    assert (tmp_path / "reports" / f"settlement-zhixing-{day}.pdf").exists()
    assert "every record acknowledged by the back office" in out
    # the steps said what they did in people's units
    assert "loaded ¥50.00" in out and "route r1 added (flat fare ¥2.00)" in out and "0.60%" in out

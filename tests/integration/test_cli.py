"""The `farebox` command as an operator types it, on a SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy import create_engine, text


def farebox(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env["FAREBOX_DATABASE_URL"] = f"sqlite:///{tmp_path}/bo.db"
    env["FAREBOX_INSECURE_TEST_KEYS"] = "1"  # device add derives from the published test device master
    return subprocess.run([sys.executable, "-m", "farebox.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_db_upgrade_then_device_add_registers_the_device(tmp_path):
    assert farebox(tmp_path, "db", "upgrade").returncode == 0
    engine = create_engine(f"sqlite:///{tmp_path}/bo.db")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO operator (code, name, timezone, cutoff_hour) "
                          "VALUES ('op1', 'Op One', 'Asia/Shanghai', 3)"))
    done = farebox(tmp_path, "device", "add", "--device-id", "v1", "--operator", "op1", "--terminal-id",
                   "0100000000AB")
    assert done.returncode == 0, done.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT device_id, terminal_id FROM device")).all() == [("v1", "0100000000ab")]


def test_a_bad_terminal_number_is_refused_with_a_reason(tmp_path):
    done = farebox(tmp_path, "device", "add", "--device-id", "v1", "--operator", "op1", "--terminal-id", "xyz")
    assert done.returncode == 2 and "12 hex digits" in done.stderr


def test_ingest_without_a_broker_says_what_to_set(tmp_path):
    done = farebox(tmp_path, "ingest")
    assert done.returncode == 2 and "FAREBOX_MQTT_URL" in done.stderr


def test_device_of_an_unknown_operator_is_refused_plainly(tmp_path):
    done = farebox(tmp_path, "device", "add", "--device-id", "v1", "--operator", "nobody", "--terminal-id",
                   "010000000001")
    assert done.returncode == 1 and "'nobody'" in done.stderr and "Traceback" not in done.stderr


def test_quarantine_lists_what_ingest_refused_with_its_reason(tmp_path):
    from datetime import UTC, datetime

    assert farebox(tmp_path, "db", "upgrade").returncode == 0
    engine = create_engine(f"sqlite:///{tmp_path}/bo.db")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO quarantine (received_at, topic, device_id, device_seq, reason, payload) "
                          "VALUES (:t, 'farebox/v1/op/v9/taps', 'v9', 12, 'TAC does not verify', x'00')"),
                     {"t": datetime(2026, 5, 1, 8, 0, tzinfo=UTC)})
    done = farebox(tmp_path, "quarantine")
    assert done.returncode == 0
    assert "v9" in done.stdout and "12" in done.stdout and "TAC does not verify" in done.stdout


def test_token_add_keeps_the_holders_language_and_token_list_shows_it(tmp_path):
    import tomllib

    path = tmp_path / "tokens.toml"
    for name, lang in (("wang", "zh"), ("smith", "en")):
        done = farebox(tmp_path, "token", "add", "--file", str(path), "--role", "operations", "--name", name,
                       "--lang", lang)
        assert done.returncode == 0, done.stderr
    assert farebox(tmp_path, "token", "add", "--file", str(path), "--role", "admin", "--name", "li").returncode == 0
    refused = farebox(tmp_path, "token", "add", "--file", str(path), "--role", "admin", "--name", "x", "--lang", "fr")
    assert refused.returncode == 2 and "fr" in refused.stderr
    # the file itself (what a login reads): each name with its language, li without one
    kept = {t["name"]: t.get("lang") for t in tomllib.loads(path.read_text())["token"]}
    assert kept == {"wang": "zh", "smith": "en", "li": None}
    listed = farebox(tmp_path, "token", "list", "--file", str(path))
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines() if line.split()[0] in kept}
    assert rows["wang"][2] == "zh" and rows["smith"][2] == "en" and rows["li"][2] == "-"

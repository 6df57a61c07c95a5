"""Issue 9, hole 2, from outside: the real `farebox` command, with its own database and broker URL but no key
settings, refuses to start on the published test keys (exit 2, naming the setting to give); with
--insecure-test-keys it starts and says so on stderr. And an attacker holding the published test secrets gets
nothing from a back office set up with `farebox keys init`: a webhook signed by the test payment seed is refused,
the `publisher` broker password derived from the test device master does not match the generated broker files,
a fare table signed with the test signing seed is refused by a validator given the fresh public key.

Also: read-only commands never migrate the schema; they say it is behind and how to bring it up."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]
NO_BROKER = "mqtt://ingest:secret@127.0.0.1:9"  # a broker URL given, never reached: refusal comes first


def env_without_keys(tmp_path, **extra) -> dict:
    """The environment of an operator who set the database and the broker, and no secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env.update(FAREBOX_DATABASE_URL=f"sqlite:///{tmp_path}/bo.db", FAREBOX_MQTT_URL=NO_BROKER,
               FAREBOX_VAR_DIR=str(tmp_path / "var"))
    env.update(extra)
    return env


def farebox(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "farebox.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def validator_args(tmp_path, *extra, mqtt=NO_BROKER.replace("ingest:secret", "bus1:pw")):
    fares = tmp_path / "fares.json"
    fares.write_text(json.dumps({"version": 1, "flat": {"r1": 200}}))
    return ["validator", "run", "--device", "bus1", "--operator", "op1", "--route", "r1", "--vehicle", "v1",
            "--reader", "sim:", "--psam", "sim:010000000001", "--journal", str(tmp_path / "journal.db"),
            "--fares", str(fares), "--mqtt", mqtt, *extra]


COMMANDS = {
    "serve": (["serve", "--port", "9"], ["FAREBOX_ISSUER_KEYS", "FAREBOX_DEVICE_MASTER_KEY", "FAREBOX_SIGNING_KEY",
                                         "FAREBOX_PAYMENT_PUBLIC_KEY"]),
    "ingest": (["ingest"], ["FAREBOX_ISSUER_KEYS", "FAREBOX_DEVICE_MASTER_KEY"]),
    "broker config": (["broker", "config", "--out", "{tmp}/broker"], ["FAREBOX_DEVICE_MASTER_KEY"]),
    "device add": (["device", "add", "--device-id", "bus1", "--operator", "op1", "--terminal-id", "010000000001"],
                   ["FAREBOX_DEVICE_MASTER_KEY"]),
    "denylist publish": (["denylist", "publish"], ["FAREBOX_SIGNING_KEY", "FAREBOX_DEVICE_MASTER_KEY"]),
    "validator run": (None, ["--mac-key", "--signing-public-key", "--psam sim:"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_refuses_to_start_on_the_published_test_keys(tmp_path, command):
    args, settings = COMMANDS[command]
    args = validator_args(tmp_path) if args is None else [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = farebox(env_without_keys(tmp_path), *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "refusing to start on published TEST keys" in done.stderr and "Traceback" not in done.stderr
    for setting in settings:
        assert setting in done.stderr, f"{setting} not named in: {done.stderr}"
    assert "farebox keys init" in done.stderr and "--insecure-test-keys" in done.stderr
    assert not (tmp_path / "bo.db").exists() and not (tmp_path / "broker").exists()  # nothing started


def test_a_key_file_holding_a_published_test_value_is_refused(tmp_path):
    from epurse.keys import TEST_ISSUER_KEYS
    from wire.devicekeys import TEST_DEVICE_MASTER
    from wire.packages import TEST_SIGNING_SEED

    master, seed, plain = tmp_path / "master.key", tmp_path / "signing.key", tmp_path / "issuer.toml"
    master.write_text(TEST_DEVICE_MASTER.hex())
    seed.write_text(TEST_SIGNING_SEED.hex())
    fresh = secrets.token_bytes(16).hex()  # three fresh keys and one published one: still refused
    plain.write_text(f'purchase = "{fresh}"\nload = "{fresh}"\nmaintenance = "{fresh}"\n'
                     f'tac = "{TEST_ISSUER_KEYS.tac.hex()}"\n')
    env = env_without_keys(tmp_path, FAREBOX_DEVICE_MASTER_KEY=str(master), FAREBOX_SIGNING_KEY=str(seed),
                           FAREBOX_ISSUER_KEYS=str(plain))
    done = farebox(env, "ingest")
    assert done.returncode == 2
    assert f"{master} holds the published TEST value" in done.stderr
    assert f"{plain} holds the published TEST value" in done.stderr
    done = farebox(env, "denylist", "publish")
    assert done.returncode == 2 and f"{seed} holds the published TEST value" in done.stderr
    # a validator given keys that are the published ones, spelled out, is refused as if they were left out
    done = farebox(env, *validator_args(tmp_path, "--mac-key", _test_mac("bus1").hex(), "--signing-public-key",
                                        _test_public().hex()))
    assert done.returncode == 2
    assert "--mac-key holds the published TEST value" in done.stderr
    assert "--signing-public-key holds the published TEST value" in done.stderr


def _test_mac(device: str) -> bytes:
    from wire.devicekeys import TEST_DEVICE_MASTER, mac_key

    return mac_key(TEST_DEVICE_MASTER, device)


def _test_public() -> bytes:
    from wire.packages import TEST_PUBLIC_KEY

    return TEST_PUBLIC_KEY


def _wait_ready(proc, ready: Path, log: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"farebox did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.1)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("how", ["flag", "flag after the command", "env"])
def test_insecure_test_keys_starts_and_says_so_loudly(tmp_path, how):
    from farebox.broker import free_port

    port, ready, log = free_port(), tmp_path / "ready", tmp_path / "serve.log"
    serve = ["serve", "--web-only", "--port", str(port), "--ready-file", str(ready)]
    env = env_without_keys(tmp_path, **({"FAREBOX_INSECURE_TEST_KEYS": "1"} if how == "env" else {}))
    args = {"flag": ["--insecure-test-keys", *serve], "flag after the command": [*serve, "--insecure-test-keys"],
            "env": serve}[how]
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "farebox.cli", *args], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, ready, log)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code < 500
    finally:
        _stop(proc)
    said = log.read_text()
    assert "INSECURE: running on PUBLISHED TEST KEYS" in said
    assert "the issuer master keys" in said and "the payment platform's public key" in said


# ------------------------------------------------------------------------------------------------ a fresh key set
@pytest.fixture
def fresh(tmp_path):
    """`farebox keys init --out DIR` (KEK from a variable: no passphrase prompt), and the settings it printed."""
    kek = secrets.token_bytes(32).hex()
    env = env_without_keys(tmp_path, TEST_KEK=kek)
    done = farebox(env, "keys", "init", "--out", str(tmp_path / "keys"), "--kek-env", "TEST_KEK")
    assert done.returncode == 0, done.stderr
    settings = dict(line.strip().split("=", 1) for line in done.stdout.splitlines()
                    if line.strip().startswith("FAREBOX_") and "=" in line)
    assert settings["FAREBOX_PAYMENT_PUBLIC_KEY"].startswith("<FILL IN")  # the platform's, not ours to make
    del settings["FAREBOX_PAYMENT_PUBLIC_KEY"]
    assert set(settings) == {"FAREBOX_ISSUER_KEYS", "FAREBOX_DEVICE_MASTER_KEY", "FAREBOX_SIGNING_KEY",
                             "FAREBOX_TICKET_KEY", "FAREBOX_TICKET_KEY_ID", "FAREBOX_TICKET_PICKUP_KEY"}
    for name in ("issuer-keys.json", "device-master.key", "signing.key", "ticket.key", "pickup.key"):
        assert (tmp_path / "keys" / name).stat().st_mode & 0o077 == 0, f"{name} readable by others"
    settings["FAREBOX_ISSUER_KEYS_KEK"] = kek
    return tmp_path / "keys", settings


def test_keys_init_makes_a_fresh_set_that_no_command_refuses(tmp_path, fresh):
    from farebox.config import load_settings
    from farebox.keys import device_master, key_service, signing_seed
    from wire.devicekeys import TEST_DEVICE_MASTER
    from wire.packages import TEST_SIGNING_SEED

    folder, settings = fresh
    s = load_settings({**settings, "FAREBOX_INSECURE_TEST_KEYS": "0"})
    assert device_master(s) != TEST_DEVICE_MASTER and signing_seed(s) != TEST_SIGNING_SEED
    assert key_service(s, environ=settings) is not None
    done = farebox(env_without_keys(tmp_path, **settings), "keys", "init", "--out", str(folder), "--kek-env",
                   "FAREBOX_ISSUER_KEYS_KEK")
    assert done.returncode == 2 and "not an empty folder" in done.stderr  # never overwritten


def test_a_webhook_signed_by_the_published_test_seed_is_refused(tmp_path, fresh):
    from backoffice.web.api.ota import SIGNATURE_HEADER
    from farebox.broker import free_port
    from hardware_sim.payment import PaymentPlatform

    _folder, settings = fresh
    platform = PaymentPlatform(secrets.token_bytes(32))  # the real platform: its seed is nobody else's
    env = env_without_keys(tmp_path, **settings)
    port, ready, log = free_port(), tmp_path / "ready", tmp_path / "serve.log"
    serve = ["serve", "--web-only", "--port", str(port), "--ready-file", str(ready)]
    refused = farebox(env, *serve)  # the platform key left out: refused, not the test platform's key
    assert refused.returncode == 2 and "FAREBOX_PAYMENT_PUBLIC_KEY" in refused.stderr
    env["FAREBOX_PAYMENT_PUBLIC_KEY"] = platform.public_key.hex()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "farebox.cli", *serve], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, ready, log)
        url = f"http://127.0.0.1:{port}/api/v1/ota/webhook"
        forged = PaymentPlatform().pay("ord_anything", 5000)  # signed with the published TEST seed
        r = httpx.post(url, content=forged.body, headers={SIGNATURE_HEADER: forged.signature}, timeout=10)
        assert r.status_code == 401, r.text
        genuine = platform.sign(forged.body)  # the same body from the real platform passes the signature check
        r = httpx.post(url, content=genuine.body, headers={SIGNATURE_HEADER: genuine.signature}, timeout=10)
        # the platform's own delivery is taken (200; platforms stop retrying) and found to name no order
        assert r.status_code == 200 and "unknown_order" in r.text, r.text
    finally:
        _stop(proc)
    assert "INSECURE" not in log.read_text()


def test_the_publisher_password_from_the_test_master_does_not_open_the_broker(tmp_path, fresh):
    from backoffice.devices import BACKOFFICE_USERS, service_password
    from farebox.broker_config import check_password
    from wire.devicekeys import TEST_DEVICE_MASTER

    folder, settings = fresh
    done = farebox(env_without_keys(tmp_path, **settings), "broker", "config", "--out", str(tmp_path / "broker"))
    assert done.returncode == 0, done.stderr
    hashes = {}
    for name in ("passwd", "backoffice.passwd"):
        path = tmp_path / "broker" / name
        if path.exists():
            hashes.update(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    fresh_master = bytes.fromhex((folder / "device-master.key").read_text().strip())
    for user in BACKOFFICE_USERS:
        assert check_password(service_password(fresh_master, user), hashes[user])
        assert not check_password(service_password(TEST_DEVICE_MASTER, user), hashes[user]), user
        assert service_password(TEST_DEVICE_MASTER, user) not in done.stdout


def test_a_fare_table_signed_with_the_test_seed_is_refused_by_a_freshly_keyed_validator(tmp_path, fresh,
                                                                                          mosquitto_url, uid):
    """A real `farebox validator run` given the fresh public key (and a fresh MAC key): a params package signed
    with the published test seed never changes its fares; the same package signed with the fresh seed does."""
    from datetime import UTC, datetime

    from test_downlink import BackOffice, params_body, wait_for

    from validator.fares import FareTable
    from wire.devicekeys import mac_key
    from wire.packages import TEST_SIGNING_SEED, Package

    folder, settings = fresh
    master = bytes.fromhex((folder / "device-master.key").read_text().strip())
    seed = bytes.fromhex((folder / "signing.key").read_text().strip())
    operator, device = f"op_{uid}", f"k_{uid}"
    key = mac_key(master, device)
    (tmp_path / "mac.key").write_text(key.hex())
    fares = tmp_path / "fares.json"
    fares.write_text(json.dumps({"version": 1, "flat": {"r1": 200}}))
    from wire.mqtt_url import parse_mqtt_url

    office = BackOffice(parse_mqtt_url(mosquitto_url), operator, device, key, uid)
    env = env_without_keys(tmp_path)
    # a simulated PSAM holds the published issuer keys, so this lab validator says --insecure-test-keys: the
    # banner names that PSAM only, not the MAC or signing key it was given
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "--insecure-test-keys", "validator", "run", "--device", device,
         "--operator", operator, "--route", "r1", "--vehicle", "b1", "--reader", "sim:", "--psam",
         "sim:010000000999", "--journal", str(tmp_path / "journal.db"), "--fares", str(fares),
         "--mqtt", mosquitto_url, "--mac-key", f"@{tmp_path / 'mac.key'}",
         "--signing-public-key", f"@{folder / 'signing.pub'}", "--heartbeat-seconds", "0.5"],
        env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=(tmp_path / "v.log").open("w"))
    try:
        office.wait_status(lambda s: True, kind="birth", what="the validator's birth")
        forged = FareTable(2, {"r1": 1})  # one fen a ride, signed with the published seed
        office.send("params", Package("params", 2, device, datetime.now(UTC), params_body(fares=forged.to_dict())),
                    seed=TEST_SIGNING_SEED)
        wait_for(lambda: office.seen("heartbeat", lambda s: any("refused" in a for a in s.alarms)),
                 what="the forged package refused")
        assert json.loads(fares.read_text())["flat"] == {"r1": 200}
        genuine = FareTable(3, {"r1": 220})
        office.send("params", Package("params", 3, device, datetime.now(UTC), params_body(fares=genuine.to_dict())),
                    seed=seed)
        office.wait_status(lambda s: s.params_version == 3, what="the genuine package applied")
        assert FareTable.from_dict(json.loads(fares.read_text())) == genuine
    finally:
        proc.kill()
        proc.wait(10)
        office.close()
    said = (tmp_path / "v.log").read_text()
    assert "the PSAM's issuer keys" in said and "MAC key" not in said and "package-signing" not in said


# ------------------------------------------------------------------------------------------------ read-only commands
OLD = "2026_11_22_0010"  # a revision every later one builds on


@pytest.fixture(params=["sqlite", "postgresql"])
def old_schema(request, tmp_path):
    """A database at an older revision than this farebox's heads."""
    from backoffice.db import alembic_config, make_engine

    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    from alembic import command

    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, OLD)
    yield url, engine
    engine.dispose()


def _revisions(engine) -> set[str]:
    with engine.connect() as conn:
        return {r for (r,) in conn.execute(text("SELECT version_num FROM alembic_version"))}


READERS = [["devices"], ["jobs", "list"], ["denylist", "show"], ["quarantine", "list"],
           ["registry", "names", "--operator", "op1"], ["registry", "audit", "--operator", "op1"],
           ["package", "progress", "--operator", "op1", "--kind", "params"]]


def test_read_only_commands_never_migrate_and_say_what_to_run(tmp_path, old_schema, monkeypatch, capsys):
    from farebox.cli import main

    url, engine = old_schema
    monkeypatch.setenv("FAREBOX_DATABASE_URL", url)
    for args in READERS:  # in this process (quick); `devices` below also as a process
        assert main(args) == 2, args
        said = capsys.readouterr().err
        assert f"the schema is at {OLD}, this farebox needs" in said and "farebox db upgrade" in said, (args, said)
        assert _revisions(engine) == {OLD}, f"{args} migrated the schema"
    env = env_without_keys(tmp_path, FAREBOX_DATABASE_URL=url)
    done = farebox(env, "devices")
    assert done.returncode == 2 and f"the schema is at {OLD}" in done.stderr and "Traceback" not in done.stderr
    assert _revisions(engine) == {OLD}
    assert main(["db", "upgrade"]) == 0  # a write command migrates, as before
    assert _revisions(engine) != {OLD}
    assert main(["devices"]) == 0


def test_a_read_only_command_on_no_database_makes_none(tmp_path):
    done = farebox(env_without_keys(tmp_path), "devices")
    assert done.returncode == 2 and "farebox db upgrade" in done.stderr
    assert not (tmp_path / "bo.db").exists()


def test_the_schema_check_compares_alembic_heads(tmp_path):
    from backoffice.db import make_engine, upgrade
    from farebox.bootstrap import schema_heads

    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    current, wanted = schema_heads(engine)
    assert current == set() and wanted
    upgrade(engine)
    current, wanted = schema_heads(engine)
    assert current == wanted == _revisions(create_engine(f"sqlite:///{tmp_path}/x.db"))


def test_the_insecure_setting_is_a_plain_yes_or_no(tmp_path):
    from farebox.config import load_settings

    assert load_settings({}).insecure_test_keys is False  # production is the default
    assert load_settings({"FAREBOX_INSECURE_TEST_KEYS": "1"}).insecure_test_keys is True
    assert load_settings({"FAREBOX_INSECURE_TEST_KEYS": "0"}).insecure_test_keys is False
    conf = tmp_path / "farebox.toml"
    conf.write_text('insecure_test_keys = true\npayment_public_key = "' + "ab" * 32 + '"\n')
    s = load_settings({"FAREBOX_CONFIG": str(conf)})
    assert s.insecure_test_keys is True and s.payment_public_key == "ab" * 32
    with pytest.raises(ValueError, match="FAREBOX_INSECURE_TEST_KEYS"):
        load_settings({"FAREBOX_INSECURE_TEST_KEYS": "maybe"})


def test_a_secret_that_cannot_be_read_stops_the_command_with_its_setting_named(tmp_path, fresh):
    _folder, settings = fresh
    env = env_without_keys(tmp_path, **{**settings, "FAREBOX_ISSUER_KEYS_KEK": secrets.token_bytes(32).hex()})
    done = farebox(env, "ingest")  # the wrong key-encryption key
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "FAREBOX_ISSUER_KEYS" in done.stderr and "wrong passphrase or key-encryption key" in done.stderr

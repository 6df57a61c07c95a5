"""The ticket keys are secrets like the others (farebox.keys): the Ed25519 seed that signs ticket tokens
(``FAREBOX_TICKET_KEY``, ``FAREBOX_TICKET_KEY_ID``) and the pickup-code master (``FAREBOX_TICKET_PICKUP_KEY``), in
the environment or the TOML file. `farebox keys init` makes fresh ones; the published test values are refused
outside labs (`farebox serve` names the settings to give); and `farebox package publish --kind params` puts the
ticket public key and the operator's pickup key into the params package of an operator that sells tickets, so the
buses can check QR tickets and pickup codes offline.

Checked from outside: the real `farebox` command in a subprocess, the stored package read with plain SQL, the public
key computed with pycryptodome (tests/reference_ticket.py) and the pickup key with the standard library's HMAC."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest
from reference_ticket import ref_keypair
from sqlalchemy import create_engine, text
from test_test_keys import env_without_keys, farebox, fresh  # noqa: F401 (fresh: a fixture)

from backoffice.tickets.keys import TEST_PICKUP_MASTER, TEST_TICKET_SEED

TICKET_SETTINGS = ("FAREBOX_TICKET_KEY", "FAREBOX_TICKET_KEY_ID", "FAREBOX_TICKET_PICKUP_KEY")


def _hex(path) -> bytes:
    return bytes.fromhex(path.read_text().strip())


def test_keys_init_makes_fresh_ticket_keys(fresh):
    from farebox.config import load_settings
    from farebox.keys import ticket_keys

    folder, settings = fresh
    seed, master = _hex(folder / "ticket.key"), _hex(folder / "pickup.key")
    assert len(seed) == 32 and len(master) == 32
    assert seed != TEST_TICKET_SEED and master != TEST_PICKUP_MASTER
    for name in ("ticket.key", "pickup.key"):
        assert (folder / name).stat().st_mode & 0o077 == 0, f"{name} readable by others"
    assert _hex(folder / "ticket.pub") == ref_keypair(seed)[1]
    assert settings["FAREBOX_TICKET_KEY_ID"] == "1"
    keys = ticket_keys(load_settings({**settings, "FAREBOX_INSECURE_TEST_KEYS": "0"}))  # not refused
    assert keys.key_id == 1 and keys.public_key() == ref_keypair(seed)[1]
    assert seed.hex() not in repr(keys) and master.hex() not in repr(keys)


def test_serve_refuses_to_start_without_ticket_keys(tmp_path, fresh):
    _folder, settings = fresh
    env = env_without_keys(tmp_path, **{k: v for k, v in settings.items() if k not in TICKET_SETTINGS},
                           FAREBOX_PAYMENT_PUBLIC_KEY="ab" * 32)
    done = farebox(env, "serve", "--web-only", "--port", "9")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "refusing to start on published TEST keys" in done.stderr
    assert "FAREBOX_TICKET_KEY" in done.stderr and "FAREBOX_TICKET_PICKUP_KEY" in done.stderr
    assert "the ticket-signing key" in done.stderr and "pickup-code master" in done.stderr
    assert "FAREBOX_SIGNING_KEY" not in done.stderr  # the fresh ones are taken
    assert not (tmp_path / "bo.db").exists()  # nothing started


def test_files_holding_the_published_test_ticket_values_are_refused(tmp_path, fresh):
    _folder, settings = fresh
    seed_file, master_file = tmp_path / "ticket.key", tmp_path / "pickup.key"
    seed_file.write_text(TEST_TICKET_SEED.hex())
    master_file.write_text(TEST_PICKUP_MASTER.hex())
    env = env_without_keys(tmp_path, **{**settings, "FAREBOX_PAYMENT_PUBLIC_KEY": "ab" * 32,
                                        "FAREBOX_TICKET_KEY": str(seed_file),
                                        "FAREBOX_TICKET_PICKUP_KEY": str(master_file)})
    done = farebox(env, "serve", "--web-only", "--port", "9")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{seed_file} holds the published TEST value" in done.stderr
    assert f"{master_file} holds the published TEST value" in done.stderr


def test_ticket_settings_from_the_toml_file(tmp_path, capsys):
    from farebox import bootstrap
    from farebox.config import load_settings

    seed, master = bytes(range(32)), bytes(range(64, 96))
    (tmp_path / "t.key").write_text(seed.hex())
    (tmp_path / "p.key").write_text(master.hex())
    config = tmp_path / "farebox.toml"
    config.write_text(f'ticket_key_file = "{tmp_path / "t.key"}"\nticket_key_id = 7\n'
                      f'ticket_pickup_key_file = "{tmp_path / "p.key"}"\n')
    keys = bootstrap.start(load_settings({"FAREBOX_CONFIG": str(config)}), "ticket", "pickup").ticket_keys
    assert keys.key_id == 7 and keys.public_key() == ref_keypair(seed)[1]
    expected = hmac.new(master, b"farebox-pickup-v1|op9", hashlib.sha256).digest()
    assert keys.validator_params("op9").pickup_key == expected
    assert "INSECURE" not in capsys.readouterr().err
    config.write_text("ticket_key_id = 300\n")
    with pytest.raises(ValueError, match="FAREBOX_TICKET_KEY_ID"):
        load_settings({"FAREBOX_CONFIG": str(config)})
    # a lab on the published keys: it starts, and the banner names them
    root = bootstrap.start(load_settings({"FAREBOX_INSECURE_TEST_KEYS": "1"}), "ticket", "pickup")
    assert root.ticket_keys.key_id == 0 and root.ticket_keys.public_key() == ref_keypair(TEST_TICKET_SEED)[1]
    said = capsys.readouterr().err
    assert "PUBLISHED TEST KEYS" in said and "the ticket-signing key" in said and "pickup-code master" in said


def _stored_params(url: str, operator: str) -> list[tuple[str, dict]]:
    """(version, body) of each params package stored for the operator, read with plain SQL; the body is the JSON
    after the signed package's header (wire.packages: the body is the last part before the 64-byte signature)."""
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT version, payload FROM package WHERE operator = :op AND kind = 'params' "
                                 "ORDER BY id"), {"op": operator}).all()
    engine.dispose()
    out = []
    for version, payload in rows:
        payload = bytes(payload)[:-64]
        # the binary header may hold a "{" byte by chance: the body is the first "{" from which the rest parses
        starts = [i for i in range(len(payload)) if payload[i:i + 1] == b"{"]
        out.append((version, next(_json_from(payload[i:]) for i in starts if _json_from(payload[i:]) is not None)))
    return out


def _json_from(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def test_package_publish_puts_the_ticket_keys_into_the_params(tmp_path, fresh, mosquitto_url, uid):
    """An operator that sells no tickets publishes its params without ticket keys (none needed); one that sells
    tickets gets the public key and its own pickup key in every params package, and cannot publish without the
    ticket keys set."""
    from backoffice import registry
    from backoffice.db import make_engine, upgrade
    from backoffice.tickets.catalogue import add_product
    from wire.mqtt_url import new_client, parse_mqtt_url
    from wire.topics import fleet_topic

    folder, settings = fresh
    operator = f"op_{uid}"
    url = f"sqlite:///{tmp_path}/bo.db"
    engine = make_engine(url)
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Ticket Bus Co.", timezone="Asia/Shanghai")
        registry.add_route(conn, code="r1", operator=operator, name="1路", flat_fare=200)
    body = tmp_path / "params.json"
    body.write_text(json.dumps({"route": "r1"}))
    without = {k: v for k, v in settings.items() if k not in TICKET_SETTINGS}
    env = env_without_keys(tmp_path, **without, FAREBOX_MQTT_URL=mosquitto_url)

    def publish(env, version):
        return farebox(env, "package", "publish", "--kind", "params", "--operator", operator, "--fleet",
                       "--version", str(version), "--file", str(body))

    try:
        done = publish(env, 1)
        assert done.returncode == 0, done.stderr
        with engine.begin() as conn:
            add_product(conn, operator=operator, code="ride", kind="single", name="单程 Single ride", price_fen=200,
                        routes=(), by="test", now=now)
        done = publish(env, 2)
        assert done.returncode == 2 and "FAREBOX_TICKET_KEY" in done.stderr and "Traceback" not in done.stderr
        done = publish({**env, **settings}, 3)
        assert done.returncode == 0, done.stderr
        stored = _stored_params(url, operator)
        assert [v for v, _ in stored] == ["1", "3"]  # the refused one stored nothing
        assert "tickets" not in stored[0][1]
        tickets = stored[1][1]["tickets"]
        seed, master = _hex(folder / "ticket.key"), _hex(folder / "pickup.key")
        assert tickets["keys"] == {"1": ref_keypair(seed)[1].hex()}
        assert tickets["pickup_key"] == hmac.new(master, b"farebox-pickup-v1|" + operator.encode(),
                                                 hashlib.sha256).hexdigest()
        assert stored[1][1]["route"] == "r1"
        assert master.hex() not in done.stdout + done.stderr and seed.hex() not in done.stdout + done.stderr
    finally:
        engine.dispose()
        client = new_client(parse_mqtt_url(mosquitto_url), f"clean_{uid}", persistent=False)  # the retained one
        target = parse_mqtt_url(mosquitto_url)
        client.connect(target.host, target.port)
        client.loop_start()
        client.publish(fleet_topic(operator, "params"), b"", qos=1, retain=True).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()

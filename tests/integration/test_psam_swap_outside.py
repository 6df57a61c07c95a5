"""A PSAM swap seen from outside (issue 9, hole 6): a running IngestConsumer on the machine's Mosquitto, a validator
(journal, uplink, SimPsam in its slot) that uploads over MQTT, the clerk's HTTP API, and the `farebox quarantine`
command, on SQLite and PostgreSQL.

The mechanic swaps the bus's PSAM while its link is down. When the link comes back, the taps signed by the old PSAM
before the swap are stored (late uploads, judged by the registry at their time) and those signed by the new one are
quarantined: the clerk has not typed the swap in yet. The clerk records it through the API, dated when it was
made; from then on the new PSAM's taps are stored at once by the same running ingest. A batch MAC'd with the
device's key but naming a made-up PSAM is quarantined. Operations release from the CLI: the genuine taps are stored
once, the forgery stays quarantined with the reason found now and is rejected through the API. At the end the
stored fares equal what the riders' cards lost, tap for tap.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from reference_crypto import ref_purchase_tac
from simbus import TERMINAL, Bus
from sqlalchemy import func, select

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest import Ingest
from backoffice.ingest_consumer import IngestConsumer, end_session
from backoffice.models import Quarantine, Tap
from backoffice.web.api.quarantine import configure_quarantine
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from epurse import apdu
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.psam import SimPsam
from validator.messages import Outcome
from validator.readers.sim import SimReader
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.records import RecordKind, TapRecord

NEW_TERMINAL = bytes.fromhex("010000000888")
FORGED_TERMINAL = "0100000009ff"
TOKENS = {"t-clerk": Principal("clerk_li", "clerk", None), "t-ops": Principal("ops_wang", "operations")}


def _wait(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path, mosquitto_url, uid):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    operator, device = f"op_{uid}", f"v_{uid}"
    engine = make_engine(url)
    upgrade(engine)
    target = parse_mqtt_url(mosquitto_url)
    bus = Bus(tmp_path, target, operator, device)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Swap Test Bus", at=bus.clock_now - timedelta(days=30))
        registry.add_device(conn, device_id=device, operator=operator, vehicle=None, terminal_id=TERMINAL.hex(),
                            at=bus.clock_now - timedelta(days=30))
    consumer = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                              client_id=f"ingest_{uid}", operator=operator)
    consumer.start()
    assert consumer.wait_subscribed(10)
    tokens = {**TOKENS, "t-clerk": Principal("clerk_li", "clerk", operator)}
    app = create_app(engine, tokens=TokenStore(tokens=tokens), migrate=False)
    configure_quarantine(app, ingest=Ingest(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER))  # as farebox serve
    bus.uplink.start()
    with TestClient(app) as client:
        yield engine, consumer, bus, client, url, target
    bus.uplink.stop()
    consumer.stop()
    end_session(target, f"ingest_{uid}")
    bus.journal.close()
    engine.dispose()


def _swap_psam(bus: Bus, terminal: bytes) -> None:
    """What the mechanic does: a new PSAM in the SAM slot; the validator reads its terminal number on start."""
    slot = SimReader()
    slot.present(SimPsam(terminal, keys=TEST_ISSUER_KEYS))
    bus.terminal.psam = slot.poll()
    bus.terminal.terminal_id = apdu.check(bus.terminal.psam.exchange(apdu.psam_read_terminal_id()),
                                          "PSAM READ TERMINAL ID")


def _counts(engine) -> dict:
    with engine.connect() as conn:
        taps = conn.execute(select(func.count(), func.coalesce(func.sum(Tap.amount), 0))
                            .where(Tap.kind == "purchase")).one()
        held = dict(conn.execute(select(Quarantine.status, func.count()).group_by(Quarantine.status)).all())
    return {"purchases": taps[0], "fen": taps[1], **held}


def _forged_batch(bus: Bus, operator: str, device: str) -> bytes:
    """A record MAC'd with the device's key whose PSAM is made up; its TAC is right for that terminal, so only the
    PSAM check can catch it."""
    at = bus.clock_now + timedelta(seconds=5)
    asn, amount, tseq = "99990000000000000020", 200, 77
    record = TapRecord(device_id=device, device_seq=900_000, kind=RecordKind.PURCHASE, occurred_at=at,
                       operator=operator, route="r1", vehicle="b1", driver="D7", shift_no=1, card_asn=asn,
                       card_type=1, card_ttc=9000, amount=amount, balance_after=500, terminal_id=FORGED_TERMINAL,
                       terminal_seq=tseq, tac=ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(asn), amount,
                                                               bytes.fromhex(FORGED_TERMINAL), tseq, at).hex(),
                       epoch=bus.journal.epoch if hasattr(bus.journal, "epoch") else 0)
    return codec.encode_batch([record], key=mac_key(TEST_DEVICE_MASTER, device))


def _farebox(db_url, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAREBOX_")}
    env["FAREBOX_DATABASE_URL"] = db_url
    env["FAREBOX_INSECURE_TEST_KEYS"] = "1"  # the bus and ingest here run on the published test keys
    return subprocess.run([sys.executable, "-m", "farebox.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_psam_swap_from_outside_loses_no_fare_and_lets_no_forgery_in(world):
    engine, consumer, bus, client, db_url, target = world
    operator, device = bus.terminal.config.operator, bus.terminal.config.device_id
    assert bus.tap(bus.driver) is Outcome.SHIFT_OPENED
    bus.ride(2)
    assert bus.uplink.wait_drained(30)
    assert _counts(engine)["purchases"] == 2

    bus.uplink.go_offline()  # the link drops: these wait in the journal
    bus.ride(2)  # old PSAM, before the swap: late uploads
    swapped_at = bus.clock_now + timedelta(seconds=20)
    bus.clock_now = swapped_at
    _swap_psam(bus, NEW_TERMINAL)
    bus.ride(2)  # new PSAM: the registry does not know it yet
    bus.uplink.go_online()
    assert bus.uplink.wait_drained(30), f"backlog {bus.journal.backlog()}"
    assert _counts(engine) == {"purchases": 4, "fen": 800, "open": 2}  # late uploads stored, new PSAM held

    # The clerk records the swap through the API, dated when the mechanic made it.
    r = client.patch(f"/api/v1/devices/{device}", json={"terminal_id": NEW_TERMINAL.hex(),
                                                        "at": swapped_at.isoformat()},
                     headers={"Authorization": "Bearer t-clerk"})
    assert r.status_code == 200, r.text
    bus.ride(3)  # the same running ingest stores the new PSAM's taps at once
    assert bus.uplink.wait_drained(30)
    assert _counts(engine) == {"purchases": 7, "fen": 1400, "open": 2}

    # Someone holding the device's key sends a record naming a PSAM that was never in this bus.
    publisher = new_client(target, f"forger_{device}")
    publisher.connect(target.host, target.port)
    publisher.loop_start()
    publisher.publish(topics.taps(operator, device), _forged_batch(bus, operator, device), qos=1).wait_for_publish()
    publisher.loop_stop()
    publisher.disconnect()
    _wait(lambda: _counts(engine).get("open") == 3, what="the forged record in quarantine")

    listed = _farebox(db_url, "quarantine", "list", "--device", device)
    assert listed.returncode == 0 and "3 of 3 open" in listed.stdout, listed.stdout + listed.stderr
    released = _farebox(db_url, "quarantine", "release", "--device", device, "--matching",
                        "not the PSAM registered", "--why", "PSAM swapped by the workshop, registry corrected",
                        "--by", "ops_wang")
    assert released.returncode == 1, released.stdout + released.stderr  # one of them is not released
    assert "2 released, 1 not" in released.stdout and "still quarantined" in released.stdout
    assert FORGED_TERMINAL in released.stdout
    counts = _counts(engine)
    assert counts == {"purchases": 9, "fen": 1800, "open": 1, "released": 2}

    again = _farebox(db_url, "quarantine", "release", "--device", device, "--matching", "not the PSAM",
                     "--why", "once more", "--by", "ops_zhao")
    assert again.returncode == 1 and _counts(engine)["purchases"] == 9  # released rows are not picked again
    ops = {"Authorization": "Bearer t-ops"}
    rows = client.get("/api/v1/quarantine/rows", params={"status": "all", "device": device}, headers=ops).json()
    by_status = {}
    for item in rows["items"]:
        by_status.setdefault(item["status"], []).append(item)
    (forged,) = by_status["open"]
    assert FORGED_TERMINAL in forged["recheck_reason"]
    assert client.post(f"/api/v1/quarantine/{by_status['released'][0]['id']}/release", json={"why": "again"},
                       headers=ops).status_code == 409
    assert client.post(f"/api/v1/quarantine/{forged['id']}/reject", json={"why": "x"},
                       headers={"Authorization": "Bearer t-clerk"}).status_code == 403  # clerks only look
    r = client.post(f"/api/v1/quarantine/{forged['id']}/reject", json={"why": "no such PSAM was ever issued"},
                    headers=ops)
    assert r.status_code == 200 and r.json()["status"] == "rejected" and r.json()["resolved_by"] == "ops_wang"

    # Money: what the riders' cards lost is what is stored, card by card, nothing twice.
    lost = {c.asn.hex(): 1_000_000 - c.balance for c in bus.riders if c.balance != 1_000_000}
    with engine.connect() as conn:
        stored = dict(conn.execute(select(Tap.card_asn, func.sum(Tap.amount)).where(Tap.kind == "purchase")
                                   .group_by(Tap.card_asn)).all())
        keys = conn.execute(select(func.count(), func.count(func.distinct(Tap.device_seq)))).one()
    assert stored == lost and sum(lost.values()) == 1800
    assert keys[0] == keys[1]
    assert _counts(engine) == {"purchases": 9, "fen": 1800, "released": 2, "rejected": 1}

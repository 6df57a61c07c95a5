"""Two ingest workers on one shared subscription of the real Mosquitto, each SIGKILLed again and again right after a
database commit and before that batch's acknowledgement leaves, while buses keep riding and uploading. Afterwards:
every record the buses wrote is stored once (row count == unique keys == the journals' records), and the settlement
of the day (clearing through backoffice.settle) equals what the riders' cards lost, counted from the cards.

Each worker is the real IngestConsumer in a process of its own whose acknowledgement publish sends SIGKILL to
itself instead; a killed worker is started again under the same client id (its persistent session). The last pair
runs without dying until the buses' journals are drained. Every round ends with at least one such kill: a bus whose
records are all acknowledged rides on (one tap at a time) until a worker has published enough acknowledgements to
die, because a bus sends whatever piled up behind its batch in flight as one batch, so a round's 54 taps can be as
few as three batches, all acknowledged before either worker reaches its count (and then nothing more would come).
Each worker logs (timestamps, connects, acknowledgements, its kill) to ``<client id>.log`` beside the journals.

``FAREBOX_SOAK=1`` (``make soak``) runs 40 kill rounds instead of 6.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
from simbus import TERMINAL, Bus
from sqlalchemy import create_engine, text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest_consumer import end_session
from backoffice.settle import settle
from hardware_sim.card import SimCard
from wire.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.slow
ROUNDS = 40 if os.environ.get("FAREBOX_SOAK") == "1" else 6

WORKER = """
import logging, os, signal, sys, time
from pathlib import Path
from backoffice.db import make_engine
from backoffice.ingest_consumer import IngestConsumer
from epurse.keys import TEST_ISSUER_KEYS
from wire.devicekeys import TEST_DEVICE_MASTER
from wire.mqtt_url import parse_mqtt_url

database_url, mqtt_url, client_id, group, operator, die_at, ready = sys.argv[1:8]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(threadName)s %(name)s: %(message)s")
log = logging.getLogger("worker")
log.info("%s starts; it dies at its acknowledgement %s", client_id, die_at)
# accept_unsigned: the simulated buses' uplink may still send v1 batches (their acks then go back as v1 too).
consumer = IngestConsumer(make_engine(database_url), parse_mqtt_url(mqtt_url), keys=TEST_ISSUER_KEYS,
                          master=TEST_DEVICE_MASTER, client_id=client_id, operator=operator, share_group=group,
                          accept_unsigned=True)
acks = 0
send = consumer.client.publish

def publish(*args, **kwargs):
    global acks
    acks += 1
    log.info("acknowledgement %d on %s", acks, args[0])
    if acks >= int(die_at):
        os.kill(os.getpid(), signal.SIGKILL)  # the batch is committed; its acknowledgement never leaves
    return send(*args, **kwargs)

consumer.client.publish = publish
consumer.on_ready = lambda: Path(ready).touch()
consumer.start()
time.sleep(300)
"""


def own_riders(bus: Bus, n: int) -> Bus:
    """simbus gives every Bus the same rider ASNs; two cards with one ASN and one counter are what the fraud check
    flags, so each bus gets cards of its own."""
    bus.riders = [SimCard(bytes.fromhex(f"98{n:02d}{k:016d}"), card.card_type, card.balance, start=card.start,
                          end=card.end) for k, card in enumerate(bus.riders, 1)]
    return bus


class Worker:
    def __init__(self, tmp_path, url, mqtt_url, client_id, group, operator, env):
        self.args = [url, mqtt_url, client_id, group, operator]
        self.ready = tmp_path / f"{client_id}.ready"
        self.log = tmp_path / f"{client_id}.log"
        self.env = env
        self.proc = None
        self.kills = 0

    def spawn(self, die_at: int) -> None:
        self.ready.unlink(missing_ok=True)
        with open(self.log, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER, *self.args, str(die_at), str(self.ready)],
                                         env=self.env, stdout=log, stderr=log)

    def wait_ready(self) -> None:
        # Generous: a spawned interpreter importing farebox takes seconds on a loaded machine.
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "ingest worker did not subscribe"
            time.sleep(0.05)

    def dead(self) -> bool:
        """Whether the worker is down; a death by its own SIGKILL is counted."""
        if self.proc is not None and self.proc.poll() is not None:
            assert self.proc.returncode == -9, f"worker ended with {self.proc.returncode}, not by its SIGKILL"
            self.kills += 1
            self.proc = None
        return self.proc is None

    def stop(self) -> None:
        """Kill it from outside (not counted as one of its own kills)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def test_two_workers_killed_between_commit_and_ack_store_everything_once(tmp_path, pg_schema_url, mosquitto_url,
                                                                        uid):
    operator, group = f"op_{uid}", f"g{uid}"
    engine = make_engine(pg_schema_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Worker Kill Bus")
        for n in (1, 2, 3):
            registry.add_device(conn, device_id=f"v{n}_{uid}", operator=operator, vehicle=None,
                                terminal_id=TERMINAL.hex())
    engine.dispose()
    target = parse_mqtt_url(mosquitto_url)
    buses = [own_riders(Bus(tmp_path, target, operator, f"v{n}_{uid}"), n) for n in (1, 2, 3)]
    env = {**os.environ, "FAREBOX_DATABASE_URL": pg_schema_url, "FAREBOX_MQTT_URL": mosquitto_url}
    workers = [Worker(tmp_path, pg_schema_url, mosquitto_url, f"w{i}_{uid}", group, operator, env) for i in (0, 1)]
    rnd = random.Random(uid)
    window_hits = taps = 0
    try:
        for bus in buses:
            bus.uplink.start()
            bus.tap(bus.driver)
        for _ in range(ROUNDS):
            down = [w for w in workers if w.dead()]
            for w in down:  # both at once: each start costs an interpreter's imports
                w.spawn(die_at=rnd.randint(1, 4))
            for w in down:
                w.wait_ready()
            for _ in range(3):
                for bus in buses:
                    bus.ride(6)
                    taps += 6
            # Until one of them hits its window. Both are up, so every batch sent is stored and acknowledged; a bus
            # with nothing left unacknowledged rides on, so acknowledgements keep coming until one worker dies.
            deadline = time.monotonic() + 60
            while sum(w.dead() for w in workers) == 0:  # sum, not any: both deaths are seen and counted
                assert time.monotonic() < deadline, (
                    f"no worker reached its acknowledgement; backlogs {[b.journal.backlog() for b in buses]}")
                for bus in buses:
                    if bus.journal.backlog() == 0:
                        bus.ride(1)
                        taps += 1
                time.sleep(0.05)
            stored = _stored_keys(pg_schema_url)
            unacked = {(b.terminal.config.device_id, r.device_seq) for b in buses for r in b.journal.unsent(10**6)}
            window_hits += bool(stored & unacked)  # committed, yet the bus still holds it: the window was hit
        for w in workers:
            w.dead()
            w.stop()
            w.spawn(die_at=10**9)
        for w in workers:
            w.wait_ready()
        for bus in buses:
            assert bus.uplink.wait_drained(60), f"backlog {bus.journal.backlog()}"
    finally:
        for bus in buses:
            bus.uplink.stop()
        for w in workers:
            w.stop()
            end_session(target, w.args[2])

    kills = sum(w.kills for w in workers)
    assert kills >= ROUNDS, kills  # every round ended with at least one worker's own SIGKILL
    assert window_hits >= ROUNDS // 2, (kills, window_hits)
    written = {(b.terminal.config.device_id, r.device_seq) for b in buses for r in b.journal.records_since(0)}
    rows = _stored(pg_schema_url)
    keys = [(r.device_id, r.device_seq) for r in rows]
    assert len(keys) == len(set(keys)) == len(written) and set(keys) == written
    lost = sum(1_000_000 - card.balance for b in buses for card in b.riders)  # what the cards say, card by card
    purchases = sum(1 for b in buses for card in b.riders for _ in range(card.ttc))
    engine = make_engine(pg_schema_url)
    with engine.connect() as conn:
        settlement = settle(conn, operator=operator, day=buses[0].clock_now.date()).settlement
        quarantined = conn.execute(text("SELECT count(*) FROM quarantine")).scalar_one()
    engine.dispose()
    assert (settlement.amount, settlement.taps) == (lost, purchases) == (sum(r.amount for r in rows), taps)
    assert settlement.totals_agree() and quarantined == 0
    for bus in buses:
        bus.journal.close()


def _stored(url):
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT device_id, device_seq, amount FROM tap")).all()
    engine.dispose()
    return rows


def _stored_keys(url) -> set:
    return {(r.device_id, r.device_seq) for r in _stored(url)}

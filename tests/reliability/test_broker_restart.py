"""The broker SIGKILLed in the middle of a run of 50 validators and started again on the same port.

A private Mosquitto runs the files ``farebox broker config`` writes (farebox.broker_config: per-device passwords and
ACL, persistence on, max_queued_messages 1,000,000, set_tcp_nodelay) on a free loopback port, its persistence in
tmp_path. 50 validators (real Terminal + Journal + Uplink each, logged in as their device with the derived password,
MAC'd with their device key; all in this process) keep taking taps while the real IngestConsumer (logged in as
``ingest``) stores into a fresh PostgreSQL database. Mid-run the broker gets SIGKILL (no clean shutdown, nothing
saved since its last autosave), the buses keep tapping into their journals, and the broker is started again with
the same files on the same port; the buses go on tapping, then everything drains.

Afterwards: every journal's backlog is 0; for every device the stored sequences are exactly 1..N (no gap) and
equal its journal's; no key is stored twice; the sum stored equals what the cards lost (counted on the cards).

:class:`PrivateBroker` is also used by test_outage.py and test_live_garbage.py (imported by module name: pytest
puts this folder on sys.path, as it does for simbus).

``FAREBOX_SOAK=1`` (``make soak``): three kills instead of one, more taps between them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from simbus import TERMINAL, Bus
from sqlalchemy import text

from backoffice import devices, registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest_consumer import IngestConsumer
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from farebox.broker_config import write_broker_config
from hardware_sim.card import SimCard
from validator.messages import Outcome
from wire.devicekeys import TEST_DEVICE_MASTER, mqtt_password
from wire.mqtt_url import MqttTarget

pytestmark = pytest.mark.slow
SOAK = os.environ.get("FAREBOX_SOAK") == "1"
BUSES = 50
KILLS = 3 if SOAK else 1
TAPS_PER_PHASE = 60 if SOAK else 20  # taps per bus before, during and after each outage of the broker
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_BALANCE = 100_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_dir(tmp_path: Path) -> Path:
    """A folder on tmpfs for journals when there is one: each tap fsyncs twice (~7 ms on these disks), and these
    tests are about the link, not the disk (tests/reliability/test_power_cut.py is)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="farebox_rel_", dir=shm))
    return tmp_path


class PrivateBroker:
    """``mosquitto -c <conf written by farebox.broker_config>`` for (device, operator) pairs, on a free port."""

    def __init__(self, folder: Path, registered: list[tuple[str, str]]):
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed: run scripts/ensure-services.sh")
        self.port = free_port()  # the buses' listener
        self.service_port = free_port()  # the back office's listener
        # run_as root: pytest's tmp_path (under a 0700 folder) is out of reach of the `mosquitto` user
        self.files = write_broker_config(devices=registered, master=TEST_DEVICE_MASTER, folder=folder / "broker",
                                         port=self.port, bind="127.0.0.1", persistence_dir=folder / "broker-data",
                                         run_as="root", service_port=self.service_port)
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> PrivateBroker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.files.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + 15
        while True:
            try:
                for port in (self.port, self.service_port):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no last save of its state."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def target(self, user: str) -> MqttTarget:
        if user in devices.BACKOFFICE_USERS:  # the back office logs in on its own listener
            return MqttTarget("127.0.0.1", self.service_port, username=user,
                              password=devices.service_password(TEST_DEVICE_MASTER, user))
        return MqttTarget("127.0.0.1", self.port, username=user, password=mqtt_password(TEST_DEVICE_MASTER, user))


def register(engine, operator: str, device_terminals: list[tuple[str, str]]) -> None:
    """The operator and its devices (device id, PSAM terminal number hex), with broker credentials."""
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name=operator)
        for device_id, terminal in device_terminals:
            devices.register_device(conn, device_id=device_id, operator=operator, terminal_id=terminal,
                                    master=TEST_DEVICE_MASTER)


def own_riders(bus: Bus, n: int, count: int = 20, balance: int = START_BALANCE) -> list[SimCard]:
    """Cards of this bus only: simbus gives every Bus the same ASNs, and one ASN with one counter on two buses is
    what the fraud check flags."""
    bus.riders = [SimCard(bytes.fromhex(f"96{n:04d}{k:014d}"), CardType.ADULT, balance, start=date(2025, 1, 1),
                          end=date(2028, 12, 31)) for k in range(1, count + 1)]
    return bus.riders


def tap(bus: Bus, card, seconds: float = 40) -> Outcome:
    bus.clock_now += timedelta(seconds=seconds)
    bus.reader.present(card)
    try:
        return bus.terminal.tap(bus.reader.poll()).outcome
    finally:
        bus.reader.remove()
        bus.uplink.notify(bus.clock_now)


def test_broker_killed_and_restarted_under_50_validators(tmp_path, pg_schema_url, uid):
    operator = f"op_{uid}"
    ids = [f"k{n:02d}_{uid}" for n in range(BUSES)]
    engine = make_engine(pg_schema_url)
    register(engine, operator, [(d, TERMINAL.hex()) for d in ids])
    broker = PrivateBroker(tmp_path, [(d, operator) for d in ids]).start()
    work = fast_dir(tmp_path)
    buses = []
    for n, d in enumerate(ids):
        bus = Bus(work, broker.target(d), operator, d)
        bus.clock_now = datetime(2026, 5, 1, 0, 0, tzinfo=UTC) + timedelta(seconds=n)
        own_riders(bus, n)
        buses.append(bus)
    consumer = IngestConsumer(engine, broker.target("ingest"), keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                              client_id=f"ingest_{uid}", operator=operator)
    t0 = time.monotonic()
    try:
        consumer.start()
        assert consumer.wait_subscribed(10)
        for bus in buses:
            bus.uplink.start()
        for bus in buses:
            assert tap(bus, bus.driver) is Outcome.SHIFT_OPENED

        rides = [0]

        def ride(rounds: int) -> None:
            for _ in range(rounds):
                for bus in buses:  # 40 s apart on each bus: never inside the 30 s double-tap window
                    outcome = tap(bus, bus.riders[rides[0] % len(bus.riders)])
                    assert outcome is Outcome.PAID, outcome
                rides[0] += 1

        stored_at_kill = []
        for _ in range(KILLS):
            ride(TAPS_PER_PHASE)  # the link up: batches flowing, some in flight when the broker dies
            before = stored_at_kill[-1] if stored_at_kill else 0
            deadline = time.monotonic() + 30
            while _count(engine) <= before:  # the kill falls mid-run: records of this run are in the database
                assert time.monotonic() < deadline, "nothing stored while the broker ran"
                time.sleep(0.02)
            stored_at_kill.append(_count(engine))
            broker.kill()
            ride(TAPS_PER_PHASE)  # the broker gone: taps pile up in the journals
            broker.start()
            ride(TAPS_PER_PHASE)  # reconnecting (paho backs off 1..30 s) while taps keep coming
        for bus in buses:
            assert bus.uplink.wait_drained(120), f"{bus.uplink.device_id}: backlog {bus.journal.backlog()}"
    finally:
        for bus in buses:
            bus.uplink.stop()
        consumer.stop()
        broker.stop()
    elapsed = time.monotonic() - t0

    with engine.connect() as conn:
        rows = conn.execute(text("SELECT device_id, device_seq, amount FROM tap")).all()
        quarantined = conn.execute(text("SELECT count(*) FROM quarantine")).scalar_one()
    engine.dispose()
    keys = [(r.device_id, r.device_seq) for r in rows]
    assert len(keys) == len(set(keys))  # nothing stored twice
    by_device: dict[str, list[int]] = {}
    for device_id, seq in keys:
        by_device.setdefault(device_id, []).append(seq)
    for bus in buses:
        device = bus.uplink.device_id
        written = [r.device_seq for r in bus.journal.records_since(0)]
        assert bus.journal.backlog() == 0
        assert sorted(by_device.get(device, [])) == written == list(range(1, len(written) + 1)), device
    expected_taps = BUSES * KILLS * 3 * TAPS_PER_PHASE
    lost = sum(START_BALANCE - c.balance for bus in buses for c in bus.riders)
    assert sum(c.ttc for bus in buses for c in bus.riders) * 200 == lost == expected_taps * 200
    assert sum(r.amount for r in rows) == lost and quarantined == 0
    assert len(rows) == expected_taps + BUSES  # and one shift sign-in per bus
    assert broker.starts == KILLS + 1
    for bus in buses:
        bus.journal.close()
    if work != tmp_path:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbroker restart: {BUSES} buses, {len(rows)} records, {KILLS} kill(s) with {stored_at_kill} stored "
          f"at the kill, {sum(b.uplink.resends for b in buses)} resends, {elapsed:.1f} s")


def _count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM tap")).scalar_one()

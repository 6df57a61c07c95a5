"""A fleet's working life as one stateful property test, on PostgreSQL and the real Mosquitto.

Three validators wired as the demo wires them (terminal, PSAM in its slot, journal on disk, uplink with the
device's MAC key) carry riders with simulated cards; the real ``IngestConsumer`` runs in a process of its own so
it can be SIGKILLed; clearing runs are made by the nightly job's own entry point (``backoffice.jobs``) at random
moments while ingest commits. Hypothesis mixes the rules:

- riders tap (any card, any bus); a card is pulled away mid-purchase at any of its APDUs, its answer lost or not;
- a bus's link drops and comes back;
- ingest is SIGKILLed, and started again later;
- the day moves on; the next ended service day is cleared;
- a rider tops up at the counter (``backoffice.cards.topup.counter_topup`` on the card itself).

After every step, from outside farebox's code: the debits each simulated card made (its own log) are each exactly
once in the back office's tap table, or in a bus's journal still waiting (completed, or grey when the card was
pulled), never twice and never nowhere, and every record is such a debit; so what the cards lost = settled fares
(the stored runs' gross) + fares on their way. Every record a bus was told is stored is stored; no card holds more
than was paid onto it. After each clearing, and at the end of every example (everything sent, every day cleared),
the auditor (``backoffice.audit_runs``, plain SQL) finds no difference, and every purchase is in a run.

``make test`` runs 8 examples of 25 steps; ``FAREBOX_SOAK=1`` (``make soak``) 100 of 50 (5,000 steps). The
figures (examples, steps, faults injected, differences found) go to ``fleet-life.json`` in the test's tmp folder
and to the log.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from simbus import TERMINAL
from sqlalchemy import text

from backoffice import clearing_runs, jobs, quarantine, registry
from backoffice.audit_runs import audit, snapshot
from backoffice.cards import issuance, topup
from backoffice.cards.ota_host import OtaHost
from backoffice.db import make_engine, upgrade
from backoffice.ingest import DeviceDirectory
from backoffice.ingest import Ingest as IngestUseCase
from backoffice.ingest_consumer import end_session
from backoffice.keyservice import LocalKeyService
from epurse.apdu import ALG_3DES, ALG_SM4, TX_LOAD
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.payment import PaymentPlatform
from hardware_sim.phone import HostTimeout, LyingPhone, Phone, PhoneGone
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.readers import CardRemoved
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from validator.uplink import Uplink
from epurse import apdu
from wire import devicekeys
from wire.devicekeys import TEST_DEVICE_MASTER
from wire.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.slow
log = logging.getLogger("fleet_life")

SOAK = os.environ.get("FAREBOX_SOAK") == "1"
EXAMPLES = int(os.environ.get("FAREBOX_FLEET_EXAMPLES", "100" if SOAK else "8"))
STEPS = int(os.environ.get("FAREBOX_FLEET_STEPS", "50" if SOAK else "25"))
TZ = "Asia/Shanghai"
FIRST_DAY = date(2026, 10, 5)
FARES = {"r1": 200, "r2": 150}
ROUTES = ("r1", "r2", "r1")
OPENING = 2_000  # fen on every rider's card when issued
DESK = bytes.fromhex("0E0000000003")
OTA_TERMINAL = bytes.fromhex("0F0000000003")
KEYS = LocalKeyService(TEST_ISSUER_KEYS, source="test keys")
RIDERS = 8
# A rider purchase sends the card these APDUs, in order (tests/reliability/test_tearing.py pins them).
PURCHASE_APDUS = 6

INGEST = """
import logging, sys, time
from pathlib import Path
from backoffice.db import make_engine
from backoffice.ingest_consumer import IngestConsumer
from epurse.keys import TEST_ISSUER_KEYS
from wire.devicekeys import TEST_DEVICE_MASTER
from wire.mqtt_url import parse_mqtt_url

database_url, mqtt_url, client_id, operator, ready = sys.argv[1:6]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
consumer = IngestConsumer(make_engine(database_url), parse_mqtt_url(mqtt_url), keys=TEST_ISSUER_KEYS,
                          master=TEST_DEVICE_MASTER, client_id=client_id, operator=operator, accept_unsigned=True)
consumer.on_ready = lambda: Path(ready).touch()
consumer.start()
while True:
    time.sleep(60)
"""


class Ingest:
    """The real IngestConsumer in a child process of its own (its persistent MQTT session outlives a kill)."""

    def __init__(self, folder: Path, url: str, mqtt_url: str, client_id: str, operator: str):
        self.args = [url, mqtt_url, client_id, operator]
        self.ready = folder / f"{client_id}.ready"
        self.log = folder / f"{client_id}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", INGEST, *self.args, str(self.ready)],
                                         stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"ingest did not start: {self.log}"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no clean-up, mid-transaction or not
        self.proc.wait(10)
        self.proc = None


def psam_of(bus: int, generation: int = 0) -> bytes:
    """Each bus its own PSAM (terminal number), as on the road; a swapped-in PSAM has a new one."""
    return TERMINAL[:-2] + bytes([generation, 0x10 + bus])


class Pulled:
    """The card, pulled out of the field at its ``k``-th APDU of this presentation: the command carried out first
    (``answer_lost``) or never received; gone for every APDU after it."""

    def __init__(self, card: SimCard, k: int, answer_lost: bool):
        self.card, self.k, self.answer_lost, self.n = card, k, answer_lost, 0

    def transmit(self, apdu: bytes) -> bytes:
        self.n += 1
        if self.n == self.k and self.answer_lost:
            self.card.transmit(apdu)
        if self.n >= self.k:
            raise CardRemoved("card pulled away")
        return self.card.transmit(apdu)


class Direct:
    """A desk reader's session straight onto a card."""

    def __init__(self, card: SimCard):
        self.exchange = card.transmit


class Bus:
    def __init__(self, folder: Path, target, operator: str, device: str, route: str, vehicle: str, clock,
                 terminal_id: bytes):
        self.folder, self.target, self.clock = folder, target, clock
        self.config = TerminalConfig(device_id=device, operator=operator, route=route, vehicle=vehicle, tz=TZ)
        self.device = device
        self.paths: list[Path] = []  # every journal this bus ever had, the replaced ones too
        self.psam_terminal = terminal_id
        self.psam_session = self._slot(terminal_id)
        self.reader = SimReader()
        self.online = True
        self._wire(folder / f"{device}.journal")

    @staticmethod
    def _slot(terminal_id: bytes):
        slot = SimReader()
        slot.present(SimPsam(terminal_id, keys=TEST_ISSUER_KEYS))
        return slot.poll()

    def _wire(self, path: Path) -> None:
        self.paths.append(path)
        self.journal_path = path
        self.journal = Journal(path)
        self.terminal = Terminal(self.config, journal=self.journal, psam=self.psam_session, fares=FareTable(1, FARES),
                                 clock=self.clock)
        self.uplink = Uplink(self.journal, self.target, device_id=self.device, operator=self.config.operator,
                             mac_key=devicekeys.mac_key(TEST_DEVICE_MASTER, self.device), terminal=self.terminal,
                             heartbeat_seconds=3600, ack_timeout=1.0, max_backoff=1.0)

    def replace_journal(self) -> None:
        """The bus's storage is replaced: a new journal file (a new epoch, its sequence from 1 again)."""
        self.uplink.stop()
        self.journal.close()
        self._wire(self.folder / f"{self.device}.{len(self.paths)}.journal")
        self.uplink.start()
        if not self.online:
            self.uplink.go_offline()

    def swap_psam(self, terminal_id: bytes) -> None:
        self.psam_terminal = terminal_id
        self.psam_session = self._slot(terminal_id)
        self.terminal.psam = self.psam_session

    def tap(self, card):
        self.reader.present(card)
        try:
            return self.terminal.tap(self.reader.poll())
        finally:
            self.reader.remove()
            self.uplink.notify()

    def records(self, every_journal: bool = False) -> list[tuple[int, str, int, dict]]:
        """(device_seq, state, acked, body) of every record of the journal (or of every journal it ever had), read
        from the files with plain sqlite3."""
        out = []
        for path in self.paths if every_journal else [self.journal_path]:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT device_seq, state, acked, body FROM record ORDER BY device_seq").fetchall()
            finally:
                db.close()
            out += [(seq, state, acked, json.loads(body)) for seq, state, acked, body in rows]
        return out


FIGURES: Counter = Counter()


class FleetLife(RuleBasedStateMachine):
    url: str = ""
    mqtt_url: str = ""
    folder: Path = Path()

    def __init__(self):
        super().__init__()
        FIGURES["examples"] += 1
        tag = secrets.token_hex(4)
        self.op = f"fl{tag}"
        self.folder = FleetLife.folder / tag
        self.folder.mkdir(parents=True)
        self.engine = make_engine(FleetLife.url)
        self.target = parse_mqtt_url(FleetLife.mqtt_url)
        self.zone = ZoneInfo(TZ)
        self.day = FIRST_DAY
        self.now = datetime(2026, 10, 5, 6, 0, tzinfo=self.zone).astimezone(UTC)
        self.cleared: list[date] = []
        self.paid_at_counter: dict[bytes, int] = {}  # and over the air: every fen a rider paid for a card
        self.psam_generation = [0] * len(ROUTES)
        self.told_late: set[tuple[int, int]] = set()  # (bus, PSAM generation) the registry learnt of late
        self.registry_behind: dict[int, list[tuple[bytes, datetime]]] = {}  # bus -> [(PSAM, since)] not told yet
        self.platform = PaymentPlatform(clock=lambda: self.now)
        self.phones: dict[int, tuple[Phone, LyingPhone]] = {}
        self.riders = [SimCard(bytes.fromhex(f"77{tag}{n:010d}"), CardType.ADULT, OPENING, start=date(2026, 1, 1),
                               end=date(2030, 12, 31), algorithm=ALG_SM4 if n % 3 == 0 else ALG_3DES)
                       for n in range(RIDERS)]
        drivers = [SimCard(bytes.fromhex(f"78{tag}{n:010d}"), CardType.DRIVER, 0, staff_no=f"D{n}",
                           start=date(2026, 1, 1), end=date(2030, 12, 31)) for n in range(len(ROUTES))]
        with self.engine.begin() as conn:
            registry.add_operator(conn, code=self.op, name="Fleet Life Bus", timezone=TZ,
                                  at=self.now - timedelta(days=30))
            for n, route in enumerate(ROUTES):
                registry.add_vehicle(conn, code=f"{self.op}_v{n}", operator=self.op, plate=f"L-{n}",
                                     at=self.now - timedelta(days=30))
                registry.add_device(conn, device_id=f"{self.op}_b{n}", operator=self.op, vehicle=f"{self.op}_v{n}",
                                    terminal_id=psam_of(n).hex(), at=self.now - timedelta(days=30))
            clearing_runs.set_commission_rate(conn, operator=self.op, rate_bp=60, valid_from=date(2026, 1, 1))
            for card in self.riders:
                issuance.issue_card(conn, card=issuance.read_card(Direct(card)), deposit=0, who="staff:fl",
                                    now=self.now)
        self.ingest = Ingest(self.folder, FleetLife.url, FleetLife.mqtt_url, f"ingest_{self.op}", self.op)
        self.ingest.start()
        self.buses = [Bus(self.folder, self.target, self.op, f"{self.op}_b{n}", route, f"{self.op}_v{n}",
                          lambda: self.now, psam_of(n)) for n, route in enumerate(ROUTES)]
        self.drivers = drivers
        self.host = OtaHost(self.engine, KEYS, webhook_key=self.platform.public_key, clock=lambda: self.now)
        for bus, driver in zip(self.buses, drivers, strict=True):
            bus.uplink.start()
            assert bus.tap(driver).outcome.value == "shift_opened"

    # ------------------------------------------------------------------------------------------- rules
    def _step(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)
        self.day = self._service_day(self.now)

    @rule(taps=st.lists(st.tuples(st.integers(0, len(ROUTES) - 1), st.integers(0, RIDERS - 1),
                                  st.integers(1, 150)), min_size=1, max_size=6))
    def riders_tap(self, taps):
        """A few riders board (bus, rider, minutes since the last tap)."""
        for bus, rider, minutes in taps:
            self._step(minutes)
            outcome = self.buses[bus].tap(self.riders[rider]).outcome.value
            FIGURES[f"tap {outcome}"] += 1

    @rule(bus=st.integers(0, len(ROUTES) - 1), rider=st.integers(0, RIDERS - 1),
          k=st.integers(1, PURCHASE_APDUS), answer_lost=st.booleans(), back_after=st.sampled_from([5, 300]))
    def card_pulled_mid_purchase(self, bus, rider, k, answer_lost, back_after):
        """Pulled at its k-th APDU; the rider taps again on the same bus, 5 s later (same ride) or 5 minutes."""
        self._step(2)
        card = self.riders[rider]
        self.buses[bus].tap(Pulled(card, k, answer_lost))
        FIGURES["faults: card pulled mid-purchase"] += 1
        self.now += timedelta(seconds=back_after)
        self.buses[bus].tap(card)

    @rule(bus=st.integers(0, len(ROUTES) - 1), rider=st.integers(0, RIDERS - 1), k=st.integers(1, PURCHASE_APDUS))
    def card_pulled_and_gone(self, bus, rider, k):
        """The answer of the k-th APDU lost, and the rider walks off: a grey record waits on the bus."""
        self._step(2)
        self.buses[bus].tap(Pulled(self.riders[rider], k, True))
        FIGURES["faults: card pulled, rider gone"] += 1

    @precondition(lambda self: any(b.online for b in self.buses))
    @rule(bus=st.integers(0, len(ROUTES) - 1))
    def link_drops(self, bus):
        if self.buses[bus].online:
            self.buses[bus].uplink.go_offline()
            self.buses[bus].online = False
            FIGURES["faults: link dropped"] += 1

    @precondition(lambda self: not all(b.online for b in self.buses))
    @rule(bus=st.integers(0, len(ROUTES) - 1))
    def link_back(self, bus):
        if not self.buses[bus].online:
            self.buses[bus].uplink.go_online()
            self.buses[bus].online = True

    @precondition(lambda self: self.ingest.alive)
    @rule()
    def ingest_killed(self):
        self.ingest.kill()
        FIGURES["faults: ingest SIGKILLed"] += 1

    @precondition(lambda self: not self.ingest.alive)
    @rule()
    def ingest_restarted(self):
        self.ingest.start()

    @rule(hours=st.integers(6, 30))
    def time_passes(self, hours):
        self._step(60 * hours)

    @precondition(lambda self: self._next_to_clear() is not None)
    @rule()
    def clearing_runs_now(self):
        """The next day that has ended (in the fleet's time) is cleared, while ingest may be committing."""
        day = self._next_to_clear()
        done = jobs.clear_operator(self.engine, operator=self.op, day=day)
        assert [d.day for d in done] == [day]
        self.cleared.append(day)
        FIGURES["clearing runs"] += 1
        self._audit(day)

    @rule(rider=st.integers(0, RIDERS - 1), amount=st.sampled_from([100, 500, 2000]))
    def counter_topup(self, rider, amount):
        card = self.riders[rider]
        self.paid_at_counter[card.asn] = self.paid_at_counter.get(card.asn, 0) + amount  # cash taken first
        self._step(1)
        try:
            topup.counter_topup(self.engine, Direct(card), keys=KEYS, amount=amount, terminal_id=DESK,
                                staff="staff:fl", now=self.now)
            FIGURES["counter top-ups"] += 1
        except topup.TopupRefused as e:  # e.g. the card would go over its limit: no money moved
            self.paid_at_counter[card.asn] -= amount
            FIGURES[f"counter top-up refused: {e.reason}"] += 1


    # -- rules of the features landed for issue 9 (PSAM swap, quarantine review, journal epoch, OTA host)
    @rule(bus=st.integers(0, len(ROUTES) - 1), registry_late=st.booleans())
    def psam_swapped(self, bus, registry_late):
        """A technician puts a new PSAM in the validator; the clerk edits the registry at once, or later (the
        records of the new PSAM are quarantined meanwhile, and released once the registry knows it)."""
        self._step(3)
        self.psam_generation[bus] += 1
        new = psam_of(bus, self.psam_generation[bus])
        self.buses[bus].swap_psam(new)
        FIGURES["faults: PSAM swapped"] += 1
        self.registry_behind.setdefault(bus, []).append((new, self.now))
        if registry_late:
            self.told_late.add((bus, self.psam_generation[bus]))
            FIGURES["faults: registry told late"] += 1
        else:
            self._tell_registry(bus)

    def _tell_registry(self, bus: int) -> None:
        """The clerk enters every PSAM the bus had since the registry last heard, each from when it went in."""
        for terminal_id, since in self.registry_behind.pop(bus, []):
            with self.engine.begin() as conn:
                registry.edit_device(conn, device_id=self.buses[bus].device, by="clerk:fl",
                                     terminal_id=terminal_id.hex(), at=since)

    @precondition(lambda self: self.registry_behind)
    @rule()
    def registry_catches_up(self):
        for bus in list(self.registry_behind):
            self._tell_registry(bus)

    @rule()
    def quarantine_released(self):
        """Operations release every open quarantined record of the fleet through every ingest check again."""
        with self.engine.begin() as conn:
            open_ids = [i.id for i in quarantine.items(conn, status="open", operator=self.op, limit=10_000)[0]]
        checker = IngestUseCase(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER, devices=DeviceDirectory(),
                                accept_unsigned=True)
        for qid in open_ids:
            with self.engine.begin() as conn:
                done = quarantine.release(conn, qid, by="ops:fl", why="registry updated", ingest=checker,
                                          operator=self.op)
            FIGURES["quarantine released" if done.still_failing is None else "quarantine still failing"] += 1

    @precondition(lambda self: self.ingest.alive)
    @rule(bus=st.integers(0, len(ROUTES) - 1))
    def journal_replaced(self, bus):
        """The bus's storage is swapped at the depot, its backlog sent first: the new journal's sequence starts at 1
        again, under a new epoch; the driver signs in again."""
        b = self.buses[bus]
        if any(state == "pending" for _q, state, _a, _b in b.records()):
            return  # a purchase in doubt waits for its card; no technician takes that journal away
        if not b.online:
            b.uplink.go_online()
            b.online = True
        assert b.uplink.wait_drained(30), f"{b.device}: backlog {b.journal.backlog()} before the swap"
        b.replace_journal()
        self._step(5)
        assert b.tap(self.drivers[bus]).outcome.value == "shift_opened"
        FIGURES["faults: journal replaced"] += 1

    @rule(rider=st.integers(0, RIDERS - 1), amount=st.sampled_from([100, 700]), lying=st.booleans(),
          fault=st.sampled_from(["none", "lose", "vanish"]))
    def ota_topup(self, rider, amount, lying, fault):
        """A rider pays for a top-up in the phone menu; the phone is honest (its answer maybe lost, or it dies after
        the CREDIT), or lies: never reports the TAC, then shows the host the SIM as it was before, asks again and
        replays an old INITIALIZE answer."""
        self._step(1)
        card = self.riders[rider]
        honest, liar = self.phones.setdefault(rider, (Phone(card, self.host, OTA_TERMINAL),
                                                      LyingPhone(card, self.host, OTA_TERMINAL)))
        with self.engine.begin() as conn:
            order = topup.create_order(conn, asn=card.asn.hex(), rider=f"rider:{rider}", amount=amount,
                                       now=self.now).order_id
        hook = self.platform.pay(order, amount)
        self.host.payment_webhook(hook.body, hook.signature)
        self.paid_at_counter[card.asn] = self.paid_at_counter.get(card.asn, 0) + amount
        FIGURES["OTA top-ups paid"] += 1
        refused = (topup.TopupRefused, HostTimeout, PhoneGone, apdu.StatusError)
        if not lying:
            honest.lose_answer, honest.vanish_after_credit = fault == "lose", fault == "vanish"
            try:
                honest.topup(order, amount)
            except refused:
                FIGURES[f"OTA honest phone: {fault}"] += 1
            honest.lose_answer = honest.vanish_after_credit = False
            return
        FIGURES["faults: OTA lying phone"] += 1
        for attempt in (lambda: liar.topup(order, amount), liar.show_card, lambda: liar.topup(order, amount)):
            try:
                attempt()
            except refused:
                pass
        if liar.captured:
            try:
                grant = liar.replay(order, 0)
                card.transmit(grant.credit_apdu())
            except refused:
                pass

    # ------------------------------------------------------------------------------------------- helpers
    def _service_day(self, at: datetime) -> date:
        return (at.astimezone(self.zone) - timedelta(hours=3)).date()

    def _next_to_clear(self) -> date | None:
        nxt = self.cleared[-1] + timedelta(days=1) if self.cleared else FIRST_DAY
        return nxt if nxt < self.day else None

    def _audit(self, day: date | None = None) -> None:
        with snapshot(self.engine) as conn:
            found = audit(conn, operator=self.op, day=day)
        FIGURES["audits"] += 1
        FIGURES["audit differences"] += len(found.differences)
        assert found.clean, [d.line() for d in found.differences]

    def _books(self):
        """Journals first, then one database snapshot: a record acknowledged after the journals were read was
        committed before the snapshot, so the two views agree on every record."""
        waiting, acked = {}, set()
        for bus in self.buses:
            for seq, state, was_acked, body in bus.records(every_journal=True):
                if body["kind"] != "purchase":
                    continue
                key = (bus.device, body.get("epoch", 0), seq)
                if was_acked:
                    acked.add(key)
                if state in ("pending", "done"):
                    waiting[key] = (state, body["card_asn"], body["card_ttc"], body["amount"], body["terminal_id"],
                                    body["terminal_seq"])
        with snapshot(self.engine) as conn:
            epoch = "epoch" if "epoch" in _tap_columns(conn) else "0"
            stored = {(r.device_id, int(r.epoch), int(r.device_seq)): r for r in conn.execute(text(
                f"SELECT device_id, {epoch} AS epoch, device_seq, card_asn, card_ttc, amount, clearing_run_id "
                f"FROM {_claimed(conn)} WHERE operator = :op AND kind = 'purchase'"), {"op": self.op})}
            settled = conn.execute(text("SELECT COALESCE(SUM(day_gross + late_gross), 0) FROM clearing_run "
                                        "WHERE operator = :op"), {"op": self.op}).scalar_one()
            quarantined = {(r.device_id, int(r.device_seq)): r.reason for r in conn.execute(text(
                "SELECT device_id, device_seq, reason FROM quarantine WHERE device_id LIKE :d AND status = 'open'"),
                {"d": f"{self.op}_%"})}
        return waiting, acked, stored, int(settled), quarantined

    # ------------------------------------------------------------------------------------------- invariants
    @invariant()
    def every_debit_once_and_money_conserved(self):
        FIGURES["invariant checks"] += 1
        waiting, acked, stored, settled, quarantined = self._books()
        # Only records of a PSAM the registry was told of late may be quarantined (kept, not lost) until released.
        late = {psam_of(b, g).hex() for b, g in self.told_late}
        assert all(any(t in reason for t in late) for reason in quarantined.values()), f"quarantined: {quarantined}"
        # What each card did, from the card itself: debits (card counter -> fen) and loads.
        debits, debited_by = {}, {}
        lost = 0
        for card in self.riders:
            asn = card.asn.hex()
            for t in card.log:
                if t.tx_type != TX_LOAD:
                    debits[(asn, t.ttc)] = t.amount
                    debited_by[(asn, t.ttc)] = (t.terminal_id.hex(), t.terminal_seq)
            loads = sum(t.amount for t in card.log if t.tx_type == TX_LOAD)
            lost += OPENING + loads - card.balance
            assert loads <= self.paid_at_counter.get(card.asn, 0), f"card {asn} gained more than was paid"
        assert lost == sum(debits.values())
        # Where each debit is: stored, or waiting on a bus (completed, or grey if the card was pulled).
        where: dict[tuple[str, int], list[str]] = {}
        for key, r in stored.items():
            where.setdefault((r.card_asn, int(r.card_ttc)), []).append(f"stored {key}")
        for key, (state, asn, ttc, _amount, terminal, terminal_seq) in waiting.items():
            if key in stored:
                continue  # committed, its acknowledgement not yet back on the bus
            if state == "pending" and debited_by.get((asn, ttc)) != (terminal, terminal_seq):
                continue  # a grey record whose DEBIT never reached the card (the counter may be another's): no money
            where.setdefault((asn, ttc), []).append(f"{state} in journal {key}")
        assert {k: v for k, v in where.items() if len(v) != 1} == {}, "a debit recorded twice"
        assert set(where) == set(debits), (f"debits nowhere: {sorted(set(debits) - set(where))}; "
                                           f"records with no debit: {sorted(set(where) - set(debits))}; "
                                           f"{self._trail(set(debits) ^ set(where), stored)}")
        for key, r in stored.items():
            assert int(r.amount) == debits[(r.card_asn, int(r.card_ttc))], f"{key}: amount is not the card's debit"
        lost_acks = {k for k in acked - set(stored) if (k[0], k[2]) not in quarantined}
        assert not lost_acks, f"acknowledged, neither stored nor quarantined: {sorted(lost_acks)}"
        # So: what the cards lost = settled + stored, not yet cleared + waiting on the buses.
        on_the_way = (sum(int(r.amount) for r in stored.values() if r.clearing_run_id is None)
                      + sum(debits[(a, t)] for k, (s, a, t, _m, term, tseq) in waiting.items()
                            if k not in stored and (s == "done" or debited_by.get((a, t)) == (term, tseq))))
        assert lost == settled + on_the_way, (lost, settled, on_the_way)

    def _debited_by(self, asn: str, ttc: int) -> tuple[str, int] | None:
        """(terminal, terminal sequence) of the card's debit at counter ``ttc``, from the card's own log."""
        card = next(c for c in self.riders if c.asn.hex() == asn)
        return next(((t.terminal_id.hex(), t.terminal_seq) for t in card.log if t.ttc == ttc and t.tx_type != TX_LOAD),
                    None)

    def _trail(self, missing, stored) -> str:
        """Every journal record and stored tap of the cards concerned, for the failure message."""
        asns = {a for a, _t in missing}
        out = [f"{b.device} seq {q} {state} acked={k} ttc {r['card_ttc']} terminal {r['terminal_id']}/"
               f"{r['terminal_seq']} epoch {r.get('epoch')}"
               for b in self.buses for q, state, k, r in b.records(every_journal=True) if r.get("card_asn") in asns]
        out += [f"stored {key} ttc {r.card_ttc}" for key, r in stored.items() if r.card_asn in asns]
        out += [f"card {c.asn.hex()} log {[(t.ttc, t.tx_type, t.terminal_id.hex(), t.terminal_seq) for t in c.log]}"
                for c in self.riders if c.asn.hex() in asns]
        return "; ".join(out)

    # ------------------------------------------------------------------------------------------- the end
    def teardown(self):
        try:
            self._settle_everything()
        finally:
            for bus in self.buses:
                bus.uplink.stop()
                bus.journal.close()
            if self.ingest.alive:
                self.ingest.kill()
            end_session(self.target, f"ingest_{self.op}")
            self.engine.dispose()

    def _settle_everything(self):
        """Links back, ingest up, every grey purchase settled by its card, every backlog sent, every day cleared:
        then every purchase is in a run, the cards' loss is all settled, and the auditor finds nothing."""
        for bus in self.buses:
            if not bus.online:
                bus.uplink.go_online()
                bus.online = True
        if not self.ingest.alive:
            self.ingest.start()
        self.registry_catches_up()
        for bus in self.buses:
            grey = {(b["card_asn"]) for _s, state, _a, b in bus.records() if state == "pending"}
            for card in self.riders:
                if card.asn.hex() in grey:
                    self.now += timedelta(seconds=10)  # back within the ride: settled, not charged again
                    bus.tap(card)
        for bus in self.buses:
            assert bus.uplink.wait_drained(60), f"{bus.device}: {bus.journal.backlog()} records not acknowledged"
        self.quarantine_released()
        self.day = self._service_day(self.now) + timedelta(days=1)
        while (day := self._next_to_clear()) is not None:
            jobs.clear_operator(self.engine, operator=self.op, day=day)
            self.cleared.append(day)
        self.every_debit_once_and_money_conserved()
        waiting, _acked, stored, settled, quarantined = self._books()
        assert quarantined == {}, f"left in quarantine after the release: {quarantined}"
        # A grey record left now is a debit its card can no longer prove (it paid elsewhere since): kept on the bus
        # for operations, its money on its way (the invariant above counts it). Anything else is a failure.
        kept = [k for k, (state, asn, ttc, _amount, terminal, terminal_seq) in waiting.items()
                if state == "pending" and self._debited_by(asn, ttc) == (terminal, terminal_seq)]
        assert [k for k, (state, *_r) in waiting.items() if state == "pending" and k not in kept] == []
        FIGURES["greys kept for operations (debit no longer provable)"] += len(kept)
        assert all(r.clearing_run_id is not None for r in stored.values()), "a purchase in no run"
        assert settled == sum(int(r.amount) for r in stored.values())
        self._audit()


def _tap_columns(conn) -> set[str]:
    from sqlalchemy import inspect

    return {c["name"] for c in inspect(conn).get_columns("tap")}


def test_a_fleets_working_life(tmp_path, pg_schema_url, mosquitto_url):
    engine = make_engine(pg_schema_url)
    upgrade(engine)
    engine.dispose()
    FleetLife.url, FleetLife.mqtt_url, FleetLife.folder = pg_schema_url, mosquitto_url, tmp_path
    FIGURES.clear()
    started = time.monotonic()
    try:
        run_state_machine_as_test(FleetLife, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not SOAK,
            suppress_health_check=list(HealthCheck)))
    finally:
        figures = {**dict(sorted(FIGURES.items())), "seconds": round(time.monotonic() - started, 1)}
        (tmp_path / "fleet-life.json").write_text(json.dumps(figures, indent=1))
        log.warning("fleet life: %s", figures)
        print(f"\nfleet life: {figures}")


def test_a_grey_purchase_is_not_completed_with_another_buss_debit(tmp_path):
    """Found by the state machine above: a card pulled at bus A before its DEBIT leaves a grey record at card counter
    t; the rider pays on bus B, which uses counter t; back on bus A, GET TRANSACTION PROVE for t answers with bus B's
    transaction. Bus A must not complete its grey record with it (one debit, two records: the back office would
    flag the rider's genuine card as fraud); the card's own log names the terminal that used the counter."""
    now = [datetime(2026, 10, 5, 0, 0, tzinfo=UTC)]
    a, b = (Bus(tmp_path, parse_mqtt_url("mqtt://127.0.0.1:1"), "op", f"bus{n}", "r1", f"v{n}", lambda: now[0],
                psam_of(n)) for n in (0, 1))
    driver = SimCard(bytes.fromhex("78000000000000000001"), CardType.DRIVER, 0, staff_no="D1", start=date(2026, 1, 1),
                     end=date(2030, 12, 31))
    card = SimCard(bytes.fromhex("77000000000000000001"), CardType.ADULT, OPENING, start=date(2026, 1, 1),
                   end=date(2030, 12, 31))
    for bus in (a, b):
        bus.tap(driver)
    now[0] += timedelta(minutes=1)
    assert a.tap(Pulled(card, PURCHASE_APDUS - 1, True)).outcome.value == "tap_again"  # cache written, no DEBIT
    assert card.ttc == 0 and [s for _q, s, _k, r in a.records() if r["kind"] == "purchase"] == ["pending"]
    now[0] += timedelta(minutes=10)
    assert b.tap(card).outcome.value == "paid" and card.ttc == 1  # bus B's debit used counter 0
    now[0] += timedelta(minutes=30)
    assert a.tap(card).outcome.value == "paid" and card.ttc == 2  # a new ride on bus A: counter 1
    debits = {t.ttc: t.terminal_id for t in card.log}
    done = {(r["card_ttc"], r["terminal_id"]) for bus in (a, b) for _q, s, _k, r in bus.records()
            if r["kind"] == "purchase" and s == "done"}
    assert done == {(ttc, terminal.hex()) for ttc, terminal in debits.items()}, "a record with no debit of its own"
    assert OPENING - card.balance == 2 * FARES["r1"]
    for bus in (a, b):
        bus.journal.close()


def test_a_debit_is_not_cancelled_when_the_card_has_paid_elsewhere_since(tmp_path):
    """Found by the state machine: the card's DEBIT went through on bus A but its answer was lost; the rider paid on
    bus B next; back on bus A, GET TRANSACTION PROVE no longer answers (a card proves only its last transaction).
    Bus A used to take that for "never debited" and cancel its grey record: a fare the card paid, lost from the
    books. The card's log shows bus A's debit: the grey record must stay."""
    now = [datetime(2026, 10, 5, 0, 0, tzinfo=UTC)]
    a, b = (Bus(tmp_path, parse_mqtt_url("mqtt://127.0.0.1:1"), "op", f"bus{n}", "r1", f"v{n}", lambda: now[0],
                psam_of(n)) for n in (0, 1))
    driver = SimCard(bytes.fromhex("78000000000000000001"), CardType.DRIVER, 0, staff_no="D1", start=date(2026, 1, 1),
                     end=date(2030, 12, 31))
    card = SimCard(bytes.fromhex("77000000000000000002"), CardType.ADULT, OPENING, start=date(2026, 1, 1),
                   end=date(2030, 12, 31))
    for bus in (a, b):
        bus.tap(driver)
    now[0] += timedelta(minutes=1)
    assert a.tap(Pulled(card, PURCHASE_APDUS, True)).outcome.value == "tap_again" and card.ttc == 1  # debited
    now[0] += timedelta(minutes=10)
    assert b.tap(card).outcome.value == "paid" and card.ttc == 2
    now[0] += timedelta(minutes=30)
    assert a.tap(card).outcome.value == "paid" and card.ttc == 3
    kept = [(r["card_ttc"], state) for bus in (a, b) for _q, state, _k, r in bus.records()
            if r["kind"] == "purchase" and state != "cancelled"]
    assert sorted(kept) == [(0, "pending"), (1, "done"), (2, "done")], kept  # every debit on the books
    assert OPENING - card.balance == 3 * FARES["r1"]
    for bus in (a, b):
        bus.journal.close()


def _claimed(conn) -> str:
    """``tap_claimed`` (each tap with the run that took it, revision 0027) when the schema has it, else ``tap``."""
    from sqlalchemy import inspect

    return "tap_claimed" if "tap_claimed" in inspect(conn).get_view_names() else "tap"

"""The buses of ``farebox demo --buses N``: one child process per district of buses, each bus the real validator code.

A validator is a :class:`validator.terminal.Terminal` on a :class:`validator.journal.Journal` (SQLite on disk) with
a PSAM in its SAM slot, and a :class:`validator.uplink.Uplink` (paho, QoS 1, persistent session): two threads and
about six file descriptors a bus. paho's ``loop_start`` select()s, which cannot watch a descriptor numbered 1024 or
above, so one process holds a district of at most ~100 buses (bench.cluster found ~150 the most); a city of 1,000
buses is ten processes. A district's riders ride only its buses (hardware_sim.city.plan_large_city), so each card's
chip lives in one process and its balance at the end is read there.

The parent speaks to a district over a multiprocessing pipe: it sends the district's share of the plan, the district
connects its buses and says ``ready``; on ``go`` it rides its taps in the day's order on its own simulated clock
(as fast as the code goes: the day is accelerated), reports progress, waits until the back office has acknowledged
every record of its journals and says ``ridden``; on ``stop`` the buses sign off (goodbye, DISCONNECT) and it
reports the cards' final balances and what the journals hold.

This module imports only the validator side (no back office, no pandas): each district is a fresh interpreter.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from datetime import date, datetime, timedelta
from pathlib import Path

from epurse.apdu import ALG_3DES, ALG_SM4
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.city import BusPlan, CardPlan, DriverPlan, Outage, Tap
from hardware_sim.psam import SimPsam
from validator.fares import FareTable, Transfer
from validator.journal import Journal
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from validator.uplink import Uplink
from wire import devicekeys
from wire.mqtt_url import parse_mqtt_url

log = logging.getLogger(__name__)

PROGRESS_EVERY = 500  # taps between two progress reports to the parent
HEARTBEAT_SECONDS = 3600  # of the simulated day: a heartbeat an hour (the small demo's every 5 min would be
# 190,000 status messages for 1,000 buses)


def rider_card(card: CardPlan, index: int, day: date) -> SimCard:
    """A rider's card as the demo makes it (``index``: its place in the plan; every third an SM4 phone SIM). The
    card desk issues the same chip the district rides with."""
    return SimCard(card.asn, int(card.card_type), card.balance, start=day - timedelta(days=365),
                   end=day + timedelta(days=365 * 5), holder_name=card.holder,
                   algorithm=ALG_SM4 if index % 3 == 0 else ALG_3DES)


def driver_card(driver: DriverPlan, day: date) -> SimCard:
    return SimCard(driver.asn, CardType.DRIVER, 0, staff_no=driver.staff_no, holder_name=driver.name,
                   start=day - timedelta(days=365), end=day + timedelta(days=365 * 5))


def fare_table(flat: dict[str, int]) -> FareTable:
    """The small demo's fares: students pay half, the elderly ride free, a change within an hour is 1 yuan off."""
    return FareTable(version=1, flat=flat, discounts={CardType.STUDENT: 50, CardType.ELDERLY: 0},
                     transfer=Transfer(60, 100))


@dataclasses.dataclass
class District:
    """One district's share of the plan (picklable: it crosses to the child process)."""

    number: int
    operator: str
    tz: str
    day: date
    journal_dir: Path
    mqtt_url: str
    master: bytes  # the device master every bus's MAC key derives from
    fares: dict[str, int]  # route code -> flat fare
    buses: list[tuple[int, BusPlan]]  # (index in the city's plan, bus)
    drivers: dict[str, DriverPlan]  # staff number -> driver
    cards: list[tuple[int, CardPlan]]  # (index in the city's plan, card)
    taps: list[Tap]  # this district's taps, in the day's order
    outages: list[Outage]


@dataclasses.dataclass
class Ridden:
    """What a district reports once its day is ridden and its journals are drained (times: time.time())."""

    taps: int
    outcomes: dict[str, int]
    ride_started: float
    ride_ended: float
    drained_at: float | None  # when the back office had acknowledged the last record; None: not within the wait
    backlog: int  # records still unacknowledged at the end of the wait
    tap_seconds: float = 0.0  # wall time inside Terminal.tap (the card, the PSAM, the journal's commits)
    cpu_seconds: float = 0.0  # the process's CPU time while riding (every thread: terminals, uplinks, paho)


@dataclasses.dataclass
class Final:
    """What a district reports after its buses signed off."""

    balances: dict[str, int]  # card ASN (hex) -> fen on the chip now
    journal_records: int  # completed records the validators wrote
    by_kind: dict[str, int]  # of those, by record kind
    backlog: dict[str, int]  # device id -> records its journal still holds unacknowledged
    batches_sent: int
    resends: int
    goodbyes: int  # buses whose goodbye the broker took


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Bus:
    def __init__(self, d: District, index: int, plan: BusPlan, clock):
        self.index = index
        self.plan = plan
        self.journal = Journal(d.journal_dir / f"{plan.device_id}.journal")
        slot = SimReader()
        slot.present(SimPsam(plan.terminal_id, keys=TEST_ISSUER_KEYS))
        self.terminal = Terminal(TerminalConfig(device_id=plan.device_id, operator=d.operator, route=plan.route,
                                                vehicle=plan.vehicle, tz=d.tz),
                                 journal=self.journal, psam=slot.poll(), fares=fare_table(d.fares), clock=clock)
        self.uplink = Uplink(self.journal, parse_mqtt_url(d.mqtt_url), device_id=plan.device_id, operator=d.operator,
                             mac_key=devicekeys.mac_key(d.master, plan.device_id), terminal=self.terminal,
                             heartbeat_seconds=HEARTBEAT_SECONDS, ack_timeout=3.0, clock=clock)
        self.reader = SimReader()


def run_district(d: District, conn, connect_timeout: float = 60.0, drain_timeout: float = 180.0) -> None:
    """The child process: build, connect, ride on ``go``, drain, sign off on ``stop`` (see the module doc)."""
    logging.basicConfig(level=logging.WARNING, filename=str(d.journal_dir / f"district-{d.number:03d}.log"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _raise_nofile()
    now = [d.taps[0].at - timedelta(minutes=15) if d.taps else datetime.combine(d.day, datetime.min.time())]
    clock = lambda: now[0]  # noqa: E731 - the district's simulated clock, read by its terminals and uplinks
    riders = {c.asn: rider_card(c, i, d.day) for i, c in d.cards}
    drivers = {staff: driver_card(p, d.day) for staff, p in d.drivers.items()}
    buses = {i: _Bus(d, i, p, clock) for i, p in d.buses}
    try:
        for bus in buses.values():
            bus.uplink.start()
        deadline = time.monotonic() + connect_timeout
        while time.monotonic() < deadline and not all(b.uplink.connected for b in buses.values()):
            time.sleep(0.05)
        conn.send(("ready", sum(b.uplink.connected for b in buses.values())))
        if conn.recv() != "go":
            return
        conn.send(("ridden", _ride(d, buses, riders, drivers, now, conn, drain_timeout)))
        if conn.recv() != "stop":
            return
        now[0] = (d.taps[-1].at if d.taps else now[0]) + timedelta(minutes=5)  # switched off at the depot
        goodbyes = sum(bus.uplink.stop(goodbye_timeout=5.0) for bus in buses.values())
        conn.send(("final", _final(buses, riders, goodbyes)))
    finally:
        for bus in buses.values():
            bus.uplink.stop(goodbye_timeout=0.5)  # does nothing after a clean stop above
            bus.journal.close()
        conn.close()


def _ride(d: District, buses: dict[int, _Bus], riders, drivers, now, conn, drain_timeout: float) -> Ridden:
    outcomes: dict[str, int] = {}
    offline: set[int] = set()
    started, cpu, in_tap = time.time(), time.process_time(), 0.0
    for n, tap in enumerate(d.taps, 1):
        now[0] = tap.at
        for o in d.outages:  # the link goes down and comes back on the simulated clock
            down = o.start <= tap.at < o.end
            if down and o.bus not in offline:
                buses[o.bus].uplink.go_offline()
                offline.add(o.bus)
            elif not down and o.bus in offline:
                buses[o.bus].uplink.go_online()
                offline.discard(o.bus)
        bus = buses[tap.bus]
        card = drivers[bus.plan.driver] if tap.card is None else riders[tap.card]
        bus.reader.present(card)
        t = time.perf_counter()
        result = bus.terminal.tap(bus.reader.poll())
        in_tap += time.perf_counter() - t
        bus.reader.remove()
        outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1
        if result.record is not None:
            bus.uplink.notify()
        if n % PROGRESS_EVERY == 0:
            conn.send(("progress", PROGRESS_EVERY))
    conn.send(("progress", len(d.taps) % PROGRESS_EVERY))
    ended, cpu = time.time(), time.process_time() - cpu
    for b in offline:
        buses[b].uplink.go_online()
    deadline = time.monotonic() + drain_timeout
    for b in buses.values():  # they drain together: each wait ends when that bus's journal is empty
        b.uplink.wait_drained(timeout=max(0.0, deadline - time.monotonic()))
    backlog = sum(b.journal.backlog() for b in buses.values())
    drained_at = time.time() if backlog == 0 else None
    return Ridden(taps=len(d.taps), outcomes=outcomes, ride_started=started, ride_ended=ended,
                  drained_at=drained_at, backlog=backlog, tap_seconds=in_tap, cpu_seconds=cpu)


def _final(buses: dict[int, _Bus], riders: dict[bytes, SimCard], goodbyes: int) -> Final:
    by_kind: dict[str, int] = {}
    records = 0
    for bus in buses.values():
        for r in bus.journal.records_since(0):
            records += 1
            by_kind[r.kind.value] = by_kind.get(r.kind.value, 0) + 1
    return Final(balances={asn.hex(): card.balance for asn, card in riders.items()}, journal_records=records,
                 by_kind=by_kind, backlog={b.plan.device_id: b.journal.backlog() for b in buses.values()},
                 batches_sent=sum(b.uplink.batches_sent for b in buses.values()),
                 resends=sum(b.uplink.resends for b in buses.values()), goodbyes=goodbyes)


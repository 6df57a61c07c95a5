"""`farebox demo`: one service day of a small simulated city, on real parts, from card to settlement PDF.

The back office's database (SQLite under var/ unless FAREBOX_DATABASE_URL), an MQTT broker (started here unless
FAREBOX_MQTT_URL), the ingest consumer as a child process of its own, the status consumer and the package publisher
beside it, six real validators with simulated cards and PSAMs, and a day of taps in accelerated time. The deny list
reaches the buses over the air as signed packages: the whole list when they first connect, and a delta at noon when a
rider reports a card lost; one bus loses its link for four hours and catches up when it comes back. At the end the
day is settled, the PDF written, and the settlement checked against what the cards lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from backoffice import clearing_runs, registry
from backoffice.audit_runs import audit as audit_books
from backoffice.devices import fleet_status
from backoffice.ingest_consumer import end_session
from backoffice.models import Card, Quarantine, Tap
from backoffice.publisher import Publisher
from backoffice.settle import settle
from backoffice.status_consumer import StatusConsumer
from epurse.apdu import ALG_3DES, ALG_SM4
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from farebox import bootstrap
from farebox.broker import EmbeddedBroker
from farebox.config import Settings
from hardware_sim.card import SimCard
from hardware_sim.city import CityPlan, plan_city
from hardware_sim.psam import SimPsam
from validator.downlink import Downlink
from validator.fares import FareTable, Transfer
from validator.journal import Journal
from validator.messages import Outcome, yuan
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from validator.uplink import Uplink
from wire import devicekeys
from wire.mqtt_url import parse_mqtt_url
from wire.packages import public_key

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Bus:
    reader: SimReader
    terminal: Terminal
    uplink: Uplink
    journal: Journal
    downlink: Downlink


@dataclasses.dataclass
class DemoResult:
    run_dir: Path
    operator: str
    day: date
    pdf: Path
    taps_by_outcome: dict[str, int]
    cards_lost: int  # fen: what the riders' cards lost in balance, read off the cards
    settled_amount: int  # fen
    settled_taps: int
    stored_records: int  # rows in the back office for this run
    journal_records: int  # completed records the validators wrote
    quarantined: int
    ingest_kills: int
    seconds: float
    audit_differences: int = 0  # what `farebox audit` found re-deriving the stored run from the raw tables

    @property
    def consistent(self) -> bool:
        return (self.cards_lost == self.settled_amount and self.stored_records == self.journal_records
                and self.quarantined == 0 and self.audit_differences == 0)


class IngestProcess:
    """`farebox ingest` as a child process, so that it can be killed for real."""

    def __init__(self, run_dir: Path, database_url: str, mqtt_url: str, client_id: str, operator: str):
        self.run_dir = run_dir
        self.env = {**os.environ, "FAREBOX_DATABASE_URL": database_url, "FAREBOX_MQTT_URL": mqtt_url}
        self.client_id = client_id
        self.operator = operator
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> None:
        ready = self.run_dir / "ingest.ready"
        ready.unlink(missing_ok=True)
        self.starts += 1
        with open(self.run_dir / "ingest.log", "ab") as log_file:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "farebox.cli", "--insecure-test-keys", "ingest", "--client-id",
                 self.client_id, "--operator", self.operator, "--ready-file", str(ready)],
                env=self.env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ingest did not start; see {self.run_dir / 'ingest.log'}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _seed_registry(engine, plan: CityPlan) -> None:
    with engine.begin() as conn:
        registry.add_operator(conn, code=plan.operator, name=plan.operator_name, timezone=plan.tz)
        for r in plan.routes:
            registry.add_route(conn, code=r.code, operator=plan.operator, name=r.name, flat_fare=r.fare)
        for b in plan.buses:
            registry.add_vehicle(conn, code=b.vehicle, operator=plan.operator, plate=b.plate)
        for d in plan.drivers:
            registry.add_driver(conn, staff_no=f"{d.staff_no}", operator=plan.operator, name=d.name,
                                card_asn=d.asn.hex())
        for b in plan.buses:
            registry.add_device(conn, device_id=b.device_id, operator=plan.operator, vehicle=b.vehicle,
                                terminal_id=b.terminal_id.hex())
        registry.add_cards(conn, [{"asn": c.asn.hex(), "card_type": int(c.card_type),
                                   "status": "lost" if c.asn in plan.denied else "active"} for c in plan.cards])
        # The card issuer keeps 0.6 % of the fares; the settlement shows its commission and the operator's net.
        clearing_runs.set_commission_rate(conn, operator=plan.operator, rate_bp=60, valid_from=plan.day)


def _sam_slot(psam: SimPsam):
    """The validator's SAM slot is a reader of its own, holding the PSAM for good."""
    slot = SimReader()
    slot.present(psam)
    return slot.poll()


def _sim_clock():
    """A clock the simulation moves forward; the terminals read it as their wall clock."""
    now = [datetime.now(UTC)]
    return now, (lambda: now[0])


def run_demo(settings: Settings, *, seed: int = 7, day: date | None = None, riders: int = 200,
             kill_ingest_at: tuple[float, ...] = (), console: Console | None = None) -> DemoResult:
    """Run the day; ``kill_ingest_at`` lists fractions of the day at which ingest is SIGKILLed and restarted."""
    console = console or Console()
    # The demo is the one command made for the published test keys: its simulated cards and PSAMs carry them.
    settings = dataclasses.replace(settings, insecure_test_keys=True)
    started = time.monotonic()
    tag = secrets.token_hex(3)
    run_dir = (settings.var_dir / "demo" / tag).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # The console shows progress; the details (reconnects, quarantine reasons) go to the run's own log file.
    log_file = logging.FileHandler(run_dir / "demo.log")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(log_file)
    root.setLevel(logging.INFO)
    try:
        return _run(settings, run_dir, tag, seed, day, riders, kill_ingest_at, console, started)
    finally:
        root.removeHandler(log_file)
        log_file.close()


def _run(settings, run_dir, tag, seed, day, riders, kill_ingest_at, console, started) -> DemoResult:
    day = day or (datetime.now(ZoneInfo("Asia/Shanghai")) - timedelta(days=1)).date()
    plan = plan_city(tag=tag, day=day, seed=seed, riders=riders)
    console.print(f"[bold]farebox demo[/] run [cyan]{tag}[/]: {len(plan.routes)} routes, {len(plan.buses)} buses, "
                  f"{len(plan.drivers)} drivers, {len(plan.cards)} rider cards, service day {day}")

    database_url = settings.effective_database_url
    root = bootstrap.start(settings, "device_master", "signing", announce=False)  # test keys: it is the demo
    engine = root.engine()
    _seed_registry(engine, plan)
    console.print(f"back office database: {engine.url.render_as_string(hide_password=True)}")

    broker = None
    mqtt_url = settings.mqtt_url
    if mqtt_url is None:
        broker = EmbeddedBroker(run_dir / "broker")
        mqtt_url = broker.start()
    target = parse_mqtt_url(mqtt_url)
    console.print(f"MQTT broker: {target.url(with_password=False)}{' (embedded)' if broker else ''}")

    ingest = IngestProcess(run_dir, database_url, mqtt_url, client_id=f"ingest_{tag}", operator=plan.operator)
    master, seed_key = root.device_master, root.signing_seed
    status = StatusConsumer(engine, target, master=master, client_id=f"status_{tag}", operator=plan.operator)
    publisher = Publisher(engine, target, seed=seed_key, device_master=master, operator=plan.operator,
                          client_id=f"publisher_{tag}")
    buses: list[Bus] = []
    try:
        ingest.start()
        status.start()
        publisher.start()
        first = publisher.publish_denylist() or publisher.current
        # Students pay half, the elderly ride free (their taps are still recorded, for the concession claim), and
        # a change of route within an hour is 1 yuan cheaper.
        fares = FareTable(version=1, flat={r.code: r.fare for r in plan.routes},
                          discounts={CardType.STUDENT: 50, CardType.ELDERLY: 0}, transfer=Transfer(60, 100))
        now, clock = _sim_clock()
        for b in plan.buses:
            journal = Journal(run_dir / f"{b.device_id}.journal")
            terminal = Terminal(TerminalConfig(device_id=b.device_id, operator=plan.operator, route=b.route,
                                               vehicle=b.vehicle, tz=plan.tz),
                                journal=journal, psam=_sam_slot(SimPsam(b.terminal_id, keys=TEST_ISSUER_KEYS)),
                                fares=fares, clock=clock)
            # Packages are due by the wall clock (they were signed a moment ago), not by the simulated day's.
            downlink = Downlink(terminal, public_key=public_key(seed_key), staging_dir=run_dir / b.device_id,
                                clock=lambda: datetime.now(UTC))
            uplink = Uplink(journal, target, device_id=b.device_id, operator=plan.operator, ack_timeout=3.0,
                            mac_key=devicekeys.mac_key(master, b.device_id), terminal=terminal, downlink=downlink,
                            heartbeat_seconds=5)
            uplink.start()
            buses.append(Bus(SimReader(), terminal, uplink, journal, downlink))
        _await_denylist(buses, first.version, console)

        # A third of the riders carry phone SIMs whose e-purse speaks SM4; the rest are 3DES cards.
        cards = {c.asn: SimCard(c.asn, int(c.card_type), c.balance, start=day - timedelta(days=365),
                                end=day + timedelta(days=365 * 5), algorithm=ALG_SM4 if i % 3 == 0 else ALG_3DES)
                 for i, c in enumerate(plan.cards)}
        driver_cards = {d.staff_no: SimCard(d.asn, CardType.DRIVER, 0, staff_no=d.staff_no, holder_name=d.name,
                                            start=day - timedelta(days=365), end=day + timedelta(days=365 * 5))
                        for d in plan.drivers}
        lost = _lost_at_noon(plan)
        outcomes = _ride(plan, buses, cards, driver_cards, now, ingest, kill_ingest_at, console,
                         lambda: _report_lost(engine, publisher, lost, console))

        console.print("waiting for every validator's backlog to reach the back office ...")
        for bus in buses:
            if not bus.uplink.wait_drained(timeout=120):
                console.print(f"[red]{bus.terminal.config.device_id}: {bus.journal.backlog()} records still unsent")
        with engine.connect() as conn:
            fleet = fleet_status(conn, plan.operator, datetime.now(UTC))
    finally:
        for bus in buses:
            bus.uplink.stop()
        publisher.stop()
        status.stop()
        ingest.stop()
        if broker:
            broker.stop()
        else:  # a shared broker would keep this run's sessions, and queue for them, for ever
            for client_id in (ingest.client_id, f"status_{tag}"):
                end_session(target, client_id)

    with engine.begin() as conn:  # the clearing run is stored with the settlement
        result = settle(conn, operator=plan.operator, day=day, reports_dir=settings.var_dir / "reports")
        stored, quarantined = _count_rows(conn, plan)
        names = registry.names(conn, plan.operator)
    with engine.connect() as conn:  # the auditor re-derives the stored run from the raw tables, sharing no code
        audited = audit_books(conn, operator=plan.operator, day=day)
    journal_records = sum(len(bus.journal.records_since(0)) for bus in buses)
    for bus in buses:
        bus.journal.close()
    cards_lost = sum(c.balance for c in plan.cards) - sum(card.balance for card in cards.values())
    demo = DemoResult(run_dir=run_dir, operator=plan.operator, day=day, pdf=result.pdf, taps_by_outcome=outcomes,
                      cards_lost=cards_lost, settled_amount=result.settlement.amount,
                      settled_taps=result.settlement.taps, stored_records=stored, journal_records=journal_records,
                      quarantined=quarantined, ingest_kills=ingest.starts - 1, seconds=time.monotonic() - started,
                      audit_differences=len(audited.differences))
    _write_summary(demo, result.settlement, cards, plan)
    _print_summary(console, demo, result.settlement, names)
    if result.run is not None:
        t = result.run.totals
        console.print(f"clearing run {result.run.id}: gross ¥{yuan(t['day_gross'])}, issuer commission "
                      f"¥{yuan(t['day_commission'])}, net to the operator ¥{yuan(t['day_net'])}")
    else:
        console.print(f"provisional settlement, nothing stored: {result.provisional}")
    _print_audit(console, audited)
    _print_fleet(console, fleet)
    return demo


def _print_audit(console: Console, audited) -> None:
    if audited.clean:
        console.print(f"audit (farebox audit): {audited.runs} run(s), {audited.taps} purchases re-derived from the "
                      "raw tables: [green]no differences")
        return
    console.print(f"[red]audit (farebox audit): {len(audited.differences)} DIFFERENCE(S) (figure: stored, "
                  "re-derived)")
    for d in audited.differences[:50]:
        console.print(f"  {d.line()}", markup=False)


def _ride(plan, buses, cards, driver_cards, now, ingest, kill_ingest_at, console, at_noon) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    noon = len(plan.taps) // 2
    kills = sorted(int(f * len(plan.taps)) for f in kill_ingest_at)
    offline: set[int] = set()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} taps"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("riding", total=len(plan.taps))
        for i, tap in enumerate(plan.taps):
            now[0] = tap.at
            for o in plan.outages:  # the link goes down and comes back on the simulated clock
                down = o.start <= tap.at < o.end
                bus = buses[o.bus]
                if down and o.bus not in offline:
                    bus.uplink.go_offline()
                    offline.add(o.bus)
                    progress.console.print(f"[yellow]{bus.terminal.config.device_id}: link down at "
                                           f"{_local_time(tap.at, plan.tz)} (dead zone); its taps wait in its journal")
                elif not down and o.bus in offline:
                    bus.uplink.go_online()
                    offline.discard(o.bus)
                    progress.console.print(f"[green]{bus.terminal.config.device_id}: link back at "
                                           f"{_local_time(tap.at, plan.tz)} with {bus.journal.backlog()} records "
                                           "waiting; sending them now")
            if kills and i == kills[0]:
                kills.pop(0)
                ingest.kill()
                progress.console.print(f"[yellow]ingest killed with SIGKILL at tap {i}; restarting it")
                ingest.start()
            if i == noon:
                at_noon()
            bus = buses[tap.bus]
            bus.downlink.apply_due()  # between taps: a deny list that arrived over the air takes effect now
            card = driver_cards[plan.buses[tap.bus].driver] if tap.card is None else cards[tap.card]
            bus.reader.present(card)
            result = bus.terminal.tap(bus.reader.poll())
            bus.reader.remove()
            outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1
            if result.record is not None:
                bus.uplink.notify()
            progress.update(task, advance=1, description=f"riding {_local_time(tap.at, plan.tz)}")
        for b in offline:
            buses[b].uplink.go_online()
    return outcomes


def _await_denylist(buses: list[Bus], version: int, console, timeout: float = 30.0) -> None:
    """Before service: every bus has received the deny list over the air and applied it."""
    deadline = time.monotonic() + timeout
    waiting = list(buses)
    while waiting and time.monotonic() < deadline:
        for bus in waiting:
            bus.downlink.apply_due()
        waiting = [b for b in waiting if b.terminal.deny_list.version < version]
        time.sleep(0.05)
    if waiting:
        console.print(f"[red]deny list v{version} did not reach {', '.join(b.terminal.config.device_id for b in waiting)}")
    else:
        console.print(f"deny list v{version} ({buses[0].terminal.deny_list.count} cards) received over the air by "
                      f"all {len(buses)} buses")


def _lost_at_noon(plan: CityPlan) -> bytes | None:
    """The rider who will report a card lost at noon: the one with the most taps after it."""
    later: dict[bytes, int] = {}
    for tap in plan.taps[len(plan.taps) // 2:]:
        if tap.card is not None and tap.card not in plan.denied:
            later[tap.card] = later.get(tap.card, 0) + 1
    return max(later, key=later.get) if later else None


def _report_lost(engine, publisher: Publisher, asn: bytes | None, console) -> None:
    """A rider phones the mobile operator: card lost. The card goes on the deny list, which goes out as a delta."""
    if asn is None:
        return
    with engine.begin() as conn:
        conn.execute(Card.__table__.update().where(Card.asn == asn.hex()).values(status="lost"))
    version = publisher.publish_denylist()
    if version is not None:
        console.print(f"[yellow]noon: card {asn.hex()} reported lost; deny list v{version.version} goes out to the "
                      "buses as a delta")


def _local_time(at: datetime, tz: str) -> str:
    return at.astimezone(ZoneInfo(tz)).strftime("%H:%M")


def _count_rows(conn, plan: CityPlan) -> tuple[int, int]:
    devices = [b.device_id for b in plan.buses]
    stored = conn.execute(select(func.count()).select_from(Tap).where(Tap.device_id.in_(devices))).scalar_one()
    quarantined = conn.execute(select(func.count()).select_from(Quarantine)
                               .where(Quarantine.device_id.in_(devices))).scalar_one()
    return stored, quarantined


def _write_summary(demo: DemoResult, settlement, cards, plan: CityPlan) -> None:
    """What the run did, for a person or a test to check without re-running it."""
    doc = {
        "operator": demo.operator, "day": demo.day.isoformat(), "pdf": str(demo.pdf),
        "taps_by_outcome": demo.taps_by_outcome, "cards_lost": demo.cards_lost,
        "settled_amount": demo.settled_amount, "settled_taps": demo.settled_taps,
        "stored_records": demo.stored_records, "journal_records": demo.journal_records,
        "quarantined": demo.quarantined, "ingest_kills": demo.ingest_kills, "seconds": round(demo.seconds, 1),
        "audit_differences": demo.audit_differences,
        "devices": [b.device_id for b in plan.buses],
        "cards": {asn.hex(): {"initial": c.balance, "final": cards[asn].balance} for asn, c in
                  ((c.asn, c) for c in plan.cards)},
        "by_route": settlement.by_route.to_dict(orient="records"),
        "by_vehicle": settlement.by_vehicle.to_dict(orient="records"),
        "by_driver": settlement.by_driver.to_dict(orient="records"),
    }
    (demo.run_dir / "summary.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=int))


def _print_fleet(console: Console, fleet) -> None:
    """What the validators last said about themselves (status birth / heartbeat), as operations sees it."""
    table = Table(title="Validators, from their status messages", title_justify="left")
    for column in ("device", "vehicle", "online", "deny list", "backlog", "PSAM", "alarms"):
        table.add_column(column)
    for row in fleet:
        table.add_row(row.device_id, row.plate or row.vehicle or "", {True: "yes", False: "no"}.get(row.online, "?"),
                      f"v{row.denylist_version}" if row.denylist_version is not None else "?",
                      str(row.backlog) if row.backlog is not None else "?", row.psam, ", ".join(row.alarms))
    console.print(table)


def _print_summary(console: Console, demo: DemoResult, settlement, names: dict[str, dict[str, str]]) -> None:
    for title, frame, key in (("By route", settlement.by_route, "route"),
                              ("By vehicle", settlement.by_vehicle, "vehicle"),
                              ("By driver", settlement.by_driver, "driver")):
        table = Table(title=f"{title}, service day {demo.day}", title_justify="left")
        table.add_column(key)
        table.add_column("name")
        table.add_column("taps", justify="right")
        table.add_column("amount ¥", justify="right")
        for row in frame.itertuples(index=False):
            code = str(getattr(row, key))
            table.add_row(code, names[key].get(code, ""), str(row.taps), yuan(int(row.amount)))
        table.add_row("[bold]Total", "", f"[bold]{int(frame['taps'].sum())}",
                      f"[bold]{yuan(int(frame['amount'].sum()))}")
        console.print(table)
    outcomes = ", ".join(f"{Outcome(k).name.lower().replace('_', ' ')} {v}"
                         for k, v in sorted(demo.taps_by_outcome.items()))
    console.print(f"taps: {outcomes}")
    console.print(f"records: {demo.journal_records} written by validators, {demo.stored_records} stored once in the "
                  f"back office, {demo.quarantined} quarantined; ingest killed {demo.ingest_kills} time(s)")
    verdict = "[green]agree" if demo.consistent else "[red]DO NOT AGREE"
    console.print(f"cards lost ¥{yuan(demo.cards_lost)}; settlement ¥{yuan(demo.settled_amount)} in "
                  f"{demo.settled_taps} fares: {verdict}")
    console.print(f"PDF: {demo.pdf}")
    console.print(f"took {demo.seconds:.1f} s")

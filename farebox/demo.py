"""`farebox demo`: one service day of a small simulated city, on real parts, from card to settlement PDF.

The back office's database (SQLite under var/ unless FAREBOX_DATABASE_URL), an MQTT broker (started here unless
FAREBOX_MQTT_URL), the ingest consumer as a child process of its own, the status consumer and the package publisher
beside it, six real validators with simulated cards and PSAMs, and a day of taps in accelerated time. The deny list
reaches the buses over the air as signed packages: the whole list when they first connect, and a delta at noon when a
rider reports a card lost; one bus loses its link for four hours and catches up when it comes back. At the end the
day is settled, the PDF written, and the settlement checked against what the cards paid.

Beside the cards, a few riders buy e-tickets in the bus company's app (single rides and a day pass: orders, paid,
issued with the published test ticket keys), the buses receive the ticket public key and the pickup key in a params
package over the air, riders show their QR codes to the buses' ticket check and one reads a pickup code to the
driver, who keys it on the driver menu. The uses travel with the taps, are stored once, and the clearing run
recognises the tickets' revenue (at use, the day pass per ride, what is left unused when the tickets expire): it
must come to what the tickets sold for.

Written for a transit person to read: names, not codes (the run's tag stays inside the codes: hardware_sim.city),
money in yuan, a bus named by its plate, tables that fit 100 columns, each alarm explained in a line. The riders'
cards are issued at the counter as a card desk does (read through a reader, recorded with their opening balance),
so each card's book agrees with its chip. The buses keep the simulated day's time, so the back office's link history
shows the day as it went (bus 3's dead zone from 09:00 to 13:00), and they sign off at the end of service, so their
last status is their final one. The last lines say how to open the same data in the browser (`farebox serve`) with
a clerk's token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shlex
import shutil
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

from backoffice import clearing_runs, packages_publish, registry
from backoffice.audit_runs import audit as audit_books
from backoffice.cards import issuance
from backoffice.cards.ledger import card_ledger
from backoffice.devices import fleet_status
from backoffice.ingest_consumer import end_session
from backoffice.models import Quarantine, Tap
from backoffice.publisher import Publisher
from backoffice.settle import settle
from backoffice.status_consumer import StatusConsumer
from epurse.apdu import ALG_3DES, ALG_SM4
from epurse.cardtypes import CardType
from clearing.money import yuan
from clearing.service_day import last_closed_day
from epurse.keys import TEST_ISSUER_KEYS
from farebox import bootstrap
from farebox.broker import EmbeddedBroker
from farebox.config import Settings
from hardware_sim.card import SimCard
from hardware_sim.city import CityPlan, plan_city
from hardware_sim.psam import SimPsam
from validator.downlink import Downlink
from validator.driver_menu import DriverMenu
from validator.fares import FareTable, Transfer
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from validator.tickets import TicketChecker
from validator.uplink import Uplink
from wire import devicekeys, topics
from wire.mqtt_url import parse_mqtt_url
from wire.packages import params_body, public_key
from wire.records import RecordKind

log = logging.getLogger(__name__)

WIDTH = 100  # the demo's output fits this many columns
DEPOSIT = 2000  # fen: what a rider leaves at the counter for a card
HEARTBEAT_MINUTES = 5  # of the simulated day: a bus's heartbeats, which make the back office's link history
COUNTER = "示例营业厅 demo counter"  # who issues the demo's cards and takes the loss reports
CLERK = "demo clerk"  # the name of the clerk's token the demo prints (an earlier run's is revoked)


@dataclasses.dataclass
class Bus:
    reader: SimReader
    terminal: Terminal
    uplink: Uplink
    journal: Journal
    downlink: Downlink
    tickets: TicketChecker | None = None  # the bus's ticket check (QR codes from its 2D scanner)
    menu: DriverMenu | None = None  # the driver's keypad menu (pickup codes: key 5)


@dataclasses.dataclass
class TicketFigures:
    """The e-tickets of the run: sold in the app, shown on the buses, stored, recognised."""

    sold: int = 0
    sales: int = 0  # fen paid for them
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)  # on the buses, by outcome
    by_pickup: int = 0  # accepted pickup codes keyed by a driver
    uses_written: int = 0  # ticket_use records in the validators' journals
    uses_stored: int = 0  # rows in the back office's ticket_use table
    revenue: int = 0  # fen recognised by the clearing run
    revenue_by_source: dict[str, int] = dataclasses.field(default_factory=dict)  # use, breakage, ...

    @property
    def consistent(self) -> bool:
        return self.uses_written == self.uses_stored and self.revenue == self.sales


@dataclasses.dataclass
class DemoResult:
    run_dir: Path
    operator: str
    day: date
    pdf: Path
    taps_by_outcome: dict[str, int]
    cards_paid: int  # fen: what the riders' cards paid, read off the cards (balance before - after)
    settled_amount: int  # fen
    settled_taps: int
    stored_records: int  # rows in the back office for this run
    journal_records: int  # completed records the validators wrote
    quarantined: int
    ingest_kills: int
    seconds: float
    audit_differences: int = 0  # what `farebox audit` found re-deriving the stored run from the raw tables
    tickets: TicketFigures = dataclasses.field(default_factory=TicketFigures)

    @property
    def consistent(self) -> bool:
        return (self.cards_paid == self.settled_amount and self.stored_records == self.journal_records
                and self.quarantined == 0 and self.audit_differences == 0 and self.tickets.consistent)

    @property
    def cards_lost(self) -> int:  # the older name of cards_paid (it read like cards that were lost)
        return self.cards_paid


class IngestProcess:
    """`farebox ingest` as a child process, so that it can be killed for real."""

    def __init__(self, run_dir: Path, database_url: str, mqtt_url: str, client_id: str, operator: str,
                 workers: int = 1):
        self.run_dir = run_dir
        self.workers = workers  # more than one: `farebox ingest --workers N` (a shared subscription)
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
                 self.client_id, "--operator", self.operator, "--ready-file", str(ready),
                 *(["--workers", str(self.workers)] if self.workers > 1 else [])],
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
        # The card issuer keeps 0.6 % of the fares; the settlement shows its commission and the operator's net.
        clearing_runs.set_commission_rate(conn, operator=plan.operator, rate_bp=COMMISSION_BP, valid_from=plan.day)


COMMISSION_BP = 60
APP = "示例公交 app (partner API)"  # who sells the demo's e-tickets


def _sell_tickets(engine, plan: CityPlan, keys, tag: str, at: datetime) -> tuple[list, TicketFigures]:
    """The bus company's catalogue (a single ride, a day pass recognised per ride), and the riders' tickets bought
    in its app before the day's first bus: ordered, paid on the payment platform, issued (a signed QR token and a
    pickup code each). Returns the issued tickets in plan order."""
    from backoffice.tickets import catalogue, orders
    from backoffice.tickets.revenue import set_rule

    price = {p.code: p.price for p in plan.products}
    issued, figures = [], TicketFigures()
    with engine.begin() as conn:
        for p in plan.products:
            catalogue.add_product(conn, operator=plan.operator, code=p.code, kind=p.kind, name=p.name,
                                  price_fen=p.price, by=CLERK, now=at)
            if p.ride_value:
                set_rule(conn, operator=plan.operator, product=p.code, rule="per_ride", ride_value_fen=p.ride_value,
                         by=CLERK, now=at)
    passes = {p.code for p in plan.products if p.kind != "single"}
    for i, t in enumerate(plan.tickets):
        item = orders.ItemRequest(t.product, start_date=plan.day if t.product in passes else None)
        with engine.begin() as conn:  # one order, one transaction, as the partner API does it
            order = orders.create_order(conn, operator=plan.operator, channel="partner", phone=t.phone,
                                        items=[item], who=APP, idempotency_key=f"demo-{tag}-{i}", now=at)
            orders.mark_paid(conn, order, amount_fen=price[t.product], payment_ref=f"pay-{tag}-{i}",
                             who="payment platform", now=at)
            issued += orders.issue_tickets(conn, order, keys=keys, who=APP, now=at)
        figures.sold += 1
        figures.sales += price[t.product]
    return issued, figures


def _publish_ticket_keys(engine, publisher: Publisher, plan: CityPlan, fares: FareTable, keys, seed: bytes) -> None:
    """The fleet's params package: the fare table the buses run and, because the company sells tickets, the ticket
    public key and its pickup key (backoffice.packages_publish), signed and sent retained on the fleet topic."""
    with engine.begin() as conn:
        out = packages_publish.publish(conn, "params", plan.operator, topics.FLEET, 1,
                                       params_body(fares=fares.to_dict()), seed=seed, ticket_keys=keys)
    publisher.send(out, wait=30)


def _await_ticket_keys(buses: list[Bus], console, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(buses)
    while waiting and time.monotonic() < deadline:
        for bus in waiting:
            bus.downlink.apply_due()
        waiting = [b for b in waiting if not b.terminal.ticket_params.public_keys]
        time.sleep(0.05)
    if waiting:
        console.print(f"[red]the ticket keys did not reach {len(waiting)} of the {len(buses)} buses")
    else:
        console.print(f"ticket keys (params package) received over the air by all {len(buses)} buses")


class _LastResult:
    """The bus's ticket check as the driver menu sees it, keeping the last pickup result for the demo's count."""

    def __init__(self, checker: TicketChecker):
        self.checker = checker
        self.last = None

    def pickup(self, code: str):
        self.last = self.checker.pickup(code)
        return self.last

    def __getattr__(self, name):
        return getattr(self.checker, name)


def _show_ticket(ride, bus: Bus, ticket, figures: TicketFigures) -> None:
    """A rider shows a ticket: the QR code to the bus's scanner, or the pickup code read out to the driver, who
    keys 5, the 16 digits and # on the driver menu."""
    if ride.presented == "qr":
        result = bus.tickets.scan(ticket.token)
    else:
        for key in "5" + ticket.pickup_code + "#":
            bus.menu.press(key)
        result = bus.menu.tickets.last
        if result is not None and result.record is not None:
            figures.by_pickup += 1
    if result is not None:
        figures.outcomes[result.outcome.value] = figures.outcomes.get(result.outcome.value, 0) + 1
        if result.record is not None:
            bus.uplink.notify()


def _issue_cards(engine, plan: CityPlan, cards: dict[bytes, SimCard], at: datetime) -> int:
    """Issue the riders' cards as the counter does: read each through a reader (its balance and counters as the
    chip says them) and record it with a deposit, its holder and a concession's proof, so the card's book starts
    from the balance the chip starts from. The card that is on the deny list from the start is reported lost the
    same way. Returns the fen the cards hold at issue."""
    reader = SimReader()
    on_cards = 0
    with engine.begin() as conn:
        for c in plan.cards:
            reader.present(cards[c.asn])
            facts = issuance.read_card(reader.poll())
            reader.remove()
            issuance.issue_card(conn, card=facts, deposit=DEPOSIT, who=COUNTER, now=at, proof=c.proof,
                                holder=c.holder)
            on_cards += facts.balance
        for asn in sorted(plan.denied):
            issuance.report_lost(conn, asn=asn.hex(), who=COUNTER, why="holder reported the card lost", now=at)
    return on_cards


def _sam_slot(psam: SimPsam):
    """The validator's SAM slot is a reader of its own, holding the PSAM for good."""
    slot = SimReader()
    slot.present(psam)
    return slot.poll()


def _sim_clock(start: datetime):
    """A clock the simulation moves forward; the terminals and the uplinks read it as their wall clock."""
    now = [start]
    return now, (lambda: now[0])


def demo_console() -> Console:
    """A terminal's own width up to WIDTH columns; WIDTH when the output goes to a file or a pipe (rich would
    take 80 there and cut the tables)."""
    console = Console()
    if not console.is_terminal or console.width > WIDTH:
        console = Console(width=WIDTH)
    return console


def run_demo(settings: Settings, *, seed: int = 7, day: date | None = None, riders: int = 200,
             kill_ingest_at: tuple[float, ...] = (), console: Console | None = None) -> DemoResult:
    """Run the day; ``kill_ingest_at`` lists fractions of the day at which ingest is SIGKILLed and restarted."""
    console = console or demo_console()
    # The demo is the one command made for the published test keys: its simulated cards and PSAMs carry them.
    settings = dataclasses.replace(settings, insecure_test_keys=True)
    started = time.monotonic()
    tag = secrets.token_hex(3)
    run_dir = (settings.var_dir / "demo" / tag).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_log(run_dir):
        return _run(settings, run_dir, tag, seed, day, riders, kill_ingest_at, console, started)


@contextlib.contextmanager
def run_log(run_dir: Path):
    """The console shows progress; the details (reconnects, quarantine reasons) go to the run's own log file."""
    log_file = logging.FileHandler(run_dir / "demo.log")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(log_file)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(log_file)
        log_file.close()


def _run(settings, run_dir, tag, seed, day, riders, kill_ingest_at, console, started) -> DemoResult:
    day = day or last_closed_day(datetime.now(UTC))
    plan = plan_city(tag=tag, day=day, seed=seed, riders=riders)
    console.print(f"[bold]farebox demo[/]: {plan.operator_name}, service day {day} (run {tag})")
    console.print(f"{len(plan.routes)} routes, {len(plan.buses)} buses with validators, {len(plan.drivers)} drivers, "
                  f"{len(plan.cards)} riders' cards")

    database_url = settings.effective_database_url
    root = bootstrap.start(settings, "device_master", "signing", "ticket", "pickup",
                           announce=False)  # test keys: it is the demo
    engine = root.engine()
    _seed_registry(engine, plan)
    console.print(f"back office database: {engine.url.render_as_string(hide_password=True)}", soft_wrap=True)

    # A third of the riders carry phone SIMs whose e-purse speaks SM4; the rest are 3DES cards.
    cards = {c.asn: SimCard(c.asn, int(c.card_type), c.balance, start=day - timedelta(days=365),
                            end=day + timedelta(days=365 * 5), holder_name=c.holder,
                            algorithm=ALG_SM4 if i % 3 == 0 else ALG_3DES)
             for i, c in enumerate(plan.cards)}
    driver_cards = {d.staff_no: SimCard(d.asn, CardType.DRIVER, 0, staff_no=d.staff_no, holder_name=d.name,
                                        start=day - timedelta(days=365), end=day + timedelta(days=365 * 5))
                    for d in plan.drivers}
    # The buses' day starts a quarter of an hour before the first driver signs in.
    now, clock = _sim_clock(plan.taps[0].at - timedelta(minutes=15))
    on_cards = _issue_cards(engine, plan, cards, at=now[0])
    console.print(f"{len(plan.cards)} cards issued at the counter, holding {yuan(on_cards, symbol='¥')} "
                  f"(deposit {yuan(DEPOSIT, symbol='¥')} each)")
    issued, ticket_figures = _sell_tickets(engine, plan, root.ticket_keys, tag, now[0])
    kinds = {p.code: p.name for p in plan.products}
    bought = ", ".join(f"{sum(t.product == code for t in plan.tickets)} {name}" for code, name in kinds.items())
    console.print(f"{ticket_figures.sold} e-tickets bought in the bus company's app ({bought}), paid "
                  f"{yuan(ticket_figures.sales, symbol='¥')}")

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
    route_names = {r.code: r.name for r in plan.routes}
    try:
        ingest.start()
        status.start()
        publisher.start()
        first = publisher.publish_denylist() or publisher.current
        # Students pay half, the elderly ride free (their taps are still recorded, for the concession claim), and
        # a change of route within an hour is 1 yuan cheaper.
        fares = FareTable(version=1, flat={r.code: r.fare for r in plan.routes},
                          discounts={CardType.STUDENT: 50, CardType.ELDERLY: 0}, transfer=Transfer(60, 100))
        for b in plan.buses:
            journal = Journal(run_dir / f"{b.device_id}.journal")
            terminal = Terminal(TerminalConfig(device_id=b.device_id, operator=plan.operator, route=b.route,
                                               vehicle=b.vehicle, tz=plan.tz),
                                journal=journal, psam=_sam_slot(SimPsam(b.terminal_id, keys=TEST_ISSUER_KEYS)),
                                fares=fares, clock=clock)
            # Packages are due by the wall clock (they were signed a moment ago), not by the simulated day's.
            downlink = Downlink(terminal, public_key=public_key(seed_key), staging_dir=run_dir / b.device_id,
                                clock=lambda: datetime.now(UTC))
            # The bus's status (birth, heartbeats, goodbye) is dated by the simulated day, as a real bus dates it
            # by its own clock: the link history the back office keeps is the day's.
            uplink = Uplink(journal, target, device_id=b.device_id, operator=plan.operator, ack_timeout=3.0,
                            mac_key=devicekeys.mac_key(master, b.device_id), terminal=terminal, downlink=downlink,
                            heartbeat_seconds=HEARTBEAT_MINUTES * 60, clock=clock)
            uplink.start()
            checker = TicketChecker(terminal)
            menu = DriverMenu(terminal, None, None, lambda lines: None, tz=plan.tz, clock=clock,
                              tickets=_LastResult(checker))
            buses.append(Bus(SimReader(), terminal, uplink, journal, downlink, checker, menu))
        _await_denylist(buses, first.version, console)
        _publish_ticket_keys(engine, publisher, plan, fares, root.ticket_keys, seed_key)
        _await_ticket_keys(buses, console)

        lost = _lost_at_noon(plan)
        outcomes = _ride(plan, buses, cards, driver_cards, now, ingest, kill_ingest_at, console,
                         lambda: _report_lost(engine, publisher, lost, plan, now[0], console),
                         lambda ride: _show_ticket(ride, buses[ride.bus], issued[ride.ticket], ticket_figures))

        console.print("waiting for every bus's records to reach the back office ...")
        for b, bus in zip(plan.buses, buses, strict=True):
            if not bus.uplink.wait_drained(timeout=120):
                console.print(f"[red]{b.name}: {bus.journal.backlog()} records still unsent")
        # End of service: the buses are switched off at the depot. Each says goodbye with its final backlog.
        now[0] = max(now[0], plan.taps[-1].at) + timedelta(minutes=5)
        for bus in buses:
            bus.uplink.stop()
        _await_goodbyes(engine, plan, now[0])
    finally:
        for bus in buses:
            bus.uplink.stop()  # does nothing after the goodbye above; on an error, still a clean stop
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
        books = _card_books(conn, plan, cards)
        fleet = fleet_status(conn, plan.operator, now[0])
        _count_tickets(conn, plan, result, ticket_figures)
    journal_records = sum(len(bus.journal.records_since(0)) for bus in buses)
    ticket_figures.uses_written = sum(r.kind is RecordKind.TICKET_USE for bus in buses
                                      for r in bus.journal.records_since(0))
    for bus in buses:
        bus.journal.close()
    cards_paid = sum(c.balance for c in plan.cards) - sum(card.balance for card in cards.values())
    demo = DemoResult(run_dir=run_dir, operator=plan.operator, day=day, pdf=result.pdf, taps_by_outcome=outcomes,
                      cards_paid=cards_paid, settled_amount=result.settlement.amount,
                      settled_taps=result.settlement.taps, stored_records=stored, journal_records=journal_records,
                      quarantined=quarantined, ingest_kills=ingest.starts - 1, seconds=time.monotonic() - started,
                      audit_differences=len(audited.differences), tickets=ticket_figures)
    _write_summary(demo, result.settlement, cards, plan)
    _print_summary(console, demo, result.settlement, names, route_names, plan)
    if result.run is not None:
        t = result.run.totals
        console.print(f"clearing run {result.run.id}: gross {yuan(t['day_gross'], symbol='¥')}, card issuer's "
                      f"commission ({COMMISSION_BP / 100:.2f} %) {yuan(t['day_commission'], symbol='¥')}")
        console.print(f"net to the bus company: {yuan(t['day_net'], symbol='¥')}")
    else:
        console.print(f"provisional settlement, nothing stored: {result.provisional}")
    _print_audit(console, audited)
    _print_books(console, books)
    _print_fleet(console, fleet, plan)
    console.print("PDF report:", str(demo.pdf), soft_wrap=True)
    console.print(f"took {demo.seconds:.1f} s")
    _print_serve(console, settings, plan)
    return demo


def _await_goodbyes(engine, plan: CityPlan, at: datetime, timeout: float = 15.0) -> None:
    """Until the status consumer has stored every bus's last word (its goodbye, dated ``at``), so the status the
    back office shows after the demo is the buses' final one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            rows = fleet_status(conn, plan.operator, at)
        if all(r.last_seen is not None and r.last_seen >= at.replace(microsecond=0) and r.online is False
               for r in rows):
            return
        time.sleep(0.1)
    log.warning("demo: not every bus's goodbye reached the back office within %.0f s", timeout)


def _print_audit(console: Console, audited) -> None:
    if audited.clean:
        console.print(f"audit (farebox audit): {audited.runs} run(s), {audited.taps} purchases re-derived from the "
                      "raw tables: [green]no differences")
        return
    console.print(f"[red]audit (farebox audit): {len(audited.differences)} DIFFERENCE(S) (figure: stored, "
                  "re-derived)")
    for d in audited.differences[:50]:
        console.print(f"  {d.line()}", markup=False)


def _ride(plan, buses, cards, driver_cards, now, ingest, kill_ingest_at, console, at_noon,
          show_ticket=lambda ride: None) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    rides = list(plan.ticket_rides)
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
                name = plan.buses[o.bus].name
                if down and o.bus not in offline:
                    bus.uplink.go_offline()
                    offline.add(o.bus)
                    progress.console.print(f"[yellow]{_local_time(tap.at, plan.tz)} bus {name} loses its link "
                                           "(a dead zone); its taps wait in its validator")
                elif not down and o.bus in offline:
                    bus.uplink.go_online()
                    offline.discard(o.bus)
                    progress.console.print(f"[green]{_local_time(tap.at, plan.tz)} bus {name} is back online; "
                                           f"it sends the {bus.journal.backlog()} records it kept")
            if kills and i == kills[0]:
                kills.pop(0)
                ingest.kill()
                progress.console.print(f"[yellow]{_local_time(tap.at, plan.tz)} the back office's ingest is "
                                       "killed (SIGKILL) and restarted")
                ingest.start()
            if i == noon:
                at_noon()
            while rides and rides[0].at <= tap.at:  # riders with e-tickets board between the card taps
                ride = rides.pop(0)
                now[0] = ride.at
                buses[ride.bus].downlink.apply_due()
                show_ticket(ride)
                now[0] = tap.at
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
        console.print(f"[red]deny list v{version} did not reach {len(waiting)} of the {len(buses)} buses")
    else:
        count = buses[0].terminal.deny_list.count
        console.print(f"deny list v{version} ({count} card{'' if count == 1 else 's'}) received over the air by "
                      f"all {len(buses)} buses")


def _lost_at_noon(plan: CityPlan) -> bytes | None:
    """The rider who will report a card lost at noon: the one with the most taps after it."""
    later: dict[bytes, int] = {}
    for tap in plan.taps[len(plan.taps) // 2:]:
        if tap.card is not None and tap.card not in plan.denied:
            later[tap.card] = later.get(tap.card, 0) + 1
    return max(later, key=later.get) if later else None


def _report_lost(engine, publisher: Publisher, asn: bytes | None, plan: CityPlan, at: datetime, console) -> None:
    """A rider phones the mobile operator: card lost. The card goes on the deny list (its book balance frozen for a
    refund), and the list goes out to the buses as a delta."""
    if asn is None:
        return
    with engine.begin() as conn:
        issuance.report_lost(conn, asn=asn.hex(), who=COUNTER, why="holder phoned: card lost", now=at)
    version = publisher.publish_denylist()
    holder = next((c.holder for c in plan.cards if c.asn == asn), "")
    if version is not None:
        console.print(f"[yellow]{_local_time(at, plan.tz)} {holder} reports card {asn.hex()} lost; deny list "
                      f"v{version.version} goes out to the buses as a delta")


def _local_time(at: datetime, tz: str) -> str:
    return at.astimezone(ZoneInfo(tz)).strftime("%H:%M")


def _count_rows(conn, plan: CityPlan) -> tuple[int, int]:
    """(records stored: taps and ticket uses, records quarantined) of this run's buses."""
    from backoffice.tickets.uses import ticket_use

    devices = [b.device_id for b in plan.buses]
    stored = conn.execute(select(func.count()).select_from(Tap).where(Tap.device_id.in_(devices))).scalar_one()
    stored += conn.execute(select(func.count()).select_from(ticket_use)
                           .where(ticket_use.c.device_id.in_(devices))).scalar_one()
    quarantined = conn.execute(select(func.count()).select_from(Quarantine)
                               .where(Quarantine.device_id.in_(devices))).scalar_one()
    return stored, quarantined


def _count_tickets(conn, plan: CityPlan, result, figures: TicketFigures) -> None:
    """The ticket uses the back office stored for this run's buses, and the ticket revenue the run recognised."""
    from backoffice.tickets.revenue import run_lines
    from backoffice.tickets.uses import ticket_use

    devices = [b.device_id for b in plan.buses]
    figures.uses_stored = conn.execute(select(func.count()).select_from(ticket_use)
                                       .where(ticket_use.c.device_id.in_(devices))).scalar_one()
    if result.run is None:
        return
    lines = run_lines(conn, result.run.id)
    if len(lines):
        by_source = lines.groupby("source")["amount"].sum()
        figures.revenue_by_source = {str(k): int(v) for k, v in by_source.items()}
    figures.revenue = sum(figures.revenue_by_source.values())


def _write_summary(demo: DemoResult, settlement, cards, plan: CityPlan) -> None:
    """What the run did, for a person or a test to check without re-running it."""
    doc = {
        "operator": demo.operator, "day": demo.day.isoformat(), "pdf": str(demo.pdf),
        "taps_by_outcome": demo.taps_by_outcome, "cards_paid": demo.cards_paid,
        "settled_amount": demo.settled_amount, "settled_taps": demo.settled_taps,
        "stored_records": demo.stored_records, "journal_records": demo.journal_records,
        "quarantined": demo.quarantined, "ingest_kills": demo.ingest_kills, "seconds": round(demo.seconds, 1),
        "audit_differences": demo.audit_differences,
        "tickets": dataclasses.asdict(demo.tickets),
        "devices": [b.device_id for b in plan.buses],
        "cards": {asn.hex(): {"initial": c.balance, "final": cards[asn].balance} for asn, c in
                  ((c.asn, c) for c in plan.cards)},
        "by_route": settlement.by_route.to_dict(orient="records"),
        "by_vehicle": settlement.by_vehicle.to_dict(orient="records"),
        "by_driver": settlement.by_driver.to_dict(orient="records"),
    }
    (demo.run_dir / "summary.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=int))


def _card_books(conn, plan: CityPlan, cards: dict[bytes, SimCard]) -> tuple[int, int, int]:
    """(cards, whose book balance equals what the chip holds now, whose ledger has no findings)."""
    equal = clean = 0
    for c in plan.cards:
        ledger = card_ledger(conn, asn=c.asn.hex())
        equal += ledger.balance + ledger.refunds == cards[c.asn].balance
        clean += not ledger.findings
    return len(plan.cards), equal, clean


def _print_books(console: Console, books: tuple[int, int, int]) -> None:
    n, equal, clean = books
    colour = "green" if equal == clean == n else "red"
    console.print(f"card books: [{colour}]{equal} of {n}[/] agree with what the card holds; "
                  f"{n - clean} to look into")


# What each alarm a validator can raise means, and what to do about it, in one line each (validator.uplink and
# validator.downlink raise them; matched by how they begin).
ALARMS = (
    ("grey purchase", "a card left mid-payment; the bus settles it when that card taps again. Nothing to do, "
                      "unless it stays grey for a day: then look up the card"),
    ("journal full", "the validator refuses taps: bring it in range of the network so it can send its records"),
    ("journal", "the validator's store of unsent records is filling: it has not reached the back office for long"),
    ("records set aside", "records the bus could not encode; they go to the quarantine: review them there"),
    ("denylist", "the bus's deny list is old: check it receives packages (deny-list page)"),
    ("params", "the bus's fare table is old or refused: check the package it was sent"),
    ("software", "a software package was refused or is pending: check the package it was sent"),
)


def explain_alarm(alarm: str) -> str:
    """One line: what the alarm is and what to do."""
    for start, meaning in ALARMS:
        if alarm.lower().startswith(start):
            return meaning
    return "see the validators page"


def _print_fleet(console: Console, fleet, plan: CityPlan) -> None:
    """What the validators last said about themselves (birth, heartbeats, goodbye), as operations sees it."""
    routes = {r.code: r.name for r in plan.routes}
    route_of = {b.device_id: routes[b.route] for b in plan.buses}
    table = Table(title="Validators, as their last status message left them", title_justify="left")
    for column, justify in (("bus", "left"), ("route", "left"), ("link", "left"), ("deny list", "right"),
                            ("unsent", "right"), ("alarms", "left")):
        table.add_column(column, justify=justify)
    alarms: dict[str, str] = {}
    for row in fleet:
        heard = _local_time(row.last_seen, plan.tz) if row.last_seen is not None else ""
        if row.online is None:
            link = "never heard from"
        elif getattr(row, "signed_off", False) or (row.online is False and heard):
            link = f"off since {heard}" if getattr(row, "signed_off", False) else f"lost at {heard}"
        else:
            link = f"online, last heard {heard}"
        for a in row.alarms:
            alarms.setdefault(a.split(" since ")[0], explain_alarm(a))
        table.add_row(row.plate or row.vehicle or row.device_id, route_of.get(row.device_id, ""), link,
                      f"v{row.denylist_version}" if row.denylist_version is not None else "?",
                      str(row.backlog) if row.backlog is not None else "?", "; ".join(row.alarms))
    console.print(table)
    for alarm, meaning in alarms.items():
        console.print(f"  {alarm}: {meaning}")


def _print_summary(console: Console, demo: DemoResult, settlement, names: dict[str, dict[str, str]],
                   route_names: dict[str, str], plan: CityPlan) -> None:
    route_of_vehicle = {b.vehicle: route_names[b.route] for b in plan.buses}
    bus_of_driver = {b.driver: b.plate for b in plan.buses}
    for title, frame, key, column, extra in (
            ("By route", settlement.by_route, "route", "route", None),
            ("By bus", settlement.by_vehicle, "vehicle", "bus", ("route", route_of_vehicle)),
            ("By driver", settlement.by_driver, "driver", "driver", ("bus", bus_of_driver))):
        table = Table(title=f"{title}, service day {demo.day}", title_justify="left")
        table.add_column(column)
        if extra:
            table.add_column(extra[0])
        table.add_column("fares", justify="right")
        table.add_column("amount ¥", justify="right")
        for row in frame.itertuples(index=False):
            code = str(getattr(row, key))
            cells = [names[key].get(code) or code]
            if extra:
                cells.append(extra[1].get(code, ""))
            table.add_row(*cells, str(row.taps), yuan(int(row.amount)))
        total = ["[bold]Total"] + ([""] if extra else [])
        table.add_row(*total, f"[bold]{int(frame['taps'].sum())}", f"[bold]{yuan(int(frame['amount'].sum()))}")
        console.print(table)
    shifts = (Outcome.SHIFT_OPENED.value, Outcome.SHIFT_CLOSED.value)
    words = {k: OUTCOME_WORDS.get(k, Outcome(k).name.lower().replace('_', ' ')) for k in demo.taps_by_outcome}
    riders = ", ".join(f"{v} {words[k]}" for k, v in sorted(demo.taps_by_outcome.items(), key=lambda kv: -kv[1])
                       if k not in shifts)
    drivers = ", ".join(f"{demo.taps_by_outcome[k]} {words[k]}" for k in shifts if k in demo.taps_by_outcome)
    console.print(f"riders' taps: {riders}")
    if drivers:
        console.print(f"drivers: {drivers}")
    console.print(f"records: {demo.journal_records} written by the validators, {demo.stored_records} stored once in "
                  f"the back office, {demo.quarantined} quarantined")
    if demo.ingest_kills:
        console.print(f"the back office's ingest was killed and restarted {demo.ingest_kills} time(s)")
    _print_tickets(console, demo.tickets)
    verdict = "[green]agree" if demo.consistent else "[red]DO NOT AGREE"
    console.print(f"cards paid {yuan(demo.cards_paid, symbol='¥')} in fares; settlement "
                  f"{yuan(demo.settled_amount, symbol='¥')} in {demo.settled_taps} fares: {verdict}")


SOURCE_WORDS = {"use": "at use", "pass_day": "pass days", "breakage": "left unused at expiry",
                "refund": "taken back for refunds"}


def _print_tickets(console: Console, t: TicketFigures) -> None:
    accepted = t.outcomes.get(Outcome.TICKET_OK.value, 0)
    refused = ", ".join(f"{n} refused: {OUTCOME_WORDS.get(k, Outcome(k).name.lower().replace('_', ' '))}"
                        for k, n in sorted(t.outcomes.items()) if k != Outcome.TICKET_OK.value)
    console.print(f"e-tickets: {t.sold} sold for {yuan(t.sales, symbol='¥')}; {accepted} uses on the buses "
                  f"({accepted - t.by_pickup} QR, {t.by_pickup} pickup code keyed by a driver)")
    console.print(f"ticket uses: {t.uses_written} written by the validators, {t.uses_stored} stored once"
                  f"{'; ' + refused if refused else ''}")
    order = list(SOURCE_WORDS)
    parts = ", ".join(f"{yuan(v, symbol='¥')} {SOURCE_WORDS.get(k, k)}" for k, v in
                      sorted(t.revenue_by_source.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9))
    verdict = "[green]agree" if t.revenue == t.sales else "[red]DO NOT AGREE"
    console.print(f"ticket revenue recognised {yuan(t.revenue, symbol='¥')} ({parts}) of "
                  f"{yuan(t.sales, symbol='¥')} sold: {verdict}")


OUTCOME_WORDS = {Outcome.PAID.value: "paid", Outcome.INSUFFICIENT_BALANCE.value: "refused: balance too low",
                 Outcome.CARD_BLOCKED.value: "refused: card on the deny list",
                 Outcome.SHIFT_OPENED.value: "signed in", Outcome.SHIFT_CLOSED.value: "signed out",
                 Outcome.TICKET_USED.value: "ticket already used"}


def serve_command(settings: Settings) -> str:
    """The line that starts `farebox serve` on the data the demo wrote: the same var folder (database, token file,
    reports), and the same database and broker when they were given by URL."""
    env = [f"FAREBOX_VAR_DIR={shlex.quote(str(settings.var_dir.resolve()))}"]
    if settings.database_url:
        env.append(f"FAREBOX_DATABASE_URL={shlex.quote(_masked(settings.database_url))}")
    if settings.mqtt_url:
        env.append(f"FAREBOX_MQTT_URL={shlex.quote(_masked(settings.mqtt_url))}")
    if settings.api_tokens_file:
        env.append(f"FAREBOX_API_TOKENS={shlex.quote(str(settings.api_tokens_file.resolve()))}")
    script = Path(sys.executable).parent / "farebox"
    if shutil.which("farebox") and Path(shutil.which("farebox")).resolve() == script.resolve():
        program = "farebox"
    elif script.exists():
        program = shlex.quote(str(script))
    else:
        program = f"{shlex.quote(sys.executable)} -m farebox.cli"
    return " ".join([*env, program, "--insecure-test-keys", "serve"])


def _masked(url: str) -> str:
    """A URL as the user gave it, its password (if any) left for them to fill in."""
    from sqlalchemy.engine import make_url  # it reads any scheme://user:password@host URL, mqtt:// too

    try:
        parsed = make_url(url)
    except Exception:
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def _print_serve(console: Console, settings: Settings, plan: CityPlan) -> None:
    """How to see the same day in the browser: the serve line and a clerk's token for this bus company."""
    from backoffice.web.auth import TokenFileError, add_token, revoke_token

    path = settings.tokens_path
    try:
        try:
            revoke_token(path, name=CLERK)  # the clerk of an earlier run's company
        except TokenFileError:
            pass  # none working
        token = add_token(path, role="clerk", name=CLERK, operator=plan.operator)
    except (OSError, TokenFileError) as e:
        console.print(f"[red]no clerk token made ({e}); make one with farebox token add --role clerk")
        token = None
    console.print()
    console.print("See the day in the browser: start the back office on the same data with")
    console.print(f"  {serve_command(settings)}", soft_wrap=True, markup=False, highlight=False)
    if "***" in serve_command(settings):
        console.print("  (*** stands for the password in your own URL)")
    console.print(f"then open http://127.0.0.1:8000/ and log in as the clerk of {plan.operator_name}")
    console.print(f"with this token ({CLERK}: shown only now, kept hashed in {path.name}):")
    if token:
        console.print(f"  {token}", soft_wrap=True, markup=False, highlight=False)

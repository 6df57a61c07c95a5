"""`farebox demo --buses N`: a service day of a city of N buses (1,000 in at most 5 minutes on two cores), on the
real validator code, with the small demo's agreement checks at the end and the throughput of each stage.

The city (hardware_sim.city.plan_large_city): a route per ten buses, a driver per bus, 10 riders' cards per bus, a
tap every twenty minutes or so per bus (twice that at the rush hours; ~60 a bus in the day), one bus in a hundred in a dead zone from 09:00
to 13:00. Every bus is a real validator (validator.terminal on a validator.journal, validator.uplink over MQTT) with
a simulated PSAM; the riders' cards are simulated chips issued at the counter first, as the small demo does. The
buses run in districts of ``district`` buses, a child process each (farebox.city_buses: paho cannot take more than
~150 buses in one process); the back office's ingest is ``farebox ingest`` in a child process of its own.

The broker is a Mosquitto of the run's own on a loopback port (the small demo's embedded amqtt is pure Python and
was not made for a thousand connections), unless FAREBOX_MQTT_URL names one. The database is a SQLite file of the
city's own (``<var>/demo-city/backoffice.db``: the small demo's database stays small), unless FAREBOX_DATABASE_URL
names one, e.g. PostgreSQL.

At the end: the day is cleared and stored, the PDF/CSV/XLSX written, and the same checks as the small demo's are
made: cards paid (read off the chips) = settlement, every record the validators wrote stored once and none
quarantined, every journal drained, the auditor's re-derivation finds no difference, every card's book agrees with
its chip. Then the stages' figures: taps made per second at the validators, messages published and records
acknowledged per second, records stored per second (from the stored rows' received_at), the clearing time and the
reports' time. ``summary.json`` in the run's folder has every figure printed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import resource
import secrets
import shutil
import socket
import subprocess
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from clearing.money import yuan
from clearing.service_day import last_closed_day
from farebox import bootstrap
from farebox.city_buses import District, Ridden, rider_card, run_district
from farebox.config import Settings
from hardware_sim.city import CityPlan, plan_large_city
from wire.mqtt_url import parse_mqtt_url

log = logging.getLogger(__name__)

DISTRICT = 100  # buses per child process (paho's select() limit allows ~150)
# A thin day, so that 1,000 buses ride it in under 5 minutes on two cores: about 60 taps a bus (a real city bus sees
# 500-1,000), ~4 ms of CPU each across validator, broker and ingest (the real code: card and PSAM crypto, three
# journal commits, a message and its acknowledgement per tap). The nightly path at 10 M taps is bench city's.
RIDERS_PER_BUS = 10
TRIPS_PER_HOUR = 3.0  # riders' taps an hour per bus, off-peak (twice at the rush hours)


@dataclasses.dataclass
class Stages:
    """The throughput of each stage, and the times it comes from (seconds)."""

    taps: int = 0  # taps made at the validators (riders' and drivers')
    ride_seconds: float = 0.0  # from the first district's first tap to the last district's last
    tap_seconds: float = 0.0  # summed over the districts: wall time inside Terminal.tap
    ride_cpu_seconds: float = 0.0  # summed over the districts: their CPU time while riding
    records: int = 0  # records the validators wrote (one per tap that made one)
    published: int = 0  # MQTT messages (batches) the uplinks published, resends included
    resends: int = 0
    acked_seconds: float = 0.0  # from the first tap to the last record acknowledged
    stored: int = 0  # rows the back office stored for the run's buses
    stored_seconds: float = 0.0  # from the first stored row's received_at to the last's
    clearing_seconds: float = 0.0  # clear the day and store the run
    report_seconds: float = 0.0  # PDF, CSV, XLSX of the stored run
    audit_seconds: float = 0.0
    books_seconds: float = 0.0  # every card's ledger against its chip

    @staticmethod
    def rate(n: int, seconds: float) -> float:
        return n / seconds if seconds > 0 else 0.0


@dataclasses.dataclass
class CityResult:
    run_dir: Path
    operator: str
    day: date
    buses: int
    pdf: Path | None
    taps_by_outcome: dict[str, int]
    cards_paid: int
    settled_amount: int
    settled_taps: int
    stored_records: int
    journal_records: int
    quarantined: int
    undrained: int  # records still unacknowledged in the journals at the end
    audit_differences: int
    books: tuple[int, int, int]  # (cards, books agreeing with the chip, ledgers with no findings)
    stages: Stages
    seconds: float

    @property
    def consistent(self) -> bool:
        n, equal, clean = self.books
        return (self.cards_paid == self.settled_amount and self.stored_records == self.journal_records
                and self.quarantined == 0 and self.undrained == 0 and self.audit_differences == 0
                and equal == clean == n)


class Mosquitto:
    """A Mosquitto of the run's own on a free loopback port: no persistence (the journals are the outbox), no
    queue limit (Mosquitto's default of 1,000 queued messages drops QoS 1 messages for a slow subscriber, see
    PLATFORM.md), no connection limit. Anonymous, on 127.0.0.1 only."""

    def __init__(self, work: Path):
        program = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists()
                                                else None)
        if program is None:
            raise RuntimeError("farebox demo --buses needs Mosquitto (apt-get install mosquitto) or "
                               "FAREBOX_MQTT_URL naming a broker that takes a thousand connections")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        work.mkdir(parents=True, exist_ok=True)
        conf = work / "mosquitto.conf"
        # Logged to stderr (our file): Mosquitto started as root runs as the mosquitto user, who may not write here.
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_connections -1\nmax_queued_messages 0\nmax_queued_bytes 0\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n")
        self.log = work / "mosquitto.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([program, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the run's Mosquitto did not start (see {self.log})") from None
                time.sleep(0.05)
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def city_settings(settings: Settings) -> Settings:
    """The city's own folder under var/ (database, reports, tokens), unless a database URL was given."""
    var = settings.var_dir / "demo-city"
    return dataclasses.replace(settings, insecure_test_keys=True, var_dir=var)


def run_city(settings: Settings, *, buses: int = 1000, seed: int = 7, day: date | None = None,
             riders_per_bus: int = RIDERS_PER_BUS, trips_per_hour: float = TRIPS_PER_HOUR, district: int = DISTRICT,
             ingest_workers: int = 1, console: Console | None = None) -> CityResult:
    from farebox.demo import demo_console, run_log

    console = console or demo_console()
    settings = city_settings(settings)
    started = time.monotonic()
    tag = secrets.token_hex(3)
    run_dir = (settings.var_dir / "runs" / tag).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # the children inherit it: Mosquitto holds a descriptor per bus
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with run_log(run_dir):
        return _run(settings, run_dir, tag, seed, day, buses, riders_per_bus, trips_per_hour, district,
                    ingest_workers, console, started)


def _run(settings, run_dir, tag, seed, day, n_buses, riders_per_bus, trips_per_hour, district, ingest_workers,
         console, started) -> CityResult:
    from backoffice.audit_runs import audit as audit_books
    from backoffice.ingest_consumer import end_session, worker_client_ids
    from farebox.demo import COMMISSION_BP, IngestProcess, _count_rows, _issue_cards, _print_audit, _print_books, \
        _print_serve, _seed_registry

    day = day or last_closed_day(datetime.now(UTC))
    plan = plan_large_city(tag=tag, day=day, seed=seed, buses=n_buses, riders_per_bus=riders_per_bus,
                           trips_per_hour=trips_per_hour, district=district)
    districts = (n_buses + district - 1) // district
    console.print(f"[bold]farebox demo --buses {n_buses}[/]: {plan.operator_name}, service day {day} (run {tag})")
    console.print(f"{len(plan.routes)} routes, {len(plan.buses)} buses with validators in {districts} district(s) "
                  f"of up to {district} (a process each), {len(plan.drivers)} drivers, {len(plan.cards)} riders' "
                  f"cards, {len(plan.taps)} taps planned")

    database_url = settings.effective_database_url
    boot = bootstrap.start(settings, "device_master", announce=False)  # test keys: it is the demo
    engine = boot.engine()
    _seed_registry(engine, plan)
    console.print(f"back office database: {engine.url.render_as_string(hide_password=True)}", soft_wrap=True)

    broker = None
    mqtt_url = settings.mqtt_url
    if mqtt_url is None:
        broker = Mosquitto(run_dir / "broker")
        mqtt_url = broker.url
    target = parse_mqtt_url(mqtt_url)
    console.print(f"MQTT broker: {target.url(with_password=False)}{' (the run’s own Mosquitto)' if broker else ''}")

    ingest = IngestProcess(run_dir, database_url, mqtt_url, client_id=f"ingest_{tag}", operator=plan.operator,
                           workers=ingest_workers)
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    try:
        ingest.start(timeout=180)  # a loaded machine has been seen to take more than 30 s
        journal_dir = run_dir / "journals"
        journal_dir.mkdir()
        t = time.monotonic()
        for k, share in enumerate(_districts(plan, district, journal_dir, mqtt_url, boot.device_master)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=run_district, args=(share, child), name=f"district-{k}", daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            pipes.append(parent)
        # The counter issues the riders' cards while the districts start and connect their buses.
        cards = {c.asn: rider_card(c, i, day) for i, c in enumerate(plan.cards)}
        on_cards = _issue_cards(engine, plan, cards, at=plan.taps[0].at - timedelta(minutes=15))
        del cards  # the districts ride with chips made the same way; these only told the counter what they hold
        console.print(f"{len(plan.cards)} cards issued at the counter, holding {yuan(on_cards, symbol='¥')} "
                      f"({time.monotonic() - t:.1f} s)")
        connected = sum(_gather(pipes, "ready", 180))
        console.print(f"{connected} of {n_buses} validators connected ({time.monotonic() - t:.1f} s)")
        for p in pipes:
            p.send("go")
        ridden = _follow(pipes, len(plan.taps), console)
        console.print("every district's journals drained" if all(r.drained_at for r in ridden) else
                      f"[red]{sum(r.backlog for r in ridden)} records still unacknowledged")
        for p in pipes:
            p.send("stop")
        finals = _gather(pipes, "final", 120)
        ingest.stop()
        if broker:
            broker.stop()
        return _close_day(settings, engine, plan, run_dir, ridden, finals, console, started, audit_books,
                          _count_rows, _print_audit, _print_books, _print_serve, COMMISSION_BP)
    finally:
        for p in pipes:
            p.close()
        deadline = time.monotonic() + 30  # a district whose pipe closed stops its buses and ends
        for proc in procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        ingest.stop()
        if broker:
            broker.stop()
        else:
            for client_id in worker_client_ids(ingest.client_id, ingest_workers):
                end_session(target, client_id)


def _districts(plan: CityPlan, size: int, journal_dir: Path, mqtt_url: str, master: bytes):
    fares = {r.code: r.fare for r in plan.routes}
    drivers = {d.staff_no: d for d in plan.drivers}
    riders_per_district = len(plan.cards) // len(plan.buses) * size
    taps: dict[int, list] = {}
    for tap in plan.taps:
        taps.setdefault(tap.bus // size, []).append(tap)
    for k in range(0, len(plan.buses), size):
        number = k // size
        own = list(enumerate(plan.buses))[k:k + size]
        first = number * riders_per_district
        yield District(number=number, operator=plan.operator, tz=plan.tz, day=plan.day, journal_dir=journal_dir,
                       mqtt_url=mqtt_url, master=master, fares=fares, buses=own,
                       drivers={b.driver: drivers[b.driver] for _, b in own},
                       cards=list(enumerate(plan.cards))[first:first + riders_per_district],
                       taps=taps.get(number, []), outages=[o for o in plan.outages if o.bus // size == number])


def _gather(pipes, what: str, timeout: float) -> list:
    """Each district's answer ``what``, in district order."""
    out = []
    deadline = time.monotonic() + timeout
    for pipe in pipes:
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"a district did not say {what!r} within {timeout:.0f} s (see its district-*.log)")
        try:
            kind, value = pipe.recv()
        except EOFError:
            raise RuntimeError(f"a district process ended before it said {what!r} (see its district-*.log)") from None
        if kind != what:
            raise RuntimeError(f"a district said {kind!r}, not {what!r}")
        out.append(value)
    return out


def _follow(pipes, total: int, console) -> list[Ridden]:
    """The districts ride: a progress bar over the city's taps until each has said ``ridden``."""
    from multiprocessing.connection import wait

    done: dict[int, Ridden] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} taps"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("riding", total=total)
        while len(done) < len(pipes):
            ready = wait([p for i, p in enumerate(pipes) if i not in done], timeout=600)
            if not ready:
                raise RuntimeError("the districts went silent for 10 minutes")
            for p in ready:
                try:
                    kind, value = p.recv()
                except EOFError:
                    raise RuntimeError("a district process ended (see its district-*.log)") from None
                if kind == "progress":
                    progress.update(task, advance=value)
                elif kind == "ridden":
                    done[pipes.index(p)] = value
                    if len(done) == len(pipes):
                        progress.update(task, description="ridden; draining")
    return [done[i] for i in range(len(pipes))]


def _close_day(settings, engine, plan, run_dir, ridden, finals, console, started, audit_books, count_rows,
               print_audit, print_books, print_serve, commission_bp) -> CityResult:
    from backoffice import clearing_runs
    from backoffice.models import Tap
    from backoffice.settle import settle

    stages = Stages()
    stages.taps = sum(r.taps for r in ridden)
    first = min(r.ride_started for r in ridden)
    stages.ride_seconds = max(r.ride_ended for r in ridden) - first
    stages.records = sum(f.journal_records for f in finals)
    stages.tap_seconds = sum(r.tap_seconds for r in ridden)
    stages.ride_cpu_seconds = sum(r.cpu_seconds for r in ridden)
    stages.published = sum(f.batches_sent for f in finals)
    stages.resends = sum(f.resends for f in finals)
    drained = [r.drained_at for r in ridden]
    stages.acked_seconds = (max(drained) - first) if all(drained) else 0.0
    devices = [b.device_id for b in plan.buses]
    with engine.connect() as conn:
        stored_count, received_first, received_last = conn.execute(
            select(func.count(), func.min(Tap.received_at), func.max(Tap.received_at))
            .where(Tap.device_id.in_(devices))).one()
    stages.stored = stored_count
    if received_first is not None:
        stages.stored_seconds = (_utc(received_last) - _utc(received_first)).total_seconds()

    now = datetime.now(UTC)
    t = time.monotonic()
    with engine.begin() as conn:  # clear the day and store the run, as settle does for a new day
        run = clearing_runs.clear_day(conn, operator=plan.operator, day=plan.day, now=now)
        clearing_runs.reconcile_shifts_day(conn, operator=plan.operator, day=plan.day, now=now)
    stages.clearing_seconds = time.monotonic() - t
    t = time.monotonic()
    with engine.begin() as conn:  # the stored run's reports
        result = settle(conn, operator=plan.operator, day=plan.day, reports_dir=settings.var_dir / "reports",
                        now=now, close_day=False)
    stages.report_seconds = time.monotonic() - t
    with engine.connect() as conn:
        stored, quarantined = count_rows(conn, plan)
    t = time.monotonic()
    with engine.connect() as conn:  # the auditor re-derives the stored run from the raw tables, sharing no code
        audited = audit_books(conn, operator=plan.operator, day=plan.day)
    stages.audit_seconds = time.monotonic() - t
    balances: dict[str, int] = {}
    for f in finals:
        balances.update(f.balances)
    t = time.monotonic()
    books = _card_books(engine, plan, balances)
    stages.books_seconds = time.monotonic() - t
    outcomes: dict[str, int] = {}
    for r in ridden:
        for k, v in r.outcomes.items():
            outcomes[k] = outcomes.get(k, 0) + v
    cards_paid = sum(c.balance for c in plan.cards) - sum(balances[c.asn.hex()] for c in plan.cards)
    undrained = sum(n for f in finals for n in f.backlog.values())
    city = CityResult(run_dir=run_dir, operator=plan.operator, day=plan.day, buses=len(plan.buses), pdf=result.pdf,
                      taps_by_outcome=outcomes, cards_paid=cards_paid, settled_amount=result.settlement.amount,
                      settled_taps=result.settlement.taps, stored_records=stored, journal_records=stages.records,
                      quarantined=quarantined, undrained=undrained, audit_differences=len(audited.differences),
                      books=books, stages=stages, seconds=time.monotonic() - started)
    _write_summary(city, plan, balances, run, result)
    _print(console, city, run, commission_bp)
    print_audit(console, audited)
    print_books(console, books)
    _print_stages(console, stages)
    console.print("PDF report:", str(city.pdf), soft_wrap=True)
    console.print(f"took {city.seconds:.1f} s")
    print_serve(console, settings, plan)
    return city


def _card_books(engine, plan: CityPlan, balances: dict[str, int]) -> tuple[int, int, int]:
    """(cards, whose book balance equals what the chip holds now, whose ledger has no findings), as the small demo
    reads them. Read here, not in the districts: ten processes reading ledgers beside the clearing run on two cores
    took 85 s and made the clearing 67 s (60,797 taps); one after the other, 20,000 ledgers took 19 s."""
    from backoffice.cards.ledger import card_ledger

    equal = clean = 0
    with engine.connect() as conn:
        for c in plan.cards:
            ledger = card_ledger(conn, asn=c.asn.hex())
            equal += ledger.balance + ledger.refunds == balances[c.asn.hex()]
            clean += not ledger.findings
    return len(plan.cards), equal, clean


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _print(console: Console, city: CityResult, run, commission_bp: int) -> None:
    from farebox.demo import OUTCOME_WORDS
    from validator.messages import Outcome

    words = {k: OUTCOME_WORDS.get(k, Outcome(k).name.lower().replace("_", " ")) for k in city.taps_by_outcome}
    console.print("taps: " + ", ".join(f"{v} {words[k]}" for k, v in
                                       sorted(city.taps_by_outcome.items(), key=lambda kv: -kv[1])))
    console.print(f"records: {city.journal_records} written by the validators, {city.stored_records} stored once in "
                  f"the back office, {city.quarantined} quarantined; {city.undrained} left in the journals")
    if run is not None:
        t = run.totals
        console.print(f"clearing run {run.id}: gross {yuan(t['day_gross'], symbol='¥')}, card issuer's commission "
                      f"({commission_bp / 100:.2f} %) {yuan(t['day_commission'], symbol='¥')}, net to the bus "
                      f"company {yuan(t['day_net'], symbol='¥')}")
    verdict = "[green]agree" if city.cards_paid == city.settled_amount else "[red]DO NOT AGREE"
    console.print(f"cards paid {yuan(city.cards_paid, symbol='¥')} in fares; settlement "
                  f"{yuan(city.settled_amount, symbol='¥')} in {city.settled_taps} fares: {verdict}")


def _print_stages(console: Console, s: Stages) -> None:
    table = Table(title="Throughput of each stage", title_justify="left")
    for column, justify in (("stage", "left"), ("count", "right"), ("seconds", "right"), ("per second", "right")):
        table.add_column(column, justify=justify)
    table.add_row("taps made at the validators", str(s.taps), f"{s.ride_seconds:.1f}",
                  f"{s.rate(s.taps, s.ride_seconds):.0f}")
    table.add_row("messages published by the uplinks", str(s.published), f"{s.acked_seconds:.1f}",
                  f"{s.rate(s.published, s.acked_seconds):.0f}")
    table.add_row("records acknowledged (first tap to last ack)", str(s.records), f"{s.acked_seconds:.1f}",
                  f"{s.rate(s.records, s.acked_seconds):.0f}")
    table.add_row("records stored (first to last received_at)", str(s.stored), f"{s.stored_seconds:.1f}",
                  f"{s.rate(s.stored, s.stored_seconds):.0f}")
    table.add_row("clearing: clear the day, store the run", "", f"{s.clearing_seconds:.1f}", "")
    table.add_row("reports: PDF, CSV, XLSX", "", f"{s.report_seconds:.1f}", "")
    table.add_row("audit: re-derive the run from the raw tables", "", f"{s.audit_seconds:.1f}", "")
    table.add_row("card books: every card's ledger", "", f"{s.books_seconds:.1f}", "")
    console.print(table)
    if s.resends:
        console.print(f"({s.resends} of the messages were resends: an acknowledgement not back within the timeout)")


def _write_summary(city: CityResult, plan: CityPlan, balances: dict[str, int], run, result) -> None:
    doc = {
        "operator": city.operator, "day": city.day.isoformat(), "buses": city.buses,
        "pdf": str(city.pdf) if city.pdf else None, "files": [str(f) for f in result.files],
        "run_id": run.id if run is not None else None,
        "taps_by_outcome": city.taps_by_outcome, "cards_paid": city.cards_paid,
        "settled_amount": city.settled_amount, "settled_taps": city.settled_taps,
        "stored_records": city.stored_records, "journal_records": city.journal_records,
        "quarantined": city.quarantined, "undrained": city.undrained, "audit_differences": city.audit_differences,
        "books": list(city.books), "consistent": city.consistent, "seconds": round(city.seconds, 1),
        "stages": dataclasses.asdict(city.stages),
        "devices": [b.device_id for b in plan.buses],
        "cards": {c.asn.hex(): {"initial": c.balance, "final": balances[c.asn.hex()]} for c in plan.cards},
    }
    (city.run_dir / "summary.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=int))


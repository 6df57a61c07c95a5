"""`python -m bench tap`: software time per rider tap through the real validator, beside the unavoidable floor.

Measured (per tap, perf_counter_ns around one call):

- **terminal**: ``validator.terminal.Terminal.tap`` with a SimReader holding a SimCard, a SimPsam in the SAM slot
  (a SimReader of its own, as the demo wires it) and a real Journal on disk in a temp dir (WAL, synchronous=FULL:
  the grey record and the completed record are two fsync'd commits). A driver shift is opened first; riders are a
  pool of cards with big balances, and a fake clock moves 2 s per tap so no card comes back inside the
  double-tap window. Every timed tap must come out PAID, or the run stops (it would not be measuring a purchase).
- **floor**: the work no validator can skip, timed the same way: the eight APDUs of the composite purchase the
  terminal sends, straight to the same kind of SimCard and SimPsam (SELECT, READ BINARY 0015, READ RECORD 17/02,
  INITIALIZE FOR PURCHASE P1 03, PSAM INIT FOR PURCHASE type 09, UPDATE CAPP DATA CACHE with a 64-byte transit
  record built once, DEBIT FOR PURCHASE, PSAM VERIFY MAC2; command bytes built once, answers sliced by hand, status
  words checked) and two fsync'd SQLite commits of a record of the same size in a WAL + synchronous=FULL database,
  in the terminal's order (pending row before the UPDATE and the DEBIT, completed row after MAC2).
- **disk**: what one commit costs alone (a tiny row, WAL + FULL), and a bare ``write`` + ``fsync`` of 4 KiB.

Terminal and floor run in alternating blocks so that both see the same machine; a warm-up of each is not counted.

Goals (printed, and in the JSON as ``goals``; nothing is asserted, the machines are shared): the terminal's p99
at most 15 ms, and at most twice the floor's p99 measured in the same run. The full run is 10,000 timed taps:
``python -m bench tap --tap-taps 10000`` or ``python -m bench.tap`` (``--quick``: 600).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import fmt_ratio, fmt_us, percentile, ratio, summary_us, table, write_result
from epurse import apdu, crypto
from epurse.cardtypes import CardType
from epurse.transit import TransitRecord, TripState
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from wire.records import RecordKind, TapRecord, to_plain

FARE = 200  # fen
BALANCE = 100_000_000  # fen: a million yuan, enough for any run
TERMINAL_ID = bytes.fromhex("010000000042")
STEP = timedelta(seconds=2)  # the fake clock's move per tap
OK = b"\x90\x00"
NO_RECORD = b"\x6a\x83"  # READ RECORD 17/02 of a card that never rode
GOAL_P99_US = 15_000
GOAL_RATIO_P99 = 2.0
TAPS = 10_000
QUICK_TAPS = 600


def _asn(kind: int, i: int) -> bytes:
    return bytes([0x10, kind]) + i.to_bytes(8, "big")


def _cards(n: int, kind: int, start, end) -> list[SimCard]:
    return [SimCard(_asn(kind, i), CardType.ADULT, BALANCE, start=start, end=end) for i in range(n)]


def _sam_slot(psam: SimPsam):
    """The validator's SAM slot is a reader of its own holding the PSAM (as farebox.demo wires it)."""
    slot = SimReader()
    slot.present(psam)
    return slot.poll()


class TerminalRig:
    """A real Terminal on a real Journal, a driver shift open, a pool of rider cards."""

    def __init__(self, work: Path, riders: int, now: datetime):
        self.now = now
        self.journal = Journal(work / "validator.journal")
        self.terminal = Terminal(
            TerminalConfig(device_id="bench_v1", operator="bench", route="r1", vehicle="bus1"),
            journal=self.journal, psam=_sam_slot(SimPsam(TERMINAL_ID)),
            fares=FareTable(version=1, flat={"r1": FARE}), clock=lambda: self.now)
        start, end = now.date() - timedelta(days=365), now.date() + timedelta(days=3650)
        self.reader = SimReader()
        driver = SimCard(_asn(0xDD, 1), CardType.DRIVER, 0, staff_no="D0001", holder_name="Bench Driver",
                         start=start, end=end)
        if self._tap(driver) is not Outcome.SHIFT_OPENED:
            raise RuntimeError("the driver card did not open a shift")
        self.cards = _cards(riders, 0x01, start, end)
        self.i = 0

    def _tap(self, card) -> Outcome:
        self.reader.present(card)
        result = self.terminal.tap(self.reader.poll())
        self.reader.remove()
        return result.outcome

    def run(self, n: int, out: list[int] | None) -> None:
        reader, terminal, cards = self.reader, self.terminal, self.cards
        for _ in range(n):
            self.now += STEP
            reader.present(cards[self.i % len(cards)])
            self.i += 1
            session = reader.poll()
            t0 = time.perf_counter_ns()
            result = terminal.tap(session)
            t1 = time.perf_counter_ns()
            reader.remove()
            if result.outcome is not Outcome.PAID:
                raise RuntimeError(f"tap {self.i} came out {result.outcome.value} ({result.detail}), not paid: "
                                   "the benchmark would not be timing a purchase")
            if out is not None:
                out.append(t1 - t0)

    def close(self) -> None:
        self.journal.close()


def _open_synced(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    db.execute("PRAGMA synchronous=FULL")
    if mode.lower() != "wal" or db.execute("PRAGMA synchronous").fetchone()[0] != 2:
        raise RuntimeError(f"{path}: could not get WAL + synchronous=FULL")
    return db


class FloorRig:
    """The composite purchase's APDUs straight to a SimCard and a SimPsam, and two fsync'd commits of a
    journal-sized row."""

    def __init__(self, work: Path, riders: int, now: datetime):
        self.now = now
        start, end = now.date() - timedelta(days=365), now.date() + timedelta(days=3650)
        self.cards = _cards(riders, 0x02, start, end)
        self.psam = SimPsam(TERMINAL_ID)
        self.db = _open_synced(work / "floor.db")
        self.db.execute("CREATE TABLE record (device_seq INTEGER PRIMARY KEY, state TEXT NOT NULL, "
                        "acked INTEGER NOT NULL DEFAULT 0, body TEXT NOT NULL)")
        sample = TapRecord(device_id="bench_v1", device_seq=1, kind=RecordKind.PURCHASE, occurred_at=now,
                           operator="bench", route="r1", vehicle="bus1", driver="D0001", shift_no=1,
                           card_asn=_asn(0x02, 1).hex(), card_type=1, card_ttc=17, amount=FARE,
                           balance_after=BALANCE - 18 * FARE, terminal_id=TERMINAL_ID.hex(), terminal_seq=1234,
                           tac="0123abcd", tx_type=apdu.TX_COMPOSITE, full_fare=FARE)
        self.body = json.dumps(to_plain(sample), separators=(",", ":"))
        # Command bytes that do not change from tap to tap are built once: the floor is the cards' and the
        # PSAM's work, not building commands.
        self.select, self.read_0015, self.read_capp = apdu.select_aid(), apdu.read_public_info(), \
            apdu.read_capp_record()
        self.init_cmd = apdu.init_purchase(0x01, FARE, TERMINAL_ID, composite=True)
        trip = TransitRecord(state=TripState.DONE, route="r1", vehicle="bus1", driver="D0001",
                             terminal_id=TERMINAL_ID, at=now, amount=FARE, full_fare=FARE)
        self.update_cmd = apdu.update_capp_cache(trip.encode())
        self.psam_head = b"\x80\x70\x00\x00\x24"
        self.amount_type = FARE.to_bytes(4, "big") + bytes([apdu.TX_COMPOSITE])
        self.seq = 0
        self.i = 0

    def run(self, n: int, out: list[int] | None, apdu_out: list[int] | None = None) -> None:
        """Time ``n`` purchases into ``out``; ``apdu_out`` gets the same taps without their two commits."""
        cards, psam, db, body = self.cards, self.psam, self.db, self.body
        for _ in range(n):
            self.now += STEP
            card = cards[self.i % len(cards)]
            self.i += 1
            self.seq += 1
            t0 = time.perf_counter_ns()
            date4, time3 = crypto.bcd_date(self.now), crypto.bcd_time(self.now)
            if card.transmit(self.select)[-2:] != OK:
                raise RuntimeError("floor SELECT failed")
            info = card.transmit(self.read_0015)
            if info[-2:] != OK:
                raise RuntimeError(f"floor READ BINARY 0015 answered {info[-2:].hex()}")
            r = card.transmit(self.read_capp)
            if r[-2:] != OK and r != NO_RECORD:
                raise RuntimeError(f"floor READ RECORD 17/02 answered {r[-2:].hex()}")
            r = card.transmit(self.init_cmd)
            if r[-2:] != OK:
                raise RuntimeError(f"floor INITIALIZE FOR PURCHASE answered {r[-2:].hex()}")
            # balance(4) TTC(2) overdraft(3) key version(1) algorithm(1) random(4); 0015: issuer(8) .. ASN(10) ..
            r = psam.transmit(self.psam_head + r[11:15] + r[4:6] + self.amount_type + date4 + time3 + r[9:11]
                              + info[12:20] + info[0:8] + b"\x08")
            if r[-2:] != OK:
                raise RuntimeError(f"floor PSAM INIT FOR PURCHASE answered {r[-2:].hex()}")
            c0 = time.perf_counter_ns()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO record (device_seq, state, body) VALUES (?, 'pending', ?)", (self.seq, body))
            db.execute("COMMIT")
            c1 = time.perf_counter_ns()
            if card.transmit(self.update_cmd) != OK:
                raise RuntimeError("floor UPDATE CAPP DATA CACHE failed")
            r = card.transmit(b"\x80\x54\x01\x00\x0f" + r[0:4] + date4 + time3 + r[4:8] + b"\x08")
            if r[-2:] != OK:
                raise RuntimeError(f"floor DEBIT FOR PURCHASE answered {r[-2:].hex()}")
            r = psam.transmit(b"\x80\x72\x00\x00\x04" + r[4:8])
            if r != OK:
                raise RuntimeError(f"floor PSAM VERIFY MAC2 answered {r.hex()}")
            c2 = time.perf_counter_ns()
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE record SET state = 'done', body = ? WHERE device_seq = ?", (body, self.seq))
            db.execute("COMMIT")
            t1 = time.perf_counter_ns()
            if out is not None:
                out.append(t1 - t0)
            if apdu_out is not None:
                apdu_out.append((t1 - t0) - (c1 - c0) - (t1 - c2))

    def close(self) -> None:
        self.db.close()


def disk_costs(work: Path, n: int) -> tuple[list[int], list[int]]:
    """Per commit of a tiny row (WAL + FULL), and per bare 4 KiB write + fsync, in ns."""
    db = _open_synced(work / "commit.db")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    commits = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, 'x')", (i,))
        db.execute("COMMIT")
        commits.append(time.perf_counter_ns() - t0)
    db.close()
    fsyncs = []
    block = os.urandom(4096)
    fd = os.open(work / "fsync.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            os.write(fd, block)
            os.fsync(fd)
            fsyncs.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
    return commits, fsyncs


def run(*, taps: int = TAPS, block: int = 250, riders: int = 200, warmup: int = 100, disk_samples: int = 1000,
        console=None, results_dir=None) -> dict:
    started = time.monotonic()
    now = datetime.now(UTC).replace(microsecond=0)
    terminal_ns: list[int] = []
    floor_ns: list[int] = []
    floor_apdu_ns: list[int] = []
    blocks: list[tuple[int, float, float]] = []  # (taps so far, terminal p50 µs, floor p50 µs) per block
    with tempfile.TemporaryDirectory(prefix="farebox_bench_tap_") as tmp:
        work = Path(tmp)
        rig, floor = TerminalRig(work, riders, now), FloorRig(work, riders, now)
        try:
            rig.run(warmup, None)
            floor.run(warmup, None)
            while len(terminal_ns) < taps:  # alternate blocks: both see the same machine
                step = min(block, taps - len(terminal_ns))
                rig.run(step, terminal_ns)
                floor.run(step, floor_ns, floor_apdu_ns)
                blocks.append((len(terminal_ns), percentile(terminal_ns[-step:], 50) / 1000,
                               percentile(floor_ns[-step:], 50) / 1000))
            journal_records = len(rig.journal.records_since(0))
        finally:
            rig.close()
            floor.close()
        commit_ns, fsync_ns = disk_costs(work, disk_samples)

    t, f = summary_us(terminal_ns), summary_us(floor_ns)
    c, s = summary_us(commit_ns), summary_us(fsync_ns)
    doc = {
        "params": {"taps": taps, "block": block, "riders": riders, "warmup": warmup, "disk_samples": disk_samples,
                   "fare_fen": FARE},
        "terminal": t,
        "floor": f,
        "floor_apdus_only": summary_us(floor_apdu_ns),
        "commit_tiny_row": c,
        "write_fsync_4k": s,
        "ratio_terminal_to_floor": {"p50": ratio(t["p50_us"], f["p50_us"]), "p99": ratio(t["p99_us"], f["p99_us"])},
        "terminal_overhead_p50_us": round(t["p50_us"] - f["p50_us"], 1),
        "goals": {"p99_at_most_us": GOAL_P99_US, "p99_ratio_at_most": GOAL_RATIO_P99,
                  "p99_met": t["p99_us"] <= GOAL_P99_US,
                  "ratio_met": (ratio(t["p99_us"], f["p99_us"]) or float("inf")) <= GOAL_RATIO_P99},
        "journal_records": journal_records,
        # A per-tap cost that grows with the journal shows here (the floor's table grows the same way).
        "p50_us_by_block": [{"taps": n, "terminal": round(t_, 1), "floor": round(f_, 1)} for n, t_, f_ in blocks],
        "seconds": round(time.monotonic() - started, 1),
    }
    path = write_result("tap", doc, **({"results_dir": results_dir} if results_dir else {}))
    if console is not None:
        print_result(console, doc, path)
    return doc


def print_result(console, doc: dict, path) -> None:
    t, f, c, s = doc["terminal"], doc["floor"], doc["commit_tiny_row"], doc["write_fsync_4k"]
    a, b = doc["floor_apdus_only"], doc["p50_us_by_block"]
    r = doc["ratio_terminal_to_floor"]
    rows = [
        ["Terminal.tap, journal on disk", fmt_us(t["p50_us"]), fmt_us(t["p99_us"]), fmt_us(t["mean_us"]),
         str(t["n"])],
        ["floor: 8 APDUs + 2 commits", fmt_us(f["p50_us"]), fmt_us(f["p99_us"]), fmt_us(f["mean_us"]), str(f["n"])],
        ["[bold]ratio terminal / floor", f"[bold]{fmt_ratio(r['p50'])}", f"[bold]{fmt_ratio(r['p99'])}", "", ""],
        ["  floor's 8 APDUs alone", fmt_us(a["p50_us"]), fmt_us(a["p99_us"]), fmt_us(a["mean_us"]), str(a["n"])],
        ["disk: 1 commit, tiny row", fmt_us(c["p50_us"]), fmt_us(c["p99_us"]), fmt_us(c["mean_us"]), str(c["n"])],
        ["disk: write 4 KiB + fsync", fmt_us(s["p50_us"]), fmt_us(s["p99_us"]), fmt_us(s["mean_us"]), str(s["n"])],
    ]
    console.print(table(
        f"tap: time per rider tap ({t['n']} taps, alternating blocks of {doc['params']['block']})",
        ["what", "p50", "p99", "mean", "n"], rows,
        caption=f"commits: SQLite WAL + synchronous=FULL. p50 terminal - floor = "
                f"{doc['terminal_overhead_p50_us']:+.0f} µs. Block p50, first -> last "
                f"{len(b)} blocks: terminal {fmt_us(b[0]['terminal'])} -> {fmt_us(b[-1]['terminal'])}, floor "
                f"{fmt_us(b[0]['floor'])} -> {fmt_us(b[-1]['floor'])} (journal {doc['journal_records']} records). "
                f"{doc['seconds']} s. {path}"))
    g = doc["goals"]
    mark = {True: "[green]met[/green]", False: "[red]missed[/red]"}
    console.print(f"goals: terminal p99 {fmt_us(t['p99_us'])} <= {fmt_us(g['p99_at_most_us'])}: "
                  f"{mark[g['p99_met']]}; p99 terminal / floor {fmt_ratio(r['p99'])} <= "
                  f"{g['p99_ratio_at_most']:.0f}×: {mark[g['ratio_met']]}")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.tap``: this benchmark alone (``python -m bench tap`` runs it with the bench presets)."""
    import argparse

    from bench.common import RESULTS_DIR, console

    p = argparse.ArgumentParser(prog="python -m bench.tap", description=__doc__.splitlines()[0])
    p.add_argument("--taps", type=int, default=None, help=f"timed rider taps (default {TAPS})")
    p.add_argument("--quick", action="store_true", help=f"a small run for smoke tests ({QUICK_TAPS} taps)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where tap.json goes")
    args = p.parse_args(argv)
    quick = {"warmup": 50, "disk_samples": 200} if args.quick else {}
    run(taps=args.taps or (QUICK_TAPS if args.quick else TAPS), console=console(), results_dir=args.results,
        **quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

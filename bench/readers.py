"""`python -m bench readers`: one rider purchase through the real validator Terminal over each reader backend, beside
the in-process ``sim:`` reader in the same run.

Each backend gets its own Terminal (PSAM in an in-process slot, journal on disk in a temp dir, a driver shift open)
and one rider card with a deep purse that stays in the field; a fake clock moves 40 s per tap so every tap is a
purchase, not "already paid". Per tap:

- **tap**: ``Terminal.tap(session)``: SELECT, READ BINARY, transfer/record reads, INITIALIZE, PSAM, grey record,
  DEBIT, PSAM MAC2 check, completed record: all the card's APDUs cross the backend;
- **poll**: ``reader.poll()`` finding the card already in the field (PC/SC connect, NFC sense + RATS, RFID-SIM
  ACTIVATE);
- **APDUs per purchase**, counted at the card.

Backends: ``sim:`` (baseline), ``pcsc:`` (pyscard -> pcscd -> vpcd -> hardware_sim.vpcd over TCP), ``nfc:`` (nfcpy udp
driver, ISO-DEP card in a thread), ``rfid24:`` (pyserial over a pty to hardware_sim.rfid24_module). Backends run
in alternating blocks so all see the same machine. A backend that cannot start (no pcscd) is reported with its
reason, not timed. The journal's two fsync'd commits are in every backend's tap alike; the difference to ``sim:``
is the reader path.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import fmt_ratio, ratio, summary_us, table, write_result
from epurse.cardtypes import CardType
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers import open_reader
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig

FARE = 200
TERMINAL_ID = bytes.fromhex("010000000043")
STEP = timedelta(seconds=40)  # past the double-tap window: the same card pays again
BACKENDS = ("sim", "pcsc", "nfc", "rfid24")
PCSC_PORT = 0x9C40

log = logging.getLogger(__name__)


class CountingCard:
    def __init__(self, card):
        self.card = card
        self.asn = card.asn
        self.apdus = 0

    def transmit(self, apdu: bytes) -> bytes:
        self.apdus += 1
        return self.card.transmit(apdu)


class TimedSession:
    """The backend's session, with the time spent inside ``exchange`` added up: the reader path alone, without the
    journal's fsyncs that dominate (and add noise to) a whole tap."""

    def __init__(self, session):
        self.session = session
        self.ns = 0

    def exchange(self, apdu: bytes) -> bytes:
        t0 = time.perf_counter_ns()
        try:
            return self.session.exchange(apdu)
        finally:
            self.ns += time.perf_counter_ns() - t0


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackendRig:
    def __init__(self, backend: str, work: Path, now: datetime):
        self.backend = backend
        self.now = now
        self._closers = []
        start, end = now.date() - timedelta(days=365), now.date() + timedelta(days=3650)
        self.driver = CountingCard(SimCard(bytes.fromhex("3100000000000099" + f"{BACKENDS.index(backend):04d}"),
                                           int(CardType.DRIVER), 0, staff_no="D0001", start=start, end=end))
        self.rider = CountingCard(SimCard(bytes.fromhex("3100000000000011" + f"{BACKENDS.index(backend):04d}"),
                                          int(CardType.ADULT), 100_000_000, start=start, end=end))
        self.journal = Journal(work / f"{backend}.journal")
        self._closers.append(self.journal.close)
        slot = SimReader()
        slot.present(SimPsam(TERMINAL_ID))
        self.terminal = Terminal(TerminalConfig(device_id=f"bench_{backend}", operator="bench", route="r1",
                                                vehicle="bus1"), journal=self.journal, psam=slot.poll(),
                                 fares=FareTable(version=1, flat={"r1": FARE}), clock=lambda: self.now)
        try:
            self._open(backend)
            self.present(self.driver)
            if self._tap(None, None) is not Outcome.SHIFT_OPENED:
                raise RuntimeError("the driver card did not open a shift")
            self.swap_to(self.rider)
        except BaseException:
            self.close()
            raise

    def _open(self, backend: str) -> None:
        if backend == "sim":
            self.reader = open_reader("sim:")
            self.present = self.reader.present
            self.remove = self.reader.remove
        elif backend == "pcsc":
            from hardware_sim.vpcd import VpcdCard, reader_name, settle_vpcd

            self.reader = open_reader(f"pcsc:{reader_name(PCSC_PORT)}")
            self._vpcd = None

            def present(card):
                self._vpcd = VpcdCard(card, port=PCSC_PORT)
                self._vpcd.insert()
                settle_vpcd(self.reader, card=self._vpcd)  # this card, not a card left by someone else

            def remove():
                if self._vpcd is not None:
                    self._vpcd.remove()
                    self._vpcd = None
                    deadline = time.monotonic() + 5
                    while not self.reader.card_gone(200) and time.monotonic() < deadline:
                        pass

            self.present, self.remove = present, remove
        elif backend == "nfc":
            from hardware_sim.nfc_card import NfcCard

            port = _free_udp_port()
            self._nfc = NfcCard(None, port).start()
            self._closers.append(self._nfc.stop)
            self.reader = open_reader(f"nfc:udp:127.0.0.1:{port}")
            self.present, self.remove = self._nfc.present, self._nfc.remove
        elif backend == "rfid24":
            from hardware_sim.rfid24_module import Rfid24Module

            module = Rfid24Module()
            self._closers.append(module.close)
            self.reader = open_reader(f"rfid24:{module.path}")
            self.present, self.remove = module.present, module.remove
        self._closers.append(self.reader.close)
        self._closers.append(lambda: self.remove())

    def swap_to(self, card) -> None:
        self.remove()
        self.present(card)

    def _tap(self, tap_ns, poll_ns, io_ns=None) -> Outcome:
        self.now += STEP
        p0 = time.perf_counter_ns()
        session = self.reader.poll(5.0)
        p1 = time.perf_counter_ns()
        if session is None:
            raise RuntimeError(f"{self.backend}: no card in the field")
        timed = TimedSession(session)
        result = self.terminal.tap(timed)
        t1 = time.perf_counter_ns()
        if tap_ns is not None:
            tap_ns.append(t1 - p1)
            poll_ns.append(p1 - p0)
            io_ns.append(timed.ns)
        return result.outcome

    def run(self, n: int, tap_ns: list[int] | None, poll_ns: list[int] | None, io_ns: list[int] | None = None):
        for _ in range(n):
            outcome = self._tap(tap_ns, poll_ns, io_ns)
            if outcome is not Outcome.PAID:
                raise RuntimeError(f"{self.backend}: tap came out {outcome.value}, not paid")

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception as e:  # noqa: BLE001 - one backend failing to close must not hide the others' figures
                log.warning("%s: closing failed: %s", self.backend, e)
        self._closers.clear()


def run(*, taps: int = 200, block: int = 20, warmup: int = 5, backends=BACKENDS, console=None,
        results_dir=None) -> dict:
    started = time.monotonic()
    now = datetime.now(UTC).replace(microsecond=0)
    rigs: dict[str, BackendRig] = {}
    unavailable: dict[str, str] = {}
    tap_ns = {b: [] for b in backends}
    poll_ns = {b: [] for b in backends}
    io_ns = {b: [] for b in backends}
    with tempfile.TemporaryDirectory(prefix="farebox_bench_readers_") as tmp:
        try:
            for b in backends:
                try:
                    rigs[b] = BackendRig(b, Path(tmp), now)
                    rigs[b].run(warmup, None, None)
                except Exception as e:  # noqa: BLE001 - a missing daemon is reported, not fatal to the others
                    unavailable[b] = f"{type(e).__name__}: {e}"
                    rigs.pop(b, None)
            apdu_before = {b: r.rider.apdus for b, r in rigs.items()}
            while rigs and min(len(tap_ns[b]) for b in rigs) < taps:
                for b, rig in rigs.items():
                    rig.run(min(block, taps - len(tap_ns[b])), tap_ns[b], poll_ns[b], io_ns[b])
            apdus = {b: round((r.rider.apdus - apdu_before[b]) / max(1, len(tap_ns[b])), 1) for b, r in rigs.items()}
        finally:
            for rig in rigs.values():
                rig.close()
    base = summary_us(tap_ns.get("sim", []))
    base_io = summary_us(io_ns.get("sim", []))
    results = {}
    for b in backends:
        if b in unavailable:
            results[b] = {"available": False, "reason": unavailable[b]}
            continue
        t, p, io = summary_us(tap_ns[b]), summary_us(poll_ns[b]), summary_us(io_ns[b])
        results[b] = {"available": True, "apdus_per_purchase": apdus[b], "tap": t, "poll": p, "card_io": io,
                      "ms_per_purchase_p50": round(t["p50_us"] / 1000, 3),
                      "ratio_to_sim_p50": ratio(t["p50_us"], base.get("p50_us")),
                      "card_io_ratio_to_sim_p50": ratio(io["p50_us"], base_io.get("p50_us")),
                      "us_per_apdu_p50": round(io["p50_us"] / apdus[b], 1) if apdus[b] else None}
    doc = {"params": {"taps": taps, "block": block, "warmup": warmup, "fare_fen": FARE, "backends": list(backends)},
           "baseline": "sim", "results": results, "seconds": round(time.monotonic() - started, 1)}
    path = write_result("readers", doc, **({"results_dir": results_dir} if results_dir else {}))
    if console is not None:
        print_result(console, doc, path)
    return doc


def print_result(console, doc: dict, path) -> None:
    rows = []
    for b, r in doc["results"].items():
        if not r["available"]:
            rows.append([f"{b}:", "-", "-", "-", "-", "-", "-", r["reason"][:60]])
            continue
        t, p, io = r["tap"], r["poll"], r["card_io"]
        base = b == doc["baseline"]
        rows.append([f"{b}:" + (" (baseline)" if base else ""), f"{r['apdus_per_purchase']:g}",
                     f"{t['p50_us'] / 1000:.2f} ms", "" if base else fmt_ratio(r["ratio_to_sim_p50"]),
                     f"{io['p50_us'] / 1000:.3f} ms", "" if base else f"[bold]{fmt_ratio(r['card_io_ratio_to_sim_p50'])}",
                     f"{r['us_per_apdu_p50']:.0f} µs", f"{p['p50_us'] / 1000:.2f} ms"])
    console.print(table(
        f"readers: one rider purchase through Terminal.tap per backend (p50 of {doc['params']['taps']})",
        ["backend", "APDUs", "tap", "× sim", "card I/O", "× sim", "per APDU", "poll"], rows,
        caption=f"tap = Terminal.tap, journal on disk (its 2 fsync'd commits are in every backend alike); card I/O = "
                f"time inside the session's exchange() during that tap; poll = finding the card already in the "
                f"field. {doc['seconds']} s. {path}"))

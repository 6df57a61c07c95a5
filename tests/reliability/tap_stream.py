"""The child of tests/reliability/test_power_cut.py: a validator taking a stream of taps until it is killed.

A real Terminal on a real Journal file, a SimPsam in its SAM slot, a driver card and rider SimCards whose state
lives in JSON files (``SimCard.load``: each card writes its state before it answers, as a card writes EEPROM), a
clock that only moves forward. The work folder is shared with the parent, which made the cards and reads
everything back with plain ``json`` and ``sqlite3``:

    WORK/bus.journal          the validator's journal
    WORK/cards/*.json         rider cards (``rider*``) and the driver card (``driver.json``)
    WORK/errors.log           anything a stream did not expect (the parent fails the test on it)

What a stream does (``run``): open the journal (its integrity check runs here, after the last kill); give the
PSAM a terminal sequence past every one the journal holds (a real PSAM keeps its counter in EEPROM; this one
would start again at 1 and reuse numbers that TACs already cover); start the clock one second after the newest
record; sign the driver in if no shift is open; let the rider whose purchase was cut off (the newest grey
record) tap first, as a rider told nothing would; then ``taps`` taps: a random rider, or the same card again
(a retry or a double tap) a random 1-90 s later, and now and then the driver signing out and in. With
``settle`` it presents every rider once, two minutes apart, instead (the end of the test).

``die_at`` ("KIND:N") kills the process (SIGKILL, no clean-up) right after the N-th event of a kind:
``commit`` any journal write, ``grey`` a pending record written, ``done`` a purchase completed (also when a grey
record is settled), ``cancel`` a grey record cancelled, ``shift`` a shift record, ``debit`` the card has
debited (its state file says so) but its answer has not reached the terminal yet.

Two ways to run it, since starting Python and importing the validator costs ~0.2 s and the test kills hundreds
of streams:

    python tap_stream.py run '{"work": ..., "seed": ..., "taps": ..., "die_at": ...}'
    python tap_stream.py serve     # fork server: imports once, then per line on stdin
                                   #   {"work": ...}  -> fork a stream, print {"pid": PID}
                                   #   "reap"         -> wait for it, print {"status": exit code, -9 if killed}

The server reaps a stream only when told, so the parent's ``kill`` can never reach a recycled pid.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig

TERMINAL_ID = bytes.fromhex("010000000077")
FARE = 200
T0 = datetime(2024, 3, 5, 6, 0, 0, tzinfo=UTC)
FIRST_SEQUENCE = 1000
JOURNAL = "bus.journal"
# A stream that sees anything else has found a bug: the parent fails the test with errors.log.
RIDER_OUTCOMES = {Outcome.PAID, Outcome.ALREADY_PAID}


class Dying:
    """Counts events and SIGKILLs this process right after the chosen one."""

    def __init__(self, die_at: str | None):
        kind, _, n = (die_at or "").partition(":")
        self.kind, self.n = kind, int(n or 0)
        self.counts: dict[str, int] = {}

    def hit(self, kind: str) -> None:
        for k in (kind, "commit") if kind != "debit" else (kind,):
            self.counts[k] = self.counts.get(k, 0) + 1
            if k == self.kind and self.counts[k] == self.n:
                os.kill(os.getpid(), signal.SIGKILL)


class DyingJournal(Journal):
    """The real journal; each write is on disk (committed, fsynced) before ``hit`` may kill the process."""

    dying: Dying

    def begin_purchase(self, record):
        record = super().begin_purchase(record)
        self.dying.hit("grey")
        return record

    def complete_purchase(self, record):
        super().complete_purchase(record)
        self.dying.hit("done")

    def cancel(self, device_seq):
        super().cancel(device_seq)
        self.dying.hit("cancel")

    def append(self, record, **kw):
        record = super().append(record, **kw)
        self.dying.hit("shift")
        return record


class CardInField:
    """The card as the reader sees it; after a DEBIT the card carried out, the process may die before the answer."""

    def __init__(self, card: SimCard, dying: Dying):
        self.card, self.dying = card, dying

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.card.transmit(apdu)
        if apdu[1] == 0x54 and answer[-2:] == b"\x90\x00":
            self.dying.hit("debit")
        return answer


def journal_facts(path: Path) -> tuple[int, datetime]:
    """The highest terminal sequence any record holds and the newest record's time, read with plain SQL."""
    db = sqlite3.connect(path)
    try:
        seq, at = db.execute("SELECT max(json_extract(body, '$.terminal_seq')), "
                             "max(json_extract(body, '$.occurred_at')) FROM record").fetchone()
    finally:
        db.close()
    return (seq or FIRST_SEQUENCE - 1), (datetime.fromtimestamp(at, UTC) if at else T0)


def run(work: str, seed: int, taps: int, die_at: str | None = None, settle: bool = False) -> int:
    work_dir = Path(work)
    dying = Dying(die_at)
    DyingJournal.dying = dying
    journal = DyingJournal(work_dir / JOURNAL)  # integrity_check at open: after a kill, this is the test of it
    last_seq, newest = journal_facts(work_dir / JOURNAL)
    rnd = random.Random(seed)
    clock = [newest + timedelta(seconds=1)]
    psam = SimPsam(TERMINAL_ID, sequence=last_seq + 1)
    slot = SimReader()
    slot.present(psam)
    terminal = Terminal(TerminalConfig(device_id="bus0077", operator="citybus", route="r1", vehicle="v77"),
                        journal=journal, psam=slot.poll(), fares=FareTable(version=1, flat={"r1": FARE}),
                        clock=lambda: clock[0])
    riders = {p.stem: SimCard.load(p) for p in sorted((work_dir / "cards").glob("rider*.json"))}
    by_asn = {c.asn.hex(): c for c in riders.values()}
    driver = SimCard.load(work_dir / "cards" / "driver.json")
    reader = SimReader()

    def tap(card):
        reader.present(CardInField(card, dying))
        try:
            return terminal.tap(reader.poll())
        finally:
            reader.remove()

    def fail(what: str) -> int:
        with open(work_dir / "errors.log", "a", encoding="utf-8") as f:
            f.write(f"seed {seed} die_at {die_at} at {clock[0]:%H:%M:%S}: {what}\n")
        return 3

    def sign_in():
        result = tap(driver)
        if result.outcome is not Outcome.SHIFT_OPENED:
            raise AssertionError(f"driver sign-in came out {result.outcome.value}: {result.detail}")

    if terminal.shift is None:
        sign_in()
    if settle:  # every rider once more, two minutes apart: each grey record is completed or cancelled
        for card in riders.values():
            clock[0] += timedelta(minutes=2)
            if (result := tap(card)).outcome is not Outcome.PAID:
                return fail(f"settling rider {card.asn.hex()} came out {result.outcome.value}: {result.detail}")
        journal.close()
        return 0
    grey = journal.pending()
    previous = by_asn[grey[-1].card_asn] if grey else None
    first = previous is not None  # the rider whose tap was cut off tries again at once
    names = sorted(riders)
    for _ in range(taps):
        clock[0] += timedelta(seconds=rnd.choice((1, 3, 8, 20, 29, 31, 45, 90)))
        if not first and rnd.random() < 1 / 15:
            if tap(driver).outcome is not Outcome.SHIFT_CLOSED:
                return fail("driver sign-out did not close the shift")
            clock[0] += timedelta(seconds=5)
            sign_in()
            continue
        if not first and (previous is None or rnd.random() >= 0.3):
            previous = riders[rnd.choice(names)]
        first = False
        result = tap(previous)
        if result.outcome not in RIDER_OUTCOMES:
            return fail(f"rider {previous.asn.hex()} came out {result.outcome.value}: {result.detail}")
    journal.close()
    return 0


def serve() -> None:
    """Fork a stream per request; the server itself never opens the journal or a card."""
    out = sys.stdout
    pid = None
    for line in sys.stdin:
        request = json.loads(line)
        if request == "reap":
            _, status = os.waitpid(pid, 0)
            out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
            out.flush()
            continue
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request))
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


def _child(request: dict) -> int:
    try:
        sys.stdin.close()  # the server's requests are not the stream's
        return run(**request)
    except BaseException:  # noqa: BLE001 - whatever went wrong, the parent must read it, not lose it
        with open(Path(request["work"]) / "errors.log", "a", encoding="utf-8") as f:
            f.write(f"request {request}:\n{traceback.format_exc()}\n")
        return 2


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        sys.exit(_child(json.loads(sys.argv[2])))

"""`python -m bench tickets`: checking an e-ticket on the validator beside a bare Ed25519 verify, in one process.

Four timings, p50 / p99 of ``perf_counter_ns`` around one call each:

- ``ed25519_verify``: the floor, ``Ed25519PublicKey.verify`` of one ticket's signature over its signed bytes;
- ``decode_ticket``: wire.ticket.decode_ticket (length and alphabet checks, base32, the verify, the body's fields);
- ``tickets_verify``: validator.tickets.TicketChecker.verify, the offline check a scan runs before anything is
  written (decode, operator, deny list, validity, route);
- ``tickets_scan``: TicketChecker.scan of a fresh ticket each time, accepted: the check plus the ``ticket_use``
  record and the used-ticket count in one fsync'd journal commit (WAL, synchronous=FULL) on this machine's disk.

The tickets are single rides on the bus's route, signed with a key made for the run; the terminal is a real
validator Terminal with a simulated PSAM and a driver signed in. Nothing is asserted; results in
bench/results/tickets.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import fmt_ratio, fmt_us, ratio, summary_us, table, write_result
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from validator.tickets import TicketChecker
from wire import ticket as wt

ROUTE, OPERATOR = "r12", "citybus"


def _timed(fn, args, samples: int) -> list[int]:
    out = []
    for i in range(samples):
        a = args[i % len(args)]
        t = time.perf_counter_ns()
        fn(a)
        out.append(time.perf_counter_ns() - t)
    return out


def _terminal(folder: Path, now: list[datetime]) -> tuple[Terminal, Journal]:
    journal = Journal(folder / "journal.db", budget_bytes=None)
    slot = SimReader()
    slot.present(SimPsam(bytes.fromhex("010000000042"), keys=TEST_ISSUER_KEYS))
    terminal = Terminal(TerminalConfig("bench_t", OPERATOR, ROUTE, "v7"), journal=journal, psam=slot.poll(),
                        fares=FareTable(1, {ROUTE: 200}), clock=lambda: now[0])
    reader = SimReader()
    reader.present(SimCard(bytes.fromhex("99990000000000000001"), CardType.DRIVER, 0, staff_no="D1",
                           start=date.today() - timedelta(days=9), end=date.today() + timedelta(days=9)))
    assert terminal.tap(reader.poll()).outcome is Outcome.SHIFT_OPENED
    return terminal, journal


def run(*, verifies: int = 5000, scans: int = 1000, console, results_dir) -> dict:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    now = [datetime.now(UTC).replace(microsecond=0)]
    start, end = now[0] - timedelta(hours=1), now[0] + timedelta(hours=23)
    n_tokens = max(scans, 200)
    tokens = [wt.encode_ticket(wt.Ticket(ticket_id=10_000 + i, operator=OPERATOR, product=wt.ProductKind.SINGLE_RIDE,
                                         valid_from=start, valid_to=end, routes=(ROUTE, "r7"), key_id=1), key)
              for i in range(n_tokens)]
    keys = {1: wt.public_key_bytes(key)}
    signed = []  # the exact bytes and signature decode_ticket verifies, for the bare floor
    for text in tokens[:200]:
        import base64

        data = text[len(wt.PREFIX):]
        raw = base64.b32decode(data + "=" * (-len(data) % 8))
        signed.append((wt.SIGNING_CONTEXT + raw[:-wt.SIG_LEN], raw[-wt.SIG_LEN:]))
    with tempfile.TemporaryDirectory(prefix="bench_tickets_") as folder:
        terminal, journal = _terminal(Path(folder), now)
        terminal.replace_ticket_params(wt.TicketParams(keys, b"p" * 32, frozenset(range(1, 1000))))
        checker = TicketChecker(terminal)
        for text in tokens[:50]:  # warm-up
            checker.verify(text, now[0])
        timing = {
            "ed25519_verify": summary_us(_timed(lambda m: public.verify(m[1], m[0]), signed, verifies)),
            "decode_ticket": summary_us(_timed(lambda t: wt.decode_ticket(t, keys), tokens[:200], verifies)),
            "tickets_verify": summary_us(_timed(lambda t: checker.verify(t, now[0]), tokens[:200], verifies)),
        }
        outcomes = []

        def scan(text):
            outcomes.append(checker.scan(text).outcome)

        timing["tickets_scan"] = summary_us(_timed(scan, tokens, scans))
        journal.close()
    accepted = sum(o is Outcome.TICKET_OK for o in outcomes)
    floor = timing["ed25519_verify"]["p50_us"]
    rows = [[name, fmt_us(t["p50_us"]), fmt_us(t["p99_us"]), fmt_ratio(ratio(t["p50_us"], floor))]
            for name, t in timing.items()]
    console.print(table("tickets: checking a QR ticket on the validator beside a bare Ed25519 verify",
                        ["what", "p50", "p99", "p50 / bare verify"], rows,
                        caption=f"{verifies} verifies, {scans} accepted scans ({accepted} accepted; each an fsync'd "
                                f"journal commit); token {len(tokens[0])} characters"))
    doc = {"verifies": verifies, "scans": scans, "accepted": accepted, "token_chars": len(tokens[0]),
           "timing": timing, "ratios_p50_to_bare_verify": {k: ratio(v["p50_us"], floor) for k, v in timing.items()},
           "ratios_p99_to_bare_verify": {k: ratio(v["p99_us"], timing["ed25519_verify"]["p99_us"])
                                          for k, v in timing.items()}}
    path = write_result("tickets", doc, results_dir)
    console.print(f"JSON: {path}")
    return json.loads(json.dumps(doc))

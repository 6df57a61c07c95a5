"""A validator offline for a whole simulated service day, then back: every record arrives exactly once.

The real parts: a Terminal (SimReader in front, SimPsam in its SAM slot) on a real Journal, the real Uplink (codec v2
MAC'd with the device key, one batch in flight, journal as the outbox), the real IngestConsumer storing into a fresh
PostgreSQL database through a private Mosquitto running the files ``farebox broker config`` writes (device and
ingest logins, ACL, persistence). The bus uploads a few taps, loses its link, takes >= 20,000
taps through one service day (clock moved per tap, 03:05 to 01:xx local the next night), and comes back.

Afterwards: the journal's backlog is 0; rows stored == the journal's records (same keys, each once); every device
sequence 1..N is there; the day's settlement (clearing, through backoffice.settle) equals what the cards lost,
counted on the cards themselves (start balance - balance now, and their transaction counters).

Why the journal lives on tmpfs (/dev/shm when there is one): each tap fsyncs twice (grey record, completed record),
~7 ms a tap on these disks, so 20,000 taps would take minutes. What this test is about is the link; the journal's
durability under power cuts is tests/reliability/test_power_cut.py's job.

Why a private broker and not the machine's: the generated config sets ``set_tcp_nodelay``; the machine's Mosquitto
leaves Nagle on, and each of the ~400 batch round trips (batch up, ack down, one batch in flight) then waits on
delayed ACKs: measured 54 s to drain instead of 16 s.

``FAREBOX_SOAK=1`` (``make soak``): 100,000 taps (five days' worth on one bus) instead of 20,000.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from simbus import TERMINAL, Bus
from sqlalchemy import text
from test_broker_restart import PrivateBroker, fast_dir, register

from backoffice.db import make_engine
from backoffice.ingest_consumer import IngestConsumer
from backoffice.settle import settle
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from validator.messages import Outcome
from wire.devicekeys import TEST_DEVICE_MASTER

pytestmark = pytest.mark.slow
SOAK = os.environ.get("FAREBOX_SOAK") == "1"
TAPS = 100_000 if SOAK else 20_000
RIDERS = 400
START_BALANCE = 1_000_000  # fen: 400 cards x 250 rides x 200 fen stay far inside it even in the soak
FARE = 200  # simbus's flat fare on r1
# 03:05 Asia/Shanghai on 2026-05-01: the service day (cut-off 03:00) starts here; TAPS taps fit before the next
# day's cut-off when 20,000 of them are spread over 22 hours.
DAY = date(2026, 5, 1)
T0 = datetime(2026, 4, 30, 19, 5, tzinfo=UTC)
STEP = timedelta(seconds=22 * 3600 / 20_000)  # 3.96 s between taps; the soak goes on over the following days


def test_a_day_offline_arrives_exactly_once(tmp_path, pg_schema_url, uid):
    operator, device = f"op_{uid}", f"out_{uid}"
    engine = make_engine(pg_schema_url)
    register(engine, operator, [(device, TERMINAL.hex())])
    broker = PrivateBroker(tmp_path, [(device, operator)]).start()
    work = fast_dir(tmp_path)
    bus = Bus(work, broker.target(device), operator, device)
    bus.clock_now = T0
    # Cards of this test only (simbus's 20 are shared by every simbus test): 400 riders, so a card comes back
    # every ~26 minutes, far outside the 30 s double-tap window, and each ride is a charged purchase.
    riders = [SimCard(bytes.fromhex(f"97{k:018d}"), CardType.ADULT, START_BALANCE,
                      start=date(2025, 1, 1), end=date(2028, 12, 31)) for k in range(1, RIDERS + 1)]
    consumer = IngestConsumer(engine, broker.target("ingest"), keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                              client_id=f"ingest_{uid}", operator=operator)
    consumer.start()
    timings: dict[str, float] = {}
    try:
        assert consumer.wait_subscribed(10), "ingest did not subscribe"
        bus.uplink.start()

        def tap(card, at) -> Outcome:
            bus.clock_now = at
            bus.reader.present(card)
            try:
                return bus.terminal.tap(bus.reader.poll()).outcome
            finally:
                bus.reader.remove()

        assert tap(bus.driver, T0) is Outcome.SHIFT_OPENED
        for k in range(10):  # online for a moment: these go up at once
            assert tap(riders[k], T0 + (k + 1) * STEP) is Outcome.PAID
            bus.uplink.notify(bus.clock_now)
        assert bus.uplink.wait_drained(30), "the first taps were not acknowledged while online"
        online_before = len(bus.journal.records_since(0))

        bus.uplink.go_offline()
        t = time.monotonic()
        for i in range(10, TAPS):
            outcome = tap(riders[i % RIDERS], T0 + (i + 1) * STEP)
            assert outcome is Outcome.PAID, f"tap {i}: {outcome}"
        timings["taps_s"] = time.monotonic() - t
        offline = bus.journal.backlog()
        assert offline == TAPS - 10  # nothing left while the link was down

        t = time.monotonic()
        bus.uplink.go_online()
        bus.uplink.notify(bus.clock_now)
        assert bus.uplink.wait_drained(60 + TAPS / 200), f"backlog {bus.journal.backlog()} after reconnecting"
        timings["drain_s"] = time.monotonic() - t
    finally:
        bus.uplink.stop()
        consumer.stop()
        broker.stop()

    written = bus.journal.records_since(0)
    assert len(written) == online_before + offline == TAPS + 1  # the taps and the driver's sign-in
    assert bus.journal.backlog() == 0
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT device_id, device_seq, kind, amount, card_asn, card_ttc FROM tap")).all()
        quarantined = conn.execute(text("SELECT count(*) FROM quarantine")).scalar_one()
        settlement = settle(conn, operator=operator, day=DAY).settlement if not SOAK else None
    engine.dispose()
    keys = [(r.device_id, r.device_seq) for r in rows]
    assert len(keys) == len(set(keys)) == len(written)  # each record once, none twice
    assert set(keys) == {(r.device_id, r.device_seq) for r in written}
    assert sorted(s for _, s in keys) == list(range(1, len(written) + 1))  # no gap in the device sequence
    assert quarantined == 0
    # Independent of the database and of the journal: what the cards themselves say they paid.
    lost = sum(START_BALANCE - c.balance for c in riders)
    debits = sum(c.ttc for c in riders)
    assert (debits, lost) == (TAPS, TAPS * FARE)
    assert sum(r.amount for r in rows if r.kind == "purchase") == lost
    assert {(r.card_asn, r.card_ttc) for r in rows if r.kind == "purchase"} == \
        {(c.asn.hex(), n) for c in riders for n in range(c.ttc)}
    if settlement is not None:  # the soak's taps run over several service days
        assert (settlement.taps, settlement.amount) == (debits, lost)
        assert settlement.totals_agree()
    bus.journal.close()
    if work != tmp_path:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\noutage: {TAPS} taps offline in {timings['taps_s']:.1f} s, drained in {timings['drain_s']:.1f} s "
          f"({bus.uplink.batches_sent} batches, {bus.uplink.resends} resends)")

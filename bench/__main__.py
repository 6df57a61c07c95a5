"""`python -m bench [tap|ingest] [--quick] ...`: run farebox's benchmarks, each beside its baseline.

Each benchmark prints a table (p50 / p99 or rates, and the ratio to the baseline measured in the same run) and writes
``bench/results/<name>.json``. Nothing is asserted: these machines are shared, only ratios hold from run to run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bench.common import RESULTS_DIR, console

QUICK = {"tap_taps": 600, "tap_warmup": 50, "disk_samples": 200, "taps": 2000, "validators": 5, "rounds": 1,
         "reader_taps": 20}
FULL = {"tap_taps": 10_000, "tap_warmup": 100, "disk_samples": 1000, "taps": 50_000, "validators": 100, "rounds": 3,
        "reader_taps": 200}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="farebox benchmarks. tap: time per rider tap through the real validator Terminal beside the "
                    "floor (the purchase APDUs and two fsync'd commits). ingest: taps/s from MQTT into the "
                    "database through the IngestConsumer beside a bare subscriber writing with COPY/executemany. "
                    "readers: one purchase over pcsc:, nfc: and rfid24: beside the in-process sim: reader. "
                    "Results: bench/results/<name>.json.",
        epilog="Environment: FAREBOX_BENCH_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test; "
               "a fresh database is created beside it and dropped), FAREBOX_BENCH_MQTT_URL (default "
               "mqtt://127.0.0.1:1883).")
    p.add_argument("which", nargs="?",
                   choices=["all", "tap", "ingest", "denylist", "readers", "wire", "report", "fleet", "clearing",
                            "tickets", "shop", "city", "cluster"],
                   default="all", help="which benchmark to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small run for smoke tests (tap {QUICK['tap_taps']} taps; ingest {QUICK['taps']} taps "
                        f"from {QUICK['validators']} validators, 1 round)")
    g = p.add_argument_group("tap")
    g.add_argument("--tap-taps", type=int, default=None, metavar="N",
                   help=f"timed rider taps (default {FULL['tap_taps']})")
    g = p.add_argument_group("readers")
    g.add_argument("--reader-taps", type=int, default=None, metavar="N",
                   help=f"timed purchases per reader backend (default {FULL['reader_taps']})")
    g = p.add_argument_group("ingest")
    g.add_argument("--taps", type=int, default=None, metavar="N",
                   help=f"taps per round (default {FULL['taps']})")
    g.add_argument("--validators", type=int, default=None, metavar="N",
                   help=f"simulated validators publishing (default {FULL['validators']})")
    g.add_argument("--batch", type=int, default=50, metavar="N", help="records per batch (default 50, as the "
                                                                      "uplink sends)")
    g.add_argument("--rounds", type=int, default=None, metavar="N",
                   help=f"rounds per back end, reported as the median (default {FULL['rounds']})")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--sqlite", action="store_true", help="only SQLite + the embedded amqtt broker")
    which.add_argument("--postgres", action="store_true", help="only PostgreSQL + Mosquitto")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, metavar="DIR",
                   help="where the JSON goes (default bench/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = console()
    status = 0
    if args.which in ("all", "tap"):
        from bench import tap

        tap.run(taps=args.tap_taps or preset["tap_taps"], warmup=preset["tap_warmup"],
                disk_samples=preset["disk_samples"], console=out, results_dir=args.results)
    if args.which in ("all", "readers"):
        from bench import readers

        readers.run(taps=args.reader_taps or preset["reader_taps"], console=out, results_dir=args.results)
    if args.which in ("all", "ingest"):
        from bench import ingest

        backends = ("sqlite",) if args.sqlite else ("postgres",) if args.postgres else ("postgres", "sqlite")
        doc = ingest.run(taps=args.taps or preset["taps"], validators=args.validators or preset["validators"],
                         batch=args.batch, rounds=args.rounds or preset["rounds"], backends=backends, console=out,
                         results_dir=args.results)
        if any(not p["complete"] for r in doc["results"] for ps in r["phases"].values() for p in ps):
            out.print("[red]some ingest phases did not see all their rows before the timeout (see the JSON)")
            status = 1
    if args.which in ("all", "denylist"):  # a million cards; --quick: 50,000 cards, a 2,000-card delta
        from bench import denylist

        denylist.run(**({"n": 50_000, "k": 2_000, "lookups": 5_000} if args.quick else {}), console=out,
                     results_dir=args.results)
    if args.which in ("all", "wire"):  # bytes a tap, v2 beside JSON; --quick: 20 batches a size, 200 timings
        from bench import wire

        wire.run(**({"batches": 20, "samples": 200} if args.quick else {}), console=out, results_dir=args.results)
    if args.which in ("all", "report"):  # a month's PDF, 300 routes / 2,000 vehicles / 3,000 drivers; --quick: 1/10
        from bench import report

        report.run(**({"routes": 30, "vehicles": 200, "drivers": 300, "rounds": 1} if args.quick else {}),
                   console=out, results_dir=args.results)
    if args.which in ("all", "fleet"):  # validators on one broker: N = 100, 250, 500, 1000, 2000 until a limit;
        from bench import fleet  # --quick: 10 and 25 validators, 6 s phases

        fleet.run(**({"steps": fleet.QUICK_STEPS, "seconds": 6, "interval": 2, "heartbeat": 3, "grace": 10}
                     if args.quick else {}), console=out, results_dir=args.results)
    if args.which in ("all", "clearing"):  # a day of 10 M taps cleared beside a bare group-by; --quick: 200,000
        from bench import clearing

        clearing.run(taps=clearing.QUICK_TAPS if args.quick else clearing.TAPS, console=out,
                     results_dir=args.results)
    if args.which in ("all", "tickets"):  # ticket check beside a bare Ed25519 verify; --quick: 500 / 200
        from bench import tickets

        tickets.run(**({"verifies": 500, "scans": 200} if args.quick else {}), console=out, results_dir=args.results)
    if args.which in ("all", "shop"):  # HTTP ticket sales, 16 buyers, beside bare INSERTs; --quick: 60 orders, 4 buyers
        from bench import shop

        shop.run(**({"orders": 60, "buyers": 4} if args.quick else {}), console=out, results_dir=args.results)
    if args.which == "city":  # the nightly path at 1 M / 10 M taps in PostgreSQL; --quick: 100,000 once (not in "all")
        from bench import city

        city.run(**({"sizes": city.QUICK_SIZES, "repeat": 1} if args.quick else {}), console=out,
                 results_dir=args.results)
    if args.which == "cluster":  # ack p99 through a 3-node NATS cluster beside one Mosquitto (not in "all")
        from bench import cluster

        # 500 by default: 2,000 real validators saturate a 2-core machine and the cluster did not carry them here
        # (`python -m bench.cluster 2000 500` asks for both).
        cluster.run(**({"validators": 20, "taps": 2, "rounds": 1} if args.quick else {"validators": [500]}),
                    out=args.results / "cluster.json")
    return status


if __name__ == "__main__":
    sys.exit(main())

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

QUICK = {"tap_taps": 600, "tap_warmup": 50, "disk_samples": 200, "taps": 2000, "validators": 5, "rounds": 1}
FULL = {"tap_taps": 5000, "tap_warmup": 100, "disk_samples": 1000, "taps": 20_000, "validators": 20, "rounds": 3}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="farebox benchmarks. tap: time per rider tap through the real validator Terminal beside the "
                    "floor (the purchase APDUs and two fsync'd commits). ingest: taps/s from MQTT into the "
                    "database through the IngestConsumer beside a bare subscriber writing with COPY/executemany. "
                    "Results: bench/results/<name>.json.",
        epilog="Environment: FAREBOX_BENCH_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test; "
               "a fresh database is created beside it and dropped), FAREBOX_BENCH_MQTT_URL (default "
               "mqtt://127.0.0.1:1883).")
    p.add_argument("which", nargs="?", choices=["all", "tap", "ingest"], default="all",
                   help="which benchmark to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small run for smoke tests (tap {QUICK['tap_taps']} taps; ingest {QUICK['taps']} taps "
                        f"from {QUICK['validators']} validators, 1 round)")
    g = p.add_argument_group("tap")
    g.add_argument("--tap-taps", type=int, default=None, metavar="N",
                   help=f"timed rider taps (default {FULL['tap_taps']})")
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
    if args.which in ("all", "ingest"):
        from bench import ingest

        backends = ("sqlite",) if args.sqlite else ("postgres",) if args.postgres else ("postgres", "sqlite")
        doc = ingest.run(taps=args.taps or preset["taps"], validators=args.validators or preset["validators"],
                         batch=args.batch, rounds=args.rounds or preset["rounds"], backends=backends, console=out,
                         results_dir=args.results)
        if any(not p["complete"] for r in doc["results"] for ps in r["phases"].values() for p in ps):
            out.print("[red]some ingest phases did not see all their rows before the timeout (see the JSON)")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

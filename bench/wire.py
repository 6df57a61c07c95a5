"""`python -m bench wire`: bytes per tap on the air in format v2 (binary, MAC'd) beside v1 JSON and JSON + zlib of
the same taps, and encode / decode time per batch.

The taps are what a bus makes (``typical_bus``): one route, vehicle, driver, shift and PSAM; consecutive device
and terminal sequences; taps 2-40 s apart; random card ASNs and TACs; fares 0..500 fen (adults pay the full fare,
students half, the elderly nothing, so a share of records carries full_fare apart); card counters 0..3000;
balances 0..500 yuan; one card in four SM4. Batches of 50 (what the uplink sends), 10 and 1, from a fixed seed, many
batches each; bytes are exact (no timing noise); times are p50 / p99 of ``perf_counter_ns`` around one call.
Goal (issue 4): <= 32 bytes a tap in a batch of 50, MAC included.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from datetime import UTC, datetime

from bench.common import fmt_ratio, fmt_us, ratio, summary_us, table, write_result
from wire import codec
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord

GOAL_BYTES_PER_TAP = 32
SIZES = (50, 10, 1)
DEVICE = "bus0042"


def typical_bus(n: int, rnd: random.Random, first_seq: int = 10_000, t0: int = 1_709_623_800) -> list[TapRecord]:
    t, out = t0, []
    for i in range(n):
        t += rnd.randint(2, 40)
        card_type = rnd.choices([1, 2, 3], weights=[70, 20, 10])[0]  # adult, student, elderly
        full = rnd.randint(0, 500)
        amount = full if card_type == 1 else full // 2 if card_type == 2 else 0
        out.append(TapRecord(
            device_id=DEVICE, device_seq=first_seq + i, kind=RecordKind.PURCHASE,
            occurred_at=datetime.fromtimestamp(t, tz=UTC), operator="citybus", route="r12", vehicle="v7031",
            driver="D1001", shift_no=3, card_asn=rnd.randbytes(10).hex(), card_type=card_type,
            card_ttc=rnd.randint(0, 3000), amount=amount, balance_after=rnd.randint(0, 50_000),
            terminal_id="010000000042", terminal_seq=70_000 + i, tac=rnd.randbytes(4).hex(), tx_type=0x09,
            algorithm=0x04 if rnd.random() < 0.25 else 0x00, full_fare=full))
    return out


def _timed(fn, arg, samples: int) -> list[int]:
    out = []
    for _ in range(samples):
        t = time.perf_counter_ns()
        fn(arg)
        out.append(time.perf_counter_ns() - t)
    return out


def run(*, batches: int = 200, samples: int = 2000, console, results_dir) -> dict:
    key = mac_key(TEST_DEVICE_MASTER, DEVICE)
    rnd = random.Random(4)
    rows, results = [], []
    for size in SIZES:
        sets = [typical_bus(size, rnd, first_seq=10_000 + k * size) for k in range(batches)]
        v2 = [codec.encode_batch(r, key=key) for r in sets]
        js = [codec.encode_batch_json(r) for r in sets]
        jz = [zlib.compress(p, 9) for p in js]
        for r, p in zip(sets, v2, strict=True):  # the figures are only worth something if it round-trips
            assert codec.decode_batch(p, key=key).records == tuple(r)
        taps = size * batches
        per_tap = {name: round(sum(map(len, ps)) / taps, 2) for name, ps in (("v2", v2), ("json", js),
                                                                              ("json_zlib", jz))}
        one = sets[0]
        timing = {
            "v2_encode": summary_us(_timed(lambda r: codec.encode_batch(r, key=key), one, samples)),
            "v2_decode": summary_us(_timed(lambda p: codec.decode_batch(p, key=key), v2[0], samples)),
            "json_encode": summary_us(_timed(codec.encode_batch_json, one, samples)),
            "json_decode": summary_us(_timed(codec.decode_batch, js[0], samples)),
        }
        results.append({"batch": size, "batches": batches, "bytes_per_tap": per_tap,
                        "v2_vs_json": ratio(per_tap["v2"], per_tap["json"]),
                        "v2_vs_json_zlib": ratio(per_tap["v2"], per_tap["json_zlib"]),
                        "goal_met": per_tap["v2"] <= GOAL_BYTES_PER_TAP if size == 50 else None,
                        "timing_per_batch": timing})
        rows.append([str(size), f"{per_tap['v2']:.2f}", f"{per_tap['json']:.1f}", f"{per_tap['json_zlib']:.1f}",
                     fmt_ratio(ratio(per_tap["v2"], per_tap["json"])),
                     fmt_us(timing["v2_encode"]["p50_us"]), fmt_us(timing["json_encode"]["p50_us"]),
                     fmt_us(timing["v2_decode"]["p50_us"]), fmt_us(timing["json_decode"]["p50_us"])])
    fifty = results[0]["bytes_per_tap"]["v2"]
    console.print(table(
        "wire: bytes a tap on the air (v2 binary + 12-byte MAC beside v1 JSON and JSON+zlib of the same taps)",
        ["batch", "v2 B/tap", "JSON B/tap", "JSON+zlib B/tap", "v2/JSON", "v2 enc p50", "JSON enc p50",
         "v2 dec p50", "JSON dec p50"], rows,
        caption=f"goal: <= {GOAL_BYTES_PER_TAP} B/tap in a batch of 50: {fifty:.2f} "
                f"({'met' if fifty <= GOAL_BYTES_PER_TAP else 'NOT met'}); {batches} batches of typical "
                "purchases each; times per batch (decode includes the MAC check)"))
    doc = {"goal_bytes_per_tap_batch_50": GOAL_BYTES_PER_TAP, "mac_bytes": codec.MAC_LEN, "results": results,
           "sample_v2_batch_50_hex": codec.encode_batch(typical_bus(50, random.Random(0)), key=key).hex()}
    path = write_result("wire", doc, results_dir)
    console.print(f"JSON: {path}")
    return json.loads(json.dumps(doc))


"""`python -m bench denylist`: the validator's deny list (format 2, mapped) beside a plain Python ``set`` of
the same cards, measured in the same process.

Cards: ``n`` ASNs under three 2-byte issuer/city prefixes with random 8-byte suffixes (a city's cards share
their prefix), from a fixed seed. Measured:

- **file**: bytes of the format 2 file, and of the same list in format 1 (10 bytes a card) for comparison.
- **memory**: for the deny list, the resident pages of its mapping (``Rss`` of the mapping in
  ``/proc/self/smaps``, after the load's checks and the lookups have touched it) plus what the load allocated
  on the Python heap (tracemalloc: views, bucket index); also the process ``VmRSS`` before and after. For the
  set: tracemalloc of building it from the file's cards (the set and its 10-byte ``bytes`` objects).
- **lookup**: perf_counter_ns around one ``hex in deny_list`` (the terminal's call, hex string in) and one
  ``bytes.fromhex(hex) in the_set``, for listed and unlisted cards, in alternating blocks; p50 / p99.
- **delta**: a ``k``-card delta (half adds, half removes): ``apply_delta`` to bytes in memory, and ``swap``
  (apply, write temp + fsync + rename + fsync folder, map and check the new file); beside it the set made
  current the same two ways (a copy updated, so that the old one stays readable as the mapped list does; and
  updated in place).
- **load**: ``DenyList.load`` with every check, beside building the set from the file's bytes.
"""

from __future__ import annotations

import gc
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.common import fmt_ratio, ratio, summary_us, table, write_result
from blacklist.delta import Delta, apply_delta, diff, swap
from blacklist.denylist import DenyList, write_atomic

PREFIXES = [b"\x31\x00", b"\x31\x01", b"\x42\x00"]
GOALS = {"file_mb": 10.0, "resident_mb": 10.0, "lookup_p50_us": 5.0, "delta_apply_ms": 200.0}
MB = 1_000_000


def make_cards(n: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    cards: set[bytes] = set()
    while len(cards) < n:
        cards.add(rnd.choice(PREFIXES) + rnd.randbytes(8))
    return sorted(cards)


def mapping_rss(path: Path) -> int:
    """Resident bytes of every mapping of ``path`` in this process."""
    total, inside = 0, False
    target = str(path.resolve())
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                inside = len(head) == 6 and head[5].strip() == target
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def vm_rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_lookups(deny: DenyList, the_set: set, keys: list[str], block: int = 500):
    """Per-lookup ns for the deny list and the set, alternating blocks so both see the same machine."""
    ours, theirs = [], []
    clock, fromhex = time.perf_counter_ns, bytes.fromhex
    for start in range(0, len(keys), block):
        chunk = keys[start:start + block]
        for h in chunk:
            t0 = clock()
            h in deny  # noqa: B015 - the lookup is what is timed
            ours.append(clock() - t0)
        for h in chunk:
            t0 = clock()
            fromhex(h) in the_set  # noqa: B015
            theirs.append(clock() - t0)
    return ours, theirs


def _median_ms(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2), out


def run(*, n: int = 1_000_000, k: int = 10_000, lookups: int = 20_000, rounds: int = 3, seed: int = 7,
        console=None, results_dir=None) -> dict:
    started = time.monotonic()
    rnd = random.Random(seed + 1)
    cards = make_cards(n, seed)
    with tempfile.TemporaryDirectory(prefix="farebox_bench_denylist_") as tmp:
        work = Path(tmp)
        path2, path1 = work / "denylist.bin", work / "denylist-format1.bin"
        write_atomic(path2, cards, 1)
        write_atomic(path1, cards, 1, fmt=1)
        size2, size1 = path2.stat().st_size, path1.stat().st_size
        body1 = path1.read_bytes()[13:]
        path1.unlink()

        # Load: ours with every check, the set from the same cards' bytes (10-byte slices of the format 1
        # body).
        load_ms, _ = _median_ms(lambda: DenyList.load(path2), rounds)
        set_load_ms, _ = _median_ms(lambda b=body1: _set_of(b), rounds)

        # Memory: tracemalloc for the Python heap, smaps for the mapping, VmRSS around the whole thing.
        gc.collect()
        rss_before = vm_rss()
        tracemalloc.start()
        deny = DenyList.load(path2)
        heap_ours = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        tracemalloc.start()
        the_set = _set_of(body1)
        heap_set = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del body1

        hits = [c.hex() for c in rnd.sample(cards, min(lookups, n))]
        misses = []
        while len(misses) < lookups:
            c = rnd.choice(PREFIXES) + rnd.randbytes(8)
            if c not in the_set:
                misses.append(c.hex())
        timed_lookups(deny, the_set, hits[:1000] + misses[:1000])  # warm-up, not counted
        hit_ours, hit_set = timed_lookups(deny, the_set, hits)
        miss_ours, miss_set = timed_lookups(deny, the_set, misses)
        assert all(h in deny for h in hits[:1000]) and not any(m in deny for m in misses[:1000])
        mapped = mapping_rss(path2)
        rss_after = vm_rss()

        # Deltas: k/2 listed cards leave, k/2 new ones come; alternately forward and back, so every round
        # moves on.
        removes = tuple(rnd.sample(cards, k // 2))
        adds = set()
        while len(adds) < k // 2:
            c = rnd.choice(PREFIXES) + rnd.randbytes(8)
            if c not in the_set:
                adds.add(c)
        adds = tuple(adds)
        apply_ms, blob = _median_ms(lambda: apply_delta(deny, Delta(1, 2, adds, removes)), rounds)
        assert len(blob) == size2 + 8 * (len(adds) - len(removes))
        current, swaps = deny, []
        for i in range(rounds * 2):
            forward = i % 2 == 0
            step = Delta(current.version, current.version + 1, adds if forward else removes,
                         removes if forward else adds)
            t0 = time.perf_counter()
            current = swap(path2, current, step)
            swaps.append((time.perf_counter() - t0) * 1000)
        swap_ms = round(statistics.median(swaps), 2)
        assert deny.version == 1 and len(deny) == n and hits[0] in deny  # the old mapping still answers
        set_copy_ms, _ = _median_ms(lambda: _set_copy_update(the_set, adds, removes), rounds)
        set_inplace = []
        for i in range(rounds * 2):
            t0 = time.perf_counter()
            the_set.difference_update(removes if i % 2 == 0 else adds)
            the_set.update(adds if i % 2 == 0 else removes)
            set_inplace.append((time.perf_counter() - t0) * 1000)
        set_inplace_ms = round(statistics.median(set_inplace), 2)
        applied = DenyList.from_bytes(blob)  # version 2: the k-card delta away from the list loaded
        diff_ms, delta = _median_ms(lambda: diff(deny, applied), rounds)
        assert len(delta) == len(adds) + len(removes)

    resident = mapped + heap_ours
    h_o, h_s, m_o, m_s = map(summary_us, (hit_ours, hit_set, miss_ours, miss_set))
    doc = {
        "params": {"cards": n, "delta_cards": k, "lookups": lookups, "rounds": rounds, "seed": seed,
                   "prefixes": [p.hex() for p in PREFIXES]},
        "goals": GOALS,
        "file_bytes": {"format2": size2, "format1": size1},
        "memory_bytes": {"deny_list_resident": resident, "deny_list_mapping_rss": mapped,
                         "deny_list_python_heap": heap_ours, "set_python_heap": heap_set,
                         "vm_rss_before": rss_before, "vm_rss_after": rss_after},
        "lookup": {"hit": {"deny_list": h_o, "set": h_s}, "miss": {"deny_list": m_o, "set": m_s}},
        "delta_ms": {"apply_in_memory": apply_ms, "swap_to_disk": swap_ms, "set_copy_and_update": set_copy_ms,
                     "set_update_in_place": set_inplace_ms, "diff_back_office": diff_ms,
                     "diff_found_cards": len(delta)},
        "load_ms": {"deny_list_checked": load_ms, "set_from_file_bytes": set_load_ms},
        "ratios": {"memory_set_to_deny_list": ratio(heap_set, resident),
                   "lookup_hit_p50_deny_list_to_set": ratio(h_o["p50_us"], h_s["p50_us"]),
                   "lookup_miss_p50_deny_list_to_set": ratio(m_o["p50_us"], m_s["p50_us"]),
                   "swap_to_set_copy_update": ratio(swap_ms, set_copy_ms)},
        "meets_goals": {"file": size2 <= GOALS["file_mb"] * MB,
                        "resident": resident <= GOALS["resident_mb"] * MB,
                        "lookup": max(h_o["p50_us"], m_o["p50_us"]) <= GOALS["lookup_p50_us"],
                        "delta_apply": apply_ms <= GOALS["delta_apply_ms"],
                        "delta_swap": swap_ms <= GOALS["delta_apply_ms"]},
        "seconds": round(time.monotonic() - started, 1),
    }
    path = write_result("denylist", doc, **({"results_dir": results_dir} if results_dir else {}))
    if console is not None:
        print_result(console, doc, path)
    return doc


def _set_of(body1: bytes) -> set[bytes]:
    """The baseline as a validator would hold it: one 10-byte ``bytes`` per card, in a set."""
    return {body1[i:i + 10] for i in range(0, len(body1), 10)}


def _set_copy_update(the_set: set, adds, removes) -> set:
    new = set(the_set)
    new.difference_update(removes)
    new.update(adds)
    return new


def print_result(console, doc: dict, path) -> None:
    f, m, d, ld, g = doc["file_bytes"], doc["memory_bytes"], doc["delta_ms"], doc["load_ms"], doc["goals"]
    hit, miss = doc["lookup"]["hit"], doc["lookup"]["miss"]
    n, k = doc["params"]["cards"], doc["params"]["delta_cards"]

    def mb(b):
        return f"{b / MB:.2f} MB"

    def ms(x):
        return f"{x:.1f} ms"

    def lookup_row(what, key, stat, goal):
        return [what, f"{key['deny_list'][stat]} µs", f"{key['set'][stat]} µs",
                fmt_ratio(ratio(key["deny_list"][stat], key["set"][stat])), goal]

    lookup_goal = f"<= {g['lookup_p50_us']:.0f} µs"
    delta_goal = f"<= {g['delta_apply_ms']:.0f} ms"
    met = [name for name, ok in doc["meets_goals"].items() if ok]
    missed = [name for name, ok in doc["meets_goals"].items() if not ok]
    rows = [
        ["file", mb(f["format2"]), f"(format 1: {mb(f['format1'])})",
         fmt_ratio(ratio(f["format2"], f["format1"])), f"<= {g['file_mb']:.0f} MB"],
        ["resident memory", mb(m["deny_list_resident"]), mb(m["set_python_heap"]),
         fmt_ratio(ratio(m["deny_list_resident"], m["set_python_heap"])), f"<= {g['resident_mb']:.0f} MB"],
        lookup_row("lookup, listed card p50", hit, "p50_us", lookup_goal),
        lookup_row("lookup, unlisted card p50", miss, "p50_us", lookup_goal),
        lookup_row("lookup, listed card p99", hit, "p99_us", ""),
        lookup_row("lookup, unlisted card p99", miss, "p99_us", ""),
        [f"delta of {k}: apply in memory", ms(d["apply_in_memory"]),
         f"{ms(d['set_copy_and_update'])} (copy+update)",
         fmt_ratio(ratio(d["apply_in_memory"], d["set_copy_and_update"])), delta_goal],
        [f"delta of {k}: swap to disk", ms(d["swap_to_disk"]), f"{ms(d['set_update_in_place'])} (in place)",
         fmt_ratio(ratio(d["swap_to_disk"], d["set_copy_and_update"])), delta_goal],
        ["load (every check)", ms(ld["deny_list_checked"]), ms(ld["set_from_file_bytes"]),
         fmt_ratio(ratio(ld["deny_list_checked"], ld["set_from_file_bytes"])), ""],
    ]
    console.print(table(
        f"denylist: {n:,} cards, format 2 mapped, beside a Python set of the same cards",
        ["what", "deny list", "set (baseline)", "ratio", "goal"], rows,
        caption=f"resident = mapping Rss {mb(m['deny_list_mapping_rss'])} + Python heap "
                f"{mb(m['deny_list_python_heap'])}; VmRSS {mb(m['vm_rss_before'])} -> "
                f"{mb(m['vm_rss_after'])} (deny list and set). swap = apply + temp file + fsync + rename + "
                "fsync folder + map and check the new file; its ratio is to the set's copy+update. "
                f"diff (back office) {ms(d['diff_back_office'])}. Goals met: {', '.join(met) or 'none'}; "
                f"missed: {', '.join(missed) or 'none'}. {doc['seconds']} s. {path}"))

"""A validator swapping its deny list is killed (SIGKILL) at random moments, over and over; after every kill
the file on disk is wholly one version or wholly the next, never a mix, and the next start is not upset by
whatever the killed process left behind.

The swapping process is real: a child Python process loads the list with ``DenyList.open`` and applies the
real deltas with ``blacklist.delta.swap`` (apply, ``write_atomic``: temp file, fsync, rename, fsync the
folder; reopen). Odd versions hold card set A and even versions set B (half of each differ), so every swap
adds and removes thousands of cards. The parent waits until the child says it is swapping, sleeps a random
0-60 ms (a swap of 4,000 changes takes ~20 ms here, so kills land in the build, the write, the fsyncs, the
rename and the reopen alike; on a loaded machine the window widens until swaps complete between kills), kills
it, and checks:

- the file loads with every check on (checksum, order), its version is not below the last one seen, and its
  bytes are exactly the file of set A or B at that version (so count, checksum and every card are the expected
  ones);
- a ``.new`` temporary left by a kill does not stop the next child from starting and swapping on (every
  other time the parent removes it with ``remove_stale_temp`` first, as a validator's start-up may; otherwise
  the next swap truncates it).

At least one kill must have left a temporary file (i.e. landed between opening it and the rename); a run here
sees 2-12 of 110, and the test goes on killing (up to 4x as often) until one has.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from blacklist.denylist import DenyList, encode, remove_stale_temp

KILLS = 110
CARDS = 6_000
SEED = 20261122

# Both sides make the same two sets from the seed: n cards each, n / 2 of them shared.
SETS = """
import random
def card_sets(seed, n):
    rnd = random.Random(seed)
    prefixes = [b"\\x31\\x00", b"\\x31\\x01", b"\\x42\\x00"]
    cards = [rnd.choice(prefixes) + rnd.randbytes(8) for _ in range(n + n // 2)]
    return set(cards[:n]), set(cards[n // 2:])
"""

CHILD = SETS + """
import sys
from blacklist.delta import Delta, diff, swap
from blacklist.denylist import DenyList

path, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a, b = card_sets(seed, n)
list_a, list_b = DenyList.from_asns(a, 1), DenyList.from_asns(b, 2)
a_to_b, b_to_a = diff(list_a, list_b), diff(list_b, list_a)
current = DenyList.open(path)  # the start-up a kill may have interrupted the last swap of
print("swapping", current.version, flush=True)
while True:
    step = a_to_b if current.version % 2 else b_to_a  # odd versions hold A, even ones B
    current = swap(path, current, Delta(current.version, current.version + 1, step.adds, step.removes,
                                        step.checksum))
"""

namespace: dict = {}
exec(SETS, namespace)  # noqa: S102 - the same generator text the child runs, so the sets cannot drift apart
card_sets = namespace["card_sets"]


def expected_file(blob_of_version_0: bytes, version: int) -> bytes:
    return blob_of_version_0[:8] + struct.pack(">I", version) + blob_of_version_0[12:]


def test_a_swap_killed_anywhere_leaves_one_whole_version(tmp_path):
    set_a, set_b = card_sets(SEED, CARDS)
    assert len(set_a ^ set_b) >= CARDS // 2
    files = {1: encode(set_a, 0), 0: encode(set_b, 0)}  # by version parity
    sums = {parity: DenyList.from_bytes(blob).checksum for parity, blob in files.items()}
    path = tmp_path / "denylist.bin"
    path.write_bytes(expected_file(files[1], 1))
    temp = path.with_name(path.name + ".new")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    rnd = random.Random(SEED)
    last_version, stale_temps, cleaned, started = 1, 0, 0, time.monotonic()
    # The kill comes 0..window s after the child starts swapping. A loaded machine swaps slower, and a window
    # shorter than one swap would only ever kill the first build, never a write: when a child completed no swap
    # before its kill, the window widens (up to 1 s); when it did, it narrows back toward 60 ms.
    window = 0.060

    kill = -1
    # At least KILLS kills; more (up to 4x) while none has landed inside a write yet, since where a kill lands is
    # chance and a quiet machine writes the file in a blink.
    while kill + 1 < KILLS or (stale_temps == 0 and kill + 1 < 4 * KILLS):
        kill += 1
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(SEED), str(CARDS)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line.startswith("swapping"), f"kill {kill}: the child did not start: {line!r} " \
                                                f"{child.stderr.read() if child.poll() is not None else ''}"
            time.sleep(rnd.uniform(0, window))
            assert child.poll() is None, f"kill {kill}: the child died by itself: {child.stderr.read()}"
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()

        deny = DenyList.load(path)  # every check on: checksum and order
        assert deny.version >= last_version, \
            f"kill {kill}: the list went back from version {last_version} to {deny.version}"
        parity = deny.version % 2
        assert path.read_bytes() == expected_file(files[parity], deny.version), \
            f"kill {kill}: version {deny.version} is not wholly set {'A' if parity else 'B'}"
        assert deny.count == len(set_a if parity else set_b) and deny.checksum == sums[parity]
        window = max(0.060, window * 0.9) if deny.version > last_version else min(1.0, window * 1.5)
        last_version = deny.version
        if temp.exists():
            stale_temps += 1
            if stale_temps % 2 == 0:
                assert remove_stale_temp(path) and not temp.exists()
                cleaned += 1

    spent = time.monotonic() - started
    print(f"{kill + 1} kills in {spent:.1f} s; versions 1 -> {last_version}; a stale temp file after "
          f"{stale_temps} kills ({cleaned} removed at start-up, the rest truncated by the next swap)")
    # Kills must have landed both between swaps and inside writes, and the swapping must have gone on.
    assert last_version > KILLS // 4, f"only {last_version - 1} swaps completed across {kill + 1} runs"
    assert stale_temps >= 1, \
        f"only {stale_temps} of {kill + 1} kills landed inside a write: the test proves little"
    assert (DenyList.load(path).checksum in sums.values())

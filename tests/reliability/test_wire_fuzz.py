"""Garbage into the wire decoders: a seeded mutation loop over valid v2 batches and acks (and v1 JSON batches).

Each message is a valid payload mutated by one or more of: bit flips, byte overwrites, truncation, insertion of
random bytes, deletion of a slice, duplication of a slice, a varint-looking run, or bytes that are random from the
start. Half of the binary ones get a correct MAC recomputed after mutation, so the parser behind the MAC sees the
garbage too (without it, nearly everything would stop at the MAC). Every message goes into ``decode_batch`` and
``decode_ack``: the only exception allowed is ``WireError``; whatever is accepted must encode again and decode to
the same records (so the back office can pass it on). The loop counts outcomes and checks that the parser was
really exercised (many distinct refusals behind a good MAC, some mutated messages accepted).

``FAREBOX_WIRE_FUZZ`` sets how many messages (default 100,000, about half a minute here); ``make soak`` runs it
with 2,000,000.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import re
from collections import Counter
from datetime import UTC, datetime

from wire import codec
from wire.codec import MacError, WireError
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord

N = int(os.environ.get("FAREBOX_WIRE_FUZZ", "100000"))
SEED = int(os.environ.get("FAREBOX_WIRE_FUZZ_SEED", "20261122"))
KEY = mac_key(TEST_DEVICE_MASTER, "bus0042")
T0 = 1709623800


def resign(payload: bytes) -> bytes:
    """Replace the last 12 bytes with the MAC of what precedes them (the documented layout, computed here)."""
    if len(payload) <= 12:
        return payload
    body = payload[:-12]
    return body + hmac.new(KEY, body, hashlib.sha256).digest()[:12]


def seeds(rnd: random.Random) -> list[bytes]:
    """Valid payloads of every shape the mutations start from."""
    out = []
    kinds = list(RecordKind)
    for n in (1, 2, 3, 5, 8, 13, 50):
        t, recs = T0, []
        for i in range(n):
            t += rnd.choice([0, 1, 5, 30, -2, 4000])
            kind = RecordKind.PURCHASE if rnd.random() < 0.7 else rnd.choice(kinds)
            purchase = kind is RecordKind.PURCHASE
            recs.append(TapRecord(
                device_id="bus0042", device_seq=1000 + i + rnd.choice([0, 0, 0, 3]), kind=kind,
                occurred_at=datetime.fromtimestamp(max(t, 0), tz=UTC), operator="citybus",
                route=rnd.choice(["r12", "r7", "环线1"]), vehicle="v7", driver=rnd.choice(["D1001", "D1002", ""]),
                shift_no=rnd.choice([3, 4]),
                card_asn=rnd.randbytes(10).hex() if purchase or rnd.random() < 0.5 else "",
                card_type=rnd.choice([0, 1, 2, 5]), card_ttc=rnd.randint(0, 70000),
                amount=rnd.randint(0, 500) if purchase else 0, balance_after=rnd.randint(0, 10**6),
                terminal_id=rnd.choice(["010000000042", "010000000043"]) if purchase else "",
                terminal_seq=rnd.randint(0, 2**32 - 1) if rnd.random() < 0.1 else 500 + i,
                tac=rnd.randbytes(4).hex() if purchase else "",
                reason=rnd.choice(["", "", "transfer", "on deny list"]), tx_type=rnd.choice([6, 9, 9]),
                algorithm=rnd.choice([0, 0, 4]), full_fare=rnd.choice([0, 200, 300]),
                entry_stop=rnd.choice([0, 0, 4]), exit_stop=rnd.choice([0, 9]),
                **(dict(ticket_id=rnd.getrandbits(64), ticket_use=rnd.randint(1, 3), presented="qr")
                   if kind is RecordKind.TICKET_USE else {})))
        out.append(codec.encode_batch(recs, key=KEY))
        out.append(codec.encode_batch_json(recs))
    for seqs in ([1], list(range(100, 150)), [1, 3, 5, 7], [0, 2**32 - 1], []):
        out.append(codec.encode_ack("bus0042", seqs, key=KEY))
    return out


def mutate(rnd: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rnd.choice([1, 1, 1, 2, 3, 8])):
        op = rnd.randrange(8)
        if op == 0 and data:  # flip one bit
            i = rnd.randrange(len(data) * 8)
            data[i // 8] ^= 1 << (i % 8)
        elif op == 1 and data:  # overwrite a byte
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif op == 2:  # truncate
            del data[rnd.randrange(len(data) + 1):]
        elif op == 3:  # insert random bytes
            i = rnd.randrange(len(data) + 1)
            data[i:i] = rnd.randbytes(rnd.choice([1, 1, 2, 5, 40]))
        elif op == 4 and data:  # delete a slice
            i = rnd.randrange(len(data))
            del data[i:i + rnd.randint(1, 8)]
        elif op == 5 and data:  # duplicate a slice (records repeated, strings doubled)
            i = rnd.randrange(len(data))
            j = min(len(data), i + rnd.randint(1, 60))
            data[j:j] = data[i:j]
        elif op == 6:  # a long varint or a huge length somewhere
            i = rnd.randrange(len(data) + 1)
            data[i:i] = rnd.choice([b"\xff" * rnd.randint(1, 9) + b"\x01", b"\x80\x00", b"\xff\xff\xff\xff\x0f"])
        elif op == 7:  # random from the start, keeping only the dispatch bytes
            data = bytearray(data[:3] + rnd.randbytes(rnd.randint(0, 120)))
    return bytes(data)


def _outcome(decode, payload: bytes, counts: Counter, refusals: Counter, resigned: bool) -> object | None:
    try:
        result = decode(payload)
    except MacError:
        counts["mac"] += 1
        return None
    except WireError as e:
        counts["refused"] += 1
        if resigned:
            refusals[re.sub(r"[0-9]+", "N", str(e))[:60]] += 1
        return None
    counts["accepted"] += 1
    return result


def test_fuzzed_messages_raise_only_wire_error():
    rnd = random.Random(SEED)
    base = seeds(rnd)
    counts: Counter = Counter()
    refusals: Counter = Counter()
    decode_batch = lambda p: codec.decode_batch(p, key=KEY)
    decode_ack = lambda p: codec.decode_ack(p, key=KEY)
    for i in range(N):
        original = rnd.choice(base)
        payload = mutate(rnd, original) if i % 50 else rnd.randbytes(rnd.randint(0, 200))
        resigned = payload[:1] == b"\xfb" and rnd.random() < 0.5
        if resigned:
            payload = resign(payload)
        try:
            batch = _outcome(decode_batch, payload, counts, refusals, resigned)
            _outcome(decode_ack, payload, counts, refusals, resigned)
            if batch is not None:
                # what was accepted can go on to the next hop and means the same there
                again = codec.decode_batch(codec.encode_batch(batch.records, key=KEY), key=KEY)
                assert again.records == batch.records
        except (WireError, AssertionError):
            raise
        except Exception as e:  # anything else is a decoder bug: say which message did it
            raise AssertionError(f"message {i} (seed {SEED}) raised {type(e).__name__}: {e}\n"
                                 f"payload: {payload.hex()}") from e
    counts["messages"] = N
    print(f"\n{dict(counts)}; {len(refusals)} distinct refusals behind a good MAC")
    assert counts["messages"] >= min(N, 100_000)
    if N >= 10_000:  # the loop reached the parser behind the MAC, and not only its first check
        assert counts["accepted"] > 0 and counts["mac"] > 0
        assert len(refusals) >= 15, refusals.most_common()

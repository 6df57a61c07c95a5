"""blacklist.denylist: lookups agree with a plain Python set, the file format is the documented one (built
here by hand with struct), files round-trip through write_atomic + DenyList.load (the mmap path), and
broken files are refused with DenyListError."""

from __future__ import annotations

import hashlib
import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blacklist.delta import Delta, DeltaRefused, apply_delta, diff, swap
from blacklist.denylist import DenyList, DenyListError, encode, remove_stale_temp, write_atomic

asn_bytes = st.binary(min_size=10, max_size=10)
HEADER = 4 + 1 + 4 + 4


def hand_made(asns: list[bytes], version: int, *, count: int | None = None, magic=b"FBDL", fmt=1) -> bytes:
    """The format 1 layout of the module docstring, written independently of blacklist.denylist.encode."""
    body = b"".join(sorted(set(asns)))
    n = len(set(asns)) if count is None else count
    return magic + bytes([fmt]) + version.to_bytes(4, "big") + n.to_bytes(4, "big") + body


def hand_made_2(asns: list[bytes], version: int) -> bytes:
    """The format 2 layout of the module docstring, written independently of blacklist.denylist."""
    keys = sorted(set(asns))
    prefixes = sorted({k[:2] for k in keys})
    starts = [0]
    for p in prefixes:
        starts.append(starts[-1] + sum(1 for k in keys if k[:2] == p))
    table1 = b"".join(struct.pack("<H", int.from_bytes(p, "big")) for p in prefixes)
    table2 = b"".join(struct.pack("<I", s) for s in starts)
    body = (table1 + bytes(-len(table1) % 8) + table2 + bytes(-len(table2) % 8)
            + b"".join(struct.pack("<Q", int.from_bytes(k[2:], "big")) for k in keys))
    return (b"FBDL\x02\x00\x00\x00" + struct.pack(">III", version, len(keys), len(prefixes)) + bytes(4)
            + hashlib.sha256(body).digest() + body)


# --------------------------------------------------------------------------------------- membership


@settings(max_examples=60, deadline=None)
@given(st.sets(asn_bytes, max_size=200), st.lists(asn_bytes, max_size=30))
def test_membership_matches_a_python_set(listed, others):
    deny = DenyList.from_asns(listed, version=3)
    assert len(deny) == len(listed)
    for asn in list(listed) + others:
        assert (asn in deny) == (asn in listed)
        assert (asn.hex() in deny) == (asn in listed)  # the terminal looks cards up by hex string


@settings(max_examples=40, deadline=None)
@given(st.sets(asn_bytes, min_size=1, max_size=100))
def test_neighbours_of_listed_cards_are_not_listed(listed):
    deny = DenyList.from_asns(listed)
    for asn in listed:
        n = int.from_bytes(asn, "big")
        for m in (n - 1, n + 1):
            if 0 <= m < 1 << 80:
                neighbour = m.to_bytes(10, "big")
                assert (neighbour in deny) == (neighbour in listed)


def test_empty_list():
    for deny in (DenyList.empty(), DenyList.from_asns([], version=9)):
        assert len(deny) == 0
        assert "31000000000000012345" not in deny
        assert bytes(10) not in deny


def test_hex_case_and_duplicates():
    deny = DenyList.from_asns(["31000000000000ABCDEF", "31000000000000abcdef", bytes.fromhex("00" * 10)])
    assert len(deny) == 2
    assert "31000000000000abcdef" in deny and "31000000000000ABCDEF" in deny
    assert "00000000000000000000" in deny


def test_first_and_last_of_the_key_space():
    lo, hi = bytes(10), b"\xff" * 10
    deny = DenyList.from_asns([lo, hi])
    assert lo in deny and hi in deny and b"\x00" * 9 + b"\x01" not in deny


def test_encode_is_the_documented_layout():
    asns = [
        bytes.fromhex("31000000000000000003"),
        bytes.fromhex("31000000000000000001"),
        bytes.fromhex("31000000000000000002"),
        bytes.fromhex("31000000000000000001"),
    ]
    assert encode(asns, 0x01020304, fmt=1) == hand_made(asns, 0x01020304)
    assert encode(asns, 7, fmt=1)[:HEADER] == b"FBDL\x01\x00\x00\x00\x07\x00\x00\x00\x03"
    assert encode(asns, 0x01020304) == hand_made_2(asns, 0x01020304)
    two = asns + [bytes.fromhex("10010000000000000009"), bytes.fromhex("ffff0000000000000000")]
    assert encode(two, 7) == hand_made_2(two, 7)
    assert encode(two, 7)[:24] == b"FBDL\x02\x00\x00\x00" + struct.pack(">III", 7, 5, 3) + bytes(4)


def test_encode_refuses_asns_of_the_wrong_length():
    with pytest.raises(DenyListError):
        encode(["3100"], 1)
    with pytest.raises(DenyListError):
        encode([bytes(11)], 1)


# --------------------------------------------------------------------------------------- files


@settings(max_examples=25, deadline=None)
@given(st.sets(asn_bytes, max_size=300), st.integers(0, 0xFFFFFFFF), st.lists(asn_bytes, max_size=10))
def test_file_round_trip(tmp_path_factory, listed, version, others):
    path = tmp_path_factory.mktemp("dl") / "denylist.bin"
    write_atomic(path, [a.hex() for a in listed], version)
    assert path.read_bytes() == hand_made_2(list(listed), version)
    deny = DenyList.load(path)
    assert deny.version == version and len(deny) == len(listed)
    for asn in list(listed) + others:
        assert (asn in deny) == (asn in listed)


def test_load_of_a_non_empty_list_maps_the_file(tmp_path):
    path = write_atomic(tmp_path / "denylist.bin", [bytes([i]) * 10 for i in range(50)], version=12)
    deny = DenyList.load(path)
    assert isinstance(deny._suffixes.obj, mmap.mmap)  # memoryview over the mapping, not a copy in memory
    assert deny.version == 12 and bytes([7]) * 10 in deny and bytes([77]) * 10 not in deny


def test_load_of_an_empty_list(tmp_path):
    path = write_atomic(tmp_path / "denylist.bin", [], version=5)
    assert path.stat().st_size == 56 + 8  # header, then the group table's single start (0), padded
    deny = DenyList.load(path)
    assert deny.version == 5 and len(deny) == 0 and bytes(10) not in deny


def test_write_atomic_creates_the_folder_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "var" / "deny" / "denylist.bin"
    write_atomic(path, [bytes(10)], version=1)
    write_atomic(path, [b"\x01" * 10, b"\x02" * 10], version=2)
    assert sorted(os.listdir(path.parent)) == ["denylist.bin"]
    deny = DenyList.load(path)
    assert deny.version == 2 and bytes(10) not in deny and b"\x02" * 10 in deny


def test_a_mapped_list_keeps_answering_after_the_file_is_replaced(tmp_path):
    path = tmp_path / "denylist.bin"
    write_atomic(path, [b"\x01" * 10], version=1)
    old = DenyList.load(path)
    write_atomic(path, [b"\x02" * 10], version=2)
    new = DenyList.load(path)
    assert b"\x01" * 10 in old and b"\x02" * 10 not in old
    assert b"\x02" * 10 in new and b"\x01" * 10 not in new


def test_a_refused_list_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = write_atomic(tmp_path / "denylist.bin", [b"\x01" * 10], version=1)
    with pytest.raises(DenyListError):
        write_atomic(path, ["0102"], version=2)
    assert DenyList.load(path).version == 1
    assert sorted(os.listdir(tmp_path)) == ["denylist.bin"]


CORRUPT = {
    "empty file": b"",
    "half a header": b"FBDL\x01\x00",
    "wrong magic": hand_made([bytes(10)], 1, magic=b"FBDX"),
    "wrong format": hand_made([bytes(10)], 1, fmt=2),
    "count larger than body": hand_made([bytes(10), b"\x01" * 10], 1, count=3),
    "count smaller than body": hand_made([bytes(10), b"\x01" * 10], 1, count=1),
    "truncated body": hand_made([bytes(10), b"\x01" * 10], 1)[:-3],
    "trailing garbage": hand_made([bytes(10)], 1) + b"\x00",
    "header only but count 1": hand_made([], 1, count=1),
    "count overflow": hand_made([bytes(10)], 1, count=0xFFFFFFFF),
    "random text": b"this is not a deny list at all, just text",
}


@pytest.mark.parametrize("blob", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_files_are_refused(tmp_path, blob):
    path = tmp_path / "denylist.bin"
    path.write_bytes(blob)
    with pytest.raises(DenyListError):
        DenyList.load(path)
    with pytest.raises(DenyListError):
        DenyList.from_bytes(blob)


def test_a_body_out_of_order_is_refused(tmp_path):
    body = b"\x09" * 10 + b"\x01" * 10 + b"\x05" * 10
    path = tmp_path / "denylist.bin"
    path.write_bytes(b"FBDL\x01" + struct.pack(">II", 1, 3) + body)
    try:
        deny = DenyList.load(path)
    except DenyListError:
        return
    missed = [a for a in (b"\x09" * 10, b"\x01" * 10, b"\x05" * 10) if a not in deny]
    pytest.fail(f"an unsorted list loaded, and {len(missed)} of its 3 cards are not found")


# --------------------------------------------------------------------------------------- format 2 damage


def _reseal(blob: bytes) -> bytes:
    """``blob`` with its header checksum recomputed, so that only the structural checks can refuse it."""
    return blob[:24] + hashlib.sha256(blob[56:]).digest() + blob[56:]


def test_format_1_files_still_load_with_the_same_content_checksum(tmp_path):
    asns = [bytes([0x31, 0, i]) + bytes(7) for i in range(40)] + [b"\x42\x01" + bytes(8)]
    path = write_atomic(tmp_path / "old.bin", asns, version=4, fmt=1)
    old = DenyList.load(path)
    assert old.source_format == 1 and old.version == 4 and len(old) == 41
    assert old.checksum == DenyList.from_asns(asns, 9).checksum
    assert all(a in old for a in asns) and b"\x42\x02" + bytes(8) not in old


def test_format_2_damage_is_refused_with_a_clear_error():
    good = encode([b"\x31\x00" + bytes([i]) * 8 for i in range(1, 6)] + [b"\x42\x00" + bytes(8)], 3)
    DenyList.from_bytes(good)
    n, g = 6, 2
    body_at = 56 + 8 + 16  # prefixes (2 x 2 bytes, padded to 8), starts (3 x 4, padded to 16)
    cases = {
        "bad magic": (b"FBDX" + good[4:], "not a farebox deny list"),
        "unknown format": (good[:4] + b"\x03" + good[5:], "format 3"),
        "wrong count": (_reseal(good[:12] + struct.pack(">I", n + 1) + good[16:]), "cards"),
        "too many groups": (_reseal(good[:16] + struct.pack(">I", g + 5) + good[20:]), "groups"),
        "checksum": (good[:-1] + b"\x07", "checksum"),
        "truncated": (good[:-8], "bytes"),
        "unsorted suffixes": (_reseal(good[:body_at] + good[body_at + 8:body_at + 16]
                                      + good[body_at:body_at + 8] + good[body_at + 16:]), "out of order"),
        "groups out of order": (_reseal(good[:56] + good[58:60] + good[56:58] + good[60:]), "out of order"),
        "starts not adding up": (_reseal(good[:64] + struct.pack("<III", 0, 5, 7) + good[76:]),
                                 "group table"),
        "a group moved": (_reseal(good[:64] + struct.pack("<III", 0, 4, 6) + good[76:]), "out of order"),
        "dirty padding": (_reseal(good[:60] + b"\x01" + good[61:]), "padding"),
        "dirty reserved": (good[:5] + b"\x01" + good[6:], "reserved"),
    }
    for name, (blob, words) in cases.items():
        with pytest.raises(DenyListError, match=words):
            DenyList.from_bytes(blob)
            pytest.fail(f"{name} loaded")


def test_a_stale_temporary_file_is_ignored_truncated_and_removable(tmp_path):
    path = write_atomic(tmp_path / "denylist.bin", [b"\x01" * 10], version=1)
    stale = tmp_path / "denylist.bin.new"
    stale.write_bytes(b"FBDL\x02 half a list from a writer killed mid-write" * 10_000)
    assert DenyList.load(path).version == 1
    write_atomic(path, [b"\x02" * 10], version=2)
    assert not stale.exists() and DenyList.load(path).version == 2
    stale.write_bytes(b"junk")
    assert remove_stale_temp(path) and not stale.exists() and not remove_stale_temp(path)


# --------------------------------------------------------------------------------------- deltas

# ASNs as a city would issue them: a few shared 2-byte prefixes, and now and then another one.
prefixes = st.sampled_from([b"\x31\x00", b"\x31\x01", b"\x42\x00"]) | st.binary(min_size=2, max_size=2)
city_asns = st.builds(lambda p, s: p + s, prefixes, st.binary(min_size=8, max_size=8))


@settings(max_examples=80, deadline=None)
@given(st.sets(city_asns, max_size=150), st.sets(city_asns, max_size=150), st.data())
def test_applying_the_diff_gives_the_new_list_exactly(old_set, extra, data):
    kept = data.draw(st.sets(st.sampled_from(sorted(old_set)))) if old_set else set()
    new_set = kept | extra
    old, new = DenyList.from_asns(old_set, version=5), DenyList.from_asns(new_set, version=9)
    delta = diff(old, new)
    assert set(delta.adds) == new_set - old_set and set(delta.removes) == old_set - new_set
    assert list(delta.adds) == sorted(delta.adds) and delta.checksum == new.checksum
    blob = apply_delta(old, delta)
    assert blob == encode(new_set, 9)
    applied = DenyList.from_bytes(blob)
    assert applied.checksum == new.checksum and list(applied) == sorted(new_set)
    for asn in old_set | new_set:
        assert (asn in applied) == (asn in new_set)


def test_a_delta_for_another_version_is_refused():
    current = DenyList.from_asns([b"\x01" * 10], version=7)
    with pytest.raises(DeltaRefused, match="does not apply to deny list version 7"):
        apply_delta(current, Delta(6, 8, (b"\x02" * 10,), ()))
    with pytest.raises(DeltaRefused, match="forward"):
        apply_delta(current, Delta(7, 7, (b"\x02" * 10,), ()))
    assert isinstance(DeltaRefused("x"), DenyListError)


def test_duplicate_adds_count_once_and_hex_is_accepted():
    current = DenyList.from_asns([b"\x01" * 10], version=1)
    adds = (b"\x02" * 10, ("02" * 10).upper(), b"\x02" * 10)
    blob = apply_delta(current, Delta(1, 2, adds, (b"\x01" * 10,) * 2))
    assert blob == encode([b"\x02" * 10], 2)


@pytest.mark.parametrize("adds, removes, words", [
    ((b"\x01" * 10,), (), "already lists"),
    ((), (b"\x03" * 10,), "does not list"),
    ((), (b"\x01\x01" + b"\x03" * 8,), "does not list"),  # a prefix the list has no group for
    ((b"\x02" * 10,), (b"\x02" * 10,), "both adds and removes"),
    (("0102",), (), "10 bytes"),
])
def test_a_delta_that_does_not_fit_the_content_is_refused(adds, removes, words):
    current = DenyList.from_asns([b"\x01" * 10], version=1)
    with pytest.raises(DenyListError, match=words):
        apply_delta(current, Delta(1, 2, adds, removes))


def test_the_announced_checksum_is_verified():
    old = DenyList.from_asns([b"\x01" * 10], version=1)
    new = DenyList.from_asns([b"\x01" * 10, b"\x02" * 10], version=2)
    assert DenyList.from_bytes(apply_delta(old, Delta(1, 2, (b"\x02" * 10,), (), new.checksum))).checksum \
        == new.checksum
    with pytest.raises(DeltaRefused, match="announced"):
        apply_delta(old, Delta(1, 2, (b"\x03" * 10,), (), new.checksum))


def test_removing_the_last_card_of_a_group_drops_the_group():
    old = DenyList.from_asns([b"\x01" * 10, b"\x02" * 10, b"\x03" * 10], version=1)
    blob = apply_delta(old, Delta(1, 2, (), (b"\x02" * 10,)))
    assert blob == encode([b"\x01" * 10, b"\x03" * 10], 2)
    assert DenyList.from_bytes(apply_delta(old, Delta(1, 2, (), tuple(old)))).count == 0


def test_swap_replaces_the_file_and_the_old_list_keeps_answering(tmp_path):
    path = write_atomic(tmp_path / "denylist.bin", [b"\x01" * 10, b"\x02" * 10], version=1)
    old = DenyList.open(path)
    target = DenyList.from_asns([b"\x02" * 10, b"\x03" * 10], version=2)
    new = swap(path, old, diff(old, target))
    assert (new.version, new.checksum, list(new)) == (2, target.checksum, list(target))
    assert isinstance(new._suffixes.obj, mmap.mmap)
    assert b"\x01" * 10 in old and b"\x03" * 10 not in old  # a tap holding the old list still reads it
    assert DenyList.load(path).checksum == target.checksum
    assert sorted(os.listdir(tmp_path)) == ["denylist.bin"]
    with pytest.raises(DeltaRefused):
        swap(path, new, diff(old, target))  # the same delta again: the list is at version 2 now
    assert DenyList.load(path).checksum == target.checksum

"""blacklist.denylist: lookups agree with a plain Python set, the file format is the documented one (built
here by hand with struct), files round-trip through write_atomic + DenyList.load (the mmap path), and
broken files are refused with DenyListError."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blacklist.denylist import DenyList, DenyListError, encode, write_atomic

asn_bytes = st.binary(min_size=10, max_size=10)
HEADER = 4 + 1 + 4 + 4


def hand_made(asns: list[bytes], version: int, *, count: int | None = None, magic=b"FBDL", fmt=1) -> bytes:
    """The file layout of the module docstring, written independently of blacklist.denylist.encode."""
    body = b"".join(sorted(set(asns)))
    n = len(set(asns)) if count is None else count
    return magic + bytes([fmt]) + version.to_bytes(4, "big") + n.to_bytes(4, "big") + body


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
    assert encode(asns, 0x01020304) == hand_made(asns, 0x01020304)
    assert encode(asns, 7)[:HEADER] == b"FBDL\x01\x00\x00\x00\x07\x00\x00\x00\x03"


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
    assert path.read_bytes() == hand_made(list(listed), version)
    deny = DenyList.load(path)
    assert deny.version == version and len(deny) == len(listed)
    for asn in list(listed) + others:
        assert (asn in deny) == (asn in listed)


def test_load_of_a_non_empty_list_maps_the_file(tmp_path):
    path = write_atomic(tmp_path / "denylist.bin", [bytes([i]) * 10 for i in range(50)], version=12)
    deny = DenyList.load(path)
    assert isinstance(deny._data.obj, mmap.mmap)  # memoryview over the mapping, not a copy in memory
    assert deny.version == 12 and bytes([7]) * 10 in deny and bytes([77]) * 10 not in deny


def test_load_of_an_empty_list(tmp_path):
    path = write_atomic(tmp_path / "denylist.bin", [], version=5)
    assert path.stat().st_size == HEADER
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

"""Deny-list deltas: the cards added and removed between two versions, applied by splicing the old file.

A validator holds version A mapped; the back office sends ``Delta(base_version=A, new_version=B, adds,
removes, checksum)`` where ``checksum`` is the SHA-256 content checksum of version B (``DenyList.checksum``;
the signature over it is the caller's business). ``apply_delta`` builds B's file in O(n + k log k): the k
changes are sorted and located by binary search, and the old suffix bytes between them are copied as whole
slices, never re-sorted card by card. ``swap`` is the whole update on a validator: build -> write_atomic ->
open the new file -> hand it back; the caller replaces its reference, and a tap still holding the old
``DenyList`` keeps reading the old mapping.

Refused with ``DeltaRefused`` (nothing is written) and meaning "fetch the full list instead":
- the base version is not the version loaded, or the new version is not above it;
- an added card is already listed, a removed card is not listed, or a card is both added and removed: the
  delta was made against other content than ours, whatever its version number says;
- the result's checksum is not the announced one.

The same card twice among the adds (or twice among the removes) counts once.

On the wire (``encode_delta`` / ``decode_delta``; the signed package around it is ``wire.packages``), big-endian:
magic ``FBDD`` | format ``1`` (1) | flags (1: bit 0 = a checksum is given) | 2 zero bytes | base version (4) |
new version (4) | adds a (4) | removes r (4) | checksum (32, zeros when none) | a x 10-byte ASN | r x 10-byte ASN.
``decode_delta`` is strict: a wrong magic, format or flag, a length that is not exactly the one announced, or a
new version not above the base raise ``DenyListError`` (not ``DeltaRefused``: the bytes are bad, not the base).
"""

from __future__ import annotations

import operator
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from blacklist.denylist import DenyList, DenyListError, assemble, file_checksum, replace_file, sorted_pairs

_SUFFIX = struct.Struct("<Q")
_ASN_PAIR = struct.Struct(">HQ")
_WIRE = struct.Struct(">4sBB2xIIII32s")
WIRE_MAGIC = b"FBDD"
WIRE_FORMAT = 1
_WIRE_CHECKSUM = 0x01


class DeltaRefused(DenyListError):
    """This delta cannot be applied to the list loaded; fetch the full list."""


@dataclass(frozen=True)
class Delta:
    base_version: int
    new_version: int
    adds: tuple[bytes, ...]  # 10-byte ASNs (hex strings are accepted too), ascending in what diff() returns
    removes: tuple[bytes, ...]
    checksum: bytes | None = None  # the new version's SHA-256 content checksum, as the back office announced

    def __len__(self) -> int:
        return len(self.adds) + len(self.removes)


def diff(old: DenyList, new: DenyList) -> Delta:
    """The delta taking ``old`` to ``new``, with ``new``'s checksum. Groups whose bytes are equal are skipped
    without looking at their cards; the others are compared as sets (run in the back office, not on a bus)."""
    adds: list[bytes] = []
    removes: list[bytes] = []
    old_groups, new_groups = _groups(old), _groups(new)
    pack = _ASN_PAIR.pack
    for prefix in sorted(old_groups.keys() | new_groups.keys()):
        a = old_groups.get(prefix, (0, 0))
        b = new_groups.get(prefix, (0, 0))
        old_raw = old._raw_suffixes[8 * a[0]:8 * a[1]]
        new_raw = new._raw_suffixes[8 * b[0]:8 * b[1]]
        if old_raw == new_raw:
            continue
        was, now = set(old._suffixes[a[0]:a[1]]), set(new._suffixes[b[0]:b[1]])
        adds.extend(pack(prefix, q) for q in sorted(now - was))
        removes.extend(pack(prefix, q) for q in sorted(was - now))
    return Delta(old.version, new.version, tuple(adds), tuple(removes), new.checksum)


def _groups(deny: DenyList) -> dict[int, tuple[int, int]]:
    s = deny._starts
    return {p: (s[g], s[g + 1]) for g, p in enumerate(deny._prefixes)}


def apply_delta(current: DenyList, delta: Delta) -> bytes:
    """The file of ``delta.new_version``, built from ``current``; raises ``DeltaRefused`` (see the module)."""
    if delta.base_version != current.version:
        raise DeltaRefused(f"delta {delta.base_version} -> {delta.new_version} does not apply to deny list "
                           f"version {current.version}: fetch the full list (or the delta from "
                           f"{current.version})")
    if delta.new_version <= delta.base_version:
        raise DeltaRefused(f"delta {delta.base_version} -> {delta.new_version} does not move the list "
                           "forward")
    adds, removes = sorted_pairs(delta.adds), sorted_pairs(delta.removes)
    both = set(adds) & set(removes)
    if both:
        raise DeltaRefused(f"delta {delta.base_version} -> {delta.new_version} both adds and removes "
                           f"{len(both)} card(s), e.g. {_ASN_PAIR.pack(*min(both)).hex()}")

    # (position in the old suffix array, prefix, 0 = insert before it / 1 = drop it, suffix). Sorted, this is
    # the
    # order of the new file: at one position, a new group's prefix sorts before the group found there, and an
    # insert before dropping the card it sorts before.
    events = []
    change: Counter[int] = Counter()
    locate = current._locate
    for prefix, suffix in adds:
        pos, listed = locate(prefix, suffix)
        if listed:
            raise DeltaRefused(f"delta {delta.base_version} -> {delta.new_version} adds "
                               f"{_ASN_PAIR.pack(prefix, suffix).hex()}, which version {current.version} "
                               "already lists: it was made against other content; fetch the full list")
        events.append((pos, prefix, 0, suffix))
        change[prefix] += 1
    for prefix, suffix in removes:
        pos, listed = locate(prefix, suffix)
        if not listed:
            raise DeltaRefused(f"delta {delta.base_version} -> {delta.new_version} removes "
                               f"{_ASN_PAIR.pack(prefix, suffix).hex()}, which version {current.version} "
                               "does not list: it was made against other content; fetch the full list")
        events.append((pos, prefix, 1, suffix))
        change[prefix] -= 1
    events.sort()

    raw = current._raw_suffixes
    pieces = []
    cursor = 0
    pack = _SUFFIX.pack
    for pos, _prefix, drop, suffix in events:
        if pos > cursor:
            pieces.append(raw[8 * cursor:8 * pos])  # a whole run of unchanged cards, one slice
            cursor = pos
        if drop:
            cursor = pos + 1
        else:
            pieces.append(pack(suffix))
    pieces.append(raw[8 * cursor:])

    s = current._starts
    sizes = dict(zip(current._prefixes, map(operator.sub, s[1:], s[:-1]), strict=True))
    for prefix, n in change.items():
        sizes[prefix] = sizes.get(prefix, 0) + n
    prefixes = sorted(p for p, n in sizes.items() if n)  # a group whose last card left is gone
    starts = [0]
    for p in prefixes:
        starts.append(starts[-1] + sizes[p])

    blob = assemble(delta.new_version, prefixes, starts, pieces)
    built = file_checksum(blob)
    if delta.checksum is not None and built != delta.checksum:
        raise DeltaRefused(f"deny list version {delta.new_version} built from version {current.version} has "
                           f"checksum {built.hex()}, the back office announced {delta.checksum.hex()}: "
                           "fetch the full list")
    return blob


def swap(path: str | Path, current: DenyList, delta: Delta) -> DenyList:
    """Apply ``delta`` to ``current`` and put the result at ``path`` atomically; return the new list, mapped
    from the new file. ``current`` stays valid (its mapping holds the old inode) until the caller lets go of
    it.

    The new file's order is not re-checked at load (it was built here by construction from a checked list);
    its SHA-256 is, against the checksum computed while building it, so a file damaged on the way to disk is
    refused.
    """
    blob = apply_delta(current, delta)
    replace_file(path, blob)
    return DenyList.load(path, check_order=False, expect_checksum=file_checksum(blob))


def _asn_bytes(asn) -> bytes:
    raw = bytes.fromhex(asn) if isinstance(asn, str) else bytes(asn)
    if len(raw) != 10:
        raise DenyListError(f"an ASN is 10 bytes, not {len(raw)}: {raw.hex()}")
    return raw


def encode_delta(delta: Delta) -> bytes:
    """The delta's bytes for a deny-list package (see the module for the layout)."""
    adds = [_asn_bytes(a) for a in delta.adds]
    removes = [_asn_bytes(a) for a in delta.removes]
    checksum = delta.checksum
    if checksum is not None and len(checksum) != 32:
        raise DenyListError(f"a deny-list checksum is a 32-byte SHA-256, not {len(checksum)} bytes")
    for v in (delta.base_version, delta.new_version):
        if not 0 <= v <= 0xFFFFFFFF:
            raise DenyListError(f"a deny list version is 0..{0xFFFFFFFF}, not {v}")
    head = _WIRE.pack(WIRE_MAGIC, WIRE_FORMAT, _WIRE_CHECKSUM if checksum is not None else 0,
                      delta.base_version, delta.new_version, len(adds), len(removes), checksum or bytes(32))
    return head + b"".join(adds) + b"".join(removes)


def decode_delta(blob: bytes) -> Delta:
    """A delta from ``encode_delta``'s bytes; ``DenyListError`` saying what is wrong with anything else."""
    blob = bytes(blob)
    if blob[:4] != WIRE_MAGIC[:len(blob[:4])] or not blob:
        raise DenyListError(f"not a deny-list delta: it starts {blob[:4]!r}, not {WIRE_MAGIC!r}")
    if len(blob) < _WIRE.size:
        raise DenyListError(f"deny-list delta truncated: {len(blob)} bytes, its header alone is {_WIRE.size}")
    _magic, fmt, flags, base, new, n_adds, n_removes, checksum = _WIRE.unpack_from(blob)
    if fmt != WIRE_FORMAT:
        raise DenyListError(f"deny-list delta format {fmt} is not one this validator reads ({WIRE_FORMAT})")
    if flags & ~_WIRE_CHECKSUM:
        raise DenyListError(f"deny-list delta flags {flags:#04x} has unknown bits set")
    if blob[6:8] != bytes(2):
        raise DenyListError("deny-list delta header's reserved bytes are not zero")
    if not flags & _WIRE_CHECKSUM and checksum != bytes(32):
        raise DenyListError("deny-list delta has checksum bytes but its flag says it has none")
    expected = _WIRE.size + 10 * (n_adds + n_removes)
    if len(blob) != expected:
        raise DenyListError(f"deny-list delta {base} -> {new} announces {n_adds} add(s) and {n_removes} "
                            f"remove(s), {expected} bytes, but is {len(blob)} bytes")
    if new <= base:
        raise DenyListError(f"deny-list delta {base} -> {new} does not move the list forward")
    body = blob[_WIRE.size:]
    asns = [body[i:i + 10] for i in range(0, len(body), 10)]
    return Delta(base, new, tuple(asns[:n_adds]), tuple(asns[n_adds:]),
                 checksum if flags & _WIRE_CHECKSUM else None)

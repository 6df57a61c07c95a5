"""The deny list a validator looks every card up in: a compact, checksummed file of sorted ASNs, mapped, not
read.

Format 2 (written by this module; all offsets are multiples of 8 so the arrays can be used straight off the
mapping):

    header, 56 bytes:  magic ``FBDL`` | format ``2`` (1 byte) | 3 zero bytes | list version (4, big-endian) |
                       count n (4, BE) | groups g (4, BE) | 4 zero bytes | SHA-256 of the body (32)
    body:              g x group prefix (uint16, little-endian), zero-padded to a multiple of 8 bytes
                       (g + 1) x group start (uint32, LE; start[0] = 0, start[g] = n), zero-padded to 8
                       n x suffix (uint64, LE)

An ASN is 10 bytes. Its first 2 bytes (the issuer / city part, shared by most cards of one city) name its
group and its last 8 bytes, read as a big-endian number, are its suffix; groups ascend by prefix and suffixes
ascend inside a group, so the order is the order of the 10-byte ASNs. Sharing the prefix makes a million cards
8.0 MB instead of 10.0 MB. Suffixes are stored little-endian because every CPU a validator runs on is
little-endian: the mapped bytes are searched as a uint64 array by the C ``bisect`` without copying (a
big-endian host copies and byte-swaps them).

The body is a function of the set of cards alone (no version, zero padding), so its SHA-256,
``DenyList.checksum``, is the list's content checksum: the back office announces it with a delta and the
validator compares it after applying the delta, before the new file replaces the old. It is also checked at
every load, which catches a file damaged on disk. Format 1 files (magic | format 1 | version | count | count x
10-byte ASN, ascending) are still read; they are converted to format 2 in memory.

A new list replaces the old one atomically (temporary file, fsync, rename, fsync the folder): a crash leaves
the old list or the new one, never half, and a ``DenyList`` already loaded keeps its own mapping of the old
file.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import operator
import os
import struct
import sys
from array import array
from collections import Counter
from itertools import accumulate, compress
from pathlib import Path

MAGIC = b"FBDL"
FORMAT = 2
ASN_LEN = 10
PREFIX_LEN = 2
SUFFIX_LEN = ASN_LEN - PREFIX_LEN
MAX_VERSION = 0xFFFFFFFF
TEMP_SUFFIX = ".new"  # write_atomic's temporary file is <name>.new beside the list

_HEADER1 = struct.Struct(">4sBII")
_HEADER2 = struct.Struct(">4sB3xIII4x32s")
_ASN_PAIR = struct.Struct(">HQ")  # an ASN as (prefix, suffix)
_LITTLE = sys.byteorder == "little"
# A group of fewer than 2 x this many cards is searched whole; in a bigger one a bucket index on the suffix's
# top bits (built at load, about 4 bytes per 256 cards) narrows the search to ~256 entries first.
_BUCKET_TARGET = 256
_MAX_BUCKET_BITS = 16


class DenyListError(ValueError):
    pass


def _pad8(n: int) -> int:
    return -n % 8


def _le_view(buf, code: str) -> memoryview:
    """``buf`` (little-endian numbers) as a typed memoryview: the buffer itself here, a byte-swapped copy on a
    big-endian host."""
    if _LITTLE:
        return memoryview(buf).cast(code)
    arr = array(code, bytes(buf))
    arr.byteswap()
    return memoryview(arr)


def _le_bytes(code: str, values) -> bytes:
    arr = array(code, values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _key(asn) -> bytes:
    key = bytes.fromhex(asn) if isinstance(asn, str) else bytes(asn)
    if len(key) != ASN_LEN:
        raise DenyListError(f"every ASN on a deny list is {ASN_LEN} bytes ({2 * ASN_LEN} hex digits), "
                            f"not {len(key)}: {key.hex()}")
    return key


def sorted_pairs(asns) -> list[tuple[int, int]]:
    """ASNs (hex or bytes, any order, duplicates allowed) as sorted unique (prefix, suffix) pairs."""
    keys = sorted({_key(a) for a in asns})
    return list(_ASN_PAIR.iter_unpack(b"".join(keys))) if keys else []


def assemble(version: int, prefixes, starts, suffix_pieces) -> bytes:
    """A format 2 file from its group table and its suffix bytes (pieces, already LE and in order)."""
    if not 0 <= version <= MAX_VERSION:
        raise DenyListError(f"a deny list version is 0..{MAX_VERSION}, not {version}")
    g = len(prefixes)
    head = _le_bytes("H", prefixes)
    table = _le_bytes("I", starts)
    pieces = [head, bytes(_pad8(len(head))), table, bytes(_pad8(len(table))), *suffix_pieces]
    count = starts[-1]
    if sum(map(len, suffix_pieces)) != SUFFIX_LEN * count:
        raise DenyListError(f"internal: suffix bytes do not match the group table's {count} cards")
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return b"".join([_HEADER2.pack(MAGIC, FORMAT, version, count, g, digest.digest()), *pieces])


def file_checksum(blob) -> bytes:
    """The content checksum a format 2 file carries in its header (bytes 24..56)."""
    return bytes(blob[24:56])


def encode_pairs(pairs: list[tuple[int, int]], version: int) -> bytes:
    """A format 2 file from sorted unique (prefix, suffix) pairs."""
    counts = Counter(map(operator.itemgetter(0), pairs))  # counted in C; pairs are sorted, so are the keys
    prefixes = sorted(counts)
    starts = [0, *accumulate(counts[p] for p in prefixes)]
    suffixes = _le_bytes("Q", map(operator.itemgetter(1), pairs))
    return assemble(version, prefixes, starts, [suffixes])


def encode(asns, version: int, *, fmt: int = FORMAT) -> bytes:
    """The file of a deny list holding ``asns`` (hex strings or 10-byte values; duplicates collapse)."""
    if fmt == 1:
        keys = sorted({_key(a) for a in asns})
        return _HEADER1.pack(MAGIC, 1, version, len(keys)) + b"".join(keys)
    if fmt != FORMAT:
        raise DenyListError(f"deny list format {fmt} is not one this farebox writes (1 or 2)")
    return encode_pairs(sorted_pairs(asns), version)


class DenyList:
    """A loaded deny list. ``asn in deny_list`` (hex string or 10 bytes) is a lookup; nothing here writes."""

    def __init__(self, body, version: int, count: int, groups: int, checksum: bytes,
                 source_format: int = FORMAT):
        p_len = 2 * groups
        s_off = p_len + _pad8(p_len)
        s_len = 4 * (groups + 1)
        q_off = s_off + s_len + _pad8(s_len)
        view = memoryview(body)
        self.version = version
        self.count = count
        self.checksum = checksum
        self.source_format = source_format
        self._groups = groups
        self._prefixes = _le_view(view[:p_len], "H")
        self._starts = _le_view(view[s_off:s_off + s_len], "I")
        # The suffixes as plain bytes too: a delta copies whole runs of them into the new file as slices.
        self._raw_suffixes = view[q_off:q_off + SUFFIX_LEN * count]
        self._suffixes = _le_view(self._raw_suffixes, "Q")
        self._build_buckets()

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def empty(cls) -> DenyList:
        return cls.from_bytes(encode([], 0))

    @classmethod
    def from_asns(cls, asns, version: int = 1) -> DenyList:
        return cls.from_bytes(encode(asns, version))

    @classmethod
    def from_bytes(cls, blob, *, check_order: bool = True, expect_checksum: bytes | None = None) -> DenyList:
        """A deny list over ``blob`` (bytes or an mmap, not copied). The checksum is always verified; the
        order is verified unless ``check_order`` is false, which only the process that built the body itself
        may ask for (``swap`` does, and passes the checksum it computed as ``expect_checksum``)."""
        if len(blob) < 5 or bytes(blob[:4]) != MAGIC:
            raise DenyListError(f"not a farebox deny list (starts {bytes(blob[:5])!r}, not {MAGIC!r})")
        fmt = blob[4]
        if fmt == 1:
            deny = cls._from_format1(blob)
        elif fmt == FORMAT:
            deny = cls._from_format2(blob, check_order)
        else:
            raise DenyListError(f"deny list format {fmt} is not one this farebox reads (1 or 2): "
                                "update the validator")
        if expect_checksum is not None and deny.checksum != expect_checksum:
            raise DenyListError(f"deny list version {deny.version} has checksum {deny.checksum.hex()}, "
                                f"expected {expect_checksum.hex()}")
        return deny

    @classmethod
    def _from_format2(cls, blob, check_order: bool) -> DenyList:
        if len(blob) < _HEADER2.size:
            raise DenyListError("deny list too short to hold its header")
        _magic, _fmt, version, count, groups, checksum = _HEADER2.unpack_from(blob, 0)
        if bytes(blob[5:8]) != b"\0\0\0" or bytes(blob[20:24]) != b"\0\0\0\0":
            raise DenyListError("deny list header is damaged (reserved bytes are not zero)")
        if groups > 1 << 16 or groups > count or (count and not groups):
            raise DenyListError(f"deny list header is damaged: {groups} groups for {count} cards")
        p_len, s_len = 2 * groups, 4 * (groups + 1)
        size = p_len + _pad8(p_len) + s_len + _pad8(s_len) + SUFFIX_LEN * count
        if len(blob) - _HEADER2.size != size:
            raise DenyListError(f"deny list says {count} cards in {groups} groups ({size} bytes) but holds "
                                f"{len(blob) - _HEADER2.size} bytes")
        body = memoryview(blob)[_HEADER2.size:]
        if hashlib.sha256(body).digest() != checksum:
            raise DenyListError(f"deny list version {version} is damaged: its content does not match its "
                                "checksum")
        deny = cls(body, version, count, groups, checksum)
        if check_order:
            deny._check_order(body)
        return deny

    @classmethod
    def _from_format1(cls, blob) -> DenyList:
        if len(blob) < _HEADER1.size:
            raise DenyListError("deny list too short to hold its header")
        _magic, _fmt, version, count = _HEADER1.unpack_from(blob, 0)
        if len(blob) != _HEADER1.size + count * ASN_LEN:
            raise DenyListError(f"deny list says {count} cards but holds {len(blob) - _HEADER1.size} bytes "
                                "of them")
        pairs = list(_ASN_PAIR.iter_unpack(memoryview(blob)[_HEADER1.size:])) if count else []
        # A binary search over a damaged (unsorted) list would miss listed cards: check the order at load.
        # Tuples of (prefix, suffix) compare as the big-endian bytes they came from.
        if not all(map(operator.lt, pairs[:-1], pairs[1:])):
            raise DenyListError(f"deny list version {version} is damaged: its cards are out of order")
        deny = cls.from_bytes(encode_pairs(pairs, version), check_order=False)
        deny.source_format = 1
        return deny

    def _check_order(self, body) -> None:
        """Refuse what a binary search would answer wrongly: prefixes, group starts or suffixes out of order,
        or non-zero padding (which would give one set of cards two checksums)."""
        p, s, q, g, n = self._prefixes, self._starts, self._suffixes, self._groups, self.count
        v = self.version
        if not all(map(operator.lt, p[:-1], p[1:])):
            raise DenyListError(f"deny list version {v} is damaged: its groups are out of order")
        if s[0] != 0 or s[g] != n or not all(map(operator.lt, s[:-1], s[1:])):
            raise DenyListError(f"deny list version {v} is damaged: its group table does not add up to {n} "
                                "cards")
        p_len, s_len = 2 * g, 4 * (g + 1)
        s_off = p_len + _pad8(p_len)
        if any(body[p_len:s_off]) or any(body[s_off + s_len:s_off + s_len + _pad8(s_len)]):
            raise DenyListError(f"deny list version {v} is damaged: padding is not zero")
        # Every place where a suffix is not above the one before must be the first card of a group (one pass
        # in C; Python only sees the group starts).
        group_starts = set(s)
        for i in compress(range(1, n), map(operator.ge, q[:-1], q[1:])):
            if i not in group_starts:
                raise DenyListError(f"deny list version {v} is damaged: card {i} is out of order")

    @classmethod
    def load(cls, path: str | Path, *, check_order: bool = True,
             expect_checksum: bytes | None = None) -> DenyList:
        """Map the file at ``path`` (read-only) and check it. The mapping stays valid after the file is
        replaced."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise DenyListError(f"{path} is empty, not a deny list")
            blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return cls.from_bytes(blob, check_order=check_order, expect_checksum=expect_checksum)

    open = load  # DenyList.open(path): the name the swap reads best with

    # ------------------------------------------------------------------------------------------- lookups

    def _build_buckets(self) -> None:
        """Per large group, where each value of the suffix's top bits starts: a lookup then searches ~256
        cards instead of the whole group (20 -> 8 steps for a million). Built here, not stored, so a file
        cannot carry a wrong index."""
        bits = array("B", bytes(self._groups))
        offsets = array("I", bytes(4 * self._groups))
        index = array("I")
        s, q = self._starts, self._suffixes
        for g in range(self._groups):
            lo, hi = s[g], s[g + 1]
            b = min(_MAX_BUCKET_BITS, ((hi - lo) // _BUCKET_TARGET).bit_length() - 1)
            if b <= 0:
                continue
            bits[g], offsets[g] = b, len(index)
            shift = 64 - b
            index.extend(bisect.bisect_left(q, k << shift, lo, hi) for k in range(1 << b))
            index.append(hi)
        self._bucket_bits, self._bucket_offsets, self._bucket_index = bits, offsets, index

    def _locate(self, prefix: int, suffix: int) -> tuple[int, bool]:
        """(position the card has or would have in the suffix array, whether it is listed)."""
        g = bisect.bisect_left(self._prefixes, prefix)
        if g == self._groups or self._prefixes[g] != prefix:
            return (self._starts[g], False)
        lo, hi = self._starts[g], self._starts[g + 1]
        b = self._bucket_bits[g]
        if b:
            at = self._bucket_offsets[g] + (suffix >> (64 - b))
            lo, hi = self._bucket_index[at], self._bucket_index[at + 1]
        i = bisect.bisect_left(self._suffixes, suffix, lo, hi)
        return (i, i < hi and self._suffixes[i] == suffix)

    def __contains__(self, asn: str | bytes) -> bool:
        # _locate inlined: this runs on every tap, and a call plus a tuple are a fifth of its time.
        try:
            prefix, suffix = _ASN_PAIR.unpack(bytes.fromhex(asn) if isinstance(asn, str) else asn)
        except struct.error:
            return False  # not 10 bytes: no such card is listed
        g = bisect.bisect_left(self._prefixes, prefix)
        if g == self._groups or self._prefixes[g] != prefix:
            return False
        b = self._bucket_bits[g]
        if b:
            at = self._bucket_offsets[g] + (suffix >> (64 - b))
            lo, hi = self._bucket_index[at], self._bucket_index[at + 1]
        else:
            lo, hi = self._starts[g], self._starts[g + 1]
        i = bisect.bisect_left(self._suffixes, suffix, lo, hi)
        return i < hi and self._suffixes[i] == suffix

    def __len__(self) -> int:
        return self.count

    def pairs(self):
        """Every card as (prefix, suffix), ascending."""
        s, q = self._starts, self._suffixes
        for g, prefix in enumerate(self._prefixes):
            for suffix in q[s[g]:s[g + 1]]:
                yield prefix, suffix

    def __iter__(self):
        """Every card as 10 bytes, ascending."""
        pack = _ASN_PAIR.pack
        for prefix, suffix in self.pairs():
            yield pack(prefix, suffix)

    def __repr__(self) -> str:
        return f"<DenyList version {self.version}, {self.count} cards, sha256 {self.checksum.hex()[:12]}…>"


# ------------------------------------------------------------------------------------------- files


def remove_stale_temp(path: str | Path) -> bool:
    """Delete the temporary file a killed ``write_atomic`` may have left beside ``path``; True if there was
    one. Loading never reads it and the next write truncates it, so this only gives the disk space back."""
    try:
        os.unlink(Path(path).with_name(Path(path).name + TEMP_SUFFIX))
    except FileNotFoundError:
        return False
    return True


def replace_file(path: str | Path, blob: bytes) -> Path:
    """Put ``blob`` at ``path`` atomically: write ``<path>.new``, fsync it, rename it over ``path``, fsync the
    folder. Readers that mapped the old file keep the old inode until they let go of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # truncates a stale one left by a crash
    try:
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_atomic(path: str | Path, asns, version: int, *, fmt: int = FORMAT) -> Path:
    blob = encode(asns, version, fmt=fmt)  # refuse a bad list before touching the disk
    return replace_file(path, blob)

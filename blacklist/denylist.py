"""The deny list a validator looks every card up in: a compact file of sorted 10-byte ASNs.

File layout: magic ``FBDL`` | format version (1 byte) | list version (4 bytes, big-endian) | count (4 bytes) |
count x 10-byte ASN in ascending order. A lookup is a binary search over the mapped file, so a list of a million
cards costs 10 MB of page cache and about 20 comparisons per tap. A new list replaces the old one atomically
(write a temporary file, fsync, rename, fsync the folder): a crash leaves the old list or the new one, never half.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

MAGIC = b"FBDL"
FORMAT = 1
ASN_LEN = 10
_HEADER = struct.Struct(">4sBII")


class DenyListError(ValueError):
    pass


class DenyList:
    def __init__(self, data: bytes | mmap.mmap, version: int, count: int):
        self._data = data
        self.version = version
        self.count = count

    @classmethod
    def empty(cls) -> DenyList:
        return cls(b"", 0, 0)

    @classmethod
    def from_asns(cls, asns, version: int = 1) -> DenyList:
        return cls.from_bytes(encode(asns, version))

    @classmethod
    def from_bytes(cls, blob: bytes | mmap.mmap) -> DenyList:
        if len(blob) < _HEADER.size:
            raise DenyListError("deny list too short to hold its header")
        magic, fmt, version, count = _HEADER.unpack_from(blob, 0)
        if magic != MAGIC or fmt != FORMAT:
            raise DenyListError(f"not a farebox deny list (magic {magic!r}, format {fmt})")
        if len(blob) != _HEADER.size + count * ASN_LEN:
            raise DenyListError(f"deny list says {count} cards but holds {len(blob) - _HEADER.size} bytes of them")
        body = memoryview(blob)[_HEADER.size:] if count else b""
        # A binary search over a damaged (unsorted) list would miss listed cards: check the order once, at load.
        previous = b""
        for i in range(count):
            here = bytes(body[i * ASN_LEN:(i + 1) * ASN_LEN])
            if here <= previous:
                raise DenyListError(f"deny list version {version} is damaged: entry {i} is out of order")
            previous = here
        return cls(body, version, count)

    @classmethod
    def load(cls, path: str | Path) -> DenyList:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= _HEADER.size:
                return cls.from_bytes(f.read())
            return cls.from_bytes(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def __contains__(self, asn: str | bytes) -> bool:
        key = bytes.fromhex(asn) if isinstance(asn, str) else bytes(asn)
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            here = bytes(self._data[mid * ASN_LEN:(mid + 1) * ASN_LEN])
            if here == key:
                return True
            if here < key:
                lo = mid + 1
            else:
                hi = mid
        return False

    def __len__(self) -> int:
        return self.count


def encode(asns, version: int) -> bytes:
    keys = sorted({bytes.fromhex(a) if isinstance(a, str) else bytes(a) for a in asns})
    if any(len(k) != ASN_LEN for k in keys):
        raise DenyListError("every ASN on a deny list is 10 bytes (20 hex digits)")
    return _HEADER.pack(MAGIC, FORMAT, version, len(keys)) + b"".join(keys)


def write_atomic(path: str | Path, asns, version: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = encode(asns, version)  # refuse a bad list before touching the disk
    tmp = path.with_name(path.name + ".new")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path

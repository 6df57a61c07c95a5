"""validator.readers.qr against the simulated scanner on a pty: line ends, empty lines, a code too long, paths."""

from __future__ import annotations

import time

import pytest

from hardware_sim.scanner import SimScanner
from validator.readers.base import ReaderError
from validator.readers.qr import open_scanner


def read_all(q, n, timeout=2.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        code = q.read(0.1)
        if code is not None:
            out.append(code)
    return out


def test_codes_cut_at_cr_lf_or_crlf_and_overlong_code_cut_short():
    with SimScanner() as sim:
        q = open_scanner(f"qr:{sim.path}?baud=115200")
        assert q.read(0.05) is None
        sim.scan("FT1.AAAA")
        sim.send(b"\r\n\r\nSECOND\nTHIRD\r\n" + b"Z" * 5000 + b"\rLAST\r")
        codes = read_all(q, 5)
        assert codes[:3] == [b"FT1.AAAA", b"SECOND", b"THIRD"]
        assert codes[3] == b"Z" * (q.max_code + 1) and codes[4] == b"LAST"
        q.close()


def test_a_code_without_its_cr_waits():
    with SimScanner() as sim:
        q = open_scanner(f"qr:{sim.path}")
        sim.send(b"HALF")
        assert q.read(0.2) is None
        sim.send(b"WAY\r")
        assert read_all(q, 1) == [b"HALFWAY"]
        q.close()


@pytest.mark.parametrize("path", ["qr:", "scan:/dev/ttyS1", "qr:/dev/ttyS1?baud=fast", "qr:/no/such/port"])
def test_bad_paths_are_refused_with_a_reader_error(path):
    with pytest.raises(ReaderError):
        open_scanner(path)

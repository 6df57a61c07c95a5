"""wire.packages (signed downlink packages) and blacklist.delta's wire encoding."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from blacklist.delta import Delta, decode_delta, diff, encode_delta
from blacklist.denylist import DenyList, DenyListError
from wire import packages
from wire.packages import (
    TEST_PUBLIC_KEY,
    TEST_SIGNING_SEED,
    Package,
    PackageError,
    params_body,
    parse_params,
    public_key,
    sign_package,
    verify_package,
)

AT = datetime(2026, 5, 1, 3, 0, 0, 123456, tzinfo=UTC)
OTHER_SEED = bytes(range(32))


def _pkg(**kw) -> Package:
    base = {"kind": "software", "version": "2.4.1", "target": "_fleet", "activate_at": AT,
            "body": b"tarball bytes"}
    base.update(kw)
    return Package(**base)


def test_round_trip_every_kind():
    for pkg in (_pkg(),
                _pkg(kind="params", version=7, target="route:r1", body=params_body(route="r2")),
                _pkg(kind="denylist", version="12", target="bus_0042", body=b"FBDD...", base_version=11),
                _pkg(kind="denylist", version="12", body=b"FBDL...", base_version=None)):
        got = verify_package(sign_package(pkg, TEST_SIGNING_SEED), TEST_PUBLIC_KEY)
        assert got == pkg
    assert got.activate_at.tzinfo is not None and got.activate_at == AT


def test_layout_checked_by_hand():
    pkg = _pkg(body=b"abc")
    blob = sign_package(pkg, TEST_SIGNING_SEED)
    assert blob[:4] == b"FBPK" and blob[4] == 1 and blob[5] == 3 and blob[6] == 0 and blob[7] == 0
    micros = int((AT - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
    assert int.from_bytes(blob[8:16], "big", signed=True) == micros
    assert int.from_bytes(blob[20:28], "big") == 3
    assert blob[28:60] == hashlib.sha256(b"abc").digest()
    assert blob[60] == 5 and blob[61:66] == b"2.4.1" and blob[66] == 6 and blob[67:73] == b"_fleet"
    assert blob[73:76] == b"abc" and len(blob) == 76 + 64
    # the signature checked with cryptography's own verifier, from the published public key bytes
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(
        "8ed09dfa69cd813e8129b03e9a6690880c9c853d3714df3890d1fa8f870f4df3")).verify(blob[-64:], blob[:-64])


def test_test_key_is_published_and_32_bytes():
    assert len(TEST_SIGNING_SEED) == 32
    assert public_key(TEST_SIGNING_SEED) == TEST_PUBLIC_KEY
    assert TEST_PUBLIC_KEY.hex() in packages.__doc__


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_recipe_in_docstring_verifies(tmp_path):
    blob = sign_package(_pkg(), TEST_SIGNING_SEED)
    (tmp_path / "signed.bin").write_bytes(blob[:-64])
    (tmp_path / "sig.bin").write_bytes(blob[-64:])
    (tmp_path / "pub.der").write_bytes(bytes.fromhex("302a300506032b6570032100") + TEST_PUBLIC_KEY)
    cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.der", "-keyform", "DER", "-rawin",
           "-in", "signed.bin", "-sigfile", "sig.bin"]
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True, check=False).returncode == 0
    (tmp_path / "signed.bin").write_bytes(blob[:-65] + b"X")
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True, check=False).returncode != 0


def test_wrong_key_refused():
    blob = sign_package(_pkg(), OTHER_SEED)
    with pytest.raises(PackageError, match="signature does not verify"):
        verify_package(blob, TEST_PUBLIC_KEY)


def test_altered_body_is_a_hash_mismatch():
    blob = bytearray(sign_package(_pkg(body=b"good body"), TEST_SIGNING_SEED))
    blob[-64 - 1] ^= 1
    with pytest.raises(PackageError, match="SHA-256"):
        verify_package(bytes(blob), TEST_PUBLIC_KEY)


def test_altered_header_or_signature_refused():
    blob = sign_package(_pkg(), TEST_SIGNING_SEED)
    for pos in (10, 62, len(blob) - 1):  # activation time, version text, signature
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(PackageError, match="signature"):
            verify_package(bytes(bad), TEST_PUBLIC_KEY)


def test_header_hash_rewritten_with_body_still_needs_the_signature():
    pkg = _pkg(body=b"original")
    blob = sign_package(pkg, TEST_SIGNING_SEED)
    forged = sign_package(_pkg(body=b"evil!!!!"), OTHER_SEED)[:-64] + blob[-64:]
    with pytest.raises(PackageError, match="signature"):
        verify_package(forged, TEST_PUBLIC_KEY)


def test_truncation_at_every_length():
    blob = sign_package(_pkg(), TEST_SIGNING_SEED)
    for n in range(len(blob)):
        with pytest.raises(PackageError) as e:
            verify_package(blob[:n], TEST_PUBLIC_KEY)
        assert "truncated" in str(e.value) or "not a farebox package" in str(e.value), (n, e.value)


def test_trailing_bytes():
    blob = sign_package(_pkg(), TEST_SIGNING_SEED)
    with pytest.raises(PackageError, match="1 trailing byte"):
        verify_package(blob + b"\0", TEST_PUBLIC_KEY)


def test_unknown_kind_format_flags_magic():
    blob = sign_package(_pkg(), TEST_SIGNING_SEED)
    for pos, value, message in ((5, 9, "unknown package kind"), (4, 2, "format 2"), (6, 0x80, "flags"),
                                (0, ord("X"), "not a farebox package"), (7, 1, "reserved")):
        bad = bytearray(blob)
        bad[pos] = value
        with pytest.raises(PackageError, match=message):
            verify_package(bytes(bad), TEST_PUBLIC_KEY)
    with pytest.raises(PackageError, match="unknown package kind"):
        _pkg(kind="firmware")


def test_bad_fields_refused_when_building():
    with pytest.raises(PackageError, match="decimal number"):
        _pkg(kind="params", version="v7", body=b"{}")
    with pytest.raises(PackageError, match="timezone-aware"):
        _pkg(activate_at=datetime(2026, 1, 1))
    with pytest.raises(PackageError, match="no base version"):
        _pkg(base_version=3)
    with pytest.raises(PackageError, match="target"):
        _pkg(target="x" * 41)
    with pytest.raises(PackageError, match="version"):
        _pkg(version="")
    with pytest.raises(ValueError, match="32 bytes"):
        sign_package(_pkg(), b"short")


def test_garbage_never_crashes():
    import random

    rnd = random.Random(7)
    blob = sign_package(_pkg(), TEST_SIGNING_SEED)
    for _ in range(2000):
        bad = bytearray(blob)
        for _ in range(rnd.randint(1, 4)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        if bytes(bad) == blob:
            continue
        with pytest.raises(PackageError):
            verify_package(bytes(bad), TEST_PUBLIC_KEY)
    for _ in range(500):
        with pytest.raises(PackageError):
            verify_package(bytes(rnd.randrange(256) for _ in range(rnd.randrange(200))), TEST_PUBLIC_KEY)


def test_params_body():
    doc = {"version": 3, "flat": {"r1": 200}}
    assert parse_params(params_body(fares=doc, route="r9")) == {"fares": doc, "route": "r9"}
    assert parse_params(params_body(route="r9")) == {"route": "r9"}
    for bad, message in ((b"\xff", "UTF-8"), (b"[]", "object"), (b'{"x": 1}', "unknown"),
                         (b'{"route": 5}', "route"), (b'{"fares": 1}', "fares")):
        with pytest.raises(PackageError, match=message):
            parse_params(bad)
    with pytest.raises(PackageError):
        params_body()


# -- blacklist.delta on the wire --------------------------------------------------------------------------------

def _asn(n: int) -> bytes:
    return bytes.fromhex(f"9999{n:016d}")


def test_delta_round_trip_and_layout():
    old = DenyList.from_asns([_asn(i) for i in range(10)], version=4)
    new = DenyList.from_asns([_asn(i) for i in range(3, 14)], version=5)
    d = diff(old, new)
    blob = encode_delta(d)
    assert blob[:4] == b"FBDD" and len(blob) == 56 + 10 * (4 + 3)
    assert int.from_bytes(blob[8:12], "big") == 4 and int.from_bytes(blob[12:16], "big") == 5
    back = decode_delta(blob)
    assert back == d and back.checksum == new.checksum
    assert set(back.adds) == {_asn(i) for i in range(10, 14)} and set(back.removes) == {_asn(i) for i in range(3)}


def test_delta_without_checksum_and_hex_asns():
    d = Delta(1, 2, (_asn(1).hex(),), ())
    back = decode_delta(encode_delta(d))
    assert back == Delta(1, 2, (_asn(1),), (), None)


def test_delta_decoder_strict():
    blob = encode_delta(Delta(1, 2, (_asn(1),), (_asn(2),), bytes(range(32))))
    for n in range(len(blob)):
        with pytest.raises(DenyListError):
            decode_delta(blob[:n])
    with pytest.raises(DenyListError, match="bytes, but is"):
        decode_delta(blob + b"\0")
    for pos, value, message in ((0, 0, "not a deny-list delta"), (4, 9, "format"), (5, 0x02, "flags"),
                                (6, 1, "reserved")):
        bad = bytearray(blob)
        bad[pos] = value
        with pytest.raises(DenyListError, match=message):
            decode_delta(bytes(bad))
    with pytest.raises(DenyListError, match="forward"):
        decode_delta(encode_delta(Delta(3, 3, (), ())))
    with pytest.raises(DenyListError, match="10 bytes"):
        encode_delta(Delta(1, 2, (b"short",), ()))

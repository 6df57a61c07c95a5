"""epurse.crypto and epurse.apdu checked against an independent implementation (tests/reference_crypto.py:
pycryptodome, padding and CBC written by hand) and against the openssl command line; never against values the
code under test produced."""

from __future__ import annotations

import shutil
import subprocess
from datetime import date, datetime

import pytest
from Crypto.Cipher import DES, DES3
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_crypto import (
    OpensslUnavailable,
    be,
    openssl_sm4,
    ref_3des,
    ref_card_key,
    ref_mac,
    ref_retail_mac,
    ref_sm4_card_key,
    ref_sm4_mac,
    ref_sm4_session,
    ref_tac_key,
)

from epurse import apdu, crypto
from epurse import keys as keys_module
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_CODE, TEST_ISSUER_KEYS, IssuerKeys

ASN = bytes.fromhex("31000000000000012345")
TERMINAL = bytes.fromhex("010000000042")
RANDOM = bytes.fromhex("1A2B3C4D")
DATE = bytes.fromhex("20240305")
TIME = bytes.fromhex("073000")

keys16 = st.binary(min_size=16, max_size=16)
keys8 = st.binary(min_size=8, max_size=8)
SM4 = crypto.suite(apdu.ALG_SM4)
T3DES = crypto.suite(apdu.ALG_3DES)


@pytest.fixture
def openssl():
    """Skip, saying why, where the openssl command cannot do SM4."""
    try:
        openssl_sm4("ecb", bytes(16), bytes(16))
    except OpensslUnavailable as exc:
        pytest.skip(str(exc))


# --- block cipher, diversification, keys ---------------------------------------------------------------------


def test_des3_encrypt_matches_pycryptodome_des3():
    key = TEST_ISSUER_KEYS.purchase
    block = bytes.fromhex("0000000000012345")
    assert crypto.des3_encrypt(key, block) == DES3.new(key, DES3.MODE_ECB).encrypt(block)


@given(keys16, st.binary(min_size=8, max_size=8))
def test_des3_encrypt_property(key, block):
    assert crypto.des3_encrypt(key, block) == ref_3des(key, block)


def test_diversify_uses_last_8_bytes_of_asn_and_its_complement():
    expected = ref_card_key(TEST_ISSUER_KEYS.purchase, ASN)
    assert crypto.diversify(TEST_ISSUER_KEYS.purchase, ASN) == expected
    # the PSAM only knows the 8-byte card number; it must reach the same key
    assert crypto.diversify(TEST_ISSUER_KEYS.purchase, crypto.card_number(ASN)) == expected
    assert crypto.card_number(ASN) == ASN[2:]


def test_different_cards_and_masters_give_different_keys():
    other = bytes.fromhex("31000000000000012346")
    assert crypto.diversify(TEST_ISSUER_KEYS.tac, ASN) != crypto.diversify(TEST_ISSUER_KEYS.tac, other)
    assert crypto.diversify(TEST_ISSUER_KEYS.tac, ASN) != crypto.diversify(TEST_ISSUER_KEYS.load, ASN)


def test_test_keys_are_distinct_and_not_trivial():
    ks = [
        TEST_ISSUER_KEYS.purchase,
        TEST_ISSUER_KEYS.load,
        TEST_ISSUER_KEYS.tac,
        TEST_ISSUER_KEYS.maintenance,
    ]
    assert len(set(ks)) == 4
    assert all(len(k) == 16 and len(set(k)) > 8 for k in ks)
    assert len(TEST_ISSUER_CODE) == 8
    assert all(k.hex().upper() in keys_module.__doc__ for k in ks)  # published, as the design asks
    with pytest.raises(ValueError):
        IssuerKeys(purchase=b"short", load=bytes(16), tac=bytes(16), maintenance=bytes(16))
    assert "2E9A" not in repr(TEST_ISSUER_KEYS)


# --- MAC ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 22, 24])
def test_mac_padding_is_always_applied(length):
    key = bytes.fromhex("0123456789ABCDEF")
    data = bytes(range(length))
    assert crypto.mac(key, data) == ref_mac(key, data)


@given(keys8, st.binary(max_size=100))
def test_mac_property(key, data):
    assert crypto.mac(key, data) == ref_mac(key, data)


@given(keys8, st.binary(min_size=1, max_size=40), st.integers(min_value=0, max_value=7))
def test_mac_changes_when_one_bit_flips(key, data, bit):
    flipped = bytearray(data)
    flipped[-1] ^= 1 << bit
    assert crypto.mac(key, data) != crypto.mac(key, bytes(flipped))


def test_mac_8_bytes_gets_a_full_padding_block():
    # 8 data bytes become 16: the MAC must differ from a MAC without the padding block
    key, data = bytes.fromhex("133457799BBCDFF1"), bytes.fromhex("0000000000000000")
    no_pad = DES.new(key, DES.MODE_ECB).encrypt(data)[:4]
    assert crypto.mac(key, data) != no_pad
    assert crypto.mac(key, data) == ref_mac(key, data)


def test_mac_matches_openssl_command_line():
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command on this machine")
    key = bytes.fromhex("35482F8F67C20FD1")
    data = bytes.fromhex("000000C8060100000000420000000720240305073000")
    padded = data + b"\x80\x00"
    run = subprocess.run(
        ["openssl", "enc", "-des-cbc", "-provider", "legacy", "-provider", "default",
         "-K", key.hex(), "-iv", "0000000000000000", "-nopad"],
        input=padded, capture_output=True, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        pytest.skip(
            f"openssl cannot do single DES here (legacy provider missing?): {run.stderr.decode()[:200]}"
        )
    assert crypto.mac(key, data) == run.stdout[-8:-4]


def test_keys_docstring_worked_example_tac():
    # The TAC in epurse.keys' docstring was computed with the openssl commands shown there.
    tac = crypto.purchase_tac(
        crypto.diversify(TEST_ISSUER_KEYS.tac, bytes.fromhex("0000000000012345")),
        200, 0x06, TERMINAL, 7, DATE, TIME,
    )  # fmt: skip
    assert tac == bytes.fromhex("620098f7")


# --- purchase ------------------------------------------------------------------------------------------------


def test_purchase_session_key_mac1_mac2_tac():
    dpk = ref_card_key(TEST_ISSUER_KEYS.purchase, ASN)
    dtk = ref_card_key(TEST_ISSUER_KEYS.tac, ASN)
    ttc, seq, amount = 0x0102, 0x00ABCDEF, 200
    sespk = ref_3des(dpk, RANDOM + be(ttc, 2) + be(seq, 4)[2:])

    assert crypto.purchase_session_key(dpk, RANDOM, ttc, seq) == sespk
    assert crypto.purchase_mac1(sespk, amount, 0x06, TERMINAL, DATE, TIME) == ref_mac(
        sespk, be(amount, 4) + b"\x06" + TERMINAL + DATE + TIME
    )
    assert crypto.purchase_mac2(sespk, amount) == ref_mac(sespk, be(amount, 4))
    assert crypto.tac_key(dtk) == ref_tac_key(dtk)
    assert crypto.purchase_tac(dtk, amount, 0x06, TERMINAL, seq, DATE, TIME) == ref_mac(
        ref_tac_key(dtk), be(amount, 4) + b"\x06" + TERMINAL + be(seq, 4) + DATE + TIME
    )


@given(
    keys16,
    st.binary(min_size=4, max_size=4),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.sampled_from([0x06, 0x09]),
)
def test_purchase_property(dpk, random, ttc, seq, amount, tx_type):
    sespk = ref_3des(dpk, random + be(ttc, 2) + be(seq & 0xFFFF, 2))
    assert crypto.purchase_session_key(dpk, random, ttc, seq) == sespk
    assert crypto.purchase_mac1(sespk, amount, tx_type, TERMINAL, DATE, TIME) == ref_mac(
        sespk, be(amount, 4) + bytes([tx_type]) + TERMINAL + DATE + TIME
    )
    assert crypto.purchase_tac(dpk, amount, tx_type, TERMINAL, seq, DATE, TIME) == ref_mac(
        ref_tac_key(dpk), be(amount, 4) + bytes([tx_type]) + TERMINAL + be(seq, 4) + DATE + TIME
    )


# --- load ----------------------------------------------------------------------------------------------------


def test_load_session_key_mac1_mac2_tac():
    dlk = ref_card_key(TEST_ISSUER_KEYS.load, ASN)
    dtk = ref_card_key(TEST_ISSUER_KEYS.tac, ASN)
    online_ttc, balance, amount = 5, 1234, 5000
    sesk = ref_3des(dlk, RANDOM + be(online_ttc, 2) + b"\x80\x00")

    assert crypto.load_session_key(dlk, RANDOM, online_ttc) == sesk
    assert crypto.load_mac1(sesk, balance, amount, TERMINAL) == ref_mac(
        sesk, be(balance, 4) + be(amount, 4) + b"\x02" + TERMINAL
    )
    assert crypto.load_mac2(sesk, amount, TERMINAL, DATE, TIME) == ref_mac(
        sesk, be(amount, 4) + b"\x02" + TERMINAL + DATE + TIME
    )
    assert crypto.load_tac(dtk, balance + amount, online_ttc, amount, TERMINAL, DATE, TIME) == ref_mac(
        ref_tac_key(dtk),
        be(balance + amount, 4) + be(online_ttc, 2) + be(amount, 4) + b"\x02" + TERMINAL + DATE + TIME,
    )


# --- input checks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: crypto.des3_encrypt(bytes(8), bytes(8)),
        lambda: crypto.des3_encrypt(bytes(16), bytes(7)),
        lambda: crypto.mac(bytes(16), b""),
        lambda: crypto.diversify(bytes(16), bytes(9)),
        lambda: crypto.purchase_mac2(bytes(8), -1),
        lambda: crypto.purchase_mac2(bytes(8), 1 << 32),
        lambda: crypto.purchase_mac1(bytes(8), 1, 6, bytes(5), DATE, TIME),
        lambda: crypto.purchase_session_key(bytes(16), RANDOM, 0x10000, 0),
    ],
)
def test_bad_lengths_and_ranges_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# --- BCD -----------------------------------------------------------------------------------------------------


def test_bcd_date_and_time():
    when = datetime(2024, 3, 5, 7, 8, 9)
    assert crypto.bcd_date(when) == b"\x20\x24\x03\x05"
    assert crypto.bcd_time(when) == b"\x07\x08\x09"
    assert crypto.parse_bcd_date(b"\x20\x24\x03\x05") == date(2024, 3, 5)
    assert crypto.parse_bcd_time(b"\x23\x59\x58").hour == 23


@given(st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31)))
def test_bcd_round_trip(when):
    assert crypto.parse_bcd_date(crypto.bcd_date(when)) == when.date()
    assert crypto.bcd_date(when).hex() == when.strftime("%Y%m%d").zfill(8)
    assert crypto.bcd_time(when).hex() == when.strftime("%H%M%S")


@pytest.mark.parametrize("raw", ["2024030A", "20241305", "20240230", "202403", "FFFFFFFF"])
def test_parse_bcd_date_rejects_bad_input(raw):
    with pytest.raises(ValueError):
        crypto.parse_bcd_date(bytes.fromhex(raw))


# --- card types ----------------------------------------------------------------------------------------------


def test_card_type_labels():
    assert CardType(2).label == "student card"
    assert CardType.ELDERLY.label_zh == "老人卡"
    assert [t.label_zh for t in CardType] == ["普通卡", "学生卡", "老人卡", "员工卡", "司机卡"]


# --- APDU builders and parsers -------------------------------------------------------------------------------


def test_builders_give_the_documented_bytes():
    assert apdu.select_aid() == bytes.fromhex("00A4040008A000000632010105")
    assert apdu.read_public_info() == bytes.fromhex("00B095001E")
    assert apdu.read_holder_info() == bytes.fromhex("00B0960020")
    assert apdu.get_balance() == bytes.fromhex("805C000204")
    assert apdu.init_purchase(1, 200, TERMINAL) == bytes.fromhex("805001020B01000000C80100000000420F")
    assert apdu.init_purchase(1, 200, TERMINAL, composite=True)[2] == 0x03
    assert apdu.debit_purchase(7, DATE, TIME, bytes.fromhex("11223344")) == bytes.fromhex(
        "805401000F00000007202403050730001122334408"
    )
    assert apdu.psam_read_terminal_id() == bytes.fromhex("00B0960006")
    psam = apdu.psam_init_purchase(
        RANDOM, 3, 200, 0x06, datetime(2024, 3, 5, 7, 30), 1, 0, ASN[2:], TEST_ISSUER_CODE
    )
    assert (
        psam
        == bytes.fromhex("80700000241A2B3C4D0003000000C8062024030507300001000000000000012345")
        + TEST_ISSUER_CODE
        + b"\x08"
    )
    assert len(psam) == 5 + 0x24 + 1
    assert apdu.psam_verify_mac2(b"\xaa\xbb\xcc\xdd") == bytes.fromhex("8072000004AABBCCDD")
    assert apdu.init_load(1, 5000, TERMINAL) == bytes.fromhex("805000020B010000138801000000004210")
    assert apdu.credit_load(DATE, TIME, b"\x01\x02\x03\x04") == bytes.fromhex(
        "805200000B202403050730000102030404"
    )
    assert apdu.get_transaction_prove(0x06, 9) == bytes.fromhex("805A000602000908")
    assert apdu.read_log_record(1) == bytes.fromhex("00B201C417")


def test_builders_refuse_bad_arguments():
    with pytest.raises(ValueError):
        apdu.init_purchase(1, -5, TERMINAL)
    with pytest.raises(ValueError):
        apdu.init_purchase(1, 5, b"\x01")
    with pytest.raises(ValueError):
        apdu.debit_purchase(1 << 32, DATE, TIME, bytes(4))


def test_check_and_status_error_text():
    assert apdu.check(b"\x01\x02\x90\x00", "GET BALANCE") == b"\x01\x02"
    with pytest.raises(apdu.StatusError) as err:
        apdu.check(b"\x94\x01", "INITIALIZE FOR PURCHASE")
    assert err.value.sw == 0x9401
    assert str(err.value) == "INITIALIZE FOR PURCHASE answered 9401: insufficient funds"
    with pytest.raises(apdu.ResponseError):
        apdu.check(b"\x90", "GET BALANCE")
    assert "unknown" in str(apdu.StatusError("X", 0x6F00))


def test_parse_public_and_holder_info():
    raw = (
        TEST_ISSUER_CODE
        + b"\x01\x02"
        + ASN
        + bytes.fromhex("20240101")
        + bytes.fromhex("20291231")
        + b"\x02\x00"
    )
    info = apdu.parse_public_info(raw)
    assert info == apdu.PublicInfo(TEST_ISSUER_CODE, 1, 2, ASN, date(2024, 1, 1), date(2029, 12, 31), 2)
    with pytest.raises(apdu.ResponseError, match="30 bytes"):
        apdu.parse_public_info(raw[:-1])
    with pytest.raises(apdu.ResponseError, match="start date"):
        apdu.parse_public_info(raw[:20] + b"\x20\x24\x13\x01" + raw[24:])

    holder = b"D0042".ljust(12, b" ") + "王小明".encode().ljust(20, b"\x00")
    assert apdu.parse_holder_info(holder) == apdu.HolderInfo("D0042", "王小明")
    with pytest.raises(apdu.ResponseError):
        apdu.parse_holder_info(b"\xff" * 32)


def test_parse_fixed_answers():
    assert apdu.parse_balance(bytes.fromhex("00002710")) == 10000
    init = apdu.parse_init_purchase(bytes.fromhex("00002710000300000001001A2B3C4D"))
    assert (init.balance, init.ttc, init.overdraft, init.key_version, init.algorithm, init.random) == (
        10000, 3, 0, 1, 0, RANDOM,
    )  # fmt: skip
    assert apdu.parse_psam_init_purchase(bytes.fromhex("0000000711223344")) == apdu.PsamPurchase(
        7, bytes.fromhex("11223344")
    )
    assert apdu.parse_debit(bytes.fromhex("AABBCCDD11223344")) == apdu.DebitResult(
        bytes.fromhex("AABBCCDD"), bytes.fromhex("11223344")
    )
    load = apdu.parse_init_load(bytes.fromhex("00002710000501001A2B3C4D55667788"))
    assert (load.balance, load.online_ttc, load.random, load.mac1) == (
        10000,
        5,
        RANDOM,
        bytes.fromhex("55667788"),
    )
    for parse, size in [
        (apdu.parse_balance, 4),
        (apdu.parse_init_purchase, 15),
        (apdu.parse_psam_init_purchase, 8),
        (apdu.parse_debit, 8),
        (apdu.parse_init_load, 16),
        (apdu.parse_credit, 4),
        (apdu.parse_transaction_prove, 8),
        (apdu.parse_log_record, 23),
    ]:
        with pytest.raises(apdu.ResponseError):
            parse(bytes(size + 1))
        with pytest.raises(apdu.ResponseError):
            parse(bytes(size - 1))



# --- suites --------------------------------------------------------------------------------------------------


def test_suite_lookup_and_unknown_algorithms():
    assert crypto.suite(0) is T3DES and crypto.suite(4) is SM4
    assert (T3DES.algorithm, SM4.algorithm, T3DES.block_size, SM4.block_size) == (0, 4, 8, 16)
    for bad in (1, 2, 3, 5, 0xFF, -1, None, "04"):
        with pytest.raises(ValueError, match="unknown e-purse algorithm"):
            crypto.suite(bad)


def test_module_level_functions_are_the_3des_suite():
    dpk, dtk = ref_card_key(TEST_ISSUER_KEYS.purchase, ASN), ref_card_key(TEST_ISSUER_KEYS.tac, ASN)
    sespk = crypto.purchase_session_key(dpk, RANDOM, 3, 9)
    assert sespk == T3DES.purchase_session_key(dpk, RANDOM, 3, 9)
    assert crypto.diversify(TEST_ISSUER_KEYS.tac, ASN) == T3DES.diversify(TEST_ISSUER_KEYS.tac, ASN)
    assert crypto.purchase_mac1(sespk, 5, 6, TERMINAL, DATE, TIME) == T3DES.purchase_mac1(
        sespk, 5, 6, TERMINAL, DATE, TIME
    )
    assert crypto.purchase_tac(dtk, 5, 6, TERMINAL, 9, DATE, TIME) == T3DES.purchase_tac(
        dtk, 5, 6, TERMINAL, 9, DATE, TIME
    )
    assert crypto.load_tac(dtk, 9, 1, 5, TERMINAL, DATE, TIME) == T3DES.load_tac(dtk, 9, 1, 5, TERMINAL, DATE, TIME)
    assert crypto.block_mac(dtk, RANDOM) == T3DES.block_mac(dtk, RANDOM)
    for name in ("diversify", "purchase_session_key", "purchase_mac1", "purchase_mac2", "purchase_tac",
                 "load_session_key", "load_mac1", "load_mac2", "load_tac", "block_mac"):
        assert callable(getattr(SM4, name)) and callable(getattr(crypto, name))


# --- 3DES block MAC ------------------------------------------------------------------------------------------


def test_3des_block_mac_is_a_retail_mac_over_the_header_from_the_challenge():
    damk = ref_card_key(TEST_ISSUER_KEYS.maintenance, ASN)
    expected = ref_retail_mac(damk, RANDOM + bytes(4), bytes.fromhex("841E000004"))
    assert T3DES.block_mac(damk, RANDOM) == expected
    assert crypto.block_mac(damk, RANDOM) == expected
    # a retail MAC, not a single-DES MAC with the left half: a card with equal halves is the only overlap
    assert expected != ref_mac(damk[:8], bytes.fromhex("841E000004"))
    assert T3DES.block_mac(damk, b"\x00\x00\x00\x01") != expected


@given(keys16, st.binary(min_size=4, max_size=4))
def test_3des_block_mac_property(damk, challenge):
    assert T3DES.block_mac(damk, challenge) == ref_retail_mac(damk, challenge + bytes(4), b"\x84\x1e\x00\x00\x04")


def test_retail_mac_matches_openssl_command_line():
    # ISO 9797-1 alg. 3 = single-DES CBC with K1, then 3DES (K1 K2 K1) on the last block: openssl des-ede-cbc over
    # a one-block message with the IV gives exactly that
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command on this machine")
    key = ref_card_key(TEST_ISSUER_KEYS.maintenance, ASN)
    padded = bytes.fromhex("841E000004800000")
    run = subprocess.run(
        ["openssl", "enc", "-des-ede-cbc", "-K", key.hex(), "-iv", (RANDOM + bytes(4)).hex(), "-nopad"],
        input=padded, capture_output=True, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        pytest.skip(f"openssl cannot do 3DES here: {run.stderr.decode()[:200]}")
    assert crypto.block_mac(key, RANDOM) == run.stdout[:4]


# --- SM4 -----------------------------------------------------------------------------------------------------

GBT_KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")
GBT_CIPHERTEXT = bytes.fromhex("681edf34d206965e86b3e94f536e4246")


def test_sm4_gbt_32907_example():
    # GB/T 32907-2016 appendix A, example 1: key = plaintext = 0123456789abcdeffedcba9876543210
    assert crypto.sm4_encrypt(GBT_KEY, GBT_KEY) == GBT_CIPHERTEXT
    assert SM4.encrypt_block(GBT_KEY, GBT_KEY) == GBT_CIPHERTEXT


def test_openssl_reference_gives_the_gbt_example_too(openssl):
    assert openssl_sm4("ecb", GBT_KEY, GBT_KEY) == GBT_CIPHERTEXT


def test_sm4_diversify_matches_openssl(openssl):
    for master in (TEST_ISSUER_KEYS.purchase, TEST_ISSUER_KEYS.tac, GBT_KEY):
        expected = ref_sm4_card_key(master, ASN)
        assert SM4.diversify(master, ASN) == expected
        assert SM4.diversify(master, crypto.card_number(ASN)) == expected  # the PSAM's way
    # the same master key gives a different card key per algorithm
    assert SM4.diversify(TEST_ISSUER_KEYS.tac, ASN) != T3DES.diversify(TEST_ISSUER_KEYS.tac, ASN)


@pytest.mark.parametrize("length", [0, 1, 8, 15, 16, 17, 31, 32, 33])
def test_sm4_mac_padding_is_always_applied(openssl, length):
    data = bytes(range(length))
    assert SM4.mac(GBT_KEY, data) == ref_sm4_mac(GBT_KEY, data)


@settings(max_examples=15, deadline=None)  # each example runs openssl
@given(keys16, st.binary(max_size=70))
def test_sm4_mac_property(key, data):
    try:
        expected = ref_sm4_mac(key, data)
    except OpensslUnavailable as exc:
        pytest.skip(str(exc))
    assert SM4.mac(key, data) == expected


def test_sm4_purchase_session_key_mac1_mac2_tac(openssl):
    dpk = ref_sm4_card_key(TEST_ISSUER_KEYS.purchase, ASN)
    dtk = ref_sm4_card_key(TEST_ISSUER_KEYS.tac, ASN)
    ttc, seq, amount = 0x0102, 0x00ABCDEF, 200
    sespk = ref_sm4_session(dpk, RANDOM + be(ttc, 2) + be(seq, 4)[2:])
    assert len(sespk) == 16

    assert SM4.purchase_session_key(dpk, RANDOM, ttc, seq) == sespk
    assert SM4.purchase_mac1(sespk, amount, 0x09, TERMINAL, DATE, TIME) == ref_sm4_mac(
        sespk, be(amount, 4) + b"\x09" + TERMINAL + DATE + TIME
    )
    assert SM4.purchase_mac2(sespk, amount) == ref_sm4_mac(sespk, be(amount, 4))
    # the SM4 TAC key is DTK itself
    assert SM4.purchase_tac(dtk, amount, 0x09, TERMINAL, seq, DATE, TIME) == ref_sm4_mac(
        dtk, be(amount, 4) + b"\x09" + TERMINAL + be(seq, 4) + DATE + TIME
    )


def test_sm4_load_session_key_mac1_mac2_tac(openssl):
    dlk = ref_sm4_card_key(TEST_ISSUER_KEYS.load, ASN)
    dtk = ref_sm4_card_key(TEST_ISSUER_KEYS.tac, ASN)
    online_ttc, balance, amount = 5, 1234, 5000
    sesk = ref_sm4_session(dlk, RANDOM + be(online_ttc, 2) + b"\x80\x00")

    assert SM4.load_session_key(dlk, RANDOM, online_ttc) == sesk
    assert SM4.load_mac1(sesk, balance, amount, TERMINAL) == ref_sm4_mac(
        sesk, be(balance, 4) + be(amount, 4) + b"\x02" + TERMINAL
    )
    assert SM4.load_mac2(sesk, amount, TERMINAL, DATE, TIME) == ref_sm4_mac(
        sesk, be(amount, 4) + b"\x02" + TERMINAL + DATE + TIME
    )
    assert SM4.load_tac(dtk, balance + amount, online_ttc, amount, TERMINAL, DATE, TIME) == ref_sm4_mac(
        dtk, be(balance + amount, 4) + be(online_ttc, 2) + be(amount, 4) + b"\x02" + TERMINAL + DATE + TIME
    )


def test_sm4_block_mac_matches_openssl(openssl):
    damk = ref_sm4_card_key(TEST_ISSUER_KEYS.maintenance, ASN)
    expected = ref_sm4_mac(damk, bytes.fromhex("841E000004"), iv16=RANDOM + bytes(12))
    assert SM4.block_mac(damk, RANDOM) == expected


SM4_TAC_BY_HAND = r"""
set -eu -o pipefail
M=4A06C4DC1BC469534F48F867B61BE3F4                  # the tac master key (epurse.keys)
D=0000000000012345                                  # card number: the last 8 bytes of the ASN
NOTD=$(printf '%016X' $(( ~0x$D )))
# DTK = SM4(master, D || NOT D); for SM4 the TAC key is DTK itself
K=$(echo $D$NOTD | xxd -r -p | openssl enc -sm4-ecb -K $M -nopad | xxd -p -c 64)
# amount(4) type(1) terminal(6) terminal seq(4) date(4) time(3) = 22 bytes, then 80 and 00s to 32
DATA=000000C8090100000000420000000720240305073000
echo ${DATA}80000000000000000000 | xxd -r -p \
  | openssl enc -sm4-cbc -K $K -iv 00000000000000000000000000000000 -nopad \
  | tail -c 16 | head -c 4 | xxd -p
"""


def test_sm4_tac_by_hand_with_the_openssl_command_line(openssl):
    # A whole SM4 TAC with nothing but a shell, xxd and openssl: what a certification lab would do.
    if shutil.which("xxd") is None or shutil.which("bash") is None:
        pytest.skip("needs bash and xxd")
    run = subprocess.run(["bash", "-c", SM4_TAC_BY_HAND], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    by_hand = bytes.fromhex(run.stdout.strip())
    dtk = SM4.diversify(TEST_ISSUER_KEYS.tac, bytes.fromhex("0000000000012345"))
    assert SM4.purchase_tac(dtk, 200, 0x09, TERMINAL, 7, DATE, TIME) == by_hand
    assert len(by_hand) == 4


@pytest.mark.parametrize(
    "call",
    [
        lambda: SM4.mac(bytes(8), b""),  # an SM4 key is 16 bytes
        lambda: SM4.diversify(bytes(8), ASN),
        lambda: SM4.block_mac(bytes(16), bytes(5)),
        lambda: T3DES.block_mac(bytes(8), bytes(4)),
        lambda: SM4.purchase_session_key(bytes(16), RANDOM, 0x10000, 0),
        lambda: SM4.tac_key(bytes(8)),
        lambda: crypto.sm4_encrypt(bytes(16), bytes(8)),
    ],
)
def test_sm4_bad_lengths_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# --- the new APDUs -------------------------------------------------------------------------------------------


def test_block_and_capp_builders_give_the_documented_bytes():
    assert apdu.get_challenge() == bytes.fromhex("0084000004")
    assert apdu.application_block(bytes.fromhex("11223344")) == bytes.fromhex("841E00000411223344")
    command = apdu.psam_block_mac(ASN[2:], TEST_ISSUER_CODE, RANDOM, apdu.ALG_SM4)
    assert command == bytes.fromhex("80FA050015") + b"\x04" + ASN[2:] + TEST_ISSUER_CODE + RANDOM + b"\x04"
    assert command[4] == len(command) - 6
    record = bytes(range(64))
    assert apdu.update_capp_cache(record) == bytes.fromhex("80DC02B840") + record
    assert apdu.read_capp_record() == bytes.fromhex("00B202BC40")
    for bad in (
        lambda: apdu.update_capp_cache(bytes(63)),
        lambda: apdu.application_block(bytes(3)),
        lambda: apdu.psam_block_mac(ASN, TEST_ISSUER_CODE, RANDOM, 0),
        lambda: apdu.psam_block_mac(ASN[2:], TEST_ISSUER_CODE, RANDOM, 256),
    ):
        with pytest.raises(ValueError):
            bad()


def test_block_and_capp_parsers():
    assert apdu.parse_challenge(RANDOM) == RANDOM
    assert apdu.parse_psam_mac(b"\x01\x02\x03\x04") == b"\x01\x02\x03\x04"
    assert apdu.parse_capp_record(bytes(64)) == bytes(64)
    for parse, size in [(apdu.parse_challenge, 4), (apdu.parse_psam_mac, 4), (apdu.parse_capp_record, 64)]:
        with pytest.raises(apdu.ResponseError):
            parse(bytes(size + 1))
        with pytest.raises(apdu.ResponseError):
            parse(bytes(size - 1))


def test_public_info_says_the_algorithm():
    raw = TEST_ISSUER_CODE + b"\x02\x01" + ASN + bytes.fromhex("2024010120291231") + b"\x01\x04"
    assert apdu.parse_public_info(raw).algorithm == apdu.ALG_SM4


def test_every_status_word_has_a_meaning():
    for name in dir(apdu):
        if name.startswith("SW_") and name != "SW_MEANING":
            sw = getattr(apdu, name)
            assert apdu.SW_MEANING.get(sw), name
    assert "blocked" in apdu.sw_text(apdu.SW_APP_BLOCKED)
    assert "Le 40" in str(apdu.StatusError("READ RECORD", 0x6C40))
    assert apdu.sw_text(0x6F00) == "unknown status"


def test_keys_docstring_sm4_commands_run_as_written(openssl):
    # The SM4 example in epurse.keys is meant to be pasted into a shell: run it verbatim and get its TAC.
    if shutil.which("xxd") is None or shutil.which("bash") is None:
        pytest.skip("needs bash and xxd")
    doc = keys_module.__doc__
    block = doc[doc.index("on an SM4 card, by hand::") :].split("\n\n")[1]
    script = "\n".join(line[4:] for line in block.splitlines())
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "fef823c9" and "the TAC: fef823c9" in block
    dtk = SM4.diversify(TEST_ISSUER_KEYS.tac, bytes.fromhex("0000000000012345"))
    assert SM4.purchase_tac(dtk, 200, 0x09, TERMINAL, 7, DATE, TIME) == bytes.fromhex("fef823c9")

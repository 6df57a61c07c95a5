"""SimPsam on its own: MAC1, MAC2 and the APPLICATION BLOCK MAC for both algorithms, checked against the tests'
reference (single DES by hand for 3DES, the openssl command line for SM4), never against epurse.crypto."""

from __future__ import annotations

from datetime import datetime

import pytest
from reference_crypto import (
    OpensslUnavailable,
    be,
    ref_3des,
    ref_card_key,
    ref_mac,
    ref_retail_mac,
    ref_sm4_card_key,
    ref_sm4_mac,
    ref_sm4_session,
)

from epurse import apdu
from epurse.crypto import bcd_date, bcd_time
from epurse.keys import TEST_ISSUER_CODE, TEST_ISSUER_KEYS
from hardware_sim.psam import SimPsam

CARD_NO = bytes.fromhex("0000000000012345")
TERMINAL = bytes.fromhex("010000000042")
RANDOM = bytes.fromhex("1A2B3C4D")
WHEN = datetime(2024, 3, 5, 7, 30, 0)


def _reference(algorithm: int):
    """(card key, session key, MAC) functions of the reference for an algorithm; skips SM4 without openssl."""
    if algorithm == apdu.ALG_3DES:
        return ref_card_key, ref_3des, ref_mac
    try:
        ref_sm4_card_key(bytes(16), CARD_NO)
    except OpensslUnavailable as exc:
        pytest.skip(str(exc))
    return ref_sm4_card_key, ref_sm4_session, ref_sm4_mac


@pytest.mark.parametrize("algorithm", [apdu.ALG_3DES, apdu.ALG_SM4])
@pytest.mark.parametrize("tx_type", [apdu.TX_PURCHASE, apdu.TX_COMPOSITE])
def test_mac1_and_mac2_for_each_algorithm(algorithm, tx_type):
    card_key, session, mac = _reference(algorithm)
    psam = SimPsam(TERMINAL, sequence=0x00012345)
    command = apdu.psam_init_purchase(RANDOM, 9, 200, tx_type, WHEN, 1, algorithm, CARD_NO, TEST_ISSUER_CODE)
    answer = apdu.parse_psam_init_purchase(apdu.check(psam.transmit(command), "PSAM INIT FOR PURCHASE"))
    assert answer.terminal_seq == 0x00012345 and psam.sequence == 0x00012346

    sespk = session(card_key(TEST_ISSUER_KEYS.purchase, CARD_NO), RANDOM + be(9, 2) + be(0x2345, 2))
    assert answer.mac1 == mac(sespk, be(200, 4) + bytes([tx_type]) + TERMINAL + bcd_date(WHEN) + bcd_time(WHEN))
    assert psam.transmit(apdu.psam_verify_mac2(mac(sespk, be(200, 4)))) == b"\x90\x00"


@pytest.mark.parametrize("algorithm", [apdu.ALG_3DES, apdu.ALG_SM4])
def test_block_mac_for_each_algorithm(algorithm):
    card_key, _, _ = _reference(algorithm)
    damk = card_key(TEST_ISSUER_KEYS.maintenance, CARD_NO)
    if algorithm == apdu.ALG_3DES:
        expected = ref_retail_mac(damk, RANDOM + bytes(4), bytes.fromhex("841E000004"))
    else:
        expected = ref_sm4_mac(damk, bytes.fromhex("841E000004"), iv16=RANDOM + bytes(12))
    answer = SimPsam(TERMINAL).transmit(apdu.psam_block_mac(CARD_NO, TEST_ISSUER_CODE, RANDOM, algorithm))
    assert apdu.parse_psam_mac(apdu.check(answer, "PSAM BLOCK MAC")) == expected


def test_unknown_algorithms_are_6a80_and_use_no_sequence():
    psam = SimPsam(TERMINAL)
    for algorithm in (0x01, 0x02, 0x03, 0x05, 0xFF):
        init = apdu.psam_init_purchase(RANDOM, 0, 1, 6, WHEN, 1, algorithm, CARD_NO, TEST_ISSUER_CODE)
        assert psam.transmit(init) == b"\x6a\x80"
        assert psam.transmit(apdu.psam_block_mac(CARD_NO, TEST_ISSUER_CODE, RANDOM, algorithm)) == b"\x6a\x80"
    assert psam.sequence == 1
    assert psam.transmit(apdu.psam_verify_mac2(bytes(4))) == b"\x69\x85"


def test_a_3des_mac2_does_not_verify_an_sm4_purchase():
    psam = SimPsam(TERMINAL)
    init = apdu.psam_init_purchase(RANDOM, 0, 5, 6, WHEN, 1, apdu.ALG_SM4, CARD_NO, TEST_ISSUER_CODE)
    apdu.check(psam.transmit(init), "PSAM INIT")
    sespk_3des = ref_3des(ref_card_key(TEST_ISSUER_KEYS.purchase, CARD_NO), RANDOM + be(0, 2) + be(1, 2))
    assert psam.transmit(apdu.psam_verify_mac2(ref_mac(sespk_3des, be(5, 4)))) == b"\x93\x02"

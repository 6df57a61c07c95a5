"""SimCard and SimPsam driven from the terminal's side with epurse.apdu only; MACs and TACs checked with an
independent pycryptodome implementation (tests/reference_crypto.py) from the master keys."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_crypto import (
    OpensslUnavailable,
    be,
    ref_3des,
    ref_card_key,
    ref_mac,
    ref_retail_mac,
    ref_sm4_card_key,
    ref_sm4_mac,
    ref_tac_key,
)

from epurse import apdu, crypto
from epurse.crypto import bcd_date, bcd_time
from epurse.keys import TEST_ISSUER_CODE, TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam

ASN = bytes.fromhex("31000000000000012345")
TERMINAL = bytes.fromhex("010000000042")
WHEN = datetime(2024, 3, 5, 7, 30, 0)
RANDOM4 = bytes.fromhex("1A2B3C4D")


# --- a terminal, written against epurse.apdu only ------------------------------------------------------------


def new_card(balance: int = 1000, **kw) -> SimCard:
    return SimCard(ASN, 1, balance, start=date(2024, 1, 1), end=date(2034, 12, 31), **kw)


def send(device, command: bytes, name: str) -> bytes:
    return apdu.check(device.transmit(command), name)


def purchase(
    card: SimCard,
    psam: SimPsam,
    amount: int,
    when: datetime = WHEN,
    tx_type: int = apdu.TX_PURCHASE,
    capp: bytes | None = None,
):
    send(card, apdu.select_aid(), "SELECT")
    info = apdu.parse_public_info(send(card, apdu.read_public_info(), "READ BINARY 0015"))
    terminal = send(psam, apdu.psam_read_terminal_id(), "READ TERMINAL NUMBER")
    composite = tx_type == apdu.TX_COMPOSITE
    init = apdu.parse_init_purchase(
        send(card, apdu.init_purchase(1, amount, terminal, composite=composite), "INITIALIZE FOR PURCHASE")
    )
    if capp is not None:
        send(card, apdu.update_capp_cache(capp), "UPDATE CAPP DATA CACHE")
    psam_answer = apdu.parse_psam_init_purchase(
        send(
            psam,
            apdu.psam_init_purchase(
                init.random, init.ttc, amount, tx_type, when, init.key_version, init.algorithm,
                info.asn[2:], info.issuer,
            ),
            "PSAM INIT FOR PURCHASE",
        )
    )  # fmt: skip
    debit = apdu.parse_debit(
        send(
            card,
            apdu.debit_purchase(psam_answer.terminal_seq, bcd_date(when), bcd_time(when), psam_answer.mac1),
            "DEBIT FOR PURCHASE",
        )
    )
    send(psam, apdu.psam_verify_mac2(debit.mac2), "VERIFY MAC2")
    return init, psam_answer, debit


# --- purchase ------------------------------------------------------------------------------------------------


def test_full_purchase_debits_counts_and_gives_a_tac_the_back_office_can_verify():
    card, psam = new_card(1000, ttc=41), SimPsam(TERMINAL, sequence=7)
    init, psam_answer, debit = purchase(card, psam, 200)

    assert (init.balance, init.ttc, init.overdraft, init.key_version, init.algorithm) == (1000, 41, 0, 1, 0)
    assert card.balance == 800 and card.ttc == 42
    assert psam_answer.terminal_seq == 7 and psam.sequence == 8
    expected_tac = ref_mac(
        ref_tac_key(ref_card_key(TEST_ISSUER_KEYS.tac, ASN)),
        be(200, 4) + b"\x06" + TERMINAL + be(7, 4) + bcd_date(WHEN) + bcd_time(WHEN),
    )
    assert debit.tac == expected_tac
    # MAC2 from the session key, recomputed from the purchase master key
    sespk = ref_3des(ref_card_key(TEST_ISSUER_KEYS.purchase, ASN), init.random + be(41, 2) + be(7, 2))
    assert debit.mac2 == ref_mac(sespk, be(200, 4))

    record = card.log[0]
    assert (record.ttc, record.amount, record.tx_type, record.terminal_id, record.tac) == (
        41, 200, 0x06, TERMINAL, expected_tac,
    )  # fmt: skip
    assert (record.date, record.time, record.terminal_seq, record.balance_after) == (
        bcd_date(WHEN), bcd_time(WHEN), 7, 800,
    )  # fmt: skip
    assert apdu.parse_balance(send(card, apdu.get_balance(), "GET BALANCE")) == 800


def test_second_purchase_and_the_log_reads_back_newest_first():
    card, psam = new_card(1000), SimPsam(TERMINAL)
    purchase(card, psam, 100)
    purchase(card, psam, 250, tx_type=apdu.TX_COMPOSITE)
    assert card.balance == 650 and card.ttc == 2 and psam.sequence == 3
    assert [t.amount for t in card.log] == [250, 100]
    newest = apdu.parse_log_record(send(card, apdu.read_log_record(1), "READ RECORD"))
    assert (newest.ttc, newest.amount, newest.tx_type, newest.terminal_id) == (1, 250, 0x09, TERMINAL)
    assert card.transmit(apdu.read_log_record(3))[-2:] == b"\x6a\x83"


def test_transaction_prove_returns_the_last_purchase_only():
    card, psam = new_card(1000, ttc=5), SimPsam(TERMINAL)
    _, _, debit = purchase(card, psam, 100)
    prove = apdu.parse_transaction_prove(
        send(card, apdu.get_transaction_prove(0x06, 5), "GET TRANSACTION PROVE")
    )
    assert (prove.mac2, prove.tac) == (debit.mac2, debit.tac)
    assert card.transmit(apdu.get_transaction_prove(0x06, 4)) == b"\x94\x06"  # not this card's last one
    assert card.transmit(apdu.get_transaction_prove(0x09, 5)) == b"\x94\x06"


def test_insufficient_funds_is_9401_and_changes_nothing():
    card, psam = new_card(150, ttc=3), SimPsam(TERMINAL)
    with pytest.raises(apdu.StatusError) as err:
        purchase(card, psam, 151)
    assert err.value.sw == apdu.SW_INSUFFICIENT_FUNDS
    assert "insufficient funds" in str(err.value)
    assert (card.balance, card.ttc, card.log, psam.sequence) == (150, 3, [], 1)


def test_forged_mac1_is_9302_and_nothing_is_debited():
    card, psam = new_card(1000), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    init = apdu.parse_init_purchase(send(card, apdu.init_purchase(1, 200, TERMINAL), "INIT"))
    answer = apdu.parse_psam_init_purchase(
        send(
            psam,
            apdu.psam_init_purchase(init.random, init.ttc, 200, 0x06, WHEN, 1, 0, ASN[2:], TEST_ISSUER_CODE),
            "PSAM INIT",
        )
    )
    forged = bytes([answer.mac1[0] ^ 0x01]) + answer.mac1[1:]
    response = card.transmit(apdu.debit_purchase(answer.terminal_seq, bcd_date(WHEN), bcd_time(WHEN), forged))
    assert response == b"\x93\x02"
    assert (card.balance, card.ttc, card.log) == (1000, 0, [])
    # the session is gone: the genuine MAC1 is now too late
    response = card.transmit(
        apdu.debit_purchase(answer.terminal_seq, bcd_date(WHEN), bcd_time(WHEN), answer.mac1)
    )
    assert response == b"\x69\x85"
    assert card.balance == 1000


def test_debit_claiming_another_amount_or_time_fails_mac1():
    # MAC1 covers the date and time: a terminal cannot change them after the PSAM signed
    card, psam = new_card(1000), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    init = apdu.parse_init_purchase(send(card, apdu.init_purchase(1, 200, TERMINAL), "INIT"))
    answer = apdu.parse_psam_init_purchase(
        send(
            psam,
            apdu.psam_init_purchase(init.random, init.ttc, 200, 6, WHEN, 1, 0, ASN[2:], bytes(8)),
            "PSAM",
        )
    )
    later = datetime(2024, 3, 5, 7, 30, 1)
    assert card.transmit(
        apdu.debit_purchase(answer.terminal_seq, bcd_date(WHEN), bcd_time(later), answer.mac1)
    ) == (b"\x93\x02")
    assert card.balance == 1000


def test_debit_without_init_is_6985():
    card = new_card(1000)
    send(card, apdu.select_aid(), "SELECT")
    assert card.transmit(apdu.debit_purchase(1, bcd_date(WHEN), bcd_time(WHEN), bytes(4))) == b"\x69\x85"
    # an INIT followed by another command also ends the purchase
    send(card, apdu.init_purchase(1, 10, TERMINAL), "INIT")
    send(card, apdu.get_balance(), "GET BALANCE")
    assert card.transmit(apdu.debit_purchase(1, bcd_date(WHEN), bcd_time(WHEN), bytes(4))) == b"\x69\x85"
    assert card.balance == 1000


def test_psam_rejects_a_wrong_mac2_and_mac2_without_purchase():
    card, psam = new_card(1000), SimPsam(TERMINAL)
    assert psam.transmit(apdu.psam_verify_mac2(bytes(4))) == b"\x69\x85"
    send(card, apdu.select_aid(), "SELECT")
    init = apdu.parse_init_purchase(send(card, apdu.init_purchase(1, 5, TERMINAL), "INIT"))
    send(psam, apdu.psam_init_purchase(init.random, init.ttc, 5, 6, WHEN, 1, 0, ASN[2:], bytes(8)), "PSAM")
    assert psam.transmit(apdu.psam_verify_mac2(b"\x00\x00\x00\x01")) == b"\x93\x02"


def test_psam_terminal_id_and_refusals():
    psam = SimPsam(TERMINAL)
    assert send(psam, apdu.psam_read_terminal_id(), "READ") == TERMINAL
    unknown_algorithm = apdu.psam_init_purchase(bytes(4), 0, 1, 6, WHEN, 1, 0x07, ASN[2:], bytes(8))
    assert psam.transmit(unknown_algorithm) == b"\x6a\x80"
    other_version = apdu.psam_init_purchase(bytes(4), 0, 1, 6, WHEN, 2, 0, ASN[2:], bytes(8))
    assert psam.transmit(other_version) == b"\x94\x03"
    assert psam.sequence == 1


# --- selection, files, status words --------------------------------------------------------------------------


def test_commands_before_select_are_refused():
    card = new_card(1000)
    assert card.transmit(apdu.get_balance()) == b"\x69\x85"
    assert card.transmit(apdu.init_purchase(1, 10, TERMINAL)) == b"\x69\x85"
    assert card.transmit(apdu.read_public_info()) == b"\x6a\x82"
    assert card.transmit(apdu.select_aid(bytes.fromhex("A0000000031010"))) == b"\x6a\x82"
    assert card.transmit(apdu.get_balance()) == b"\x69\x85"
    response = card.transmit(apdu.select_aid())
    assert response[-2:] == b"\x90\x00" and apdu.AID in response


def test_public_and_holder_files():
    card = SimCard(
        ASN, 5, 0, start=date(2024, 1, 1), end=date(2029, 6, 30), staff_no="D0042", holder_name="王小明"
    )
    send(card, apdu.select_aid(), "SELECT")
    info = apdu.parse_public_info(send(card, apdu.read_public_info(), "READ 0015"))
    assert (info.issuer, info.asn, info.start, info.end, info.card_type) == (
        TEST_ISSUER_CODE, ASN, date(2024, 1, 1), date(2029, 6, 30), 5,
    )  # fmt: skip
    holder = apdu.parse_holder_info(send(card, apdu.read_holder_info(), "READ 0016"))
    assert holder == apdu.HolderInfo("D0042", "王小明")


def test_blocked_card_selects_with_6283_and_refuses_purchase():
    card = new_card(1000, blocked=True)
    response = card.transmit(apdu.select_aid())
    assert response[-2:] == b"\x62\x83"
    with pytest.raises(apdu.StatusError) as err:
        apdu.check(response, "SELECT")
    assert err.value.sw == apdu.SW_APP_BLOCKED
    assert apdu.parse_public_info(send(card, apdu.read_public_info(), "READ")).asn == ASN
    assert card.transmit(apdu.init_purchase(1, 10, TERMINAL)) == b"\x69\x85"


@pytest.mark.parametrize(
    ("command", "sw"),
    [
        (bytes.fromhex("805C0002"), b"\x90\x00"),  # case 2 without Le is still fine
        (bytes.fromhex("805C000208"), b"\x6c\x04"),  # wrong Le: the card says the right one
        (bytes.fromhex("00B202C440"), b"\x6a\x83"),  # log record 2 of an empty log
        (bytes.fromhex("00B202BC40"), b"\x6a\x83"),  # CAPP record never written
        (bytes.fromhex("00B201CC17"), b"\x6a\x82"),  # SFI 19: no such file
        (bytes.fromhex("00B201C017"), b"\x6b\x00"),  # P2 mode other than "record number in P1"
        (bytes.fromhex("00B0990000"), b"\x6a\x82"),  # READ BINARY of SFI 19
        (bytes.fromhex("805A000502000108"), b"\x6b\x00"),  # prove of type 05: neither a purchase nor a load
        (bytes.fromhex("805A000202000108"), b"\x94\x06"),  # prove of a load the card never made
        (bytes.fromhex("805A000602000108"), b"\x94\x06"),  # no such purchase
        (bytes.fromhex("841E0000051122334455"), b"\x67\x00"),  # MAC of 5 bytes
        (bytes.fromhex("841E0000041122334455")[:9], b"\x69\x85"),  # no challenge
        (bytes.fromhex("0084000004"), None),  # a challenge: 4 bytes and 9000
        (bytes.fromhex("805001020A0100000001010000000042"), b"\x67\x00"),  # Lc 0A for an 11-byte command
        (bytes.fromhex("805001020B01000000010100000000"), b"\x67\x00"),  # body shorter than Lc
        (bytes.fromhex("805C0001") + b"\x04", b"\x6b\x00"),
        (bytes.fromhex("80CA000000"), b"\x6d\x00"),
        (bytes.fromhex("905C000204"), b"\x6e\x00"),
        (b"\x80\x5c", b"\x67\x00"),
        (b"", b"\x67\x00"),
        (bytes.fromhex("805001020B02000000010100000000420F"), b"\x94\x03"),  # key index 2
    ],
)
def test_status_words(command, sw):
    card = new_card(1000)
    send(card, apdu.select_aid(), "SELECT")
    response = card.transmit(command)
    if sw is None:
        assert len(response) == 6 and response[-2:] == b"\x90\x00"
    else:
        assert response[-2:] == sw
        assert apdu.sw_text(int.from_bytes(sw, "big")) != "unknown status"


# --- load (over-the-air top-up) ------------------------------------------------------------------------------


def test_load_with_host_mac2_credits_and_gives_a_load_tac():
    card = new_card(300, online_ttc=2)
    send(card, apdu.select_aid(), "SELECT")
    init = apdu.parse_init_load(send(card, apdu.init_load(1, 5000, TERMINAL), "INITIALIZE FOR LOAD"))
    assert (init.balance, init.online_ttc, init.key_version, init.algorithm) == (300, 2, 1, 0)

    # the host: session load key from the load master key, check MAC1, make MAC2
    seslk = ref_3des(ref_card_key(TEST_ISSUER_KEYS.load, ASN), init.random + be(2, 2) + b"\x80\x00")
    assert init.mac1 == ref_mac(seslk, be(300, 4) + be(5000, 4) + b"\x02" + TERMINAL)
    mac2 = ref_mac(seslk, be(5000, 4) + b"\x02" + TERMINAL + bcd_date(WHEN) + bcd_time(WHEN))

    tac = apdu.parse_credit(
        send(card, apdu.credit_load(bcd_date(WHEN), bcd_time(WHEN), mac2), "CREDIT FOR LOAD")
    )
    assert card.balance == 5300 and card.online_ttc == 3 and card.ttc == 0
    assert tac == ref_mac(
        ref_tac_key(ref_card_key(TEST_ISSUER_KEYS.tac, ASN)),
        be(5300, 4) + be(2, 2) + be(5000, 4) + b"\x02" + TERMINAL + bcd_date(WHEN) + bcd_time(WHEN),
    )
    assert (card.log[0].tx_type, card.log[0].amount, card.log[0].tac) == (0x02, 5000, tac)


def test_load_with_a_wrong_mac2_is_refused():
    card = new_card(300)
    send(card, apdu.select_aid(), "SELECT")
    send(card, apdu.init_load(1, 5000, TERMINAL), "INITIALIZE FOR LOAD")
    assert card.transmit(apdu.credit_load(bcd_date(WHEN), bcd_time(WHEN), bytes(4))) == b"\x93\x02"
    assert (card.balance, card.online_ttc, card.log) == (300, 0, [])
    assert card.transmit(apdu.credit_load(bcd_date(WHEN), bcd_time(WHEN), bytes(4))) == b"\x69\x85"


def test_load_past_max_balance_is_refused():
    card = new_card(900, max_balance=1000)
    send(card, apdu.select_aid(), "SELECT")
    assert card.transmit(apdu.init_load(1, 101, TERMINAL)) == b"\x69\x85"


# --- SM4 cards ----------------------------------------------------------------------------------------------

SM4 = crypto.suite(apdu.ALG_SM4)


def test_sm4_purchase_end_to_end_with_the_psam():
    card, psam = new_card(1000, ttc=41, algorithm=apdu.ALG_SM4), SimPsam(TERMINAL, sequence=7)
    init, psam_answer, debit = purchase(card, psam, 200)
    assert (init.algorithm, init.ttc, psam_answer.terminal_seq) == (apdu.ALG_SM4, 41, 7)
    assert card.balance == 800 and card.ttc == 42

    # the back office's side, with the SM4 suite from the master keys
    dtk = SM4.diversify(TEST_ISSUER_KEYS.tac, ASN)
    assert debit.tac == SM4.purchase_tac(dtk, 200, 0x06, TERMINAL, 7, bcd_date(WHEN), bcd_time(WHEN))
    sespk = SM4.purchase_session_key(SM4.diversify(TEST_ISSUER_KEYS.purchase, ASN), init.random, 41, 7)
    assert debit.mac2 == SM4.purchase_mac2(sespk, 200)
    # and with nothing of farebox's: openssl
    try:
        ref_tac = ref_sm4_mac(
            ref_sm4_card_key(TEST_ISSUER_KEYS.tac, ASN),
            be(200, 4) + b"\x06" + TERMINAL + be(7, 4) + bcd_date(WHEN) + bcd_time(WHEN),
        )
    except OpensslUnavailable as exc:
        pytest.skip(str(exc))
    assert debit.tac == ref_tac
    # a 3DES TAC for the same purchase would be a different one
    assert debit.tac != crypto.purchase_tac(
        crypto.diversify(TEST_ISSUER_KEYS.tac, ASN), 200, 6, TERMINAL, 7, bcd_date(WHEN), bcd_time(WHEN)
    )


def test_sm4_load_end_to_end_with_the_host_side_computed_by_the_suite():
    card = new_card(300, online_ttc=2, algorithm=apdu.ALG_SM4)
    send(card, apdu.select_aid(), "SELECT")
    init = apdu.parse_init_load(send(card, apdu.init_load(1, 5000, TERMINAL), "INITIALIZE FOR LOAD"))
    assert init.algorithm == apdu.ALG_SM4
    suite = crypto.suite(init.algorithm)  # the host picks the suite the card names
    seslk = suite.load_session_key(suite.diversify(TEST_ISSUER_KEYS.load, ASN), init.random, init.online_ttc)
    assert init.mac1 == suite.load_mac1(seslk, 300, 5000, TERMINAL)
    mac2 = suite.load_mac2(seslk, 5000, TERMINAL, bcd_date(WHEN), bcd_time(WHEN))
    tac = apdu.parse_credit(send(card, apdu.credit_load(bcd_date(WHEN), bcd_time(WHEN), mac2), "CREDIT"))
    assert card.balance == 5300 and card.online_ttc == 3
    dtk = suite.diversify(TEST_ISSUER_KEYS.tac, ASN)
    assert tac == suite.load_tac(dtk, 5300, 2, 5000, TERMINAL, bcd_date(WHEN), bcd_time(WHEN))
    # a 3DES MAC2 does not load an SM4 card
    send(card, apdu.init_load(1, 1, TERMINAL), "INITIALIZE FOR LOAD")
    assert card.transmit(apdu.credit_load(bcd_date(WHEN), bcd_time(WHEN), bytes(4))) == b"\x93\x02"
    assert card.balance == 5300


def test_sm4_card_says_so_in_its_public_file_and_refuses_3des_mac1():
    card = new_card(1000, algorithm=apdu.ALG_SM4)
    send(card, apdu.select_aid(), "SELECT")
    assert apdu.parse_public_info(send(card, apdu.read_public_info(), "READ")).algorithm == apdu.ALG_SM4
    assert apdu.parse_public_info(new_card().public_info()).algorithm == apdu.ALG_3DES
    init = apdu.parse_init_purchase(send(card, apdu.init_purchase(1, 200, TERMINAL), "INIT"))
    # a PSAM told "3DES" makes a 3DES MAC1, which the SM4 card refuses
    answer = apdu.parse_psam_init_purchase(send(SimPsam(TERMINAL), apdu.psam_init_purchase(
        init.random, init.ttc, 200, 6, WHEN, 1, apdu.ALG_3DES, ASN[2:], TEST_ISSUER_CODE), "PSAM"))
    debit = apdu.debit_purchase(answer.terminal_seq, bcd_date(WHEN), bcd_time(WHEN), answer.mac1)
    assert card.transmit(debit) == b"\x93\x02" and card.balance == 1000
    with pytest.raises(ValueError):
        new_card(algorithm=0x01)


# --- APPLICATION BLOCK -------------------------------------------------------------------------------------


def block(card: SimCard, psam: SimPsam) -> bytes:
    """The terminal's deny-list lock: challenge from the card, MAC from the PSAM, APPLICATION BLOCK."""
    info = apdu.parse_public_info(send(card, apdu.read_public_info(), "READ BINARY 0015"))
    challenge = apdu.parse_challenge(send(card, apdu.get_challenge(), "GET CHALLENGE"))
    mac = apdu.parse_psam_mac(send(
        psam, apdu.psam_block_mac(info.asn[2:], info.issuer, challenge, info.algorithm), "PSAM BLOCK MAC"))
    return card.transmit(apdu.application_block(mac))


@pytest.mark.parametrize("algorithm", [apdu.ALG_3DES, apdu.ALG_SM4])
def test_a_valid_block_mac_blocks_the_card_for_good(algorithm):
    card, psam = new_card(1000, algorithm=algorithm), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    assert block(card, psam) == b"\x90\x00"
    assert card.blocked
    assert card.transmit(apdu.init_purchase(1, 10, TERMINAL)) == b"\x69\x85"
    assert card.transmit(apdu.init_purchase(1, 10, TERMINAL, composite=True)) == b"\x69\x85"
    assert card.transmit(apdu.init_load(1, 10, TERMINAL)) == b"\x69\x85"
    response = card.transmit(apdu.select_aid())
    assert response[-2:] == b"\x62\x83"
    # still readable, so a terminal can say whose card it is
    assert apdu.parse_public_info(send(card, apdu.read_public_info(), "READ")).asn == ASN
    assert apdu.parse_balance(send(card, apdu.get_balance(), "GET BALANCE")) == 1000
    assert block(card, psam) == b"\x90\x00" and card.blocked  # blocking again changes nothing


def test_block_mac_checked_against_the_reference():
    card = new_card(1000)
    send(card, apdu.select_aid(), "SELECT")
    challenge = apdu.parse_challenge(send(card, apdu.get_challenge(), "GET CHALLENGE"))
    damk = ref_card_key(TEST_ISSUER_KEYS.maintenance, ASN)
    mac = ref_retail_mac(damk, challenge + bytes(4), bytes.fromhex("841E000004"))
    assert send(SimPsam(TERMINAL), apdu.psam_block_mac(ASN[2:], TEST_ISSUER_CODE, challenge, 0), "PSAM") == mac
    assert card.transmit(apdu.application_block(mac)) == b"\x90\x00" and card.blocked


@pytest.mark.parametrize("algorithm", [apdu.ALG_3DES, apdu.ALG_SM4])
def test_a_forged_block_mac_is_9302_and_the_card_stays_usable(algorithm):
    card, psam = new_card(1000, algorithm=algorithm), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    challenge = apdu.parse_challenge(send(card, apdu.get_challenge(), "GET CHALLENGE"))
    good = apdu.parse_psam_mac(send(psam, apdu.psam_block_mac(ASN[2:], bytes(8), challenge, algorithm), "PSAM"))
    forged = bytes([good[0] ^ 0x80]) + good[1:]
    assert card.transmit(apdu.application_block(forged)) == b"\x93\x02"
    assert not card.blocked
    # the challenge is spent: the genuine MAC is now too late
    assert card.transmit(apdu.application_block(good)) == b"\x69\x85"
    assert not card.blocked
    purchase(card, psam, 100)
    assert card.balance == 900


def test_application_block_needs_a_challenge_just_before():
    card, psam = new_card(1000), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    assert card.transmit(apdu.application_block(bytes(4))) == b"\x69\x85"  # no challenge at all
    challenge = apdu.parse_challenge(send(card, apdu.get_challenge(), "GET CHALLENGE"))
    mac = apdu.parse_psam_mac(send(psam, apdu.psam_block_mac(ASN[2:], bytes(8), challenge, 0), "PSAM"))
    send(card, apdu.get_balance(), "GET BALANCE")  # any command in between ends the challenge
    assert card.transmit(apdu.application_block(mac)) == b"\x69\x85"
    assert not card.blocked
    # not selected: refused even with a fresh challenge and its right MAC
    send(card, bytes.fromhex("00A40000023F00"), "SELECT MF")
    challenge = apdu.parse_challenge(send(card, apdu.get_challenge(), "GET CHALLENGE"))
    mac = apdu.parse_psam_mac(send(psam, apdu.psam_block_mac(ASN[2:], bytes(8), challenge, 0), "PSAM"))
    assert card.transmit(apdu.application_block(mac)) == b"\x69\x85"
    assert not card.blocked


def test_challenges_are_fresh_and_le_is_checked():
    card = new_card()
    challenges = {apdu.parse_challenge(send(card, apdu.get_challenge(), "GET CHALLENGE")) for _ in range(20)}
    assert len(challenges) == 20
    assert card.transmit(bytes.fromhex("0084000008")) == b"\x6c\x04"
    assert card.transmit(bytes.fromhex("0084000104")) == b"\x6b\x00"
    assert len(card.transmit(bytes.fromhex("00840000"))) == 6


def test_psam_block_mac_refusals():
    psam = SimPsam(TERMINAL)
    assert psam.transmit(apdu.psam_block_mac(ASN[2:], bytes(8), RANDOM4, 0x07)) == b"\x6a\x80"
    assert psam.transmit(apdu.psam_block_mac(ASN[2:], bytes(8), RANDOM4, 0)[:-2]) == b"\x67\x00"
    wrong_p1 = bytearray(apdu.psam_block_mac(ASN[2:], bytes(8), RANDOM4, 0))
    wrong_p1[2] = 0x01
    assert psam.transmit(bytes(wrong_p1)) == b"\x6b\x00"
    # another card's MAC does not block this one
    card = new_card()
    send(card, apdu.select_aid(), "SELECT")
    challenge = apdu.parse_challenge(send(card, apdu.get_challenge(), "GET CHALLENGE"))
    other = bytes.fromhex("0000000000099999")
    mac = apdu.parse_psam_mac(send(psam, apdu.psam_block_mac(other, bytes(8), challenge, 0), "PSAM"))
    assert card.transmit(apdu.application_block(mac)) == b"\x93\x02"


# --- composite purchase and the CAPP record ----------------------------------------------------------------

RECORD = bytes(range(0x40, 0x80))


@pytest.mark.parametrize("algorithm", [apdu.ALG_3DES, apdu.ALG_SM4])
def test_composite_purchase_writes_the_record_with_the_debit(algorithm):
    card, psam = new_card(1000, ttc=5, algorithm=algorithm), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    assert card.transmit(apdu.read_capp_record()) == b"\x6a\x83"  # never written
    _, _, debit = purchase(card, psam, 150, tx_type=apdu.TX_COMPOSITE, capp=RECORD)
    assert card.balance == 850 and card.log[0].tx_type == apdu.TX_COMPOSITE
    assert apdu.parse_capp_record(send(card, apdu.read_capp_record(), "READ RECORD 17/02")) == RECORD
    assert send(card, bytes.fromhex("00B202BC00"), "READ RECORD Le 00") == RECORD
    assert card.transmit(bytes.fromhex("00B202BC10")) == b"\x6c\x40"
    assert card.transmit(bytes.fromhex("00B201BC40")) == b"\x6a\x83"
    prove = apdu.parse_transaction_prove(send(card, apdu.get_transaction_prove(0x09, 5), "PROVE"))
    assert (prove.tac, prove.mac2) == (debit.tac, debit.mac2)
    assert card.transmit(apdu.get_transaction_prove(0x06, 5)) == b"\x94\x06"
    # a composite purchase without an UPDATE leaves the record as it was
    purchase(card, psam, 50, tx_type=apdu.TX_COMPOSITE)
    assert card.balance == 800 and card.capp_record == RECORD


def test_capp_update_is_dropped_when_the_debit_fails():
    card, psam = new_card(1000), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    init = apdu.parse_init_purchase(send(card, apdu.init_purchase(1, 200, TERMINAL, composite=True), "INIT"))
    send(card, apdu.update_capp_cache(RECORD), "UPDATE CAPP DATA CACHE")
    answer = apdu.parse_psam_init_purchase(send(psam, apdu.psam_init_purchase(
        init.random, init.ttc, 200, 0x09, WHEN, 1, 0, ASN[2:], TEST_ISSUER_CODE), "PSAM"))
    forged = bytes(4)
    assert card.transmit(apdu.debit_purchase(answer.terminal_seq, bcd_date(WHEN), bcd_time(WHEN), forged)) == (
        b"\x93\x02"
    )
    assert card.capp_record is None and card.balance == 1000
    assert card.transmit(apdu.read_capp_record()) == b"\x6a\x83"
    # a card pulled away after the UPDATE (the next command is anything else) drops it too
    send(card, apdu.init_purchase(1, 200, TERMINAL, composite=True), "INIT")
    send(card, apdu.update_capp_cache(RECORD), "UPDATE CAPP DATA CACHE")
    send(card, apdu.get_balance(), "GET BALANCE")
    assert card.capp_record is None


def test_capp_update_only_right_after_a_composite_init():
    card = new_card(1000)
    send(card, apdu.select_aid(), "SELECT")
    assert card.transmit(apdu.update_capp_cache(RECORD)) == b"\x69\x85"
    send(card, apdu.init_purchase(1, 10, TERMINAL), "INIT P1 01")
    assert card.transmit(apdu.update_capp_cache(RECORD)) == b"\x69\x85"
    send(card, apdu.init_purchase(1, 10, TERMINAL, composite=True), "INIT P1 03")
    send(card, apdu.update_capp_cache(RECORD), "UPDATE")
    assert card.transmit(apdu.update_capp_cache(RECORD)) == b"\x69\x85"  # one UPDATE per purchase
    send(card, apdu.init_purchase(1, 10, TERMINAL, composite=True), "INIT P1 03")
    assert card.transmit(bytes.fromhex("80DC02B83F") + RECORD[:63]) == b"\x67\x00"
    send(card, apdu.init_purchase(1, 10, TERMINAL, composite=True), "INIT P1 03")
    assert card.transmit(bytes.fromhex("80DC02C040") + RECORD) == b"\x6a\x82"  # SFI 18 is not the CAPP file
    send(card, apdu.init_purchase(1, 10, TERMINAL, composite=True), "INIT P1 03")
    assert card.transmit(bytes.fromhex("80DC03B840") + RECORD) == b"\x6a\x83"
    assert card.capp_record is None and card.balance == 1000


# --- persistence -------------------------------------------------------------------------------------------


def test_state_round_trips_without_keys(tmp_path):
    card, psam = new_card(1000, algorithm=apdu.ALG_SM4, staff_no="S1", holder_name="李四"), SimPsam(TERMINAL)
    purchase(card, psam, 100, tx_type=apdu.TX_COMPOSITE, capp=RECORD)
    state = card.to_state()
    text = json.dumps(state)
    for key in (TEST_ISSUER_KEYS.purchase, TEST_ISSUER_KEYS.tac, TEST_ISSUER_KEYS.maintenance):
        assert key.hex() not in text.lower()
    again = SimCard.from_state(json.loads(text))
    assert again.to_state() == state
    assert (again.balance, again.ttc, again.algorithm, again.capp_record, again.holder_name) == (
        900, 1, apdu.ALG_SM4, RECORD, "李四",
    )  # fmt: skip
    card.save(tmp_path / "card.json")
    assert SimCard.load(tmp_path / "card.json").to_state() == state
    with pytest.raises(ValueError):
        SimCard.from_state({"format": "something else"})
    with pytest.raises(ValueError):
        SimCard.from_state({**state, "asn": "12"})
    broken = dict(state)
    del broken["balance"]
    with pytest.raises(ValueError):
        SimCard.from_state(broken)


def test_a_reloaded_card_still_proves_its_last_purchase(tmp_path):
    path = tmp_path / "card.json"
    card, psam = new_card(1000, ttc=7, state_file=path), SimPsam(TERMINAL)
    assert SimCard.load(path).balance == 1000  # written at issue
    _, _, debit = purchase(card, psam, 300)
    del card  # the process goes away; the file is all there is

    card = SimCard.load(path)
    assert (card.balance, card.ttc) == (700, 8)
    send(card, apdu.select_aid(), "SELECT")
    prove = apdu.parse_transaction_prove(send(card, apdu.get_transaction_prove(0x06, 7), "PROVE"))
    assert (prove.tac, prove.mac2) == (debit.tac, debit.mac2)
    # and it keeps writing there
    purchase(card, psam, 200)
    assert SimCard.load(path).balance == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]  # no temp files left behind


def test_every_change_is_on_disk_before_the_answer(tmp_path):
    path = tmp_path / "card.json"
    card, psam = new_card(300, state_file=path), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    init = apdu.parse_init_load(send(card, apdu.init_load(1, 5000, TERMINAL), "INITIALIZE FOR LOAD"))
    seslk = ref_3des(ref_card_key(TEST_ISSUER_KEYS.load, ASN), init.random + be(0, 2) + b"\x80\x00")
    mac2 = ref_mac(seslk, be(5000, 4) + b"\x02" + TERMINAL + bcd_date(WHEN) + bcd_time(WHEN))
    send(card, apdu.credit_load(bcd_date(WHEN), bcd_time(WHEN), mac2), "CREDIT FOR LOAD")
    saved = SimCard.load(path)
    assert (saved.balance, saved.online_ttc, saved.log[0].tx_type) == (5300, 1, 0x02)
    assert block(card, psam) == b"\x90\x00"
    assert SimCard.load(path).blocked


def test_a_failed_write_undoes_the_change_and_answers_6581(tmp_path):
    path = tmp_path / "card.json"
    card, psam = new_card(1000, state_file=path), SimPsam(TERMINAL)
    card.state_file = tmp_path / "gone" / "card.json"  # its folder does not exist: every write fails
    with pytest.raises(apdu.StatusError) as err:
        purchase(card, psam, 100, tx_type=apdu.TX_COMPOSITE, capp=RECORD)
    assert err.value.sw == apdu.SW_MEMORY_FAILURE
    assert (card.balance, card.ttc, card.log, card.capp_record) == (1000, 0, [], None)
    send(card, apdu.select_aid(), "SELECT")
    assert block(card, psam) == b"\x65\x81" and not card.blocked


_KILLED_CHILD = """
from datetime import datetime
from epurse import apdu
from epurse.crypto import bcd_date, bcd_time
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
card, psam = SimCard.load({path!r}), SimPsam(bytes.fromhex("010000000042"))
when = datetime(2024, 3, 5, 7, 30)
card.transmit(apdu.select_aid())
print("ready", flush=True)
while True:  # purchases of 1 fen until killed
    init = apdu.parse_init_purchase(apdu.check(card.transmit(apdu.init_purchase(1, 1, psam.terminal_id)), "INIT"))
    sam = apdu.parse_psam_init_purchase(apdu.check(psam.transmit(apdu.psam_init_purchase(
        init.random, init.ttc, 1, 6, when, 1, init.algorithm, card.asn[2:], card.issuer)), "PSAM"))
    apdu.check(card.transmit(apdu.debit_purchase(sam.terminal_seq, bcd_date(when), bcd_time(when), sam.mac1)), "DEBIT")
"""


def test_killed_mid_purchase_leaves_the_old_or_the_new_state(tmp_path):
    path = tmp_path / "card.json"
    new_card(1_000_000, state_file=path)
    for delay in (0.15, 0.3, 0.45):
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CHILD.format(path=str(path))],
            stdout=subprocess.PIPE, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        card = SimCard.load(path)  # parses: never a half-written file
        assert card.ttc > 0 and card.balance == 1_000_000 - card.ttc  # every debit counted, none lost
        assert card.log[0].ttc == card.ttc - 1


# --- fuzz ----------------------------------------------------------------------------------------------------

headers = st.sampled_from(
    [b"", b"\x00\xa4\x04\x00", b"\x00\xb0", b"\x00\xb2", b"\x00\xb2\x02\xbc", b"\x80\x5c", b"\x80\x50",
     b"\x80\x50\x03\x02\x0b", b"\x80\x54", b"\x80\x52", b"\x80\x5a", b"\x80\x70", b"\x80\x72", b"\x00\x84",
     b"\x00\x84\x00\x00", b"\x84\x1e", b"\x84\x1e\x00\x00\x04", b"\x80\xdc", b"\x80\xdc\x02\xb8\x40", b"\x80\xfa",
     b"\x80\xfa\x05\x00\x15"]
)  # fmt: skip
apdus = st.one_of(
    st.binary(max_size=300), st.tuples(headers, st.binary(max_size=70)).map(lambda t: t[0] + t[1])
)


@settings(max_examples=400)
@given(st.sampled_from([apdu.ALG_3DES, apdu.ALG_SM4]), st.lists(apdus, max_size=8))
def test_random_apdus_never_raise(algorithm, commands):
    card, psam = new_card(1000, algorithm=algorithm), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    for command in commands:
        for device in (card, psam):
            response = device.transmit(command)
            assert isinstance(response, bytes) and len(response) >= 2
            assert response[-2:] != b"\x6f\x00", f"internal error on {command.hex()}"
    assert 0 <= card.balance <= 1000
    assert not card.blocked  # nothing random forges a block MAC

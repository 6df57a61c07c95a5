"""SimCard and SimPsam driven from the terminal's side with epurse.apdu only; MACs and TACs checked with an
independent pycryptodome implementation (tests/reference_crypto.py) from the master keys."""

from __future__ import annotations

from datetime import date, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_crypto import be, ref_3des, ref_card_key, ref_mac, ref_tac_key

from epurse import apdu
from epurse.crypto import bcd_date, bcd_time
from epurse.keys import TEST_ISSUER_CODE, TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam

ASN = bytes.fromhex("31000000000000012345")
TERMINAL = bytes.fromhex("010000000042")
WHEN = datetime(2024, 3, 5, 7, 30, 0)


# --- a terminal, written against epurse.apdu only ------------------------------------------------------------


def new_card(balance: int = 1000, **kw) -> SimCard:
    return SimCard(ASN, 1, balance, start=date(2024, 1, 1), end=date(2034, 12, 31), **kw)


def send(device, command: bytes, name: str) -> bytes:
    return apdu.check(device.transmit(command), name)


def purchase(
    card: SimCard, psam: SimPsam, amount: int, when: datetime = WHEN, tx_type: int = apdu.TX_PURCHASE
):
    send(card, apdu.select_aid(), "SELECT")
    info = apdu.parse_public_info(send(card, apdu.read_public_info(), "READ BINARY 0015"))
    terminal = send(psam, apdu.psam_read_terminal_id(), "READ TERMINAL NUMBER")
    composite = tx_type == apdu.TX_COMPOSITE
    init = apdu.parse_init_purchase(
        send(card, apdu.init_purchase(1, amount, terminal, composite=composite), "INITIALIZE FOR PURCHASE")
    )
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
    sm4 = apdu.psam_init_purchase(bytes(4), 0, 1, 6, WHEN, 1, apdu.ALG_SM4, ASN[2:], bytes(8))
    assert psam.transmit(sm4) == b"\x6a\x80"
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
    assert card.transmit(command)[-2:] == sw


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


# --- fuzz ----------------------------------------------------------------------------------------------------

headers = st.sampled_from(
    [b"", b"\x00\xa4\x04\x00", b"\x00\xb0", b"\x00\xb2", b"\x80\x5c", b"\x80\x50", b"\x80\x54", b"\x80\x52",
     b"\x80\x5a", b"\x80\x70", b"\x80\x72"]
)  # fmt: skip
apdus = st.one_of(
    st.binary(max_size=300), st.tuples(headers, st.binary(max_size=60)).map(lambda t: t[0] + t[1])
)


@settings(max_examples=400)
@given(st.lists(apdus, max_size=8))
def test_random_apdus_never_raise(commands):
    card, psam = new_card(1000), SimPsam(TERMINAL)
    send(card, apdu.select_aid(), "SELECT")
    for command in commands:
        for device in (card, psam):
            response = device.transmit(command)
            assert isinstance(response, bytes) and len(response) >= 2
            assert response[-2:] != b"\x6f\x00", f"internal error on {command.hex()}"
    assert 0 <= card.balance <= 1000

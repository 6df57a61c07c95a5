"""The issuer key service: the encrypted key file round trip, wrong passphrase / KEK / altered file refused, the
host's load MAC2 accepted by a simulated card (3DES and SM4) and its TAC verified, and no key in any log line,
repr, str or error message."""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime

import pytest

from backoffice.keyservice import (
    KeyFileError,
    LoadRefused,
    LoadRequest,
    LocalKeyService,
    encrypt_keys,
    open_key_file,
    read_key_file,
    write_key_file,
)
from epurse import apdu, crypto
from epurse.apdu import ALG_3DES, ALG_SM4
from epurse.keys import IssuerKeys
from farebox.config import Settings
from farebox.keys import key_service
from hardware_sim.card import SimCard

KEYS = IssuerKeys(purchase=bytes.fromhex("00112233445566778899AABBCCDDEEFF"),
                  load=bytes.fromhex("102132435465768798A9BACBDCEDFE0F"),
                  tac=bytes.fromhex("2031425364758697A8B9CADBECFD0E1F"),
                  maintenance=bytes.fromhex("30415263748596A7B8C9DAEBFC0D1E2F"))
SECRETS = [getattr(KEYS, n).hex() for n in ("purchase", "load", "tac", "maintenance")]
PASS = "correct horse battery staple"
FAST_N = 2**10  # scrypt cost for tests only; the file records n, so the reader follows it
TERMINAL = bytes.fromhex("0A0000000001")
WHEN = datetime(2026, 11, 22, 8, 15, 0, tzinfo=UTC)


def no_secret_in(text: str) -> None:
    low = text.lower()
    for hexkey in SECRETS:
        assert hexkey not in low
        assert hexkey[:16] not in low and hexkey[16:] not in low


def test_round_trip_with_a_passphrase(tmp_path):
    path = tmp_path / "issuer.keys"
    write_key_file(path, KEYS, passphrase=PASS, n=FAST_N)
    content = path.read_bytes()
    no_secret_in(content.decode())  # encrypted at rest
    doc = json.loads(content)
    assert doc["format"] == "farebox-issuer-keys/1" and doc["kdf"]["name"] == "scrypt" and doc["kdf"]["n"] == FAST_N
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(path, passphrase=PASS) == KEYS
    with pytest.raises(FileExistsError):
        write_key_file(path, KEYS, passphrase=PASS, n=FAST_N)  # never overwrites a key file


def test_round_trip_with_a_raw_key_encryption_key():
    kek = bytes(range(32))
    assert open_key_file(encrypt_keys(KEYS, kek=kek), kek=kek) == KEYS


def test_wrong_passphrase_wrong_kek_and_altered_files_are_refused():
    content = encrypt_keys(KEYS, passphrase=PASS, n=FAST_N)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        open_key_file(content, passphrase=PASS + "!")
    with pytest.raises(KeyFileError, match="FAREBOX_ISSUER_KEYS_PASSPHRASE"):
        open_key_file(content)
    doc = json.loads(content)
    flipped = bytearray(bytes.fromhex(doc["ciphertext"]))
    flipped[3] ^= 1
    with pytest.raises(KeyFileError, match="altered"):
        open_key_file(json.dumps({**doc, "ciphertext": flipped.hex()}).encode(), passphrase=PASS)
    with pytest.raises(KeyFileError, match="altered"):  # the KDF's salt is bound to the key, so also refused
        open_key_file(json.dumps({**doc, "kdf": {**doc["kdf"], "salt": "00" * 16}}).encode(), passphrase=PASS)
    raw = encrypt_keys(KEYS, kek=bytes(32))
    with pytest.raises(KeyFileError, match="wrong passphrase or key-encryption key"):
        open_key_file(raw, kek=bytes([1]) * 32)
    with pytest.raises(KeyFileError, match="not a farebox-issuer-keys/1"):
        open_key_file(b"purchase = '00'")
    with pytest.raises(ValueError, match="at least 12"):
        encrypt_keys(KEYS, passphrase="short")


def _card(algorithm: int, balance: int = 1000) -> SimCard:
    return SimCard(bytes.fromhex("10000000000000004242"), 1, balance, keys=KEYS, algorithm=algorithm,
                   start=date(2026, 1, 1), end=date(2030, 12, 31))


@pytest.mark.parametrize("algorithm", [ALG_3DES, ALG_SM4])
def test_the_hosts_mac2_loads_a_real_card_and_its_tac_verifies(algorithm):
    service = LocalKeyService(KEYS)
    card = _card(algorithm)
    apdu.check(card.transmit(apdu.select_aid()), "SELECT")
    init = apdu.parse_init_load(apdu.check(card.transmit(apdu.init_load(1, 500, TERMINAL)), "INIT"))
    request = LoadRequest(asn=card.asn, algorithm=init.algorithm, balance=init.balance, online_ttc=init.online_ttc,
                          random=init.random, mac1=init.mac1, amount=500, terminal_id=TERMINAL)
    assert service.verify_load_mac1(request)
    date4, time3 = crypto.bcd_date(WHEN), crypto.bcd_time(WHEN)
    mac2 = service.load_mac2(request, date4, time3)
    tac = apdu.parse_credit(apdu.check(card.transmit(apdu.credit_load(date4, time3, mac2)), "CREDIT"))
    assert card.balance == 1500 and card.online_ttc == 1
    assert service.verify_load_tac(request, date4, time3, tac)
    assert not service.verify_load_tac(request, date4, time3, bytes(4))
    forged = LoadRequest(**{**request.__dict__, "amount": 50_000})  # the phone asks for more than the card said
    assert not service.verify_load_mac1(forged)
    with pytest.raises(LoadRefused) as refused:
        service.load_mac2(forged, date4, time3)
    no_secret_in(str(refused.value))


def test_purchase_tac_ok_matches_a_card_purchase():
    from hardware_sim.psam import SimPsam

    service = LocalKeyService(KEYS)
    card, psam = _card(ALG_3DES), SimPsam(TERMINAL, keys=KEYS)
    apdu.check(card.transmit(apdu.select_aid()), "SELECT")
    init = apdu.parse_init_purchase(apdu.check(card.transmit(apdu.init_purchase(1, 200, TERMINAL)), "INIT"))
    p = apdu.parse_psam_init_purchase(apdu.check(psam.transmit(apdu.psam_init_purchase(
        init.random, init.ttc, 200, 0x06, WHEN, init.key_version, init.algorithm, card.asn[2:], card.issuer)),
        "PSAM"))
    debit = apdu.parse_debit(apdu.check(card.transmit(apdu.debit_purchase(
        p.terminal_seq, crypto.bcd_date(WHEN), crypto.bcd_time(WHEN), p.mac1)), "DEBIT"))
    args = {"asn": card.asn, "algorithm": ALG_3DES, "amount": 200, "tx_type": 0x06, "terminal_id": TERMINAL,
            "terminal_seq": p.terminal_seq, "date4": crypto.bcd_date(WHEN), "time3": crypto.bcd_time(WHEN)}
    assert service.purchase_tac_ok(**args, tac=debit.tac)
    assert not service.purchase_tac_ok(**{**args, "amount": 1}, tac=debit.tac)


def test_no_key_in_reprs_logs_or_pickles(tmp_path, caplog, monkeypatch):
    import pickle

    caplog.set_level(logging.DEBUG)
    path = tmp_path / "issuer.keys"
    write_key_file(path, KEYS, passphrase=PASS, n=FAST_N)
    monkeypatch.setenv("FAREBOX_ISSUER_KEYS_PASSPHRASE", PASS)
    service = key_service(Settings(issuer_keys_file=path))
    assert isinstance(service, LocalKeyService)
    for text in (repr(service), str(service), repr(KEYS), caplog.text):
        no_secret_in(text)
    assert str(path) in repr(service) and "hidden" in repr(service)
    with pytest.raises(TypeError):
        pickle.dumps(service)
    assert not hasattr(service, "__dict__")  # keys only in a slot, not in vars()
    try:
        open_key_file(path.read_bytes(), passphrase="not the passphrase")
    except KeyFileError as e:
        no_secret_in(str(e))


def test_farebox_keys_reads_encrypted_and_plain_files(tmp_path, monkeypatch):
    enc = tmp_path / "issuer.keys"
    write_key_file(enc, KEYS, kek=bytes(range(32)))
    monkeypatch.setenv("FAREBOX_ISSUER_KEYS_KEK", bytes(range(32)).hex())
    assert key_service(Settings(issuer_keys_file=enc))._keys == KEYS  # no key leaves the service: look inside
    plain = tmp_path / "issuer.toml"
    plain.write_text("\n".join(f'{n} = "{getattr(KEYS, n).hex()}"'
                               for n in ("purchase", "load", "tac", "maintenance")))
    assert key_service(Settings(issuer_keys_file=plain))._keys == KEYS
    monkeypatch.setenv("FAREBOX_ISSUER_KEYS_KEK", "11" * 32)
    with pytest.raises(KeyFileError):
        key_service(Settings(issuer_keys_file=enc))


def test_an_ingest_worker_is_handed_a_way_to_open_the_key_service_never_the_keys():
    """Issue 9: raw issuer keys never cross a process boundary. A worker's spec (pickled into a spawned process)
    carries how to open the service; the keys themselves are refused."""
    import pickle

    from backoffice.ingest_consumer import WorkerSpec
    from farebox.keys import published_test_keys
    from epurse.keys import TEST_ISSUER_KEYS
    from wire.devicekeys import TEST_DEVICE_MASTER
    from wire.mqtt_url import parse_mqtt_url

    target = parse_mqtt_url("mqtt://127.0.0.1:1883")
    with pytest.raises(TypeError, match="never cross a process boundary"):
        WorkerSpec("sqlite://", target, TEST_ISSUER_KEYS, TEST_DEVICE_MASTER, "ingest_0")
    spec = WorkerSpec("sqlite://", target, published_test_keys, TEST_DEVICE_MASTER, "ingest_0")
    wire_form = pickle.dumps(spec)
    for key in (TEST_ISSUER_KEYS.tac, TEST_ISSUER_KEYS.load, TEST_ISSUER_KEYS.purchase):
        assert key not in wire_form
    opened = pickle.loads(wire_form).keys()
    assert isinstance(opened, LocalKeyService) and opened.source == "the published test keys"
    with pytest.raises(TypeError):
        pickle.dumps(opened)

"""The issuer key service: the only place in the back office that holds the issuer's master keys.

Callers ask it questions about cards ("is this load MAC1 genuine?", "give me the MAC2 for this load", "does this
TAC verify?") and never get a key back, so that an HSM holding the master keys can replace :class:`LocalKeyService`
without any caller changing. The answers are the e-purse's own (epurse.crypto, 3DES and SM4 alike); each card's keys
are diversified from the master keys by its ASN inside the service.

The default is a key file encrypted at rest (``farebox keys init`` / ``farebox keys encrypt``). Its format,
``farebox-issuer-keys/1``, is one JSON object (UTF-8)::

    {"format": "farebox-issuer-keys/1",
     "kdf": {"name": "scrypt", "salt": "<32 hex>", "n": 32768, "r": 8, "p": 1}   # key-encryption key (KEK) from
                                                                                   # a passphrase
        or {"name": "raw"},                                                        # KEK given as 32 bytes (hex)
     "nonce": "<24 hex>",                                                          # AES-GCM nonce, 12 bytes
     "ciphertext": "<hex>"}                                                        # AES-256-GCM, tag appended

The KEK is scrypt(passphrase UTF-8, salt, n, r, p, length 32) or the raw 32-byte key; the associated data is the
format string, so a file of another format cannot be passed off as this one. The plaintext is the JSON object
``{"purchase": hex32, "load": hex32, "tac": hex32, "maintenance": hex32}`` (16-byte master keys, as
epurse.keys.IssuerKeys). A wrong passphrase, a wrong KEK and an altered file all fail the GCM tag the same way:
:class:`KeyFileError`, which names the file and never any key.

Nothing here logs a key, puts one in an exception or a repr; ``LocalKeyService`` keeps its keys in a private slot.
No key leaves the service, and no service crosses a process boundary (it refuses to be pickled): a worker process is
handed a way to open the service itself (the key file's path and settings; the passphrase or KEK comes from its own
environment), as ``backoffice.ingest_consumer.WorkerSpec.keys`` is.

Ingest checks every purchase's TAC here (:meth:`KeyService.purchase_tac_ok`), with the one TAC implementation,
``epurse.crypto.CryptoSuite.purchase_tac_with``. ``LocalKeyService`` keeps each card's TAC key ready
(``epurse.crypto.PreparedMac``) in an LRU of ``tac_cards`` cards: a rider's card comes back every day, and diversifying
its key and building its cipher cost several times the MAC itself. An HSM-backed service answers the same question.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from epurse import crypto
from epurse.keys import IssuerKeys

log = logging.getLogger(__name__)

KEY_FILE_FORMAT = "farebox-issuer-keys/1"
SCRYPT_N = 2**15  # ~32 MiB and ~0.1 s per unlock: paid once at start, enough to make guessing costly
KEY_NAMES = ("purchase", "load", "tac", "maintenance")


class KeyFileError(Exception):
    """The key file cannot be read or opened (wrong passphrase or KEK, altered, not a key file)."""


class LoadRefused(Exception):
    """The host will not give a MAC2 for this load: its MAC1 does not verify with the issuer's load key."""


@dataclass(frozen=True)
class LoadRequest:
    """What the card said in its INITIALIZE FOR LOAD answer, with what the load was asked for.

    ``balance`` and ``online_ttc`` are the card's before the load; ``random`` its 4-byte session random; ``mac1``
    the MAC1 it made over balance || amount || 02 || terminal with its session load key."""

    asn: bytes
    algorithm: int
    balance: int
    online_ttc: int
    random: bytes
    mac1: bytes
    amount: int
    terminal_id: bytes


class KeyService(Protocol):
    """The questions the back office asks about card cryptography. No method returns or logs a key."""

    def verify_load_mac1(self, request: LoadRequest) -> bool: ...

    def load_mac2(self, request: LoadRequest, date4: bytes, time3: bytes) -> bytes:
        """MAC2 for CREDIT FOR LOAD; raises LoadRefused when the request's MAC1 does not verify."""

    def verify_load_tac(self, request: LoadRequest, date4: bytes, time3: bytes, tac: bytes) -> bool:
        """Does ``tac`` cover new balance = balance + amount, the online TTC, amount, 02, terminal, date, time?"""

    def purchase_tac_ok(self, *, asn: bytes, algorithm: int, amount: int, tx_type: int, terminal_id: bytes,
                        terminal_seq: int, date4: bytes, time3: bytes, tac: bytes) -> bool: ...


class LocalKeyService:
    """A KeyService over master keys in this process's memory (from a key file, or the published test keys).
    ``tac_cards``: how many cards' TAC keys are kept ready for :meth:`purchase_tac_ok`."""

    __slots__ = ("_keys", "_tac_macs", "source")

    def __init__(self, keys: IssuerKeys, *, source: str = "memory", tac_cards: int = 100_000):
        self._keys = keys
        self.source = source  # where the keys came from (a path, "test keys"): safe to show
        self._tac_macs = functools.lru_cache(maxsize=tac_cards)(self._tac_mac)

    def __repr__(self) -> str:
        return f"<LocalKeyService from {self.source}: keys hidden>"

    __str__ = __repr__

    def __reduce__(self):
        # Pickling would carry the keys into another process or a file without anyone deciding so.
        raise TypeError("a key service is not picklable: open the key file in the other process")

    @classmethod
    def from_file(cls, path: Path | str, *, passphrase: str | None = None, kek: bytes | None = None
                  ) -> LocalKeyService:
        return cls(read_key_file(path, passphrase=passphrase, kek=kek), source=str(path))

    def _card_key(self, master: bytes, asn: bytes, algorithm: int) -> bytes:
        return crypto.suite(algorithm).diversify(master, asn)

    def _session(self, r: LoadRequest) -> bytes:
        dlk = self._card_key(self._keys.load, r.asn, r.algorithm)
        return crypto.suite(r.algorithm).load_session_key(dlk, r.random, r.online_ttc)

    def verify_load_mac1(self, request: LoadRequest) -> bool:
        r = request
        expected = crypto.suite(r.algorithm).load_mac1(self._session(r), r.balance, r.amount, r.terminal_id)
        return _same(expected, r.mac1)

    def load_mac2(self, request: LoadRequest, date4: bytes, time3: bytes) -> bytes:
        r = request
        session = self._session(r)
        suite = crypto.suite(r.algorithm)
        if not _same(suite.load_mac1(session, r.balance, r.amount, r.terminal_id), r.mac1):
            raise LoadRefused(f"card {r.asn.hex()}: load MAC1 does not verify (not a genuine card, or the "
                              "INITIALIZE FOR LOAD answer was altered)")
        return suite.load_mac2(session, r.amount, r.terminal_id, date4, time3)

    def verify_load_tac(self, request: LoadRequest, date4: bytes, time3: bytes, tac: bytes) -> bool:
        r = request
        dtk = self._card_key(self._keys.tac, r.asn, r.algorithm)
        expected = crypto.suite(r.algorithm).load_tac(dtk, r.balance + r.amount, r.online_ttc, r.amount,
                                                      r.terminal_id, date4, time3)
        return _same(expected, tac)

    def _tac_mac(self, algorithm: int, asn: bytes) -> crypto.PreparedMac:
        suite = crypto.suite(algorithm)
        return suite.tac_mac(suite.diversify(self._keys.tac, asn))

    def purchase_tac_ok(self, *, asn: bytes, algorithm: int, amount: int, tx_type: int, terminal_id: bytes,
                        terminal_seq: int, date4: bytes, time3: bytes, tac: bytes) -> bool:
        """Does ``tac`` cover amount, type, terminal, terminal sequence, date and time, with the card's TAC key?"""
        expected = crypto.suite(algorithm).purchase_tac_with(self._tac_macs(algorithm, bytes(asn)), amount, tx_type,
                                                             terminal_id, terminal_seq, date4, time3)
        return _same(expected, tac)


def as_key_service(keys, *, tac_cards: int = 100_000) -> KeyService:
    """``keys`` as a key service: a KeyService as it is; raw IssuerKeys (tests and tools in one process) wrapped."""
    if isinstance(keys, IssuerKeys):
        return LocalKeyService(keys, source="keys given in process", tac_cards=tac_cards)
    if not callable(getattr(keys, "purchase_tac_ok", None)):
        raise TypeError(f"a key service (backoffice.keyservice.KeyService) is needed, not {type(keys).__name__}")
    return keys


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(bytes(a), bytes(b))


# --- the key file -------------------------------------------------------------------------------------------


def _kek_from(kdf: dict, passphrase: str | None, kek: bytes | None, path) -> bytes:
    if kdf.get("name") == "scrypt":
        if passphrase is None:
            raise KeyFileError(f"{path}: protected by a passphrase: set FAREBOX_ISSUER_KEYS_PASSPHRASE")
        try:
            salt, n, r, p = bytes.fromhex(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        except (KeyError, TypeError, ValueError):
            raise KeyFileError(f"{path}: the scrypt parameters are damaged") from None
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))
    if kdf.get("name") == "raw":
        if kek is None or len(kek) != 32:
            raise KeyFileError(f"{path}: protected by a raw key-encryption key: set FAREBOX_ISSUER_KEYS_KEK "
                               "(64 hex digits)")
        return kek
    raise KeyFileError(f"{path}: unknown key derivation {kdf.get('name')!r}")


def encrypt_keys(keys: IssuerKeys, *, passphrase: str | None = None, kek: bytes | None = None,
                 n: int = SCRYPT_N) -> bytes:
    """The ``farebox-issuer-keys/1`` file content for ``keys``, under a passphrase (scrypt) or a 32-byte KEK."""
    if (passphrase is None) == (kek is None):
        raise ValueError("give a passphrase or a key-encryption key, not both and not neither")
    if passphrase is not None:
        if len(passphrase) < 12:
            raise ValueError("the passphrase must be at least 12 characters")
        salt = os.urandom(16)
        kdf = {"name": "scrypt", "salt": salt.hex(), "n": n, "r": 8, "p": 1}
        key = Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(passphrase.encode("utf-8"))
    else:
        if len(kek) != 32:
            raise ValueError("the key-encryption key must be 32 bytes")
        kdf, key = {"name": "raw"}, kek
    plain = json.dumps({name: getattr(keys, name).hex() for name in KEY_NAMES}).encode()
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plain, KEY_FILE_FORMAT.encode())
    doc = {"format": KEY_FILE_FORMAT, "kdf": kdf, "nonce": nonce.hex(), "ciphertext": sealed.hex()}
    return (json.dumps(doc, indent=1) + "\n").encode()


def is_key_file(content: bytes) -> bool:
    try:
        return json.loads(content).get("format") == KEY_FILE_FORMAT
    except (ValueError, AttributeError):
        return False


def open_key_file(content: bytes, *, passphrase: str | None = None, kek: bytes | None = None,
                  path: str = "key file") -> IssuerKeys:
    try:
        doc = json.loads(content)
        if doc.get("format") != KEY_FILE_FORMAT:
            raise KeyFileError(f"{path}: not a {KEY_FILE_FORMAT} key file")
        nonce, sealed = bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["ciphertext"])
        kdf = doc["kdf"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KeyFileError(f"{path}: not a {KEY_FILE_FORMAT} key file, or damaged") from None
    key = _kek_from(kdf, passphrase, kek, path)
    try:
        plain = AESGCM(key).decrypt(nonce, sealed, KEY_FILE_FORMAT.encode())
    except (InvalidTag, ValueError):
        raise KeyFileError(f"{path}: wrong passphrase or key-encryption key, or the file was altered") from None
    try:
        values = json.loads(plain)
        return IssuerKeys(**{name: bytes.fromhex(values[name]) for name in KEY_NAMES})
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path}: decrypted, but does not hold the four 16-byte master keys") from None


def read_key_file(path: Path | str, *, passphrase: str | None = None, kek: bytes | None = None) -> IssuerKeys:
    try:
        content = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file ({e.strerror})") from None
    keys = open_key_file(content, passphrase=passphrase, kek=kek, path=str(path))
    log.info("issuer keys opened from %s", path)
    return keys


def write_key_file(path: Path | str, keys: IssuerKeys, *, passphrase: str | None = None,
                   kek: bytes | None = None, n: int = SCRYPT_N) -> None:
    """Write the encrypted key file, readable by its owner only; refuses to overwrite one."""
    content = encrypt_keys(keys, passphrase=passphrase, kek=kek, n=n)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())

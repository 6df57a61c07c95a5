"""The back office's secrets, each from the setting that names it:

- the issuer's master keys (``FAREBOX_ISSUER_KEYS``: an encrypted key file, see backoffice.keyservice, unlocked by
  ``FAREBOX_ISSUER_KEYS_PASSPHRASE`` or ``FAREBOX_ISSUER_KEYS_KEK``; a plain TOML file still works, with a warning;
  test: epurse.keys), behind the key service (:func:`key_service`);
- the device master secret every validator's MAC key and broker password derive from (``FAREBOX_DEVICE_MASTER_KEY``,
  a file holding hex; test: wire.devicekeys.TEST_DEVICE_MASTER);
- the Ed25519 key that signs deny lists, parameters and software (``FAREBOX_SIGNING_KEY``, a file holding the
  32-byte seed in hex; test: wire.packages.TEST_SIGNING_SEED);
- the payment platform's Ed25519 public key that webhooks are checked with (``FAREBOX_PAYMENT_PUBLIC_KEY``, 64 hex
  digits; test: backoffice.web.api.ota.TEST_PLATFORM_PUBLIC_KEY, whose seed hardware_sim.payment publishes);
- the Ed25519 key that signs ticket tokens (``FAREBOX_TICKET_KEY``, a file holding the 32-byte seed in hex, and
  ``FAREBOX_TICKET_KEY_ID``, the id each token names; test: backoffice.tickets.keys.TEST_TICKET_SEED, id 0);
- the pickup-code master secret each operator's pickup key derives from (``FAREBOX_TICKET_PICKUP_KEY``, a file
  holding hex; test: backoffice.tickets.keys.TEST_PICKUP_MASTER). Validators receive the ticket public key and
  their operator's pickup key in the params package (backoffice.packages_publish).

Each test value is published in this repository, so anyone can forge with it. A setting left out, or a file that
holds a test value, is refused (:class:`TestKeyRefused`, naming the setting to give) unless the settings say
``insecure_test_keys`` (``--insecure-test-keys``, ``FAREBOX_INSECURE_TEST_KEYS=1``: the demo, the tests, labs).
``farebox keys init --out DIR`` makes a fresh set (farebox.keys_cmd)."""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from pathlib import Path

from epurse.keys import TEST_ISSUER_KEYS, IssuerKeys
from farebox.config import Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Secret:
    what: str  # in a clerk's words
    env: str  # the environment variable
    toml: str  # the key in the FAREBOX_CONFIG file


SECRETS = {
    "issuer": Secret("the issuer master keys", "FAREBOX_ISSUER_KEYS", "issuer_keys_file"),
    "device_master": Secret("the device master secret", "FAREBOX_DEVICE_MASTER_KEY", "device_master_key_file"),
    "signing": Secret("the package-signing key", "FAREBOX_SIGNING_KEY", "signing_key_file"),
    "payment": Secret("the payment platform's public key", "FAREBOX_PAYMENT_PUBLIC_KEY", "payment_public_key"),
    "ticket": Secret("the ticket-signing key", "FAREBOX_TICKET_KEY", "ticket_key_file"),
    "pickup": Secret("the ticket pickup-code master key", "FAREBOX_TICKET_PICKUP_KEY", "ticket_pickup_key_file"),
}


@dataclasses.dataclass(frozen=True)
class TestKeyUse:
    """One published test value about to be used: what it is, and what to give instead."""

    what: str
    give: str  # e.g. "set FAREBOX_SIGNING_KEY (TOML signing_key_file)"
    source: str | None = None  # the file or option that holds the test value; None: the setting is not given

    def line(self) -> str:
        held = f"{self.source} holds the published TEST value" if self.source else "not set: the published TEST value"
        return f"{self.what}: {held}; {self.give}"


class TestKeyRefused(Exception):
    """A command was about to run on published test keys without ``insecure_test_keys``."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, uses: list[TestKeyUse]):
        self.uses = uses
        super().__init__("; ".join(u.line() for u in uses))


def _use(kind: str, source) -> TestKeyUse:
    s = SECRETS[kind]
    return TestKeyUse(s.what, f"set {s.env} (TOML {s.toml})", None if source is None else str(source))


def _checked(settings: Settings, value, use: TestKeyUse | None):
    if use is not None:
        if not settings.insecure_test_keys:
            raise TestKeyRefused([use])
        log.warning("INSECURE: %s", use.line())
    return value


def _kek_from_env(environ) -> tuple[str | None, bytes | None]:
    passphrase = environ.get("FAREBOX_ISSUER_KEYS_PASSPHRASE") or None
    kek_hex = environ.get("FAREBOX_ISSUER_KEYS_KEK") or None
    try:
        kek = bytes.fromhex(kek_hex) if kek_hex else None
    except ValueError:
        raise ValueError("FAREBOX_ISSUER_KEYS_KEK must be 64 hex digits") from None
    return passphrase, kek


def read_plain_keys(path) -> IssuerKeys:
    """The legacy plain TOML key file: purchase, load, tac, maintenance as 32 hex digits each."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    try:
        return IssuerKeys(**{name: bytes.fromhex(doc[name]) for name in ("purchase", "load", "tac", "maintenance")})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: needs purchase, load, tac and maintenance as 32 hex "
                         f"digits each ({e})") from None


def key_service(settings: Settings, environ=os.environ):
    """The issuer key service (backoffice.keyservice.KeyService) the settings name.

    ``FAREBOX_ISSUER_KEYS`` names either an encrypted ``farebox-issuer-keys/1`` file (unlocked with
    ``FAREBOX_ISSUER_KEYS_PASSPHRASE`` or ``FAREBOX_ISSUER_KEYS_KEK``) or, for the time being, a plain TOML file
    (with a warning: convert it with ``farebox keys encrypt``). Unset, or a file holding any of the published test
    keys: :class:`TestKeyRefused` unless ``settings.insecure_test_keys``."""
    return _checked(settings, *load_key_service(settings, environ))


def published_test_keys():
    """The key service over the published TEST issuer keys (epurse.keys): simulated cards, the demo, tests and benches
    only. A top-level function, so a worker process can be handed it to open them itself (WorkerSpec.keys)."""
    from backoffice.keyservice import LocalKeyService

    return LocalKeyService(TEST_ISSUER_KEYS, source="the published test keys")


def load_key_service(settings: Settings, environ=os.environ):
    """The key service and, when it holds published test keys, what to say about that (unchecked)."""
    from backoffice.keyservice import LocalKeyService, is_key_file, open_key_file

    path = settings.issuer_keys_file
    if path is None:
        return published_test_keys(), _use("issuer", None)
    content = Path(path).read_bytes()
    if is_key_file(content):
        passphrase, kek = _kek_from_env(environ)
        keys = open_key_file(content, passphrase=passphrase, kek=kek, path=str(path))
    else:
        log.warning("%s holds the issuer keys in plain text: encrypt it with `farebox keys encrypt`", path)
        keys = read_plain_keys(path)
    # one published master key is enough to forge what it guards (loads, TACs): any of the four counts
    published = set(dataclasses.astuple(TEST_ISSUER_KEYS))
    test = any(k in published for k in dataclasses.astuple(keys))
    return LocalKeyService(keys, source=str(path)), _use("issuer", path) if test else None


def _hex_file(path, what: str, least: int) -> bytes:
    try:
        value = bytes.fromhex(Path(path).read_text(encoding="ascii").strip())
    except ValueError as e:
        raise ValueError(f"{path}: the {what} must be hex ({e})") from None
    if len(value) < least:
        raise ValueError(f"{path}: the {what} must be at least {least} bytes")
    return value


def device_master(settings: Settings) -> bytes:
    return _checked(settings, *load_device_master(settings))


def load_device_master(settings: Settings) -> tuple[bytes, TestKeyUse | None]:
    from wire.devicekeys import TEST_DEVICE_MASTER

    path = settings.device_master_key_file
    if path is None:
        return TEST_DEVICE_MASTER, _use("device_master", None)
    value = _hex_file(path, "device master secret", 16)
    return value, _use("device_master", path) if value == TEST_DEVICE_MASTER else None


def signing_seed(settings: Settings) -> bytes:
    """The 32-byte Ed25519 seed of the package-signing key."""
    return _checked(settings, *load_signing_seed(settings))


def load_signing_seed(settings: Settings) -> tuple[bytes, TestKeyUse | None]:
    from wire.packages import TEST_SIGNING_SEED

    path = settings.signing_key_file
    if path is None:
        return TEST_SIGNING_SEED, _use("signing", None)
    seed = _hex_file(path, "signing key seed", 32)
    if len(seed) != 32:
        raise ValueError(f"{path}: an Ed25519 seed is 32 bytes")
    return seed, _use("signing", path) if seed == TEST_SIGNING_SEED else None


def payment_public_key(settings: Settings) -> bytes:
    """The payment platform's Ed25519 public key (32 bytes) that webhooks are checked with."""
    return _checked(settings, *load_payment_public_key(settings))


def load_payment_public_key(settings: Settings) -> tuple[bytes, TestKeyUse | None]:
    from backoffice.web.api.ota import TEST_PLATFORM_PUBLIC_KEY, payment_public_key as parse

    test = bytes.fromhex(TEST_PLATFORM_PUBLIC_KEY)
    if not (settings.payment_public_key or "").strip():
        return test, _use("payment", None)
    value = parse(settings.payment_public_key)
    return value, _use("payment", SECRETS["payment"].env) if value == test else None


def load_ticket_seed(settings: Settings) -> tuple[tuple[bytes, int], TestKeyUse | None]:
    """(the ticket-signing Ed25519 seed, its key id) and what to say when it is the published test key."""
    from backoffice.tickets.keys import TEST_TICKET_KEY_ID, TEST_TICKET_SEED

    path = settings.ticket_key_file
    if path is None:
        return (TEST_TICKET_SEED, TEST_TICKET_KEY_ID), _use("ticket", None)
    seed = _hex_file(path, "ticket-signing key seed", 32)
    if len(seed) != 32:
        raise ValueError(f"{path}: an Ed25519 seed is 32 bytes")
    return (seed, settings.ticket_key_id), _use("ticket", path) if seed == TEST_TICKET_SEED else None


def load_pickup_master(settings: Settings) -> tuple[bytes, TestKeyUse | None]:
    from backoffice.tickets.keys import TEST_PICKUP_MASTER

    path = settings.ticket_pickup_key_file
    if path is None:
        return TEST_PICKUP_MASTER, _use("pickup", None)
    value = _hex_file(path, "pickup-code master key", 16)
    return value, _use("pickup", path) if value == TEST_PICKUP_MASTER else None


def ticket_keys(settings: Settings):
    """The ticket keys (backoffice.tickets.keys.TicketKeys) the settings name, under the test-key rule."""
    (seed, key_id), seed_use = load_ticket_seed(settings)
    master, master_use = load_pickup_master(settings)
    uses = [u for u in (seed_use, master_use) if u is not None]
    if uses and not settings.insecure_test_keys:
        raise TestKeyRefused(uses)
    for u in uses:
        log.warning("INSECURE: %s", u.line())
    return make_ticket_keys(seed, key_id, master, "the published test keys" if uses else "the settings")


def make_ticket_keys(seed: bytes, key_id: int, master: bytes, source: str = ""):
    from backoffice.tickets.keys import TicketKeys

    return TicketKeys(seed, key_id, master, source)


LOADERS = {"issuer": load_key_service, "device_master": load_device_master, "signing": load_signing_seed,
           "payment": load_payment_public_key, "ticket": load_ticket_seed, "pickup": load_pickup_master}

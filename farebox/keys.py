"""The back office's secrets, each from the file its setting names, or, when none is named, a published test value
that only ever serves simulated cards and demo fleets (with a warning in the log):

- the issuer's master keys (``FAREBOX_ISSUER_KEYS``: an encrypted key file, see backoffice.keyservice, unlocked by
  ``FAREBOX_ISSUER_KEYS_PASSPHRASE`` or ``FAREBOX_ISSUER_KEYS_KEK``; a plain TOML file still works, with a warning;
  test: epurse.keys), behind the key service (:func:`key_service`);
- the device master secret every validator's MAC key and broker password derive from (``FAREBOX_DEVICE_MASTER_KEY``,
  a file holding hex; test: wire.devicekeys.TEST_DEVICE_MASTER);
- the Ed25519 key that signs deny lists, parameters and software (``FAREBOX_SIGNING_KEY``, a file holding the
  32-byte seed in hex; test: wire.packages.TEST_SIGNING_SEED)."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

from epurse.keys import TEST_ISSUER_KEYS, IssuerKeys
from farebox.config import Settings

log = logging.getLogger(__name__)


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
    (with a warning: convert it with ``farebox keys encrypt``). Unset: the published test keys."""
    from backoffice.keyservice import LocalKeyService, is_key_file, open_key_file

    path = settings.issuer_keys_file
    if path is None:
        log.warning("using the published issuer TEST keys: fine for simulated cards, never for real ones")
        return LocalKeyService(TEST_ISSUER_KEYS, source="the published test keys")
    content = Path(path).read_bytes()
    if is_key_file(content):
        passphrase, kek = _kek_from_env(environ)
        return LocalKeyService(open_key_file(content, passphrase=passphrase, kek=kek, path=str(path)),
                               source=str(path))
    log.warning("%s holds the issuer keys in plain text: encrypt it with `farebox keys encrypt`", path)
    return LocalKeyService(read_plain_keys(path), source=str(path))


def issuer_keys(settings: Settings) -> IssuerKeys:
    """The master keys themselves, for ingest's cached purchase-TAC check (backoffice.ingest.TacCheck), from the
    same file as :func:`key_service` (encrypted or plain). Code that can ask questions instead should use
    ``key_service(settings)``: an HSM can answer those, and it cannot hand out keys."""
    return key_service(settings).export_issuer_keys()


def _hex_file(path, what: str, least: int) -> bytes:
    try:
        value = bytes.fromhex(Path(path).read_text(encoding="ascii").strip())
    except ValueError as e:
        raise ValueError(f"{path}: the {what} must be hex ({e})") from None
    if len(value) < least:
        raise ValueError(f"{path}: the {what} must be at least {least} bytes")
    return value


def device_master(settings: Settings) -> bytes:
    from wire.devicekeys import TEST_DEVICE_MASTER

    if settings.device_master_key_file is None:
        log.warning("using the published TEST device master secret: fine for a demo fleet, never for real buses")
        return TEST_DEVICE_MASTER
    return _hex_file(settings.device_master_key_file, "device master secret", 16)


def signing_seed(settings: Settings) -> bytes:
    """The 32-byte Ed25519 seed of the package-signing key."""
    if settings.signing_key_file is None:
        from wire.packages import TEST_SIGNING_SEED

        log.warning("signing packages with the published TEST key: fine for a demo fleet, never for real buses")
        return TEST_SIGNING_SEED
    seed = _hex_file(settings.signing_key_file, "signing key seed", 32)
    if len(seed) != 32:
        raise ValueError(f"{settings.signing_key_file}: an Ed25519 seed is 32 bytes")
    return seed

"""``farebox keys``: a fresh set of the back office's secrets, and the issuer key file encrypted at rest.
Registered in farebox/cli.py by ``register(sub)``.

- ``farebox keys init --out DIR``: a new folder holding fresh random secrets, each readable by its owner only:
  ``issuer-keys.json`` (the issuer master keys, encrypted as backoffice.keyservice writes them: passphrase from
  ``FAREBOX_ISSUER_KEYS_PASSPHRASE``, asked for when unset, or ``--kek-env VAR`` naming a variable with a 32-byte KEK
  in hex), ``device-master.key`` (hex), ``signing.key`` (the Ed25519 seed, hex) and ``signing.pub`` (its public key,
  for the validators' ``--signing-public-key @FILE``), ``ticket.key`` (the ticket-signing Ed25519 seed, hex; its
  public key ``ticket.pub`` reaches the validators in the params package) and ``pickup.key`` (the pickup-code master
  secret, hex). It prints the settings lines to use, as environment variables
  and as TOML, with the payment platform's public key left for you to fill in (the platform gives it; nobody makes
  it here).
- ``farebox keys encrypt --toml FILE --out FILE``: issuer keys kept so far in a plain TOML file, encrypted into a key
  file.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

ISSUER_FILE, MASTER_FILE, SIGNING_FILE, PUBLIC_FILE = "issuer-keys.json", "device-master.key", "signing.key", \
    "signing.pub"
TICKET_FILE, TICKET_PUBLIC_FILE, PICKUP_FILE = "ticket.key", "ticket.pub", "pickup.key"
TICKET_KEY_ID = 1  # the first real ticket key; the published test key is 0


def register(sub) -> None:
    p = sub.add_parser("keys", help="the back office's secrets: a fresh set (init), or the issuer keys encrypted")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("init", help="a fresh set of secrets in a new folder, and the settings lines to use")
    k.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new (or empty) folder")
    _kek_option(k)
    k.set_defaults(func=_keys_init)
    k = keys.add_parser("encrypt", help="a plain TOML issuer key file, encrypted into a key file")
    k.add_argument("--toml", type=Path, required=True)
    k.add_argument("--out", type=Path, required=True)
    _kek_option(k)
    k.set_defaults(func=_keys_encrypt)


def _kek_option(k) -> None:
    k.add_argument("--kek-env", default=None, metavar="VAR",
                   help="encrypt with the 32-byte key in this variable (hex) instead of a passphrase")


def _kek(args) -> tuple[str | None, bytes | None]:
    if args.kek_env:
        value = os.environ.get(args.kek_env, "")
        try:
            kek = bytes.fromhex(value)
        except ValueError:
            kek = b""
        if len(kek) != 32:
            raise SystemExit(f"farebox keys: {args.kek_env} must hold 64 hex digits")
        return None, kek
    passphrase = os.environ.get("FAREBOX_ISSUER_KEYS_PASSPHRASE")
    if not passphrase:
        import getpass

        passphrase = getpass.getpass("passphrase for the issuer key file: ")
    return passphrase, None


def _unlock_setting(args, kek) -> str:
    return f"{args.kek_env} (its 64 hex digits) as FAREBOX_ISSUER_KEYS_KEK" if kek else \
        "FAREBOX_ISSUER_KEYS_PASSPHRASE (the passphrase you gave)"


def _keys_init(args, settings) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from backoffice.keyservice import write_key_file
    from epurse.keys import IssuerKeys

    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"farebox keys init: {out} exists and is not an empty folder: give a new one (nothing is "
              "overwritten)", file=sys.stderr)
        return 2
    passphrase, kek = _kek(args)
    made = not out.exists()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    issuer = (out / ISSUER_FILE).resolve()
    try:
        write_key_file(issuer, IssuerKeys(*(secrets.token_bytes(16) for _ in range(4))), passphrase=passphrase,
                       kek=kek)
    except ValueError as e:  # e.g. a short passphrase: refused before anything was written
        if made:
            out.rmdir()
        print(f"farebox keys init: {e}", file=sys.stderr)
        return 2
    master, seed = secrets.token_bytes(32), secrets.token_bytes(32)
    ticket_seed, pickup = secrets.token_bytes(32), secrets.token_bytes(32)

    def public_of(s: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(s).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    paths = {}
    for name, value, mode in ((MASTER_FILE, master, 0o600), (SIGNING_FILE, seed, 0o600),
                              (PUBLIC_FILE, public_of(seed), 0o644), (TICKET_FILE, ticket_seed, 0o600),
                              (TICKET_PUBLIC_FILE, public_of(ticket_seed), 0o644), (PICKUP_FILE, pickup, 0o600)):
        paths[name] = (out / name).resolve()
        fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(value.hex() + "\n")
    print(f"A fresh set of secrets in {out.resolve()} (SECRET, except the .pub files; back them up, share none):")
    print(f"  {ISSUER_FILE}   issuer master keys, encrypted; unlock with {_unlock_setting(args, kek)}")
    print(f"  {MASTER_FILE}  device master: every validator's MAC key and broker password derive from it")
    print(f"  {SIGNING_FILE}        package-signing seed; {PUBLIC_FILE} is its public key, for the validators")
    print(f"  {TICKET_FILE}         ticket-signing seed (key id {TICKET_KEY_ID}); {TICKET_PUBLIC_FILE} is its public "
          "key, sent to the validators in the params package")
    print(f"  {PICKUP_FILE}         pickup-code master: each operator's pickup key derives from it")
    print()
    print("Settings, as environment variables:")
    print(f"  FAREBOX_ISSUER_KEYS={issuer}")
    print(f"  FAREBOX_DEVICE_MASTER_KEY={paths[MASTER_FILE]}")
    print(f"  FAREBOX_SIGNING_KEY={paths[SIGNING_FILE]}")
    print(f"  FAREBOX_TICKET_KEY={paths[TICKET_FILE]}")
    print(f"  FAREBOX_TICKET_KEY_ID={TICKET_KEY_ID}")
    print(f"  FAREBOX_TICKET_PICKUP_KEY={paths[PICKUP_FILE]}")
    print("  FAREBOX_PAYMENT_PUBLIC_KEY=<FILL IN: your payment platform's Ed25519 public key, 64 hex digits>")
    print("or in the FAREBOX_CONFIG file (TOML):")
    print(f'  issuer_keys_file = "{issuer}"')
    print(f'  device_master_key_file = "{paths[MASTER_FILE]}"')
    print(f'  signing_key_file = "{paths[SIGNING_FILE]}"')
    print(f'  ticket_key_file = "{paths[TICKET_FILE]}"')
    print(f"  ticket_key_id = {TICKET_KEY_ID}")
    print(f'  ticket_pickup_key_file = "{paths[PICKUP_FILE]}"')
    print('  payment_public_key = "<FILL IN: 64 hex digits>"')
    print(f"Each validator: --signing-public-key @{paths[PUBLIC_FILE]} and the MAC key `farebox device add` prints.")
    print("Set these before registering buses: each bus's MAC key and broker password derive from the device master")
    print("(`farebox device add` prints them); then write the broker's files with `farebox broker config`.")
    return 0


def _keys_encrypt(args, settings) -> int:
    from backoffice.keyservice import write_key_file
    from farebox.keys import read_plain_keys

    keys = read_plain_keys(args.toml)
    passphrase, kek = _kek(args)
    try:
        write_key_file(args.out, keys, passphrase=passphrase, kek=kek)
    except (ValueError, FileExistsError) as e:
        print(f"farebox keys: {e}", file=sys.stderr)
        return 2
    print(f"issuer keys written encrypted to {args.out} (mode 600). Set FAREBOX_ISSUER_KEYS={args.out} and "
          f"{'FAREBOX_ISSUER_KEYS_KEK' if kek else 'FAREBOX_ISSUER_KEYS_PASSPHRASE'} for the back office.")
    return 0

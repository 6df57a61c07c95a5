"""The ticket keys: the Ed25519 key that signs ticket tokens, and each operator's pickup key (the HMAC key of the
pickup code's check digits, which validators also receive in their parameters).

Both come from secret files named by environment variables, as the back office's other secrets (farebox.keys):

- ``FAREBOX_TICKET_KEY``: a file holding the 32-byte Ed25519 seed in hex; optionally ``FAREBOX_TICKET_KEY_ID``
  (0..255, default 1), the key id written in every token so a validator holding several public keys (during a key
  change) picks the right one.
- ``FAREBOX_TICKET_PICKUP_KEY``: a file holding a master secret in hex (at least 16 bytes). Operator ``X``'s pickup
  key is HMAC-SHA256(master, b"farebox-pickup-v1|" + X): one secret to keep, a different key per operator, so one
  operator's validators cannot make another's codes.

Not set, or a file that holds the published TEST value below: refused (farebox.keys.TestKeyRefused) unless the
settings say ``insecure_test_keys`` (the demo, the tests, labs) -- the house rule that nothing outside those runs on a
published key. The test key id is 0, so a token made with the test key says so in its own bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path



@dataclass(frozen=True)
class TestKeyUse:
    """A published test value about to be used (the same three facts as farebox.keys.TestKeyUse, which the
    command line turns this into: backoffice does not import farebox)."""

    __test__ = False
    what: str
    give: str
    source: str | None = None


class TicketKeysRefused(Exception):
    """Published test ticket keys, and the settings do not allow test keys."""

    def __init__(self, uses: list[TestKeyUse]):
        self.uses = uses
        super().__init__("; ".join(f"{u.what}: {u.source or 'not set'} -> {u.give}" for u in uses))

TEST_TICKET_SEED = hashlib.sha256(b"farebox published TEST ticket signing key").digest()
TEST_TICKET_KEY_ID = 0
TEST_PICKUP_MASTER = hashlib.sha256(b"farebox published TEST pickup master").digest()
PICKUP_CONTEXT = b"farebox-pickup-v1|"

TICKET_KEY_ENV = "FAREBOX_TICKET_KEY"
TICKET_KEY_ID_ENV = "FAREBOX_TICKET_KEY_ID"
PICKUP_KEY_ENV = "FAREBOX_TICKET_PICKUP_KEY"


def pickup_key_for(master: bytes, operator: str) -> bytes:
    """Operator ``operator``'s pickup key (32 bytes) from the pickup master secret."""
    return hmac.new(master, PICKUP_CONTEXT + operator.encode("utf-8"), hashlib.sha256).digest()


@dataclass(frozen=True)
class TicketKeys:
    """The keys tickets are made with. ``repr`` never shows a key."""

    seed: bytes = field(repr=False)
    key_id: int
    pickup_master: bytes = field(repr=False)
    source: str = ""

    def pickup_key(self, operator: str) -> bytes:
        return pickup_key_for(self.pickup_master, operator)

    def public_key(self) -> bytes:
        """The raw 32-byte public key validators check tokens with (their parameters carry it)."""
        from wire.ticket import public_key_bytes

        return public_key_bytes(self.seed)

    def validator_params(self, operator: str, denied=()):
        """The ``tickets`` section of ``operator``'s validator parameters (wire.ticket.TicketParams): the public
        key by its id, the operator's pickup key, the ticket ids refused on sight (e.g.
        backoffice.tickets.orders.denied_tickets)."""
        from wire.ticket import TicketParams

        return TicketParams({self.key_id: self.public_key()}, self.pickup_key(operator), frozenset(denied))

    @property
    def is_test(self) -> bool:
        return self.seed == TEST_TICKET_SEED or self.pickup_master == TEST_PICKUP_MASTER


def published_test_keys() -> TicketKeys:
    """The published TEST keys: tests, the demo, labs."""
    return TicketKeys(TEST_TICKET_SEED, TEST_TICKET_KEY_ID, TEST_PICKUP_MASTER, "the published test keys")


def _hex_file(path: str, what: str, least: int) -> bytes:
    try:
        value = bytes.fromhex(Path(path).read_text().strip())
    except ValueError:
        raise ValueError(f"{path}: the {what} file must hold hex digits only") from None
    if len(value) < least:
        raise ValueError(f"{path}: the {what} is {len(value)} bytes; at least {least}")
    return value


def load_ticket_keys(*, insecure_test_keys: bool, environ=os.environ) -> TicketKeys:
    """The configured ticket keys; TicketKeysRefused when one is missing or published and test keys are not
    allowed."""
    uses: list[TestKeyUse] = []
    seed_path, pickup_path = environ.get(TICKET_KEY_ENV) or None, environ.get(PICKUP_KEY_ENV) or None
    if seed_path is None:
        seed, key_id = TEST_TICKET_SEED, TEST_TICKET_KEY_ID
        uses.append(TestKeyUse("the ticket signing key",
                               f"set {TICKET_KEY_ENV} (`farebox ticket keys init --out DIR` makes it)"))
    else:
        seed = _hex_file(seed_path, "ticket signing key seed", 32)
        if len(seed) != 32:
            raise ValueError(f"{seed_path}: an Ed25519 seed is 32 bytes")
        key_id_text = environ.get(TICKET_KEY_ID_ENV, "1")
        if not key_id_text.isdigit() or not 0 <= int(key_id_text) <= 255:
            raise ValueError(f"{TICKET_KEY_ID_ENV} must be a whole number 0..255, not {key_id_text!r}")
        key_id = int(key_id_text)
        if seed == TEST_TICKET_SEED:
            uses.append(TestKeyUse("the ticket signing key", f"give {TICKET_KEY_ENV} a fresh seed", seed_path))
    if pickup_path is None:
        master = TEST_PICKUP_MASTER
        uses.append(TestKeyUse("the ticket pickup master key",
                               f"set {PICKUP_KEY_ENV} (`farebox ticket keys init --out DIR` makes it)"))
    else:
        master = _hex_file(pickup_path, "pickup master key", 16)
        if master == TEST_PICKUP_MASTER:
            uses.append(TestKeyUse("the ticket pickup master key", f"give {PICKUP_KEY_ENV} a fresh secret",
                                   pickup_path))
    if uses and not insecure_test_keys:
        raise TicketKeysRefused(uses)
    source = "the published test keys" if uses else f"{seed_path}, {pickup_path}"
    return TicketKeys(seed, key_id, master, source)


def ticket_keys(settings, environ=os.environ) -> TicketKeys:
    """``load_ticket_keys`` under a farebox.config.Settings (anything with ``insecure_test_keys``)."""
    return load_ticket_keys(insecure_test_keys=bool(getattr(settings, "insecure_test_keys", False)), environ=environ)

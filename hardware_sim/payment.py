"""A simulated payment platform: a rider pays an order, and the platform tells the back office with a signed
webhook (Ed25519, the format in backoffice/cards/payments.py), retrying deliveries as real platforms do, so that
the back office sees duplicates.

``PaymentPlatform(seed)`` signs with the Ed25519 key from the 32-byte ``seed`` (the published TEST seed by default);
``public_key`` is what the back office is configured with. ``pay(order_id, amount)`` returns a :class:`Webhook`
(body, signature header) and keeps it in ``sent`` so a test can deliver it again, late or twice.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

TEST_PLATFORM_SEED = bytes.fromhex("5041594D454E542D544553542D534545442D464152454F582D30303030303031")


@dataclass(frozen=True)
class Webhook:
    body: bytes
    signature: str  # the header value: t=<unix>,ed25519=<base64>


class PaymentPlatform:
    def __init__(self, seed: bytes = TEST_PLATFORM_SEED, *, clock=None):
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.sent: list[Webhook] = []

    def __repr__(self) -> str:
        return f"<PaymentPlatform {self.public_key.hex()[:16]}…>"

    def sign(self, body: bytes) -> Webhook:
        t = int(self.clock().timestamp())
        sig = self._key.sign(str(t).encode() + b"." + body)
        return Webhook(body, f"t={t},ed25519={base64.b64encode(sig).decode()}")

    def pay(self, order_id: str, amount: int, *, status: str = "paid") -> Webhook:
        """The rider paid ``amount`` fen for ``order_id``: the notification the platform sends (and resends)."""
        body = json.dumps({"event_id": "evt_" + secrets.token_hex(8), "order_id": order_id, "amount": amount,
                           "payment_ref": "pay_" + secrets.token_hex(8), "status": status,
                           "paid_at": self.clock().isoformat()}, sort_keys=True).encode()
        hook = self.sign(body)
        self.sent.append(hook)
        return hook

"""The payment platform's webhook: a signed notification that an order was paid.

Wire format (what hardware_sim.payment sends, and what a real platform adapter must produce): the body is JSON
``{"event_id": str, "order_id": str, "amount": fen, "payment_ref": str, "status": "paid", "paid_at": ISO UTC}``;
the signature header is ``t=<unix seconds>,ed25519=<base64 signature>`` over ``b"<t>." + body`` with the
platform's Ed25519 key; the back office holds only the public key. A signature older or newer than
``TOLERANCE`` is refused (a captured notification replayed later), and every event id is stored once, so a
duplicate delivery is answered "seen" and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, select

from backoffice.cards import topup
from backoffice.models import PaymentEvent

TOLERANCE = timedelta(minutes=5)
_T = PaymentEvent.__table__


class WebhookRefused(topup.TopupRefused):
    pass


def verify(body: bytes, signature: str, public_key: bytes, *, now: datetime) -> dict:
    """The notification's JSON if its signature verifies and is fresh; WebhookRefused otherwise."""
    try:
        fields = dict(part.split("=", 1) for part in signature.split(","))
        t = int(fields["t"])
        sig = base64.b64decode(fields["ed25519"], validate=True)
    except (ValueError, KeyError, binascii.Error):
        raise WebhookRefused("bad_signature", "the signature header is not t=...,ed25519=...") from None
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, str(t).encode() + b"." + body)
    except (InvalidSignature, ValueError):
        raise WebhookRefused("bad_signature", "the webhook's signature does not verify") from None
    if abs(now.timestamp() - t) > TOLERANCE.total_seconds():
        raise WebhookRefused("stale", f"the webhook was signed {int(now.timestamp() - t)} s from now")
    try:
        event = json.loads(body)
        well_formed = isinstance(event, dict) and isinstance(event.get("amount"), int) and all(
            isinstance(event.get(k), str) for k in ("event_id", "order_id", "payment_ref", "status"))
    except ValueError:
        well_formed = False
    if not well_formed:
        raise WebhookRefused("bad_body", "the webhook body is not a payment notification")
    return event


def handle_webhook(conn: Connection, *, body: bytes, signature: str, public_key: bytes | None, now: datetime
                   ) -> str:
    """Verify, then apply once: a duplicate event id answers what the first delivery did."""
    if public_key is None:
        raise WebhookRefused("not_configured", "no payment platform key is configured")
    event = verify(body, signature, public_key, now=now)
    seen = conn.execute(select(_T.c.outcome).where(_T.c.event_id == event["event_id"])).scalar()
    if seen is not None:
        return f"seen: {seen}"
    if event["status"] != "paid":
        outcome = f"ignored: status {event['status']}"
    else:
        try:
            outcome = topup.mark_paid(conn, order_id=event["order_id"], amount=event["amount"],
                                      payment_ref=event["payment_ref"], now=now)
        except topup.TopupRefused as e:
            outcome = f"refused ({e.reason}): {e}"
    conn.execute(_T.insert().values(event_id=event["event_id"], order_id=event["order_id"], received_at=now,
                                    outcome=outcome[:200], body=body.decode("utf-8", "replace")[:2000]))
    return outcome

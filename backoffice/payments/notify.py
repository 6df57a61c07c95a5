"""The platform's notifications (``POST /ota/webhook``) for every kind of order: a payment of a ticket order or a
top-up order, and a refund paid out.

Format and checks are backoffice.cards.payments' (Ed25519 over ``<t>.`` + body, fresh, every event id applied
once: a duplicate delivery answers what the first did). A payment is settled by ``service.settle_paid`` (idempotent
by payment reference, so a notification and an order query pay once); a refund notification (``status:
refunded`` with a ``refund_id``) is recorded by ``service.record_refund_answer`` (once, however often it comes and
whether or not the call's own answer came first).
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import Connection, insert, select

from backoffice.cards.payments import WebhookRefused, verify
from backoffice.models import PaymentEvent
from backoffice.payments import service

_T = PaymentEvent.__table__


def handle_notification(conn: Connection, *, body: bytes, signature: str, public_key: bytes | None,
                        now: datetime) -> str:
    """Verify, then apply once; the words of what happened. WebhookRefused for a bad signature or body."""
    if public_key is None:
        raise WebhookRefused("not_configured", "no payment platform key is configured")
    event = verify(body, signature, public_key, now=now)
    seen = conn.execute(select(_T.c.outcome).where(_T.c.event_id == event["event_id"])).scalar()
    if seen is not None:
        return f"seen: {seen}"
    refund_id = json.loads(body).get("refund_id")
    if event["status"] == "paid":
        outcome = service.settle_paid(conn, order_id=event["order_id"], amount=event["amount"],
                                      payment_ref=event["payment_ref"], who="payment-webhook", now=now)
    elif event["status"] == "refunded" and isinstance(refund_id, str):
        outcome = service.record_refund_answer(conn, refund_id=refund_id, refund_ref=event["payment_ref"],
                                               amount=event["amount"], now=now, how="notification")
    else:
        outcome = f"ignored: status {event['status']}"
    conn.execute(insert(_T).values(event_id=event["event_id"], order_id=event["order_id"][:40], received_at=now,
                                   outcome=outcome[:200], body=body.decode("utf-8", "replace")[:2000]))
    return outcome

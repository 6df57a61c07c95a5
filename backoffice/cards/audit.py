"""The audit trail: who did what to a card or an order, when, and why. Written in the caller's transaction, so a
change and its audit record stand or fall together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from backoffice.models import CardAudit

_T = CardAudit.__table__


@dataclass(frozen=True)
class AuditRecord:
    at: datetime
    who: str
    action: str
    asn: str | None
    order_id: str | None
    amount: int | None
    why: str
    detail: dict


def record(conn: Connection, *, who: str, action: str, why: str, now: datetime, asn: str | None = None,
           order_id: str | None = None, amount: int | None = None, **detail) -> None:
    """One audit row. ``who`` must name a person or a system ("ota-host", "payment-webhook"), never be empty."""
    if not who:
        raise ValueError("an audit record needs who did it")
    conn.execute(_T.insert().values(at=now, who=who, action=action, asn=asn, order_id=order_id, amount=amount,
                                    why=why[:500], detail=json.dumps(detail, sort_keys=True, default=str)[:1000]))


def trail(conn: Connection, *, asn: str | None = None, order_id: str | None = None) -> list[AuditRecord]:
    """A card's or an order's audit records, oldest first."""
    q = select(_T).order_by(_T.c.id)
    if asn is not None:
        q = q.where(_T.c.asn == asn)
    if order_id is not None:
        q = q.where(_T.c.order_id == order_id)
    return [AuditRecord(r.at, r.who, r.action, r.asn, r.order_id, r.amount, r.why, json.loads(r.detail or "{}"))
            for r in conn.execute(q)]

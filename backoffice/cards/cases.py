"""Cases: an anomaly on a card for a person to review (a counter jump, a balance that does not follow, the same
counter with different content, a load the host cannot confirm). Raised once per (card, kind, key); closing one can
put the card on the deny list (card.status = blocked), with an audit record either way."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select, update

from backoffice.cards import audit
from backoffice.models import Card, CardCase

_T = CardCase.__table__
_CARD = Card.__table__

COUNTER_JUMP = "counter_jump"
BALANCE_MISMATCH = "balance_mismatch"
SAME_COUNTER_DIFFERENT = "same_counter_different"
LOAD_UNCONFIRMED = "load_unconfirmed"
COUNTER_BACKWARDS = "counter_backwards"


@dataclass(frozen=True)
class Case:
    id: int
    asn: str
    kind: str
    key: str
    detail: str
    status: str
    opened_at: datetime
    resolution: str


def _case(r) -> Case:
    return Case(r.id, r.asn, r.kind, r.key, r.detail, r.status, r.opened_at, r.resolution)


def raise_case(conn: Connection, *, asn: str, kind: str, key: str, detail: str, now: datetime) -> bool:
    """Open a case unless this (card, kind, key) has one already; True if a new one was opened."""
    exists = conn.execute(select(_T.c.id).where(_T.c.asn == asn, _T.c.kind == kind, _T.c.key == key)).first()
    if exists is not None:
        return False
    conn.execute(_T.insert().values(asn=asn, kind=kind, key=key, detail=detail[:500], status="open",
                                    opened_at=now, resolution=""))
    return True


def open_cases(conn: Connection, *, asn: str | None = None) -> list[Case]:
    q = select(_T).where(_T.c.status == "open").order_by(_T.c.id)
    if asn is not None:
        q = q.where(_T.c.asn == asn)
    return [_case(r) for r in conn.execute(q)]


def close_case(conn: Connection, *, case_id: int, who: str, resolution: str, block_card: bool, now: datetime
               ) -> Case:
    """Close a case with what was decided; ``block_card`` puts the card on the deny list (status blocked)."""
    row = conn.execute(select(_T).where(_T.c.id == case_id)).first()
    if row is None:
        raise LookupError(f"no case {case_id}")
    if row.status != "open":
        raise ValueError(f"case {case_id} is closed already ({row.resolution})")
    conn.execute(update(_T).where(_T.c.id == case_id).values(status="closed", closed_at=now, closed_by=who,
                                                            resolution=resolution[:500]))
    if block_card:
        conn.execute(update(_CARD).where(_CARD.c.asn == row.asn, _CARD.c.status == "active")
                     .values(status="blocked"))
    audit.record(conn, who=who, action="close_case", why=resolution, now=now, asn=row.asn, case=case_id,
                 kind=row.kind, blocked=block_card)
    return _case(conn.execute(select(_T).where(_T.c.id == case_id)).one())

"""Cards at the mobile operator's counter: the card as issued, its balance and records, its ledger and open cases;
loss reporting, refunds of a lost card's frozen balance, adjustments and closing cases, each a use case of
backoffice.cards with an audit record naming the token's holder."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import Connection, select

from backoffice.web import reads
from backoffice.web.api.ota import writing
from backoffice.web.api.types import Asn, RowId, SignedFen, Text
from backoffice.web.deps import Services, connection, services
from backoffice.web.auth import Principal, owned_by

router = APIRouter(tags=["cards"])


@router.get("/cards/{asn}")
def card(
    *,
    asn: Asn,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    who: Annotated[Principal, Depends(owned_by("operator_staff"))],
    conn: Annotated[Connection, Depends(connection)],
) -> dict:
    """A card by its application serial number (20 hex digits): status, the balance it reported in its latest
    purchase, and its newest records with every bus company (so not a clerk's)."""
    found = reads.card(conn, asn=asn, limit=limit)
    if found is None:
        raise HTTPException(404, f"card {asn!r}: no such card and no record of it")
    return found


@router.get("/me")
def me(*, who: Annotated[Principal, Depends(owned_by("clerk", "operator_staff", "operations"))]) -> dict:
    """Who this token belongs to."""
    return {"name": who.name, "role": who.role, "operator": who.operator}


# ------------------------------------------------------------------------------------------ ledger, loss, money
def ledger_view(conn: Connection, asn: str) -> dict | None:
    """The card's ledger (book balance from its movements beside the balance it last reported), its open cases
    and its audit trail; None when the card was never issued here."""
    from backoffice.cards import audit, cases, ledger
    from backoffice.models import Card, CardAccount

    asn = asn.strip().lower()
    card = conn.execute(select(Card.asn, Card.card_type, Card.status).where(Card.asn == asn)).first()
    if card is None:
        return None
    account = conn.execute(select(CardAccount.deposit, CardAccount.frozen_balance, CardAccount.holder,
                                  CardAccount.valid_to).where(CardAccount.asn == asn)).first()
    book = ledger.card_ledger(conn, asn=asn)
    return {
        "asn": asn, "card_type": card.card_type, "status": card.status,
        "deposit": None if account is None else account.deposit,
        "frozen_balance": None if account is None else account.frozen_balance,
        "ledger": {"opening": book.opening, "loads": book.loads, "purchases": book.purchases,
                   "adjustments": book.adjustments, "refunds": book.refunds, "balance": book.balance,
                   "card_balance": book.card_balance, "agrees": book.agrees,
                   "findings": [{"kind": f.kind, "key": f.key, "detail": f.detail} for f in book.findings]},
        "cases": [{"id": c.id, "kind": c.kind, "key": c.key, "detail": c.detail, "opened_at": c.opened_at}
                  for c in cases.open_cases(conn, asn=asn)],
        "trail": [{"at": a.at, "who": a.who, "action": a.action, "order_id": a.order_id, "amount": a.amount,
                   "why": a.why} for a in audit.trail(conn, asn=asn)],
    }


@router.get("/cards/{asn}/ledger")
def card_ledger(
    *,
    asn: Asn,
    who: Annotated[Principal, Depends(owned_by("operator_staff"))],
    conn: Annotated[Connection, Depends(connection)],
) -> dict:
    """The card's ledger: opening + loads - purchases + adjustments - refunds = book balance, beside the balance
    the card last reported (``agrees``), its findings, open cases and audit trail."""
    found = ledger_view(conn, asn)
    if found is None:
        raise HTTPException(404, f"card {asn!r} is not issued here")
    return found


class Why(BaseModel):
    why: Annotated[Text(500, min_length=1), Field(description="the reason, kept in the audit record")]


class Money(Why):
    amount: Annotated[SignedFen, Field(description="fen, a whole number; an adjustment carries its sign, a refund "
                                                   "is positive")]


class CaseClose(BaseModel):
    resolution: Text(500, min_length=1)
    block_card: bool = False


@router.post("/cards/{asn}/lost")
def report_lost(*, asn: Asn, body: Why, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> dict:
    """The card goes on the deny list (status lost) and its book balance is frozen for refund."""
    from backoffice.cards import issuance

    with writing(svc) as conn:
        try:
            frozen = issuance.report_lost(conn, asn=asn.lower(), who=who.name, why=body.why, now=svc.clock())
        except issuance.IssueError as e:
            raise LookupError(str(e)) if "not known" in str(e) else ValueError(str(e)) from None
    return {"asn": asn.lower(), "status": "lost", "frozen_balance": frozen}


@router.post("/cards/{asn}/refund")
def refund(*, asn: Asn, body: Money, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
           svc: Annotated[Services, Depends(services)]) -> dict:
    """Pay part or all of a lost card's frozen balance back to its holder."""
    from backoffice.cards import ledger

    with writing(svc) as conn:
        book = ledger.refund_balance(conn, asn=asn.lower(), amount=body.amount, who=who.name, why=body.why,
                                     now=svc.clock())
    return {"asn": asn.lower(), "balance": book.balance, "refunds": book.refunds}


@router.post("/cards/{asn}/adjustments")
def adjust(*, asn: Asn, body: Money, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
           svc: Annotated[Services, Depends(services)]) -> dict:
    """Correct the card's book by ``amount`` fen (signed) with a reason; the audit names who did it."""
    from backoffice.cards import ledger

    with writing(svc) as conn:
        book = ledger.adjust(conn, asn=asn.lower(), amount=body.amount, who=who.name, why=body.why,
                             now=svc.clock())
    return {"asn": asn.lower(), "balance": book.balance, "adjustments": book.adjustments}


@router.post("/cases/{case_id}/close")
def close_case(*, case_id: RowId, body: CaseClose, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
               svc: Annotated[Services, Depends(services)]) -> dict:
    """Close a case with what was decided; ``block_card`` puts the card on the deny list."""
    from backoffice.cards import cases

    with writing(svc) as conn:
        c = cases.close_case(conn, case_id=case_id, who=who.name, resolution=body.resolution,
                             block_card=body.block_card, now=svc.clock())
    return {"id": c.id, "asn": c.asn, "status": c.status, "resolution": c.resolution}

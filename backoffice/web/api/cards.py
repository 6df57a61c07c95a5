"""Cards at the mobile operator's counter: the card as issued, its balance and records, its ledger and open cases;
loss reporting, refunds of a lost card's frozen balance, adjustments and closing cases, each a use case of
backoffice.cards with an audit record naming the token's holder."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
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
    account = conn.execute(select(CardAccount).where(CardAccount.asn == asn)).first()
    book = ledger.card_ledger(conn, asn=asn)
    return {
        "asn": asn, "card_type": card.card_type, "status": card.status, "issued": account is not None,
        "deposit": None if account is None else account.deposit,
        "frozen_balance": None if account is None else account.frozen_balance,
        "holder": None if account is None else account.holder, "proof": None if account is None else account.proof,
        "issued_at": None if account is None else account.issued_at,
        "issued_by": None if account is None else account.issued_by,
        "opening_balance": None if account is None else account.opening_balance,
        "valid_from": None if account is None else account.valid_from,
        "valid_to": None if account is None else account.valid_to,
        "last_seen": last_seen(conn, asn, account),
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


def last_seen(conn: Connection, asn: str, account) -> dict | None:
    """The latest balance the card itself told, and when: its newest fare or confirmed load, else what it held
    when issued. None when the card never told one."""
    from backoffice.models import CardLoad, Tap

    tap = conn.execute(select(Tap.balance_after, Tap.occurred_at).where(Tap.card_asn == asn, Tap.kind == "purchase")
                       .order_by(Tap.occurred_at.desc(), Tap.card_ttc.desc()).limit(1)).first()
    load = conn.execute(select(CardLoad.balance_before, CardLoad.amount, CardLoad.settled_at, CardLoad.channel)
                        .where(CardLoad.asn == asn, CardLoad.status == "loaded")
                        .order_by(CardLoad.online_ttc.desc()).limit(1)).first()
    seen = []
    if tap is not None:
        seen.append({"balance": tap.balance_after, "at": tap.occurred_at, "source": "fare"})
    if load is not None:
        seen.append({"balance": load.balance_before + load.amount, "at": load.settled_at, "source": load.channel})
    if seen:
        return max(seen, key=lambda s: reads.utc(s["at"]))
    if account is not None:
        return {"balance": account.opening_balance, "at": account.issued_at, "source": "issue"}
    return None


# ------------------------------------------------------------------------------------------ counter top-up
# The desk reader is reached through the desk agent (farebox desk) by the page's JavaScript; the host's half is
# here, in two steps around the card's CREDIT FOR LOAD (backoffice.cards.topup.authorize_counter_load, as
# `farebox topup counter` does in one process).
Hex = Annotated[str, Field(pattern=r"^[0-9a-fA-F]*$")]


class CounterLoadAsk(BaseModel):
    amount: Annotated[int, Field(gt=0, le=100_000_00, strict=True, description="fen, a whole number")]
    terminal_id: Annotated[Hex, Field(min_length=12, max_length=12, description="the desk's terminal, 6 bytes")]
    init_answer: Annotated[Hex, Field(min_length=32, max_length=32,
                                      description="the card's INITIALIZE FOR LOAD answer data, 16 bytes")]
    log: list[Annotated[Hex, Field(min_length=46, max_length=46)]] = Field(
        default_factory=list, max_length=10, description="the card's READ RECORD data, newest first")


class CounterTac(BaseModel):
    tac: Annotated[Hex, Field(min_length=8, max_length=8, description="CREDIT FOR LOAD's TAC, 4 bytes")]


def issuer_keys(request: Request):
    keys = getattr(request.app.state, "ota_keys", None)
    if keys is None:
        raise HTTPException(503, "the issuer key service is not configured on this server (configure_ota)")
    return keys


def counter_authorize(svc: Services, keys, *, asn: str, body: CounterLoadAsk, who: Principal) -> dict:
    """MAC1 checked, earlier loads settled from the card's log, MAC2 granted and committed before it leaves."""
    from backoffice.cards import topup
    from epurse import apdu

    try:
        init = apdu.parse_init_load(bytes.fromhex(body.init_answer))
        log = [apdu.parse_log_record(bytes.fromhex(r)) for r in body.log]
    except apdu.ResponseError as e:
        raise HTTPException(422, {"reason": "bad_request", "message": str(e)}) from None
    with writing(svc) as conn:
        grant = topup.authorize_counter_load(conn, keys=keys, asn=asn.lower(), init=init, log=log,
                                             amount=body.amount, terminal_id=bytes.fromhex(body.terminal_id),
                                             staff=who.name, now=svc.clock())
    return {"asn": asn.lower(), "load_id": grant.load_id, "amount": body.amount,
            "credit_apdu": grant.credit_apdu().hex()}


def counter_confirm(svc: Services, keys, *, load_id: int, body: CounterTac) -> dict:
    """The card's TAC for a counter load: verified, the load recorded; the card's new balance and the book's."""
    from backoffice.cards import ledger, topup
    from backoffice.models import CardLoad

    with writing(svc) as conn:
        row = conn.execute(select(CardLoad.asn, CardLoad.channel, CardLoad.amount, CardLoad.balance_before)
                           .where(CardLoad.id == load_id)).first()
        if row is None or row.channel != "counter":
            raise LookupError(f"no counter load {load_id}")
        topup.confirm_load(conn, keys=keys, load_id=load_id, tac=bytes.fromhex(body.tac), now=svc.clock())
        book = ledger.card_ledger(conn, asn=row.asn)
    return {"asn": row.asn, "load_id": load_id, "status": "loaded", "amount": row.amount,
            "card_balance": row.balance_before + row.amount, "book_balance": book.balance}


@router.post("/cards/{asn}/counter-loads")
def counter_load(*, asn: Asn, body: CounterLoadAsk, request: Request,
                 who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                 svc: Annotated[Services, Depends(services)]) -> dict:
    """The host's half of a counter top-up: the card's INITIALIZE FOR LOAD answer (and log) as the desk reader
    read them; answers the CREDIT FOR LOAD command (with MAC2) to send to the card."""
    return counter_authorize(svc, issuer_keys(request), asn=asn, body=body, who=who)


@router.post("/counter-loads/{load_id}/tac")
def counter_load_tac(*, load_id: RowId, body: CounterTac, request: Request,
                     who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                     svc: Annotated[Services, Depends(services)]) -> dict:
    """The card's TAC for a counter load: verified and the load recorded (a repeat of the same TAC is harmless)."""
    return counter_confirm(svc, issuer_keys(request), load_id=load_id, body=body)

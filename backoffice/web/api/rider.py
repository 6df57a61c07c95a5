"""Rider self-service, for the mobile operator's gateway: what a rider's phone app or SMS menu asks about one card.

- ``GET /rider/cards/{asn}``: the card's status and its balance as last known: the book (what the back office
  owes the holder: opening + loads - fares + adjustments - refunds, backoffice.cards.ledger) beside the balance the
  card itself last reported (in a fare or a load) and when. They differ while fares are still on their way from
  the buses, which is normal for a few hours; ``agrees`` says whether they match now.
- ``GET /rider/cards/{asn}/rides?limit=10``: the newest rides (fares taken, and refusals of a blocked card), with
  the bus company, route code and route name, the time in UTC and on the bus company's local clock.
- ``GET /rider/cards/{asn}/topups?limit=10``: top-ups, newest first: over-the-air orders with their status
  (created, paid, authorized, loaded, unconfirmed, refunded) and loads at the counter (loaded, authorized, void),
  times in UTC and local (``tz``, default Asia/Shanghai: a card belongs to no bus company).
- ``POST /rider/cards/{asn}/lost``: the rider reports the card lost: it goes on the deny list and its book balance
  is frozen for refund at the counter, as when counter staff do it (backoffice.cards.issuance.report_lost). Asking
  again for a card already lost changes nothing and says so.

Who calls: the gateway, never the phone. The gateway authenticates its riders itself (SIM channel, login) and
decides which cards a rider may see; it calls here with an ``operator_staff`` token, the role of the mobile
operator's own systems and counters (the OTA top-up steps use the same: ``farebox token add --role operator_staff
--name rider-gateway``). No new role: the gateway acts for the mobile operator, which already sees every card and
reports cards lost at its counters; a separate token name keeps its actions apart in the audit trail, where a
loss report reads "<token name> for rider <rider>". Money is integer fen; times are UTC with offset, and local
text beside them for the phone to show as it is.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import Connection, and_, select

from backoffice.models import Card, CardAccount, CardLoad, Operator, Route, Tap, TopupOrder
from backoffice.web.api.ota import writing
from backoffice.web.api.types import Asn, Text
from backoffice.web.auth import Principal, owned_by
from backoffice.web.deps import Services, connection, services
from clearing.service_day import DEFAULT_TZ, local_time

router = APIRouter(prefix="/rider", tags=["rider self-service"])
GATEWAY = ("operator_staff",)
LOCAL = "%Y-%m-%d %H:%M"


def _utc(at: datetime | None) -> datetime | None:
    """A stored time as aware UTC (SQLite hands it back naive)."""
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _zone(tz: str) -> str:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise HTTPException(422, f"tz {tz!r} is not a time zone name such as Asia/Shanghai") from None
    return tz


def _card(conn: Connection, asn: str):
    found = conn.execute(select(Card.asn, Card.card_type, Card.status).where(Card.asn == asn)).first()
    if found is None:
        raise HTTPException(404, f"card {asn} is not issued here")
    return found


def _last_seen(conn: Connection, asn: str) -> datetime | None:
    """When the card last told its balance: its newest fare or completed load."""
    tap = conn.execute(select(Tap.occurred_at).where(Tap.card_asn == asn, Tap.kind == "purchase")
                       .order_by(Tap.occurred_at.desc()).limit(1)).scalar()
    load = conn.execute(select(CardLoad.settled_at).where(CardLoad.asn == asn, CardLoad.status == "loaded")
                        .order_by(CardLoad.settled_at.desc()).limit(1)).scalar()
    seen = [_utc(t) for t in (tap, load) if t is not None]
    return max(seen, default=None)


@router.get("/cards/{asn}")
def card_balance(*, asn: Asn, tz: str = DEFAULT_TZ,
                 who: Annotated[Principal, Depends(owned_by(*GATEWAY))],
                 conn: Annotated[Connection, Depends(connection)]) -> dict:
    """The card's status and its balance as last known: the book beside what the card last reported."""
    from backoffice.cards import ledger

    asn, tz = asn.lower(), _zone(tz)
    card = _card(conn, asn)
    issued = conn.execute(select(CardAccount.asn).where(CardAccount.asn == asn)).first() is not None
    book = ledger.card_ledger(conn, asn=asn)
    seen = _last_seen(conn, asn)
    return {
        "asn": asn, "card_type": card.card_type, "status": card.status,
        "balance": {
            # Without an issuance record the back office never knew the opening balance: no book to show.
            "book": book.balance if issued else None,
            "card": book.card_balance,
            "card_seen_at": seen, "card_seen_local": local_time(seen, tz, LOCAL) if seen else None,
            "agrees": book.agrees if issued and book.card_balance is not None else None,
        },
        "tz": tz,
    }


@router.get("/cards/{asn}/rides")
def rides(*, asn: Asn, limit: Annotated[int, Query(ge=1, le=100)] = 10,
          who: Annotated[Principal, Depends(owned_by(*GATEWAY))],
          conn: Annotated[Connection, Depends(connection)]) -> dict:
    """The newest rides of the card, with route names and each bus company's local time."""
    asn = asn.lower()
    _card(conn, asn)
    rows = conn.execute(
        select(Tap.kind, Tap.occurred_at, Tap.operator, Operator.name.label("operator_name"), Operator.timezone,
               Tap.route, Route.name.label("route_name"), Tap.amount, Tap.full_fare, Tap.balance_after,
               Tap.reason, Tap.device_id, Tap.device_seq)
        .outerjoin(Operator, Operator.code == Tap.operator)
        .outerjoin(Route, and_(Route.code == Tap.route, Route.operator == Tap.operator))
        .where(Tap.card_asn == asn, Tap.kind.in_(("purchase", "denied")))
        .order_by(Tap.occurred_at.desc(), Tap.card_ttc.desc(), Tap.id.desc()).limit(limit)).all()
    out = []
    for r in rows:
        at, tz = _utc(r.occurred_at), r.timezone or DEFAULT_TZ
        purchase = r.kind == "purchase"
        out.append({
            "kind": "fare" if purchase else "refused", "at": at, "local_time": local_time(at, tz, LOCAL),
            "tz": tz, "operator": r.operator, "operator_name": r.operator_name or r.operator, "route": r.route,
            "route_name": r.route_name or r.route, "fare": r.amount if purchase else 0,
            "full_fare": r.full_fare if purchase else 0, "balance_after": r.balance_after if purchase else None,
            "note": r.reason, "device_id": r.device_id, "device_seq": r.device_seq})
    return {"asn": asn, "rides": out}


@router.get("/cards/{asn}/topups")
def topups(*, asn: Asn, limit: Annotated[int, Query(ge=1, le=100)] = 10, tz: str = DEFAULT_TZ,
           who: Annotated[Principal, Depends(owned_by(*GATEWAY))],
           conn: Annotated[Connection, Depends(connection)]) -> dict:
    """Top-ups of the card, newest first: over-the-air orders with their status, and counter loads."""
    asn, tz = asn.lower(), _zone(tz)
    _card(conn, asn)
    items = []
    for o in conn.execute(select(TopupOrder).where(TopupOrder.asn == asn)
                          .order_by(TopupOrder.created_at.desc()).limit(limit)):
        items.append({"channel": "ota", "order_id": o.order_id, "amount": o.amount, "status": o.status,
                      "at": _utc(o.created_at), "updated_at": _utc(o.updated_at)})
    for c in conn.execute(select(CardLoad).where(CardLoad.asn == asn, CardLoad.channel == "counter")
                          .order_by(CardLoad.authorized_at.desc()).limit(limit)):
        items.append({"channel": "counter", "order_id": None, "amount": c.amount, "status": c.status,
                      "at": _utc(c.authorized_at), "updated_at": _utc(c.settled_at or c.authorized_at)})
    items.sort(key=lambda i: i["at"], reverse=True)
    for i in items[:limit]:
        i["local_time"] = local_time(i["at"], tz, LOCAL)
    return {"asn": asn, "tz": tz, "topups": items[:limit]}


class LostReport(BaseModel):
    rider: Annotated[Text(32, min_length=1), Field(description="who reported it, as the gateway knows the rider "
                                                               "(e.g. the phone number); kept in the audit trail")]
    why: Annotated[Text(300), Field(description="the rider's words, if any")] = ""


@router.post("/cards/{asn}/lost")
def report_lost(*, asn: Asn, body: LostReport, who: Annotated[Principal, Depends(owned_by(*GATEWAY))],
                svc: Annotated[Services, Depends(services)]) -> dict:
    """The rider reports the card lost: deny-listed, book balance frozen for refund at the counter."""
    from backoffice.cards import issuance

    asn = asn.lower()
    with writing(svc) as conn:
        status = conn.execute(select(Card.status).where(Card.asn == asn)).scalar()
        if status is None:
            raise HTTPException(404, f"card {asn} is not issued here")
        if status == "lost":
            frozen = conn.execute(select(CardAccount.frozen_balance).where(CardAccount.asn == asn)).scalar()
            return {"asn": asn, "status": "lost", "frozen_balance": frozen, "already": True}
        if status != "active":
            raise HTTPException(409, f"card {asn} is {status}: the counter handles it, not self-service")
        why = f"reported lost by the rider ({body.why})" if body.why.strip() else "reported lost by the rider"
        try:
            # card_audit.who holds 64 characters: the token's name and the rider, cut to fit rather than refused
            frozen = issuance.report_lost(conn, asn=asn, who=f"{who.name} for rider {body.rider}"[:64], why=why,
                                          now=svc.clock())
        except issuance.IssueError as e:
            raise HTTPException(409, str(e)) from None
    return {"asn": asn, "status": "lost", "frozen_balance": frozen, "already": False}

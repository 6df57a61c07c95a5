"""The partner API: what the operator's own app (a mini-program) calls to sell its tickets (issue 11, channel
``partner``). JSON, in the app's OpenAPI under the tag "partner (mini-program)".

- ``GET /partner/products``: the operator's products on sale, prices in fen.
- ``GET /partner/departures?day=YYYY-MM-DD[&until=..][&route=..]``: coach departures with ``seats_free``.
- ``POST /partner/orders``: ``{"partner_order_no", "phone", "items": [{"product", "quantity", "departure_id",
  "start_date"}]}``. ``partner_order_no`` is the partner's own order number and the idempotency key: sent again
  (a lost answer, a double tap) it answers the order it made the first time (200, ``created: false``) and holds no
  second seat; a new one answers 201. The answer carries ``pay_url``, the payment platform's page for the rider.
- ``GET /partner/orders/{partner_order_no}``: state (created, paid, issued, used, refunded, expired), money in fen.
- ``GET /partner/orders/{partner_order_no}/tickets``: each ticket's QR text (``token``: the signed token,
  wire.ticket) and 16-digit ``pickup_code``; empty until paid (a paid order's tickets are issued on this read).
- ``POST /partner/orders/{partner_order_no}/refund``: ``{"ticket_ids"?, "reason"}``: unused tickets refunded through
  the payment platform exactly once (backoffice.payments.service.refund).

Who calls: a bearer token of role ``partner``, bound to one operator like a clerk's (``farebox token add --role
partner --operator X --name X-app``). A token, not a separate API-key scheme: the token file already hashes,
expires, revokes and audits by name, and the role matrix covers the endpoints like every other. The operator is the
token's (an ``operator`` query naming another answers 404, as for a clerk); an admin names it with ``?operator=``.
Partner tokens of one operator share its order-number space (the operator's app is the one partner it has).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from backoffice.tickets import catalogue, orders
from backoffice.web import shop_service
from backoffice.web.api.types import Reason, RowId, ServiceDay
from backoffice.web.auth import Principal, owned_by
from backoffice.web.deps import Services, scoped, services

router = APIRouter(prefix="/partner", tags=["partner (mini-program)"])
PARTNER = ("partner",)
PartnerOrderNo = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$"),
                           Field(description="the partner's own order number: the idempotency key")]
Phone = Annotated[str, StringConstraints(max_length=24, pattern=r"^\+?[0-9]{5,20}$")]
TicketId = Annotated[int, Field(ge=1, le=2**63 - 1)]
CodeQuery = Annotated[str | None, Query(max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]  # operator, route codes
_STATUS = {"unknown_order": 404, "unknown_product": 404, "unknown_departure": 404, "unknown_operator": 404,
           "sold_out": 409, "departed": 409, "not_refundable": 409, "bad_state": 409, "not_paid": 409,
           "conflict": 409}


def refused(e: Exception) -> HTTPException:
    code = getattr(e, "code", "bad_request")
    return HTTPException(_STATUS.get(code, 422), {"reason": code, "message": str(e)})


def operator_of(who: Principal, operator: str | None) -> str:
    op = scoped(who, operator)
    if op is None:
        raise HTTPException(422, {"reason": "operator_needed", "message": "name the operator: ?operator=CODE "
                                  "(a partner token is bound to its own)"})
    return op


class Item(BaseModel):
    product: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
    quantity: Annotated[int, Field(strict=True, ge=1, le=orders.MAX_QUANTITY)] = 1
    departure_id: RowId | None = None
    start_date: ServiceDay | None = None


class NewOrder(BaseModel):
    partner_order_no: PartnerOrderNo
    phone: Phone = ""
    items: Annotated[list[Item], Field(min_length=1, max_length=orders.MAX_ITEMS)]


class RefundAsk(BaseModel):
    ticket_ids: Annotated[list[TicketId], Field(max_length=orders.MAX_ITEMS * orders.MAX_QUANTITY)] | None = None
    reason: Reason = "partner refund"


def _order_id(svc: Services, operator: str, number: str) -> str:
    from sqlalchemy import select

    from backoffice.models import TicketOrder

    with svc.engine.connect() as conn:
        found = conn.execute(select(TicketOrder.order_id).where(
            TicketOrder.operator == operator, TicketOrder.channel == "partner",
            TicketOrder.idempotency_key == number)).scalar()
    if found is None:
        raise HTTPException(404, {"reason": "unknown_order", "message": f"no order {number} of yours"})
    return found


def order_view(v: orders.OrderView, number: str, pay_url: str | None = None) -> dict:
    return {"partner_order_no": number, "order_id": v.order_id, "operator": v.operator, "state": v.state,
            "total_fen": v.total_fen, "paid_fen": v.paid_fen, "refunded_fen": v.refunded_fen,
            "created_at": v.created_at, "pay_by": v.expires_at, "paid_at": v.paid_at, "issued_at": v.issued_at,
            "pay_url": pay_url,
            "items": [{"product": i["product"], "kind": i["kind"], "quantity": i["quantity"],
                       "departure_id": i["departure_id"], "start_date": i["start_date"], "unit_fen": i["unit_fen"],
                       "amount_fen": i["amount_fen"]} for i in v.items]}


def ticket_view(t: orders.IssuedTicket, state: str | None = None) -> dict:
    return {"ticket_id": t.ticket_id, "token": t.token, "pickup_code": t.pickup_code, "kind": t.kind,
            "routes": list(t.routes), "valid_from": t.valid_from, "valid_to": t.valid_to,
            "uses_allowed": t.uses_allowed, "state": state}


@router.get("/products")
def products(*, who: Annotated[Principal, Depends(owned_by(*PARTNER))], svc: Annotated[Services, Depends(services)],
             operator: CodeQuery = None) -> list[dict]:
    """The operator's products on sale now."""
    op = operator_of(who, operator)
    with svc.engine.connect() as conn:
        found = catalogue.list_products(conn, op, active_only=True)
    return [{"code": p.code, "kind": p.kind, "name": p.name, "price_fen": p.price_fen, "routes": list(p.routes),
             "validity_days": p.validity_days, "uses": p.uses, "rider_category": p.rider_category} for p in found]


@router.get("/departures")
def departures(*, who: Annotated[Principal, Depends(owned_by(*PARTNER))],
               svc: Annotated[Services, Depends(services)], day: ServiceDay,
               until: ServiceDay | None = None, route: CodeQuery = None,
               operator: CodeQuery = None) -> list[dict]:
    """Coach departures from ``day`` to ``until`` (at most 31 days), with the seats still free; a departure that
    has left shows 0."""
    op = operator_of(who, operator)
    if until is not None and not 0 <= (until - day).days <= 31:
        raise HTTPException(422, {"reason": "bad_range", "message": "until is day to 31 days after it"})
    now = svc.clock()
    with svc.engine.connect() as conn:
        found = catalogue.list_departures(conn, op, day=day, until=until, route=route)
    return [{"departure_id": d.id, "product": d.product, "route": d.route, "direction": d.direction,
             "service_date": d.service_date, "departs_local": d.departs_local, "departs_at": d.departs_at,
             "seats": d.seats, "seats_free": 0 if shop_service.utc(d.departs_at) <= now else d.seats_free}
            for d in found if d.active]


@router.post("/orders", status_code=201)
def create_order(*, body: NewOrder, response: Response, request: Request,
                 who: Annotated[Principal, Depends(owned_by(*PARTNER))], svc: Annotated[Services, Depends(services)],
                 operator: CodeQuery = None) -> dict:
    """A new order, its coach seats held until ``pay_by``; the same ``partner_order_no`` again answers the first
    order (200) and changes nothing."""
    op = operator_of(who, operator)
    cfg = shop_service.shop_config(request)
    now = svc.clock()
    shop_service.limited(cfg, f"partner-order:{who.name}", (600, shop_service.ORDERS_PER_CLIENT[1]), now,
                         ("下单过于频繁", "too many orders from this partner this hour: wait"))
    items = [orders.ItemRequest(i.product, i.quantity, i.departure_id, i.start_date) for i in body.items]
    try:
        order_id, made = shop_service.place_order(svc.engine, cfg, operator=op, channel="partner", phone=body.phone,
                                                  items=items, who=f"partner {who.name}",
                                                  idempotency_key=body.partner_order_no, now=now)
    except orders.OrderError as e:
        raise refused(e) from None
    if not made:
        response.status_code = 200
    with svc.engine.connect() as conn:
        view = orders.show_order(conn, order_id)
    return order_view(view, body.partner_order_no, shop_service.payment_page(svc.engine, cfg, order_id)) | {
        "created": made}


@router.get("/orders/{partner_order_no}")
def order_status(*, partner_order_no: PartnerOrderNo, request: Request,
                 who: Annotated[Principal, Depends(owned_by(*PARTNER))], svc: Annotated[Services, Depends(services)],
                 operator: CodeQuery = None) -> dict:
    op = operator_of(who, operator)
    cfg = shop_service.shop_config(request)
    order_id = _order_id(svc, op, partner_order_no)
    view, _ = shop_service.read_order(svc.engine, cfg, order_id, now=svc.clock(), who=f"partner {who.name}")
    pay_url = shop_service.payment_page(svc.engine, cfg, order_id) if view.state == "created" else None
    return order_view(view, partner_order_no, pay_url)


@router.get("/orders/{partner_order_no}/tickets")
def order_tickets(*, partner_order_no: PartnerOrderNo, request: Request,
                  who: Annotated[Principal, Depends(owned_by(*PARTNER))],
                  svc: Annotated[Services, Depends(services)],
                  operator: CodeQuery = None) -> dict:
    """The tickets: QR text and pickup code each. Empty while the order is unpaid."""
    op = operator_of(who, operator)
    cfg = shop_service.shop_config(request)
    order_id = _order_id(svc, op, partner_order_no)
    view, tickets = shop_service.read_order(svc.engine, cfg, order_id, now=svc.clock(), who=f"partner {who.name}")
    if view.state == "paid" and cfg.ticket_keys is None:
        raise HTTPException(503, {"reason": "not_configured", "message": "ticket keys are not configured here"})
    states = {t["ticket_id"]: t["state"] for t in view.tickets}
    return {"partner_order_no": partner_order_no, "state": view.state,
            "tickets": [ticket_view(t, states.get(t.ticket_id)) for t in tickets]}


@router.post("/orders/{partner_order_no}/refund")
def refund(*, partner_order_no: PartnerOrderNo, body: RefundAsk, request: Request,
           who: Annotated[Principal, Depends(owned_by(*PARTNER))], svc: Annotated[Services, Depends(services)],
           operator: CodeQuery = None) -> dict:
    """Refund the order's unused tickets (or ``ticket_ids`` of them) through the payment platform, exactly once:
    the refund is written down before the platform is asked, and a lost answer is retried with the same refund id."""
    from backoffice.payments import service as payments

    op = operator_of(who, operator)
    cfg = shop_service.shop_config(request)
    order_id = _order_id(svc, op, partner_order_no)
    now = svc.clock()
    with svc.engine.connect() as conn:
        quote = orders.refund_quote(conn, order_id, ticket_ids=body.ticket_ids, now=now)
    if quote.amount_fen <= 0:
        raise HTTPException(409, {"reason": "not_refundable", "message": "nothing of this order can be refunded: "
                                  + ("; ".join(f"ticket {t}: {w}" for t, w in quote.refused.items())
                                     or "nothing paid")})
    if cfg.platform is None:
        raise HTTPException(503, {"reason": "not_configured", "message": "no payment platform is configured here"})
    try:
        row = payments.refund(svc.engine, cfg.platform, order_id=order_id, who=f"partner {who.name}",
                              why=body.reason or "partner refund", ticket_ids=body.ticket_ids, now=now)
    except payments.RefundError as e:
        raise refused(e) from None
    return {"partner_order_no": partner_order_no, "refund_id": row["refund_id"], "state": row["state"],
            "amount_fen": row["amount"],
            "ticket_ids": [int(t) for t in (row.get("ticket_ids") or "").split()]}

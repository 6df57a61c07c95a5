"""The counter staff's ticket order page (issue 11): ``/tickets/orders`` (role ``operator_staff``) finds an order by
its id, a rider's phone or among the newest; ``/tickets/orders/{order_id}`` shows the order, its items and tickets,
each use a validator or counter recorded, the payment, every refund and its state at the platform, and the order's
audit lines.

The refund button refunds the order's unused tickets through the payment platform exactly once
(``backoffice.payments.service.refund``, as the partner API does): the refund row is committed before the platform
is asked, and when no answer comes the refund stays pending and is sent again with the same refund id (the job, or
the "send again" button here). A second click finds nothing left to refund. The forms carry a CSRF field."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import or_, select

from backoffice.models import Operator, TicketOrder
from backoffice.payments import service as payments
from backoffice.payments import tables as payment_tables
from backoffice.tickets import orders
from backoffice.tickets.uses import ticket_use
from backoffice.web.auth import Principal, page_of
from backoffice.web.csrf import check_csrf, csrf_token
from backoffice.web.deps import Services, services
from backoffice.web.pages import render

router = APIRouter(include_in_schema=False)
STAFF = ("operator_staff",)
NEWEST = 50
STATE_LABELS = {
    "created": ("待支付", "waiting for payment"), "paid": ("已支付", "paid"), "issued": ("已出票", "issued"),
    "used": ("已使用", "used"), "refunded": ("已退款", "refunded"), "expired": ("已过期", "expired"),
}
TICKET_LABELS = {
    "issued": ("有效", "valid"), "used": ("已用完", "used up"), "refunded": ("已退款", "refunded"),
    "expired": ("已过期", "expired"),
}
REFUND_LABELS = {
    "pending": ("待平台答复", "waiting for the platform"), "succeeded": ("已退款", "paid back"),
    "failed": ("平台拒绝", "refused by the platform"),
}


def platform_of(request: Request):
    """The payment platform adapter ``farebox serve`` configured (FAREBOX_PAYMENT_URL), or the shop's."""
    platform = getattr(request.app.state, "payment_platform", None)
    if platform is None:
        shop = getattr(request.app.state, "shop", None)
        platform = getattr(shop, "platform", None)
    return platform


def _order_or_404(conn, who: Principal, order_id: str) -> orders.OrderView:
    try:
        view = orders.show_order(conn, order_id)
    except orders.OrderError:
        raise HTTPException(404, f"no ticket order {order_id}") from None
    if not who.may_see(view.operator):
        raise HTTPException(404, f"no ticket order {order_id}")
    return view


def _read(svc: Services, who: Principal, order_id: str) -> dict:
    with svc.engine.connect() as conn:
        view = _order_or_404(conn, who, order_id)
        op = conn.execute(select(Operator.name, Operator.timezone).where(Operator.code == view.operator)).one()
        ids = [t["ticket_id"] for t in view.tickets]
        u = ticket_use
        uses = [dict(r._mapping) for r in conn.execute(
            select(u.c.ticket_id, u.c.use_no, u.c.presented_by, u.c.route, u.c.vehicle, u.c.driver, u.c.staff,
                   u.c.device_id, u.c.occurred_at, u.c.flag, u.c.reason)
            .where(u.c.ticket_id.in_(ids)).order_by(u.c.occurred_at, u.c.id))] if ids else []
        r = payment_tables.refund
        refunds = [dict(row._mapping) for row in conn.execute(
            select(r).where(r.c.order_id == view.order_id).order_by(r.c.created_at, r.c.refund_id))]
        quote = orders.refund_quote(conn, view.order_id, now=svc.clock())
    return {"order": view, "op_name": op.name, "tz": op.timezone, "uses": uses, "refunds": refunds,
            "quote": quote}


def _page(request: Request, who: Principal, svc: Services, order_id: str, *, status: int = 200, done=None,
          error=None) -> HTMLResponse:
    return render(request, "ticket_order.html", who, status=status, csrf=csrf_token(request),
                  labels=STATE_LABELS, ticket_labels=TICKET_LABELS, refund_labels=REFUND_LABELS,
                  platform=platform_of(request) is not None,
                  done=done, error=error, **_read(svc, who, order_id))


@router.get("/tickets/orders")
def find_orders(*, request: Request, who: Annotated[Principal, Depends(page_of(*STAFF))],
                svc: Annotated[Services, Depends(services)],
                q: Annotated[str, Query(max_length=40)] = "") -> HTMLResponse:
    """One order by its id (straight to its page), a phone's orders, or the newest."""
    q = q.strip()
    o = TicketOrder
    query = select(o.order_id, o.operator, o.channel, o.state, o.total_fen, o.refunded_fen, o.created_at)
    if not who.may_see(None):  # a role bound to one operator
        query = query.where(o.operator == who.operator)
    with svc.engine.connect() as conn:
        if q:
            exact = conn.execute(select(o.order_id, o.operator).where(o.order_id == q)).first()
            if exact is not None and who.may_see(exact.operator):
                return RedirectResponse(f"/tickets/orders/{exact.order_id}", status_code=303)
            query = query.where(or_(o.phone == q, o.idempotency_key == q))
        found = [dict(r._mapping) for r in conn.execute(query.order_by(o.created_at.desc()).limit(NEWEST))]
    return render(request, "ticket_orders.html", who, q=q, found=found, labels=STATE_LABELS)


@router.get("/tickets/orders/{order_id}")
def order_page(*, order_id: str, request: Request, who: Annotated[Principal, Depends(page_of(*STAFF))],
               svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    return _page(request, who, svc, order_id[:40])


@router.post("/tickets/orders/{order_id}/refund")
async def refund_order(*, order_id: str, request: Request, who: Annotated[Principal, Depends(page_of(*STAFF))],
                       svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    form = {k: str(v) for k, v in (await request.form()).items()}
    check_csrf(request, form.get("csrf", ""))
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_refund, request, who, svc, order_id[:40], form)


def _refund(request: Request, who: Principal, svc: Services, order_id: str, form: dict) -> HTMLResponse:
    with svc.engine.connect() as conn:
        _order_or_404(conn, who, order_id)
    platform = platform_of(request)
    why = " ".join(form.get("why", "").split())[:200]
    if not why:
        return _page(request, who, svc, order_id, status=422, error=("请填写原因", "Give the reason"))
    if platform is None:
        return _page(request, who, svc, order_id, status=503,
                     error=("未配置支付平台", "No payment platform is configured here (FAREBOX_PAYMENT_URL)"))
    try:
        row = payments.refund(svc.engine, platform, order_id=order_id, who=who.name, why=why, now=svc.clock())
    except payments.RefundError as e:
        return _page(request, who, svc, order_id, status=409, error=("不能退款", str(e)))
    return _page(request, who, svc, order_id, done=row)


@router.post("/tickets/orders/{order_id}/refunds/{refund_id}/send")
async def send_again(*, order_id: str, refund_id: str, request: Request,
                     who: Annotated[Principal, Depends(page_of(*STAFF))],
                     svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    """A refund still waiting for the platform's answer, sent again now with its own refund id."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    check_csrf(request, form.get("csrf", ""))
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_send_again, request, who, svc, order_id[:40], refund_id[:40])


def _send_again(request: Request, who: Principal, svc: Services, order_id: str, refund_id: str) -> HTMLResponse:
    with svc.engine.connect() as conn:
        _order_or_404(conn, who, order_id)
        try:
            row = payments.get_refund(conn, refund_id)
        except LookupError:
            row = None
    if row is None or row["order_id"] != order_id:
        raise HTTPException(404, f"no refund {refund_id} of order {order_id}")
    platform = platform_of(request)
    if platform is None:
        return _page(request, who, svc, order_id, status=503,
                     error=("未配置支付平台", "No payment platform is configured here (FAREBOX_PAYMENT_URL)"))
    return _page(request, who, svc, order_id, done=payments.send_refund(svc.engine, platform, refund_id,
                                                                        now=svc.clock()))


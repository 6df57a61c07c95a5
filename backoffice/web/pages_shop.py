"""The rider's web shop (issue 11, channel ``web``): public pages under /shop, made for a phone's screen, no staff
login and no script.

1. ``/shop`` lists the bus companies selling tickets; ``/shop/{operator}`` their products and the day's coach
   departures with the seats left.
2. ``/shop/{operator}/buy?product=..[&departure=..]`` the price; the rider gives a phone number and gets a one-time
   code by SMS (``POST /shop/{operator}/code``), types it (``POST /shop/{operator}/order``): the order is made, its
   coach seats held, and the browser goes to the order's page. The code proves the phone: it is kept hashed, lives
   five minutes, dies after five wrong tries; codes and orders are rate-limited per phone and per address. A proven
   phone is remembered in a signed cookie (30 minutes, SameSite=Strict, HttpOnly) so a second purchase skips the code.
3. ``/shop/{operator}/orders/{order_id}`` (only for the phone that bought it): unpaid, a link to the payment
   platform's page, and the page reloads itself every few seconds (a meta refresh: no script); paid, the tickets:
   QR code (``.../qr/{ticket_id}.png``, segno) and the 16-digit pickup code for the driver's keypad.

Shared with the partner API: backoffice.web.shop_service (wiring, orders, codes, limits).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from backoffice.models import Operator, Product
from backoffice.sms.gateway import SmsError
from backoffice.tickets import catalogue, orders
from backoffice.web import shop_service as shop
from backoffice.web.api.types import ServiceDay
from backoffice.web.deps import Services, services
from backoffice.web.pages import render

router = APIRouter(include_in_schema=False)
RIDER_COOKIE = "farebox_rider"
RIDER_LIFETIME = timedelta(minutes=30)
REFRESH_SECONDS = 3
KIND_LABELS = {"single": ("单程票", "Single ride"), "day_pass": ("日票", "Day pass"),
               "month_pass": ("月票", "Monthly pass"), "coach_trip": ("班车票", "Coach trip")}


def _config(request: Request) -> shop.ShopConfig:
    cfg = shop.shop_config(request)
    if cfg.ticket_keys is None:
        raise HTTPException(503, ("网上购票暂未开放", "The web shop is not open on this server"))
    return cfg


SAFE = re.compile(r"[A-Za-z0-9_.-]{1,40}")  # codes and order ids in addresses (no NUL reaches PostgreSQL)


def _operator(svc: Services, code: str):
    if not SAFE.fullmatch(code):
        raise HTTPException(404, ("没有这家公司", "No such bus company sells tickets here"))
    with svc.engine.connect() as conn:
        row = conn.execute(select(Operator.code, Operator.name, Operator.timezone, Operator.cutoff_hour)
                           .where(Operator.code == code, Operator.retired_at.is_(None))).first()
    if row is None:
        raise HTTPException(404, ("没有这家公司", f"No bus company {code!r} sells tickets here"))
    return row


# ------------------------------------------------------------------------------------------------ rider cookie
def _sign(cfg: shop.ShopConfig, text: str) -> str:
    return hmac.new(cfg.cookie_key, text.encode(), hashlib.sha256).hexdigest()[:32]


def _proven_phone(request: Request, cfg: shop.ShopConfig, now: datetime) -> str | None:
    """The phone number this browser proved with a one-time code, while the proof lasts."""
    value = request.cookies.get(RIDER_COOKIE, "")
    phone, _, rest = value.partition(".")
    until, _, mac = rest.partition(".")
    if not (phone and until.isdigit() and mac) or not hmac.compare_digest(mac, _sign(cfg, f"{phone}.{until}")):
        return None
    return phone if now.timestamp() < int(until) else None


def _remember(response: Response, request: Request, svc: Services, cfg: shop.ShopConfig, phone: str,
              now: datetime) -> None:
    until = int((now + RIDER_LIFETIME).timestamp())
    secure = svc.secure_cookies if svc.secure_cookies is not None else request.url.scheme == "https"
    response.set_cookie(RIDER_COOKIE, f"{phone}.{until}.{_sign(cfg, f'{phone}.{until}')}",
                        max_age=int(RIDER_LIFETIME.total_seconds()), httponly=True, samesite="strict",
                        secure=secure, path="/shop")


def _too_many(request: Request, rule, page: HTMLResponse) -> HTMLResponse:
    page.headers["Retry-After"] = str(int(rule[1].total_seconds()))
    return page


def _clean_phone(text: str) -> str:
    return "".join(c for c in (text or "") if c not in " -")


# ------------------------------------------------------------------------------------------------ browse
@router.get("/shop")
def shop_home(*, request: Request, svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    with svc.engine.connect() as conn:
        sellers = conn.execute(select(Operator.code, Operator.name).join(Product, Product.operator == Operator.code)
                               .where(Product.active.is_(True), Operator.retired_at.is_(None))
                               .group_by(Operator.code, Operator.name).order_by(Operator.code)).all()
    return render(request, "shop_home.html", None, sellers=sellers)


@router.get("/shop/{operator}")
def shop_operator(*, operator: str, request: Request, svc: Annotated[Services, Depends(services)],
                  day: ServiceDay | None = None) -> HTMLResponse:
    op = _operator(svc, operator)
    now = svc.clock()
    today = orders.service_day_of(now, op.timezone, op.cutoff_hour)
    day = day or today
    with svc.engine.connect() as conn:
        products = catalogue.list_products(conn, op.code, active_only=True)
        coaches = [d for d in catalogue.list_departures(conn, op.code, day=day)
                   if d.active and shop.utc(d.departs_at) > now]
    names = {p.code: p.name for p in products}
    return render(request, "shop_operator.html", None, op=op, tz=op.timezone, day=day, today=today,
                  days=[today + timedelta(days=i) for i in range(7)], kinds=KIND_LABELS,
                  products=[p for p in products if p.kind != "coach_trip"],
                  coaches=[(d, names.get(d.product, d.product)) for d in coaches if d.product in names])


def _quote(svc: Services, operator: str, product: str, departure: int | None, quantity: int):
    item = orders.ItemRequest(product, quantity, departure)
    try:
        with svc.engine.connect() as conn:
            quote = orders.quote_order(conn, operator=operator, items=[item], now=svc.clock())
            dep = catalogue.get_departure(conn, departure) if departure is not None else None
    except (orders.OrderError, catalogue.CatalogueError) as e:
        raise HTTPException(404, ("没有这种票", str(e))) from None
    return item, quote, dep


def _item_args(product: str, departure: str, quantity: str) -> tuple[str, int | None, int]:
    dep = int(departure) if departure.isascii() and departure.isdigit() and len(departure) < 19 else None
    qty = int(quantity) if quantity.isascii() and quantity.isdigit() and len(quantity) < 3 else 1
    if not 1 <= qty <= orders.MAX_QUANTITY:
        qty = 1
    return (product if SAFE.fullmatch(product) else "")[:32], dep, qty


@router.get("/shop/{operator}/buy")
def shop_buy(*, operator: str, request: Request, svc: Annotated[Services, Depends(services)], product: str = "",
             departure: str = "", quantity: str = "1") -> HTMLResponse:
    op = _operator(svc, operator)
    cfg = _config(request)
    product, dep_id, qty = _item_args(product, departure, quantity)
    item, quote, dep = _quote(svc, op.code, product, dep_id, qty)
    return render(request, "shop_buy.html", None, op=op, tz=op.timezone, quote=quote, line=quote.lines[0], dep=dep,
                  item=item, kinds=KIND_LABELS, phone=_proven_phone(request, cfg, svc.clock()), error=None)


# ------------------------------------------------------------------------------------------------ code and order
@router.post("/shop/{operator}/code")
def shop_send_code(*, operator: str, request: Request, svc: Annotated[Services, Depends(services)],
                   phone: Annotated[str, Form(max_length=40)], product: Annotated[str, Form(max_length=40)],
                   departure: Annotated[str, Form(max_length=20)] = "",
                   quantity: Annotated[str, Form(max_length=3)] = "1") -> HTMLResponse:
    op = _operator(svc, operator)
    cfg = _config(request)
    now = svc.clock()
    product, dep_id, qty = _item_args(product, departure, quantity)
    item, quote, dep = _quote(svc, op.code, product, dep_id, qty)
    phone = _clean_phone(phone)
    page = dict(op=op, tz=op.timezone, quote=quote, line=quote.lines[0], dep=dep, item=item, kinds=KIND_LABELS)
    if not orders.PHONE.fullmatch(phone):
        return render(request, "shop_buy.html", None, status=400, phone=None, typed=phone, **page,
                      error=("请输入手机号码（5 到 20 位数字）", "Give your mobile number: 5 to 20 digits"))
    for key, rule, words in (
            (f"otp-client:{shop.client_of(request)}", shop.OTP_PER_CLIENT,
             ("验证码发送过于频繁，请稍后再试", "Too many codes asked from here: try again in a few minutes")),
            (f"otp-phone:{phone}", shop.OTP_PER_PHONE,
             ("该号码验证码发送过于频繁，请稍后再试", "Too many codes sent to this number: try again in a few minutes"))):
        if not cfg.limits.hit(key, rule, now):
            return _too_many(request, rule, render(request, "shop_buy.html", None, status=429, phone=None,
                                                   typed=phone, error=words, **page))
    code = cfg.otp.issue(phone, now)
    try:
        cfg.otp_sender.send(phone, f"{code} is your {op.name} ticket code (5 minutes). 购票验证码 {code}，5分钟内有效。")
    except SmsError:  # the gateway is down or refused the number: the rider is told, the code is useless anyway
        shop.log.exception("one-time code to ...%s not sent", phone[-4:])
        return render(request, "shop_buy.html", None, status=503, phone=None, typed=phone, **page,
                      error=("短信发送失败，请稍后再试", "The text could not be sent: try again in a minute"))
    return render(request, "shop_code.html", None, phone=phone, error=None, **page)


@router.post("/shop/{operator}/order")
def shop_order(*, operator: str, request: Request, svc: Annotated[Services, Depends(services)],
               phone: Annotated[str, Form(max_length=40)], product: Annotated[str, Form(max_length=40)],
               departure: Annotated[str, Form(max_length=20)] = "", quantity: Annotated[str, Form(max_length=3)] = "1",
               code: Annotated[str, Form(max_length=12)] = "") -> Response:
    op = _operator(svc, operator)
    cfg = _config(request)
    now = svc.clock()
    product, dep_id, qty = _item_args(product, departure, quantity)
    item, quote, dep = _quote(svc, op.code, product, dep_id, qty)
    phone = _clean_phone(phone)
    page = dict(op=op, tz=op.timezone, quote=quote, line=quote.lines[0], dep=dep, item=item, kinds=KIND_LABELS)
    proven = _proven_phone(request, cfg, now) == phone and bool(phone)
    if not proven:
        verdict = cfg.otp.check(phone, code, now)
        if verdict != "ok":
            words = {"wrong": ("验证码不对，请再输入", "That code is not right: type it again"),
                     "expired": ("验证码已过期，请重新获取", "The code has expired: ask for a new one"),
                     "none": ("请重新获取验证码", "Ask for a new code")}[verdict]
            return render(request, "shop_code.html" if verdict == "wrong" else "shop_buy.html", None, status=400,
                          phone=phone if verdict == "wrong" else None, typed=phone, error=words, **page)
    for key, rule, words in (
            (f"order-client:{shop.client_of(request)}", shop.ORDERS_PER_CLIENT,
             ("下单过于频繁，请稍后再试", "Too many orders from here: try again later")),
            (f"order-phone:{phone}", shop.ORDERS_PER_PHONE,
             ("该号码下单过于频繁，请稍后再试", "Too many orders for this number: try again later"))):
        if not cfg.limits.hit(key, rule, now):
            return _too_many(request, rule, render(request, "shop_buy.html", None, status=429, phone=None,
                                                   typed=phone, error=words, **page))
    try:
        order_id, _ = shop.place_order(svc.engine, cfg, operator=op.code, channel="web", phone=phone, items=[item],
                                       who=f"web shop {phone[:3]}****{phone[-4:]}", idempotency_key=None, now=now)
    except orders.OrderError as e:
        return render(request, "shop_buy.html", None, status=409, phone=phone, error=("无法下单：" + e.message, e.message),
                      **page)
    response = RedirectResponse(f"/shop/{op.code}/orders/{order_id}", status_code=303)
    _remember(response, request, svc, cfg, phone, now)
    return response


# ------------------------------------------------------------------------------------------------ the order
def _own_order(request: Request, svc: Services, cfg: shop.ShopConfig, operator: str, order_id: str):
    phone = _proven_phone(request, cfg, svc.clock())
    try:
        if not SAFE.fullmatch(order_id):
            raise orders.OrderError("unknown_order", "no such order")
        view, tickets = shop.read_order(svc.engine, cfg, order_id, now=svc.clock(), who="web shop")
    except orders.OrderError:
        view = None
    if view is None or view.operator != operator or phone is None or view.phone != phone:
        # the same answer for an order that does not exist and one bought on another phone
        raise HTTPException(404, ("找不到这个订单（请在下单的手机上打开）",
                                  "No such order here: open it on the phone that bought it"))
    return view, tickets


def pickup_groups(code: str) -> str:
    return " ".join(code[i:i + 4] for i in range(0, len(code), 4))


@router.get("/shop/{operator}/orders/{order_id}")
def shop_order_page(*, operator: str, order_id: str, request: Request,
                    svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    op = _operator(svc, operator)
    cfg = _config(request)
    view, tickets = _own_order(request, svc, cfg, op.code, order_id[:40])
    pay_url = shop.payment_page(svc.engine, cfg, view.order_id) if view.state == "created" else None
    states = {t["ticket_id"]: t["state"] for t in view.tickets}
    return render(request, "shop_order.html", None, op=op, tz=op.timezone, order=view, pay_url=pay_url,
                  tickets=[(t, states.get(t.ticket_id), pickup_groups(t.pickup_code)) for t in tickets],
                  kinds=KIND_LABELS, refresh=REFRESH_SECONDS if view.state in ("created", "paid") else None)


@router.get("/shop/{operator}/orders/{order_id}/qr/{ticket_id}.png")
def shop_ticket_qr(*, operator: str, order_id: str, ticket_id: str, request: Request,
                   svc: Annotated[Services, Depends(services)]) -> Response:
    op = _operator(svc, operator)
    cfg = _config(request)
    _view, tickets = _own_order(request, svc, cfg, op.code, order_id[:40])
    for t in tickets:
        if str(t.ticket_id) == ticket_id:
            return Response(shop.qr_png(t.token), media_type="image/png")
    raise HTTPException(404, ("没有这张票", "No such ticket in this order"))

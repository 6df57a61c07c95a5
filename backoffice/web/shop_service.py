"""What the rider's web shop (backoffice.web.pages_shop) and the partner API (backoffice.web.api.partner) share:
the ticket keys and the payment platform they were wired with, placing an order and asking the platform for its
payment, reading an order back with its tickets (issued on first read once paid), one-time codes for a rider's
phone number, and rate limits.

Wiring, as ``configure_ota``: ``farebox serve`` (or a test) calls ``configure_shop(app, ticket_keys=...,
platform=..., notify_url=...)``. Without it the shop's pages answer 503 and the partner API reads the catalogue and
orders but issues no tickets.

One-time codes go out through the SMS gateway adapter (backoffice.sms.gateway.app_gateway: ``send(phone, text)``,
a NullGateway when no ``FAREBOX_SMS_URL`` is set); ``OutboxSender`` is a sender of the same shape that only keeps the
texts, for tests without a gateway. Codes and rate-limit counters live in the database (revision 0025): several
``farebox serve`` processes on one database serve the shop together.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from fastapi import HTTPException, Request
from sqlalchemy import Engine, text as sql_text

from backoffice.tickets import orders

log = logging.getLogger(__name__)

OTP_DIGITS = 6
OTP_LIFETIME = timedelta(minutes=5)
OTP_ATTEMPTS = 5  # wrong codes before the code is void (the rider asks for a new one)
# (how many, per how long): one-time codes sent to one phone number and from one address; orders from one phone
OTP_PER_PHONE = (3, timedelta(minutes=10))
OTP_PER_CLIENT = (10, timedelta(minutes=10))
ORDERS_PER_PHONE = (10, timedelta(hours=1))
ORDERS_PER_CLIENT = (30, timedelta(hours=1))
PAYMENT_QUERY_AFTER = timedelta(seconds=20)  # an unpaid order read this long after it was made asks the platform


# ------------------------------------------------------------------------------------------------ rate limits
def _key_lock(conn, key: str) -> None:
    """PostgreSQL: requests counting the same key wait for each other (the count and the insert are one step);
    SQLite has one writer at a time anyway."""
    if conn.dialect.name == "postgresql":
        conn.execute(sql_text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"shop-rate|{key}"})


class RateLimiter:
    """Sliding-window counters in the database (table ``shop_rate_event``, revision 0025), shared by every
    ``farebox serve`` process on it: ``hit(key, (limit, window), now)`` counts one event and says whether it is
    within the limit (an event over the limit is not counted, so waiting frees the key again)."""

    KEEP = timedelta(hours=2)  # longer than any window: older events are deleted as new ones come

    def __init__(self, engine: Engine):
        self.engine = engine

    def hit(self, key: str, rule: tuple[int, timedelta], now: datetime) -> bool:
        from sqlalchemy import delete, func, insert, select

        from backoffice.sms.tables import shop_rate_event as ev

        limit, window = rule
        key = key[:80]
        try:
            with self.engine.begin() as conn:
                _key_lock(conn, key)
                conn.execute(delete(ev).where(ev.c.at <= now - self.KEEP))
                # the event goes in first, then the window is counted with it: on SQLite the write takes the lock
                # before the count, so two processes cannot both see room for one
                conn.execute(insert(ev).values(key=key, at=now))
                n = conn.execute(select(func.count()).select_from(ev)
                                 .where(ev.c.key == key, ev.c.at > now - window)).scalar()
                if n > limit:
                    raise _OverLimit  # rolls the event back: an event over the limit is not counted
        except _OverLimit:
            return False
        return True


class _OverLimit(Exception):
    pass


# ------------------------------------------------------------------------------------------------ one-time codes
class OtpSender(Protocol):  # backoffice.sms.gateway.SmsGateway is one
    def send(self, phone: str, text: str, *, client_ref: str | None = None) -> object: ...


class OutboxSender:
    """A sender that keeps each message in ``outbox`` (a test reads the code there, as a rider reads the phone) and
    logs that one was sent, never the code."""

    def __init__(self):
        self.outbox: list[tuple[str, str]] = []

    def send(self, phone: str, text: str, *, client_ref: str | None = None) -> None:
        self.outbox.append((phone, text))
        log.info("one-time code sent to %s****", phone[:-4])

    def last_code(self, phone: str) -> str | None:
        for to, text in reversed(self.outbox):
            if to == phone:
                return "".join(c for c in text if c.isdigit())[:OTP_DIGITS]
        return None


class OtpBook:
    """One open code per phone number in the database (table ``shop_code``, revision 0025), shared by every
    ``farebox serve`` process on it, kept as HMAC-SHA256(pepper, phone | code): a copy of the table shows no code
    without the pepper, which comes from the ticket keys' pickup master secret (not in the database). A code works
    once, for ``OTP_LIFETIME``, and dies after ``OTP_ATTEMPTS`` wrong tries."""

    def __init__(self, engine: Engine, pepper: bytes):
        self.engine = engine
        self._pepper = pepper

    def _digest(self, phone: str, code: str) -> str:
        return hmac.new(self._pepper, f"{phone}|{code}".encode(), hashlib.sha256).hexdigest()

    def _upsert(self, conn, values: dict):
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        from backoffice.sms.tables import shop_code

        q = dialect_insert(shop_code).values(**values)
        return q.on_conflict_do_update(index_elements=[shop_code.c.phone],
                                       set_={k: q.excluded[k] for k in values if k != "phone"})

    def issue(self, phone: str, now: datetime) -> str:
        from sqlalchemy import delete

        from backoffice.sms.tables import shop_code

        code = f"{secrets.randbelow(10**OTP_DIGITS):0{OTP_DIGITS}d}"
        with self.engine.begin() as conn:
            conn.execute(delete(shop_code).where(shop_code.c.expires_at < now - OTP_LIFETIME))  # never checked
            conn.execute(self._upsert(conn, dict(phone=phone, digest=self._digest(phone, code),
                                                 expires_at=now + OTP_LIFETIME, attempts_left=OTP_ATTEMPTS,
                                                 created_at=now)))
        return code

    def check(self, phone: str, code: str, now: datetime) -> str:
        """``ok`` (the code is used up), ``wrong``, ``expired`` or ``none`` (no code open, or too many tries)."""
        from sqlalchemy import delete, select, update

        from backoffice.sms.tables import shop_code as c

        with self.engine.begin() as conn:
            row = conn.execute(select(c).where(c.c.phone == phone)).first()
            if row is None or row.attempts_left <= 0:
                return "none"
            mine = (c.c.phone == phone) & (c.c.digest == row.digest)  # this code, not one issued since
            if now >= utc(row.expires_at):
                conn.execute(delete(c).where(mine))
                return "expired"
            if hmac.compare_digest(row.digest, self._digest(phone, (code or "").strip())):
                # deleting it is using it: of two processes checking the same code at once, one deletes the row
                return "ok" if conn.execute(delete(c).where(mine)).rowcount else "none"
            if not conn.execute(update(c).where(mine, c.c.attempts_left > 0)
                                .values(attempts_left=c.c.attempts_left - 1)).rowcount:
                return "none"
            conn.execute(delete(c).where(mine, c.c.attempts_left <= 0))
            return "wrong"


def shop_key(ticket_keys, purpose: str) -> bytes:
    """A key of the shop's own (the one-time codes' HMAC pepper, the phone cookie's key), the same in every
    process: derived from the pickup master secret; without ticket keys (the shop then sells nothing) a random
    one of this process."""
    master = getattr(ticket_keys, "pickup_master", None)
    if not master:
        return secrets.token_bytes(32)
    return hmac.new(master, f"farebox shop {purpose} v1".encode(), hashlib.sha256).digest()


# ------------------------------------------------------------------------------------------------ wiring
@dataclass
class ShopConfig:
    ticket_keys: object | None  # backoffice.tickets.keys.TicketKeys
    platform: object | None  # backoffice.payments.platform.Platform
    otp: OtpBook
    limits: RateLimiter
    notify_url: str = ""
    otp_sender: OtpSender = field(default_factory=OutboxSender)
    cookie_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    pay_urls: dict[str, str] = field(default_factory=dict)  # order id -> the platform's payment page


def configure_shop(app, *, ticket_keys, platform=None, notify_url: str = "", otp_sender: OtpSender | None = None
                   ) -> ShopConfig:
    """Give the app the ticket keys, the payment platform (None: orders are made, nobody is asked to pay) and the
    URL the platform notifies (``.../api/v1/ota/webhook``; empty: the adapter's own, FAREBOX_PAYMENT_NOTIFY_URL).
    One-time codes go through ``otp_sender``, by default the app's SMS gateway (backoffice.sms.gateway)."""
    if otp_sender is None:
        from backoffice.sms.gateway import app_gateway

        otp_sender = app_gateway(app)
    engine = app.state.services.engine
    cfg = ShopConfig(ticket_keys, platform, OtpBook(engine, shop_key(ticket_keys, "one-time codes")),
                     RateLimiter(engine), notify_url, otp_sender, cookie_key=shop_key(ticket_keys, "phone cookie"))
    app.state.shop = cfg
    return cfg


def shop_config(request: Request) -> ShopConfig:
    cfg = getattr(request.app.state, "shop", None)
    if cfg is None:  # reads work unconfigured; what needs keys or the platform says so
        engine = request.app.state.services.engine
        cfg = request.app.state.shop = ShopConfig(None, None, OtpBook(engine, shop_key(None, "")), RateLimiter(engine))
    return cfg


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def limited(cfg: ShopConfig, key: str, rule, now: datetime, what: tuple[str, str]) -> None:
    if not cfg.limits.hit(key, rule, now):
        raise HTTPException(429, {"reason": "rate_limited", "message": what[1], "zh": what[0]},
                            headers={"Retry-After": str(int(rule[1].total_seconds()))})


# ------------------------------------------------------------------------------------------------ orders
def payment_page(engine: Engine, cfg: ShopConfig, order_id: str) -> str | None:
    """The platform's payment page for an unpaid order (asked once per order and remembered; the platform answers
    the same payment for the same order id, so asking again after a lost answer is safe). None without a platform
    or an answer."""
    from backoffice.payments.platform import PlatformError
    from backoffice.payments.service import start_payment

    if cfg.platform is None:
        return None
    if order_id in cfg.pay_urls:
        return cfg.pay_urls[order_id]
    try:  # the amount is the order's own (start_payment reads it); a paid or expired order has nothing to pay
        payment = start_payment(engine, cfg.platform, order_id=order_id, notify_url=cfg.notify_url or None,
                                description=f"tickets {order_id}")
    except (PlatformError, ValueError) as e:
        log.warning("payment for %s not opened: %s", order_id, e)
        return None
    if payment.pay_url:
        cfg.pay_urls[order_id] = payment.pay_url
    return payment.pay_url


def place_order(engine: Engine, cfg: ShopConfig, *, operator: str, channel: str, phone: str,
                items: list[orders.ItemRequest], who: str, idempotency_key: str | None, now: datetime
                ) -> tuple[str, bool]:
    """Create the order (seats held) in one transaction, then ask the platform for its payment outside it (a call
    to the platform never holds a transaction open). (order id, made now: False when the idempotency key had made
    it already, also when the same key raced in at once). OrderError as ``orders.create_order``."""
    from sqlalchemy import select

    from backoffice.models import OrderAudit

    who = f"{who} req {secrets.token_hex(3)}"  # this request's own line: it tells whether this call made the order
    with engine.begin() as conn:  # the same key raced in at once: create_order answers the first order
        order_id = orders.create_order(conn, operator=operator, channel=channel, phone=phone, items=items, who=who,
                                       idempotency_key=idempotency_key, now=now)
        made = conn.execute(select(OrderAudit.who).where(OrderAudit.order_id == order_id,
                                                         OrderAudit.from_state.is_(None))).scalar() == who[:64]
    payment_page(engine, cfg, order_id)
    return order_id, made


def read_order(engine: Engine, cfg: ShopConfig, order_id: str, *, now: datetime, who: str
               ) -> tuple[orders.OrderView, list[orders.IssuedTicket]]:
    """The order and its tickets. An order still unpaid a while after it was made is asked about at the platform
    (its notification may be lost: the order-query job does the same, later); a paid order gets its tickets issued
    here, once (``issue_tickets`` is idempotent). OrderError ``unknown_order``."""
    with engine.connect() as conn:
        view = orders.show_order(conn, order_id)
    if view.state == "created" and cfg.platform is not None and now - view.created_at >= PAYMENT_QUERY_AFTER:
        from backoffice.payments.service import query_open_orders

        query_open_orders(engine, cfg.platform, now=now, order_ids=[order_id])
        with engine.connect() as conn:
            view = orders.show_order(conn, order_id)
    tickets: list[orders.IssuedTicket] = []
    if view.state == "paid" and cfg.ticket_keys is not None:
        with engine.begin() as conn:
            tickets = orders.issue_tickets(conn, order_id, keys=cfg.ticket_keys, who=who, now=now)
            view = orders.show_order(conn, order_id)
    elif view.issued_at is not None:
        with engine.connect() as conn:
            tickets = orders.tickets_of(conn, order_id, keys=cfg.ticket_keys)
    return view, tickets


def qr_png(text: str, scale: int = 5) -> bytes:
    """The ticket's QR code as PNG (segno: a standard QR symbol, never a Micro QR; error correction M)."""
    import io

    import segno

    out = io.BytesIO()
    segno.make_qr(text, error="m").save(out, kind="png", scale=scale, border=4)
    return out.getvalue()


def utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)

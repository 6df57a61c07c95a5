"""The seed's SMS command dialogue: a rider buys a coach seat by text message.

    C#上海#苏州#2026-12-05#08:30  -> a quote: the departure, the fare in yuan, seats left; one seat held;
                                     "reply Y within 10 minutes"
    Y                             -> the payment link (the payment platform's page for the order)
    (paid)                        -> the 16-digit pickup code by SMS
    N  cancels the quote or the unpaid order (the seat goes back); Q lists my newest tickets; anything else: help.

Every reply is in Chinese with English after it. Where a phone number's dialogue stands lives in the database
(``sms_conversation``), every text in and out in ``sms_message`` (revision 2026_12_03_0023), so any back-office
process can answer the next text and a restart forgets nothing.

Why it holds:

- A duplicate delivery of the same inbound message (same gateway message id) is stored once (unique key) and acted
  on once: the second insert changes nothing and the handler stops there.
- Replies are written ``pending`` in the same transaction as the step that says them, sent after the commit under
  the client reference ``fbsms<row id>`` (the gateway sends a reference once, so a retry after a lost answer does
  not text the rider twice) and marked ``sent``; ``sweep`` retries what is still pending.
- The pickup code is texted once: the step ``paying -> done`` is a conditional UPDATE on the conversation, the
  tickets come from ``orders.issue_tickets`` (idempotent), and the text's key ``pickup:<order>`` is unique in the
  log. An SMS order paid after the rider was told its time ran out (the money is the rider's: the order revives
  while the seat is free) gets its code the same way.
- The seat hold is the order's (backoffice.tickets.orders): a quote is an order in state created whose hold ends
  when the quote does (10 minutes); Y extends the hold by the time to pay (15 minutes); an unconfirmed quote, N, or
  an unpaid order past its time is expired here with its seats given back (or by the ticket expiry job, whichever
  comes first: both are conditional UPDATEs on ``state = 'created'``).
- Abuse: a number may send ``RATE_LIMIT`` texts per window (one notice, then silence); one number holds one quote
  at a time (a new C# gives the old seat back); only the number that asked for a quote can confirm it (the
  conversation is the number's own, and the order's phone must be the sender's).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Engine, func, insert, select, update

from backoffice.models import Departure, Product, SeatHold, TicketOrder
from backoffice.sms import tables
from backoffice.sms.gateway import InboundSms, SmsError, SmsGateway
from backoffice.tickets import catalogue, orders
from clearing import money

log = logging.getLogger(__name__)


_price = functools.partial(money.yuan, symbol="¥")  # fen as "¥45.50": clearing's one formatter

QUOTE_MINUTES = 10  # reply Y within ...
PAY_MINUTES = 15  # pay within ... after Y
RATE_LIMIT = (10, timedelta(minutes=10))  # texts from one number per window
WHO = "sms"
_M, _C = tables.message, tables.conversation

HELP = ("短信购票：发送 C#出发地#目的地#日期#时间，例如 C#上海#苏州#2026-12-05#08:30；回复 Y 确认，N 取消，Q 查询我的车票。"
        " SMS tickets: send C#origin#destination#date#time, e.g. C#上海#苏州#2026-12-05#08:30; "
        "reply Y to confirm, N to cancel, Q for my tickets.")
COMMAND = re.compile(r"C#([^#]{1,40})#([^#]{1,40})#(\d{4}-\d{2}-\d{2})#(\d{1,2}:\d{2})", re.IGNORECASE)


@dataclass
class Channel:
    """What the dialogue works with. ``operator``: the operator whose coaches the SMS number sells (None: the
    first operator with a matching departure). ``platform``: backoffice.payments.platform.Platform (None: the
    reply names the order to pay and no link). ``ticket_keys``: backoffice.tickets.keys.TicketKeys."""

    engine: Engine
    gateway: SmsGateway
    ticket_keys: object | None = None
    platform: object | None = None
    notify_url: str = ""
    operator: str | None = None
    clock: object = field(default=lambda: datetime.now(UTC))


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _insert_or_nothing(conn, table, values: dict) -> bool:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    q = dialect_insert(table).values(**values).on_conflict_do_nothing()
    # rowcount cannot be trusted here: PostgreSQL inserts into a table with a serial key go out with RETURNING
    key = next(iter(table.primary_key.columns))
    return conn.execute(q.returning(key)).first() is not None


def _say(conn, phone: str, text: str, now: datetime, order_id: str | None = None) -> None:
    conn.execute(insert(_M).values(direction="out", phone=phone, text=text[:500], at=now, order_id=order_id,
                                   state="pending", outcome=""))


def _conversation(conn, phone: str, now: datetime):
    row = conn.execute(select(_C).where(_C.c.phone == phone)).first()
    if row is None:
        _insert_or_nothing(conn, _C, {"phone": phone, "state": "idle", "updated_at": now})
        row = conn.execute(select(_C).where(_C.c.phone == phone)).first()
    return row


def _set(conn, phone: str, now: datetime, *, from_state: str | None = None, **values) -> bool:
    q = update(_C).where(_C.c.phone == phone)
    if from_state is not None:
        q = q.where(_C.c.state == from_state)
    return bool(conn.execute(q.values(updated_at=now, **values)).rowcount)


def _give_back(conn, order_id: str, now: datetime, why: str) -> bool:
    """The unpaid order ends (expired) and its seats go back; False when it was paid or ended already."""
    return orders.cancel_order(conn, order_id, who=WHO, why=why, now=now)


def _order_state(conn, order_id: str | None) -> str | None:
    if order_id is None:
        return None
    return conn.execute(select(TicketOrder.state).where(TicketOrder.order_id == order_id)).scalar()


# -------------------------------------------------------------------------------------------------- inbound
def handle_inbound(ch: Channel, msg: InboundSms) -> str:
    """One rider's text (already verified): stored once, answered once. The outcome in words (for the log and
    the webhook's answer); ``duplicate`` when this message id was seen before."""
    now = _utc(ch.clock())
    pay_for = None
    with ch.engine.begin() as conn:
        if not _insert_or_nothing(conn, _M, {"direction": "in", "gateway_id": msg.message_id, "phone": msg.phone,
                                             "text": msg.text[:500], "at": now, "state": "received", "outcome": ""}):
            return "duplicate"
        limit, window = RATE_LIMIT
        recent = conn.execute(select(func.count()).select_from(_M).where(
            _M.c.direction == "in", _M.c.phone == msg.phone, _M.c.at > now - window)).scalar()
        if recent > limit:
            conn.execute(update(_M).where(_M.c.direction == "in", _M.c.gateway_id == msg.message_id)
                         .values(state="limited", outcome="rate limited"))
            if recent == limit + 1:
                _say(conn, msg.phone, f"短信过多，请{int(window.total_seconds() // 60)}分钟后再试。 Too many messages: "
                     f"try again in {int(window.total_seconds() // 60)} minutes.", now)
            outcome = "rate limited"
        else:
            outcome, pay_for = _step(conn, ch, msg, now)
            conn.execute(update(_M).where(_M.c.direction == "in", _M.c.gateway_id == msg.message_id)
                         .values(outcome=outcome[:200]))
    if pay_for is not None:
        _payment_link(ch, msg.phone, pay_for)
    _deliver_own(ch, msg.phone, now)
    flush_outbox(ch)
    return outcome


def _deliver_own(ch: Channel, phone: str, now: datetime) -> None:
    """The sender's own paid order gets its pickup code now, whether or not a sweep runs in this process."""
    with ch.engine.begin() as conn:
        conv = conn.execute(select(_C).where(_C.c.phone == phone)).first()
        if conv is not None and conv.state == "paying" and _order_state(conn, conv.order_id) in ("paid", "issued"):
            _deliver(conn, ch, conv, now)


def _step(conn, ch: Channel, msg: InboundSms, now: datetime) -> tuple[str, str | None]:
    text = msg.text.strip().replace("＃", "#").replace("：", ":")
    word = text.upper()
    conv = _conversation(conn, msg.phone, now)
    if word.startswith("C#"):
        return _quote(conn, ch, msg.phone, text, conv, now), None
    if word in ("Y", "YES", "是"):
        return _confirm(conn, msg.phone, conv, now)
    if word in ("N", "NO", "否"):
        return _cancel(conn, msg.phone, conv, now), None
    if word in ("Q", "查询"):
        return _query(conn, ch, msg.phone, now), None
    _say(conn, msg.phone, HELP, now)
    return "help", None


def _find(conn, ch: Channel, origin: str, destination: str, day: date, at: str, now: datetime):
    if ch.operator is not None:
        candidates = [ch.operator]
    else:
        candidates = sorted(set(conn.execute(select(Product.operator).where(
            Product.kind == "coach_trip", Product.active.is_(True))).scalars()))
    for operator in candidates:
        found = catalogue.departures_between(conn, operator=operator, origin=origin, destination=destination,
                                             day=day, after=at, now=now)
        if found:
            return operator, found
    return None, []


def _quote(conn, ch: Channel, phone: str, text: str, conv, now: datetime) -> str:
    m = COMMAND.fullmatch(text)
    if not m:
        _say(conn, phone, "格式不对。" + HELP, now)
        return "bad command"
    origin, destination, day_text, at = (g.strip() for g in m.groups())
    try:
        day = date.fromisoformat(day_text)
        hh, mm = (int(x) for x in at.split(":"))
        if hh > 23 or mm > 59:
            raise ValueError
    except ValueError:
        _say(conn, phone, f"日期或时间不对：{day_text} {at}。 Date or time not understood: {day_text} {at} "
             "(YYYY-MM-DD HH:MM).", now)
        return "bad date"
    if conv.state == "paying" and _order_state(conn, conv.order_id) in ("paid", "issued"):
        _deliver(conn, ch, conv, now)  # its pickup code first: a new quote must not lose it
    elif conv.state == "paying" and _order_state(conn, conv.order_id) == "created" and \
            _utc(conv.expires_at) <= now:
        _give_back(conn, conv.order_id, now, "not paid in time by SMS; seat released")
    elif conv.state == "paying" and _order_state(conn, conv.order_id) == "created":
        _say(conn, phone, f"您有待付款的订单 {conv.order_id}：请先付款，或回复 N 取消。 Order {conv.order_id} is "
             "waiting for payment: pay it, or reply N to cancel it first.", now, conv.order_id)
        return "refused: an order is waiting for payment"
    if conv.state == "quoted" and conv.order_id:  # one quote per number: the old seat goes back
        _give_back(conn, conv.order_id, now, "the rider asked for another quote by SMS; seat released")
    operator, found = _find(conn, ch, origin, destination, day, at, now)
    free = [d for d in found if d.seats_free > 0]
    if not free:
        words = "已满 sold out" if found else "没有班次 no coach"
        _say(conn, phone, f"{day} {at} 以后 {origin}→{destination}：{words}。 No seat from {origin} to "
             f"{destination} on {day} after {at}.", now)
        _set(conn, phone, now, state="idle", order_id=None, expires_at=None)
        return "no departure" if not found else "sold out"
    d = free[0]
    try:
        order_id = orders.create_order(conn, operator=operator, channel="sms", phone=phone, who=f"sms:{phone}",
                                       items=[orders.ItemRequest(d.product, 1, departure_id=d.id)], now=now,
                                       hold_minutes=QUOTE_MINUTES)
    except orders.OrderError as e:
        _say(conn, phone, f"无法报价：{e.message} Cannot quote: {e.message}", now)
        return f"refused ({e.code})"
    price = conn.execute(select(TicketOrder.total_fen).where(TicketOrder.order_id == order_id)).scalar()
    left = conn.execute(select(Departure.seats - Departure.seats_taken).where(Departure.id == d.id)).scalar()
    expires = now + timedelta(minutes=QUOTE_MINUTES)
    _set(conn, phone, now, state="quoted", operator=operator, order_id=order_id, expires_at=expires)
    _say(conn, phone, f"{d.service_date} {d.departs_local} {origin}→{destination}（{d.route}）票价 {_price(price)}，"
         f"余座 {left}。已为您保留 1 座，请在{QUOTE_MINUTES}分钟内回复 Y 确认，N 取消。 "
         f"Coach {d.route} {d.service_date} {d.departs_local} {origin} to {destination}: fare {_price(price)}, "
         f"{left} seats left. One seat held: reply Y within {QUOTE_MINUTES} minutes to confirm, N to cancel.",
         now, order_id)
    return f"quoted {order_id}"


def _confirm(conn, phone: str, conv, now: datetime) -> tuple[str, str | None]:
    if conv.state != "quoted" or not conv.order_id:
        _say(conn, phone, "没有待确认的报价。 There is no quote to confirm from this number. " + HELP, now)
        return "nothing to confirm", None
    order = conn.execute(select(TicketOrder).where(TicketOrder.order_id == conv.order_id)).first()
    if order is None or order.phone != phone:  # the buyer's number only
        _say(conn, phone, "没有待确认的报价。 There is no quote to confirm from this number.", now)
        return "refused: not the buyer", None
    if _utc(conv.expires_at) <= now or order.state != "created":
        _give_back(conn, order.order_id, now, "quote not confirmed in time by SMS; seat released")
        _set(conn, phone, now, state="idle", order_id=None, expires_at=None)
        _say(conn, phone, "报价已过期，座位已释放；请重新发送 C#…。 The quote has expired and the seat is released: "
             "send C#... again.", now, order.order_id)
        return f"expired {order.order_id}", None
    until = now + timedelta(minutes=PAY_MINUTES)
    if not orders.extend_hold(conn, order.order_id, until=until, who=WHO, now=now):
        return "raced", None
    _set(conn, phone, now, state="paying", expires_at=until)
    return f"confirmed {order.order_id}", order.order_id


def _payment_link(ch: Channel, phone: str, order_id: str) -> None:
    """Ask the platform for the order's payment page (outside any transaction) and text it."""
    now = _utc(ch.clock())
    with ch.engine.connect() as conn:
        total = conn.execute(select(TicketOrder.total_fen).where(TicketOrder.order_id == order_id)).scalar()
    link = None
    if ch.platform is not None:
        from backoffice.payments.platform import PlatformError

        try:
            link = ch.platform.create_payment(order_id=order_id, amount=total, description=f"SMS ticket {order_id}",
                                              notify_url=ch.notify_url).pay_url
        except PlatformError as e:
            log.warning("sms: no payment page for %s yet: %s", order_id, e)
    if link:
        text = (f"请在{PAY_MINUTES}分钟内支付 {_price(total)}：{link} 订单 {order_id}。 Pay {_price(total)} within "
                f"{PAY_MINUTES} minutes: {link} (order {order_id}).")
    else:
        text = (f"订单 {order_id} 待支付 {_price(total)}，支付页面暂不可用，请稍后回复 Q。 Order {order_id}: "
                f"{_price(total)} to pay; the payment page is not available now, reply Q later.")
    with ch.engine.begin() as conn:
        _say(conn, phone, text, now, order_id)


def _cancel(conn, phone: str, conv, now: datetime) -> str:
    if conv.state in ("quoted", "paying") and conv.order_id and \
            _give_back(conn, conv.order_id, now, "the rider replied N by SMS; seat released"):
        _set(conn, phone, now, state="idle", order_id=None, expires_at=None)
        _say(conn, phone, f"订单 {conv.order_id} 已取消，座位已释放。 Order {conv.order_id} cancelled; the seat is "
             "released.", now, conv.order_id)
        return f"cancelled {conv.order_id}"
    _say(conn, phone, "没有可取消的报价或订单。 Nothing to cancel.", now)
    return "nothing to cancel"


def _query(conn, ch: Channel, phone: str, now: datetime) -> str:
    operators = [ch.operator] if ch.operator else sorted(set(conn.execute(
        select(TicketOrder.operator).where(TicketOrder.phone == phone)).scalars()))
    lines = []
    for operator in operators:
        for order_id in orders.orders_of_phone(conn, operator=operator, phone=phone, limit=3):
            view = orders.show_order(conn, order_id)
            codes = ""
            if view.issued_at is not None and ch.ticket_keys is not None:
                codes = " 取票码 pickup code " + ", ".join(
                    t.pickup_code for t in orders.tickets_of(conn, order_id, keys=ch.ticket_keys))
            lines.append(f"{order_id} {view.state} {_price(view.total_fen)}{codes}")
    if not lines:
        _say(conn, phone, "此号码没有车票。 No tickets for this number.", now)
        return "query: none"
    _say(conn, phone, "我的车票 My tickets: " + "; ".join(lines[:3]), now)
    return f"query: {len(lines)}"


# ---------------------------------------------------------------------------------------------- time passes
def sweep(ch: Channel) -> dict:
    """What time and payments moved: quotes not confirmed in time and orders not paid in time give their seats back
    (the rider is told); paid orders get their tickets and the pickup code is texted, once; pending texts are sent.
    Run every few seconds (``SweepThread``) and safe in several processes at once."""
    now = _utc(ch.clock())
    done = {"expired": 0, "delivered": 0}
    with ch.engine.connect() as conn:
        open_ = conn.execute(select(_C.c.phone, _C.c.state, _C.c.order_id, _C.c.expires_at)
                             .where(_C.c.state.in_(("quoted", "paying")))).all()
    for conv in open_:
        with ch.engine.begin() as conn:
            state = _order_state(conn, conv.order_id)
            if state in ("paid", "issued", "used"):
                if conv.state == "paying" and _deliver(conn, ch, conv, now):
                    done["delivered"] += 1
            elif state != "created" or _utc(conv.expires_at) <= now:
                if _set(conn, conv.phone, now, from_state=conv.state, state="idle", order_id=None, expires_at=None):
                    if state == "created":
                        _give_back(conn, conv.order_id, now, "not confirmed or paid in time by SMS; seat released")
                    what = ("报价已过期" if conv.state == "quoted" else "付款时间已过")
                    _say(conn, conv.phone, f"{what}，订单 {conv.order_id} 已取消，座位已释放。 "
                         f"{'The quote' if conv.state == 'quoted' else 'The time to pay'} ran out: order "
                         f"{conv.order_id} is cancelled and the seat released.", now, conv.order_id)
                    done["expired"] += 1
    done["late"] = _late_payments(ch, now)
    flush_outbox(ch)
    return done


def _deliver(conn, ch: Channel, conv, now: datetime) -> bool:
    if ch.ticket_keys is None:
        return False
    if not _set(conn, conv.phone, now, from_state="paying", state="done", expires_at=None):
        return False  # another process texted it
    return _pickup_code(conn, ch, conv.phone, conv.order_id, now)


def _pickup_code(conn, ch: Channel, phone: str, order_id: str, now: datetime) -> bool:
    """Issue the paid order's tickets and text their pickup codes: once per order, whichever process or path
    (conversation, late payment) gets here first (the text's key ``pickup:<order>`` is unique in the log)."""
    tickets = orders.issue_tickets(conn, order_id, keys=ch.ticket_keys, who=WHO, now=now)
    dep = conn.execute(select(Departure.service_date, Departure.departs_local, Departure.route)
                       .join(SeatHold, SeatHold.departure_id == Departure.id)
                       .where(SeatHold.order_id == order_id)).first()
    when = f"{dep.service_date} {dep.departs_local} {dep.route} " if dep else ""
    codes = ", ".join(t.pickup_code for t in tickets)
    text = (f"已付款。取票码 {codes}（{when}上车时出示或在车上键盘输入）。 Paid. Pickup code {codes} "
            f"({when}show it or key it in on the coach).")
    return _insert_or_nothing(conn, _M, {"direction": "out", "gateway_id": f"pickup:{order_id}", "phone": phone,
                                         "text": text[:500], "at": now, "order_id": order_id, "state": "pending",
                                         "outcome": ""})


def _late_payments(ch: Channel, now: datetime) -> int:
    """SMS orders paid but not issued that no open conversation waits for (paid after the rider was told the time
    ran out, or after a new quote): their tickets and pickup codes go out all the same."""
    if ch.ticket_keys is None:
        return 0
    with ch.engine.connect() as conn:
        due = conn.execute(select(TicketOrder.order_id, TicketOrder.phone).where(
            TicketOrder.channel == "sms", TicketOrder.state == "paid").limit(100)).all()
    done = 0
    for order_id, phone in due:
        with ch.engine.begin() as conn:
            waiting = conn.execute(select(_C.c.phone).where(_C.c.order_id == order_id,
                                                            _C.c.state == "paying")).first()
            if waiting is None and _pickup_code(conn, ch, phone, order_id, now):
                done += 1
    return done


# -------------------------------------------------------------------------------------------------- outbox
def flush_outbox(ch: Channel, limit: int = 200) -> int:
    """Send the pending texts, oldest first, each under the client reference ``fbsms<id>`` (sent once however
    often this runs); a text the gateway cannot take now stays pending for the next run."""
    with ch.engine.connect() as conn:
        pending = conn.execute(select(_M.c.id, _M.c.phone, _M.c.text).where(
            _M.c.direction == "out", _M.c.state == "pending").order_by(_M.c.id).limit(limit)).all()
    sent = 0
    for row in pending:
        try:
            answer = ch.gateway.send(row.phone, row.text, client_ref=f"fbsms{row.id}")
        except SmsError as e:
            log.warning("sms: text %d to ...%s not sent yet: %s", row.id, row.phone[-4:], e)
            continue
        with ch.engine.begin() as conn:
            conn.execute(update(_M).where(_M.c.id == row.id, _M.c.state == "pending")
                         .values(state="sent", sent_at=_utc(ch.clock()), outcome=answer.message_id[:200]))
        sent += 1
    return sent


class SweepThread:
    """``sweep(ch)`` every ``every`` seconds in a daemon thread, until ``stop()``: pickup codes go out soon after a
    payment lands (by notification or order query), lapsed quotes give their seats back. A failing run is logged and
    the next one tries again."""

    def __init__(self, ch: Channel, every: float = 2.0):
        import threading

        self.ch, self.every = ch, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sms-sweep", daemon=True)

    def start(self) -> SweepThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                sweep(self.ch)
            except Exception:  # the next run tries again; nothing here may stop the web process
                log.exception("sms: sweep failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

"""A pickup code redeemed at a station counter: checked, counted as the ticket's use, printed as a paper ticket.

:func:`redeem` is the use case the API (``POST /api/v1/tickets/redeem``, backoffice.web.api.tickets_counter) and
the page (``/tickets/redeem``, backoffice.web.pages_tickets) both call:

1. :class:`Guard`: a staff token or an address that typed ``MAX_WRONG`` wrong codes within ``WRONG_WINDOW`` is
   locked out for ``LOCKOUT`` (answer 429 with Retry-After), and nobody redeems more than ``PER_MINUTE`` codes a
   minute. A wrong code is one whose check digits fail (made up or mistyped) or a well-formed code of no ticket;
   a code that is not 16 digits at all is a slip of the finger and is not counted (as on the driver's keypad). The
   counters are in this process's memory: one ``farebox serve`` serves the counter, and a restart forgets them
   (an attacker who can restart the server has other ways in).
2. the code is checked with the operator's pickup key and mapped to its ticket, the ticket must be good now and
   have a use left (``backoffice.tickets.orders.use_by_pickup_code`` counts it), and a ``ticket_use`` row with
   ``presented_by = 'counter'`` records where, when and by whom (backoffice.tickets.uses): route the ticket's one
   route, else ``station counter`` (:func:`counter_route`); vehicle the station's name; driver "";
3. the paper ticket is printed on the counter's ESC/POS printer (:class:`CounterPrinter`) *before* the
   transaction commits: a printer out of paper or unplugged rolls the use back, so the rider keeps the ride and
   the staff see why. (A commit failing after the paper came out is logged with the ticket id.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections import defaultdict, deque
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

from sqlalchemy import Engine, select

from backoffice.models import Operator, Product, Ticket
from backoffice.tickets import orders, uses
from clearing.service_day import local_time
from wire import escpos
from wire.ticket import MALFORMED_PICKUP, PICKUP_DIGITS, TicketError

log = logging.getLogger(__name__)

MAX_WRONG = 5  # wrong codes from one staff token or one address ...
WRONG_WINDOW = timedelta(minutes=15)  # ... within this long ...
LOCKOUT = timedelta(minutes=15)  # ... lock both out for this long
PER_MINUTE = 30  # redemptions (right or wrong) per staff token and per address, a minute
KIND_NAMES = {"single": ("单程票", "Single ride"), "day_pass": ("日票", "Day pass"),
              "month_pass": ("月票", "Month pass"), "coach_trip": ("客车票", "Coach trip")}


class RedeemError(Exception):
    """Why a code was not redeemed: ``code`` is stable (API answers carry it), ``status`` its HTTP status,
    ``message`` (English) and ``zh`` what the staff read, ``retry_after`` seconds for a lockout."""

    def __init__(self, code: str, status: int, zh: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.code, self.status, self.zh, self.message, self.retry_after = code, status, zh, message, retry_after


@dataclasses.dataclass(frozen=True)
class Redeemed:
    ticket_id: int
    use_no: int
    uses_allowed: int
    operator: str
    operator_name: str
    product: str
    kind: str
    routes: tuple[str, ...]
    valid_from: datetime
    valid_to: datetime
    order_id: str
    station: str
    staff: str
    at: datetime
    timezone: str
    paper: str  # the paper ticket's text
    printed: bool  # False: no printer configured here (the page shows the text to print)


# ------------------------------------------------------------------------------------------------ guessing
class Guard:
    """Wrong-code counters and lockouts per key (``staff:<name>``, ``ip:<address>``), in memory."""

    def __init__(self, *, max_wrong: int = MAX_WRONG, window: timedelta = WRONG_WINDOW,
                 lockout: timedelta = LOCKOUT, per_minute: int = PER_MINUTE):
        self.max_wrong, self.window, self.lockout, self.per_minute = max_wrong, window, lockout, per_minute
        self._wrong: dict[str, deque] = defaultdict(deque)
        self._tries: dict[str, deque] = defaultdict(deque)
        self._locked: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def admit(self, keys: list[str], now: datetime) -> None:
        """Raise RedeemError (429) for a locked-out key or one over the rate; else count the try."""
        with self._lock:
            until = max((self._locked[k] for k in keys if self._locked.get(k, now) > now), default=None)
            if until is not None:
                raise RedeemError("locked_out", 429, "错误次数过多，已锁定，请稍后再试",
                                  f"too many wrong codes: locked until {until:%H:%M:%S} UTC",
                                  retry_after=max(1, int((until - now).total_seconds()) + 1))
            for k in keys:
                q = self._tries[k]
                while q and q[0] <= now - timedelta(minutes=1):
                    q.popleft()
                if len(q) >= self.per_minute:
                    raise RedeemError("rate_limited", 429, "兑换过于频繁，请稍候", "too many codes this minute: wait",
                                      retry_after=60)
            for k in keys:
                self._tries[k].append(now)

    def wrong(self, keys: list[str], now: datetime) -> bool:
        """Count a wrong code for each key; True when that locked one out."""
        locked = False
        with self._lock:
            for k in keys:
                q = self._wrong[k]
                q.append(now)
                while q and q[0] <= now - self.window:
                    q.popleft()
                if len(q) >= self.max_wrong:
                    self._locked[k] = now + self.lockout
                    q.clear()
                    locked = True
        if locked:
            log.warning("counter: %s locked out for %s after %d wrong pickup codes", ", ".join(keys), self.lockout,
                        self.max_wrong)
        return locked


# ------------------------------------------------------------------------------------------------ printer
class CounterPrinter:
    """The counter's ESC/POS printer by path: ``serial:<device>[?baud=9600]`` (pyserial; a pty in tests) or
    ``console:`` (the text to the log, a demo). Each ticket is written whole and flushed before :meth:`print`
    returns; a port that fails is reopened for the next ticket."""

    def __init__(self, path: str):
        scheme, sep, rest = path.partition(":")
        if not sep or scheme not in ("serial", "console"):
            raise ValueError(f"counter printer {path!r}: give serial:<device>[?baud=9600] or console:")
        self.path, self.scheme = path, scheme
        device, _, query = rest.partition("?")
        if scheme == "serial" and not device:
            raise ValueError(f"counter printer {path!r} names no serial device, e.g. serial:/dev/ttyUSB0")
        try:
            self.baud = int(parse_qs(query).get("baud", ["9600"])[0])
        except ValueError:
            raise ValueError(f"counter printer {path!r}: baud must be a number") from None
        self.device = device
        self._port = None
        self._lock = threading.Lock()

    def print(self, text: str) -> None:
        """Print one ticket; OSError (or serial.SerialException, an OSError) when the printer cannot take it."""
        data = escpos.slip_bytes(text)
        if self.scheme == "console":
            log.info("counter paper ticket:\n%s", escpos.slip_text(data))
            return
        import serial

        with self._lock:
            try:
                if self._port is None:
                    self._port = serial.Serial(self.device, baudrate=self.baud, timeout=1, write_timeout=10)
                self._port.write(data)
                self._port.flush()
            except (OSError, serial.SerialException):
                port, self._port = self._port, None
                if port is not None:
                    port.close()
                raise

    def close(self) -> None:
        with self._lock:
            if self._port is not None:
                self._port.close()
                self._port = None


def paper_ticket(r: Redeemed) -> str:
    """The paper ticket's lines (32 columns on a 58 mm printer), Chinese with English beside, times on the
    operator's clock."""
    zh, en = KIND_NAMES.get(r.kind, (r.kind, r.kind))
    uses_text = f"{r.use_no}/{r.uses_allowed}" if r.uses_allowed else f"{r.use_no}"
    lines = [
        r.operator_name[:32],
        "车票 TICKET",
        "-" * 32,
        f"票号 No.: {r.ticket_id}",
        f"{zh} {en}",
        r.product[:32],
        f"线路 Route: {' '.join(r.routes) or '不限 any'}",
        f"有效 From: {local_time(r.valid_from, r.timezone)}",
        f"至 To:     {local_time(r.valid_to, r.timezone)}",
        f"次数 Use: {uses_text}",
        "-" * 32,
        f"兑换 Redeemed: {local_time(r.at, r.timezone)}",
        f"柜台 Counter: {r.station or '-'}"[:32],
        f"经办 Staff: {r.staff}"[:32],
        f"订单 Order: {r.order_id}"[:32],
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the use case
def redeem(engine: Engine, *, operator: str, code: str, keys, staff: str, client: str, station: str = "",
           guard: Guard, printer: CounterPrinter | None, now: datetime | None = None) -> Redeemed:
    """Redeem pickup ``code`` of ``operator``'s ticket at a counter (see the module docstring). RedeemError says
    why not; nothing is counted then."""
    now = now or datetime.now(UTC)
    who = [f"staff:{staff}", f"ip:{client}"]
    guard.admit(who, now)
    digits = re.sub(r"[\s-]", "", code or "")
    if len(digits) != PICKUP_DIGITS or not digits.isascii() or not digits.isdigit():
        raise RedeemError("malformed_code", 422, "取票码是16位数字", "a pickup code is 16 digits")
    if keys is None:
        raise RedeemError("not_configured", 503, "未配置车票密钥", "ticket keys are not configured here")
    with engine.begin() as conn:
        op = conn.execute(select(Operator.name, Operator.timezone).where(Operator.code == operator)).first()
        if op is None:
            raise RedeemError("unknown_operator", 404, "无此运营商", f"operator {operator!r} is not known here")
        try:
            ticket_id, use_no = orders.use_by_pickup_code(conn, operator=operator, code=code, keys=keys,
                                                          who=f"counter {station or '-'} {staff}", at=now)
        except TicketError as e:
            if e.reason_code == MALFORMED_PICKUP:
                raise RedeemError("malformed_code", 422, "取票码是16位数字", "a pickup code is 16 digits") from None
            raise _wrong(guard, who, now) from None
        except orders.OrderError as e:
            if e.code == "unknown_ticket":
                raise _wrong(guard, who, now) from None
            if e.code == "not_valid_now":
                raise RedeemError("not_valid_now", 409, "车票不在有效期内", e.message) from None
            raise RedeemError("used_up", 409, "车票已使用、已退款或已过期", e.message) from None
        t = conn.execute(select(Ticket.order_id, Ticket.kind, Ticket.routes, Ticket.valid_from, Ticket.valid_to,
                                Ticket.uses_allowed, Product.name).join(Product, Product.id == Ticket.product_id)
                         .where(Ticket.ticket_id == ticket_id)).one()
        uses.record_counter_use(conn, ticket_id=ticket_id, operator=operator, use_no=use_no, staff=staff,
                                station=station, at=now, route=counter_route(t.routes))
        result = Redeemed(ticket_id=ticket_id, use_no=use_no, uses_allowed=t.uses_allowed, operator=operator,
                          operator_name=op.name, product=t.name, kind=t.kind, routes=tuple(t.routes.split()),
                          valid_from=_utc(t.valid_from), valid_to=_utc(t.valid_to), order_id=t.order_id,
                          station=station, staff=staff, at=now, timezone=op.timezone, paper="",
                          printed=printer is not None)
        result = dataclasses.replace(result, paper=paper_ticket(result))
        if printer is not None:
            try:
                printer.print(result.paper)
            except OSError as e:
                log.error("counter printer %s: ticket %d not printed (%s): the use is not counted", printer.path,
                          ticket_id, e)
                raise RedeemError("printer_failed", 503, "打印机故障：未兑换，请检查打印机后重试",
                                  f"the printer did not take the ticket ({e}): nothing was counted; check its "
                                  "cable, power and paper, then redeem again") from None
    log.info("counter %s: %s redeemed ticket %d (use %d)", station or "-", staff, ticket_id, use_no)
    return result


def counter_route(routes: str) -> str:
    """The route a counter use is cleared on: the ticket's route when it has exactly one (a coach trip's departure,
    a one-route product), else the ``station counter`` line (clearing.tickets.COUNTER_ROUTE)."""
    from clearing.tickets import COUNTER_ROUTE

    codes = orders.split_routes(routes)
    return codes[0] if len(codes) == 1 else COUNTER_ROUTE


def _wrong(guard: Guard, who: list[str], now: datetime) -> RedeemError:
    if guard.wrong(who, now):
        return RedeemError("locked_out", 429, "错误次数过多，已锁定", f"wrong pickup code; {guard.max_wrong} wrong "
                           f"codes: locked for {int(guard.lockout.total_seconds() // 60)} minutes",
                           retry_after=int(guard.lockout.total_seconds()))
    return RedeemError("wrong_code", 404, "取票码不正确", "no ticket has this pickup code: check the digits")


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# ------------------------------------------------------------------------------------------------ wiring
@dataclasses.dataclass
class CounterConfig:
    printer: CounterPrinter | None
    guard: Guard = dataclasses.field(default_factory=Guard)


def configure_counter(app, *, printer: str | None = None, guard: Guard | None = None) -> CounterConfig:
    """Give the app the counter's printer path (None: ``FAREBOX_COUNTER_PRINTER``, else no printer) and guard."""
    path = printer if printer is not None else os.environ.get("FAREBOX_COUNTER_PRINTER", "")
    cfg = CounterConfig(CounterPrinter(path) if path else None, guard or Guard())
    app.state.counter = cfg
    return cfg


def counter_config(app) -> CounterConfig:
    """The app's counter wiring; the first request wires it from the environment when nobody did. A printer path
    that is wrong there is logged and the counter goes on without a printer (the page shows the ticket to print)
    rather than failing every redemption."""
    cfg = getattr(app.state, "counter", None)
    if cfg is None:
        try:
            cfg = configure_counter(app)
        except ValueError as e:
            log.error("FAREBOX_COUNTER_PRINTER: %s; the counter prints nothing until it is fixed", e)
            cfg = app.state.counter = CounterConfig(None)
    return cfg

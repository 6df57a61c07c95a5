"""The driver's menu on the validator: a keypad (or a few buttons) beside the screen, a slip printer below it.

Keys (a 4x4 keypad sends ``0``-``9``, ``*``, ``#``, ``A``-``D``; buttons wired to send the same characters do too)::

    #, 0 or A   show the menu
    1           shift totals so far: on the screen and on a slip
    2           reprint the last slip (marked REPRINT); before any slip, the last shift's report
    3           the shift's last 10 taps: on the screen and on a slip
    4 N... #    one tap by its sequence number (the number on the rider's screen and in the back office)
    5 N... #    a rider's 16-digit pickup code (an e-ticket bought by SMS or on the web), checked offline with the
                operator's pickup key and recorded as the ticket's use (validator.tickets; wrong codes lock it)
    *           cancel the number being typed / close the menu

"Taps" are riders' cards: fares taken and deny-listed cards refused. The last 10 are the open (or last) shift's,
as far as the journal's budget has kept them. The shift totals come from the journal's shift summary
(validator.shift_report, the same report the driver gets at sign-out), which survives pruning.

The last slip's text is kept in the journal (state ``last_slip``), so "reprint" gives the same slip after a
restart. At sign-out the shift report is printed without asking (:meth:`DriverMenu.after_tap`).

Keypads, chosen by a path string as readers are (validator.readers):

| path | keypad |
|---|---|
| ``console:`` | the validator's standard input: each character typed is a key, Enter is ``#`` |
| ``serial:<device>[?baud=9600]`` | a serial keypad module sending one ASCII character per key (pyserial) |

The menu runs in the validator's own loop between taps (:meth:`DriverMenu.poll`), never beside a purchase, and
printing is queued to the printer's thread, so the menu costs a rider no time.
"""

from __future__ import annotations

import logging
import os
import select
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from validator.messages import yuan
from validator.shift_report import card_type_label, pad, pair, render, when, width_of
from wire.records import RecordKind, TapRecord

log = logging.getLogger(__name__)

KEYS = frozenset("0123456789*#ABCD")
MAX_SEQ_DIGITS = 12
LAST_TAPS = 10

TEXTS: dict[str, tuple[str, str]] = {
    "menu": ("司机菜单", "DRIVER MENU"),
    "item1": ("班次合计", "Shift totals"),
    "item2": ("重印小票", "Reprint slip"),
    "item3": ("最近10笔", "Last 10 taps"),
    "item4": ("查询流水号", "Tap by number"),
    "close": ("退出", "Close"),
    "enter_seq": ("输入流水号, #确认 *取消", "Tap number, # OK * cancel"),
    "no_shift": ("尚无班次", "No shift yet"),
    "no_tap": ("无此流水", "No such tap"),
    "pruned": ("已上传并清理", "sent and pruned"),
    "printing": ("正在打印", "Printing"),
    "no_printer": ("未接打印机", "No printer"),
    "last_taps": ("最近刷卡", "LAST TAPS"),
    "tap": ("刷卡记录", "TAP"),
    "reprint": ("重印", "REPRINT"),
    "none": ("本班次无刷卡", "No taps this shift"),
    "seq": ("流水号", "Tap no."),
    "time": ("时间", "Time"),
    "kind": ("类型", "Kind"),
    "card": ("卡号", "Card"),
    "card_type": ("卡类", "Card type"),
    "fare": ("票价", "Fare"),
    "full_fare": ("原价", "Full fare"),
    "balance": ("余额", "Balance"),
    "reason": ("原因", "Reason"),
    "route": ("线路", "Route"),
    "vehicle": ("车辆", "Vehicle"),
    "driver": ("司机", "Driver"),
    "shift": ("班次", "Shift"),
    "terminal": ("终端流水", "PSAM seq"),
    "tac": ("交易认证", "TAC"),
    "pending": ("未完成", "unsettled"),
    "cancelled": ("已取消", "cancelled"),
    "printed": ("打印", "Printed"),
    "purchase": ("扣款", "Fare"),
    "denied": ("拒绝", "Denied"),
    "shift_open": ("签到", "Sign-in"),
    "shift_close": ("签退", "Sign-out"),
    "item5": ("取票码验票", "Pickup code"),
    "enter_code": ("输入16位取票码, #确认 *取消", "16-digit pickup code, # OK * cancel"),
    "code": ("取票码", "Code"),
    "no_tickets": ("本机未启用电子票", "No e-tickets on this bus"),
    "ticket_use": ("电子票", "Ticket"),
}


def say(key: str, languages: Sequence[str]) -> str:
    zh, en = TEXTS[key]
    return " ".join(text for lang, text in (("zh", zh), ("en", en)) if lang in languages)


def masked(asn: str) -> str:
    """A rider's card number on a slip anyone may pick up: the last 8 digits, enough to match the card."""
    return "…" + asn[-8:] if len(asn) > 8 else asn


# -- slips ------------------------------------------------------------------------------------------------------

def _title(text: str, width: int) -> list[str]:
    return ["=" * width, " " * max(0, (width - width_of(text)) // 2) + text, "=" * width]


def render_tap(record: TapRecord, state: str, *, width: int = 32, languages: Sequence[str] = ("zh", "en"),
               tz: str = "Asia/Shanghai", printed_at: datetime | None = None) -> str:
    """One journal record as a slip: what a rider disputing a fare, or the depot, needs to find it again."""
    zone = ZoneInfo(tz)

    def s(key: str) -> str:
        return say(key, languages)

    out = _title(s("tap"), width)
    out += pair(s("seq"), str(record.device_seq), width)
    out += pair(s("time"), when(record.occurred_at, zone), width)
    kind = s(record.kind.value) + ("" if state == "done" else f" ({s(state)})")
    out += pair(s("kind"), kind, width)
    if record.card_asn:
        out += pair(s("card"), masked(record.card_asn), width)
        out += pair(s("card_type"), card_type_label(record.card_type, languages), width)
    if record.kind is RecordKind.PURCHASE:
        out += pair(s("fare"), yuan(record.amount), width)
        if record.full_fare and record.full_fare != record.amount:
            out += pair(s("full_fare"), yuan(record.full_fare), width)
        if state == "done":
            out += pair(s("balance"), yuan(record.balance_after), width)
            out += pair(s("terminal"), f"{record.terminal_id}/{record.terminal_seq}", width)
            out += pair(s("tac"), record.tac, width)
    if record.reason:
        out += pair(s("reason"), record.reason, width)
    out.append("-" * width)
    out += pair(s("route"), record.route, width)
    out += pair(s("vehicle"), record.vehicle, width)
    if record.driver:
        out += pair(s("driver"), f"{record.driver} / {record.shift_no}", width)
    if printed_at is not None:
        out += pair(s("printed"), when(printed_at, zone), width)
    out.append("=" * width)
    return "\n".join(out) + "\n"


def render_taps(records: Sequence[TapRecord], *, shift_no: int, width: int = 32,
                languages: Sequence[str] = ("zh", "en"), tz: str = "Asia/Shanghai",
                printed_at: datetime | None = None) -> str:
    """The newest riders' taps of a shift, newest first: sequence, local time, card type (or refused), fare."""
    zone = ZoneInfo(tz)
    out = _title(f"{say('last_taps', languages)}  {say('shift', languages)} {shift_no}", width)
    seq_w, time_w, fare_w = 6, 6, 8
    label_w = width - seq_w - time_w - fare_w
    if not records:
        out.append(say("none", languages))
    for r in records:
        what = card_type_label(r.card_type, languages[:1]) if r.kind is RecordKind.PURCHASE else \
            say("denied", languages[:1])
        fare = yuan(r.amount) if r.kind is RecordKind.PURCHASE else "-"
        out.append(pad(str(r.device_seq), seq_w) + pad(r.occurred_at.astimezone(zone).strftime("%H:%M"), time_w)
                   + pad(what, label_w) + pad(fare, fare_w, right=True))
    if printed_at is not None:
        out.append("-" * width)
        out += pair(say("printed", languages), when(printed_at, zone), width)
    out.append("=" * width)
    return "\n".join(out) + "\n"


# -- keypads ----------------------------------------------------------------------------------------------------

class KeypadError(Exception):
    """The keypad path is wrong, or the keypad cannot be opened."""


class ConsoleKeypad:
    """Keys typed on standard input; Enter is ``#``. Letters are taken in either case."""

    def __init__(self, fd: int | None = None):
        self.fd = sys.stdin.fileno() if fd is None else fd

    def read(self) -> str:
        if not select.select([self.fd], [], [], 0)[0]:
            return ""
        data = os.read(self.fd, 256).decode("utf-8", errors="replace")
        return data.replace("\r\n", "#").replace("\n", "#").replace("\r", "#").upper()

    def close(self) -> None:
        pass


class SerialKeypad:
    """A serial keypad module: one ASCII character per key; CR or LF (some modules send one after a key) is ``#``
    only when alone, so "4 1 2 #" and "4 1 2 CR LF" both work."""

    def __init__(self, device: str, baud: int = 9600):
        import serial

        try:
            self.port = serial.Serial(device, baudrate=baud, timeout=0)
        except (serial.SerialException, OSError) as e:
            raise KeypadError(f"keypad {device}: {e}") from None

    def read(self) -> str:
        data = self.port.read(256)
        return data.decode("ascii", errors="ignore").replace("\r\n", "\n").replace("\r", "\n") \
            .replace("\n", "#").upper()

    def close(self) -> None:
        self.port.close()


def open_keypad(path: str):
    scheme, sep, rest = path.partition(":")
    if scheme == "console" and sep:
        return ConsoleKeypad()
    if scheme == "serial" and rest:
        device, _, query = rest.partition("?")
        try:
            baud = int(parse_qs(query).get("baud", ["9600"])[0])
        except ValueError:
            raise KeypadError(f"keypad path {path!r}: baud must be a number, e.g. ?baud=9600") from None
        return SerialKeypad(device, baud)
    raise KeypadError(f"keypad path {path!r}: give console: or serial:<device>[?baud=9600]")


# -- the menu ---------------------------------------------------------------------------------------------------

class DriverMenu:
    """Keys in, screens and slips out. ``screen(lines)`` shows lines on the validator's display; ``printer`` is a
    validator.printer.SlipPrinter (or None: slips are shown on the screen only)."""

    def __init__(self, terminal, keypad, printer, screen: Callable[[list[str]], None], *,
                 languages: Sequence[str] = ("zh", "en"), tz: str = "Asia/Shanghai", width: int = 32,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), tickets=None):
        self.terminal = terminal
        self.keypad = keypad
        self.printer = printer
        self.screen = screen
        self.languages = tuple(languages)
        self.tz = tz
        self.width = width
        self.clock = clock
        self._typing: str | None = None  # digits of a tap number being typed, None when not asked for
        self.tickets = tickets  # validator.tickets.TicketChecker, or None: no pickup codes on this bus
        self._code: str | None = None  # digits of a pickup code being typed

    def close(self) -> None:
        """Print what is still queued, then let go of the keypad."""
        if self.printer is not None:
            self.printer.close()
        if self.keypad is not None:
            self.keypad.close()

    @property
    def journal(self):
        return self.terminal.journal

    def poll(self) -> None:
        """Handle the keys pressed since the last look; never raises (a bad key or a fault is logged)."""
        if self.keypad is None:
            return
        try:
            keys = self.keypad.read()
        except Exception as e:  # noqa: BLE001 - an unplugged keypad must not stop the fares
            log.error("keypad: %s", e)
            return
        for key in keys:
            try:
                self.press(key)
            except Exception:  # noqa: BLE001
                log.exception("driver menu: key %r", key)

    def press(self, key: str) -> None:
        if key not in KEYS:
            return
        if self._code is not None:
            self._press_code(key)
            return
        if self._typing is not None:
            if key.isdigit() and len(self._typing) < MAX_SEQ_DIGITS:
                self._typing += key
                self.screen([f"{say('seq', self.languages)}: {self._typing}"])
            elif key == "#" and self._typing:
                number, self._typing = int(self._typing), None
                self.one_tap(number)
            elif key == "*":
                self._typing = None
                self.show_menu()
            return
        if key == "1":
            self.shift_totals()
        elif key == "2":
            self.reprint()
        elif key == "3":
            self.last_taps()
        elif key == "4":
            self._typing = ""
            self.screen([say("enter_seq", self.languages)])
        elif key == "5":
            if self.tickets is None:
                self.screen([say("no_tickets", self.languages)])
            else:
                self._code = ""
                self.screen([say("enter_code", self.languages)])
        elif key in "#0A":
            self.show_menu()

    def _press_code(self, key: str) -> None:
        """A pickup code being typed: digits (at most 16), ``#`` checks it, ``*`` cancels. The digits are shown
        as typed (the driver reads them back to the rider) and forgotten once checked."""
        from wire.ticket import PICKUP_DIGITS

        if key.isdigit() and len(self._code) < PICKUP_DIGITS:
            self._code += key
            self.screen([f"{say('code', self.languages)}: {self._code}"])
        elif key == "#" and self._code:
            code, self._code = self._code, None
            self.pickup(code)
        elif key == "*":
            self._code = None
            self.show_menu()

    def pickup(self, code: str) -> None:
        from validator.display import result_lines

        result = self.tickets.pickup(code)
        lines = result_lines(result, self.languages)
        if result.record is not None:
            lines.append(f"{say('seq', self.languages)} {result.record.device_seq}")
        self.screen(lines)

    def show_menu(self) -> None:
        items = (("1", "item1"), ("2", "item2"), ("3", "item3"), ("4", "item4"),
                 *((("5", "item5"),) if self.tickets is not None else ()), ("*", "close"))
        self.screen([say("menu", self.languages)] + [f"{key} {say(k, self.languages)}" for key, k in items])

    # -- the four things a driver asks for -------------------------------------------------------------------

    def shift_totals(self) -> None:
        report = self.terminal.shift_report()
        if report is None:
            self.screen([say("no_shift", self.languages)])
            return
        self.slip(render(report, width=self.width, languages=self.languages, tz=self.tz, printed_at=self.clock()))

    def reprint(self) -> None:
        last = self.journal.get_state("last_slip")
        if last and last.get("text"):
            head = f"*** {say('reprint', self.languages)} ***"
            self.slip(pad(" " * max(0, (self.width - width_of(head)) // 2) + head, self.width).rstrip() + "\n"
                      + last["text"], remember=False)
            return
        report = self.terminal.shift_report()
        if report is None:
            self.screen([say("no_shift", self.languages)])
            return
        self.slip(render(report, width=self.width, languages=self.languages, tz=self.tz, reprint=True,
                         printed_at=self.clock()), remember=False)

    def last_taps(self) -> None:
        shift_no = self.journal.last_shift_no()
        if shift_no is None:
            self.screen([say("no_shift", self.languages)])
            return
        taps = [r for r in self.journal.records_of_shift(shift_no)
                if r.kind in (RecordKind.PURCHASE, RecordKind.DENIED)][-LAST_TAPS:][::-1]
        self.slip(render_taps(taps, shift_no=shift_no, width=self.width, languages=self.languages, tz=self.tz,
                              printed_at=self.clock()))

    def one_tap(self, device_seq: int) -> None:
        found = self.journal.record(device_seq)
        if found is None:
            self.screen([f"{say('no_tap', self.languages)} {device_seq}"])
            return
        record, state = found
        self.slip(render_tap(record, state, width=self.width, languages=self.languages, tz=self.tz,
                             printed_at=self.clock()))

    def after_tap(self, result) -> None:
        """At sign-out (or a hand-over) the closed shift's report is printed without asking."""
        if result.report is None:
            return
        try:
            self.slip(render(result.report, width=self.width, languages=self.languages, tz=self.tz,
                             printed_at=self.clock()), show=False)
        except Exception:  # noqa: BLE001 - the sign-out itself is on disk already; a slip must not stop the loop
            log.exception("driver menu: sign-out slip of shift %s", result.report.shift_no)

    # -- output ----------------------------------------------------------------------------------------------

    def slip(self, text: str, *, remember: bool = True, show: bool = True) -> None:
        """Show ``text`` and print it; remember it for "reprint"."""
        if show:
            self.screen(text.rstrip("\n").split("\n"))
        if self.printer is None:
            self.screen([say("no_printer", self.languages)])
            return
        self.printer.print_slip(text)
        if remember:
            self.journal.put_state("last_slip", {"text": text, "printed_at": int(self.clock().timestamp())})

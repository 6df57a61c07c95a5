"""A driver's shift totals, as read on the validator's screen or printed on its slip printer.

``ShiftReport`` is plain data. It is built either from the shift's records (:meth:`ShiftReport.from_records`)
or by the journal from the summary it keeps per shift (``Journal.shift_report``), which still answers after
the journal's disk budget has pruned the shift's acknowledged records. Only completed purchases count: a grey
record whose card has not come back yet is shown apart as "unsettled", and a cancelled one moved no money.

:func:`render` lays the report out for a 32-column (58 mm) or 48-column (80 mm) receipt printer, in Chinese
and/or English, money as yuan with two decimals, times on the bus's local clock. Chinese characters take two
columns on these printers, so widths are counted in display columns, not characters.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from epurse.cardtypes import CardType
from validator.messages import yuan
from wire.records import RecordKind, TapRecord


@dataclasses.dataclass(frozen=True)
class FareRow:
    """Completed purchases of one card type in one shift."""

    card_type: int
    taps: int
    amount: int  # fen


@dataclasses.dataclass(frozen=True)
class ShiftReport:
    device_id: str
    shift_no: int
    driver: str
    route: str
    vehicle: str
    opened_at: datetime | None  # None only when the shift's opening is unknown (a journal of older software)
    closed_at: datetime | None  # None while the shift is open
    close_reason: str = ""  # "" for a sign-out, "handed over to D2002" for a hand-over
    rows: tuple[FareRow, ...] = ()  # by card type, ascending; card types without a purchase are left out
    denied: int = 0  # deny-listed cards refused during the shift
    first_tap: datetime | None = None  # first and last completed purchase
    last_tap: datetime | None = None
    unsettled: int = 0  # grey purchases waiting for their card to come back (not in the totals)

    @property
    def taps(self) -> int:
        return sum(r.taps for r in self.rows)

    @property
    def amount(self) -> int:
        return sum(r.amount for r in self.rows)

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    @classmethod
    def from_records(cls, records: Iterable[TapRecord], *, unsettled: int = 0) -> ShiftReport:
        """One shift's report from its completed records (the caller leaves out pending and cancelled)."""
        records = sorted(records, key=lambda r: r.device_seq)
        if not records:
            raise ValueError("a shift report needs at least one record of the shift")
        shift_nos = {r.shift_no for r in records}
        if len(shift_nos) != 1:
            raise ValueError(f"records of several shifts given: {sorted(shift_nos)}")
        opening = next((r for r in records if r.kind is RecordKind.SHIFT_OPEN), None)
        closing = next((r for r in reversed(records) if r.kind is RecordKind.SHIFT_CLOSE), None)
        head = opening or records[0]
        by_type: dict[int, list[int]] = {}
        purchases = [r for r in records if r.kind is RecordKind.PURCHASE]
        for r in purchases:
            row = by_type.setdefault(int(r.card_type), [0, 0])
            row[0] += 1
            row[1] += r.amount
        return cls(
            device_id=head.device_id, shift_no=head.shift_no, driver=head.driver, route=head.route,
            vehicle=head.vehicle,
            opened_at=opening.occurred_at if opening else None,
            closed_at=closing.occurred_at if closing else None,
            close_reason=closing.reason if closing else "",
            rows=tuple(FareRow(t, n, a) for t, (n, a) in sorted(by_type.items())),
            denied=sum(1 for r in records if r.kind is RecordKind.DENIED),
            first_tap=min((r.occurred_at for r in purchases), default=None),
            last_tap=max((r.occurred_at for r in purchases), default=None),
            unsettled=unsettled,
        )


# -- rendering ---------------------------------------------------------------------------------------------

LABELS: dict[str, tuple[str, str]] = {
    "title": ("班次报表", "SHIFT REPORT"),
    "reprint": ("重印", "REPRINT"),
    "device": ("设备", "Device"),
    "vehicle": ("车辆", "Vehicle"),
    "route": ("线路", "Route"),
    "shift": ("班次", "Shift"),
    "driver": ("司机", "Driver"),
    "opened": ("签到", "Opened"),
    "closed": ("签退", "Closed"),
    "still_open": ("未签退", "still open"),
    "unknown": ("不详", "unknown"),
    "handed_over": ("交接", "Handed over to"),
    "card": ("卡类", "Card"),
    "taps": ("笔数", "Taps"),
    "amount": ("金额(元)", "Yuan"),
    "total": ("合计", "Total"),
    "none": ("本班次无刷卡", "No fares this shift"),
    "first_tap": ("首笔", "First fare"),
    "last_tap": ("末笔", "Last fare"),
    "denied": ("黑名单拒绝", "Denied"),
    "unsettled": ("未完成交易", "Unsettled"),
    "printed": ("打印", "Printed"),
}


HANDED_OVER = "handed over to"  # how Terminal words the SHIFT_CLOSE reason of a hand-over


def width_of(text: str) -> int:
    """Display columns of ``text``: wide (CJK) characters take two on a receipt printer or a terminal."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, width: int, *, right: bool = False) -> str:
    gap = " " * max(0, width - width_of(text))
    return gap + text if right else text + gap


def label(key: str, languages: Sequence[str]) -> str:
    zh, en = LABELS[key]
    return " ".join(text for lang, text in (("zh", zh), ("en", en)) if lang in languages)


def card_type_label(card_type: int, languages: Sequence[str]) -> str:
    try:
        ct = CardType(card_type)
        zh, en = ct.label_zh, ct.name.title()
    except ValueError:  # a card type this software does not know still gets its own row
        zh, en = f"类型{card_type}", f"Type {card_type}"
    return " ".join(text for lang, text in (("zh", zh), ("en", en)) if lang in languages)


def when(at: datetime, zone: ZoneInfo) -> str:
    """A moment on the bus's local clock, to the minute."""
    return at.astimezone(zone).strftime("%Y-%m-%d %H:%M")


def pair(left: str, right: str, width: int) -> list[str]:
    """``left`` flush left and ``right`` flush right on one line, or on two when they do not fit."""
    if width_of(left) + 1 + width_of(right) <= width:
        return [left + pad(right, width - width_of(left), right=True)]
    return [left, pad(right, width, right=True)]


def render(report: ShiftReport, *, width: int = 32, languages: Sequence[str] = ("zh", "en"),
           tz: str = "Asia/Shanghai", reprint: bool = False, printed_at: datetime | None = None) -> str:
    """The report as printer lines, none wider than ``width`` display columns (but an over-long value)."""
    if width < 32:
        raise ValueError("shift reports are laid out for 32 columns or more")
    if not languages or not set(languages) <= {"zh", "en"}:
        raise ValueError(f"languages must be some of 'zh', 'en', got {languages!r}")
    zone = ZoneInfo(tz)

    def lbl(key: str) -> str:
        return label(key, languages)

    out = ["=" * width]
    title = lbl("title") + (f" ({lbl('reprint')})" if reprint else "")
    out.append(pad(" " * max(0, (width - width_of(title)) // 2) + title, width).rstrip())
    out.append("=" * width)
    out += pair(lbl("device"), report.device_id, width)
    out += pair(lbl("vehicle"), report.vehicle, width)
    out += pair(lbl("route"), report.route, width)
    out += pair(lbl("shift"), str(report.shift_no), width)
    out += pair(lbl("driver"), report.driver, width)
    out += pair(lbl("opened"), when(report.opened_at, zone) if report.opened_at else lbl("unknown"), width)
    closed = when(report.closed_at, zone) if report.closed_at else lbl("still_open")
    out += pair(lbl("closed"), closed, width)
    if report.close_reason.startswith(HANDED_OVER):  # the terminal's words for a hand-over: print who took it
        out += pair(lbl("handed_over"), report.close_reason.removeprefix(HANDED_OVER).strip(), width)
    elif report.close_reason:
        out += pair(lbl("closed"), report.close_reason, width)
    out.append("-" * width)

    # Three columns: card type, taps, yuan. The number columns get what they need; the label gets the rest.
    taps_w, amount_w = (7, 11) if width < 48 else (10, 14)
    label_w = width - taps_w - amount_w

    def row(a: str, b: str, c: str) -> str:
        return pad(a, label_w) + pad(b, taps_w, right=True) + pad(c, amount_w, right=True)

    for lang in [x for x in ("zh", "en") if x in languages]:  # one header line per language keeps 32 columns
        out.append(row(label("card", [lang]), label("taps", [lang]), label("amount", [lang])).rstrip())
    if not report.rows:
        out.append(lbl("none"))
    for r in report.rows:
        out.append(row(card_type_label(r.card_type, languages), str(r.taps), yuan(r.amount)))
    out.append("-" * width)
    out.append(row(lbl("total"), str(report.taps), yuan(report.amount)))
    out.append("-" * width)
    if report.first_tap:
        out += pair(lbl("first_tap"), when(report.first_tap, zone), width)
        out += pair(lbl("last_tap"), when(report.last_tap, zone), width)
    out += pair(lbl("denied"), str(report.denied), width)
    if report.unsettled:
        out += pair(lbl("unsettled"), str(report.unsettled), width)
    if printed_at is not None:
        out += pair(lbl("printed"), when(printed_at, zone), width)
    out.append("=" * width)
    return "\n".join(out) + "\n"

"""What the rider and the driver see on the validator: the answer to a tap, the shift report, the idle screen.

``Display`` is what the terminal's loop talks to; a real screen, a slip printer or a test double implements
it. ``ConsoleDisplay`` writes the same text to a stream (a serial console, the demo, a log). The rider's words
come from ``validator.messages`` (one place for the wording the operator approves); the few lines that only
the screen needs (the driver's reason for "out of service", the idle screen) are here.

A tap answer is short on purpose: the headline in each language, then fare and balance when known. Technical
detail (``TapResult.detail``) is only shown when the validator is out of service, because then the driver has
to act on it; for every other outcome it is for the log, not for the rider.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TextIO, runtime_checkable

from validator.messages import MESSAGES, Outcome, yuan
from validator.shift_report import ShiftReport, render

if TYPE_CHECKING:  # the terminal may import this module to drive a display; avoid the import cycle
    from validator.journal import JournalUsage
    from validator.terminal import TapResult

LANGUAGES = ("zh", "en")

TEXTS: dict[str, tuple[str, str]] = {
    "fare": ("票价", "Fare"),
    "balance": ("余额", "Balance"),
    "reason": ("原因", "Reason"),
    "driver": ("司机", "Driver"),
    "shift": ("班次", "Shift"),
    "route": ("线路", "Route"),
    "top_up": ("请充值", "Please top up"),
    "waiting": ("待上传", "Waiting to send"),
    "call_depot": ("请联系场站", "Call the depot"),
}


def say(pair: tuple[str, str], languages: Sequence[str] = LANGUAGES) -> str:
    """A (Chinese, English) pair in the chosen languages, Chinese first, as ``screen_text`` does."""
    zh, en = pair
    return " ".join(text for lang, text in (("zh", zh), ("en", en)) if lang in languages)


def money(fen: int) -> str:
    return f"¥{yuan(fen)}"


def headline(outcome: Outcome, languages: Sequence[str] = LANGUAGES) -> str:
    pair = MESSAGES.get(outcome)
    # An outcome added to the terminal before its wording reaches messages.py still says something readable.
    return say(pair, languages) if pair else outcome.value.replace("_", " ")


def result_lines(result: TapResult, languages: Sequence[str] = LANGUAGES) -> list[str]:
    """The screen for one tap, one item per line."""
    lines = [headline(result.outcome, languages)]
    if result.fare is not None:
        lines.append(f"{say(TEXTS['fare'], languages)} {money(result.fare)}")
    if result.balance is not None:
        lines.append(f"{say(TEXTS['balance'], languages)} {money(result.balance)}")
    if result.outcome is Outcome.INSUFFICIENT_BALANCE:
        lines.append(say(TEXTS["top_up"], languages))
    elif result.outcome in (Outcome.SHIFT_OPENED, Outcome.SHIFT_CLOSED) and result.record is not None:
        lines.append(f"{say(TEXTS['driver'], languages)} {result.record.driver}  "
                     f"{say(TEXTS['shift'], languages)} {result.record.shift_no}")
    elif result.outcome is Outcome.OUT_OF_SERVICE:
        # The reason is technical English from the terminal (journal full, no fare table): the driver reads it
        # to the depot, so it is shown whatever the languages.
        lines.append(f"{say(TEXTS['reason'], languages)}: {result.detail or '?'}")
        lines.append(say(TEXTS["call_depot"], languages))
    return lines


def idle_lines(route: str, shift: dict | None, usage: JournalUsage | None = None,
               languages: Sequence[str] = LANGUAGES) -> list[str]:
    """Between taps: the route, who is driving (or that nobody is signed in), and trouble with the journal."""
    lines = [f"{say(TEXTS['route'], languages)} {route}"]
    if shift is None:
        lines.append(headline(Outcome.NO_SHIFT, languages))
    else:
        lines.append(f"{say(TEXTS['driver'], languages)} {shift['driver']}  "
                     f"{say(TEXTS['shift'], languages)} {shift['shift_no']}")
    if usage is not None and usage.refusing:
        lines.append(headline(Outcome.OUT_OF_SERVICE, languages))
        since = f" since {usage.oldest_unsent:%Y-%m-%d %H:%M} UTC" if usage.oldest_unsent else ""
        lines.append(f"{say(TEXTS['reason'], languages)}: journal full, {usage.unsent} taps unsent{since}; "
                     f"restore the link")
    elif usage is not None and usage.unsent:
        lines.append(f"{say(TEXTS['waiting'], languages)} {usage.unsent}")
    return lines


@runtime_checkable
class Display(Protocol):
    def show(self, result: TapResult) -> None:
        """The answer to one tap, for the rider (or the driver, for a driver card)."""

    def show_shift_report(self, report: ShiftReport, *, reprint: bool = False) -> None:
        """A shift's totals, at sign-out or when the driver asks for a (re)print."""

    def idle(self, *, route: str, shift: dict | None, usage: JournalUsage | None = None) -> None:
        """The screen between taps."""


class ConsoleDisplay:
    """A ``Display`` writing text lines to a stream; a blank line ends each screen."""

    def __init__(self, stream: TextIO | None = None, languages: Sequence[str] = LANGUAGES, *,
                 width: int = 32, tz: str = "Asia/Shanghai"):
        if not languages or not set(languages) <= set(LANGUAGES):
            raise ValueError(f"languages must be some of {LANGUAGES}, got {languages!r}")
        self._stream = stream
        self.languages = tuple(languages)
        self.width = width
        self.tz = tz

    @property
    def stream(self) -> TextIO:
        # sys.stdout looked up at write time, so a redirected stdout (tests, the demo's console) is honoured.
        return self._stream if self._stream is not None else sys.stdout

    def _write(self, lines: list[str]) -> None:
        self.stream.write("\n".join(lines) + "\n\n")
        self.stream.flush()

    def show(self, result: TapResult) -> None:
        self._write(result_lines(result, self.languages))

    def show_shift_report(self, report: ShiftReport, *, reprint: bool = False) -> None:
        text = render(report, width=self.width, languages=self.languages, tz=self.tz, reprint=reprint)
        self.stream.write(text + "\n")
        self.stream.flush()

    def idle(self, *, route: str, shift: dict | None, usage: JournalUsage | None = None) -> None:
        self._write(idle_lines(route, shift, usage, self.languages))

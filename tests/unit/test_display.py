"""validator.display: every outcome on screen in Chinese and English, money as yuan, the driver's reason when
out of service, the idle screen, and the shift report through the display."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime

import pytest

from validator.display import ConsoleDisplay, Display, result_lines
from validator.journal import JournalUsage
from validator.messages import MESSAGES, Outcome
from validator.shift_report import FareRow, ShiftReport
from validator.terminal import TapResult
from wire.records import RecordKind, TapRecord

CJK = re.compile(r"[\u3000-\u9fff\uff00-\uffef]")
T0 = datetime(2024, 3, 5, 7, 30, tzinfo=UTC)


def screen(result, languages=("zh", "en")) -> str:
    out = io.StringIO()
    ConsoleDisplay(out, languages).show(result)
    return out.getvalue()


def test_console_display_is_a_display():
    assert isinstance(ConsoleDisplay(io.StringIO()), Display)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_in_chinese_and_english(outcome):
    zh, en = MESSAGES[outcome]
    both = screen(TapResult(outcome, detail="journal: journal full"))
    assert zh in both and en in both
    assert both.splitlines()[0] == f"{zh} {en}"
    english = screen(TapResult(outcome, detail="journal: journal full"), ("en",))
    assert en in english and zh not in english and not CJK.search(english)
    chinese = screen(TapResult(outcome, detail="x"), ("zh",))
    assert zh in chinese and en not in chinese


@pytest.mark.parametrize("fen,shown", [(0, "¥0.00"), (5, "¥0.05"), (100, "¥1.00"), (123456, "¥1234.56")])
def test_money_as_yuan(fen, shown):
    text = screen(TapResult(Outcome.PAID, fare=fen, balance=fen))
    assert f"票价 Fare {shown}" in text and f"余额 Balance {shown}" in text


def test_paid_shows_fare_and_balance():
    assert result_lines(TapResult(Outcome.PAID, fare=200, balance=800)) == [
        "扣款成功 Paid", "票价 Fare ¥2.00", "余额 Balance ¥8.00"]


def test_insufficient_balance_shows_the_fare_and_asks_for_a_top_up():
    lines = result_lines(TapResult(Outcome.INSUFFICIENT_BALANCE, fare=200, detail="SW 9401"))
    assert lines == ["余额不足 Insufficient balance", "票价 Fare ¥2.00", "请充值 Please top up"]


@pytest.mark.parametrize("outcome", [Outcome.ALREADY_PAID, Outcome.CARD_BLOCKED, Outcome.TAP_AGAIN])
def test_rider_screens_keep_technical_detail_off_the_screen(outcome):
    text = screen(TapResult(outcome, detail="card is on the deny list (sw 6283)"))
    assert "sw 6283" not in text


def test_out_of_service_gives_the_driver_the_reason():
    detail = "journal: journal full: 812 unsent taps; restore the link"
    text = screen(TapResult(Outcome.OUT_OF_SERVICE, detail=detail))
    assert "暂停服务 Out of service" in text and f"原因 Reason: {detail}" in text and "请联系场站" in text


def test_driver_sign_in_and_out_show_driver_and_shift():
    record = TapRecord(device_id="bus0042", device_seq=5, kind=RecordKind.SHIFT_OPEN, occurred_at=T0,
                       operator="citybus", route="r12", vehicle="v7", driver="D1001", shift_no=7)
    text = screen(TapResult(Outcome.SHIFT_OPENED, record=record))
    assert "签到成功 Shift started" in text and "司机 Driver D1001" in text and "班次 Shift 7" in text


def test_idle_screen():
    out = io.StringIO()
    display = ConsoleDisplay(out)
    display.idle(route="r12", shift=None)
    assert "线路 Route r12" in out.getvalue() and "司机未签到 Driver not signed in" in out.getvalue()
    out.seek(0), out.truncate()
    usage = JournalUsage(used_bytes=1000, budget_bytes=2000, wal_bytes=0, unsent=12, pending=0,
                         oldest_unsent=T0, refusing=False)
    display.idle(route="r12", shift={"driver": "D1001", "shift_no": 7}, usage=usage)
    assert "司机 Driver D1001" in out.getvalue() and "待上传 Waiting to send 12" in out.getvalue()
    out.seek(0), out.truncate()
    full = JournalUsage(used_bytes=1900, budget_bytes=2000, wal_bytes=0, unsent=812, pending=1,
                        oldest_unsent=T0, refusing=True)
    display.idle(route="r12", shift={"driver": "D1001", "shift_no": 7}, usage=full)
    text = out.getvalue()
    assert "暂停服务 Out of service" in text and "812 taps unsent since 2024-03-05 07:30 UTC" in text


def test_shift_report_through_the_display():
    report = ShiftReport(device_id="bus0042", shift_no=7, driver="D1001", route="r12", vehicle="v7",
                         opened_at=T0, closed_at=None, rows=(FareRow(1, 3, 600), FareRow(2, 1, 100)))
    out = io.StringIO()
    ConsoleDisplay(out, width=48).show_shift_report(report, reprint=True)
    text = out.getvalue()
    assert "班次报表 SHIFT REPORT (重印 REPRINT)" in text and "7.00" in text and "未签退 still open" in text
    assert max(len(line) for line in text.splitlines() if not CJK.search(line)) == 48


def test_default_stream_is_stdout_at_the_time_of_writing(capsys):
    ConsoleDisplay().show(TapResult(Outcome.ALREADY_PAID))
    assert "已付款 Already paid" in capsys.readouterr().out


def test_unknown_languages_are_refused():
    with pytest.raises(ValueError):
        ConsoleDisplay(io.StringIO(), ("de",))

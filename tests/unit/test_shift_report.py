"""validator.shift_report: totals from a shift's records checked against sums made here, the printer layout
at 32 and 48 columns in Chinese and/or English, and the journal's summary giving the same report as the
records."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta

import pytest

from validator.journal import Journal
from validator.shift_report import FareRow, ShiftReport, render, width_of
from wire.records import RecordKind, TapRecord

T0 = datetime(2024, 3, 5, 7, 30, tzinfo=UTC)  # 15:30 in Shanghai
CJK = re.compile(r"[\u3000-\u9fff\uff00-\uffef]")

FARES = [(1, 200), (2, 100), (1, 200), (3, 0), (2, 100), (1, 150), (4, 200), (1, 123456)]


def rec(kind: RecordKind, seq: int, minutes: int = 0, **kw) -> TapRecord:
    base = {"device_id": "bus0042", "device_seq": seq, "kind": kind,
            "occurred_at": T0 + timedelta(minutes=minutes), "operator": "citybus", "route": "r12",
            "vehicle": "v7", "driver": "D1001", "shift_no": 3}
    base.update(kw)
    return TapRecord(**base)


def shift_records(close_reason: str | None = ""):
    records = [rec(RecordKind.SHIFT_OPEN, 1)]
    for i, (card_type, amount) in enumerate(FARES):
        records.append(rec(RecordKind.PURCHASE, i + 2, minutes=i + 1, card_type=card_type, amount=amount,
                           card_asn=f"{i:020d}", tac="a1b2c3d4"))
    records.append(rec(RecordKind.DENIED, 20, minutes=15, reason="on deny list"))
    if close_reason is not None:
        records.append(rec(RecordKind.SHIFT_CLOSE, 21, minutes=60, reason=close_reason))
    return records


def test_totals_by_card_type_match_sums_made_here():
    report = ShiftReport.from_records(shift_records())
    expected: dict[int, tuple[int, int]] = {}
    for card_type, amount in FARES:
        taps, total = expected.get(card_type, (0, 0))
        expected[card_type] = (taps + 1, total + amount)
    assert {r.card_type: (r.taps, r.amount) for r in report.rows} == expected
    assert [r.card_type for r in report.rows] == sorted(expected)
    assert report.taps == len(FARES) and report.amount == sum(a for _t, a in FARES) == 124406
    assert report.denied == 1
    assert (report.device_id, report.shift_no, report.driver, report.route, report.vehicle) == (
        "bus0042", 3, "D1001", "r12", "v7")
    assert (report.opened_at, report.closed_at) == (T0, T0 + timedelta(minutes=60))
    last = T0 + timedelta(minutes=len(FARES))
    assert (report.first_tap, report.last_tap) == (T0 + timedelta(minutes=1), last)
    assert not report.is_open and report.close_reason == ""


def test_order_of_the_records_given_does_not_matter():
    records = shift_records()
    assert ShiftReport.from_records(reversed(records)) == ShiftReport.from_records(records)


def test_a_hand_over_closes_the_shift_with_its_reason():
    report = ShiftReport.from_records(shift_records("handed over to D2002"))
    assert report.closed_at == T0 + timedelta(minutes=60) and report.close_reason == "handed over to D2002"


def test_an_open_shift_and_a_shift_without_fares():
    report = ShiftReport.from_records(shift_records(None))
    assert report.is_open and report.closed_at is None
    empty = ShiftReport.from_records([rec(RecordKind.SHIFT_OPEN, 1)])
    assert empty.rows == () and empty.taps == empty.amount == 0 and empty.first_tap is None


def test_records_of_no_shift_or_of_several_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        ShiftReport.from_records([])
    with pytest.raises(ValueError, match="several"):
        ShiftReport.from_records([rec(RecordKind.SHIFT_OPEN, 1), rec(RecordKind.SHIFT_OPEN, 2, shift_no=4)])


# --------------------------------------------------------------------------------------- printing


@pytest.mark.parametrize("width", [32, 48])
@pytest.mark.parametrize("languages", [("zh", "en"), ("zh",), ("en",)])
def test_printout_fits_the_paper(width, languages):
    report = ShiftReport.from_records(shift_records("handed over to D2002"))
    text = render(report, width=width, languages=languages)
    lines = text.splitlines()
    assert all(width_of(line) <= width for line in lines), [line for line in lines if width_of(line) > width]
    assert lines[0] == lines[2] == lines[-1] == "=" * width


def test_printout_in_both_languages():
    text = render(ShiftReport.from_records(shift_records("handed over to D2002")))
    for words in ("班次报表 SHIFT REPORT", "司机 Driver", "D1001", "普通卡 Adult", "学生卡 Student",
                  "老人卡 Elderly", "员工卡 Staff", "合计 Total", "黑名单拒绝 Denied"):
        assert words in text
    assert "2024-03-05 15:30" in text and "2024-03-05 16:30" in text  # opened, closed on Shanghai time
    assert re.search(r"^交接 Handed over to +D2002$", text, re.MULTILINE)
    # money as yuan with two decimals: adult 200 + 200 + 150 + 123456 fen
    adult = next(line for line in text.splitlines() if line.startswith("普通卡"))
    assert adult.split()[-2:] == ["4", "1240.06"]
    total = next(line for line in text.splitlines() if line.startswith("合计"))
    assert total.split()[-2:] == [str(len(FARES)), "1244.06"]
    elderly = next(line for line in text.splitlines() if line.startswith("老人卡"))
    assert elderly.split()[-2:] == ["1", "0.00"]


def test_printout_in_one_language():
    report = ShiftReport.from_records(shift_records())
    english = render(report, languages=("en",))
    assert not CJK.search(english) and "SHIFT REPORT" in english and "Total" in english
    chinese = render(report, languages=("zh",))
    assert "班次报表" in chinese and "Total" not in chinese and "SHIFT REPORT" not in chinese


def test_printout_of_an_open_shift_a_reprint_and_a_shift_without_fares():
    open_shift = render(ShiftReport.from_records(shift_records(None)), reprint=True,
                        printed_at=T0 + timedelta(hours=2))
    assert "未签退 still open" in open_shift and "重印 REPRINT" in open_shift
    assert "打印 Printed" in open_shift and "2024-03-05 17:30" in open_shift
    empty = render(ShiftReport.from_records([rec(RecordKind.SHIFT_OPEN, 1)]))
    assert "本班次无刷卡 No fares this shift" in empty and "0.00" in empty


def test_an_unknown_card_type_still_gets_its_row_and_unsettled_fares_are_shown_apart():
    report = ShiftReport.from_records(shift_records())
    report = dataclasses.replace(report, rows=(FareRow(9, 2, 300),), unsettled=2)
    text = render(report)
    assert "类型9 Type 9" in text and "未完成交易 Unsettled" in text


def test_a_paper_narrower_than_32_columns_or_an_unknown_language_is_refused():
    report = ShiftReport.from_records(shift_records())
    with pytest.raises(ValueError):
        render(report, width=24)
    with pytest.raises(ValueError):
        render(report, languages=("fr",))


# --------------------------------------------------------------------------------------- from the journal


def test_the_journal_summary_gives_the_same_report_as_the_records(tmp_path):
    j = Journal(tmp_path / "bus.journal")
    try:
        for record in shift_records("handed over to D2002"):
            if record.kind is RecordKind.PURCHASE:
                grey = j.begin_purchase(dataclasses.replace(record, tac=""))
                j.complete_purchase(dataclasses.replace(record, device_seq=grey.device_seq))
            else:
                j.append(record)
        from_journal = j.shift_report(3)
        from_records = ShiftReport.from_records(j.records_of_shift(3))
        assert from_journal == from_records
        assert render(from_journal, width=48) == render(from_records, width=48)
        assert j.last_shift_no() == 3
    finally:
        j.close()

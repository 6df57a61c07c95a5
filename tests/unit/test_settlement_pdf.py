"""The settlement PDF: written atomically, and what a clerk reads in it is what was settled."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest
from pypdf import PdfReader

from clearing.settlement import TAP_COLUMNS, settle_day
from reports.settlement_pdf import write_settlement_pdf, yuan

DAY = date(2024, 5, 2)
GENERATED = datetime(2024, 5, 3, 1, 15, 0, tzinfo=UTC)


def money(fen: int) -> str:
    """The expected display, worked out differently from the code: by string slicing."""
    digits = str(abs(fen)).rjust(3, "0")
    whole, cents = digits[:-2], digits[-2:]
    groups = []
    while whole:
        groups.insert(0, whole[-3:])
        whole = whole[:-3]
    return ("-" if fen < 0 else "") + ",".join(groups) + "." + cents


def make_rows(n: int = 40, drivers: int = 5) -> list[dict]:
    start = datetime(2024, 5, 2, 0, 0, tzinfo=UTC)  # 08:00 in Shanghai
    rows = []
    for i in range(n):
        rows.append(
            {
                "device_id": f"VAL-{i % 4}",
                "device_seq": i,
                "kind": "purchase" if i % 10 else "shift_open",
                "occurred_at": start + timedelta(minutes=7 * i),
                "operator": "BUS1",
                "route": ["R1", "R22", "R305"][i % 3],
                "vehicle": f"V{100 + i % 4}",
                "driver": f"S{7000 + i % drivers}",
                "card_type": i % 3,
                "amount": [200, 100, 99_950][i % 3] + i,
            }
        )
    return rows


def frame(rows):
    df = pd.DataFrame(rows, columns=list(TAP_COLUMNS))
    df["occurred_at"] = pd.to_datetime(df["occurred_at"], utc=True)
    return df


def pdf_text(path) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(path).pages)


@pytest.mark.parametrize(
    "fen, shown",
    [
        (0, "0.00"),
        (5, "0.05"),
        (100, "1.00"),
        (123450, "1,234.50"),
        (123456789, "1,234,567.89"),
        (-5, "-0.05"),
        (-123450, "-1,234.50"),
    ],
)
def test_yuan(fen, shown):
    assert yuan(fen) == shown == money(fen)


def test_yuan_refuses_floats():
    with pytest.raises(TypeError):
        yuan(12.5)


def test_pdf_shows_the_settlement(tmp_path):
    rows = make_rows()
    s = settle_day(frame(rows), DAY, operator="BUS1")
    target = tmp_path / "reports" / "2024" / "settlement.pdf"  # folders do not exist yet
    out = write_settlement_pdf(
        s,
        target,
        operator_name="City Bus One",
        generated_at=GENERATED,
        route_names={"R1": "Station Loop", "R22": "Harbour Express"},
        driver_names={"S7000": "Li Wei"},
    )
    assert out == target
    assert target.read_bytes().startswith(b"%PDF")
    assert [p.name for p in target.parent.iterdir()] == ["settlement.pdf"]  # no temp file left behind

    text = pdf_text(target)
    assert "结算日报 Daily settlement — City Bus One" in text and "运营日 service day 2024-05-02" in text
    assert "生成时间 Generated: 2024-05-03 01:15 UTC" in text  # no operator zone given: UTC, said so
    for heading in ("按线路 By route", "按车辆 By vehicle", "按司机 By driver"):
        assert heading in text
    purchases = [r for r in rows if r["kind"] == "purchase"]
    for key in ("route", "vehicle", "driver"):
        for code in {r[key] for r in purchases}:
            assert code in text
    assert "Station Loop" in text and "Harbour Express" in text and "Li Wei" in text

    total = 0
    per_route: dict[str, int] = {}
    for r in purchases:
        total += r["amount"]
        per_route[r["route"]] = per_route.get(r["route"], 0) + r["amount"]
    assert total > 100_000  # so the thousands separator is exercised
    assert text.count(money(total)) >= 4  # header line and the three Total rows
    assert f"{len(purchases)} taps" in text
    for fen in per_route.values():
        assert money(fen) in text
    assert "Page 1 of 2" in text and "Page 2 of 2" in text  # the signatures at the foot of page 2
    assert "WARNING" not in text
    for role in ("制表 Prepared by", "审核 Checked by", "批准 Approved by"):
        assert role in text


def test_chinese_names_and_many_pages(tmp_path):
    rows = make_rows(400, drivers=90)  # 90 drivers: the driver table runs onto a second page
    s = settle_day(frame(rows), DAY, operator="BUS1")
    drivers = {f"S{7001 + i}": name for i, name in enumerate(["张伟", "王芳", "李娜", "刘洋", "陈静"])}
    routes = {"R1": "1路 (环线)", "R22": "22路", "R305": "305路 夜班"}
    vehicles = {f"V{100 + i}": f"沪A-{i:05d}" for i in range(4)}
    out = write_settlement_pdf(
        s,
        tmp_path / "zh.pdf",
        operator_name="城市公交一公司",
        generated_at=GENERATED,
        route_names=routes,
        vehicle_names=vehicles,
        driver_names=drivers,
    )
    text = pdf_text(out)
    assert "城市公交一公司" in text
    assert "张伟" in text and "22路" in text
    assert money(s.amount) in text
    pages = len(PdfReader(out).pages)
    assert pages >= 2 and f"Page {pages} of {pages}" in text
    # Four tables (card type, route, vehicle, driver); the header is repeated on each page the driver table goes on.
    driver_pages = sum(1 for p in PdfReader(out).pages
                       if any(ln.strip() in set(s.by_driver["driver"]) for ln in p.extract_text().splitlines()))
    assert driver_pages >= 2
    assert text.count("Amount (yuan)") == text.count("金额(元)") == 4 + driver_pages - 1
    assert all(code in text for code in s.by_driver["driver"])


def test_empty_day_still_makes_a_report(tmp_path):
    s = settle_day(pd.DataFrame(columns=list(TAP_COLUMNS)), DAY, operator="BUS1")
    text = pdf_text(
        write_settlement_pdf(s, tmp_path / "empty.pdf", operator_name="City Bus One", generated_at=GENERATED)
    )
    assert text.count("合计 Total") == 3 and "0.00" in text


def test_rewrite_replaces_whole_file_and_bad_input_leaves_nothing(tmp_path):
    s = settle_day(frame(make_rows()), DAY, operator="BUS1")
    target = tmp_path / "s.pdf"
    write_settlement_pdf(s, target, operator_name="Old", generated_at=GENERATED)
    write_settlement_pdf(s, target, operator_name="New", generated_at=GENERATED)
    assert "— New" in pdf_text(target) and "— Old" not in pdf_text(target)
    with pytest.raises(ValueError, match="timezone-aware"):
        write_settlement_pdf(s, tmp_path / "naive.pdf", operator_name="X", generated_at=datetime(2024, 5, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pdf"]

"""The day's payments close report: sales, refunds and the payment platform's fees by channel, and the tie-out of
the platform's statement against the books, as PDF (to sign), CSV and XLSX.

It lays out figures handed to it (``PaymentsClose``-like: ``day``, ``tz``, ``by_channel`` with the columns
channel, payments, sales, refunds_count, refunds, fees, net in integer fen, ``statement_id``,
``statement_sales``, ``statement_refunds``, ``open_items``; backoffice.payments.close computes them) and
computes no money of its own besides the totals row. Headings are Chinese with English beside them, as on
the settlement papers (reports.settlement_doc); money in yuan with two decimals, worked out from fen
exactly; every table ends in a totals row "合计 Total".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, Spacer

from clearing.money import yuan, yuan_decimal
from reports.pdf import FRAME_WIDTH, Column, PageHeader, count, data_table, markup, signature_lines, styles, when_text
from reports.pdf import write_pdf
from reports.settlement_doc import SIGNATURE_ROLES
from reports.tables import TOTAL, _atomic, escape_formulas, write_csv

CHANNEL_NAMES = {"web": "网上商城 Web shop", "sms": "短信 SMS", "partner": "合作方接口 Partner API",
                 "counter": "柜台 Counter", "topup": "空中充值 Over-the-air top-up", "unknown": "未知订单 Unknown order"}
HEADINGS = {"channel": "渠道 Channel", "payments": "笔数 Payments", "sales": "销售(元) Sales (yuan)",
            "refunds_count": "退款笔数 Refunds", "refunds": "退款(元) Refunds (yuan)",
            "fees": "手续费(元) Fees (yuan)", "net": "净额(元) Net (yuan)"}
PDF_HEADINGS = {"channel": "渠道\nChannel", "payments": "笔数\nPayments", "sales": "销售(元)\nSales (yuan)",
                "refunds_count": "退款笔数\nRefunds", "refunds": "退款(元)\nRefunds (yuan)",
                "fees": "手续费(元)\nFees (yuan)", "net": "净额(元)\nNet (yuan)"}
MONEY = ("sales", "refunds", "fees", "net")
COUNTS = ("payments", "refunds_count")
TIE_HEADINGS = ("项目 Item", "账簿(元) Books (yuan)", "对账单(元) Statement (yuan)", "差额(元) Difference (yuan)")
TITLE = "支付日结 Payments close"


def _totals(frame: pd.DataFrame) -> dict[str, int]:
    return {c: int(frame[c].sum()) if len(frame) else 0 for c in (*COUNTS, *MONEY)}


def tie_out(close) -> list[tuple[str, int, int | None]]:
    """(item, books fen, statement fen or None) for sales, refunds and the net the platform settles (sales less
    refunds less its fees, which only the statement knows: the same fees on both sides)."""
    t = _totals(close.by_channel)
    theirs_net = (None if close.statement_sales is None
                  else close.statement_sales - close.statement_refunds - t["fees"])
    return [("销售 Sales", t["sales"], close.statement_sales), ("退款 Refunds", t["refunds"], close.statement_refunds),
            ("结算净额 Net settled", t["net"], theirs_net)]


def export_frame(close, to_yuan=lambda f: yuan(f, grouping=False)) -> pd.DataFrame:
    """The by-channel table for people: channel names, money in yuan, a totals row."""
    f = close.by_channel
    rows = [[CHANNEL_NAMES.get(r.channel, r.channel), int(r.payments), to_yuan(int(r.sales)),
             int(r.refunds_count), to_yuan(int(r.refunds)), to_yuan(int(r.fees)), to_yuan(int(r.net))]
            for r in f.itertuples()]
    t = _totals(f)
    rows.append([TOTAL, t["payments"], to_yuan(t["sales"]), t["refunds_count"], to_yuan(t["refunds"]),
                 to_yuan(t["fees"]), to_yuan(t["net"])])
    return pd.DataFrame(rows, columns=[HEADINGS[c] for c in ("channel", *COUNTS[:1], "sales", "refunds_count",
                                                             "refunds", "fees", "net")])


def export_tie(close, to_yuan=lambda f: yuan(f, grouping=False)) -> pd.DataFrame:
    rows = []
    for item, books, theirs in tie_out(close):
        rows.append([item, to_yuan(books), "-" if theirs is None else to_yuan(theirs),
                     "-" if theirs is None else to_yuan(theirs - books)])
    return pd.DataFrame(rows, columns=list(TIE_HEADINGS))


def stem(close) -> str:
    return f"payments-close-{close.day.isoformat()}"


def status_line(close) -> str:
    if close.statement_id is None:
        return "对账单未取得 Statement not fetched yet: fees are not known (fee columns show 0)"
    diffs = [t for t in tie_out(close) if t[2] is not None and t[2] != t[1]]
    ties = "与账簿一致 ties to the books" if not diffs else f"{len(diffs)} 项不一致 figure(s) differ from the books"
    return (f"对账单 Statement #{close.statement_id}: {ties}; 待处理差异 open work-list items: "
            f"{close.open_items}")


def write_pdf_report(close, path: str | Path, *, operator_name: str = "farebox", generated_at: datetime | None = None
                     ) -> Path:
    st = styles()
    made = when_text(generated_at or datetime.now(UTC), close.tz)
    widths = {"channel": 50 * mm, "payments": 17 * mm, "sales": 24 * mm, "refunds_count": 17 * mm,
              "refunds": 24 * mm, "fees": 22 * mm}
    widths["net"] = FRAME_WIDTH - sum(widths.values())
    order = ("channel", "payments", "sales", "refunds_count", "refunds", "fees", "net")
    columns = [Column(PDF_HEADINGS[c], widths[c], numeric=c != "channel") for c in order]
    rows = [[CHANNEL_NAMES.get(r.channel, r.channel), count(int(r.payments)), yuan(int(r.sales)),
             count(int(r.refunds_count)), yuan(int(r.refunds)), yuan(int(r.fees)), yuan(int(r.net))]
            for r in close.by_channel.itertuples()]
    t = _totals(close.by_channel)
    total = [TOTAL, count(t["payments"]), yuan(t["sales"]), count(t["refunds_count"]), yuan(t["refunds"]),
             yuan(t["fees"]), yuan(t["net"])]
    tie_cols = [Column(h.replace(" ", "\n", 1), w, numeric=i > 0)
                for i, (h, w) in enumerate(zip(TIE_HEADINGS, (50 * mm, 40 * mm, 40 * mm, FRAME_WIDTH - 130 * mm)))]
    tie_rows = [[item, yuan(b), "-" if s is None else yuan(s), "-" if s is None else yuan(s - b)]
                for item, b, s in tie_out(close)]
    story: Sequence = [
        Paragraph(markup(TITLE), st["title"]),
        Paragraph(markup(f"平台日 Platform day {close.day.isoformat()} ({close.tz})"), st["subtitle"]),
        Paragraph(markup(status_line(close)), st["body"]),
        Spacer(1, 4 * mm),
        Paragraph(markup("按渠道 By channel"), st["heading"]),
        data_table(columns, rows, total),
        Spacer(1, 4 * mm),
        Paragraph(markup("对账单与账簿 Statement against the books"), st["heading"]),
        data_table(tie_cols, tie_rows),
        Spacer(1, 8 * mm),
        signature_lines(SIGNATURE_ROLES),
    ]
    header = PageHeader(operator_name, TITLE, f"platform day {close.day.isoformat()}", f"generated {made}")
    return write_pdf(path, list(story), header, title=f"Payments close {close.day.isoformat()}")


def write_xlsx(close, path: str | Path) -> Path:
    from openpyxl.styles import Font

    sheets = {"by_channel": export_frame(close, yuan_decimal), "tie_out": export_tie(close, yuan_decimal),
              "about": pd.DataFrame([("报表 Report", TITLE), ("平台日 Platform day", close.day.isoformat()),
                                     ("时区 Time zone", close.tz), ("状态 Status", status_line(close))],
                                    columns=["项目 Item", "值 Value"])}

    def write(tmp: Path) -> None:
        with pd.ExcelWriter(tmp, engine="openpyxl") as xw:
            for name, frame in sheets.items():
                escape_formulas(frame).to_excel(xw, sheet_name=name, index=False)
            for ws in xw.book.worksheets:
                for cell in ws[1]:
                    cell.font = Font(bold=True)
                if ws.cell(ws.max_row, 1).value == TOTAL:
                    for cell in ws[ws.max_row]:
                        cell.font = Font(bold=True)
                for column in ws.iter_cols(min_row=1):
                    ws.column_dimensions[column[0].column_letter].width = 26
                    for cell in column[1:]:
                        if not isinstance(cell.value, (str, int)) and cell.value is not None:
                            cell.number_format = "#,##0.00"

    return _atomic(Path(path), write)


def write_close_report(close, directory: str | Path, *, operator_name: str = "farebox",
                       generated_at: datetime | None = None) -> list[Path]:
    """``payments-close-<day>.pdf``, ``...-by_channel.csv``, ``...-tie_out.csv`` and ``.xlsx`` in ``directory``."""
    directory = Path(directory)
    name = stem(close)
    return [write_pdf_report(close, directory / f"{name}.pdf", operator_name=operator_name,
                             generated_at=generated_at),
            write_csv(export_frame(close), directory / f"{name}-by_channel.csv"),
            write_csv(export_tie(close), directory / f"{name}-tie_out.csv"),
            write_xlsx(close, directory / f"{name}.xlsx")]

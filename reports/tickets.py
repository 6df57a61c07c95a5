"""The e-ticket part of a settlement report: ticket revenue recognised by the run (by route, vehicle, driver,
product, channel and source), what it recognised for earlier days, the day's sales by product and channel, and the
deferred balance (sold, not yet recognised) by product. Tables handed in as frames of int fen; this module only
lays them out (PDF flowables with bilingual headings, CSV/XLSX frames with totals rows, money in yuan).

The rule the paper states (``clearing.tickets``): ticket money is deferred at sale and recognised at use (passes by
the operator's rule, unused expired tickets as breakage on their last day); the card issuer's commission does not
apply to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pandas as pd
from reportlab.lib.units import mm
from reportlab.platypus import CondPageBreak, KeepTogether, Paragraph, Spacer

from clearing.money import yuan
from reports.pdf import FRAME_WIDTH, Column, count, data_table, markup

DIMENSIONS = ("route", "vehicle", "driver", "product", "channel", "source")
SECTION = "电子票 E-tickets"
RULE_TEXT = ("票款售出时递延,乘车使用时确认收入(通票按运营方规则;过期未用票于有效期最后一日确认为逾期收入);"
             "电子票收入不计发卡方佣金。 Ticket money is deferred at sale and recognised at use (passes by the "
             "operator's rule; unused expired tickets as breakage on their last day of validity); the card "
             "issuer's commission does not apply to ticket revenue.")
HEADINGS = {"route": "按线路 By route", "vehicle": "按车辆 By vehicle", "driver": "按司机 By driver",
            "product": "按票种 By product", "channel": "按渠道 By channel", "source": "按来源 By source",
            "late": "以前运营日确认 Recognised for earlier days", "sales": "售票 Sales (by product and channel)",
            "outstanding": "未使用票款(递延) Outstanding: sold, not yet recognised"}
KEYS = {"route": "线路 Route", "vehicle": "车辆 Vehicle", "driver": "司机 Driver", "product": "票种 Product",
        "channel": "渠道 Channel", "source": "来源 Source", "for_day": "所属运营日 For day"}
COLUMNS = {"taps": "使用次数 Uses", "gross": "确认收入(元) Revenue recognised (yuan)",
           "tickets": "张数 Tickets", "refunded_tickets": "退票张数 Refunded tickets",
           "refunded": "退款(元) Refunded (yuan)", "net": "净售票款(元) Net sales (yuan)",
           "sold": "售出(元) Sold (yuan)", "recognised": "已确认(元) Recognised (yuan)",
           "deferred": "递延余额(元) Deferred (yuan)", "sales_gross": "售票款(元) Sales (yuan)"}
YUAN_COLUMNS = frozenset(COLUMNS[c] for c in ("gross", "refunded", "net", "sold", "recognised", "deferred",
                                               "sales_gross"))
SOURCE_NAMES = {"use": "乘车使用 rides", "pass_day": "通票按日 pass days", "breakage": "逾期未用 breakage",
                "refund": "退票冲回 refund taken back"}
CHANNEL_NAMES = {"web": "网上商城 web shop", "sms": "短信 SMS", "partner": "小程序/合作方 partner API",
                 "counter": "柜台 counter"}
NO_KEY = "(无 none)"  # a pass day or breakage is no ride: no route, vehicle or driver
TOTAL = "合计 Total"
yuan_text = functools.partial(yuan, grouping=False, symbol="")


@dataclass(frozen=True)
class TicketTables:
    by: Mapping[str, pd.DataFrame]  # dimension -> key, taps (uses), gross (fen): the run's own day
    late: pd.DataFrame  # for_day, source, taps, gross: recognised for earlier days
    sales: pd.DataFrame  # product, channel, tickets, gross, refunded_tickets, refunded, net
    outstanding: pd.DataFrame  # product, tickets, sold, refunded, recognised, deferred
    names: Mapping[str, Mapping] = field(default_factory=dict)

    @property
    def revenue(self) -> int:
        return int(self.by["source"]["gross"].sum()) if "source" in self.by else 0


def _label(dim: str, key) -> str:
    key = "" if key is None else str(key)
    if dim == "source":
        return SOURCE_NAMES.get(key, key)
    if dim == "channel":
        return CHANNEL_NAMES.get(key, key)
    return key or NO_KEY


# ---------------------------------------------------------------------------------------------------- PDF
def _table(header: list[tuple[str, float, bool]], rows: list[list[str]], total: list[str]):
    return data_table([Column(h, w, numeric=n) for h, w, n in header], rows, total)


def _breakdown(frame: pd.DataFrame, dim: str):
    w = FRAME_WIDTH - 60 * mm
    rows = [[_label(dim, k), count(int(n)), yuan(int(g))] for k, n, g in
            zip(frame[dim].tolist(), frame["taps"].tolist(), frame["gross"].tolist(), strict=True)]
    return _table([(KEYS[dim], w, False), (COLUMNS["taps"], 22 * mm, True), (COLUMNS["gross"], 38 * mm, True)],
                  rows, [TOTAL, count(int(frame["taps"].sum())), yuan(int(frame["gross"].sum()))])


def _late(frame: pd.DataFrame):
    w = (FRAME_WIDTH - 60 * mm) / 2
    rows = [[d.isoformat() if hasattr(d, "isoformat") else str(d), _label("source", s), count(int(n)),
             yuan(int(g))] for d, s, n, g in frame[["for_day", "source", "taps", "gross"]].itertuples(index=False)]
    return _table([(KEYS["for_day"], w, False), (KEYS["source"], w, False), (COLUMNS["taps"], 22 * mm, True),
                   (COLUMNS["gross"], 38 * mm, True)], rows,
                  [TOTAL, "", count(int(frame["taps"].sum())), yuan(int(frame["gross"].sum()))])


def _sales(frame: pd.DataFrame):
    key_w = (FRAME_WIDTH - 5 * 24 * mm) / 2
    cols = ("tickets", "gross", "refunded_tickets", "refunded", "net")
    heads = [(KEYS["product"], key_w, False), (KEYS["channel"], key_w, False)] + [
        (COLUMNS["sales_gross"] if c == "gross" else COLUMNS[c], 24 * mm, True) for c in cols]
    money = {"gross", "refunded", "net"}
    rows = [[str(r.product), _label("channel", r.channel)]
            + [yuan(int(getattr(r, c))) if c in money else count(int(getattr(r, c))) for c in cols]
            for r in frame.itertuples(index=False)]
    total = [TOTAL, ""] + [yuan(int(frame[c].sum())) if c in money else count(int(frame[c].sum())) for c in cols]
    return _table(heads, rows, total)


def _outstanding(frame: pd.DataFrame):
    cols = ("tickets", "sold", "refunded", "recognised", "deferred")
    key_w = FRAME_WIDTH - 5 * 26 * mm
    heads = [(KEYS["product"], key_w, False)] + [(COLUMNS[c], 26 * mm, True) for c in cols]
    rows = [[str(r.product)] + [count(int(getattr(r, c))) if c == "tickets" else yuan(int(getattr(r, c)))
                                for c in cols] for r in frame.itertuples(index=False)]
    total = [TOTAL] + [count(int(frame[c].sum())) if c == "tickets" else yuan(int(frame[c].sum())) for c in cols]
    return _table(heads, rows, total)


def pdf_section(t: TicketTables, st) -> list:
    """The flowables of the report's ticket section."""
    story: list = [Spacer(1, 4 * mm), CondPageBreak(40 * mm),
                   Paragraph(markup(f"{SECTION}: 确认收入 revenue recognised {yuan(t.revenue)}"), st["heading"]),
                   Paragraph(markup(RULE_TEXT), st["small"] if "small" in st else st["body"])]
    for dim in DIMENSIONS:
        frame = t.by.get(dim)
        if frame is None:
            continue
        heading = Paragraph(markup(f"{SECTION} — {HEADINGS[dim]}"), st["heading"])
        story += [Spacer(1, 3 * mm), CondPageBreak(30 * mm), KeepTogether([heading]), _breakdown(frame, dim)]
    parts = [("late", t.late, _late), ("sales", t.sales, _sales), ("outstanding", t.outstanding, _outstanding)]
    for name, frame, table in parts:
        if name == "late" and frame.empty:
            continue
        heading = Paragraph(markup(f"{SECTION} — {HEADINGS[name]}"), st["heading"])
        story += [Spacer(1, 3 * mm), CondPageBreak(30 * mm), KeepTogether([heading]), table(frame)]
    return story


# ------------------------------------------------------------------------------------------------ CSV/XLSX
def _export(frame: pd.DataFrame, keys: list[str], counts: list[str], money: list[str], to_yuan,
            rename: Mapping[str, str], labels: Callable[[str, object], str] = _label) -> pd.DataFrame:
    out = pd.DataFrame({k: [labels(k, v) if k in ("source", "channel") else
                            (v.isoformat() if hasattr(v, "isoformat") else ("" if v is None else str(v)))
                            for v in frame[k].tolist()] for k in keys})
    for c in counts:
        out[c] = frame[c].astype("int64").to_numpy()
    for c in money:
        out[c] = [to_yuan(int(v)) for v in frame[c].tolist()]
    total = {k: "" for k in keys}
    total[keys[0]] = TOTAL
    total.update({c: int(frame[c].sum()) for c in counts})
    total.update({c: to_yuan(int(frame[c].sum())) for c in money})
    out = pd.concat([out.astype(object), pd.DataFrame([total], columns=out.columns).astype(object)],
                    ignore_index=True)
    return out.rename(columns=rename)


def export_frames(t: TicketTables, *, to_yuan: Callable[[int], object] = yuan_text) -> dict[str, pd.DataFrame]:
    """Every ticket table by its name (``tickets_by_route`` ... ``ticket_sales``, ``ticket_outstanding``), each
    with a totals row, money in yuan, headings in Chinese with English beside them."""
    out: dict[str, pd.DataFrame] = {}
    names = {**KEYS, **COLUMNS}
    for dim, frame in t.by.items():
        shown = frame.assign(**{dim: [NO_KEY if dim in ("route", "vehicle", "driver") and not k else k
                                      for k in frame[dim].tolist()]})
        out[f"tickets_by_{dim}"] = _export(shown, [dim], ["taps"], ["gross"], to_yuan, names)
    if not t.late.empty:
        out["tickets_late"] = _export(t.late, ["for_day", "source"], ["taps"], ["gross"], to_yuan, names)
    out["ticket_sales"] = _export(t.sales, ["product", "channel"], ["tickets", "refunded_tickets"],
                                  ["gross", "refunded", "net"], to_yuan, {**names, "gross": COLUMNS["sales_gross"]})
    out["ticket_outstanding"] = _export(t.outstanding, ["product"], ["tickets"],
                                        ["sold", "refunded", "recognised", "deferred"], to_yuan, names)
    return out

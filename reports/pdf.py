"""What every farebox PDF shares: fonts (an embedded CJK font for Chinese names), money as yuan, the page header
every page carries, fast data tables that repeat their header row, and the atomic write.

Page header, on every page: the operator and the report's title on the left, the period on the right; below them
"clearing run <id> of <time>" and "Page i of n". The number of pages is only known once the story is laid out, so
the canvas holds its pages and draws the headers in ``save()``.

Tables are built from plain strings, not one Paragraph per cell: a month's report has thousands of rows and a
Paragraph costs a hundred times more to lay out. A column whose texts are all Latin is set in Helvetica; a column
holding any Chinese is set wholly in the CJK font (WenQuanYi Micro Hei has Latin glyphs too), and texts too wide
for their column are cut with "…" rather than running into the next one.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import escape

import pandas as pd
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas
from reportlab.platypus import Paragraph, SimpleDocTemplate, Table, TableStyle

from clearing.money import yuan  # noqa: F401 - money as people read it (123450 -> "1,234.50"), for the PDFs
from clearing.service_day import local_time

log = logging.getLogger(__name__)

LATIN_FONT = "Helvetica"
LATIN_BOLD = "Helvetica-Bold"
CJK_FONT_NAME = "FareboxCJK"
CJK_FONT_FILES = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
CJK_FALLBACK = "STSong-Light"
MISSING_KEY = "(none)"  # shown for a purchase whose route / vehicle / driver was not recorded
PAGE = A4
MARGIN_X = 18 * mm
MARGIN_TOP = 26 * mm  # room for the two header lines above the story
MARGIN_BOTTOM = 16 * mm
FRAME_WIDTH = PAGE[0] - 2 * MARGIN_X
CELL_SIZE = 8
CELL_PADDING = 3


def count(n: int) -> str:
    return f"{operator.index(n):,}"


@functools.cache
def cjk_font() -> str | None:
    """Register an embeddable CJK font once (else STSong-Light); None if neither works (Chinese then shows as
    blanks, but the report is still written)."""
    for path in CJK_FONT_FILES:
        if os.path.exists(path):
            try:
                pdfmetrics.registerFont(TTFont(CJK_FONT_NAME, path, subfontIndex=0))
                return CJK_FONT_NAME
            except Exception as e:  # noqa: BLE001 - a broken font file costs only the Chinese glyphs
                log.warning("CJK font %s unusable (%s); trying the next one", path, e)
    try:
        pdfmetrics.registerFont(UnicodeCIDFont(CJK_FALLBACK))
    except Exception as e:  # noqa: BLE001 - a failure here costs only the Chinese glyphs, never the report
        log.warning("no CJK font (%s): Chinese names will not show; install fonts-wqy-microhei", e)
        return None
    return CJK_FALLBACK


def is_latin(text: str) -> bool:
    """True when Helvetica can show every character (its PDF encoding is cp1252)."""
    if text.isascii():
        return True
    try:
        text.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


def runs(text: str) -> list[tuple[bool, str]]:
    """`text` cut into runs of (latin?, characters)."""
    out: list[tuple[bool, str]] = []
    for ch in text:
        latin = is_latin(ch)
        if out and out[-1][0] == latin:
            out[-1] = (latin, out[-1][1] + ch)
        else:
            out.append((latin, ch))
    return out


def markup(text: str) -> str:
    """Paragraph markup for `text`: characters Helvetica cannot show go in runs of the CJK font."""
    cjk = cjk_font()
    if cjk is None or is_latin(text):
        return escape(text)
    return "".join(escape(run) if latin else f'<font name="{cjk}">{escape(run)}</font>' for latin, run in runs(text))


def draw_mixed(c: canvas.Canvas, x: float, y: float, text: str, size: float, *, bold: bool = False,
               right: bool = False) -> None:
    """Draw `text` on the canvas at (x, y), Chinese runs in the CJK font; `right` aligns its end on x."""
    cjk = cjk_font() or LATIN_FONT
    latin_font = LATIN_BOLD if bold else LATIN_FONT
    parts = [(latin_font if latin else cjk, run) for latin, run in runs(text)]
    if right:
        x -= sum(pdfmetrics.stringWidth(run, font, size) for font, run in parts)
    for font, run in parts:
        c.setFont(font, size)
        c.drawString(x, y, run)
        x += pdfmetrics.stringWidth(run, font, size)


def fit(text: str, font: str, size: float, width: float) -> str:
    """`text` cut with "…" so that it fits `width` points (the ellipsis is in both fonts)."""
    # Cheap test first: no glyph in these fonts is wider than one em, so most texts need no measuring.
    if len(text) * size <= width or pdfmetrics.stringWidth(text, font, size) <= width:
        return text
    ellipsis = "…" if font != LATIN_FONT else "..."
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if pdfmetrics.stringWidth(text[:mid] + ellipsis, font, size) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + ellipsis


def key_text(value) -> str:
    return MISSING_KEY if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=base["BodyText"], fontName=LATIN_FONT, fontSize=10, leading=13)
    bold = ParagraphStyle("bold", parent=body, fontName=LATIN_BOLD)
    return {
        "title": ParagraphStyle("title", parent=base["Title"], fontName=LATIN_BOLD, fontSize=15, leading=19,
                                spaceBefore=0),
        "subtitle": ParagraphStyle("subtitle", parent=body, fontSize=11, leading=14, alignment=1, spaceAfter=6),
        "heading": ParagraphStyle("heading", parent=base["Heading2"], fontName=LATIN_BOLD, fontSize=12,
                                  leading=15, spaceBefore=8, spaceAfter=4),
        "body": body,
        "bold": bold,
        "small": ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor=colors.grey),
        "right": ParagraphStyle("right", parent=body, alignment=TA_RIGHT),
    }


@dataclass(frozen=True)
class Column:
    """One column of a data table: its heading, width in points, and whether it holds numbers (right aligned)."""

    heading: str
    width: float
    numeric: bool = False


def _heading_cell(col: Column, size: float):
    """A header cell: plain text when Helvetica shows it all, else a Paragraph whose Chinese runs are in the CJK
    font and Latin runs in bold (a bilingual heading, "总收入(元)\nGross (yuan)", keeps both)."""
    if is_latin(col.heading):
        return col.heading
    style = ParagraphStyle("cell_heading", fontName=LATIN_BOLD, fontSize=size, leading=size + 1,
                           alignment=TA_RIGHT if col.numeric else 0)
    return Paragraph("<br/>".join(markup(line) for line in col.heading.split("\n")), style)


def data_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], total: Sequence[str] | None = None,
               *, size: float = CELL_SIZE) -> Table:
    """A table of plain strings that repeats its header row on every page it runs onto; `total` is a bold last
    row above a rule. A heading may hold Chinese beside English (see ``_heading_cell``)."""
    cjk = cjk_font()
    fonts = []
    for i, col in enumerate(columns):
        chinese = cjk is not None and not col.numeric and any(not is_latin(r[i]) for r in rows)
        fonts.append(cjk if chinese else LATIN_FONT)
    body = [[cell if col.numeric else fit(cell, font, size, col.width - 2 * CELL_PADDING)
             for cell, col, font in zip(row, columns, fonts)] for row in rows]
    data = [[_heading_cell(c, size) for c in columns], *body]
    if total is not None:
        data.append(list(total))
    row_height = size + 4
    header_lines = max(c.heading.count("\n") + 1 for c in columns)
    # A bilingual heading may wrap within its column: its row then takes the height it needs.
    head_height = None if any(isinstance(cell, Paragraph) for cell in data[0]) else header_lines * (size + 1) + 5
    t = Table(data, colWidths=[c.width for c in columns],
              rowHeights=[head_height] + [row_height] * (len(data) - 1), repeatRows=1)
    commands = [
        ("FONTNAME", (0, 0), (-1, -1), LATIN_FONT),
        ("FONTSIZE", (0, 0), (-1, -1), size),
        ("LEADING", (0, 0), (-1, -1), size + 1),
        ("FONTNAME", (0, 0), (-1, 0), LATIN_BOLD),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e6e6e6")),
        ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("VALIGN", (0, 0), (-1, 0), "BOTTOM"),
        ("TOPPADDING", (0, 0), (-1, -1), 1),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
        ("LEFTPADDING", (0, 0), (-1, -1), CELL_PADDING),
        ("RIGHTPADDING", (0, 0), (-1, -1), CELL_PADDING),
    ]
    last_body = len(data) - (2 if total is not None else 1)
    for i, (col, font) in enumerate(zip(columns, fonts)):
        if col.numeric:
            commands.append(("ALIGN", (i, 0), (i, -1), "RIGHT"))
        if font != LATIN_FONT and last_body >= 1:
            commands.append(("FONTNAME", (i, 1), (i, last_body), font))
    if total is not None:
        commands += [("FONTNAME", (0, -1), (-1, -1), LATIN_BOLD), ("LINEABOVE", (0, -1), (-1, -1), 0.8, colors.black)]
        # "合计 Total": a total cell with Chinese is set in the CJK font (it has Latin glyphs, no bold)
        commands += [("FONTNAME", (i, -1), (i, -1), cjk) for i, cell in enumerate(total)
                     if cjk is not None and not is_latin(cell)]
    # A light rule every fifth row guides the eye across a wide table without the cost of zebra shading.
    commands += [("LINEBELOW", (0, r), (-1, r), 0.25, colors.HexColor("#bbbbbb")) for r in range(5, last_body, 5)]
    t.setStyle(TableStyle(commands))
    return t


def signature_lines(roles: Sequence[str], *, date_label: str = "日期 Date") -> Table:
    """A paper form's foot: one row per role (e.g. "制表 Prepared by"), a line to sign on and a line for the
    date, so that the printed report can be signed and filed."""
    st = styles()
    label = ParagraphStyle("signature", parent=st["bold"], fontSize=9, leading=11)
    rows = [[Paragraph(markup(role), label), "", Paragraph(markup(date_label), label), ""] for role in roles]
    t = Table(rows, colWidths=[38 * mm, FRAME_WIDTH - 38 * mm - 20 * mm - 40 * mm, 20 * mm, 40 * mm],
              rowHeights=[13 * mm] * len(rows))
    t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "BOTTOM"),
                           ("LINEBELOW", (1, 0), (1, -1), 0.6, colors.black),
                           ("LINEBELOW", (3, 0), (3, -1), 0.6, colors.black),
                           ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
    return t


@dataclass(frozen=True)
class PageHeader:
    """What the header of every page says."""

    operator_name: str
    title: str  # e.g. "Daily settlement"
    period: str  # e.g. "service day 2024-05-02"
    run_line: str  # e.g. "clearing run 2024-05-02/3 of 2024-05-03 01:15 UTC"
    footer: str = ""


def when_text(moment: datetime | None, tz: str | None = None) -> str:
    """A moment as the report prints it: local time in ``tz`` with the zone named ("2026-12-03 14:52
    Asia/Shanghai"), or UTC when no zone is given."""
    if moment is None:
        return "an unknown time"
    if tz is None:
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{local_time(moment, tz)} {tz}"


def run_line(run_id: str | None, run_at: datetime | None, tz: str | None = None) -> str:
    """ "clearing run <id> of <time>" (local time in ``tz`` with the zone named, else UTC); a report made outside
    a stored run says so instead of inventing one."""
    when = when_text(run_at, tz)
    if run_id is None:
        return f"ad hoc clearing (no stored run) of {when}"
    return f"clearing run {run_id} of {when}"


class _HeaderCanvas(canvas.Canvas):
    """Draws the page header and "Page i of n" on every page; n is only known at the end, so pages are held
    until save()."""

    def __init__(self, *args, header: PageHeader, **kwargs):
        super().__init__(*args, **kwargs)
        self._header = header
        self._pages: list[dict] = []

    def showPage(self):
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self):
        total = len(self._pages)
        h = self._header
        left, right = MARGIN_X, PAGE[0] - MARGIN_X
        top = PAGE[1] - 12 * mm
        for number, state in enumerate(self._pages, start=1):
            self.__dict__.update(state)
            self.saveState()
            self.setFillColor(colors.black)
            draw_mixed(self, left, top, f"{h.operator_name} · {h.title}", 10, bold=True)
            draw_mixed(self, right, top, h.period, 10, bold=True, right=True)
            self.setFillColor(colors.HexColor("#444444"))
            draw_mixed(self, left, top - 4.5 * mm, h.run_line, 8)
            self.setFont(LATIN_FONT, 8)
            self.drawRightString(right, top - 4.5 * mm, f"Page {number} of {total}")
            self.setStrokeColor(colors.grey)
            self.setLineWidth(0.5)
            self.line(left, top - 6.5 * mm, right, top - 6.5 * mm)
            if h.footer:
                self.setFillColor(colors.grey)
                draw_mixed(self, left, 9 * mm, h.footer, 7)
            self.restoreState()
            super().showPage()
        super().save()


def write_pdf(path: str | Path, story: list, header: PageHeader, *, title: str) -> Path:
    """Lay out `story` on A4 with `header` on every page and write it to `path` atomically (readers see the old
    file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits in the target folder so os.replace is a rename within one file system.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            doc = SimpleDocTemplate(out, pagesize=PAGE, leftMargin=MARGIN_X, rightMargin=MARGIN_X,
                                    topMargin=MARGIN_TOP, bottomMargin=MARGIN_BOTTOM, title=title, author="farebox")
            doc.build(story, canvasmaker=functools.partial(_HeaderCanvas, header=header))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; a report is for others (web, mail) to read
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def check_aware(name: str, moment: datetime | None) -> None:
    if moment is not None and moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), e.g. datetime.now(timezone.utc)")

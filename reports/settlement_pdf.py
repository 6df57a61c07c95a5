"""The daily settlement as a PDF that a clerk prints and hands to a manager.

One A4 document: title, a line saying when it was made and the day's totals, then the takings by route, by
vehicle and by driver, each with a bold total row, and "Page i of n" at the foot of every page.

Codes and figures are set in Helvetica. Names of routes, vehicles and drivers are often Chinese, which Helvetica
cannot show, so runs of such characters are set in a CJK font embedded in the PDF (WenQuanYi Micro Hei, Debian's
fonts-wqy-microhei, which the Makefile installs), so that every viewer and printer shows them. Where that font file
is missing the report falls back to reportlab's CID font STSong-Light, which only viewers with an Asian font pack
can draw.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import tempfile
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
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from clearing.settlement import Settlement

log = logging.getLogger(__name__)

LATIN_FONT = "Helvetica"
LATIN_BOLD = "Helvetica-Bold"
CJK_FONT_FILES = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
CJK_FALLBACK = "STSong-Light"
MISSING_KEY = "(none)"  # shown for a purchase whose route / vehicle / driver was not recorded


def yuan(fen: int) -> str:
    """Fen as yuan for people to read: 123450 -> "1,234.50", -5 -> "-0.05". Integer arithmetic only."""
    fen = operator.index(fen)  # accepts int and numpy integers, refuses floats
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole:,}.{cents:02d}"


@functools.cache
def _cjk_font() -> str | None:
    """Register an embeddable CJK font once (else STSong-Light); None if neither works (Chinese then shows as
    blanks, but the report is still written)."""
    for path in CJK_FONT_FILES:
        if os.path.exists(path):
            try:
                pdfmetrics.registerFont(TTFont("FareboxCJK", path, subfontIndex=0))
                return "FareboxCJK"
            except Exception as e:  # noqa: BLE001 - a broken font file costs only the Chinese glyphs
                log.warning("CJK font %s unusable (%s); trying the next one", path, e)
    try:
        pdfmetrics.registerFont(UnicodeCIDFont(CJK_FALLBACK))
    except Exception as e:  # noqa: BLE001 - a failure here costs only the Chinese glyphs, never the report
        log.warning("no CJK font (%s): Chinese names will not show; install fonts-wqy-microhei", e)
        return None
    return CJK_FALLBACK


def _latin(ch: str) -> bool:
    try:
        ch.encode("cp1252")  # Helvetica's standard encoding in PDF
    except UnicodeEncodeError:
        return False
    return True


def _markup(text: str) -> str:
    """Paragraph markup for `text`: characters Helvetica cannot show go in runs of the CJK font."""
    cjk = _cjk_font()
    if cjk is None or all(_latin(ch) for ch in text):
        return escape(text)
    runs: list[tuple[bool, str]] = []
    for ch in text:
        latin = _latin(ch)
        if runs and runs[-1][0] == latin:
            runs[-1] = (latin, runs[-1][1] + ch)
        else:
            runs.append((latin, ch))
    return "".join(
        escape(run) if latin else f'<font name="{cjk}">{escape(run)}</font>' for latin, run in runs
    )


class _NumberedCanvas(canvas.Canvas):
    """Draws "Page i of n" on every page; n is only known at the end, so pages are held until save()."""

    def __init__(self, *args, footer: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._footer = footer
        self._pages: list[dict] = []

    def showPage(self):
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self):
        total = len(self._pages)
        for number, state in enumerate(self._pages, start=1):
            self.__dict__.update(state)
            self.setFont(LATIN_FONT, 8)
            self.setFillColor(colors.grey)
            self.drawString(18 * mm, 10 * mm, self._footer)
            self.drawRightString(A4[0] - 18 * mm, 10 * mm, f"Page {number} of {total}")
            super().showPage()
        super().save()


def _key_text(value) -> str:
    return MISSING_KEY if pd.isna(value) else str(value)


def _table(table: pd.DataFrame, key: str, names: dict | None, styles) -> Table:
    """One breakdown: code, name (if names were given), taps, amount; then a bold total row."""
    cell = styles["cell"]
    right = styles["cell_right"]
    header = ["Code"] + (["Name"] if names is not None else []) + ["Taps", "Amount (yuan)"]
    rows: list[list] = [header]
    for code, taps, fen in zip(table[key], table["taps"], table["amount"]):
        row: list = [Paragraph(_markup(_key_text(code)), cell)]
        if names is not None:
            row.append(Paragraph(_markup(str(names.get(code, ""))), cell))
        row += [Paragraph(f"{int(taps):,}", right), Paragraph(yuan(int(fen)), right)]
        rows.append(row)
    total_taps, total_fen = int(table["taps"].sum()), int(table["amount"].sum())
    bold, bold_right = styles["bold"], styles["bold_right"]
    rows.append(
        [Paragraph("Total", bold)]
        + ([""] if names is not None else [])
        + [Paragraph(f"{total_taps:,}", bold_right), Paragraph(yuan(total_fen), bold_right)]
    )
    widths = [35 * mm, 75 * mm, 25 * mm, 35 * mm] if names is not None else [60 * mm, 40 * mm, 50 * mm]
    result = Table(rows, colWidths=widths, repeatRows=1)  # repeat the header when a table runs over a page
    result.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), LATIN_BOLD),
                ("FONTSIZE", (0, 0), (-1, 0), 9),
                ("ALIGN", (-2, 0), (-1, 0), "RIGHT"),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e6e6e6")),
                ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
                ("LINEABOVE", (0, -1), (-1, -1), 0.8, colors.black),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    return result


def _styles():
    base = getSampleStyleSheet()
    cell = ParagraphStyle("cell", parent=base["BodyText"], fontName=LATIN_FONT, fontSize=9, leading=11)
    bold = ParagraphStyle("bold", parent=cell, fontName=LATIN_BOLD)
    return {
        "title": ParagraphStyle("title", parent=base["Title"], fontName=LATIN_BOLD, fontSize=15, leading=19),
        "heading": ParagraphStyle("heading", parent=base["Heading2"], fontName=LATIN_BOLD),
        "body": ParagraphStyle("body", parent=cell, fontSize=10, leading=13),
        "cell": cell,
        "cell_right": ParagraphStyle("cell_right", parent=cell, alignment=TA_RIGHT),
        "bold": bold,
        "bold_right": ParagraphStyle("bold_right", parent=bold, alignment=TA_RIGHT),
    }


def write_settlement_pdf(
    settlement: Settlement,
    path: str | Path,
    *,
    operator_name: str,
    generated_at: datetime,
    route_names: dict[str, str] | None = None,
    vehicle_names: dict | None = None,
    driver_names: dict | None = None,
) -> Path:
    """Write the settlement report to `path` (atomically: readers see the old file or the whole new one)."""
    if generated_at.tzinfo is None:
        raise ValueError("generated_at must be timezone-aware (UTC), e.g. datetime.now(timezone.utc)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    styles = _styles()
    day = settlement.day.isoformat()
    made = generated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")

    story: list = [
        Paragraph(_markup(f"Daily settlement — {operator_name} — service day {day}"), styles["title"]),
        Paragraph(
            f"Generated {made} UTC. Operator code {escape(settlement.operator)}. "
            f"Day total: {settlement.taps:,} taps, {yuan(settlement.amount)} yuan.",
            styles["body"],
        ),
    ]
    if not settlement.totals_agree():  # should never happen; if it does the reader must not trust the figures
        story.append(Paragraph("WARNING: the tables below do not add up to the day total.", styles["bold"]))
    for heading, table, key, names in (
        ("By route", settlement.by_route, "route", route_names),
        ("By vehicle", settlement.by_vehicle, "vehicle", vehicle_names),
        ("By driver", settlement.by_driver, "driver", driver_names),
    ):
        story += [Spacer(1, 6 * mm), Paragraph(heading, styles["heading"]), _table(table, key, names, styles)]

    # The temp file sits in the target folder so os.replace is a rename within one file system.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            doc = SimpleDocTemplate(
                out,
                pagesize=A4,
                leftMargin=18 * mm,
                rightMargin=18 * mm,
                topMargin=18 * mm,
                bottomMargin=20 * mm,
                title=f"Daily settlement {settlement.operator} {day}",
                author="farebox",
            )
            footer = f"farebox — settlement {settlement.operator} {day}"
            doc.build(story, canvasmaker=functools.partial(_NumberedCanvas, footer=footer))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; a report is for others (web, mail) to read
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path

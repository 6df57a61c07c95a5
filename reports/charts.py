"""Charts drawn with reportlab.graphics (vector, in the page itself; no matplotlib): revenue as horizontal bars
(one per route, the biggest first, so the eye reads down a ranking) and taps as columns (one per hour of the
service day, so the eye reads a day's shape left to right).

Values come in as integers (fen, taps) and the labels a reader sees are formatted with integer arithmetic; only the
geometry reportlab computes from them is floating point.
"""

from __future__ import annotations

from collections.abc import Sequence

from reportlab.graphics.charts.barcharts import HorizontalBarChart, VerticalBarChart
from reportlab.graphics.shapes import Drawing, String
from reportlab.lib import colors
from reportlab.pdfbase import pdfmetrics

from reports.pdf import FRAME_WIDTH, LATIN_BOLD, LATIN_FONT, cjk_font, fit, is_latin, runs, yuan

BAR_COLOUR = colors.HexColor("#2f6b9a")
COLUMN_COLOUR = colors.HexColor("#4f8a3c")


def _title(d: Drawing, x: float, y: float, text: str, size: float = 10) -> None:
    """A chart title that may hold Chinese beside English ("按线路收入 Revenue by route"): Chinese runs in the
    CJK font, Latin runs in bold."""
    cjk = cjk_font() or LATIN_BOLD
    for latin, run in runs(text):
        font = LATIN_BOLD if latin else cjk
        d.add(String(x, y, run, fontName=font, fontSize=size))
        x += pdfmetrics.stringWidth(run, font, size)


def _label_font(labels: Sequence[str]) -> str:
    cjk = cjk_font()
    return cjk if cjk is not None and not all(is_latin(s) for s in labels) else LATIN_FONT


def _whole_yuan(value: float) -> str:
    """An axis tick in fen shown as whole yuan ("12,000")."""
    return f"{round(value) // 100:,}"


def _compact(value: float) -> str:
    """A count short enough to sit above a narrow column: 987 -> "987", 12,345 -> "12.3k", 2,012,725 -> "2.01M"."""
    n = round(value)
    if n == 0:
        return ""
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        tenths = (n + 50) // 100
        return f"{tenths // 10}.{tenths % 10}k" if tenths < 1000 else f"{(n + 500) // 1000}k"
    hundredths = (n + 5_000) // 10_000
    return f"{hundredths // 100}.{hundredths % 100:02d}M"


def _ticks(top: int, target: int = 5) -> int:
    """A round step (1, 2 or 5 times a power of ten) giving about `target` ticks up to `top`."""
    raw = max(1, top // target)
    step = 1
    while step * 10 <= raw:
        step *= 10
    for m in (1, 2, 5, 10):
        if step * m >= raw:
            return step * m
    return step * 10


def revenue_bars(labels: Sequence[str], fen: Sequence[int], *, title: str, width: float = FRAME_WIDTH) -> Drawing:
    """Horizontal bars, one per label, in the order given (the caller puts the biggest first), each with its
    amount in yuan at the end of the bar."""
    values = [int(v) for v in fen]
    n = max(1, len(values))
    bar = 12
    height = 28 + n * bar + 18
    d = Drawing(width, height)
    _title(d, 0, height - 12, title)
    font = _label_font(labels)
    label_width = 130
    chart = HorizontalBarChart()
    chart.x, chart.y = label_width, 18
    chart.width, chart.height = width - label_width - 70, n * bar
    # reportlab draws the first category at the bottom; reversed so the first label given is on top.
    chart.data = [list(reversed(values)) or [0]]
    chart.categoryAxis.categoryNames = [fit(s, font, 7, label_width - 8) for s in reversed(labels)] or [""]
    chart.categoryAxis.labels.fontName = font
    chart.categoryAxis.labels.fontSize = 7
    chart.categoryAxis.labels.boxAnchor = "e"
    chart.categoryAxis.labels.dx = -4
    chart.categoryAxis.visibleTicks = False
    top = max([*values, 1])
    chart.valueAxis.valueMin = min(0, *values) if values else 0
    chart.valueAxis.valueMax = top * 1.02
    chart.valueAxis.valueStep = _ticks(top)
    chart.valueAxis.labelTextFormat = _whole_yuan
    chart.valueAxis.labels.fontName = LATIN_FONT
    chart.valueAxis.labels.fontSize = 7
    chart.valueAxis.visibleGrid = True
    chart.valueAxis.gridStrokeColor = colors.HexColor("#dddddd")
    chart.bars[0].fillColor = BAR_COLOUR
    chart.bars[0].strokeColor = None
    chart.barWidth = bar * 0.7
    chart.groupSpacing = bar * 0.3
    chart.barLabelFormat = lambda v: yuan(round(v))
    chart.barLabels.fontName = LATIN_FONT
    chart.barLabels.fontSize = 6.5
    chart.barLabels.boxAnchor = "w"
    chart.barLabels.dx = 3
    d.add(chart)
    return d


def columns(labels: Sequence[str], counts: Sequence[int], *, title: str, axis_title: str,
            width: float = FRAME_WIDTH, height: float = 150) -> Drawing:
    """One column per label (hours of a service day in its order, e.g. 03..23, 00..02; days of a month), the
    count above each column that has any."""
    values = [int(v) for v in counts]
    d = Drawing(width, height)
    _title(d, 0, height - 12, title)
    chart = VerticalBarChart()
    chart.x, chart.y = 40, 22
    chart.width, chart.height = width - 50, height - 50
    chart.data = [values or [0]]
    chart.categoryAxis.categoryNames = list(labels) or [""]
    chart.categoryAxis.labels.fontName = LATIN_FONT
    chart.categoryAxis.labels.fontSize = 7
    chart.categoryAxis.labels.dy = -2
    top = max([*values, 1])
    chart.valueAxis.valueMin = 0
    chart.valueAxis.valueMax = top * 1.12  # headroom for the labels above the columns
    chart.valueAxis.valueStep = _ticks(top)
    chart.valueAxis.labelTextFormat = lambda v: f"{round(v):,}"
    chart.valueAxis.labels.fontName = LATIN_FONT
    chart.valueAxis.labels.fontSize = 7
    chart.valueAxis.visibleGrid = True
    chart.valueAxis.gridStrokeColor = colors.HexColor("#dddddd")
    chart.bars[0].fillColor = COLUMN_COLOUR
    chart.bars[0].strokeColor = None
    # A count above each column while they fit (a day's 24 hours); a month's 31 columns leave no room, and the
    # table beside the chart has the exact figures anyway.
    if len(values) <= 24:
        chart.barLabelFormat = _compact
    chart.barLabels.fontName = LATIN_FONT
    chart.barLabels.fontSize = 6
    chart.barLabels.boxAnchor = "s"
    chart.barLabels.dy = 2
    d.add(chart)
    d.add(String(width / 2, 2, axis_title, fontName=LATIN_FONT, fontSize=7,
                 textAnchor="middle"))
    return d

"""ESC/POS slips as bytes: the five commands a 58/80 mm receipt printer needs, shared by the validator's driver
slip printer (validator.printer) and the station counter's paper tickets (backoffice.tickets.redeem). Pure: no
port is opened here.

What one slip is::

    ESC @            initialise (modes back to default)
    FS &             Chinese character mode: text bytes are GB18030
    <lines>, each encoded GB18030 and ended by LF
    ESC d 4          feed four lines, so the text clears the cutter
    GS V 1           partial cut
"""

from __future__ import annotations

ESC, FS, GS, LF = b"\x1b", b"\x1c", b"\x1d", b"\n"
INIT = ESC + b"@"
CHINESE_ON = FS + b"&"
FEED_4 = ESC + b"d\x04"
CUT = GS + b"V\x01"
ENCODING = "gb18030"


def slip_bytes(text: str) -> bytes:
    """One slip as the printer takes it: initialise, Chinese mode, the lines, feed, cut."""
    body = b"".join(line.encode(ENCODING, errors="replace") + LF for line in text.rstrip("\n").split("\n"))
    return INIT + CHINESE_ON + body + FEED_4 + CUT


def slip_text(data: bytes) -> str:
    """The text of one slip made by :func:`slip_bytes` (a console printer shows it)."""
    return data.removeprefix(INIT + CHINESE_ON).removesuffix(FEED_4 + CUT).decode(ENCODING, errors="replace")

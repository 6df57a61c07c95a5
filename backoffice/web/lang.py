"""One language per person: each page shows Chinese or English, never both side by side.

A person picks a language once (the switch in the page header posts to ``/lang``); the choice is kept in a cookie
for a year. Until then the browser's Accept-Language decides, and Chinese when it names neither.

Templates write each text once in both languages and show one:

    {{ t("结算", "Settlement") }}

Times people read go through the ``local`` filter, in the zone the page passes as ``tz`` (an operator's zone;
Asia/Shanghai when the page is not tied to one): ``{{ tap.occurred_at|local }}`` -> "2026-12-02 07:44".
"""

from __future__ import annotations

from jinja2 import pass_context
from starlette.requests import Request

from clearing.service_day import DEFAULT_TZ, local_time

LANGS = {"zh": "中文", "en": "English"}
COOKIE = "farebox_lang"
YEAR = 365 * 24 * 3600


def lang_of(request: Request) -> str:
    """The language this person picked, else the first of zh/en their browser asks for, else Chinese."""
    chosen = request.cookies.get(COOKIE)
    if chosen in LANGS:
        return chosen
    for part in request.headers.get("accept-language", "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGS:
            return code
    return "zh"


@pass_context
def t(ctx, zh: str, en: str) -> str:
    """The text in the page's language."""
    return en if ctx.get("lang") == "en" else zh


@pass_context
def local(ctx, at, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A stored UTC moment in the page's zone (``tz`` in the context, else Asia/Shanghai)."""
    return local_time(at, ctx.get("tz") or DEFAULT_TZ, fmt)


def install(env) -> None:
    """Add ``t`` and the ``local`` filter to a Jinja environment."""
    env.globals.update(t=t, LANGS=LANGS)
    env.filters.update(local=local)

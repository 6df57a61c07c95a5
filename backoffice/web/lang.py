"""One language per person: each page shows Chinese or English, never both side by side.

A person picks a language once (the switch in the page header posts to ``/lang``); the choice is kept in a cookie
for a year and, for a logged-in staff user, with the user in the token file (backoffice.web.auth.set_lang; an admin
sets it too on /admin/users), so logging in on another computer sets the cookie to it again. Until a choice the
browser's Accept-Language decides, and Chinese when it names neither.

Templates write each text once in both languages and show one:

    {{ t("结算", "Settlement") }}

Times people read go through the ``local`` filter, in the zone the page passes as ``tz`` (an operator's zone;
Asia/Shanghai when the page is not tied to one): ``{{ tap.occurred_at|local }}`` -> "2026-12-02 07:44".
"""

from __future__ import annotations

import re

from jinja2 import pass_context
from starlette.requests import Request
from starlette.responses import Response

from backoffice.web import auth, messages
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


def _set(response: Response, code: str) -> None:
    response.set_cookie(COOKIE, code, max_age=YEAR, samesite="strict", httponly=True)


def remember(request: Request, response: Response, code: str) -> None:
    """The language switch: this browser keeps ``code``, and so does the logged-in staff user's entry in the token
    file (when the app has one; a test's in-memory tokens keep nothing)."""
    _set(response, code)
    who = auth.caller(request)
    store = request.app.state.services.tokens
    if who is not None and store.path is not None:
        try:
            auth.set_lang(store.path, name=who.name, lang=code)
        except (auth.TokenFileError, OSError):
            pass  # revoked meanwhile, or a file the server may only read: the cookie is all that keeps it


def at_login(response: Response, store: auth.TokenStore, who: auth.Principal) -> None:
    """Logging in brings the user's own language to this browser (a shared desk PC shows each person theirs)."""
    chosen = store.lang_of(who.name)
    if chosen in LANGS:
        _set(response, chosen)


@pass_context
def t(ctx, zh: str, en: str) -> str:
    """The text in the page's language."""
    return en if ctx.get("lang") == "en" else zh


_CJK = "\u3000-\u303f\u3400-\u9fff\uff00-\uffef"  # CJK punctuation, ideographs, full-width forms
_LEADING_CJK = re.compile(rf"^[{_CJK}]+(?:[\s·:：,，]+[{_CJK}]+)*[\s·:：]+")


@pass_context
def pick(ctx, text) -> str:
    """A message for the page's language: a (zh, en) pair shows one; an English message of the domain code (a
    registry refusal, a quarantine reason, an alarm: backoffice.web.messages) shows in Chinese on a Chinese page;
    older text written "中文 English" loses its leading Chinese on an English page (the English half says the same,
    with the detail)."""
    if isinstance(text, (tuple, list)) and len(text) == 2 and all(isinstance(x, str) for x in text):
        return text[1] if ctx.get("lang") == "en" else text[0]
    text = "" if text is None else str(text)
    if ctx.get("lang") != "en":
        return messages.chinese(text) or text
    if ctx.get("lang") == "en":
        stripped = _LEADING_CJK.sub("", text)
        return stripped or text
    return text


@pass_context
def local(ctx, at, fmt: str = "%Y-%m-%d %H:%M", tz: str | None = None) -> str:
    """A stored UTC moment in the page's zone (``tz`` in the context, else Asia/Shanghai); ``tz`` given: that zone
    (a row of its own operator on a page tied to none, e.g. a card's rides: ``{{ r.occurred_at|local(tz=r.tz) }}``)."""
    return local_time(at, tz or ctx.get("tz") or DEFAULT_TZ, fmt)


def install(env) -> None:
    """Add ``t`` and the ``local`` filter to a Jinja environment."""
    env.globals.update(t=t, LANGS=LANGS)
    env.filters.update(local=local, pick=pick)

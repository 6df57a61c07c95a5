"""The CSRF field every page form that writes carries.

The field is a hash of what identifies the caller (the session cookie, or a bearer token), which a page from
another site cannot know: the cookie is HttpOnly and SameSite=Strict besides. A request that brings its own bearer
header cannot be forged by a browser and needs none.

    <input type="hidden" name="csrf" value="{{ csrf }}">        render(..., csrf=csrf_token(request))
    check_csrf(request, form.get("csrf", ""))                    in the view, before anything is written
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Form, HTTPException, Request

from backoffice.web.auth import page_of

Csrf = Annotated[str, Form()]
# (Chinese, English): the error page shows the one of the reader's language (lang.pick)
EXPIRED = ("表单已过期或来自别处：请刷新页面后重试",
           "The form has expired or came from elsewhere: reload the page and try again")


def csrf_token(request: Request) -> str:
    token = page_of().token(request) or ""
    return hashlib.sha256(b"farebox-form:" + token.encode()).hexdigest()[:32]


def check_csrf(request: Request, sent: str) -> None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return  # a browser never adds this header by itself, so the request is the caller's own
    if not hmac.compare_digest(sent or "", csrf_token(request)):
        raise HTTPException(400, EXPIRED)


_check_csrf = check_csrf  # the name the first pages imported

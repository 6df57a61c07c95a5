"""Request size limits, checked before anything else reads the body (pure ASGI middleware).

FastAPI reads and parses a request's body before it runs the dependencies that check the token, and Starlette
spools a multipart body over 1 MB to a temporary file on the way: without a limit in front, an unauthenticated
``POST /login`` of 1.5 GB is written to disk before the 401. ``BodyLimit`` sits outside all of that:

- a ``Content-Length`` over the route's limit is answered 413 at once, without reading a byte of the body, and the
  connection is closed (``Connection: close``) so the client stops sending;
- a body without a length (chunked) is counted as it streams in; at the limit the 413 goes out and the app is told
  the client went away, so it stops reading. Whatever the app would answer after that is dropped.

Limits are small by default (forms, JSON) and larger only for the documented uploads: the issuer's reconciliation
file and the payment platform's daily file (their own size rules, in the routers, plus room for the form around
them). GTFS feeds are imported from the command line (``farebox registry import-gtfs``), not over HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from backoffice.web.api import payments_recon, reconcile

KIB, MIB = 1024, 1024 * 1024
LOGIN_LIMIT = 8 * KIB  # a token is ~50 characters, "next" a path on this site
DEFAULT_LIMIT = 256 * KIB  # any form or JSON body: a route with hundreds of stops is ~30 KB
FORM_ROOM = 1 * MIB  # multipart framing and the fields beside an uploaded file
# (method, path pattern, limit in bytes): the first match wins
LIMITS: tuple[tuple[str, re.Pattern, int], ...] = (
    ("POST", re.compile(r"/login"), LOGIN_LIMIT),
    ("POST", re.compile(r"/api/v1/payments/reconciliation"), payments_recon.MAX_FILE + FORM_ROOM),
    ("POST", re.compile(r"/api/v1/operators/[^/]+/reconciliation/issuer-file"), reconcile.MAX_FILE + FORM_ROOM),
    ("POST", re.compile(r"/reconciliation/upload"), reconcile.MAX_FILE + FORM_ROOM),
)


def limit_for(method: str, path: str) -> int:
    """The most bytes of body a request to ``path`` may carry."""
    for m, pattern, limit in LIMITS:
        if m == method and pattern.fullmatch(path):
            return limit
    return DEFAULT_LIMIT


def _size(limit: int) -> str:
    return f"{limit // MIB} MB" if limit >= MIB else f"{limit // KIB} KB"


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit_for(method, path)``, before the app reads it."""

    def __init__(self, app, limit_for: Callable[[str, str], int] = limit_for):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)  # the body is never read
            return

        received, refused, started = 0, False, False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _refuse(send, limit)
                    return {"type": "http.disconnect"}  # the app stops reading; the server closes the connection
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return  # the 413 is what the client gets
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:  # an app that trips over the cut-off body (ClientDisconnect) is no error of its own
                raise


async def _refuse(send, limit: int) -> None:
    body = json.dumps({"detail": f"请求过大 The request is larger than this address takes ({_size(limit)}); "
                                 "send a smaller file or ask operations"}, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

"""Security headers on every answer (pure ASGI middleware).

The pages carry no script and no inline style (one stylesheet under /static), so the Content-Security-Policy can
shut everything else: nothing runs that an injected name could bring, no other site frames a page to trick a
clerk's click, forms post only here. Pages and API answers hold one company's data: no-store keeps them out of a
shared PC's cache and the browser's back button after logout. FastAPI's /docs and /redoc load Swagger UI and
ReDoc from a CDN with inline script, so they get the headers without the script policy.
"""

from __future__ import annotations

PAGE_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
               "frame-ancestors 'none'; base-uri 'none'")
DOCS_POLICY = "frame-ancestors 'none'"  # Swagger UI / ReDoc: their own CDN scripts, never framed
DOCS = ("/docs", "/redoc")
# The counter's pages run one script file of ours (static/desk.js, never inline), which talks to this site and to
# the desk reader agent on the desk PC's loopback (farebox desk, farebox/desk.py); every other page runs none.
DESK_POLICY = PAGE_POLICY + "; script-src 'self'; connect-src 'self' http://127.0.0.1:* http://localhost:*"
DESK_PAGES = ("/cards", "/topups")


def headers_for(path: str) -> list[tuple[bytes, bytes]]:
    docs = path.startswith(DOCS)
    out = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"same-origin"),
           (b"content-security-policy", (DOCS_POLICY if docs else DESK_POLICY if path.startswith(DESK_PAGES)
                                            else PAGE_POLICY).encode())]
    if not path.startswith("/static/"):  # the stylesheet may be cached; what a person logged in sees may not
        out.append((b"cache-control", b"no-store"))
    return out


class SecurityHeaders:
    """ASGI middleware adding ``headers_for(path)`` to each response, replacing the app's own of the same names."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = headers_for(scope["path"])
        names = {k for k, _ in extra}

        async def with_headers(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, with_headers)

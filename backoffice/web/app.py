"""The web application: the API (``/api/v1``, OpenAPI at ``/openapi.json`` and ``/docs``) and the server-rendered
pages, wired in one place.

    app = create_app(settings)                 # the configured database, migrated; tokens from the token file
    app = create_app(engine, tokens=store)     # tests: an engine and a TokenStore of their own

Views are thin: each turns its request into one call of a use case (backoffice.registry, backoffice.settle,
backoffice.devices, backoffice.denylist_publish, backoffice.web.reads) with keyword arguments and shapes the answer.
Routers of work still being built (cards and top-ups, clearing runs, reports) plug in through ``extra_routers``
or by being added to ``ROUTERS`` when they land, and declare their owners with ``auth.owned_by`` like these.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine

from backoffice.devices import DEFAULT_STALE_AFTER
from backoffice.web import api, pages, pages_cards, pages_ops, pages_quarantine, pages_registry, pages_reports
from backoffice.web import pages_taps
from backoffice.web import pages_admin
from backoffice.web import pages_shop
from backoffice.web import pages_tickets
from backoffice.web import pages_ticket_orders
from backoffice.web import pages_ticket_reports
from backoffice.web.auth import TokenStore
from backoffice.web.deps import HERE, Services, utc_now
from backoffice.web.limits import BodyLimit
from backoffice.web.security_headers import SecurityHeaders
from backoffice.web.sessions import DEFAULT_LIFETIME, Sessions


def web_options(settings) -> dict:
    """create_app's keyword arguments from the settings (web_session_hours, web_secure_cookies)."""
    return {"session_lifetime": timedelta(hours=getattr(settings, "web_session_hours", 12.0)),
            "secure_cookies": getattr(settings, "web_secure_cookies", None)}


def create_app(source, *, tokens: TokenStore | Path | None = None, clock: Callable[[], datetime] | None = None,
               stale_after: timedelta = DEFAULT_STALE_AFTER, migrate: bool = True,
               extra_routers: tuple[APIRouter, ...] = (), session_lifetime: timedelta = DEFAULT_LIFETIME,
               secure_cookies: bool | None = None) -> FastAPI:
    """The app for ``source``: a farebox.config.Settings (its database, migrated on start; its token file) or an
    Engine (then ``tokens`` is a TokenStore or the path of a token file). A web page session lasts
    ``session_lifetime``; the session cookie is Secure if ``secure_cookies`` (None: when the request came over
    https)."""
    from backoffice.db import make_engine, upgrade

    if isinstance(source, Engine):
        engine = source
        if tokens is None:
            raise ValueError("create_app(engine) needs tokens=: a TokenStore or a token file path")
    else:
        engine = make_engine(source.effective_database_url)
        if tokens is None:
            tokens = source.tokens_path
        options = web_options(source)  # the settings decide, as for `farebox serve`
        session_lifetime, secure_cookies = options["session_lifetime"], options["secure_cookies"]
    if migrate:
        upgrade(engine)
    store = tokens if isinstance(tokens, TokenStore) else TokenStore(Path(tokens))
    app = FastAPI(title="farebox back office", version="1",
                  description="Registry, taps, settlements, devices, quarantine, deny lists and cards of the farebox "
                              "back office. Every endpoint needs `Authorization: Bearer <token>` (`farebox token "
                              "add`); each names the roles that own it.")
    app.state.services = Services(engine=engine, tokens=store, clock=clock or utc_now, stale_after=stale_after,
                                  sessions=Sessions(engine, store, session_lifetime), secure_cookies=secure_cookies)
    for router in (*api.ROUTERS, *extra_routers):
        app.include_router(router, prefix="/api/v1")
    app.include_router(pages.router)
    app.include_router(pages_cards.router)
    app.include_router(pages_ops.router)
    app.include_router(pages_registry.router)
    app.include_router(pages_reports.router)
    app.include_router(pages_quarantine.router)  # one quarantined row: release, reject
    app.include_router(pages_taps.router)  # the clerk's taps browser and its CSV / XLSX exports
    app.include_router(pages_admin.router)  # staff users: add, revoke, language (admins)
    app.include_router(pages_shop.router)  # the rider's web shop (public, one-time code by SMS)
    app.include_router(pages_tickets.router)  # the station counter redeems pickup codes
    app.include_router(pages_ticket_orders.router)  # a ticket order: tickets, uses, payment, refunds
    app.include_router(pages_ticket_reports.router)  # e-ticket sales, uses and outstanding (clerks)
    pages.install_error_pages(app)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # outermost last: the headers go on every answer, the 413 included; the size limit acts before any body is read
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    return app

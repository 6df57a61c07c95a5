"""What every view depends on: the services the app was wired with, a connection per request, the operator a
request is limited to. Routers and pages import this module, and backoffice.web.app imports the routers: the
arrows point one way (app -> routers -> deps), so neither side imports the other half-built."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import HTTPException, Request
from sqlalchemy import Connection, Engine

from backoffice.devices import DEFAULT_STALE_AFTER
from backoffice.web.auth import Principal, TokenStore
from backoffice.web.sessions import Sessions

HERE = Path(__file__).parent  # templates/ and static/ live beside this file


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclasses.dataclass
class Services:
    """What every view gets: the database, the tokens, the clock (tests fix it), how long a silent validator may
    stay quiet before it is flagged stale, the web page sessions, and whether the session cookie is marked Secure
    (None: when the request came over https, as a TLS proxy in front reports it)."""

    engine: Engine
    tokens: TokenStore
    clock: Callable[[], datetime] = utc_now
    stale_after: timedelta = DEFAULT_STALE_AFTER
    sessions: Sessions | None = None
    secure_cookies: bool | None = None


def services(request: Request) -> Services:
    return request.app.state.services


def connection(request: Request) -> Iterator[Connection]:
    """A connection for one request's reads (no transaction is committed: these views do not write)."""
    with request.app.state.services.engine.connect() as conn:
        yield conn


def scoped(principal: Principal, operator: str | None) -> str | None:
    """The operator a request is limited to. A clerk asking for another operator's data is told it does not exist
    (404), the same answer as for an operator that really does not, so codes cannot be probed."""
    if not principal.may_see(operator if operator is not None else principal.operator):
        raise HTTPException(404, f"operator {operator!r} not found")
    return principal.scope(operator)

"""Web page sessions: what the login form's cookie holds instead of the API token itself.

Logging in with a token opens a session: a fresh random id goes into the HttpOnly cookie, the database keeps only
the id's SHA-256, the SHA-256 of the token it was opened with, and its end (12 hours by default). Each page request
finds the session and asks the token file whether that token still works, so:

- logout ends the session: the cookie's value is worthless from then on, even if someone copied it;
- a session ends by itself after its lifetime, whatever the browser keeps;
- revoking the token (``farebox token revoke``) or its expiry ends every session opened with it, at once.

Sessions run on real time, not the clock the app's views are given (tests fix that one to a business day).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, or_, select, update

from backoffice.models import WebSession
from backoffice.web.auth import Principal, TokenStore, token_hash

SESSION_PREFIX = "fbs_"
DEFAULT_LIFETIME = timedelta(hours=12)
KEEP_ENDED = timedelta(days=1)  # ended and expired rows are pruned at the next login after this
T = WebSession.__table__


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite hands back naive UTC


class Sessions:
    """The sessions of one app: its database, its token file, how long a session lasts."""

    def __init__(self, engine: Engine, tokens: TokenStore, lifetime: timedelta = DEFAULT_LIFETIME):
        if lifetime <= timedelta(0):
            raise ValueError(f"a web session must last some time, not {lifetime}")
        self.engine, self.tokens, self.lifetime = engine, tokens, lifetime

    def open(self, token: str, *, now: datetime | None = None) -> str:
        """A new session for a token already checked; returns the id for the cookie (the only time it exists)."""
        now = now or _now()
        session_id = SESSION_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(delete(T).where(or_(T.c.expires_at < now - KEEP_ENDED, T.c.ended_at < now - KEEP_ENDED)))
            conn.execute(T.insert().values(id_sha256=token_hash(session_id), token_sha256=token_hash(token),
                                           created_at=now, expires_at=now + self.lifetime))
        return session_id

    def principal(self, session_id: str, *, now: datetime | None = None) -> Principal | None:
        """Who a session belongs to, if it is open, within its lifetime, and its token still works."""
        if not session_id.startswith(SESSION_PREFIX):
            return None
        now = now or _now()
        with self.engine.connect() as conn:
            row = conn.execute(select(T.c.token_sha256, T.c.expires_at, T.c.ended_at)
                               .where(T.c.id_sha256 == token_hash(session_id))).first()
        if row is None or row.ended_at is not None or now >= _aware(row.expires_at):
            return None
        return self.tokens.lookup_hash(row.token_sha256)

    def end(self, session_id: str, *, now: datetime | None = None) -> bool:
        """Logout: the session ends now. False if there was no open session with that id."""
        with self.engine.begin() as conn:
            done = conn.execute(update(T).where(T.c.id_sha256 == token_hash(session_id), T.c.ended_at.is_(None))
                                .values(ended_at=now or _now()))
        return done.rowcount == 1

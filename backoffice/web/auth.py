"""Who may call what: bearer tokens with one role each, kept hashed in a TOML file.

Roles (DESIGN.md, who uses it):

| role | may |
|---|---|
| ``clerk`` | one bus company's registry, taps, settlements, reports, devices and quarantine: never another's |
| ``operator_staff`` | the mobile operator's counter: cards, top-ups, refunds, deny-list versions |
| ``operations`` | validators, parameters, the deny list, quarantine, the registry of every operator |
| ``admin`` | everything |
| ``partner`` | one operator's partner API (its own app selling tickets: backoffice.web.api.partner), nothing else |

The token file (setting ``api_tokens_file`` / ``FAREBOX_API_TOKENS``, default ``<var_dir>/api-tokens.toml``) holds
one ``[[token]]`` table per token: name, role, operator (clerks only), created_at, expires_at, revoked_at (once
revoked), lang (the holder's language for pages, ``zh`` or ``en``; absent: not chosen yet) and the SHA-256 of the
token. The token itself is printed once by ``farebox token add`` (``--days N``, default 90) and stored nowhere, so
a copy of the file lets nobody in. ``farebox token revoke --name NAME`` marks it revoked. The file is re-read when
it changes, so a token added, revoked or removed takes effect on the next request of a running ``farebox serve``;
a token past its ``expires_at`` stops working by itself. Tokens made before expiry existed have no
``expires_at`` and keep working until revoked (``farebox token list`` says so). Staff users are the names in this
file: the admin page /admin/users (backoffice.web.pages_admin) adds and revokes them with the same functions as the
CLI. Every write to the file holds a lock beside it (``.<name>.lock``), so the CLI and a running server never lose
each other's changes.

Every endpoint declares its owners with ``Depends(owned_by(...))`` (API: bearer header only) or
``Depends(page_of(...))`` (pages: the session cookie the login form sets, see backoffice.web.sessions, or a bearer
header). The role matrix test reads the declaration off each route and calls every endpoint with every role.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import tempfile
import threading
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer

ROLES = ("clerk", "operator_staff", "operations", "admin", "partner")
OPERATOR_BOUND = ("clerk", "partner")  # roles whose token names the one operator they act for
COOKIE = "farebox_token"
TOKEN_PREFIX = "fbx_"
DEFAULT_TOKEN_DAYS = 90  # `farebox token add --days N` sets another; a person's token is renewed, not eternal
MAX_TOKEN_DAYS = 400
LANGS = ("zh", "en")  # a staff user's page language (backoffice.web.lang shows the one they chose)


class TokenFileError(ValueError):
    """The token file cannot be used as it is; the text says where and why."""


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name, role and, for a clerk, the one operator whose data they may see."""

    name: str
    role: str
    operator: str | None = None

    def scope(self, operator: str | None) -> str | None:
        """The operator a query is limited to: a clerk's own always (asking for another's is answered as if it did
        not exist, by the caller), anyone else's what they asked for (None: every operator)."""
        return self.operator if self.role in OPERATOR_BOUND else operator

    def may_see(self, operator: str | None) -> bool:
        return self.role not in OPERATOR_BOUND or operator == self.operator


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check(role: str, operator: str | None, name: str) -> None:
    if role not in ROLES:
        raise TokenFileError(f"token {name!r}: role {role!r} is not one of {', '.join(ROLES)}")
    if role in OPERATOR_BOUND and not operator:
        raise TokenFileError(f"token {name!r}: a clerk sees one operator's data: give --operator" if role == "clerk"
                             else f"token {name!r}: a partner sells for one operator: give --operator")
    if role not in OPERATOR_BOUND and operator:
        raise TokenFileError(f"token {name!r}: only a clerk or partner acts for one operator; role {role} sees all")


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(value, name: str, field: str, path) -> datetime | None:
    """A time from the token file: TOML's own datetime or the text add_token writes; None if absent."""
    if value is None or value == "":
        return None
    try:
        at = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise TokenFileError(f"{path}: token {name!r} has {field} {value!r}, not a time like "
                             "2026-12-03T08:00:00Z") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    """One ``[[token]]`` of the file: who holds it, until when it works, whether it was revoked."""

    principal: Principal
    sha256: str
    created_at: datetime | None = None
    expires_at: datetime | None = None  # None: no end (tokens made before expiry existed)
    revoked_at: datetime | None = None
    lang: str | None = None  # the holder's page language, once chosen

    def valid_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return f"revoked {_stamp(self.revoked_at)}"
        if self.expires_at is None:
            return "no expiry (made before tokens expired: reissue it)"
        return f"{'expired' if now >= self.expires_at else 'expires'} {_stamp(self.expires_at)}"


def _entry_lines(e: TokenEntry) -> list[str]:
    # json.dumps makes a valid TOML basic string for any name (same escapes, UTF-8 kept).
    p = e.principal
    lines = ["[[token]]", f"name = {json.dumps(p.name, ensure_ascii=False)}", f"role = {json.dumps(p.role)}"]
    if p.operator:
        lines.append(f"operator = {json.dumps(p.operator, ensure_ascii=False)}")
    for field in ("created_at", "expires_at", "revoked_at"):
        if getattr(e, field) is not None:
            lines.append(f'{field} = "{_stamp(getattr(e, field))}"')
    if e.lang:
        lines.append(f"lang = {json.dumps(e.lang)}")
    return [*lines, f'sha256 = "{e.sha256}"', ""]


@contextlib.contextmanager
def _writing(path: Path):
    """Hold the token file's lock (a file beside it) while reading and writing it: an append by `farebox token add`
    and a rewrite by a revoke or a language choice in the server never lose each other's change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _rewrite(path: Path, entries: list[TokenEntry]) -> None:
    """The whole file again, atomically (a reader sees the old file or the new one, never half)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600 already
            f.write("\n".join("\n".join(_entry_lines(e)) for e in entries))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_token(path: Path, *, role: str, name: str, operator: str | None = None,
              now: datetime | None = None, days: float | None = DEFAULT_TOKEN_DAYS, lang: str | None = None) -> str:
    """Create a token valid for ``days`` (None: no end, for a lab only), append its hash to the file and return
    the token (the only time it exists in clear). A name may be used again once its earlier tokens are revoked or
    expired. ``lang`` is the holder's page language (None: the name's earlier choice, if any)."""
    _check(role, operator, name)
    if lang is not None and lang not in LANGS:
        raise TokenFileError(f"token {name!r}: language {lang!r} is not one of {', '.join(LANGS)}")
    if not name.strip():
        raise TokenFileError("a token needs a name (who holds it), e.g. --name alice")
    if days is not None and not 0 < days <= MAX_TOKEN_DAYS:
        raise TokenFileError(f"a token lasts more than 0 and at most {MAX_TOKEN_DAYS} days; {days} given")
    path = Path(path)
    now = now or datetime.now(UTC)
    with _writing(path):
        earlier = [e for e in TokenStore(path).entries() if e.principal.name == name] if path.exists() else []
        if any(e.valid_at(now) for e in earlier):
            raise TokenFileError(f"{path}: a token named {name!r} exists already and works; choose another name "
                                 f"or revoke it first (farebox token revoke --name {name})")
        if lang is None:
            lang = next((e.lang for e in reversed(earlier) if e.lang), None)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = TokenEntry(Principal(name, role, operator or None), token_hash(token), created_at=now,
                           expires_at=None if days is None else now + timedelta(days=days), lang=lang)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # hashes only, yet nobody else's business
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            if f.tell() > 0:
                f.write("\n")
            f.write("\n".join(_entry_lines(entry)))
    return token


def revoke_token(path: Path, *, name: str, now: datetime | None = None) -> int:
    """Mark every working token named ``name`` revoked (the file is rewritten whole, atomically; a running server
    sees the change on its next request). Returns how many were revoked; TokenFileError if none was."""
    path = Path(path)
    now = now or datetime.now(UTC)
    with _writing(path):
        entries = TokenStore(path).entries() if path.exists() else []
        hits = [e for e in entries if e.principal.name == name and e.revoked_at is None]
        if not hits:
            raise TokenFileError(f"{path}: no token named {name!r} to revoke (farebox token list shows them)")
        _rewrite(path, [dataclasses.replace(e, revoked_at=now) if e in hits else e for e in entries])
    return len(hits)


def set_lang(path: Path, *, name: str, lang: str) -> int:
    """Keep ``lang`` as the page language of the staff user ``name`` (every token of that name, so a renewed
    token keeps it). Returns how many entries changed (0: it was that already); TokenFileError if there is no such
    name or no such language."""
    if lang not in LANGS:
        raise TokenFileError(f"language {lang!r} is not one of {', '.join(LANGS)}")
    path = Path(path)
    with _writing(path):
        entries = TokenStore(path).entries() if path.exists() else []
        if not any(e.principal.name == name for e in entries):
            raise TokenFileError(f"{path}: no token named {name!r} (farebox token list shows them)")
        changed = [e for e in entries if e.principal.name == name and e.lang != lang]
        if changed:
            _rewrite(path, [dataclasses.replace(e, lang=lang) if e in changed else e for e in entries])
    return len(changed)


class TokenStore:
    """The token file, read again whenever its modification time or size changes. A token that is revoked or past
    its end is unknown to ``lookup``, at once."""

    def __init__(self, path: Path | None = None, tokens: dict[str, Principal] | None = None,
                 clock: Callable[[], datetime] | None = None):
        self.path = None if path is None else Path(path)
        self._by_hash: dict[str, TokenEntry] = {
            token_hash(t): TokenEntry(p, token_hash(t)) for t, p in (tokens or {}).items()}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        self.clock = clock or (lambda: datetime.now(UTC))  # real time: an expiry is not business time

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._by_hash, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        with self.path.open("rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise TokenFileError(f"{self.path}: {e}") from None
        by_hash = {}
        for i, entry in enumerate(doc.get("token", [])):
            name = str(entry.get("name", f"#{i + 1}"))
            digest = str(entry.get("sha256", "")).lower()
            if len(digest) != 64:
                raise TokenFileError(f"{self.path}: token {name!r} has no sha256 of 64 hex digits")
            _check(entry.get("role", ""), entry.get("operator"), name)
            times = {k: _when(entry.get(k), name, k, self.path) for k in ("created_at", "expires_at", "revoked_at")}
            lang = entry.get("lang")  # a preference: one this version does not know is ignored, never an error
            by_hash[digest] = TokenEntry(Principal(name=name, role=entry["role"], operator=entry.get("operator")),
                                         digest, **times, lang=lang if lang in LANGS else None)
        self._by_hash, self._stamp = by_hash, stamp

    def lookup(self, token: str) -> Principal | None:
        return self.lookup_hash(token_hash(token))

    def lookup_hash(self, digest: str) -> Principal | None:
        """The holder of the token with this SHA-256, if it is neither revoked nor past its end."""
        with self._lock:
            self._reload()
            entry = self._by_hash.get(digest)
        return entry.principal if entry is not None and entry.valid_at(self.clock()) else None

    def lang_of(self, name: str) -> str | None:
        """The page language the staff user ``name`` chose (None: not yet, or no file to keep it in)."""
        return next((e.lang for e in reversed(self.entries()) if e.principal.name == name and e.lang), None)

    def entries(self) -> list[TokenEntry]:
        with self._lock:
            self._reload()
            return list(self._by_hash.values())

    def principals(self) -> list[Principal]:
        """Who holds a working token."""
        now = self.clock()
        return [e.principal for e in self.entries() if e.valid_at(now)]


# ------------------------------------------------------------------------------------------ FastAPI dependencies
_bearer = HTTPBearer(auto_error=False, description="a token from `farebox token add`")


class _Owners:
    """A dependency that lets in only the roles that own an endpoint (admin always does)."""

    api = True

    def __init__(self, roles: tuple[str, ...]):
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}")
        self.roles = tuple(dict.fromkeys((*roles, "admin")))

    def token(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None

    def __call__(self, request: Request, _: Annotated[object, Depends(_bearer)] = None) -> Principal:
        # _bearer only documents the scheme in OpenAPI (the Authorize button on /docs); self.who reads it
        principal = self.who(request)
        request.state.principal = principal  # a refusal's page still shows who is logged in, and their links
        if principal.role not in self.roles:
            raise HTTPException(403, self.refusal(principal))
        return principal

    def refusal(self, principal: Principal):
        return f"role {principal.role} may not use this; it belongs to {', '.join(self.roles)}"

    def who(self, request: Request) -> Principal:
        """The caller, by the bearer token; 401 without one that works (unknown, revoked or expired)."""
        token = _Owners.token(self, request)
        if token is None:
            raise HTTPException(401, "no token: send 'Authorization: Bearer <token>' (farebox token add)",
                                headers={"WWW-Authenticate": "Bearer"})
        principal = request.app.state.services.tokens.lookup(token)
        if principal is None:
            raise HTTPException(401, "unknown, expired or revoked token: ask an admin for one (farebox token add)",
                                headers={"WWW-Authenticate": "Bearer"})
        return principal


class _PageOwners(_Owners):
    """As _Owners, for pages: the login cookie counts too. It holds a session id (backoffice.web.sessions), never
    the token: logout, the session's end, or the token's revocation or expiry make it worthless. The cookie is
    SameSite=Strict, and forms that write check a CSRF field of their own (pages_cards.csrf_token)."""

    api = False

    def refusal(self, principal: Principal) -> tuple[str, str]:
        """(Chinese, English): the error page shows the reader's language (the API keeps its one sentence)."""
        return (f"您的角色（{principal.role}）不能使用此页；它属于 {'、'.join(self.roles)}", super().refusal(principal))

    def token(self, request: Request) -> str | None:
        """What identifies the caller: the bearer token, else the session cookie (CSRF fields are made from it)."""
        return super().token(request) or request.cookies.get(COOKIE) or None

    def who(self, request: Request) -> Principal:
        cookie = request.cookies.get(COOKIE)
        if _Owners.token(self, request) is not None or not cookie:
            return super().who(request)
        sessions = request.app.state.services.sessions
        principal = None if sessions is None else sessions.principal(cookie)
        if principal is None:
            raise HTTPException(401, "the session has ended: log in again")
        return principal


def caller(request: Request) -> Principal | None:
    """Who is logged in on a public page (the language switch): the session's or bearer token's holder, or None."""
    try:
        return _PageOwners(()).who(request)
    except HTTPException:
        return None


def owned_by(*roles: str) -> _Owners:
    return _Owners(roles)


def page_of(*roles: str) -> _PageOwners:
    return _PageOwners(roles)


def owners_of(route) -> tuple[str, ...] | None:
    """The roles a route declared (None: a public route such as the login page, or not a FastAPI route)."""
    for dep in getattr(getattr(route, "dependant", None), "dependencies", ()):
        if isinstance(dep.call, _Owners):
            return dep.call.roles
    return None


def endpoints(app) -> list[tuple[str, frozenset[str], tuple[str, ...] | None, bool]]:
    """Every route of the app as (path, methods, owning roles or None, is an API route), included routers
    flattened. FastAPI >= 0.165 keeps included routers as lazy entries (read through iter_route_contexts)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        contexts = [(r, getattr(r, "path", None)) for r in app.routes]
    else:
        contexts = [(c.original_route, c.path) for c in iter_route_contexts(app.routes)]
    out = []
    for route, path in contexts:
        methods = frozenset(getattr(route, "methods", None) or ()) - {"HEAD"}
        owners = owners_of(route)
        out.append((path, methods, owners, owners is not None and getattr(owners_dependency(route), "api", False)))
    return out


def owners_dependency(route) -> _Owners | None:
    for dep in getattr(getattr(route, "dependant", None), "dependencies", ()):
        if isinstance(dep.call, _Owners):
            return dep.call
    return None

"""Who may call what: bearer tokens with one role each, kept hashed in a TOML file.

Roles (DESIGN.md, who uses it):

| role | may |
|---|---|
| ``clerk`` | one bus company's registry, taps, settlements, reports, devices and quarantine: never another's |
| ``operator_staff`` | the mobile operator's counter: cards, top-ups, refunds, deny-list versions |
| ``operations`` | validators, parameters, the deny list, quarantine, the registry of every operator |
| ``admin`` | everything |

The token file (setting ``api_tokens_file`` / ``FAREBOX_API_TOKENS``, default ``<var_dir>/api-tokens.toml``) holds one ``[[token]]`` table per
token: name, role, operator (clerks only), created_at and the SHA-256 of the token. The token itself is printed once
by ``farebox token add`` and stored nowhere, so a copy of the file lets nobody in. The file is re-read when it
changes, so a token added or removed takes effect without restarting ``farebox serve``.

Every endpoint declares its owners with ``Depends(owned_by(...))`` (API: bearer header only) or
``Depends(page_of(...))`` (pages: the HttpOnly cookie the login form sets, or a bearer header). The role matrix
test reads the declaration off each route and calls every endpoint with every role.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import threading
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer

ROLES = ("clerk", "operator_staff", "operations", "admin")
COOKIE = "farebox_token"
TOKEN_PREFIX = "fbx_"


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
        return self.operator if self.role == "clerk" else operator

    def may_see(self, operator: str | None) -> bool:
        return self.role != "clerk" or operator == self.operator


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check(role: str, operator: str | None, name: str) -> None:
    if role not in ROLES:
        raise TokenFileError(f"token {name!r}: role {role!r} is not one of {', '.join(ROLES)}")
    if role == "clerk" and not operator:
        raise TokenFileError(f"token {name!r}: a clerk sees one operator's data: give --operator")
    if role != "clerk" and operator:
        raise TokenFileError(f"token {name!r}: only a clerk is limited to one operator; role {role} sees all")


def add_token(path: Path, *, role: str, name: str, operator: str | None = None,
              now: datetime | None = None) -> str:
    """Create a token, append its hash to the file and return the token (the only time it exists in clear)."""
    _check(role, operator, name)
    if not name.strip():
        raise TokenFileError("a token needs a name (who holds it), e.g. --name alice")
    path = Path(path)
    if path.exists() and any(p.name == name for p in TokenStore(path).principals()):
        raise TokenFileError(f"{path}: a token named {name!r} exists already; choose another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    at = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    # json.dumps makes a valid TOML basic string for any name (same escapes, UTF-8 kept).
    lines = ["[[token]]", f"name = {json.dumps(name, ensure_ascii=False)}", f"role = {json.dumps(role)}"]
    if operator:
        lines.append(f"operator = {json.dumps(operator, ensure_ascii=False)}")
    lines += [f'created_at = "{at}"', f'sha256 = "{token_hash(token)}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # hashes only, yet nobody else's business
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if f.tell() > 0:
            f.write("\n")
        f.write("\n".join(lines))
    return token


class TokenStore:
    """The token file, read again whenever its modification time or size changes."""

    def __init__(self, path: Path | None = None, tokens: dict[str, Principal] | None = None):
        self.path = None if path is None else Path(path)
        self._by_hash: dict[str, Principal] = {token_hash(t): p for t, p in (tokens or {}).items()}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._by_hash, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
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
            by_hash[digest] = Principal(name=name, role=entry["role"], operator=entry.get("operator"))
        self._by_hash, self._stamp = by_hash, stamp

    def lookup(self, token: str) -> Principal | None:
        with self._lock:
            self._reload()
            return self._by_hash.get(token_hash(token))

    def principals(self) -> list[Principal]:
        with self._lock:
            self._reload()
            return list(self._by_hash.values())


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
        # _bearer only documents the scheme in OpenAPI (the Authorize button on /docs); self.token reads it
        token = self.token(request)
        if token is None:
            raise HTTPException(401, "no token: send 'Authorization: Bearer <token>' (farebox token add)",
                                headers={"WWW-Authenticate": "Bearer"})
        principal = request.app.state.services.tokens.lookup(token)
        if principal is None:
            raise HTTPException(401, "unknown token: ask an admin for one (farebox token add)",
                                headers={"WWW-Authenticate": "Bearer"})
        if principal.role not in self.roles:
            raise HTTPException(403, f"role {principal.role} may not use this; it belongs to "
                                     f"{', '.join(self.roles)}")
        request.state.principal = principal
        return principal


class _PageOwners(_Owners):
    """As _Owners, for pages: the login cookie counts too. Pages only read; the cookie is SameSite=Strict, and the
    forms that will write (top-up, refund) must add a CSRF check of their own."""

    api = False

    def token(self, request: Request) -> str | None:
        return super().token(request) or request.cookies.get(COOKIE) or None


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

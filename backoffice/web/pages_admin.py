"""The admin's page of staff users: who holds a token, with which role (and, for a clerk or a partner, which bus
company), since and until when, revoked or not, and in which language their pages come.

``/admin/users`` lists the token file's entries and adds a user: the new token is shown on the answer to that form
once and is stored nowhere (only its SHA-256 goes into the file, as with ``farebox token add``). A clerk's or a
partner's operator must exist in the database. ``/admin/users/revoke`` ends every working token of a name (and every
page session opened with one, at once); ``/admin/users/lang`` keeps a user's language, applied at their next login.
Each form is a thin view over backoffice.web.auth (add_token, revoke_token, set_lang), the functions the CLI calls,
so a running ``farebox serve`` and the CLI see the same file. Admins only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from backoffice.web import auth, reads
from backoffice.web.csrf import Csrf, check_csrf, csrf_token
from backoffice.web.deps import Services, services
from backoffice.web.pages import render

router = APIRouter(include_in_schema=False)
Admin = Annotated[auth.Principal, Depends(auth.page_of())]  # admin only
Svc = Annotated[Services, Depends(services)]
DONE = {"revoked": ("已吊销", "Revoked"), "lang": ("已保存语言", "Language saved")}
NO_FILE = ("本服务器的令牌不在文件中，无法在此管理", "This server keeps its tokens in memory, not in a token file: "
           "nothing can be added or revoked here")


def _unchanged(e: Exception) -> tuple[str, str]:
    """The token file's refusal (its words name the file and the reason), for the page."""
    return (f"令牌文件未改动：{e}", str(e))


def _users(store: auth.TokenStore, now: datetime) -> list[dict]:
    """One row per token, newest first, each with its state: working, expired, revoked."""
    rows = []
    for e in reversed(store.entries()):
        if e.revoked_at is not None:
            state = "revoked"
        elif e.expires_at is not None and now >= e.expires_at:
            state = "expired"
        else:
            state = "working"
        rows.append({"name": e.principal.name, "role": e.principal.role, "operator": e.principal.operator,
                     "created_at": e.created_at, "expires_at": e.expires_at, "revoked_at": e.revoked_at,
                     "lang": e.lang, "state": state, "short": e.sha256[:8]})
    return rows


def _page(request: Request, who: auth.Principal, svc: Services, *, status: int = 200, error=None, done: str = "",
          new_token: str | None = None, new_name: str = "", form: dict | None = None) -> HTMLResponse:
    with svc.engine.connect() as conn:
        codes = [o["code"] for o in reads.registry_list(conn, kind="operators")]
    response = render(request, "admin_users.html", who, status=status, users=_users(svc.tokens, svc.tokens.clock()),
                      codes=codes, roles=auth.ROLES, langs=auth.LANGS, error=error, done=DONE.get(done),
                      new_token=new_token, new_name=new_name, form=form or {}, csrf=csrf_token(request),
                      has_file=svc.tokens.path is not None, max_days=auth.MAX_TOKEN_DAYS,
                      default_days=auth.DEFAULT_TOKEN_DAYS)
    response.headers["Cache-Control"] = "no-store"  # a new token is on it once; no cache keeps a copy
    return response


@router.get("/admin/users")
def admin_users(*, request: Request, done: str = "", who: Admin, svc: Svc) -> HTMLResponse:
    return _page(request, who, svc, done=done)


def _refusal(svc: Services, form: dict) -> tuple[str, str] | None:
    """What is wrong with the add form, in both languages, before the token file is touched."""
    name, role, operator = form["name"], form["role"], form["operator"]
    if svc.tokens.path is None:
        return NO_FILE
    if not name:
        return ("请填写姓名", "Give the user a name (who holds the token)")
    if role not in auth.ROLES:
        return ("请选择角色", f"Choose a role: {', '.join(auth.ROLES)}")
    if role in auth.OPERATOR_BOUND:  # a clerk, or a partner selling for one operator
        if not operator:
            if role == "partner":
                return ("合作方须指定公司", "A partner sells for one bus company: choose the operator")
            return ("公司文员须指定公司", "A clerk sees one bus company's data: choose the operator")
        with svc.engine.connect() as conn:
            if reads.registry_item(conn, kind="operators", key=operator) is None:
                return (f"公司 {operator} 不存在", f"There is no operator {operator!r}: add it first")
    try:
        days = float(form["days"])
    except ValueError:
        return ("有效天数应为数字", f"Days valid: a number from 1 to {auth.MAX_TOKEN_DAYS}")
    if not 0 < days <= auth.MAX_TOKEN_DAYS:
        return ("有效天数超出范围", f"Days valid: more than 0 and at most {auth.MAX_TOKEN_DAYS}")
    if form["lang"] not in auth.LANGS:
        return ("请选择语言", "Choose a language")
    now = svc.tokens.clock()
    if any(e.principal.name == name and e.valid_at(now) for e in svc.tokens.entries()):
        return (f"用户 {name} 已有有效令牌：请换个名字或先吊销", f"{name} already holds a working token: "
                "choose another name or revoke that one first")
    return None


@router.post("/admin/users")
def admin_add_user(*, request: Request, who: Admin, svc: Svc, csrf: Csrf = "",
                   name: Annotated[str, Form()] = "", role: Annotated[str, Form()] = "",
                   operator: Annotated[str, Form()] = "", days: Annotated[str, Form()] = "",
                   lang: Annotated[str, Form()] = "zh") -> Response:
    check_csrf(request, csrf)
    form = {"name": name.strip()[:80], "role": role, "operator": operator.strip() if role in auth.OPERATOR_BOUND else "",
            "days": days.strip() or str(auth.DEFAULT_TOKEN_DAYS), "lang": lang}
    refused = _refusal(svc, form)
    if refused is None:
        try:
            token = auth.add_token(svc.tokens.path, role=role, name=form["name"], operator=form["operator"] or None,
                                   days=float(form["days"]), lang=lang)
        except (auth.TokenFileError, OSError) as e:  # a name the CLI took just now; a file not to be written
            refused = _unchanged(e)
        else:
            return _page(request, who, svc, new_token=token, new_name=form["name"])
    return _page(request, who, svc, status=409, error=refused, form=form)


@router.post("/admin/users/revoke")
def admin_revoke_user(*, request: Request, who: Admin, svc: Svc, csrf: Csrf = "",
                      name: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf)
    if svc.tokens.path is None:
        return _page(request, who, svc, status=409, error=NO_FILE)
    if name == who.name:  # the page would lock out the one using it; the CLI can still do it on purpose
        return _page(request, who, svc, status=409, error=(
            "不能在此吊销自己的令牌", "You cannot revoke your own token here (farebox token revoke does)"))
    try:
        auth.revoke_token(svc.tokens.path, name=name)
    except (auth.TokenFileError, OSError) as e:
        return _page(request, who, svc, status=409, error=_unchanged(e))
    return RedirectResponse(f"/admin/users?done=revoked#user-{quote(name)}", status_code=303)


@router.post("/admin/users/lang")
def admin_user_lang(*, request: Request, who: Admin, svc: Svc, csrf: Csrf = "",
                    name: Annotated[str, Form()] = "", lang: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf)
    if svc.tokens.path is None:
        return _page(request, who, svc, status=409, error=NO_FILE)
    try:
        auth.set_lang(svc.tokens.path, name=name, lang=lang)
    except (auth.TokenFileError, OSError) as e:
        return _page(request, who, svc, status=409, error=_unchanged(e))
    return RedirectResponse("/admin/users?done=lang", status_code=303)

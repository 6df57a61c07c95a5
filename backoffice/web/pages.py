"""Server-rendered pages for clerks, operations and the mobile operator's counter staff (Jinja2, Chinese and English
labels, money in yuan with two decimals from integer fen).

The login form takes the same token the API uses and keeps it in an HttpOnly, SameSite=Strict cookie. A page asked
for without a login answers 401 with the login form; with a role that does not own it, 403 with the reason.
Top-up and refund forms come with the cards work (backoffice/cards/): their nav entries are left out until then.
"""

from __future__ import annotations

import functools
from datetime import date, datetime, timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import Connection
from starlette.exceptions import HTTPException as StarletteHTTPException

from backoffice import registry
from backoffice.settle import settle
from backoffice.web import lang, reads
from backoffice.web.api.clearing import settlement_pdf_bytes
from backoffice.web.deps import HERE, Services, connection, scoped, services
from backoffice.web.auth import COOKIE, Principal, page_of
from backoffice.web.api.types import ServiceDay
from clearing import money
from epurse.cardtypes import CardType

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")

# (path, Chinese, English, roles besides admin); the nav shows a person only what their role may open
NAV = (
    ("/dashboard", "概览", "Dashboard", ("clerk", "operations")),
    ("/registry/routes", "基础资料", "Registry", ("clerk", "operations")),
    ("/devices", "车载机", "Validators", ("clerk", "operations")),
    ("/quarantine", "隔离记录", "Quarantine", ("clerk", "operations")),
    ("/settlement", "结算", "Settlement", ("clerk",)),
    ("/cards", "卡片查询", "Card lookup", ("operator_staff",)),
    ("/topups", "充值", "Top-ups", ("operator_staff",)),
    ("/reconciliation", "对账", "Reconciliation", ("clerk",)),
    ("/manage/routes", "资料维护", "Manage registry", ("clerk", "operations")),
    ("/reports", "报表", "Reports", ("clerk",)),
    ("/admin/users", "用户", "Users", ()),
)
REGISTRY_LABELS = {
    "operators": ("公交公司", "Operators"),
    "routes": ("线路", "Routes"),
    "vehicles": ("车辆", "Vehicles"),
    "drivers": ("司机", "Drivers"),
    "devices": ("车载机", "Validators"),
}
ROLE_LABELS = {
    "clerk": ("公司文员", "clerk"),
    "operator_staff": ("营业厅", "counter staff"),
    "operations": ("运维", "operations"),
    "admin": ("管理员", "admin"),
}


# Integer fen as yuan with two decimals (-¥1,234.50; "-" when not known): clearing's one formatter.
yuan = functools.partial(money.yuan, symbol="¥")


def utc_time(value: datetime | None) -> str:
    return "-" if value is None else f"{reads.utc(value):%Y-%m-%d %H:%M:%S}"


def ago(seconds: int | None) -> str:
    if seconds is None:
        return "never 从未"
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def card_type(value: int | None) -> str:
    try:
        t = CardType(value)
    except ValueError:
        return str(value)
    return f"{t.label_zh} {t.label}"


templates.env.filters.update(yuan=yuan, utc=utc_time, ago=ago, card_type=card_type)
templates.env.globals.update(ROLE_LABELS=ROLE_LABELS, REGISTRY_LABELS=REGISTRY_LABELS)
lang.install(templates.env)


def render(request: Request, name: str, who: Principal | None, status: int = 200, **context) -> HTMLResponse:
    nav = [] if who is None else [n for n in NAV if who.role == "admin" or who.role in n[3]]
    context.setdefault("lang", lang.lang_of(request))
    return templates.TemplateResponse(request, name, {"who": who, "nav": nav, **context}, status_code=status)


# ------------------------------------------------------------------------------------------------ login
@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return render(request, "login.html", None, next=_local(next))


@router.post("/login")
def login(*, request: Request, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/") -> Response:
    principal = request.app.state.services.tokens.lookup(token.strip())
    if principal is None:
        return render(
            request,
            "login.html",
            None,
            status=401,
            next=_local(next),
            error=("令牌无效：请向管理员申请", "Unknown token: ask an admin for one (farebox token add)"),
        )
    svc: Services = request.app.state.services
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(
        COOKIE,
        svc.sessions.open(token.strip()),  # a session id: the token itself never goes into the cookie
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" if svc.secure_cookies is None else svc.secure_cookies,
        max_age=int(svc.sessions.lifetime.total_seconds()),
    )
    lang.at_login(response, svc.tokens, principal)  # the user's own language, wherever they log in
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """The session ends here, not only in this browser: a copy of the cookie is worthless from now on."""
    svc: Services = request.app.state.services
    cookie = request.cookies.get(COOKIE)
    if cookie and svc.sessions is not None:
        svc.sessions.end(cookie)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, httponly=True, samesite="strict")
    return response


@router.post("/lang")
def choose_language(*, request: Request, code: Annotated[str, Form()],
                    next: Annotated[str, Form()] = "/") -> Response:
    """The language switch in the header: kept for a year in this browser, and with the logged-in user."""
    if code not in lang.LANGS:
        raise HTTPException(400, f"language {code!r}: choose one of {', '.join(lang.LANGS)}")
    response = RedirectResponse(_local(next), status_code=303)
    lang.remember(request, response, code)
    return response


def _local(target: str) -> str:
    """Only paths on this site after login: ``next`` comes from the query string and must not send anyone away."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


@router.get("/")
def home(*, who: Annotated[Principal, Depends(page_of("clerk", "operator_staff", "operations"))]) -> Response:
    return RedirectResponse("/cards" if who.role == "operator_staff" else "/dashboard", status_code=303)


# ------------------------------------------------------------------------------------------------ pages
@router.get("/dashboard")
def dashboard(
    *,
    request: Request,
    who: Annotated[Principal, Depends(page_of("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> HTMLResponse:
    codes = (
        [who.operator] if who.operator else [o["code"] for o in reads.registry_list(conn, kind="operators")]
    )
    now = svc.clock()
    rows = [
        r
        for r in (reads.dashboard(conn, operator=c, now=now, stale_after=svc.stale_after) for c in codes)
        if r
    ]
    return render(request, "dashboard.html", who, rows=rows, now=now)


@router.get("/registry/{kind}")
def registry_page(
    *,
    request: Request,
    kind: str,
    who: Annotated[Principal, Depends(page_of("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
) -> HTMLResponse:
    if kind not in reads.REGISTRY:
        raise HTTPException(404, f"no registry list {kind!r}; there are {', '.join(reads.REGISTRY)}")
    rows = reads.registry_list(conn, kind=kind, operator=who.scope(None))
    return render(request, "registry.html", who, kind=kind, rows=rows, kinds=list(reads.REGISTRY))


@router.get("/quarantine")
def quarantine(
    *,
    request: Request,
    offset: Annotated[int, Query(ge=0)] = 0,
    who: Annotated[Principal, Depends(page_of("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
) -> HTMLResponse:
    rows, total = reads.quarantine(conn, operator=who.scope(None), limit=100, offset=offset)
    return render(request, "quarantine.html", who, rows=rows, total=total, offset=offset)


def _settlement_args(conn: Connection, svc: Services, who: Principal, operator: str | None, day: date | None):
    codes = [o["code"] for o in reads.registry_list(conn, kind="operators", operator=who.scope(None))]
    operator = operator or who.operator or (codes[0] if codes else None)
    if operator is None:
        raise HTTPException(404, "no operator is registered yet")
    scoped(who, operator)
    info = reads.operator_day(conn, operator=operator)
    if info is None:
        raise HTTPException(404, f"operator {operator!r} not found")
    if day is None:  # the last complete service day
        day = reads.current_service_day(svc.clock(), tz=info[1], cutoff_hour=info[2]) - timedelta(days=1)
    return operator, info, day, codes


@router.get("/settlement")
def settlement(
    *,
    request: Request,
    operator: str | None = None,
    day: ServiceDay | None = None,
    who: Annotated[Principal, Depends(page_of("clerk"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> HTMLResponse:
    operator, info, day, codes = _settlement_args(conn, svc, who, operator, day)
    result = settle(conn, operator=operator, day=day, now=svc.clock(), close_day=False)  # reading never clears
    s = result.settlement
    names = registry.names(conn, operator)
    tables = []
    for key, zh, en in (
        ("route", "按线路", "By route"),
        ("vehicle", "按车辆", "By vehicle"),
        ("driver", "按司机", "By driver"),
        ("card_type", "按卡类", "By card type"),
    ):
        frame = s.tables()[key]
        rows = []
        for k, taps, amount in frame[[key, "taps", "amount"]].itertuples(index=False):
            label = card_type(int(k)) if key == "card_type" else names.get(key, {}).get(k, "")
            rows.append({"key": k, "label": label, "taps": int(taps), "amount": int(amount)})
        tables.append({"key": key, "zh": zh, "en": en, "rows": rows})
    pdf = f"/settlement.pdf?operator={quote(operator)}&day={day.isoformat()}"
    return render(
        request,
        "settlement.html",
        who,
        operator=operator,
        operator_name=info[0],
        day=day,
        codes=codes,
        taps=s.taps,
        amount=s.amount,
        tables=tables,
        pdf=pdf,
        run=None if result.run is None else result.run.id,
        provisional=result.provisional,
    )


@router.get("/settlement.pdf")
def settlement_pdf(
    *,
    operator: str | None = None,
    day: ServiceDay | None = None,
    who: Annotated[Principal, Depends(page_of("clerk"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> Response:
    operator, _info, day, _codes = _settlement_args(conn, svc, who, operator, day)
    return Response(
        settlement_pdf_bytes(conn, who=who, operator=operator, day=day, now=svc.clock()),
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="settlement-{operator}-{day}.pdf"'},
    )


# ------------------------------------------------------------------------------------------------ errors
def install_error_pages(app) -> None:
    """API paths keep FastAPI's JSON errors; pages answer with a page: 401 the login form, others the reason."""

    @app.exception_handler(StarletteHTTPException)
    async def _page_errors(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if path.startswith(("/api/", "/docs", "/openapi", "/redoc", "/static/")):
            return await http_exception_handler(request, exc)
        if exc.status_code == 401:
            target = path + (f"?{request.url.query}" if request.url.query else "")
            return render(
                request, "login.html", None, status=401, next=_local(target), error=("请先登录", "Please log in")
            )
        return render(
            request,
            "error.html",
            getattr(request.state, "principal", None),
            status=exc.status_code,
            code=exc.status_code,
            detail=exc.detail,
        )

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
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import Connection, select
from starlette.exceptions import HTTPException as StarletteHTTPException

from backoffice import clearing_runs, day_lock, registry, signoff, taps_browser
from backoffice.models import ClearingRun as ClearingRunRow
from backoffice.settle import settle, stored_run_id, ticket_tables
from backoffice.web import lang, reads
from backoffice.web.downloads import CSV_LABELS, day_csv_tables
from backoffice.web.api import reports as reports_api
from backoffice.web.api.clearing import settlement_pdf_bytes
from backoffice.web.csrf import check_csrf, csrf_token
from backoffice.web.deps import HERE, Services, connection, scoped, services
from backoffice.web.auth import COOKIE, Principal, page_of
from backoffice.web.api.types import ServiceDay
from clearing import money
from clearing.service_day import day_bounds, local_time
from epurse.cardtypes import CardType

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")

# (path, Chinese, English, roles besides admin); the nav shows a person only what their role may open
NAV = (
    ("/dashboard", "概览", "Dashboard", ("clerk", "operations")),
    ("/taps", "刷卡记录", "Taps", ("clerk", "operations")),
    ("/registry/routes", "基础资料", "Registry", ("clerk", "operations")),
    ("/devices", "车载机", "Validators", ("clerk", "operations")),
    ("/denylist", "黑名单", "Deny list", ("clerk", "operations", "operator_staff")),
    ("/alarms", "告警", "Alarms", ("clerk", "operations")),
    ("/quarantine", "隔离记录", "Quarantine", ("clerk", "operations")),
    ("/settlement", "结算", "Settlement", ("clerk",)),
    ("/cards", "卡片查询", "Card lookup", ("operator_staff",)),
    ("/topups", "充值", "Top-ups", ("operator_staff",)),
    ("/tickets/redeem", "取票码兑换", "Pickup codes", ("operator_staff",)),
    ("/tickets/orders", "车票订单", "Ticket orders", ("operator_staff",)),
    ("/reconciliation", "对账", "Reconciliation", ("clerk",)),
    ("/manage/routes", "资料维护", "Manage registry", ("clerk", "operations")),
    ("/reports", "报表", "Reports", ("clerk",)),
    ("/tickets/report", "电子票报表", "Ticket report", ("clerk",)),
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
    "partner": ("合作方接口", "partner API"),
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
    day: str = "",
    who: Annotated[Principal, Depends(page_of("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> HTMLResponse:
    """Each operator's service day: by default the latest one with data (after a quiet night, not an empty
    today); the day picker chooses another. A day that has not begun says so."""
    chosen = _picked_day(day)
    codes = (
        [who.operator] if who.operator else [o["code"] for o in reads.registry_list(conn, kind="operators")]
    )
    now = svc.clock()
    rows = [
        r
        for r in (
            reads.dashboard(conn, operator=c, now=now, stale_after=svc.stale_after, day=chosen) for c in codes
        )
        if r
    ]
    shown = chosen or (rows[0]["day"] if rows else None)
    tz = rows[0]["tz"] if len(rows) == 1 else None
    return render(request, "dashboard.html", who, rows=rows, now=now, day=shown, chosen=chosen, tz=tz,
                  timedelta=timedelta)


def _picked_day(text: str) -> date | None:
    """A day typed in a day picker: YYYY-MM-DD within 2000..2099 (as the API's ServiceDay), "" for the default."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise HTTPException(422, ("日期格式为 YYYY-MM-DD", f"a day is YYYY-MM-DD, not {text[:40]!r}")) from None
    if not date(2000, 1, 1) <= day <= date(2099, 12, 31):
        raise HTTPException(422, ("运营日须在 2000-01-01 至 2099-12-31 之间", "a service day is 2000-01-01..2099-12-31"))
    return day


@router.get("/registry/{kind}")
def registry_page(
    *,
    request: Request,
    kind: str,
    who: Annotated[Principal, Depends(page_of("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
) -> HTMLResponse:
    if kind not in reads.REGISTRY:
        raise HTTPException(404, (f"没有“{kind}”这类资料；可查：{'、'.join(reads.REGISTRY)}",
                                  f"no registry list {kind!r}; there are {', '.join(reads.REGISTRY)}"))
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
    if day is None:  # the latest complete service day that has data (else the last complete one)
        yesterday = reads.current_service_day(svc.clock(), tz=info[1], cutoff_hour=info[2]) - timedelta(days=1)
        day = taps_browser.latest_day_with_data(
            conn, operator=operator, tz=info[1], cutoff_hour=info[2],
            now=day_bounds(yesterday, info[1], info[2])[0]) or yesterday
    return operator, info, day, codes


SETTLEMENT_TABLES = (("route", "按线路", "By route"), ("vehicle", "按车辆", "By vehicle"),
                     ("driver", "按司机", "By driver"))
CARD_TYPE_LABELS = {int(t): (t.label_zh, t.label) for t in CardType}
DONE = {"cleared": ("已清分：清分批次已保存", "Cleared: the clearing run is stored"),
        "checked": ("已重新核对：与保存的清分结果一致", "Checked again: the stored run gives the same figures"),
        "signed": ("已签核：本日已锁定", "Signed off: the day is locked")}


def _breakdown(run, settlement, key: str, names: dict) -> list[dict]:
    """A table's rows: the run's (gross, commission, net) when the day is cleared, else provisional gross."""
    rows = []
    if run is not None:
        for r in run.table(key).itertuples(index=False):
            k = getattr(r, key)
            rows.append({"key": k, "label": names.get(key, {}).get(k, ""), "taps": int(r.taps),
                         "gross": int(r.gross), "commission": int(r.commission), "net": int(r.net)})
    else:
        for k, taps, amount in settlement.tables()[key][[key, "taps", "amount"]].itertuples(index=False):
            rows.append({"key": k, "label": names.get(key, {}).get(k, ""), "taps": int(taps), "gross": int(amount),
                         "commission": None, "net": None})
    return sorted(rows, key=lambda r: str(r["key"]))


TICKET_TABLES = (("route", "按线路", "By route"), ("vehicle", "按车辆", "By vehicle"),
                 ("driver", "按司机", "By driver"), ("product", "按票种", "By product"),
                 ("channel", "按渠道", "By channel"), ("source", "按来源", "By source"))
TICKET_SOURCES = {"use": ("乘车使用", "rides"), "pass_day": ("通票按日", "pass days"),
                  "breakage": ("逾期未用", "breakage"), "refund": ("退票冲回", "refund taken back")}
TICKET_CHANNELS = {"web": ("网上商城", "web shop"), "sms": ("短信", "SMS"), "partner": ("小程序/合作方", "partner API"),
                   "counter": ("柜台", "counter")}


def _ticket_label(dim: str, key) -> tuple[str, str]:
    key = "" if key is None else str(key)
    if dim == "source":
        return TICKET_SOURCES.get(key, (key, key))
    if dim == "channel":
        return TICKET_CHANNELS.get(key, (key, key))
    return (key, key) if key else ("（无）", "(none)")


def _ticket_parts(conn: Connection, run, tz: str, cutoff: int) -> dict | None:
    """The cleared day's e-ticket figures (backoffice.settle.ticket_tables, the same the PDF and CSVs carry), in
    fen: revenue recognised by route ... source, late (earlier days), sales, outstanding; None before the day is
    cleared or when the operator sells no tickets. No issuer commission on tickets (clearing.tickets)."""
    if run is None:
        return None
    t = ticket_tables(conn, [run], tz, cutoff)
    if t is None:
        return None
    by = [{"key": dim, "zh": zh, "en": en,
           "rows": [{"key": str(k), "label": _ticket_label(dim, k), "taps": int(n), "gross": int(g)}
                    for k, n, g in t.by[dim][[dim, "taps", "gross"]].itertuples(index=False)]}
          for dim, zh, en in TICKET_TABLES]
    late = [{"for_day": d, "label": _ticket_label("source", src), "taps": int(n), "gross": int(g)}
            for d, src, n, g in t.late[["for_day", "source", "taps", "gross"]].itertuples(index=False)]
    sales = [{"product": r.product, "channel": _ticket_label("channel", r.channel), "tickets": int(r.tickets),
              "gross": int(r.gross), "refunded_tickets": int(r.refunded_tickets), "refunded": int(r.refunded),
              "net": int(r.net)} for r in t.sales.itertuples(index=False)]
    outstanding = [{"product": r.product, "tickets": int(r.tickets), "sold": int(r.sold),
                    "refunded": int(r.refunded), "recognised": int(r.recognised), "deferred": int(r.deferred)}
                   for r in t.outstanding.itertuples(index=False)]
    totals = dict(run.totals)
    return {"by": by, "late": late, "sales": sales, "outstanding": outstanding,
            "day_uses": int(totals.get("ticket_day_uses", 0)), "day_gross": int(totals.get("ticket_day_gross", 0)),
            "late_gross": int(totals.get("ticket_late_gross", 0)), "gross": int(totals.get("ticket_gross", 0)),
            "breakage": int(t.by["source"].loc[t.by["source"]["source"] == "breakage", "gross"].sum()),
            "deferred": sum(r["deferred"] for r in outstanding)}


def _settlement_page(request: Request, conn: Connection, svc: Services, who: Principal, operator: str, info,
                     day: date, codes: list[str], *, done: str = "", error=None, status: int = 200) -> HTMLResponse:
    name, tz, cutoff = info
    now = svc.clock()
    state = reads.day_state(day, now=now, tz=tz, cutoff_hour=cutoff)
    result = settle(conn, operator=operator, day=day, now=now, close_day=False)  # reading never clears
    s, run = result.settlement, result.run
    names = registry.names(conn, operator)
    tables = [{"key": key, "zh": zh, "en": en, "rows": _breakdown(run, s, key, names)}
              for key, zh, en in SETTLEMENT_TABLES]
    free = signoff.free_rides(conn, operator=operator, day=day, tz=tz, cutoff_hour=cutoff,
                              run_id=None if run is None else run.id)
    refused = signoff.refused(conn, operator=operator, day=day, tz=tz, cutoff_hour=cutoff)
    card_types = _breakdown(run, s, "card_type", {})
    for r in card_types:
        r["key"] = int(r["key"])
        r["label"] = CARD_TYPE_LABELS.get(r["key"], (str(r["key"]), str(r["key"])))
        r["free"] = free.get(r["key"], 0)
    if run is not None:
        rate = conn.execute(select(ClearingRunRow.rate_bp).where(ClearingRunRow.id == run.id)).scalar_one()
        totals = dict(run.totals)
        late = [{"for_day": r.for_day, "route": r.route, "label": names.get("route", {}).get(r.route, ""),
                 "taps": int(r.taps), "gross": int(r.gross), "net": int(r.net)}
                for r in run.table("route", "late").itertuples(index=False)]
        items = [{"item": r.item, "for_day": r.for_day, "net": int(r.net)}
                 for r in run.table("item", "reconciliation").itertuples(index=False)]
    else:
        rate = clearing_runs.rate_on(conn, operator, day)
        totals = {"day_taps": s.taps, "day_gross": s.amount}
        late, items = [], []
    previous = settle(conn, operator=operator, day=day - timedelta(days=1), now=now, close_day=False)
    compare = signoff.comparisons(conn, operator=operator, day=day)
    prev = {"taps": previous.settlement.taps, "gross": previous.settlement.amount,
            "net": None if previous.run is None else int(previous.run.totals["day_net"]),
            "run": None if previous.run is None else previous.run.id}
    mine = {"taps": totals["day_taps"], "gross": totals["day_gross"], "net": totals.get("day_net")}
    day_over_day = {k: signoff.change(mine[k], prev[k]) for k in ("taps", "gross", "net")}
    month_change = {k: signoff.change(compare["month_to_date"][k], compare["last_month"][k])
                    for k in ("taps", "gross", "net")}
    tickets = _ticket_parts(conn, run, tz, cutoff)
    index = reports_api.day_index(conn, op=reports_api.OperatorDay(operator, name, tz, cutoff), day=day)
    q = urlencode({"operator": operator, "day": day.isoformat()})
    downloads = {
        "pdf": f"/settlement.pdf?{q}", "xlsx": f"/reports/day?{q}&format=xlsx",
        "csv": [(t, f"/reports/day?{q}&format=csv&table={t}") for t in day_csv_tables(run, conn)],
        "month_pdf": f"/reports/month?operator={quote(operator)}&month={day:%Y-%m}&format=pdf",
        "month_xlsx": f"/reports/month?operator={quote(operator)}&month={day:%Y-%m}&format=xlsx",
        "taps_csv": f"/taps.csv?operator={quote(operator)}&first={day}&last={day}",
        "taps_xlsx": f"/taps.xlsx?operator={quote(operator)}&first={day}&last={day}",
        "vehicles": [(v, f"/reports/vehicle?{q}&vehicle={quote(v)}") for v in index["vehicles"]],
        "shifts": [(sh, f"/reports/shift?{q}&device_id={quote(sh['device_id'])}&shift_no={sh['shift_no']}")
                   for sh in index["shifts"]],
    }
    return render(
        request, "settlement.html", who, status=status, operator=operator, operator_name=name, tz=tz, day=day,
        codes=codes, state=state, run=run, provisional=result.provisional, totals=totals, rate_bp=rate,
        tables=tables, card_types=card_types, refused=refused, late=late, items=items, prev=prev,
        day_over_day=day_over_day, compare=compare, month_change=month_change,
        signed=day_lock.signed_off(conn, operator=operator, day=day), downloads=downloads, pdf=downloads["pdf"],
        done=DONE.get(done), error=error, csrf=csrf_token(request), timedelta=timedelta, CARD_TYPE_LABELS=CARD_TYPE_LABELS,
        CSV_LABELS=CSV_LABELS, tickets=tickets,
        day_end=day_bounds(day, tz, cutoff)[1])


@router.get("/settlement")
def settlement(
    *,
    request: Request,
    operator: str | None = None,
    day: ServiceDay | None = None,
    done: str = "",
    who: Annotated[Principal, Depends(page_of("clerk"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> HTMLResponse:
    operator, info, day, codes = _settlement_args(conn, svc, who, operator, day)
    return _settlement_page(request, conn, svc, who, operator, info, day, codes, done=done)


def _settlement_form(request: Request, svc: Services, who: Principal, operator: str, day: str, csrf: str):
    check_csrf(request, csrf)
    picked = _picked_day(day)
    if picked is None:
        raise HTTPException(422, ("请选择运营日", "choose a service day"))
    with svc.engine.connect() as conn:
        return _settlement_args(conn, svc, who, operator or None, picked)


def _refused(request, svc, who, operator, info, day, codes, error) -> HTMLResponse:
    with svc.engine.connect() as conn:
        return _settlement_page(request, conn, svc, who, operator, info, day, codes, error=error, status=409)


def _locked(svc: Services, operator: str, day: date, tz: str, e: Exception) -> tuple[str, str]:
    """The refusal of a clearing of a signed-off day, in the clerk's words and local time."""
    with svc.engine.connect() as conn:
        s = day_lock.signed_off(conn, operator=operator, day=day)
    if s is None:
        return str(e), str(e)
    at = local_time(s.approved_at, tz)
    return (f"{day} 已于 {at} 由 {s.approved_by} 签核（清分批次 {s.run_id}），本日已锁定，不再清分。"
            f"更正计入下一个清分批次：本日迟到的刷卡记录由下一日的清分作为迟到记录计入，对账调整亦然。",
            f"{day} was signed off by {s.approved_by} at {at} (clearing run {s.run_id}): the day is locked and is "
            "not cleared again. Corrections go into the next clearing run: late taps of this day are taken by the "
            "next day's clearing as late taps, and so are reconciliation adjustments.")


@router.post("/settlement/clear")
def settlement_clear(
    *,
    request: Request,
    operator: Annotated[str, Form()] = "",
    day: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    who: Annotated[Principal, Depends(page_of("clerk"))],
    svc: Annotated[Services, Depends(services)],
) -> Response:
    """Clear an ended service day now (as the nightly job would), or clear a cleared one again and check that it
    gives the stored figures. A signed-off day is refused: it is locked."""
    operator, info, day_, codes = _settlement_form(request, svc, who, operator, day, csrf)
    state = reads.day_state(day_, now=svc.clock(), tz=info[1], cutoff_hour=info[2])
    if state != "ended":
        why = (("本运营日尚未开始，不能清分", f"service day {day_} has not started: it cannot be cleared")
               if state == "future" else
               ("本运营日尚未结束，不能清分", f"service day {day_} is still running: it is cleared after it ends"))
        return _refused(request, svc, who, operator, info, day_, codes, why)
    try:
        with svc.engine.begin() as conn:
            existed = stored_run_id(conn, operator, day_) is not None
            result = settle(conn, operator=operator, day=day_, now=svc.clock())
    except day_lock.DayLocked as e:
        return _refused(request, svc, who, operator, info, day_, codes, _locked(svc, operator, day_, info[1], e))
    except (clearing_runs.ClearingMismatch, LookupError, ValueError) as e:
        return _refused(request, svc, who, operator, info, day_, codes, str(e))
    if result.run is None:
        return _refused(request, svc, who, operator, info, day_, codes, result.provisional)
    target = urlencode({"operator": operator, "day": day_.isoformat(), "done": "checked" if existed else "cleared"})
    return RedirectResponse(f"/settlement?{target}", status_code=303)


@router.post("/settlement/signoff")
def settlement_signoff(
    *,
    request: Request,
    operator: Annotated[str, Form()] = "",
    day: Annotated[str, Form()] = "",
    run_id: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    who: Annotated[Principal, Depends(page_of("clerk"))],
    svc: Annotated[Services, Depends(services)],
) -> Response:
    """Approve the day's stored clearing run, signed with the login's name; the day is locked from then on."""
    operator, info, day_, codes = _settlement_form(request, svc, who, operator, day, csrf)
    try:
        with svc.engine.begin() as conn:
            signoff.sign_off(conn, operator=operator, day=day_, by=who.name, now=svc.clock(),
                             run_id=int(run_id) if run_id.isdigit() else None)
    except (signoff.SignOffError, clearing_runs.ClearingMismatch) as e:
        return _refused(request, svc, who, operator, info, day_, codes, str(e))
    target = urlencode({"operator": operator, "day": day_.isoformat(), "done": "signed"})
    return RedirectResponse(f"/settlement?{target}", status_code=303)


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

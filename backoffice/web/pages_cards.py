"""Pages for the counter and the clerks' reconciliation: a card with its ledger, open cases and the loss / refund /
adjustment forms; over-the-air orders that need a person (retry / refund); the reconciliation work list with
accept / adjust / dispute and the issuer CSV upload. Each form is a thin view over the same use case the API calls.

Forms that write carry a CSRF field: a hash of the login token, which a page from another site cannot know (the
cookie is HttpOnly and SameSite=Strict besides). A request that brings its own bearer header cannot be forged by
a browser and needs none. Money typed in a form is yuan with at most two decimals, read into fen by integer
arithmetic; a refusal is shown on the same page with its reason.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection

from backoffice.cards import issuance, ledger, topup
from backoffice.web import reads
from backoffice.web.api.cards import ledger_view
from backoffice.web.api.ota import order_list, writing
from backoffice.web.api.reconcile import Decision, import_file, read_upload, resolve, work_list
from backoffice.web.deps import Services, connection, services
from backoffice.web.auth import Principal, page_of
from backoffice.web.csrf import Csrf, _check_csrf, csrf_token  # noqa: F401 (the forms' CSRF field, shared)
from backoffice.web.pages import render
from clearing.money import parse_yuan

router = APIRouter(include_in_schema=False)
CASE_LABELS = {"counter_jump": "计数器跳号 counter jump", "balance_mismatch": "余额不符 balance does not follow",
               "same_counter_different": "同号不同内容 same counter, other content",
               "load_unconfirmed": "圈存未确认 load unconfirmed", "counter_backwards": "计数器倒退 counter backwards"}
ORDER_LABELS = {"created": "待支付 awaiting payment", "paid": "已支付 paid", "authorized": "圈存中 loading",
                "unconfirmed": "未确认 unconfirmed", "loaded": "已圈存 loaded", "refunded": "已退款 refunded"}
RECON_LABELS = {"missing_in_file": "发卡方无记录 missing in the issuer's file",
                "missing_in_farebox": "本系统无记录 missing in farebox", "amount_differs": "金额不符 amount differs",
                "record_differs": "记录不符 record differs", "duplicate_in_file": "发卡方重复 duplicate in file",
                "duplicate_in_farebox": "本系统重复 duplicate in farebox"}


def to_fen(text: str) -> int:
    """'12.3' -> 1230, '-0.05' -> -5: yuan as typed, into fen without a float."""
    return parse_yuan(text, allow_negative=True)


def _back(url: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"{url}{'&' if '?' in url else '?'}done={quote(done)}", status_code=303)


def _attempt(svc: Services, fn) -> str | None:
    """Run one write; its refusal's words for the page, or None when it stood."""
    try:
        with writing(svc) as conn:
            fn(conn)
    except HTTPException as e:
        if e.status_code in (401, 403):
            raise
        detail = e.detail
        return detail["message"] if isinstance(detail, dict) else str(detail)
    return None


# ------------------------------------------------------------------------------------------------ a card
def _card_page(request: Request, who: Principal, conn: Connection, asn: str, *, error: str | None = None,
               status: int = 200, done: str = "") -> HTMLResponse:
    asn = asn.strip().lower()
    book = ledger_view(conn, asn)
    found = reads.card(conn, asn=asn)
    if book is None and found is None:
        raise HTTPException(404, f"查无此卡 No card {asn} and no record of it")
    return render(request, "card_ledger.html", who, status=status, asn=asn, card=found, book=book, error=error,
                  done=done, csrf=csrf_token(request), case_labels=CASE_LABELS)


@router.get("/cards/{asn}")
def card_page(*, request: Request, asn: str, done: str = "",
              who: Annotated[Principal, Depends(page_of("operator_staff"))],
              conn: Annotated[Connection, Depends(connection)]) -> HTMLResponse:
    return _card_page(request, who, conn, asn, done=done)


def _card_write(request, who, svc, asn, fn, done) -> Response:
    error = _attempt(svc, fn)
    if error is None:
        return _back(f"/cards/{asn.lower()}", done)
    with svc.engine.connect() as conn:
        return _card_page(request, who, conn, asn, error=error, status=409)


@router.post("/cards/{asn}/lost")
def card_lost(*, request: Request, asn: str, why: Annotated[str, Form()], csrf: Csrf = "",
              who: Annotated[Principal, Depends(page_of("operator_staff"))],
              svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)

    def lose(conn):
        try:
            issuance.report_lost(conn, asn=asn.lower(), who=who.name, why=why, now=svc.clock())
        except issuance.IssueError as e:
            raise ValueError(str(e)) from None

    return _card_write(request, who, svc, asn, lose, "lost")


@router.post("/cards/{asn}/adjust")
def card_adjust(*, request: Request, asn: str, amount: Annotated[str, Form()], why: Annotated[str, Form()],
                csrf: Csrf = "", who: Annotated[Principal, Depends(page_of("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)
    return _card_write(request, who, svc, asn, lambda conn: ledger.adjust(
        conn, asn=asn.lower(), amount=to_fen(amount), who=who.name, why=why, now=svc.clock()), "adjusted")


@router.post("/cards/{asn}/refund")
def card_refund(*, request: Request, asn: str, amount: Annotated[str, Form()], why: Annotated[str, Form()],
                csrf: Csrf = "", who: Annotated[Principal, Depends(page_of("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)
    return _card_write(request, who, svc, asn, lambda conn: ledger.refund_balance(
        conn, asn=asn.lower(), amount=to_fen(amount), who=who.name, why=why, now=svc.clock()), "refunded")


# ------------------------------------------------------------------------------------------------ top-ups
def _topups_page(request, who, svc, *, error=None, status=200, done="") -> HTMLResponse:
    with svc.engine.connect() as conn:
        orders = order_list(conn, now=svc.clock())
    return render(request, "topups.html", who, status=status, orders=orders, error=error, done=done,
                  csrf=csrf_token(request), labels=ORDER_LABELS)


@router.get("/topups")
def topups(*, request: Request, done: str = "", who: Annotated[Principal, Depends(page_of("operator_staff"))],
           svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    return _topups_page(request, who, svc, done=done)


def _order_write(request, who, svc, fn, done) -> Response:
    error = _attempt(svc, fn)
    if error is None:
        return _back("/topups", done)
    return _topups_page(request, who, svc, error=error, status=409)


@router.post("/topups/{order_id}/retry")
def topup_retry(*, request: Request, order_id: str, card_online_ttc: Annotated[int, Form(ge=0, le=0xFFFF)],
                why: Annotated[str, Form()], csrf: Csrf = "",
                who: Annotated[Principal, Depends(page_of("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)
    return _order_write(request, who, svc, lambda conn: topup.staff_retry(
        conn, order_id=order_id, card_online_ttc=card_online_ttc, who=who.name, why=why, now=svc.clock()),
        f"retry {order_id}")


@router.post("/topups/{order_id}/confirm")
def topup_confirm(*, request: Request, order_id: str, why: Annotated[str, Form()], csrf: Csrf = "",
                  who: Annotated[Principal, Depends(page_of("operator_staff"))],
                  svc: Annotated[Services, Depends(services)]) -> Response:
    """The issuer's file (or the card at the desk) shows the load: the unconfirmed order is settled as loaded."""
    _check_csrf(request, csrf)
    return _order_write(request, who, svc, lambda conn: topup.staff_confirm_loaded(
        conn, order_id=order_id, who=who.name, why=why, now=svc.clock()), f"confirm {order_id}")


@router.post("/topups/{order_id}/refund")
def topup_refund(*, request: Request, order_id: str, why: Annotated[str, Form()], csrf: Csrf = "",
                 who: Annotated[Principal, Depends(page_of("operator_staff"))],
                 svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)
    return _order_write(request, who, svc, lambda conn: topup.refund_order(
        conn, order_id=order_id, who=who.name, why=why, now=svc.clock()), f"refund {order_id}")


# ------------------------------------------------------------------------------------------------ reconciliation
def _operator(conn: Connection, who: Principal, operator: str | None) -> tuple[str, list[str]]:
    codes = [o["code"] for o in reads.registry_list(conn, kind="operators", operator=who.scope(None))]
    operator = operator or who.operator or (codes[0] if codes else None)
    if operator is None or operator not in codes:
        raise HTTPException(404, f"operator {operator!r} not found")
    return operator, codes


def _recon_page(request, who, svc, operator, status, *, error=None, code=200, done="") -> HTMLResponse:
    with svc.engine.connect() as conn:
        operator, codes = _operator(conn, who, operator)
        rows = work_list(conn, operator=operator, status=status or None)
        info = reads.operator_day(conn, operator=operator)
    yesterday = reads.current_service_day(svc.clock(), tz=info[1], cutoff_hour=info[2]) - timedelta(days=1)
    return render(request, "reconciliation.html", who, status=code, operator=operator, codes=codes, rows=rows,
                  filter=status, error=error, done=done, csrf=csrf_token(request), labels=RECON_LABELS,
                  day=yesterday)


@router.get("/reconciliation")
def reconciliation(*, request: Request, operator: str | None = None, status: str = "open", done: str = "",
                   who: Annotated[Principal, Depends(page_of("clerk"))],
                   svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    if status not in ("", "open", "accepted", "adjusted", "disputed"):
        raise HTTPException(422, f"no status {status!r}")
    return _recon_page(request, who, svc, operator, status, done=done)


def _recon_write(request, who, svc, operator, fn, done) -> Response:
    with svc.engine.connect() as conn:
        operator, _codes = _operator(conn, who, operator)
    error = _attempt(svc, lambda conn: fn(conn, operator))
    if error is None:
        return _back(f"/reconciliation?operator={quote(operator)}", done)
    return _recon_page(request, who, svc, operator, "open", error=error, code=409)


@router.post("/reconciliation/upload")
async def reconciliation_upload(*, request: Request, file: UploadFile, day: Annotated[date, Form()],
                                operator: Annotated[str, Form()] = "", csrf: Csrf = "",
                                who: Annotated[Principal, Depends(page_of("clerk"))],
                                svc: Annotated[Services, Depends(services)]) -> Response:
    from starlette.concurrency import run_in_threadpool

    _check_csrf(request, csrf)
    text = await read_upload(file)
    return await run_in_threadpool(_recon_write, request, who, svc, operator or None, lambda conn, op: import_file(
        conn, who=who, operator=op, day=day, text=text, now=svc.clock()), f"file {day}")


@router.post("/reconciliation/{item_id}")
def reconciliation_resolve(*, request: Request, item_id: int, decision: Annotated[str, Form()],
                           amount: Annotated[str, Form()] = "", note: Annotated[str, Form()] = "",
                           operator: Annotated[str, Form()] = "", csrf: Csrf = "",
                           who: Annotated[Principal, Depends(page_of("clerk"))],
                           svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)

    def decide(conn, op):
        if decision not in ("accepted", "adjusted", "disputed"):
            raise ValueError(f"no decision {decision!r}")
        adjustment = to_fen(amount) if decision == "adjusted" and amount.strip() else None
        resolve(conn, who=who, operator=op, item_id=item_id, now=svc.clock(),
                decision=Decision(status=decision, adjustment=adjustment, note=note[:500]))

    return _recon_write(request, who, svc, operator or None, decide, f"{decision} {item_id}")


@router.get("/cards")
def cards(
    *,
    request: Request,
    asn: str = "",
    who: Annotated[Principal, Depends(page_of("operator_staff"))],
    conn: Annotated[Connection, Depends(connection)],
) -> HTMLResponse:
    found = reads.card(conn, asn=asn) if asn.strip() else None
    return render(
        request,
        "card.html",
        who,
        asn=asn.strip(),
        card=found,
        status=404 if asn.strip() and found is None else 200,
    )

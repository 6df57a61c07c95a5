"""Pages for the counter and the clerks' reconciliation.

Counter staff: find a card (typed, or read from the desk reader), issue one (holder, proof), see its one balance
explained, top it up at the desk reader, report it lost after a confirmation naming card, holder and balance,
refund its frozen balance, adjust its book; follow over-the-air orders (list with states, one order's history)
and retry, confirm or refund them. Clerks: the reconciliation work list with accept / adjust / dispute and the
issuer CSV upload. Each form is a thin view over the same use case the API calls.

The desk reader is reached through the desk agent (``farebox desk``, farebox/desk.py) by the page's JavaScript
(static/desk.js); for a counter top-up the page relays the card's INITIALIZE FOR LOAD answer to
``POST /cards/{asn}/counter-loads`` and the card's TAC to ``POST /cards/counter-loads/{id}/tac`` (JSON, the login
cookie and the CSRF token in an ``X-CSRF`` header): the host's half of backoffice.cards.topup, as the API's
``/api/v1/cards/{asn}/counter-loads`` does for a program with a token.

Forms that write carry a CSRF field (backoffice/web/csrf.py). Money typed in a form is yuan with at most two
decimals, read into fen by integer arithmetic; a refusal is shown on the same page with its reason.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import Connection, select

from backoffice.cards import audit, issuance, ledger, topup
from backoffice.web import reads
from backoffice.web.api.cards import CounterLoadAsk, CounterTac, counter_authorize, counter_confirm, issuer_keys, \
    ledger_view
from backoffice.web.api.ota import order_list, writing
from backoffice.web.api.reconcile import Decision, import_file, read_upload, resolve, work_list
from backoffice.web.deps import Services, connection, services
from backoffice.web.auth import Principal, page_of
from backoffice.web.csrf import Csrf, _check_csrf, csrf_token  # noqa: F401 (the forms' CSRF field, shared)
from backoffice.web.pages import render
from clearing.money import parse_yuan
from epurse.cardtypes import CardType

router = APIRouter(include_in_schema=False)
CASE_LABELS = {"counter_jump": ("计数器跳号", "counter jump"), "balance_mismatch": ("余额不符", "balance does not follow"),
               "same_counter_different": ("同号不同内容", "same counter, other content"),
               "load_unconfirmed": ("圈存未确认", "load unconfirmed"),
               "counter_backwards": ("计数器倒退", "counter backwards")}
ORDER_LABELS = {"created": ("待支付", "awaiting payment"), "paid": ("已支付", "paid"),
                "authorized": ("圈存中", "loading"), "unconfirmed": ("未确认", "unconfirmed"),
                "loaded": ("已圈存", "loaded"), "refunded": ("已退款", "refunded")}
CARD_STATUS = {"active": ("正常", "active"), "lost": ("挂失", "lost"), "blocked": ("锁定", "blocked"),
               "fraud": ("欺诈", "fraud"), "unknown": ("未在本系统发卡", "not issued here")}
RECORD_KINDS = {"purchase": ("消费", "fare"), "denied": ("拒绝", "refused"), "shift_open": ("签到", "sign-in"),
                "shift_close": ("签退", "sign-out")}
ACTIONS = {"issue": ("发卡", "issued"), "report_lost": ("挂失", "reported lost"), "adjust": ("调账", "adjusted"),
           "refund_balance": ("退款", "refunded"), "authorize_load": ("授权圈存", "load authorised"),
           "load_confirmed": ("圈存确认", "load confirmed"), "void_load": ("圈存作废", "load void"),
           "order_created": ("下单", "order created"), "order_paid": ("已支付", "paid"),
           "staff_retry": ("人工重试", "retry by staff"), "staff_confirm": ("人工确认", "confirmed by staff"),
           "refund_order": ("订单退款", "order refunded"), "close_case": ("结案", "case closed")}
SOURCES = {"fare": ("车上刷卡", "a fare on a bus"), "counter": ("柜台圈存", "a counter top-up"),
           "ota": ("空中圈存", "an over-the-air top-up"), "issue": ("发卡时读卡", "the reading at issue")}
PROOF_KINDS = (("id_card", "身份证", "ID card"), ("student_id", "学生证", "student card"),
               ("senior_card", "老年证", "senior citizen card"), ("passport", "护照", "passport"),
               ("other", "其他", "other"))
RECON_LABELS = {"missing_in_file": ("发卡方无记录", "missing in the issuer's file"),
                "missing_in_farebox": ("本系统无记录", "missing in farebox"),
                "amount_differs": ("金额不符", "amount differs"), "record_differs": ("记录不符", "record differs"),
                "duplicate_in_file": ("发卡方重复", "duplicate in file"),
                "duplicate_in_farebox": ("本系统重复", "duplicate in farebox")}
LABELS = {"case_labels": CASE_LABELS, "order_labels": ORDER_LABELS, "card_status": CARD_STATUS,
          "record_kinds": RECORD_KINDS, "actions": ACTIONS, "sources": SOURCES}


def type_label(value: int | None) -> tuple[str, str]:
    try:
        t = CardType(value)
    except (TypeError, ValueError):
        return (str(value), str(value))
    return (t.label_zh, t.label)


def proof_label(proof: str | None) -> tuple[str, str] | None:
    """The proof shown at issue as (Chinese, English): it is kept as the issue form wrote it, the kind in English
    ("ID card 110101…"); a proof written otherwise (the CLI, the API) is shown as written."""
    if not proof:
        return None
    for _kind, zh, en in PROOF_KINDS:
        if proof == en or proof.startswith(en + " "):
            return zh + proof[len(en):], proof
    return proof, proof


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


# ------------------------------------------------------------------------------------------------ issue a card
@router.get("/cards/issue")
def issue_form(*, request: Request, who: Annotated[Principal, Depends(page_of("operator_staff"))]) -> HTMLResponse:
    return render(request, "card_issue.html", who, csrf=csrf_token(request), proof_kinds=PROOF_KINDS, form={},
                  error=None)


@router.post("/cards/issue")
async def issue(*, request: Request, who: Annotated[Principal, Depends(page_of("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> Response:
    """The card the desk reader read (the page filled the card's own facts into the form) recorded as issued,
    with the holder's name, the proof shown and the deposit typed by staff."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    _check_csrf(request, form.get("csrf", ""))
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_issue, request, who, svc, form)


def _issue(request, who, svc, form) -> Response:
    def refuse(zh: str, en: str) -> HTMLResponse:
        return render(request, "card_issue.html", who, status=409, csrf=csrf_token(request),
                      proof_kinds=PROOF_KINDS, form=form, error=(zh, en))

    if not form.get("asn"):
        return refuse("请先在读卡器上读卡", "Read the card at the desk reader first")
    holder = form.get("holder", "").strip()
    if not holder:
        return refuse("请填写持卡人姓名", "Type the holder's name")
    proof_kind = form.get("proof_kind", "")
    proof_no = form.get("proof_no", "").strip()
    kinds = {k: en for k, _zh, en in PROOF_KINDS}
    proof = f"{kinds.get(proof_kind, proof_kind)} {proof_no}".strip() if proof_no else ""
    try:
        deposit = parse_yuan(form.get("deposit", "") or "0")
        facts = issuance.CardFacts(
            asn=form["asn"].lower(), issuer=form.get("issuer", ""), card_type=int(form["card_type"]),
            algorithm=int(form["algorithm"]), valid_from=date.fromisoformat(form["valid_from"]),
            valid_to=date.fromisoformat(form["valid_to"]), balance=int(form["balance"]),
            purchase_ttc=int(form["purchase_ttc"]) if form.get("purchase_ttc") else None,
            load_ttc=int(form["load_ttc"]) if form.get("load_ttc") else None)
        if len(facts.asn) != 20 or any(c not in "0123456789abcdef" for c in facts.asn) or facts.balance < 0:
            raise ValueError(f"card number {facts.asn!r}")
        CardType(facts.card_type)  # a type this system knows (ValueError otherwise)
        if facts.algorithm not in (0, 4):
            raise ValueError(f"algorithm {facts.algorithm} (3DES 0 or SM4 4)")
    except (KeyError, ValueError) as e:
        return refuse(f"读卡结果或金额有误：{e}", f"The card's reading or an amount is wrong: {e}")
    try:
        with svc.engine.begin() as conn:
            issuance.issue_card(conn, card=facts, deposit=deposit, who=who.name, now=svc.clock(), proof=proof[:200],
                                holder=holder[:200])
    except issuance.IssueError as e:
        return refuse(f"未发卡：{e}", f"Not issued: {e}")
    return _back(f"/cards/{facts.asn}", "issued")


# ------------------------------------------------------------------------------------------------ a card
def _card_page(request: Request, who: Principal, conn: Connection, asn: str, *, error=None,
               status: int = 200, done: str = "", template: str = "card_ledger.html", **extra) -> HTMLResponse:
    asn = asn.strip().lower()
    book = ledger_view(conn, asn)
    found = reads.card(conn, asn=asn, named=True)
    if book is None and found is None:
        raise HTTPException(404, (f"查无此卡 {asn}", f"No card {asn} and no record of it"))
    card_type = book["card_type"] if book else found["card_type"]
    return render(request, template, who, status=status, asn=asn, card=found, book=book, error=error,
                  done=done, csrf=csrf_token(request), type_label=type_label(card_type),
                  proof=proof_label(book["proof"] if book else None),
                  balance=one_balance(book, found), **LABELS, **extra)


def one_balance(book: dict | None, found: dict | None) -> dict:
    """The one balance the card page shows, and what explains it.

    An issued card: the book balance (what the back office owes the holder), beside the balance the card itself
    last told (its newest fare or load, else its reading at issue). They differ while fares are on their way from
    buses that have not uploaded yet, or by staff adjustments (the book changes, the card does not); refunds of
    a lost card leave the chip as it was. A card not issued here has no book: its balance is the one it told in
    its latest fare."""
    if book is not None and book["issued"]:
        led = book["ledger"]
        seen = book["last_seen"]
        # what the card should hold by the book: the book plus what was refunded off the card's dead chip
        expected = led["balance"] + led["refunds"]
        diff = None if seen is None else seen["balance"] - expected
        return {"kind": "book", "amount": led["balance"], "seen": seen, "expected": expected, "diff": diff,
                "adjustments": led["adjustments"], "refunds": led["refunds"]}
    if found is not None and found["balance"] is not None:
        return {"kind": "card", "amount": found["balance"],
                "seen": {"balance": found["balance"], "at": found["balance_at"], "source": "fare"}, "diff": None}
    return {"kind": "none", "amount": None, "seen": None, "diff": None}


@router.get("/cards/{asn}")
def card_page(*, request: Request, asn: str, done: str = "",
              who: Annotated[Principal, Depends(page_of("operator_staff"))],
              conn: Annotated[Connection, Depends(connection)]) -> HTMLResponse:
    return _card_page(request, who, conn, asn, done=done)


@router.get("/cards")
def cards(*, request: Request, asn: str = "", who: Annotated[Principal, Depends(page_of("operator_staff"))],
          conn: Annotated[Connection, Depends(connection)]) -> HTMLResponse:
    """Find a card by its number (or read it at the desk reader: the page's script opens it)."""
    asn = asn.strip().lower()
    if not asn:
        return render(request, "card.html", who, asn="", csrf=csrf_token(request))
    if reads.card(conn, asn=asn) is None and ledger_view(conn, asn) is None:
        return render(request, "card.html", who, asn=asn, csrf=csrf_token(request), status=404)
    return _card_page(request, who, conn, asn)


def _card_write(request, who, svc, asn, fn, done) -> Response:
    error = _attempt(svc, fn)
    if error is None:
        return _back(f"/cards/{asn.lower()}", done)
    with svc.engine.connect() as conn:
        return _card_page(request, who, conn, asn, error=error, status=409)


@router.get("/cards/{asn}/lost")
def card_lost_confirm(*, request: Request, asn: str, who: Annotated[Principal, Depends(page_of("operator_staff"))],
                      conn: Annotated[Connection, Depends(connection)]) -> HTMLResponse:
    """Before a card goes on the deny list: the card, its holder and its balance, to be read to the caller."""
    return _card_page(request, who, conn, asn, template="card_lost.html")


@router.post("/cards/{asn}/lost")
def card_lost(*, request: Request, asn: str, why: Annotated[str, Form()], csrf: Csrf = "",
              confirmed: Annotated[str, Form()] = "",
              who: Annotated[Principal, Depends(page_of("operator_staff"))],
              svc: Annotated[Services, Depends(services)]) -> Response:
    """Report lost, from the confirmation page only (``confirmed=yes``); anything else goes to that page first."""
    _check_csrf(request, csrf)
    if confirmed != "yes":
        return RedirectResponse(f"/cards/{quote(asn.lower())}/lost", status_code=303)

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


# ------------------------------------------------------------------------------------------------ counter top-up
def _json(fn) -> JSONResponse:
    """The page's script gets JSON, refusals included (the error pages are HTML)."""
    try:
        return JSONResponse(fn())
    except HTTPException as e:
        return JSONResponse({"detail": e.detail}, status_code=e.status_code)


@router.post("/cards/{asn}/counter-loads")
def page_counter_load(*, request: Request, asn: str, body: CounterLoadAsk,
                      who: Annotated[Principal, Depends(page_of("operator_staff"))],
                      svc: Annotated[Services, Depends(services)]) -> JSONResponse:
    """The desk reader's INITIALIZE FOR LOAD answer, relayed by the page: the CREDIT FOR LOAD with MAC2."""
    _check_csrf(request, request.headers.get("x-csrf", ""))
    return _json(lambda: counter_authorize(svc, issuer_keys(request), asn=asn.lower(), body=body, who=who))


@router.post("/cards/counter-loads/{load_id}/tac")
def page_counter_tac(*, request: Request, load_id: int, body: CounterTac,
                     who: Annotated[Principal, Depends(page_of("operator_staff"))],
                     svc: Annotated[Services, Depends(services)]) -> JSONResponse:
    """The card's TAC, relayed by the page: the load verified and recorded."""
    _check_csrf(request, request.headers.get("x-csrf", ""))
    return _json(lambda: counter_confirm(svc, issuer_keys(request), load_id=load_id, body=body))


# ------------------------------------------------------------------------------------------------ top-ups
ORDER_FILTERS = ("", "needs_staff", "created", "paid", "authorized", "unconfirmed", "loaded", "refunded")


def _topups_page(request, who, svc, *, error=None, status=200, done="", state="", card="") -> HTMLResponse:
    with svc.engine.connect() as conn:
        orders = order_list(conn, now=svc.clock(), limit=1000)
    card = card.strip().lower()
    shown = [o for o in orders if (not state or (o["needs_staff"] if state == "needs_staff" else o["status"] == state))
             and (not card or card in o["asn"] or card in o["order_id"].lower())][:200]
    return render(request, "topups.html", who, status=status, orders=shown, total=len(orders), error=error,
                  done=done, csrf=csrf_token(request), labels=ORDER_LABELS, state=state, card=card,
                  filters=ORDER_FILTERS)


@router.get("/topups")
def topups(*, request: Request, done: str = "", state: str = "", card: str = "",
           who: Annotated[Principal, Depends(page_of("operator_staff"))],
           svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    if state not in ORDER_FILTERS:
        raise HTTPException(422, (f"无此状态 {state!r}", f"no state {state!r}"))
    return _topups_page(request, who, svc, done=done, state=state, card=card)


@router.get("/topups/{order_id}")
def topup_order(*, request: Request, order_id: str, done: str = "",
                who: Annotated[Principal, Depends(page_of("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    """One over-the-air order: its state, its loads (MAC2s given, at which card counter, what became of them) and
    its history, with the retry / confirm / refund its state allows."""
    return _order_page(request, who, svc, order_id, done=done)


def _order_page(request, who, svc, order_id, *, error=None, status=200, done="") -> HTMLResponse:
    from backoffice.models import CardLoad

    with svc.engine.connect() as conn:
        try:
            order = topup.get_order(conn, order_id=order_id)
        except topup.TopupRefused:
            raise HTTPException(404, (f"无此订单 {order_id}", f"No order {order_id}")) from None
        loads = conn.execute(select(CardLoad).where(CardLoad.order_id == order_id).order_by(CardLoad.id)).all()
        trail = audit.trail(conn, order_id=order_id)
        stuck = {o.order_id for o in topup.unconfirmed_orders(conn, now=svc.clock())}
    return render(request, "topup_order.html", who, status=status, order=order, loads=loads, trail=trail,
                  needs_staff=order.order_id in stuck, error=error, done=done, csrf=csrf_token(request),
                  labels=ORDER_LABELS, actions=ACTIONS)


def _order_write(request, who, svc, order_id, fn, done, back: str) -> Response:
    """``back``: "order" when the form was on the order's own page (the answer stays there), else the list."""
    error = _attempt(svc, fn)
    on_order = back == "order"
    if error is None:
        return _back(f"/topups/{quote(order_id)}" if on_order else "/topups", done)
    if on_order:
        return _order_page(request, who, svc, order_id, error=error, status=409)
    return _topups_page(request, who, svc, error=error, status=409)


@router.post("/topups/{order_id}/retry")
def topup_retry(*, request: Request, order_id: str, card_online_ttc: Annotated[int, Form(ge=0, le=0xFFFF)],
                why: Annotated[str, Form()], csrf: Csrf = "", back: Annotated[str, Form()] = "",
                who: Annotated[Principal, Depends(page_of("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)
    return _order_write(request, who, svc, order_id, lambda conn: topup.staff_retry(
        conn, order_id=order_id, card_online_ttc=card_online_ttc, who=who.name, why=why, now=svc.clock()),
        f"retry {order_id}", back)


@router.post("/topups/{order_id}/confirm")
def topup_confirm(*, request: Request, order_id: str, why: Annotated[str, Form()], csrf: Csrf = "",
                  back: Annotated[str, Form()] = "", who: Annotated[Principal, Depends(page_of("operator_staff"))],
                  svc: Annotated[Services, Depends(services)]) -> Response:
    """The issuer's file (or the card at the desk) shows the load: the unconfirmed order is settled as loaded."""
    _check_csrf(request, csrf)
    return _order_write(request, who, svc, order_id, lambda conn: topup.staff_confirm_loaded(
        conn, order_id=order_id, who=who.name, why=why, now=svc.clock()), f"confirm {order_id}", back)


@router.post("/topups/{order_id}/refund")
def topup_refund(*, request: Request, order_id: str, why: Annotated[str, Form()], csrf: Csrf = "",
                 back: Annotated[str, Form()] = "", who: Annotated[Principal, Depends(page_of("operator_staff"))],
                 svc: Annotated[Services, Depends(services)]) -> Response:
    _check_csrf(request, csrf)
    return _order_write(request, who, svc, order_id, lambda conn: topup.refund_order(
        conn, order_id=order_id, who=who.name, why=why, now=svc.clock()), f"refund {order_id}", back)


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

"""The quarantine review page for operations: one quarantined row with its record and the validator's PSAMs over
time, and the release and reject forms (clerks see the page, operations decide).

``/quarantine/{id}`` shows the row; its forms post to ``/quarantine/{id}/release`` and ``/quarantine/{id}/reject``,
thin views over the same calls the API makes (backoffice.quarantine, through backoffice.web.api.quarantine), signed
with the login's name. A release that still fails, or a row decided already, is shown on the same page with the
reason. The list is ``/quarantine`` (backoffice.web.pages).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection

from backoffice import quarantine
from backoffice.web.api import quarantine as api
from backoffice.web.auth import Principal, page_of
from backoffice.web.deps import Services, connection, services
from backoffice.web import reads
from backoffice.web.csrf import check_csrf as _check_csrf
from backoffice.web.csrf import csrf_token
from backoffice.web.pages import render, templates
from epurse.cardtypes import CardType

router = APIRouter(include_in_schema=False)
Reader = Annotated[Principal, Depends(page_of(*api.READERS))]
Decider = Annotated[Principal, Depends(page_of(*api.DECIDERS))]
# (Chinese, English): the pages show one with t(*label); the list page (backoffice.web.pages) uses them too
STATUS = {"open": ("待处理", "open"), "released": ("已放行", "released"), "rejected": ("已驳回", "rejected")}
DONE = {"released": ("已放行：记录已入库", "Released: the record is stored"),
        "rejected": ("已驳回：记录不会入库", "Rejected: nothing is stored"),
        "still": ("仍在隔离：复核未通过，原因见下", "Still quarantined: the checks failed again, the reason is below")}
SIGNED = {True: ("已验证", "verified"), False: ("无签名", "unsigned"),
          None: ("整包保存，放行时再验", "kept whole, checked again on release")}
RECORD = {"kind": ("类型", "kind"), "device_id": ("车载机", "device"), "device_seq": ("序号", "device seq"),
          "occurred_at": ("时间", "when"), "operator": ("公司", "operator"), "route": ("线路", "route"),
          "vehicle": ("车辆", "vehicle"), "driver": ("司机", "driver"), "shift_no": ("班次", "shift"),
          "card_asn": ("卡号", "card"), "card_type": ("卡类", "card type"), "card_ttc": ("卡计数器", "card counter"),
          "amount": ("金额", "amount"), "balance_after": ("余额", "balance after"), "full_fare": ("全价", "full fare"),
          "terminal_id": ("终端号", "terminal"), "terminal_seq": ("终端流水", "terminal seq"), "tac": ("TAC", "TAC"),
          "reason": ("原因", "reason"), "tx_type": ("交易类型", "transaction type"), "algorithm": ("算法", "algorithm"),
          "entry_stop": ("上车站", "entry stop"), "exit_stop": ("下车站", "exit stop"),
          "epoch": ("日志代次", "journal epoch"), "ticket_id": ("车票号", "ticket"),
          "ticket_use": ("使用次序", "ticket use no."), "presented": ("出示方式", "presented as")}
# a record's kind as people say it
RECORD_KINDS = {"purchase": ("消费", "fare"), "denied": ("拒绝", "refused"), "shift_open": ("签到", "sign-in"),
                "shift_close": ("签退", "sign-out"), "ticket_use": ("乘车码", "ticket use")}
CARD_TYPES = {int(c): (c.label_zh, c.label) for c in CardType}
templates.env.globals.update(QUARANTINE_STATUS=STATUS, QUARANTINE_DONE=DONE, QUARANTINE_SIGNED=SIGNED,
                             QUARANTINE_RECORD=RECORD, QUARANTINE_CARD_TYPES=CARD_TYPES,
                             QUARANTINE_KINDS=RECORD_KINDS)


def _page(request: Request, who: Principal, conn: Connection, quarantine_id: int, *, done: str = "",
          error: str | None = None, status: int = 200) -> HTMLResponse:
    try:
        row = quarantine.details(conn, quarantine_id, operator=who.scope(None))
    except quarantine.NotFound as e:
        raise HTTPException(404, (f"没有隔离记录 {quarantine_id}", str(e))) from None
    may_decide = who.role == "admin" or who.role in api.DECIDERS
    info = reads.operator_day(conn, operator=who.operator) if who.operator else None
    return render(request, "quarantine_item.html", who, status=status, row=row, done=done, error=error,
                  may_decide=may_decide, csrf=csrf_token(request), tz=info[1] if info else None)


@router.get("/quarantine/{quarantine_id}")
def quarantine_item(*, request: Request, quarantine_id: int, done: str = "", who: Reader,
                    conn: Annotated[Connection, Depends(connection)]) -> HTMLResponse:
    return _page(request, who, conn, quarantine_id, done=done)


async def _decide(request: Request, who: Principal, svc: Services, quarantine_id: int, decision: str) -> Response:
    from starlette.concurrency import run_in_threadpool

    form = dict(await request.form())
    _check_csrf(request, str(form.get("csrf", "")))
    why = str(form.get("why", "")).strip()[:400]

    def work() -> Response:
        with svc.engine.connect() as conn:  # a row that is not there is 404, whatever else
            try:
                quarantine.item(conn, quarantine_id, operator=who.scope(None))
            except quarantine.NotFound as e:
                raise HTTPException(404, (f"没有隔离记录 {quarantine_id}", str(e))) from None
        try:
            with svc.engine.begin() as conn:
                if decision == "release":
                    outcome = quarantine.release(conn, quarantine_id, by=who.name, why=why,
                                                 ingest=api.release_ingest(request), now=svc.clock(),
                                                 operator=who.scope(None))
                    done = "released" if outcome.released else "still"  # the page shows the reason found now
                else:
                    quarantine.reject(conn, quarantine_id, by=who.name, why=why, now=svc.clock(),
                                      operator=who.scope(None))
                    done = "rejected"
        except quarantine.NotFound as e:
            raise HTTPException(404, (f"没有隔离记录 {quarantine_id}", str(e))) from None
        except quarantine.QuarantineError as e:
            with svc.engine.connect() as conn:
                return _page(request, who, conn, quarantine_id, error=str(e), status=409)
        from urllib.parse import quote

        return RedirectResponse(f"/quarantine/{quarantine_id}?done={quote(done)}", status_code=303)

    return await run_in_threadpool(work)


@router.post("/quarantine/{quarantine_id}/release")
async def quarantine_release(*, request: Request, quarantine_id: int, who: Decider,
                             svc: Annotated[Services, Depends(services)]) -> Response:
    return await _decide(request, who, svc, quarantine_id, "release")


@router.post("/quarantine/{quarantine_id}/reject")
async def quarantine_reject(*, request: Request, quarantine_id: int, who: Decider,
                            svc: Annotated[Services, Depends(services)]) -> Response:
    return await _decide(request, who, svc, quarantine_id, "reject")

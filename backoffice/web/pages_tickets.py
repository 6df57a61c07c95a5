"""The station counter's page for pickup codes (issue 11): ``/tickets/redeem`` (role ``operator_staff``). Staff
choose the operator, type the rider's 16-digit code and the counter's name; the ticket is counted as used and its
paper ticket printed on the counter's printer (backoffice.tickets.redeem, the same use case as
``POST /api/v1/tickets/redeem``). Wrong codes count towards the same lockout as the API's; a refusal is shown on
the page with its reason. The form carries a CSRF field (backoffice/web/csrf.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from backoffice.models import Operator
from backoffice.tickets import redeem as counter
from backoffice.web.api.tickets_counter import redeem_for
from backoffice.web.auth import Principal, page_of
from backoffice.web.csrf import check_csrf, csrf_token
from backoffice.web.deps import Services, services
from backoffice.web.pages import render

router = APIRouter(include_in_schema=False)
STAFF = ("operator_staff",)


def _operators(svc: Services) -> list[tuple[str, str]]:
    with svc.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(Operator.code, Operator.name)
                                               .where(Operator.retired_at.is_(None)).order_by(Operator.code))]


def _page(request: Request, who: Principal, svc: Services, *, form: dict, status: int = 200, done=None,
          error=None) -> HTMLResponse:
    return render(request, "tickets_redeem.html", who, status=status, csrf=csrf_token(request),
                  operators=_operators(svc), form=form, done=done, error=error,
                  kind_names=counter.KIND_NAMES, tz=done.timezone if done else "Asia/Shanghai")


@router.get("/tickets/redeem")
def redeem_form(*, request: Request, who: Annotated[Principal, Depends(page_of(*STAFF))],
                svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    return _page(request, who, svc, form={})


@router.post("/tickets/redeem")
async def redeem(*, request: Request, who: Annotated[Principal, Depends(page_of(*STAFF))],
                 svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    form = {k: str(v) for k, v in (await request.form()).items()}
    check_csrf(request, form.get("csrf", ""))
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_redeem, request, who, svc, form)


def _redeem(request: Request, who: Principal, svc: Services, form: dict) -> HTMLResponse:
    keep = {"operator": form.get("operator", ""), "station": form.get("station", "")[:64]}
    try:
        done = redeem_for(request, svc, who, operator=keep["operator"][:32], code=form.get("code", "")[:40],
                          station=keep["station"])
    except counter.RedeemError as e:
        response = _page(request, who, svc, form=keep, status=e.status, error=(e.zh, e.message))
        if e.retry_after:
            response.headers["Retry-After"] = str(e.retry_after)
        return response
    return _page(request, who, svc, form=keep, done=done)

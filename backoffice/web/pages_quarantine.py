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
from backoffice.web.pages import render
from backoffice.web.pages_cards import _check_csrf, csrf_token

router = APIRouter(include_in_schema=False)
Reader = Annotated[Principal, Depends(page_of(*api.READERS))]
Decider = Annotated[Principal, Depends(page_of(*api.DECIDERS))]


def _page(request: Request, who: Principal, conn: Connection, quarantine_id: int, *, done: str = "",
          error: str | None = None, status: int = 200) -> HTMLResponse:
    try:
        row = quarantine.details(conn, quarantine_id, operator=who.scope(None))
    except quarantine.NotFound as e:
        raise HTTPException(404, str(e)) from None
    may_decide = who.role == "admin" or who.role in api.DECIDERS
    return render(request, "quarantine_item.html", who, status=status, row=row, done=done, error=error,
                  may_decide=may_decide, csrf=csrf_token(request))


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
                raise HTTPException(404, str(e)) from None
        try:
            with svc.engine.begin() as conn:
                if decision == "release":
                    outcome = quarantine.release(conn, quarantine_id, by=who.name, why=why,
                                                 ingest=api.release_ingest(request), now=svc.clock(),
                                                 operator=who.scope(None))
                    if not outcome.released:
                        done = f"still quarantined: {outcome.still_failing}"
                    else:
                        done = "released"
                else:
                    quarantine.reject(conn, quarantine_id, by=who.name, why=why, now=svc.clock(),
                                      operator=who.scope(None))
                    done = "rejected"
        except quarantine.NotFound as e:
            raise HTTPException(404, str(e)) from None
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

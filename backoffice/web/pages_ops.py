"""Pages for operations: the validators of the fleet (link, backlog, last heartbeat)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import Connection

from backoffice.web.api.devices import fleet_rows
from backoffice.web.auth import Principal, page_of
from backoffice.web.deps import Services, connection, services
from backoffice.web.pages import render

router = APIRouter(include_in_schema=False)


@router.get("/devices")
def devices(
    *,
    request: Request,
    who: Annotated[Principal, Depends(page_of("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> HTMLResponse:
    rows = fleet_rows(conn, operator=who.scope(None), svc=svc)
    return render(
        request,
        "devices.html",
        who,
        rows=rows,
        now=svc.clock(),
        stale_minutes=int(svc.stale_after.total_seconds() // 60),
    )

"""An operator's day: its taps (paginated), the settlement, the settlement PDF, and the dashboard figures."""

from __future__ import annotations

import tempfile
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from sqlalchemy import Connection

from backoffice.settle import settle
from backoffice.web import reads
from backoffice.web.deps import Services, connection, scoped, services
from backoffice.web.auth import Principal, owned_by
from backoffice.web.api.types import MAX_OFFSET, OperatorCode, ServiceDay

router = APIRouter(tags=["clearing"])
OWNERS = ("clerk",)
Kind = Literal["purchase", "shift_open", "shift_close", "denied"]


def _operator(conn: Connection, who: Principal, operator: str) -> tuple[str, str, int]:
    scoped(who, operator)
    info = reads.operator_day(conn, operator=operator)
    if info is None:
        raise HTTPException(404, f"operator {operator!r} not found")
    return info


@router.get("/operators/{operator}/days/{day}/taps")
def taps_of_day(
    *,
    operator: OperatorCode,
    day: ServiceDay,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    kind: Kind | None = None,
    who: Annotated[Principal, Depends(owned_by(*OWNERS))],
    conn: Annotated[Connection, Depends(connection)],
) -> dict:
    """The operator's records of one service day (local day from its cut-off hour), oldest first, a page at a
    time. Amounts in fen."""
    _name, tz, cutoff = _operator(conn, who, operator)
    items, total = reads.taps_of_day(
        conn, operator=operator, day=day, tz=tz, cutoff_hour=cutoff, limit=limit, offset=offset, kind=kind
    )
    following = offset + len(items)
    return {
        "operator": operator,
        "day": day,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": following if following < total else None,
        "items": items,
    }


def _table(frame, key: str) -> list[dict]:
    return [
        {key: k if key != "card_type" else int(k), "taps": int(t), "amount": int(a)}
        for k, t, a in frame[[key, "taps", "amount"]].itertuples(index=False)
    ]


@router.get("/operators/{operator}/days/{day}/settlement")
def settlement(
    *,
    operator: OperatorCode,
    day: ServiceDay,
    who: Annotated[Principal, Depends(owned_by(*OWNERS))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> dict:
    """The day's fare revenue by route, vehicle, driver and card type: the stored clearing run when the day has
    one, else provisional figures from the stored taps (``provisional`` says why). Amounts in fen. Reading never
    clears a day: that is the nightly job's (or ``farebox settle``'s)."""
    _operator(conn, who, operator)
    result = settle(conn, operator=operator, day=day, now=svc.clock(), close_day=False)
    s = result.settlement
    return {
        "run": None if result.run is None else result.run.id,
        "provisional": result.provisional,
        "operator": operator,
        "day": day,
        "taps": s.taps,
        "amount": s.amount,
        **{f"by_{key}": _table(frame, key) for key, frame in s.tables().items()},
    }


@router.get(
    "/operators/{operator}/days/{day}/settlement.pdf",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}}},
)
def settlement_pdf(
    *,
    operator: OperatorCode,
    day: ServiceDay,
    who: Annotated[Principal, Depends(owned_by(*OWNERS))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> Response:
    """The day's settlement report as the clerk prints it (A4 PDF, Chinese names embedded)."""
    return Response(
        settlement_pdf_bytes(conn, who=who, operator=operator, day=day, now=svc.clock()),
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="settlement-{operator}-{day}.pdf"'},
    )


def settlement_pdf_bytes(conn: Connection, *, who: Principal, operator: str, day: date, now: datetime) -> bytes:
    _operator(conn, who, operator)
    # Built on request into a private folder and handed over; the nightly job (clearing runs) keeps its own copies.
    with tempfile.TemporaryDirectory(prefix="farebox-pdf-") as folder:
        result = settle(conn, operator=operator, day=day, reports_dir=Path(folder), now=now, close_day=False)
        pdf = result.pdf
        return pdf.read_bytes()


@router.get("/dashboard")
def dashboard(
    *,
    operator: OperatorCode | None = None,
    day: ServiceDay | None = None,
    who: Annotated[Principal, Depends(owned_by("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> list[dict]:
    """Per operator (a clerk: their own): fares and revenue (fen) of a service day (default: the latest one with
    any record, up to today), its state (``future``, ``running``, ``ended``) and clearing run, validators online,
    offline, never heard and stale, quarantined records."""
    wanted = scoped(who, operator)
    codes = [wanted] if wanted else [o["code"] for o in reads.registry_list(conn, kind="operators")]
    now = svc.clock()
    rows = [reads.dashboard(conn, operator=code, now=now, stale_after=svc.stale_after, day=day) for code in codes]
    if wanted and rows[0] is None:
        raise HTTPException(404, f"operator {wanted!r} not found")
    return [r for r in rows if r is not None]

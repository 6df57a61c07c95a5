"""The clerk's reconciliation work list (backoffice.clearing_runs): items found by shift reconciliation and by the
card issuer's daily file, each accepted, adjusted (carried into the next clearing run) or disputed, signed with the
token's holder. A clerk sees and decides their own operator's items only; another operator's are "not found"."""

from __future__ import annotations

import math
from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, UploadFile
from pydantic import BaseModel, Field
from sqlalchemy import Connection, select

from backoffice import clearing_runs
from backoffice.models import ReconItem
from backoffice.web.api.ota import writing
from backoffice.web.deps import Services, connection, scoped, services
from backoffice.web.auth import Principal, owned_by
from backoffice.web.api.types import OperatorCode, Reason, RowId, ServiceDay, SignedFen

router = APIRouter(tags=["reconciliation"])
MAX_FILE = 50 * 1024 * 1024  # an issuer's day for a city is a few MB; anything far larger is a mistake


def _plain(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):  # numpy scalars -> Python ints
        return value.item()
    return value


def work_list(conn: Connection, *, operator: str, status: str | None) -> list[dict]:
    frame = clearing_runs.items(conn, operator=operator, status=status)
    out = []
    for rec in frame.to_dict("records"):
        row = {k: _plain(v) for k, v in rec.items()}
        row["suggested"] = (row["theirs"] or 0) - (row["ours"] or 0)
        out.append(row)
    return out


def _known_operator(conn: Connection, who: Principal, operator: str) -> str:
    from backoffice.web import reads

    scoped(who, operator)
    if reads.operator_day(conn, operator=operator) is None:
        raise HTTPException(404, f"operator {operator!r} not found")
    return operator


@router.get("/operators/{operator}/reconciliation")
def reconciliation(
    *,
    operator: OperatorCode,
    status: Annotated[Literal["open", "accepted", "adjusted", "disputed"] | None, Query()] = None,
    who: Annotated[Principal, Depends(owned_by("clerk"))],
    conn: Annotated[Connection, Depends(connection)],
) -> list[dict]:
    """The work list, oldest first (``status=open``: what still needs a decision). ``suggested`` is the signed fen
    that would bring the settlement to the other side's figure."""
    return work_list(conn, operator=_known_operator(conn, who, operator), status=status)


class Decision(BaseModel):
    status: Literal["accepted", "adjusted", "disputed"]
    adjustment: Annotated[SignedFen | None, Field(description="fen, a whole number, carried into the next run "
                                                              "(adjusted only); default: the item's suggestion")] = None
    note: Reason = ""


def resolve(conn: Connection, *, who: Principal, operator: str, item_id: int, decision: Decision, now) -> dict:
    _known_operator(conn, who, operator)
    owner = conn.execute(select(ReconItem.operator).where(ReconItem.id == item_id)).scalar()
    if owner != operator:  # another operator's item is as good as none
        raise LookupError(f"reconciliation item {item_id} not found for {operator}")
    clearing_runs.resolve_item(conn, item_id=item_id, status=decision.status, by=who.name, now=now,
                               adjustment=decision.adjustment if decision.status == "adjusted" else None,
                               note=decision.note)
    return next(r for r in work_list(conn, operator=operator, status=None) if r["id"] == item_id)


@router.post("/operators/{operator}/reconciliation/items/{item_id}")
def resolve_item(*, operator: OperatorCode, item_id: RowId, body: Decision,
                 who: Annotated[Principal, Depends(owned_by("clerk"))],
                 svc: Annotated[Services, Depends(services)]) -> dict:
    """Accept (our figure stands), adjust (carry ``adjustment`` fen into the next clearing run) or dispute an
    item; who decided comes from the token."""
    with writing(svc) as conn:
        return resolve(conn, who=who, operator=operator, item_id=item_id, decision=body, now=svc.clock())


async def read_upload(file: UploadFile) -> str:
    data = await file.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise HTTPException(413, f"the issuer file is larger than {MAX_FILE // 2**20} MB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HTTPException(422, "the issuer file must be UTF-8 text (CSV)") from None


def import_file(conn: Connection, *, who: Principal, operator: str, day: date, text: str, now) -> dict:
    _known_operator(conn, who, operator)
    if "\n" not in text:  # read_issuer_file takes a one-line string for a path: never let a request name a file
        text += "\n"
    found, new = clearing_runs.import_issuer_file(conn, operator=operator, day=day, source=text, now=now)
    return {"operator": operator, "day": day, "discrepancies": len(found), "new_items": new}


@router.post("/operators/{operator}/reconciliation/issuer-file")
async def upload_issuer_file(*, operator: OperatorCode, day: Annotated[ServiceDay, Query(description="the service day")],
                             file: UploadFile, who: Annotated[Principal, Depends(owned_by("clerk"))],
                             svc: Annotated[Services, Depends(services)]) -> dict:
    """The card issuer's daily CSV (clearing.reconcile.ISSUER_FILE_DOC) against the day's purchases: each
    discrepancy stored once as an open item."""
    from starlette.concurrency import run_in_threadpool

    text = await read_upload(file)

    def work():
        with writing(svc) as conn:
            return import_file(conn, who=who, operator=operator, day=day, text=text, now=svc.clock())

    return await run_in_threadpool(work)

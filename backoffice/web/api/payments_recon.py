"""Mobile-operator staff's payment reconciliation (backoffice.cards.payments_recon): the payment platform's daily
CSV uploaded against the over-the-air top-up orders, the items it found, and staff's decisions on them, signed
with the token's holder. Top-up orders belong to no bus operator, so the list is not scoped by one."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, UploadFile
from pydantic import BaseModel, Field
from sqlalchemy import Connection

from backoffice.cards import payments_recon
from backoffice.web.api.ota import writing
from backoffice.web.deps import Services, connection, services
from backoffice.web.auth import Principal, owned_by
from backoffice.web.api.types import Reason, RowId, ServiceDay

router = APIRouter(tags=["payment reconciliation"])
MAX_FILE = 20 * 1024 * 1024  # a platform's day of top-ups is well under a few MB; far larger is a mistake


async def read_upload(file: UploadFile) -> str:
    data = await file.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise HTTPException(413, f"the payment file is larger than {MAX_FILE // 2**20} MB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HTTPException(422, "the payment file must be UTF-8 text (CSV)") from None


def _out(item: dict) -> dict:
    item = dict(item)
    item["suggested"] = (item["theirs"] or 0) - (item["ours"] or 0)  # signed fen: + the platform holds more
    return item


@router.get("/payments/reconciliation")
def payment_items(
    *,
    status: Annotated[Literal["open", "accepted", "refunded", "retried", "disputed"] | None, Query()] = None,
    who: Annotated[Principal, Depends(owned_by("operator_staff"))],
    conn: Annotated[Connection, Depends(connection)],
) -> list[dict]:
    """The payment items, oldest first (``status=open``: what still needs someone)."""
    return [_out(i) for i in payments_recon.items(conn, status=status)]


@router.post("/payments/reconciliation")
async def upload_payment_file(*, day: Annotated[ServiceDay, Query(description="the day the platform's file covers")],
                              file: UploadFile, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                              svc: Annotated[Services, Depends(services)]) -> dict:
    """The payment platform's daily CSV (backoffice.cards.payments_recon.PAYMENT_FILE_DOC) against the day's
    top-up orders: each difference stored once as an open item. A bad line is refused (422) with its number and
    nothing is stored."""
    from starlette.concurrency import run_in_threadpool

    text = await read_upload(file)

    def work():
        with writing(svc) as conn:
            new = payments_recon.reconcile_payments_day(conn, day=day, platform_csv_text=text, now=svc.clock())
            return {"day": day, "uploaded_by": who.name,
                    "new_items": [{"order_id": i.ref, "problem": i.problem, "ours": i.ours, "theirs": i.theirs,
                                   "detail": i.detail} for i in new]}

    return await run_in_threadpool(work)


class Decision(BaseModel):
    status: Literal["accepted", "refunded", "retried", "disputed"]
    note: Reason = ""


@router.post("/payments/reconciliation/items/{item_id}")
def resolve_payment_item(*, item_id: RowId, body: Decision,
                         who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                         svc: Annotated[Services, Depends(services)]) -> dict:
    """Record staff's decision on an item (who decided comes from the token). The retry or refund itself is done
    on the top-up order (``/topups/orders/{order_id}/retry`` or ``/refund``)."""
    with writing(svc) as conn:
        return _out(payments_recon.resolve_payment_item(conn, item_id=item_id, status=body.status, by=who.name,
                                                        note=body.note, now=svc.clock()))

"""Quarantine review over HTTP: one row with its record and the validator's PSAMs, release, reject.

``GET /quarantine`` (backoffice.web.api.devices) lists rows as before; here:

- ``GET /quarantine/rows?status=open|released|rejected|all&device=&matching=`` the rows with their review state;
- ``GET /quarantine/{id}`` one row: the record it keeps, the reason, the registry's PSAMs of that validator;
- ``POST /quarantine/{id}/release`` ``{"why": ...}``: every ingest check again (backoffice.quarantine.release);
  200 with ``"released": true`` and the tap, or ``"released": false`` and the reason found now (the row stays
  open); 409 when the row was decided already;
- ``POST /quarantine/{id}/reject`` ``{"why": ...}``: closed for good; 409 when decided already.

Clerks and operations read (a clerk: their operator's validators only); operations decide, signed with the token's
name. A release needs the running ingest's configuration (issuer keys, device master, unsigned policy), given to
the app at start with :func:`configure_quarantine` (``farebox serve`` does); without it a release answers 503.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import Connection

from backoffice import quarantine
from backoffice.ingest import Ingest
from backoffice.web.auth import Principal, owned_by
from backoffice.web.deps import Services, connection, services
from backoffice.web.api.types import MAX_OFFSET, RowId, Text

router = APIRouter(tags=["quarantine"])
READERS = ("clerk", "operations")
DECIDERS = ("operations",)


class Decision(BaseModel):
    why: Annotated[Text(400, min_length=1), Field(description="the reason, for the audit trail")]


def configure_quarantine(app, *, ingest: Ingest) -> None:
    """Give the app the ingest a release runs records through (configured as the running ingest)."""
    app.state.quarantine_ingest = ingest


def release_ingest(request: Request) -> Ingest:
    ingest = getattr(request.app.state, "quarantine_ingest", None)
    if ingest is None:
        raise HTTPException(503, "quarantine release is not configured on this server (configure_quarantine): "
                                 "use `farebox quarantine release`")
    return ingest


def _view(item: quarantine.Item) -> dict:
    return item.as_dict()


@router.get("/quarantine/rows")
def rows(
    *,
    status: Literal["open", "released", "rejected", "all"] = "open",
    device: Annotated[Text(32) | None, Query()] = None,
    matching: Annotated[Text(200) | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    who: Annotated[Principal, Depends(owned_by(*READERS))],
    conn: Annotated[Connection, Depends(connection)],
) -> dict:
    """Quarantine rows with their review state, newest first."""
    found, total = quarantine.items(conn, status=None if status == "all" else status, operator=who.scope(None),
                                    device=device, matching=matching, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [_view(i) for i in found]}


@router.get("/quarantine/{quarantine_id}")
def row(
    quarantine_id: RowId,
    *,
    who: Annotated[Principal, Depends(owned_by(*READERS))],
    conn: Annotated[Connection, Depends(connection)],
) -> dict:
    """One row: the record it keeps (decoded), the reason, and the validator's PSAMs over time."""
    try:
        return quarantine.details(conn, quarantine_id, operator=who.scope(None))
    except quarantine.NotFound as e:
        raise HTTPException(404, str(e)) from None


def _decide(svc: Services, fn):
    with svc.engine.connect() as conn:
        trans = conn.begin()
        try:
            out = fn(conn)
        except quarantine.NotFound as e:
            trans.rollback()
            raise HTTPException(404, str(e)) from None
        except quarantine.QuarantineError as e:
            trans.rollback()
            raise HTTPException(409, {"reason": "quarantine_refused", "message": str(e)}) from None
        except BaseException:
            trans.rollback()
            raise
        trans.commit()
        return out


@router.post("/quarantine/{quarantine_id}/release")
def release(
    quarantine_id: RowId,
    body: Decision,
    *,
    request: Request,
    who: Annotated[Principal, Depends(owned_by(*DECIDERS))],
    svc: Annotated[Services, Depends(services)],
) -> dict:
    """Put the row's record through every ingest check again: stored once if it passes, else left open with the
    reason found now."""
    with svc.engine.connect() as conn:  # a row that is not there is 404, configured or not
        try:
            quarantine.item(conn, quarantine_id, operator=who.scope(None))
        except quarantine.NotFound as e:
            raise HTTPException(404, str(e)) from None
    ingest = release_ingest(request)
    outcome = _decide(svc, lambda conn: quarantine.release(conn, quarantine_id, by=who.name, why=body.why,
                                                           ingest=ingest, now=svc.clock(),
                                                           operator=who.scope(None)))
    return {"released": outcome.released, "stored": outcome.stored, "duplicates": outcome.duplicates,
            "still_failing": outcome.still_failing, "item": _view(outcome.item)}


@router.post("/quarantine/{quarantine_id}/reject")
def reject(
    quarantine_id: RowId,
    body: Decision,
    *,
    who: Annotated[Principal, Depends(owned_by(*DECIDERS))],
    svc: Annotated[Services, Depends(services)],
) -> dict:
    """Close the row for good: nothing is stored; who, when and why are kept."""
    return _view(_decide(svc, lambda conn: quarantine.reject(conn, quarantine_id, by=who.name, why=body.why,
                                                             now=svc.clock(), operator=who.scope(None))))

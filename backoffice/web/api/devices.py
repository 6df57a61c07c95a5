"""Validators in service (fleet status, stale flagged), the quarantine, and deny-list versions."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import Connection

from backoffice.denylist_publish import versions
from backoffice.devices import fleet_status
from backoffice.web import reads
from backoffice.web.deps import Services, connection, scoped, services
from backoffice.web.auth import Principal, owned_by
from backoffice.web.api.types import MAX_OFFSET, OperatorCode

router = APIRouter(tags=["devices"])


def fleet_rows(
    conn: Connection, *, operator: str | None, svc: Services, stale_after_minutes: float | None = None
) -> list[dict]:
    stale_after = svc.stale_after if stale_after_minutes is None else timedelta(minutes=stale_after_minutes)
    rows = fleet_status(conn, operator, svc.clock(), stale_after=stale_after)
    return [
        {
            **{f: getattr(r, f) for f in r.__dataclass_fields__ if f != "silent_for"},
            "alarms": list(r.alarms),
            "silent_seconds": None if r.silent_for is None else int(r.silent_for.total_seconds()),
        }
        for r in rows
    ]


@router.get("/fleet")
def fleet(
    *,
    operator: OperatorCode | None = None,
    stale_after_minutes: Annotated[float | None, Query(gt=0, le=525_600, description="at most a year")] = None,
    who: Annotated[Principal, Depends(owned_by("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
    svc: Annotated[Services, Depends(services)],
) -> list[dict]:
    """Every validator with what it last said (versions, backlog, alarms), flagged stale when silent longer than
    ``stale_after_minutes`` (default 5)."""
    return fleet_rows(conn, operator=scoped(who, operator), svc=svc, stale_after_minutes=stale_after_minutes)


@router.get("/quarantine")
def quarantine(
    *,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    who: Annotated[Principal, Depends(owned_by("clerk", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
) -> dict:
    """Records ingest refused, newest first, with the reason (a clerk: those of their operator's validators)."""
    items, total = reads.quarantine(conn, operator=who.scope(None), limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/denylist/versions")
def denylist_versions(
    *,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    who: Annotated[Principal, Depends(owned_by("operator_staff", "operations"))],
    conn: Annotated[Connection, Depends(connection)],
) -> list[dict]:
    """The published deny-list versions, newest first (the lists themselves go to buses, not here)."""
    return [
        {"version": v, "created_at": reads.utc(at), "count": n, "sha256": checksum, "bytes": size}
        for v, at, n, checksum, size in versions(conn, limit)
    ]

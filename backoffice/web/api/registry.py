"""Registry reads: operators, routes, vehicles, drivers, validators. A clerk sees their own operator's only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from sqlalchemy import Connection

from backoffice.web import reads
from backoffice.web.deps import connection, scoped
from backoffice.web.auth import Principal, owned_by
from backoffice.web.api.types import Code, OperatorCode

router = APIRouter(tags=["registry"])
OWNERS = ("clerk", "operations")
_SINGULAR = {
    "operators": "operator",
    "routes": "route",
    "vehicles": "vehicle",
    "drivers": "driver",
    "devices": "device",
}


def _list_view(kind: str):
    def view(
        *,
        operator: OperatorCode | None = None,
        who: Annotated[Principal, Depends(owned_by(*OWNERS))],
        conn: Annotated[Connection, Depends(connection)],
    ) -> list[dict]:
        return reads.registry_list(conn, kind=kind, operator=scoped(who, operator))

    view.__name__ = f"list_{kind}"
    view.__doc__ = f"Every registered {_SINGULAR[kind]} (of ``operator``; a clerk's own operator always)."
    return view


def _item_view(kind: str):
    def view(
        *,
        key: Code,
        who: Annotated[Principal, Depends(owned_by(*OWNERS))],
        conn: Annotated[Connection, Depends(connection)],
    ) -> dict:
        item = reads.registry_item(conn, kind=kind, key=key, operator=who.scope(None))
        if item is None:
            raise HTTPException(404, f"{_SINGULAR[kind]} {key!r} not found")
        return item

    view.__name__ = f"get_{_SINGULAR[kind]}"
    view.__doc__ = f"One {_SINGULAR[kind]} by its code; 404 when it does not exist or is another operator's."
    return view


for _kind in reads.REGISTRY:
    router.add_api_route(f"/{_kind}", _list_view(_kind), methods=["GET"])
    router.add_api_route(f"/{_kind}/{{key}}", _item_view(_kind), methods=["GET"])

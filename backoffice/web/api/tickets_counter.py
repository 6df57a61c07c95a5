"""The station counter redeems pickup codes (issue 11): ``POST /api/v1/tickets/redeem`` with ``{"operator",
"code", "station"?}`` (role ``operator_staff``). The code is checked and counted as the ticket's use, and the paper
ticket printed on the counter's ESC/POS printer (backoffice.tickets.redeem). Answers: 200 with the ticket (times
UTC with offset); 404 ``wrong_code`` (counted towards the lockout), 422 ``malformed_code`` (not 16 digits: not
counted), 409 ``used_up`` / ``not_valid_now``, 429 ``locked_out`` / ``rate_limited`` with Retry-After, 503
``printer_failed`` (nothing counted) / ``not_configured``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, StringConstraints

from backoffice.tickets import redeem as counter
from backoffice.web import shop_service
from backoffice.web.auth import Principal, owned_by
from backoffice.web.deps import Services, services

router = APIRouter(prefix="/tickets", tags=["tickets (station counter)"])
STAFF = ("operator_staff",)


class RedeemAsk(BaseModel):
    operator: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    code: Annotated[str, StringConstraints(min_length=1, max_length=40)]  # 16 digits; spaces and dashes allowed
    station: Annotated[str, StringConstraints(max_length=64)] = ""


def answer(r: counter.Redeemed) -> dict:
    return {"ticket_id": r.ticket_id, "use_no": r.use_no, "uses_allowed": r.uses_allowed, "operator": r.operator,
            "product": r.product, "kind": r.kind, "routes": list(r.routes), "valid_from": r.valid_from,
            "valid_to": r.valid_to, "order_id": r.order_id, "redeemed_at": r.at, "station": r.station,
            "printed": r.printed, "paper": r.paper}


def refused(e: counter.RedeemError) -> HTTPException:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return HTTPException(e.status, {"reason": e.code, "message": e.message, "zh": e.zh}, headers=headers)


def redeem_for(request: Request, svc: Services, who: Principal, *, operator: str, code: str,
               station: str) -> counter.Redeemed:
    """What the API and the page both call (raises RedeemError)."""
    cfg = counter.counter_config(request.app)
    return counter.redeem(svc.engine, operator=operator, code=code,
                          keys=shop_service.shop_config(request).ticket_keys, staff=who.name,
                          client=shop_service.client_of(request), station=station, guard=cfg.guard,
                          printer=cfg.printer, now=svc.clock())


@router.post("/redeem")
def redeem(*, body: RedeemAsk, request: Request, who: Annotated[Principal, Depends(owned_by(*STAFF))],
           svc: Annotated[Services, Depends(services)]) -> dict:
    """Redeem a pickup code at the counter: counted as the ticket's use, the paper ticket printed."""
    try:
        return answer(redeem_for(request, svc, who, operator=body.operator, code=body.code, station=body.station))
    except counter.RedeemError as e:
        raise refused(e) from None

"""Over-the-air top-up over HTTP: the rider's phone (through the mobile operator's OTA gateway) and the payment
platform reach the issuer host (backoffice.cards.ota_host.OtaHost) here.

Who may call what:

- ``POST /ota/webhook``: the payment platform. No bearer token: the Ed25519 signature in the
  ``X-Payment-Signature`` header (``t=<unix>,ed25519=<base64>`` over ``b"<t>." + body``, backoffice.cards.payments)
  is the authentication; a forged, stale or unconfigured signature is refused (401), a duplicate delivery is
  answered 200 with what the first did and changes nothing.
- ``POST /ota/orders``, ``GET /ota/orders/{id}``, ``POST /ota/orders/{id}/load``, ``POST /ota/orders/{id}/tac``,
  ``POST /ota/cards/{asn}/seen``: the phone's menu steps. A phone holds no back-office token: it talks to the
  mobile operator's OTA gateway (its own SIM channel and rider login), and the gateway relays each step here with
  its ``operator_staff`` token (``farebox token add --role operator_staff --name ota-gateway``). What a phone could
  forge does not matter to the money: a load needs the card's own MAC1 and only counts with the card's TAC.

Keys: the issuer key service and the platform's public key are set on the app with :func:`configure_ota`
(``farebox serve`` through farebox.bootstrap, and tests); until then the OTA endpoints answer 503.
``FAREBOX_PAYMENT_PUBLIC_KEY`` is the platform's key, 64 hex digits; unset, serve refuses to start, except with
``--insecure-test-keys`` (the published test platform's key, which only the simulator signs with). No key is ever
returned or logged.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import Connection, case, select

from backoffice.cards import topup
from backoffice.cards.ota_host import OtaHost
from backoffice.cards.ledger import RefundRefused
from backoffice.models import TopupOrder
from backoffice.web.deps import Services, services
from backoffice.web.auth import Principal, owned_by
from backoffice.web.api.types import FenUpTo, OrderId, Text
from epurse import apdu

log = logging.getLogger(__name__)
router = APIRouter(tags=["over-the-air top-up"])

# The public half of hardware_sim.payment.TEST_PLATFORM_SEED: published, so only ever for the simulated platform
# (tests/integration/test_web_cards.py checks the two stay the same).
TEST_PLATFORM_PUBLIC_KEY = "738cdf66d602af39dea3349193e44303ecd6a086d9d091ef8a7c2ccfdf183819"
SIGNATURE_HEADER = "X-Payment-Signature"
PUBLIC_KEY_ENV = "FAREBOX_PAYMENT_PUBLIC_KEY"

# refusal reason -> HTTP status: what does not exist 404; a bad signature 401; bad input 422; the rest conflicts
_STATUS = {"unknown_order": 404, "unknown_card": 404, "unknown_load": 404, "bad_signature": 401, "stale": 401,
           "not_configured": 503, "bad_request": 422, "bad_amount": 422, "bad_body": 422}


def refused(e: Exception) -> HTTPException:
    """A use case's refusal as an HTTP answer that carries its reason code and words."""
    if isinstance(e, topup.TopupRefused):
        return HTTPException(_STATUS.get(e.reason, 409), {"reason": e.reason, "message": str(e)})
    if isinstance(e, LookupError):
        return HTTPException(404, {"reason": "not_found", "message": str(e)})
    if isinstance(e, RefundRefused):
        return HTTPException(409, {"reason": "refund_refused", "message": str(e)})
    return HTTPException(422, {"reason": "bad_request", "message": str(e)})


REFUSALS = (topup.TopupRefused, LookupError, RefundRefused, ValueError, TypeError)


@contextlib.contextmanager
def writing(svc: Services) -> Iterator[Connection]:
    """One transaction for one write. A refusal that changed state on purpose (``TopupRefused.keep``: an order
    now unconfirmed, a case) is committed; any other refusal rolls back; both answer with their reason."""
    with svc.engine.connect() as conn:
        trans = conn.begin()
        try:
            yield conn
        except REFUSALS as e:
            (trans.commit if getattr(e, "keep", False) else trans.rollback)()
            raise refused(e) from None
        except BaseException:
            trans.rollback()
            raise
        trans.commit()


# ------------------------------------------------------------------------------------------------ configuration
def configure_ota(app, *, keys, webhook_key: bytes | None) -> None:
    """Give the app its issuer key service and the payment platform's Ed25519 public key (32 bytes)."""
    app.state.ota_keys = keys
    app.state.ota_webhook_key = webhook_key


def payment_public_key(text: str | None, *, insecure_test_key: bool = False) -> bytes:
    """The payment platform's Ed25519 public key from its 64-hex-digit setting. Unset: refused (anyone can sign with
    the published TEST platform's seed), unless ``insecure_test_key`` (the simulator's, for demos and tests)."""
    text = (text or "").strip()
    if not text:
        if not insecure_test_key:
            raise ValueError(f"{PUBLIC_KEY_ENV} is not set: give the payment platform's Ed25519 public key "
                             "(64 hex digits)")
        log.warning("payment webhooks checked with the published TEST platform key: simulator only (set %s)",
                    PUBLIC_KEY_ENV)
        return bytes.fromhex(TEST_PLATFORM_PUBLIC_KEY)
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError(f"{PUBLIC_KEY_ENV} must be the platform's Ed25519 public key, 64 hex digits")
    return bytes.fromhex(text)


def ota_host(request: Request) -> OtaHost:
    app = request.app
    if getattr(app.state, "ota_keys", None) is None:
        # farebox serve configures it at start (the wiring lives in farebox/, not here)
        raise HTTPException(503, "over-the-air top-up is not configured on this server (configure_ota)")
    svc = app.state.services
    return OtaHost(svc.engine, app.state.ota_keys, webhook_key=app.state.ota_webhook_key, clock=svc.clock)


def _host_call(fn, **kwargs):
    try:
        return fn(**kwargs)
    except topup.TopupRefused as e:
        raise refused(e) from None


def order_view(o: topup.Order) -> dict:
    return {"order_id": o.order_id, "asn": o.asn, "rider": o.rider, "amount": o.amount, "status": o.status,
            "created_at": o.created_at, "updated_at": o.updated_at, "payment_ref": o.payment_ref}


# ------------------------------------------------------------------------------------------------ the phone
Hex = Annotated[str, Field(pattern=r"^[0-9a-fA-F]*$")]


class NewOrder(BaseModel):
    asn: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{20}$", description="the SIM's ASN, 20 hex digits")]
    rider: Annotated[Text(64, min_length=1), Field(description="who asked, e.g. the phone number")]
    amount: Annotated[FenUpTo(100_000), Field(description="fen, a whole number (a JSON 30.00 is refused)")]


class LoadAsk(BaseModel):
    asn: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{20}$")]
    init_answer: Annotated[Hex, Field(min_length=32, max_length=32,
                                      description="the SIM's INITIALIZE FOR LOAD answer data, 16 bytes in hex")]
    terminal_id: Annotated[Hex, Field(min_length=12, max_length=12, description="6 bytes in hex")]
    log: list[Annotated[Hex, Field(min_length=46, max_length=46)]] | None = Field(
        None, description="the SIM's READ RECORD data (23 bytes each, newest first), when the phone read them")


class TacReport(BaseModel):
    tac: Annotated[Hex, Field(min_length=8, max_length=8, description="CREDIT FOR LOAD's TAC, 4 bytes in hex")]


class LoadProve(BaseModel):
    online_ttc: Annotated[int, Field(ge=0, le=0xFFFF, description="the load's online counter asked for")]
    answer: Annotated[Hex, Field(min_length=16, max_length=16, description="the SIM's answer to GET TRANSACTION "
                                                                           "PROVE (80 5A 00 02 02 + TTC): MAC2 || TAC")]


class CardSeen(BaseModel):
    online_ttc: Annotated[int, Field(ge=0, le=0xFFFF)]
    log: list[Annotated[Hex, Field(min_length=46, max_length=46)]] = Field(max_length=10)
    proofs: list[LoadProve] = Field(default_factory=list, max_length=10, description=(
        "the SIM's answers to GET TRANSACTION PROVE for its loads: the only thing a phone can relay that settles a "
        "load whose TAC was lost (the counter and the log can confirm a load, never void one)"))


@router.post("/ota/orders", status_code=201)
def create_order(*, body: NewOrder, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                 svc: Annotated[Services, Depends(services)]) -> dict:
    """A rider asks for a top-up in the phone menu: the order, waiting for its payment."""
    with writing(svc) as conn:
        order = topup.create_order(conn, asn=body.asn.lower(), rider=body.rider, amount=body.amount, now=svc.clock())
    return order_view(order)


@router.get("/ota/orders/{order_id}")
def get_order(*, order_id: OrderId, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
              svc: Annotated[Services, Depends(services)]) -> dict:
    with svc.engine.connect() as conn:
        try:
            return order_view(topup.get_order(conn, order_id=order_id))
        except topup.TopupRefused as e:
            raise refused(e) from None


@router.post("/ota/orders/{order_id}/load")
def load(*, order_id: OrderId, body: LoadAsk, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
         host: Annotated[OtaHost, Depends(ota_host)]) -> dict:
    """The phone relays its SIM's INITIALIZE FOR LOAD answer; the host answers MAC2 and the CREDIT FOR LOAD
    command the phone sends to the SIM. Asked again for the same card session (a lost answer), the same MAC2."""
    grant = _host_call(host.authorize, order_id=order_id, asn=body.asn.lower(),
                       init_answer=bytes.fromhex(body.init_answer), terminal_id=bytes.fromhex(body.terminal_id),
                       log=None if body.log is None else [bytes.fromhex(r) for r in body.log])
    return {"order_id": order_id, "load_id": grant.load_id, "date": grant.date4.hex(), "time": grant.time3.hex(),
            "mac2": grant.mac2.hex(), "credit_apdu": grant.credit_apdu().hex()}


@router.post("/ota/orders/{order_id}/tac")
def report_tac(*, order_id: OrderId, body: TacReport, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
               host: Annotated[OtaHost, Depends(ota_host)]) -> dict:
    """The phone reports the SIM's TAC: verified, the load recorded (a repeat is harmless)."""
    return order_view(_host_call(host.report, order_id=order_id, tac=bytes.fromhex(body.tac)))


@router.post("/ota/cards/{asn}/seen")
def card_seen(*, asn: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{20}$")], body: CardSeen,
              who: Annotated[Principal, Depends(owned_by("operator_staff"))],
              host: Annotated[OtaHost, Depends(ota_host)]) -> dict:
    """The phone is back and tells what its SIM says (online counter, log, transaction proofs): loads left open
    are settled as far as the card's own answers prove; the rest wait (see backoffice.cards.topup)."""
    try:
        settled = _host_call(host.card_seen, asn=asn.lower(), online_ttc=body.online_ttc,
                             log=[bytes.fromhex(r) for r in body.log],
                             proofs=[(p.online_ttc, bytes.fromhex(p.answer)) for p in body.proofs])
    except apdu.ResponseError as e:
        raise refused(ValueError(str(e))) from None
    return {"settled": {str(k): v for k, v in settled.items()}}


# ------------------------------------------------------------------------------------------------ the platform
@router.post("/ota/webhook")
async def payment_webhook(request: Request, signature: Annotated[str | None, Header(
        alias=SIGNATURE_HEADER, description="t=<unix seconds>,ed25519=<base64 signature of '<t>.' + body>")] = None
                          ) -> dict:
    """The payment platform's signed notification that an order was paid (no bearer token: the signature is the
    authentication). Duplicates answer what the first delivery did."""
    body = await request.body()
    if not signature:
        raise HTTPException(401, {"reason": "bad_signature", "message": f"no {SIGNATURE_HEADER} header"})
    host = ota_host(request)
    from starlette.concurrency import run_in_threadpool

    # backoffice.payments.notify: ticket and top-up orders, refunds (issue 11)
    outcome = await run_in_threadpool(_host_call, host.payment_webhook, body=body, signature=signature)
    return {"outcome": outcome}


# ------------------------------------------------------------------------------------------------ staff
def order_list(conn: Connection, *, now: datetime, limit: int = 200,
               grace: timedelta = timedelta(minutes=5)) -> list[dict]:
    """Orders for the counter: the ones needing a person first (paid, load unconfirmed: topup.unconfirmed_orders),
    then paid ones not loaded yet, then the newest of the rest."""
    stuck = [order_view(o) | {"needs_staff": True} for o in topup.unconfirmed_orders(conn, now=now, grace=grace)]
    seen = {o["order_id"] for o in stuck}
    t = TopupOrder.__table__
    rank = case((t.c.status == "paid", 0), else_=1)
    rest = conn.execute(select(t).order_by(rank, t.c.created_at.desc()).limit(limit)).all()
    others = [order_view(topup.Order(r.order_id, r.asn, r.rider, r.amount, r.status, r.created_at, r.updated_at,
                                     r.payment_ref)) | {"needs_staff": False}
              for r in rest if r.order_id not in seen]
    return (stuck + others)[:limit]


class StaffRetry(BaseModel):
    card_online_ttc: Annotated[int, Field(ge=0, le=0xFFFF, description="the online counter read from the card")]
    why: Text(500, min_length=1)


class StaffRefund(BaseModel):
    why: Text(500, min_length=1)


class StaffConfirm(BaseModel):
    why: Annotated[Text(500, min_length=1), Field(description="the evidence, e.g. the issuer's file line")]


@router.get("/topups/orders")
def orders(*, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
           svc: Annotated[Services, Depends(services)]) -> list[dict]:
    """Over-the-air orders, paid-but-unconfirmed first (``needs_staff``)."""
    with svc.engine.connect() as conn:
        return order_list(conn, now=svc.clock())


@router.post("/topups/orders/{order_id}/retry")
def staff_retry(*, order_id: OrderId, body: StaffRetry, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                svc: Annotated[Services, Depends(services)]) -> dict:
    """Let an unconfirmed order load again, when the card's online counter proves its MAC2 was never used."""
    with writing(svc) as conn:
        order = topup.staff_retry(conn, order_id=order_id, card_online_ttc=body.card_online_ttc, who=who.name,
                                  why=body.why, now=svc.clock())
    return order_view(order)


@router.post("/topups/orders/{order_id}/refund")
def staff_refund(*, order_id: OrderId, body: StaffRefund, who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                 svc: Annotated[Services, Depends(services)], request: Request) -> dict:
    """Pay a paid, unloaded order back (the platform pays it out: with a platform configured, through
    backoffice.payments exactly once; the answer carries the refund's state)."""
    platform = getattr(request.app.state, "payment_platform", None)
    if platform is not None:
        from backoffice.payments import service as payments_service

        try:
            row = payments_service.refund(svc.engine, platform, order_id=order_id, who=who.name, why=body.why,
                                          now=svc.clock())
        except payments_service.RefundError as e:
            raise HTTPException(404 if e.code == "unknown_order" else 409, {"reason": e.code, "message": str(e)})
        with svc.engine.connect() as conn:
            return order_view(topup.get_order(conn, order_id=order_id)) | {
                "refund": {k: row[k] for k in ("refund_id", "amount", "state", "attempts")}}
    with writing(svc) as conn:
        order = topup.refund_order(conn, order_id=order_id, who=who.name, why=body.why, now=svc.clock())
    return order_view(order)


@router.post("/topups/orders/{order_id}/confirm")
def staff_confirm(*, order_id: OrderId, body: StaffConfirm,
                  who: Annotated[Principal, Depends(owned_by("operator_staff"))],
                  svc: Annotated[Services, Depends(services)]) -> dict:
    """Settle an unconfirmed order as loaded, when the issuer's file (or the card at the desk) shows the load."""
    with writing(svc) as conn:
        order = topup.staff_confirm_loaded(conn, order_id=order_id, who=who.name, why=body.why, now=svc.clock())
    return order_view(order)

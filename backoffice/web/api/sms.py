"""The SMS gateway's webhook: riders' texts reach the command dialogue (backoffice.sms.dialogue) here.

``POST /sms/inbound``: the SMS gateway only. No bearer token: the HMAC-SHA256 signature in ``X-Sms-Signature``
(``t=<unix>,hmac-sha256=<hex>`` over ``b"<t>." + body`` with the gateway's shared secret, backoffice.sms.gateway)
is the authentication; a forged, stale or unsigned message is refused (401; also while no secret is configured,
reason ``not_configured``), a malformed one 422. A message id seen before is answered 200
``{"outcome": "duplicate"}`` and changes nothing.

Wiring: ``configure_sms_channel(app, ...)`` gives the gateway, the secret, the ticket keys, the payment platform and
the notify URL, and starts the sweep (pickup codes after payment, lapsed quotes) unless ``sweep_every=None``.
``farebox serve`` calls it with the one gateway made from the settings (``sms_url`` ...; farebox.serve) and no
sweep thread: its scheduler sweeps this same channel (farebox.sms_cmd). Unconfigured (a bare app), the channel is
made on first use from the settings (backoffice.sms.gateway.gateway_from_env / secret_from_env,
backoffice.payments.platform.platform_from_env with the key ``configure_ota`` gave, ``FAREBOX_PAYMENT_NOTIFY_URL``)
and the web shop's wiring (``app.state.shop``: ticket keys).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request

from backoffice.sms.dialogue import Channel, SweepThread, handle_inbound
from backoffice.sms.gateway import SIGNATURE_HEADER, InboundRefused, app_gateway, app_secret, verify_inbound

router = APIRouter(tags=["SMS channel"])
# no secret configured: nothing can prove a message is the gateway's, so it is refused as unsigned (401, reason
# not_configured) rather than 503: a sender cannot tell a server without SMS from one that refuses it
_STATUS = {"bad_signature": 401, "stale": 401, "not_configured": 401, "bad_body": 422}


def configure_sms_channel(app, *, gateway, secret: bytes | None, ticket_keys=None, platform=None,
                          notify_url: str = "", operator: str | None = None, sweep_every: float | None = 2.0
                          ) -> Channel:
    """The app's SMS channel; with ``sweep_every`` a SweepThread runs (``app.state.sms_sweep.stop()`` ends it)."""
    svc = app.state.services
    ch = Channel(svc.engine, gateway, ticket_keys=ticket_keys, platform=platform, notify_url=notify_url,
                 operator=operator, clock=svc.clock)
    app.state.sms_gateway, app.state.sms_secret, app.state.sms_channel = gateway, secret, ch
    if sweep_every:
        app.state.sms_sweep = SweepThread(ch, sweep_every).start()
    return ch


def sms_channel(app) -> Channel:
    ch = getattr(app.state, "sms_channel", None)
    if ch is None:
        import os

        from backoffice.payments.platform import NOTIFY_URL_ENV, platform_from_env

        svc, shop = app.state.services, getattr(app.state, "shop", None)
        platform = getattr(shop, "platform", None)
        key = getattr(app.state, "ota_webhook_key", None)  # the platform's public key (configure_ota)
        if platform is None and key is not None:
            platform = platform_from_env(key)
        ch = app.state.sms_channel = Channel(
            svc.engine, app_gateway(app), ticket_keys=getattr(shop, "ticket_keys", None), platform=platform,
            notify_url=getattr(shop, "notify_url", "") or os.environ.get(NOTIFY_URL_ENV, ""), clock=svc.clock)
    return ch


@router.post("/sms/inbound")
async def sms_inbound(request: Request, signature: Annotated[str | None, Header(
        alias=SIGNATURE_HEADER, description="t=<unix seconds>,hmac-sha256=<hex HMAC of '<t>.' + body>")] = None
                      ) -> dict:
    """A rider's text from the SMS gateway (signed; no bearer token). Duplicates change nothing."""
    from starlette.concurrency import run_in_threadpool

    body = await request.body()
    ch = sms_channel(request.app)
    try:
        msg = verify_inbound(body, signature or "", app_secret(request.app), now=ch.clock())
    except InboundRefused as e:
        raise HTTPException(_STATUS.get(e.reason, 401), {"reason": e.reason, "message": str(e)}) from None
    outcome = await run_in_threadpool(handle_inbound, ch, msg)
    return {"outcome": outcome}

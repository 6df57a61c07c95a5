"""The payment platform as farebox calls it: an adapter interface and its HTTP implementation.

What farebox asks of a platform (``Platform``): create a payment for an order, query an order (the job that settles
orders whose notification never came), refund with an idempotency key (the refund id, resent unchanged on every
retry), verify a notification, and fetch the daily statement.

The HTTP protocol (what ``hardware_sim.payment.PlatformSimulator`` serves, and a real platform's gateway must be
adapted to), JSON over HTTP, every message signed both ways:

- farebox -> platform: headers ``X-Merchant-Id`` and ``X-Merchant-Signature: t=<unix>,hmac-sha256=<hex>``, the
  HMAC-SHA256 with the merchant's secret over ``b"<t>.<METHOD> <path>." + body``. Endpoints:
  ``POST /v1/payments`` ``{"order_id", "amount" (fen), "description", "notify_url"}`` (the same order again
  answers the same payment); ``GET /v1/payments/<order_id>`` -> ``{"order_id", "amount", "status": created | paid
  | refunded, "payment_ref", "paid_at"}`` (404 ``unknown_order``); ``POST /v1/refunds`` ``{"refund_id", "order_id",
  "payment_ref", "amount", "reason"}`` -> ``{"refund_id", "status": "succeeded", "refund_ref", "amount"}`` (the same
  refund id again: the same answer, no second refund; 409 ``refund_refused`` when it cannot be made);
  ``GET /v1/statements/<YYYY-MM-DD>`` -> the day's file, CSV (``STATEMENT_DOC``).
- platform -> farebox: every answer carries ``X-Payment-Signature: t=<unix>,ed25519=<base64>`` over
  ``b"<t>." + body`` with the platform's Ed25519 key (the webhook's format, backoffice.cards.payments); an answer
  whose signature does not verify is ``BadAnswer``, never trusted. Notifications arrive at ``POST /api/v1/ota/webhook``.

Errors a caller catches by meaning: ``PlatformUnavailable`` (no answer: connection lost, timeout, 5xx; the work may
or may not have been done, so the caller retries with the same idempotency key or queries), ``PlatformRefused``
(the platform answered no, with its reason code), ``BadAnswer`` (an answer that is not what the protocol says).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_HEADER = "X-Payment-Signature"
MERCHANT_HEADER = "X-Merchant-Id"
MERCHANT_SIGNATURE_HEADER = "X-Merchant-Signature"
TOLERANCE = timedelta(minutes=5)
STATEMENT_COLUMNS = ("kind", "order_id", "ref", "amount", "fee", "at")
STATEMENT_DOC = """The platform's daily statement: CSV, UTF-8, one header line naming exactly these columns, one line
per payment collected or refund paid out in the platform's day (its local midnight to midnight, Asia/Shanghai):

| column | meaning |
|---|---|
| kind | ``payment`` or ``refund`` |
| order_id | farebox's order id (ticket order or over-the-air top-up), at most 40 characters |
| ref | payment: the platform's payment reference; refund: farebox's refund id (the idempotency key) |
| amount | fen, a positive whole number |
| fee | fen the platform keeps (payments); 0 on refunds |
| at | when, ISO 8601 UTC ending in Z |
"""


class PlatformError(Exception):
    pass


class PlatformUnavailable(PlatformError):
    """No answer came (lost, timed out, 5xx): whether the platform did the work is unknown; retry idempotently."""


class PlatformRefused(PlatformError):
    def __init__(self, reason: str, message: str, status: int = 409):
        super().__init__(message)
        self.reason = reason
        self.status = status


class BadAnswer(PlatformError):
    """An answer that does not verify or is not what the protocol says."""


@dataclass(frozen=True)
class Payment:
    order_id: str
    amount: int
    status: str  # created | paid | refunded
    payment_ref: str | None = None
    paid_at: datetime | None = None
    pay_url: str | None = None


@dataclass(frozen=True)
class RefundAnswer:
    refund_id: str
    status: str  # succeeded
    refund_ref: str
    amount: int


class Platform(Protocol):
    def create_payment(self, *, order_id: str, amount: int, description: str, notify_url: str) -> Payment: ...
    def query_order(self, order_id: str) -> Payment | None: ...  # None: the platform has no such order
    def refund(self, *, refund_id: str, order_id: str, payment_ref: str, amount: int, reason: str
               ) -> RefundAnswer: ...
    def verify_notification(self, body: bytes, signature: str, *, now: datetime) -> dict: ...
    def daily_statement(self, day: date) -> str: ...


def verify_signed(body: bytes, signature: str, public_key: bytes, *, now: datetime) -> None:
    """BadAnswer unless ``signature`` (``t=..,ed25519=..``) is the platform's over ``<t>.`` + body and fresh."""
    try:
        fields = dict(part.split("=", 1) for part in signature.split(","))
        t = int(fields["t"])
        sig = base64.b64decode(fields["ed25519"], validate=True)
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, str(t).encode() + b"." + body)
    except (ValueError, KeyError, binascii.Error, InvalidSignature):
        raise BadAnswer("the platform's answer is not signed with its key") from None
    if abs(now.timestamp() - t) > TOLERANCE.total_seconds():
        raise BadAnswer(f"the platform's answer was signed {int(now.timestamp() - t)} s from now")


def merchant_signature(secret: bytes, method: str, path: str, body: bytes, t: int) -> str:
    mac = hmac.new(secret, f"{t}.{method} {path}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},hmac-sha256={mac}"


def _utc(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class HttpPlatform:
    """``Platform`` over HTTP (module doc). ``public_key``: the platform's Ed25519 key (32 bytes); ``secret``: the
    merchant's HMAC secret. Each call is one request; retrying is the caller's (with the same idempotency key)."""

    def __init__(self, base_url: str, *, merchant_id: str, secret: bytes, public_key: bytes, timeout: float = 10.0,
                 clock=None, transport: httpx.BaseTransport | None = None, notify_url: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.notify_url = notify_url  # where the platform posts notifications (the back office's /ota/webhook)
        self.merchant_id = merchant_id
        self._secret = secret
        self.public_key = public_key
        self.clock = clock or (lambda: datetime.now(UTC))
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def __repr__(self) -> str:  # never the secret
        return f"<HttpPlatform {self.base_url} merchant {self.merchant_id}>"

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, payload: dict | None = None) -> httpx.Response:
        body = b"" if payload is None else json.dumps(payload, sort_keys=True).encode()
        t = int(self.clock().timestamp())
        headers = {MERCHANT_HEADER: self.merchant_id,
                   MERCHANT_SIGNATURE_HEADER: merchant_signature(self._secret, method, path, body, t)}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            r = self._client.request(method, path, content=body, headers=headers)
        except httpx.HTTPError as e:  # connection refused or dropped, timeout, half an answer
            raise PlatformUnavailable(f"{method} {path}: no answer from the platform ({type(e).__name__})") from None
        if r.status_code >= 500:
            raise PlatformUnavailable(f"{method} {path}: the platform answered {r.status_code}")
        verify_signed(r.content, r.headers.get(SIGNATURE_HEADER, ""), self.public_key, now=self.clock())
        if r.status_code >= 400:
            try:
                detail = r.json()
                raise PlatformRefused(str(detail.get("reason", "refused")), str(detail.get("message", r.text)),
                                      r.status_code)
            except (ValueError, AttributeError):
                raise PlatformRefused("refused", r.text[:200], r.status_code) from None
        return r

    def _json(self, r: httpx.Response) -> dict:
        try:
            out = r.json()
        except ValueError:
            raise BadAnswer("the platform's answer is not JSON") from None
        if not isinstance(out, dict):
            raise BadAnswer("the platform's answer is not a JSON object")
        return out

    def _payment(self, d: dict) -> Payment:
        try:
            amount = d["amount"]
            if isinstance(amount, bool) or not isinstance(amount, int):
                raise TypeError
            return Payment(str(d["order_id"]), amount, str(d["status"]), d.get("payment_ref"),
                           _utc(d.get("paid_at")), d.get("pay_url"))
        except (KeyError, TypeError, ValueError):
            raise BadAnswer(f"not a payment: {str(d)[:200]}") from None

    def create_payment(self, *, order_id: str, amount: int, description: str, notify_url: str) -> Payment:
        return self._payment(self._json(self._call("POST", "/v1/payments", {
            "order_id": order_id, "amount": amount, "description": description, "notify_url": notify_url})))

    def query_order(self, order_id: str) -> Payment | None:
        try:
            return self._payment(self._json(self._call("GET", f"/v1/payments/{order_id}")))
        except PlatformRefused as e:
            if e.reason == "unknown_order":
                return None
            raise

    def refund(self, *, refund_id: str, order_id: str, payment_ref: str, amount: int, reason: str) -> RefundAnswer:
        d = self._json(self._call("POST", "/v1/refunds", {
            "refund_id": refund_id, "order_id": order_id, "payment_ref": payment_ref, "amount": amount,
            "reason": reason}))
        try:
            answer = RefundAnswer(str(d["refund_id"]), str(d["status"]), str(d["refund_ref"]), int(d["amount"]))
        except (KeyError, TypeError, ValueError):
            raise BadAnswer(f"not a refund answer: {str(d)[:200]}") from None
        if answer.refund_id != refund_id or answer.amount != amount:
            raise BadAnswer(f"the platform answered refund {answer.refund_id} of {answer.amount} fen to refund "
                            f"{refund_id} of {amount} fen")
        return answer

    def verify_notification(self, body: bytes, signature: str, *, now: datetime) -> dict:
        from backoffice.cards.payments import verify

        return verify(body, signature, self.public_key, now=now)

    def daily_statement(self, day: date) -> str:
        return self._call("GET", f"/v1/statements/{day.isoformat()}").content.decode("utf-8")


URL_ENV, MERCHANT_ENV, SECRET_ENV = "FAREBOX_PAYMENT_URL", "FAREBOX_PAYMENT_MERCHANT", "FAREBOX_PAYMENT_SECRET"
NOTIFY_URL_ENV = "FAREBOX_PAYMENT_NOTIFY_URL"


def platform_from_env(public_key: bytes, environ=os.environ) -> HttpPlatform | None:
    """The platform named by ``FAREBOX_PAYMENT_URL`` (merchant id ``FAREBOX_PAYMENT_MERCHANT``, HMAC secret
    ``FAREBOX_PAYMENT_SECRET`` in hex, notifications to ``FAREBOX_PAYMENT_NOTIFY_URL``, the public address of
    ``/api/v1/ota/webhook``); None when no URL is set (no platform calls: notifications only)."""
    url = environ.get(URL_ENV, "").strip()
    if not url:
        return None
    secret = environ.get(SECRET_ENV, "").strip()
    try:
        key = bytes.fromhex(secret)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(f"{SECRET_ENV} must be the merchant's HMAC secret in hex (at least 16 bytes)")
    return HttpPlatform(url, merchant_id=environ.get(MERCHANT_ENV, "farebox"), secret=key, public_key=public_key,
                        notify_url=environ.get(NOTIFY_URL_ENV, "").strip() or None)


def configure(app, public_key: bytes, environ=os.environ) -> HttpPlatform | None:
    """``farebox serve``: the web app's platform adapter (``app.state.payment_platform``), from the environment;
    staff refunds over HTTP then go through the platform (backoffice.web.api.ota ``staff_refund``)."""
    app.state.payment_platform = platform_from_env(public_key, environ)
    return app.state.payment_platform

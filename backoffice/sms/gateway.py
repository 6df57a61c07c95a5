"""The SMS gateway as farebox uses it: send a text to a phone, receive riders' texts as signed webhooks.

What farebox asks of a gateway (``SmsGateway``): ``send(phone, text) -> SentSms``. Everything else in farebox (the
command dialogue, one-time codes for the web shop) only calls that.

The HTTP protocol (what ``hardware_sim.sms.SmsGatewaySimulator`` serves; a real gateway is adapted to it), JSON
over HTTP, signed with one shared HMAC secret both ways:

- farebox -> gateway: ``POST /v1/messages`` ``{"to", "text", "client_ref"}`` with headers ``X-Sms-Account`` and
  ``X-Sms-Signature: t=<unix>,hmac-sha256=<hex>``, the HMAC-SHA256 with the secret over
  ``b"<t>.POST /v1/messages." + body``. Answer 200 ``{"message_id", "status": "accepted"}``; the same
  ``client_ref`` again is answered with the same message id and not sent twice (so a retry after a lost answer is
  safe). 4xx ``{"reason", "message"}``: refused (e.g. ``bad_number``); 5xx or no answer: unavailable.
- gateway -> farebox: a rider's text is posted to ``POST /api/v1/sms/inbound`` with body
  ``{"message_id", "from", "to", "text", "received_at"}`` (UTF-8 JSON) and ``X-Sms-Signature:
  t=<unix>,hmac-sha256=<hex>`` over ``b"<t>." + body``. Fresh within 5 minutes; each ``message_id`` is applied
  once (a gateway resends what it thinks was lost: a duplicate is answered 200 and changes nothing).

Errors a caller catches by meaning: ``SmsUnavailable`` (no answer; retry with the same ``client_ref``),
``SmsRefused`` (the gateway said no), ``InboundRefused`` (a webhook that is forged, stale or malformed).

Settings (farebox.config: the TOML file or the environment): ``sms_url`` / ``FAREBOX_SMS_URL`` (the gateway; unset:
no SMS is sent, a ``NullGateway`` logs what would have been), ``sms_account`` / ``FAREBOX_SMS_ACCOUNT``,
``sms_secret`` / ``FAREBOX_SMS_SECRET`` (hex, at least 16 bytes; the same secret signs inbound webhooks).
``farebox serve`` makes one gateway from them for the SMS dialogue and the web shop's one-time codes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from datetime import UTC, datetime, timedelta
from typing import Protocol

import httpx

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sms-Signature"
ACCOUNT_HEADER = "X-Sms-Account"
TOLERANCE = timedelta(minutes=5)
MAX_TEXT = 500  # characters; a longer text is cut (a gateway splits into parts of 70 Chinese characters anyway)
MAX_INBOUND_BODY = 8192
PHONE = re.compile(r"\+?[0-9]{5,20}")
URL_ENV, ACCOUNT_ENV, SECRET_ENV = "FAREBOX_SMS_URL", "FAREBOX_SMS_ACCOUNT", "FAREBOX_SMS_SECRET"
TEST_SMS_SECRET = b"farebox-test-sms-gateway-secret1"  # published: the simulator and tests only


class SmsError(Exception):
    pass


class SmsUnavailable(SmsError):
    """No answer (connection lost, timeout, 5xx): whether the text went is unknown; retry with the same client_ref."""


class SmsRefused(SmsError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class InboundRefused(SmsError):
    """A webhook that is not the gateway's: ``reason`` is ``bad_signature``, ``stale`` or ``bad_body``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SentSms:
    message_id: str
    to: str
    text: str


@dataclass(frozen=True)
class InboundSms:
    message_id: str
    phone: str  # the rider's number (the webhook's "from")
    to: str
    text: str
    received_at: datetime


class SmsGateway(Protocol):
    def send(self, phone: str, text: str, *, client_ref: str | None = None) -> SentSms: ...


def check_phone(phone: str) -> str:
    phone = (phone or "").strip()
    if not PHONE.fullmatch(phone):
        raise SmsRefused("bad_number", f"{phone[:24]!r} is not a phone number (digits, optional leading +)")
    return phone


# --------------------------------------------------------------------------------------------------- signatures
def sign(secret: bytes, body: bytes, t: int, prefix: str = "") -> str:
    """``t=<unix>,hmac-sha256=<hex>`` over ``b"<t>." + prefix + body`` (prefix ``"POST /v1/messages."`` outbound)."""
    mac = hmac.new(secret, f"{t}.{prefix}".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},hmac-sha256={mac}"


def verify_inbound(body: bytes, signature: str, secret: bytes | None, *, now: datetime) -> InboundSms:
    """The rider's text if ``signature`` is the gateway's over this body and fresh; InboundRefused otherwise."""
    if not secret:
        raise InboundRefused("not_configured", "no SMS gateway secret is configured")
    if len(body) > MAX_INBOUND_BODY:
        raise InboundRefused("bad_body", f"an inbound message of {len(body)} bytes is too long")
    try:
        fields = dict(part.split("=", 1) for part in (signature or "").split(","))
        t = int(fields["t"])
        given = fields["hmac-sha256"]
    except (ValueError, KeyError):
        raise InboundRefused("bad_signature", f"the {SIGNATURE_HEADER} header is missing or malformed") from None
    want = sign(secret, body, t).split("hmac-sha256=", 1)[1]
    if not hmac.compare_digest(want, given.lower()):
        raise InboundRefused("bad_signature", "the inbound message is not signed with the gateway's secret")
    if abs(now.timestamp() - t) > TOLERANCE.total_seconds():
        raise InboundRefused("stale", f"the inbound message was signed {int(now.timestamp() - t)} s from now")
    try:
        d = json.loads(body.decode("utf-8"))
        message_id, phone, text = d["message_id"], d["from"], d["text"]
        if not all(isinstance(v, str) for v in (message_id, phone, text)) or not 0 < len(message_id) <= 64:
            raise TypeError
        at = datetime.fromisoformat(str(d.get("received_at") or now.isoformat()).replace("Z", "+00:00"))
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        return InboundSms(message_id, check_phone(phone), str(d.get("to", ""))[:32], text[:MAX_TEXT], at)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, SmsRefused):
        raise InboundRefused("bad_body", "the inbound message is not {message_id, from, to, text, received_at}") \
            from None


# ------------------------------------------------------------------------------------------------- the adapters
class HttpSmsGateway:
    """``SmsGateway`` over HTTP (module doc). Each ``send`` is one request, retried once on no answer with the
    same client_ref (the gateway sends it once)."""

    def __init__(self, base_url: str, *, account: str, secret: bytes, timeout: float = 10.0, clock=None,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.account = account
        self._secret = secret
        self.clock = clock or (lambda: datetime.now(UTC))
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def __repr__(self) -> str:  # never the secret
        return f"<HttpSmsGateway {self.base_url} account {self.account}>"

    def close(self) -> None:
        self._client.close()

    def send(self, phone: str, text: str, *, client_ref: str | None = None) -> SentSms:
        phone, text = check_phone(phone), text[:MAX_TEXT]
        client_ref = client_ref or "fb_" + secrets.token_hex(10)
        body = json.dumps({"to": phone, "text": text, "client_ref": client_ref}, ensure_ascii=False,
                          sort_keys=True).encode()
        last = None
        for _attempt in range(2):
            t = int(self.clock().timestamp())
            headers = {ACCOUNT_HEADER: self.account, "Content-Type": "application/json",
                       SIGNATURE_HEADER: sign(self._secret, body, t, "POST /v1/messages.")}
            try:
                r = self._client.post("/v1/messages", content=body, headers=headers)
            except httpx.HTTPError as e:
                last = SmsUnavailable(f"no answer from the SMS gateway ({type(e).__name__})")
                continue
            if r.status_code >= 500:
                last = SmsUnavailable(f"the SMS gateway answered {r.status_code}")
                continue
            try:
                d = r.json()
            except ValueError:
                d = {}
            if r.status_code >= 400:
                raise SmsRefused(str(d.get("reason", "refused")), str(d.get("message", r.text[:200])))
            if not isinstance(d.get("message_id"), str):
                raise SmsUnavailable(f"the SMS gateway's answer is not {{message_id}}: {r.text[:200]}")
            return SentSms(d["message_id"], phone, text)
        raise last


class NullGateway:
    """No gateway configured: nothing is sent; the text is logged without its digits (codes stay secret) and kept
    in ``sent`` for a test to read."""

    def __init__(self):
        self.sent: list[SentSms] = []
        self._lock = threading.Lock()

    def send(self, phone: str, text: str, *, client_ref: str | None = None) -> SentSms:
        msg = SentSms("null_" + secrets.token_hex(6), check_phone(phone), text[:MAX_TEXT])
        with self._lock:
            self.sent.append(msg)
        log.warning("SMS not sent (no %s configured) to ...%s: %s", URL_ENV, phone[-4:], re.sub(r"\d", "#", text))
        return msg


def secret_from_settings(settings, *, insecure_test_key: bool = False) -> bytes | None:
    """The gateway's shared secret (``sms_secret``, hex, >= 16 bytes; farebox.config: TOML or
    ``FAREBOX_SMS_SECRET``); None unset (the inbound webhook then refuses everything), the published TEST secret
    when unset and ``insecure_test_key`` (asked for explicitly: ``--insecure-test-keys`` alone does not)."""
    text = (settings.sms_secret or "").strip()
    if not text:
        return TEST_SMS_SECRET if insecure_test_key else None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(f"sms_secret ({SECRET_ENV}) must be the SMS gateway's shared secret in hex (at least 16 "
                         "bytes)")
    return key


def gateway_from_settings(settings, *, insecure_test_key: bool = False) -> SmsGateway:
    """The gateway the settings name (``sms_url``, ``sms_account``, ``sms_secret``); a ``NullGateway`` without a
    URL."""
    url = (settings.sms_url or "").strip()
    if not url:
        return NullGateway()
    secret = secret_from_settings(settings, insecure_test_key=insecure_test_key)
    if secret is None:
        raise ValueError(f"sms_url ({URL_ENV}) is set but sms_secret ({SECRET_ENV}) is not: give the gateway's "
                         "shared secret (hex)")
    return HttpSmsGateway(url, account=(settings.sms_account or "farebox").strip(), secret=secret)


def _settings(environ):
    """The SMS settings of the environment alone, for an app that ``farebox serve`` did not configure (tests,
    embedding): the back office does not import farebox.config; serve hands over the TOML file's settings itself."""
    return SimpleNamespace(sms_url=environ.get(URL_ENV), sms_account=environ.get(ACCOUNT_ENV),
                           sms_secret=environ.get(SECRET_ENV))


def secret_from_env(environ=os.environ, *, insecure_test_key: bool = False) -> bytes | None:
    """``secret_from_settings`` of ``FAREBOX_SMS_SECRET``."""
    return secret_from_settings(_settings(environ), insecure_test_key=insecure_test_key)


def gateway_from_env(environ=os.environ, *, insecure_test_key: bool = False) -> SmsGateway:
    """``gateway_from_settings`` of ``FAREBOX_SMS_URL``, ``_ACCOUNT``, ``_SECRET``."""
    return gateway_from_settings(_settings(environ), insecure_test_key=insecure_test_key)


# ---------------------------------------------------------------------------------------- the app's gateway
def configure_sms(app, *, gateway: SmsGateway | None = None, secret: bytes | None = None) -> None:
    """Give the web app its SMS gateway (what ``app_gateway`` returns) and the inbound webhook's secret. Not called:
    both come from the environment on first use (``gateway_from_env``, ``secret_from_env``)."""
    app.state.sms_gateway = gateway
    app.state.sms_secret = secret


def app_gateway(app) -> SmsGateway:
    """The gateway this web app sends with: ``app_gateway(request.app).send(phone, text)`` (one-time codes, the
    dialogue's answers)."""
    gateway = getattr(app.state, "sms_gateway", None)
    if gateway is None:
        gateway = app.state.sms_gateway = gateway_from_env()
    return gateway


def app_secret(app) -> bytes | None:
    secret = getattr(app.state, "sms_secret", None)
    if secret is None:
        secret = app.state.sms_secret = secret_from_env()
    return secret

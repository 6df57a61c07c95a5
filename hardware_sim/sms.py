"""A simulated SMS gateway as a real HTTP server (a thread on a loopback port), speaking the protocol of
backoffice.sms.gateway.

- farebox sends: ``POST /v1/messages`` (HMAC-signed with the shared secret); the text lands in ``outbox[phone]``
  (what the rider's phone shows), once per ``client_ref`` however often it is sent.
- a rider texts: ``rider_texts(phone, text)`` posts a signed inbound webhook to ``inbound_url`` (the back office's
  ``/api/v1/sms/inbound``) and returns the message id; ``deliver_again(message_id)`` posts the same message again.

Misbehaviour on demand (``faults``): ``lose_answers = n`` (the next n sends are stored, then the connection is
dropped without an answer), ``inbound = "normal" | "duplicate" | "drop"`` (each inbound posted twice, or never:
kept in ``dropped``), ``sign_with`` (post inbound messages signed with another secret: a forger).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

TEST_SMS_SECRET = b"farebox-test-sms-gateway-secret1"  # published, as backoffice.sms.gateway.TEST_SMS_SECRET
SIGNATURE_HEADER = "X-Sms-Signature"
SHORT_CODE = "10690000"


def _sign(secret: bytes, body: bytes, t: int, prefix: str = "") -> str:
    return f"t={t},hmac-sha256=" + hmac.new(secret, f"{t}.{prefix}".encode() + body, hashlib.sha256).hexdigest()


@dataclass
class Faults:
    lose_answers: int = 0
    inbound: str = "normal"  # normal | duplicate | drop
    sign_with: bytes | None = None


@dataclass(frozen=True)
class Delivery:
    message_id: str
    status: int | None  # the back office's HTTP answer; None: no answer
    answer: str


class SmsGatewaySimulator:
    def __init__(self, *, secret: bytes = TEST_SMS_SECRET, inbound_url: str = "", clock=None):
        self.secret = secret
        self.inbound_url = inbound_url
        self.clock = clock or (lambda: datetime.now(UTC))
        self.faults = Faults()
        self.outbox: dict[str, list[str]] = defaultdict(list)  # phone -> texts received, in order
        self.refused: list[str] = []  # why sends were refused (bad signature ...)
        self.deliveries: list[Delivery] = []  # every inbound post and the back office's answer
        self.dropped: list[str] = []
        self._by_ref: dict[str, str] = {}  # client_ref -> message id
        self._inbound: dict[str, bytes] = {}  # message id -> body
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, port: int = 0) -> SmsGatewaySimulator:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                sim._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def texts_to(self, phone: str) -> list[str]:
        with self._lock:
            return list(self.outbox.get(phone, []))

    # ------------------------------------------------------------------------------------------ farebox sends
    def _answer(self, h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.path != "/v1/messages":
            return self._answer(h, 404, {"reason": "not_found", "message": h.path})
        try:
            fields = dict(p.split("=", 1) for p in h.headers.get(SIGNATURE_HEADER, "").split(","))
            t = int(fields["t"])
            ok = hmac.compare_digest(_sign(self.secret, body, t, "POST /v1/messages."),
                                     f"t={t},hmac-sha256={fields['hmac-sha256']}")
        except (ValueError, KeyError):
            ok = False
        if not ok:
            self.refused.append("bad_signature")
            return self._answer(h, 401, {"reason": "bad_signature", "message": "not signed with the account secret"})
        try:
            p = json.loads(body)
            to, text, ref = str(p["to"]), str(p["text"]), str(p.get("client_ref") or secrets.token_hex(8))
        except (ValueError, KeyError, TypeError):
            return self._answer(h, 400, {"reason": "bad_request", "message": "{to, text, client_ref}"})
        if not to.lstrip("+").isdigit():
            return self._answer(h, 400, {"reason": "bad_number", "message": to})
        with self._lock:
            message_id = self._by_ref.get(ref)
            if message_id is None:
                message_id = self._by_ref[ref] = "gw_" + secrets.token_hex(8)
                self.outbox[to].append(text)
            lose = self.faults.lose_answers > 0
            if lose:
                self.faults.lose_answers -= 1
        if lose:  # the text went; the answer never comes
            h.close_connection = True
            return
        self._answer(h, 200, {"message_id": message_id, "status": "accepted"})

    # -------------------------------------------------------------------------------------------- a rider texts
    def rider_texts(self, phone: str, text: str) -> str:
        """The rider sends ``text`` from ``phone``: posted to the back office (as ``faults`` say); the message id."""
        message_id = "in_" + secrets.token_hex(8)
        body = json.dumps({"message_id": message_id, "from": phone, "to": SHORT_CODE, "text": text,
                           "received_at": self.clock().isoformat()}, ensure_ascii=False).encode()
        with self._lock:
            self._inbound[message_id] = body
        mode = self.faults.inbound
        if mode == "drop":
            self.dropped.append(message_id)
            return message_id
        self._post(message_id)
        if mode == "duplicate":
            self._post(message_id)
        return message_id

    def deliver_again(self, message_id: str) -> Delivery:
        return self._post(message_id)

    def _post(self, message_id: str) -> Delivery:
        body = self._inbound[message_id]
        signature = _sign(self.faults.sign_with or self.secret, body, int(self.clock().timestamp()))
        try:
            r = httpx.post(self.inbound_url, content=body, timeout=30,
                           headers={SIGNATURE_HEADER: signature, "Content-Type": "application/json"})
            d = Delivery(message_id, r.status_code, r.text[:500])
        except httpx.HTTPError as e:
            d = Delivery(message_id, None, type(e).__name__)
        self.deliveries.append(d)
        return d

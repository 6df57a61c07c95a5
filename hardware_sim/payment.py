"""A simulated payment platform: a rider pays an order, and the platform tells the back office with a signed
webhook (Ed25519, the format in backoffice/cards/payments.py), retrying deliveries as real platforms do, so that
the back office sees duplicates.

``PaymentPlatform(seed)`` signs with the Ed25519 key from the 32-byte ``seed`` (the published TEST seed by default);
``public_key`` is what the back office is configured with. ``pay(order_id, amount)`` returns a :class:`Webhook`
(body, signature header) and keeps it in ``sent`` so a test can deliver it again, late or twice.

``PlatformSimulator`` is the same platform as a real HTTP server (a thread serving on a loopback port) speaking
the protocol of backoffice.payments.platform: payments, order queries, refunds with an idempotency key, the daily
statement; it posts its notifications to the order's ``notify_url``. It misbehaves on demand (``faults``):

- ``lose_answers[endpoint] = n``: the next n calls to ``payments`` / ``query`` / ``refunds`` / ``statements`` do
  the work and then drop the connection without an answer;
- ``notify``: ``"normal"``, ``"drop"`` (never sent: the order query must settle it), ``"duplicate"`` (sent twice),
  ``"late"`` (held until ``deliver_held()``);
- ``refund_twice``: a refund is answered, and its notification is also posted twice;
- ``refuse_refunds = n``: the next n new refunds are refused;
- ``statement_extra`` (lines added to every file: an order farebox never had), ``statement_omit`` (order ids left
  out: a missing order).

``GET /pay/<order_id>`` is the rider's payment page (what ``pay_url`` points at): the amount to pay and two buttons,
"pay" and "cancel". Paying is ``rider_pays``; either button then sends the browser back (303) to the shop's
``return_url`` (a query parameter of the link, as wallet H5 pages take a redirect URL; http(s) only), or shows
"paid" / "cancelled" when there is none. The page needs no merchant signature: the rider's browser has none.

Its own ledger says what money moved: ``ledger`` (one entry per payment collected and per refund paid out) and
``refunds`` (refund id -> what was paid out), so a test can check a refund was paid once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

TEST_PLATFORM_SEED = bytes.fromhex("5041594D454E542D544553542D534545442D464152454F582D30303030303031")


@dataclass(frozen=True)
class Webhook:
    body: bytes
    signature: str  # the header value: t=<unix>,ed25519=<base64>


class PaymentPlatform:
    def __init__(self, seed: bytes = TEST_PLATFORM_SEED, *, clock=None):
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.sent: list[Webhook] = []

    def __repr__(self) -> str:
        return f"<PaymentPlatform {self.public_key.hex()[:16]}…>"

    def sign(self, body: bytes) -> Webhook:
        t = int(self.clock().timestamp())
        sig = self._key.sign(str(t).encode() + b"." + body)
        return Webhook(body, f"t={t},ed25519={base64.b64encode(sig).decode()}")

    def pay(self, order_id: str, amount: int, *, status: str = "paid") -> Webhook:
        """The rider paid ``amount`` fen for ``order_id``: the notification the platform sends (and resends)."""
        body = json.dumps({"event_id": "evt_" + secrets.token_hex(8), "order_id": order_id, "amount": amount,
                           "payment_ref": "pay_" + secrets.token_hex(8), "status": status,
                           "paid_at": self.clock().isoformat()}, sort_keys=True).encode()
        hook = self.sign(body)
        self.sent.append(hook)
        return hook


TEST_MERCHANT_SECRET = b"farebox-test-merchant-secret-001"  # published: the simulator and tests only
PLATFORM_TZ = "Asia/Shanghai"  # the platform cuts its day at local midnight
FEE_BP = 60  # the platform keeps 0.60 % of a payment, rounded half up to the fen


def fee_of(amount: int, bp: int = FEE_BP) -> int:
    return (amount * bp + 5000) // 10000


@dataclass
class Faults:
    lose_answers: dict = field(default_factory=lambda: defaultdict(int))
    notify: str = "normal"  # normal | drop | duplicate | late
    refund_twice: bool = False
    refuse_refunds: int = 0  # the next n new refunds are refused (409 refund_refused: e.g. the merchant's balance)
    statement_extra: list = field(default_factory=list)  # dicts with the statement's columns
    statement_omit: set = field(default_factory=set)  # order ids


class PlatformSimulator(PaymentPlatform):
    """The payment platform as an HTTP server on 127.0.0.1 (``start()`` / ``stop()``, or ``with``); ``url``.

    ``rider_pays(order_id)``: the rider pays a created payment in the wallet app: the money is collected (ledger)
    and the notification is sent as ``faults.notify`` says."""

    def __init__(self, seed: bytes = TEST_PLATFORM_SEED, *, merchant_secret: bytes = TEST_MERCHANT_SECRET,
                 merchant_id: str = "farebox", clock=None, fee_bp: int = FEE_BP):
        super().__init__(seed, clock=clock)
        self.merchant_secret = merchant_secret
        self.merchant_id = merchant_id
        self.fee_bp = fee_bp
        self.faults = Faults()
        self.orders: dict[str, dict] = {}
        self.refunds: dict[str, dict] = {}  # refund id -> {order_id, amount, refund_ref, at}
        self.ledger: list[dict] = []  # {kind: payment|refund, order_id, ref, amount, fee, at}
        self.held: list[tuple[str, Webhook]] = []  # late notifications (url, hook)
        self.delivered: list[tuple[str, int]] = []  # (event kind, HTTP status) of each notification posted
        self.calls: list[tuple[str, str]] = []  # (method, path) of each request received
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ the server
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the simulator first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self, port: int = 0) -> PlatformSimulator:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                sim._handle(self, "GET")

            def do_POST(self):
                sim._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="payment-platform-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start() if self._server is None else self

    def __exit__(self, *exc):
        self.stop()

    def _answer(self, h: BaseHTTPRequestHandler, status: int, payload, *, csv_text: str | None = None) -> None:
        body = csv_text.encode() if csv_text is not None else json.dumps(payload, sort_keys=True).encode()
        hook = self.sign(body)
        h.send_response(status)
        h.send_header("Content-Type", "text/csv; charset=utf-8" if csv_text is not None else "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("X-Payment-Signature", hook.signature)
        h.end_headers()
        h.wfile.write(body)

    def _lose(self, endpoint: str) -> bool:
        with self._lock:
            if self.faults.lose_answers[endpoint] > 0:
                self.faults.lose_answers[endpoint] -= 1
                return True
        return False

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        self.calls.append((method, path))
        if path.startswith("/pay/"):  # the rider's browser: no merchant signature
            self._pay_page(h, method, body)
            return
        if not self._merchant_ok(h, method, path, body):
            self._answer(h, 401, {"reason": "bad_signature", "message": "merchant signature does not verify"})
            return
        try:
            payload = json.loads(body) if body else {}
            if method == "POST" and path == "/v1/payments":
                endpoint, (status, answer) = "payments", self._create(payload)
            elif method == "GET" and path.startswith("/v1/payments/"):
                endpoint, (status, answer) = "query", self._query(path.rsplit("/", 1)[1])
            elif method == "POST" and path == "/v1/refunds":
                endpoint, (status, answer) = "refunds", self._refund(payload)
            elif method == "GET" and path.startswith("/v1/statements/"):
                endpoint, (status, answer) = "statements", (200, self.statement(date.fromisoformat(
                    path.rsplit("/", 1)[1])))
            else:
                endpoint, (status, answer) = "other", (404, {"reason": "not_found", "message": path})
        except (ValueError, KeyError, TypeError) as e:
            endpoint, (status, answer) = "other", (400, {"reason": "bad_request", "message": str(e)})
        if self._lose(endpoint):
            h.close_connection = True  # the work is done; the answer never leaves
            return
        if isinstance(answer, str):
            self._answer(h, status, None, csv_text=answer)
        else:
            self._answer(h, status, answer)

    # ------------------------------------------------------------------------------------------ the rider's page
    def _html(self, h: BaseHTTPRequestHandler, status: int, title: str, inner: str) -> None:
        page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
                f"content=\"width=device-width\"><title>{escape(title)}</title><style>body{{font:18px sans-serif;"
                f"margin:2em auto;max-width:24em;text-align:center}} button{{font-size:1.2em;margin:.5em;"
                f"padding:.5em 1.5em}} #amount{{font-size:2em}}</style></head><body><h1>{escape(title)}</h1>{inner}"
                f"</body></html>").encode()
        h.send_response(status)
        h.send_header("Content-Type", "text/html; charset=utf-8")
        h.send_header("Content-Length", str(len(page)))
        h.end_headers()
        h.wfile.write(page)

    @staticmethod
    def _return_url(text: str) -> str | None:
        parts = urlsplit(text)
        return text if parts.scheme in ("http", "https") and parts.netloc and len(text) <= 2000 else None

    def _pay_page(self, h: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        """GET: the amount and the pay / cancel buttons; POST (the form): pay or not, then back to the shop."""
        parts = urlsplit(h.path)
        order_id = parts.path[len("/pay/"):]
        given = parse_qs(parts.query) if method == "GET" else parse_qs(body.decode("utf-8", "replace"))
        back = self._return_url((given.get("return_url") or [""])[0])
        with self._lock:
            o = self.orders.get(order_id)
        if o is None:
            self._html(h, 404, "Payment platform (simulator)", "<p id=\"unknown\">No such payment.</p>")
            return
        if method == "POST":
            choice = (given.get("action") or [""])[0]
            if choice == "pay":
                self.rider_pays(order_id)
            if back is not None:
                h.send_response(303)
                h.send_header("Location", back)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            done = "paid" if choice == "pay" else "cancelled"
            self._html(h, 200, "Payment platform (simulator)", f"<p id=\"{done}\">Payment {done}.</p>")
            return
        amount = f"¥{o['amount'] // 100}.{o['amount'] % 100:02d}"  # the platform's own screen, not farebox's
        if o["payment_ref"] is not None:
            inner = f"<p id=\"paid\">{escape(o['order_id'])}: paid {amount}.</p>"
        else:
            hidden = f"<input type=\"hidden\" name=\"return_url\" value=\"{escape(back)}\">" if back else ""
            inner = (f"<p>{escape(o['description'] or o['order_id'])}</p><p id=\"amount\">{amount}</p>"
                     f"<form method=\"post\" action=\"/pay/{escape(order_id)}\">{hidden}"
                     f"<button id=\"pay\" name=\"action\" value=\"pay\">Pay {amount}</button>"
                     f"<button id=\"cancel\" name=\"action\" value=\"cancel\">Cancel</button></form>")
        self._html(h, 200, "Payment platform (simulator)", inner)

    def _merchant_ok(self, h, method: str, path: str, body: bytes) -> bool:
        try:
            fields = dict(part.split("=", 1) for part in h.headers.get("X-Merchant-Signature", "").split(","))
            t = int(fields["t"])
            want = hmac.new(self.merchant_secret, f"{t}.{method} {path}.".encode() + body, hashlib.sha256).hexdigest()
        except (ValueError, KeyError):
            return False
        fresh = abs(self.clock().timestamp() - t) <= 300
        return fresh and h.headers.get("X-Merchant-Id") == self.merchant_id and hmac.compare_digest(
            want, fields.get("hmac-sha256", ""))

    # ------------------------------------------------------------------------------------------ the platform
    def _view(self, o: dict) -> dict:
        return {"order_id": o["order_id"], "amount": o["amount"], "status": o["status"],
                "payment_ref": o["payment_ref"], "paid_at": o["paid_at"].isoformat() if o["paid_at"] else None,
                "pay_url": f"{self.url}/pay/{o['order_id']}"}

    def _create(self, p: dict) -> tuple[int, dict]:
        amount = p["amount"]
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            return 400, {"reason": "bad_amount", "message": "amount is a positive whole number of fen"}
        with self._lock:
            o = self.orders.get(p["order_id"])
            if o is None:
                o = self.orders[p["order_id"]] = {
                    "order_id": p["order_id"], "amount": amount, "status": "created", "payment_ref": None,
                    "paid_at": None, "notify_url": p.get("notify_url", ""), "description": p.get("description", "")}
            elif o["amount"] != amount:
                return 409, {"reason": "order_differs", "message": f"order {p['order_id']} is for {o['amount']} fen"}
            return 200, self._view(o)

    def _query(self, order_id: str) -> tuple[int, dict]:
        with self._lock:
            o = self.orders.get(order_id)
            if o is None:
                return 404, {"reason": "unknown_order", "message": f"no order {order_id}"}
            return 200, self._view(o)

    def _refund(self, p: dict) -> tuple[int, dict]:
        refund_id, amount = str(p["refund_id"]), p["amount"]
        with self._lock:
            done = self.refunds.get(refund_id)
            if done is None and self.faults.refuse_refunds > 0:
                self.faults.refuse_refunds -= 1
                return 409, {"reason": "refund_refused", "message": "the merchant account's balance is too low"}
            if done is None:
                o = self.orders.get(p["order_id"])
                if o is None or o["payment_ref"] is None or o["payment_ref"] != p.get("payment_ref"):
                    return 409, {"reason": "refund_refused", "message": f"order {p['order_id']} is not paid by "
                                                                        f"{p.get('payment_ref')}"}
                given = sum(r["amount"] for r in self.refunds.values() if r["order_id"] == o["order_id"])
                if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= o["amount"] - given:
                    return 409, {"reason": "refund_refused",
                                 "message": f"{amount} fen is more than the {o['amount'] - given} fen left to refund"}
                done = self.refunds[refund_id] = {"order_id": o["order_id"], "amount": amount, "at": self.clock(),
                                                  "refund_ref": "rfd_" + secrets.token_hex(8)}
                self.ledger.append({"kind": "refund", "order_id": o["order_id"], "ref": refund_id, "amount": amount,
                                    "fee": 0, "at": done["at"]})
                if given + amount == o["amount"]:
                    o["status"] = "refunded"
                if self.faults.refund_twice:
                    hook = self._refund_event(refund_id, done)
                    for _ in range(2):
                        self._post(o["notify_url"], hook, "refund")
            elif done["amount"] != amount or done["order_id"] != p["order_id"]:
                return 409, {"reason": "refund_differs", "message": f"refund {refund_id} was for {done['amount']} "
                                                                    f"fen of order {done['order_id']}"}
            return 200, {"refund_id": refund_id, "status": "succeeded", "refund_ref": done["refund_ref"],
                         "amount": done["amount"], "order_id": done["order_id"]}

    def _refund_event(self, refund_id: str, done: dict) -> Webhook:
        body = json.dumps({"event_id": "evt_" + secrets.token_hex(8), "order_id": done["order_id"],
                           "amount": done["amount"], "payment_ref": done["refund_ref"], "status": "refunded",
                           "refund_id": refund_id, "refunded_at": done["at"].isoformat()}, sort_keys=True).encode()
        return self.sign(body)

    def rider_pays(self, order_id: str) -> str:
        """The rider pays the order in the wallet: collected once; returns the payment reference."""
        with self._lock:
            o = self.orders[order_id]
            if o["payment_ref"] is not None:
                return o["payment_ref"]
            o.update(status="paid", payment_ref="pay_" + secrets.token_hex(8), paid_at=self.clock())
            self.ledger.append({"kind": "payment", "order_id": order_id, "ref": o["payment_ref"],
                                "amount": o["amount"], "fee": fee_of(o["amount"], self.fee_bp), "at": o["paid_at"]})
            body = json.dumps({"event_id": "evt_" + secrets.token_hex(8), "order_id": order_id, "amount": o["amount"],
                               "payment_ref": o["payment_ref"], "status": "paid",
                               "paid_at": o["paid_at"].isoformat()}, sort_keys=True).encode()
            mode, url = self.faults.notify, o["notify_url"]
        hook = self.sign(body)
        if mode == "late":
            self.held.append((url, hook))
        elif mode != "drop":
            for _ in range(2 if mode == "duplicate" else 1):
                self._post(url, hook, "payment")
        return o["payment_ref"]

    def deliver_held(self) -> int:
        """Send the late notifications now (signed again: a platform's retry carries a fresh timestamp)."""
        held, self.held = self.held, []
        for url, hook in held:
            self._post(url, self.sign(hook.body), "payment")
        return len(held)

    def _post(self, url: str, hook: Webhook, kind: str) -> None:
        if not url:
            return
        import httpx

        try:
            r = httpx.post(url, content=hook.body, headers={"X-Payment-Signature": hook.signature,
                                                            "Content-Type": "application/json"}, timeout=10)
            self.delivered.append((kind, r.status_code))
        except httpx.HTTPError:
            self.delivered.append((kind, 0))
            self.held.append((url, hook))  # delivered again later, as platforms do

    def statement(self, day: date) -> str:
        """The day's file (backoffice.payments.platform.STATEMENT_DOC), the same bytes every time it is asked."""
        zone = ZoneInfo(PLATFORM_TZ)
        start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
        end = start + timedelta(days=1)
        with self._lock:
            lines = [dict(e) for e in self.ledger if start <= e["at"] < end
                     and e["order_id"] not in self.faults.statement_omit]
            lines += [dict(e) for e in self.faults.statement_extra]
        lines.sort(key=lambda e: (e["at"], e["kind"], e["ref"]))
        out = ["kind,order_id,ref,amount,fee,at"]
        for e in lines:
            at = e["at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            out.append(f"{e['kind']},{e['order_id']},{e['ref']},{e['amount']},{e['fee']},{at}")
        return "\r\n".join(out) + "\r\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m hardware_sim.payment [--port N]``: the simulated platform as a process, until interrupted
    (merchant ``farebox``, the published test merchant secret and platform key)."""
    import argparse
    import time as _time

    p = argparse.ArgumentParser(description="simulated payment platform (HTTP, signed both ways)")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    sim = PlatformSimulator().start(args.port)
    print(f"payment platform simulator at {sim.url} (public key {sim.public_key.hex()}, merchant farebox, secret "
          f"{TEST_MERCHANT_SECRET.hex()})", flush=True)
    try:
        while True:
            _time.sleep(3600)
    except KeyboardInterrupt:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

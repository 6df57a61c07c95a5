"""The desk agent: the counter's PC/SC reader, offered to the back-office pages in this desk's browser.

A browser cannot reach a PC/SC reader, so ``farebox desk --reader pcsc:0 --origin https://backoffice.example``
runs a small HTTP service on 127.0.0.1 next to it. The page's JavaScript (backoffice/web/static/desk.js) asks it to
read the card in the reader and to do the card's part of a counter top-up; the back office does the host's part
(MAC1 checked, MAC2 given, TAC verified: backoffice.cards.topup), so the desk holds no key and no database.

A counter top-up, step by step (the page drives it; each step is one request):

1. agent ``POST /load/prepare {amount}``: SELECT, public file, balance, the log, INITIALIZE FOR LOAD
   (backoffice.cards.topup.read_for_load, as ``farebox topup counter`` does). The card keeps its INITIALIZE open,
   so the agent holds the card for this load (any other request is refused with 409 until it ends).
2. back office ``POST /cards/{asn}/counter-loads``: the answer, log and amount; the host checks MAC1, settles
   earlier loads from the log and answers the CREDIT FOR LOAD command with its MAC2.
3. agent ``POST /load/credit {credit_apdu}``: only a CREDIT FOR LOAD is sent to the card; it answers the TAC, and
   the agent reads the balance back.
4. back office ``POST /cards/counter-loads/{id}/tac``: the TAC verified, the load recorded as loaded.

A card pulled away between 2 and 3 leaves a load with its MAC2 and no TAC: the next counter load of that card
(its log and counter read at the desk) settles it, as for the CLI.

Who may drive the reader: only the configured back-office origin, with the pairing code.

- The service listens on 127.0.0.1 only, and answers only requests whose Host is 127.0.0.1 or localhost on its
  port (a DNS-rebinding page cannot reach it under another name).
- CORS: ``Access-Control-Allow-Origin`` is given to the configured origin only; a request from any other origin
  is refused (403) before the reader is touched, whatever it carries.
- Every request but the preflight carries ``X-Desk-Pairing: <code>``. The code is printed when the agent starts
  (or read from ``--pairing-file`` / ``FAREBOX_DESK_PAIRING``); staff type it into the page once, which keeps it
  in this browser's storage for that origin. A custom header forces a CORS preflight, so another site's page
  cannot even send a request without the origin check answering first; the code stops other local programs and
  other browsers' pages on the same origin that staff did not pair. Chrome's Private Network Access preflight
  (``Access-Control-Request-Private-Network``) is answered for the configured origin.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from epurse import apdu

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_TERMINAL = "0e0000000001"  # as farebox topup counter
PAIRING_HEADER = "X-Desk-Pairing"
HOLD_SECONDS = 120  # a load whose MAC2 does not come back within this is given up (the card's INITIALIZE drops)
CREDIT_PREFIX = bytes.fromhex("805200000B")


class DeskError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def origin_of(url: str) -> str:
    """``https://bo.example:8443/cards`` -> ``https://bo.example:8443`` (what a browser sends as Origin)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not a back-office address such as https://backoffice.example")
    return f"{parts.scheme}://{parts.netloc}".lower()


class Desk:
    """The reader and what it is doing. One request at a time talks to the card (a lock); a prepared load
    holds the card until its CREDIT FOR LOAD, a cancel, or ``HOLD_SECONDS``."""

    def __init__(self, reader, *, terminal_id: str = DEFAULT_TERMINAL, wait: float = 2.0, clock=time.monotonic):
        self.reader = reader
        self.terminal_id = bytes.fromhex(terminal_id)
        if len(self.terminal_id) != 6:
            raise ValueError("the desk's terminal number is 6 bytes (12 hex digits)")
        self.wait = wait
        self.clock = clock
        self._lock = threading.Lock()
        self._held = None  # (session, asn, amount, deadline) of a prepared load

    def _session(self):
        session = self.reader.poll(self.wait)
        if session is None:
            raise DeskError(404, "no card in the desk reader: put the card on the reader")
        return session

    def _check_free(self) -> None:
        if self._held is not None:
            if self.clock() < self._held[3]:
                raise DeskError(409, f"a top-up of card {self._held[1]} is waiting for the back office's answer: "
                                     "finish it or cancel it first")
            log.warning("desk: the prepared load of card %s timed out; its INITIALIZE is dropped", self._held[1])
            self._held = None

    def status(self) -> dict:
        with self._lock:
            held = self._held if self._held is not None and self.clock() < self._held[3] else None
            return {"terminal_id": self.terminal_id.hex(), "holding": None if held is None else held[1]}

    def read(self) -> dict:
        """The card in the reader: what issuance reads (ASN, type, validity, balance, both counters)."""
        from backoffice.cards.issuance import read_card

        with self._lock:
            self._check_free()
            facts = _card_call(read_card, self._session())
        out = asdict(facts)
        out.update(valid_from=facts.valid_from.isoformat(), valid_to=facts.valid_to.isoformat())
        return out

    def prepare_load(self, amount: int) -> dict:
        from backoffice.cards.topup import read_for_load

        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= 100_000_00:
            raise DeskError(422, "amount: a positive whole number of fen")
        with self._lock:
            self._check_free()
            session = self._session()
            facts, records, init = _card_call(read_for_load, session, amount=amount, terminal_id=self.terminal_id)
            self._held = (session, facts.asn, amount, self.clock() + HOLD_SECONDS)
        return {"asn": facts.asn, "amount": amount, "terminal_id": self.terminal_id.hex(), "balance": init.balance,
                "online_ttc": init.online_ttc, "init_answer": _init_bytes(init).hex(),
                "log": [_log_bytes(r).hex() for r in records]}

    def credit(self, credit_apdu: str) -> dict:
        try:
            command = bytes.fromhex(credit_apdu)
        except (TypeError, ValueError):
            raise DeskError(422, "credit_apdu: hex digits") from None
        if len(command) not in (16, 17) or not command.startswith(CREDIT_PREFIX):  # Le is optional
            raise DeskError(422, "only a CREDIT FOR LOAD (80 52 00 00 0B ...) goes to the card")
        with self._lock:
            if self._held is None or self.clock() >= self._held[3]:
                self._held = None
                raise DeskError(409, "no top-up is waiting here (it timed out, or was never prepared): start again")
            session, asn, amount, _deadline = self._held
            self._held = None  # whatever the card answers, this INITIALIZE is used up
            tac = _card_call(lambda: apdu.parse_credit(apdu.check(session.exchange(command), "CREDIT FOR LOAD")))
            balance = _card_call(lambda: apdu.parse_balance(apdu.check(session.exchange(apdu.get_balance()),
                                                                       "GET BALANCE")))
        return {"asn": asn, "amount": amount, "tac": tac.hex(), "balance": balance}

    def cancel(self) -> dict:
        with self._lock:
            held, self._held = self._held, None
        return {"cancelled": None if held is None else held[1]}


def _card_call(fn, *args, **kwargs):
    """A card or reader failure as a refusal the page can show."""
    from validator.readers import ReaderError

    try:
        return fn(*args, **kwargs)
    except ReaderError as e:
        raise DeskError(503, f"the reader lost the card: {e}. Put it back and start again") from None
    except (apdu.StatusError, apdu.ResponseError) as e:
        raise DeskError(409, f"the card refused: {e}") from None


def _init_bytes(init: apdu.LoadInit) -> bytes:
    """INITIALIZE FOR LOAD's 16 answer bytes, as the card sent them (balance, online TTC, key version,
    algorithm, random, MAC1): the back office checks MAC1 over them."""
    return (init.balance.to_bytes(4, "big") + init.online_ttc.to_bytes(2, "big")
            + bytes([init.key_version, init.algorithm]) + init.random + init.mac1)


def _log_bytes(r: apdu.LogRecord) -> bytes:
    """A log record's 23 bytes as READ RECORD answered them (epurse.apdu.parse_log_record read them)."""
    return (r.ttc.to_bytes(2, "big") + r.overdraft.to_bytes(3, "big") + r.amount.to_bytes(4, "big")
            + bytes([r.tx_type]) + r.terminal_id + r.date + r.time)


# ------------------------------------------------------------------------------------------------ HTTP
def make_server(desk: Desk, *, origin: str, pairing: str, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    allowed = origin_of(origin)
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}

    class Handler(BaseHTTPRequestHandler):
        server_version = "farebox-desk/1"

        def log_message(self, fmt, *args):  # through logging, not stderr
            log.info("desk %s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: dict | None, *, cors: bool = True) -> None:
            data = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            if cors:
                self.send_header("Access-Control-Allow-Origin", allowed)
                self.send_header("Vary", "Origin")
            self.send_header("Cache-Control", "no-store")
            if body is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _gate(self) -> bool:
            """Host and Origin checks; False (and answered) when the request may not go on."""
            if self.headers.get("Host", "").lower() not in hosts:
                self._send(403, {"error": "wrong host: the desk agent answers on 127.0.0.1 only"}, cors=False)
                return False
            sent = self.headers.get("Origin")
            if sent is not None and sent.lower() != allowed:
                self._send(403, {"error": f"origin {sent} is not this desk's back office"}, cors=False)
                return False
            return True

        def do_OPTIONS(self):  # noqa: N802 - the CORS preflight
            if not self._gate():
                return
            self.send_response(204)
            self.send_header("Access-Control-Allow-Origin", allowed)
            self.send_header("Access-Control-Allow-Methods", "GET, POST")
            self.send_header("Access-Control-Allow-Headers", f"Content-Type, {PAIRING_HEADER}")
            self.send_header("Access-Control-Max-Age", "600")
            if self.headers.get("Access-Control-Request-Private-Network"):
                self.send_header("Access-Control-Allow-Private-Network", "true")
            self.send_header("Vary", "Origin")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _paired(self) -> bool:
            if not hmac.compare_digest(self.headers.get(PAIRING_HEADER, "").encode(), pairing.encode()):
                self._send(401, {"error": "not paired: type the pairing code `farebox desk` printed"})
                return False
            return True

        def do_GET(self):  # noqa: N802
            if not self._gate() or not self._paired():
                return
            if self.path == "/status":
                self._send(200, desk.status())
            else:
                self._send(404, {"error": f"no {self.path}"})

        def do_POST(self):  # noqa: N802
            if not self._gate() or not self._paired():
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > 4096:
                    raise DeskError(413, "request too large")
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                if not isinstance(body, dict):
                    raise DeskError(422, "a JSON object, please")
                if self.path == "/card/read":
                    answer = desk.read()
                elif self.path == "/load/prepare":
                    answer = desk.prepare_load(body.get("amount"))
                elif self.path == "/load/credit":
                    answer = desk.credit(body.get("credit_apdu", ""))
                elif self.path == "/load/cancel":
                    answer = desk.cancel()
                else:
                    raise DeskError(404, f"no {self.path}")
            except DeskError as e:
                self._send(e.status, {"error": str(e)})
            except ValueError as e:
                self._send(422, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - the agent stays up for the next card
                log.exception("desk: %s failed", self.path)
                self._send(500, {"error": f"the desk agent failed: {e}"})
            else:
                self._send(200, answer)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def new_pairing_code() -> str:
    return secrets.token_urlsafe(12)

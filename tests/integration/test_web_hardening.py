"""The web app from outside, as an attacker tries it: a real uvicorn server in its own process (with its own
temporary-file folder, so what it spools to disk can be measured) over a SQLite file and a token file made with the
same functions `farebox token add` uses. Raw sockets where a client library would not send what an attacker sends.

- size limits act before authentication: a huge body to the login form or an API address is answered 413 at once,
  nothing is spooled, the server keeps answering;
- security headers on pages and API answers; the login cookie HttpOnly, SameSite=Strict, Secure when configured;
- tokens expire and are revocable: a page session after logout, an expired token, a token revoked with
  `farebox token revoke` while the server runs: all 401.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from backoffice.db import make_engine, upgrade
from backoffice.web.app import create_app
from backoffice.web.auth import COOKIE, Principal, TokenStore, add_token
from farebox.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
SERVER = """
import sys
from datetime import timedelta
from pathlib import Path

import uvicorn

from backoffice.db import make_engine
from backoffice.web.app import create_app

db, tokens, port, session_seconds, secure = sys.argv[1:6]
app = create_app(make_engine(db), tokens=Path(tokens), migrate=False,
                 session_lifetime=timedelta(seconds=float(session_seconds)),
                 secure_cookies={"auto": None, "yes": True}[secure])
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


class Live:
    def __init__(self, proc: subprocess.Popen, base: str, tokens: dict[str, str], token_file: Path, tmp: Path,
                 env: dict):
        self.proc, self.base, self.tokens, self.token_file, self.tmp, self.env = proc, base, tokens, token_file, \
            tmp, env
        self.port = int(base.rsplit(":", 1)[1])

    def spooled_bytes(self) -> int:
        """Bytes in the files the server holds open in its temporary folder, deleted ones included (Python's
        TemporaryFile unlinks at once, so the folder listing alone would show nothing)."""
        total = 0
        for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
                if target.startswith(str(self.tmp)):
                    total += os.stat(fd).st_size
            except OSError:
                continue
        return total + sum(p.stat().st_size for p in self.tmp.rglob("*") if p.is_file())


def _start(tmp_path: Path, *, session_seconds: float = 12 * 3600, secure: str = "auto") -> Live:
    db = f"sqlite:///{tmp_path / 'bo.db'}"
    engine = make_engine(db)
    upgrade(engine)
    engine.dispose()
    token_file = tmp_path / "api-tokens.toml"
    tokens = {"clerk": add_token(token_file, role="clerk", name="alice", operator="op_a"),
              "ops": add_token(token_file, role="operations", name="dave", days=30)}
    tmp = tmp_path / "server-tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "FAREBOX_API_TOKENS": str(token_file),
           "FAREBOX_VAR_DIR": str(tmp_path / "var")}
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, db, str(token_file), str(port), str(session_seconds),
                             secure], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/login", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up: {(tmp_path / 'server.log').read_text()[-3000:]}")
        time.sleep(0.1)
    return Live(proc, base, tokens, token_file, tmp, env)


def _stop(live: Live) -> None:
    live.proc.terminate()
    try:
        live.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        live.proc.kill()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = _start(tmp_path_factory.mktemp("live"))
    yield server
    _stop(server)


# ------------------------------------------------------------------------------------------------ size limits
def _flood(live: Live, head: bytes, chunks, *, seconds: float = 6.0) -> tuple[bytes, float, int, int]:
    """Send ``head`` then ``chunks`` of body on a raw socket while reading the answer. Returns what came back,
    how long the first byte of the answer took, the bytes of body sent, and the most the server had spooled to
    its temporary folder meanwhile."""
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=seconds)
    sent, spooled, answer = [0], [0], bytearray()
    stop = threading.Event()

    def pump():
        try:
            sock.sendall(head)
            for chunk in chunks:
                if stop.is_set():
                    return
                sock.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:  # the server closed the connection: what we want
            return

    t0 = time.monotonic()
    writer = threading.Thread(target=pump, daemon=True)
    writer.start()
    first = None
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        spooled[0] = max(spooled[0], live.spooled_bytes())
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        if first is None:
            first = time.monotonic() - t0
        answer += data
    stop.set()
    sock.close()
    writer.join(5)
    return bytes(answer), (first if first is not None else float("inf")), sent[0], spooled[0]


def _endless(size: int = 256 * 1024):
    block = b"x" * size
    while True:
        yield block


def test_a_huge_unauthenticated_login_is_refused_before_its_body_is_read(live):
    boundary = "farebox-flood"
    head = (f"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {int(1.5 * GIB)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"token\"; filename=\"t\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield part
        yield from _endless()

    answer, first, sent, spooled = _flood(live, head, body())
    assert spooled == 0, f"{spooled:,} bytes spooled to the server's temporary folder ({sent:,} sent)"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert first < 2.0, f"the 413 took {first:.2f} s"
    assert b"larger than this address takes (8 KB)" in answer
    assert sent < 200 * 1024**2  # the server closed the connection: the client did not push on to 1.5 GB
    assert httpx.get(f"{live.base}/login", timeout=5).status_code == 200  # and it still answers


def test_a_chunked_body_is_counted_as_it_streams_and_cut_at_the_limit(live):
    """No length to check up front: the bytes are counted as they come, and the 413 goes out at the limit."""
    head = (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")

    def chunks():
        part = b'--b\r\nContent-Disposition: form-data; name="token"; filename="t"\r\n\r\n'
        yield b"%x\r\n" % len(part) + part + b"\r\n"
        for block in _endless(64 * 1024):
            yield b"%x\r\n" % len(block) + block + b"\r\n"

    answer, first, sent, spooled = _flood(live, head, chunks())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert first < 2.0 and spooled == 0, (first, spooled)
    assert sent < 200 * 1024**2
    assert httpx.get(f"{live.base}/login", timeout=5).status_code == 200


def test_the_documented_uploads_have_larger_limits_of_their_own(live):
    """The issuer's file (50 MB) and the payment platform's (20 MB): a declared length over their limit is refused
    at once; one under it goes on to the token check like any request."""
    def declared(path: str, length: int) -> bytes:
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode())
        answer = b""
        try:
            while chunk := sock.recv(4096):  # the server closes after its 413
                answer += chunk
        finally:
            sock.close()
        return answer

    issuer = "/api/v1/operators/op_a/reconciliation/issuer-file?day=2026-03-04"
    answer = declared(issuer, 60 * 1024**2)
    assert answer.startswith(b"HTTP/1.1 413") and b"(51 MB)" in answer
    assert declared("/api/v1/payments/reconciliation?day=2026-03-04", 30 * 1024**2).startswith(b"HTTP/1.1 413")
    # within the limit, the server waits for the body (nothing comes back before it): the door is the token check
    r = httpx.post(f"{live.base}{issuer}", files={"file": ("f.csv", b"a" * (2 * 1024**2), "text/csv")}, timeout=10)
    assert r.status_code == 401


def test_json_over_the_default_limit_is_refused_before_the_token_is_looked_at(live):
    r = httpx.post(f"{live.base}/api/v1/routes", content=b"[" + b"1," * 200_000 + b"1]",
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413 and "256 KB" in r.json()["detail"]
    small = httpx.post(f"{live.base}/api/v1/routes", json={"code": "r1"}, timeout=10)
    assert small.status_code == 401  # a body within the limit goes on to the token check


# ------------------------------------------------------------------------------------------------ headers
def test_pages_and_api_answers_carry_the_security_headers(live):
    for url, token in (("/login", None), ("/devices", live.tokens["clerk"]), ("/api/v1/me", live.tokens["ops"]),
                       ("/nowhere", None)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.get(live.base + url, headers=headers, timeout=5)
        assert r.status_code in (200, 401, 404), (url, r.status_code)
        h = r.headers
        assert h["x-content-type-options"] == "nosniff", url
        assert h["x-frame-options"] == "DENY", url
        assert h["referrer-policy"] == "same-origin", url
        csp = h["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "script-src" not in csp, url
        assert h["cache-control"] == "no-store", url
    css = httpx.get(f"{live.base}/static/farebox.css", timeout=5)
    assert css.status_code == 200 and "no-store" not in css.headers.get("cache-control", "")
    assert css.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in httpx.get(f"{live.base}/docs", timeout=5).headers["content-security-policy"]


# ------------------------------------------------------------------------------------------------ tokens and sessions
def _login(live: Live, token: str) -> httpx.Response:
    return httpx.post(f"{live.base}/login", data={"token": token, "next": "/devices"}, timeout=10)


def _page(live: Live, session: str) -> int:
    return httpx.get(f"{live.base}/devices", cookies={COOKIE: session}, timeout=10).status_code


def test_logout_ends_the_session_for_every_copy_of_the_cookie(live):
    r = _login(live, live.tokens["clerk"])
    assert r.status_code == 303, r.text[:300]
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie  # plain http here
    assert "Max-Age=43200" in cookie  # 12 hours
    session = r.cookies[COOKIE]
    assert session.startswith("fbs_") and live.tokens["clerk"] not in cookie  # the token never goes in a cookie
    assert _page(live, session) == 200
    out = httpx.post(f"{live.base}/logout", cookies={COOKIE: session}, timeout=10)
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
    assert _page(live, session) == 401  # a copy kept by anyone is worthless now
    assert _page(live, "fbs_" + "x" * 43) == 401
    # the token itself still opens a new session: logout ends a session, revoking a token is `farebox token revoke`
    assert _page(live, _login(live, live.tokens["clerk"]).cookies[COOKIE]) == 200


def test_an_expired_token_is_refused_by_the_api_and_the_login_form(live):
    old = add_token(live.token_file, role="operations", name="temp", days=1,
                    now=datetime.now(UTC) - timedelta(days=1, seconds=1))
    fresh = add_token(live.token_file, role="operations", name="fresh", days=1)
    me = f"{live.base}/api/v1/me"
    assert httpx.get(me, headers={"Authorization": f"Bearer {fresh}"}, timeout=10).status_code == 200
    r = httpx.get(me, headers={"Authorization": f"Bearer {old}"}, timeout=10)
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert _login(live, old).status_code == 401


def test_a_token_revoked_with_the_cli_is_refused_at_once_by_the_running_server(live):
    token = add_token(live.token_file, role="operations", name="leaver", days=30)
    me = f"{live.base}/api/v1/me"
    assert httpx.get(me, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    session = _login(live, token).cookies[COOKIE]
    assert _page(live, session) == 200
    out = subprocess.run([sys.executable, "-m", "farebox.cli", "token", "revoke", "--name", "leaver"], env=live.env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert httpx.get(me, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 401
    assert _page(live, session) == 401  # the sessions opened with it end with it
    listed = subprocess.run([sys.executable, "-m", "farebox.cli", "token", "list"], env=live.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60).stdout
    assert any(line.startswith("leaver") and "revoked" in line for line in listed.splitlines()), listed
    assert httpx.get(me, headers={"Authorization": f"Bearer {live.tokens['ops']}"}, timeout=10).status_code == 200
    again = subprocess.run([sys.executable, "-m", "farebox.cli", "token", "revoke", "--name", "leaver"],
                           env=live.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "no token named 'leaver'" in again.stderr


def test_farebox_token_add_gives_tokens_an_end(live, tmp_path):
    path = tmp_path / "tokens.toml"
    env = {**live.env, "FAREBOX_API_TOKENS": str(path)}
    out = subprocess.run([sys.executable, "-m", "farebox.cli", "token", "add", "--role", "operations", "--name", "x",
                          "--days", "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (entry,) = TokenStore(path).entries()
    assert timedelta(days=2) - timedelta(minutes=1) < entry.expires_at - datetime.now(UTC) <= timedelta(days=2)
    default = add_token(path, role="operations", name="y")
    assert default and TokenStore(path).entries()[1].expires_at - datetime.now(UTC) > timedelta(days=89)


# ------------------------------------------------------------------------------------------------ in process
def test_a_page_session_ends_after_its_lifetime_and_the_cookie_can_be_made_secure(tmp_path):
    from fastapi.testclient import TestClient

    engine = make_engine(f"sqlite:///{tmp_path / 'bo.db'}")
    upgrade(engine)
    store = TokenStore(tokens={"t-ops": Principal("dave", "operations")})
    app = create_app(engine, tokens=store, migrate=False, secure_cookies=True)
    with TestClient(app, base_url="http://testserver") as client:
        r = client.post("/login", data={"token": "t-ops", "next": "/devices"}, follow_redirects=False)
        assert "Secure" in r.headers["set-cookie"]  # configured: behind a TLS proxy the app sees plain http
        session = r.cookies[COOKIE]
    sessions = app.state.services.sessions
    now = datetime.now(UTC)
    assert sessions.principal(session, now=now + timedelta(hours=11, minutes=59)) == Principal("dave", "operations")
    assert sessions.principal(session, now=now + timedelta(hours=12, seconds=1)) is None
    engine.dispose()

"""`python -m bench shop`: ticket sales per second through the HTTP API with concurrent buyers, on PostgreSQL, beside
a bare INSERT of the same orders.

- ``http``: the back office (uvicorn, one worker, in a process of its own, as ``farebox serve`` runs it) on a fresh
  PostgreSQL database; ``buyers`` threads each sell orders one after another, a sale being the three requests a
  paid ticket takes: ``POST /api/v1/partner/orders`` (a single ride and a seat on one of four coaches: the seat
  holds contend on four rows), the payment platform's signed notification ``POST /api/v1/ota/webhook`` (the test
  platform's key, signed here), and ``GET .../tickets`` (issue: two Ed25519-signed tokens). Timed per sale and as
  sales per second over the whole run.
- ``bare_insert``: the same number of orders by the same number of threads straight into the same tables with
  psycopg, one transaction each: the order row, its two items, the conditional seat UPDATE, the hold, an audit line,
  the two ticket rows (token text precomputed). The floor the database sets under this concurrency.

Afterwards the books are checked with plain SQL (orders issued, tickets, every departure's ``seats_taken`` equal to
its sold holds, nothing oversold). Nothing is asserted on speed. Results in bench/results/shop.json.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

from bench.common import fmt_ratio, fmt_us, ratio, summary_us, table, write_result

OP = "shopbench"
COACHES = 4
TOKEN = "t-bench-partner"


def _setup(url: str, *, seats: int) -> list[int]:
    from backoffice import registry
    from backoffice.db import make_engine, upgrade
    from backoffice.tickets import catalogue

    engine = make_engine(url)
    upgrade(engine)
    now = datetime.now(UTC)
    day = date.today() + timedelta(days=2)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Shop bench", at=now - timedelta(days=3))
        registry.add_route(conn, code="B1", operator=OP, name="Bench route", flat_fare=200, at=now - timedelta(days=3))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="Ride", price_fen=200, by="bench",
                              now=now)
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Coach", price_fen=3000,
                              by="bench", now=now)
        deps = [catalogue.add_departure(conn, operator=OP, product="coach", route="B1", service_date=day,
                                        departs=f"{8 + i:02d}:00", seats=seats).id for i in range(COACHES)]
    engine.dispose()
    return deps


def serve(url: str, port: int) -> None:
    """The server process: the app on ``url`` with a partner token and the published test keys (bench only)."""
    import logging

    import uvicorn

    from backoffice.db import make_engine
    from backoffice.keyservice import LocalKeyService
    from backoffice.tickets.keys import published_test_keys
    from backoffice.web.api.ota import TEST_PLATFORM_PUBLIC_KEY, configure_ota
    from backoffice.web.app import create_app
    from backoffice.web.auth import Principal, TokenStore
    from backoffice.web.shop_service import configure_shop
    from epurse.keys import TEST_ISSUER_KEYS

    logging.basicConfig(level=logging.WARNING)
    engine = make_engine(url)
    app = create_app(engine, tokens=TokenStore(tokens={TOKEN: Principal("bench-app", "partner", OP)}), migrate=False)
    configure_ota(app, keys=LocalKeyService(TEST_ISSUER_KEYS, source="test keys"),
                  webhook_key=bytes.fromhex(TEST_PLATFORM_PUBLIC_KEY))
    configure_shop(app, ticket_keys=published_test_keys(), platform=None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _http_sales(base: str, deps: list[int], *, orders: int, buyers: int) -> tuple[list[int], float, int]:
    import httpx

    from hardware_sim.payment import PaymentPlatform

    platform = PaymentPlatform()
    next_no = iter(range(orders))
    lock = threading.Lock()
    samples: list[int] = []
    failures = [0]

    def buyer(_):
        with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            while True:
                with lock:
                    n = next(next_no, None)
                if n is None:
                    return
                t = time.perf_counter_ns()
                no = f"B-{n}"
                r = c.post("/api/v1/partner/orders", json={"partner_order_no": no, "phone": "13800000000", "items": [
                    {"product": "ride"}, {"product": "coach", "departure_id": deps[n % len(deps)]}]})
                if r.status_code != 201:
                    failures[0] += 1
                    continue
                made = r.json()
                hook = platform.pay(made["order_id"], made["total_fen"])
                c.post("/api/v1/ota/webhook", content=hook.body,
                       headers={"X-Payment-Signature": hook.signature, "Content-Type": "application/json"})
                got = c.get(f"/api/v1/partner/orders/{no}/tickets").json()
                if len(got.get("tickets", [])) != 2:
                    failures[0] += 1
                    continue
                samples.append(time.perf_counter_ns() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(buyers) as pool:
        list(pool.map(buyer, range(buyers)))
    return samples, time.perf_counter() - start, failures[0]


def _bare_inserts(libpq_url: str, deps: list[int], *, orders: int, buyers: int) -> tuple[list[int], float]:
    import psycopg

    token = "FT1." + "A" * 170
    next_no = iter(range(orders))
    lock = threading.Lock()
    samples: list[int] = []
    now = datetime.now(UTC)

    def buyer(_):
        with psycopg.connect(libpq_url) as conn:
            while True:
                with lock:
                    n = next(next_no, None)
                if n is None:
                    return
                t = time.perf_counter_ns()
                order_id, dep = f"BARE{n:08d}{secrets.token_hex(4)}", deps[n % len(deps)]
                with conn.transaction():
                    conn.execute("INSERT INTO ticket_order (order_id, operator, channel, phone, state, total_fen, "
                                 "paid_fen, refunded_fen, idempotency_key, created_at, updated_at, expires_at) "
                                 "VALUES (%s, %s, 'partner', '13800000000', 'issued', 3200, 3200, 0, %s, %s, %s, %s)",
                                 (order_id, OP, f"bare-{n}", now, now, now + timedelta(minutes=15)))
                    for product, d, fen in (("ride", None, 200), ("coach", dep, 3000)):
                        conn.execute("INSERT INTO order_item (order_id, product_id, departure_id, quantity, unit_fen, "
                                     "amount_fen) SELECT %s, id, %s, 1, %s, %s FROM product WHERE operator = %s AND "
                                     "code = %s", (order_id, d, fen, fen, OP, product))
                    conn.execute("UPDATE departure SET seats_taken = seats_taken + 1 WHERE id = %s AND "
                                 "seats_taken + 1 <= seats", (dep,))
                    conn.execute("INSERT INTO seat_hold (departure_id, order_id, seats, state, created_at, expires_at)"
                                 " VALUES (%s, %s, 1, 'sold', %s, %s)", (dep, order_id, now, now))
                    conn.execute("INSERT INTO order_audit (order_id, at, who, from_state, to_state, why) VALUES "
                                 "(%s, %s, 'bench', NULL, 'issued', 'bare insert')", (order_id, now))
                    for i in range(2):
                        tid = secrets.randbelow(2**62) + 1
                        conn.execute(
                            "INSERT INTO ticket (ticket_id, order_id, item_id, product_id, departure_id, operator, "
                            "kind, routes, rider_category, price_fen, valid_from, valid_to, uses_allowed, uses_made, "
                            "key_id, state, issued_at, updated_at, pickup_serial, token) SELECT %s, %s, oi.id, "
                            "oi.product_id, oi.departure_id, %s, 'single', '', 1, oi.unit_fen, %s, %s, 1, 0, 0, "
                            "'issued', %s, %s, %s, %s FROM order_item oi WHERE oi.order_id = %s ORDER BY oi.id "
                            "LIMIT 1 OFFSET %s",
                            (tid, order_id, OP, now, now + timedelta(days=1), now, now, tid % 10**10, token,
                             order_id, i))
                samples.append(time.perf_counter_ns() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(buyers) as pool:
        list(pool.map(buyer, range(buyers)))
    return samples, time.perf_counter() - start


def _books(libpq_url: str) -> dict:
    import psycopg

    with psycopg.connect(libpq_url) as conn:
        def one(q):
            return conn.execute(q).fetchone()[0]
        return {
            "orders_issued": one("SELECT COUNT(*) FROM ticket_order WHERE state = 'issued' AND channel = 'partner' "
                                 "AND idempotency_key LIKE 'B-%'"),
            "tickets": one("SELECT COUNT(*) FROM ticket t JOIN ticket_order o ON o.order_id = t.order_id "
                           "WHERE o.idempotency_key LIKE 'B-%'"),
            "seats_agree": one("SELECT COUNT(*) = 0 FROM departure d WHERE d.seats_taken <> (SELECT COALESCE(SUM("
                               "seats), 0) FROM seat_hold h WHERE h.departure_id = d.id AND h.state IN ('held', "
                               "'sold'))"),
            "oversold": one("SELECT COUNT(*) FROM departure WHERE seats_taken > seats"),
        }


def run(*, orders: int = 400, buyers: int = 16, console, results_dir) -> dict:
    from bench.ingest import DEFAULT_PG_URL, Unavailable, postgres

    pg_url = os.environ.get("FAREBOX_BENCH_PG_URL", DEFAULT_PG_URL)
    seats = min(1000, orders)  # enough for both runs on four coaches
    try:
        with postgres(pg_url) as backend:
            deps = _setup(backend.database_url, seats=seats)
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-c", f"from bench.shop import serve; serve({backend.database_url!r}, "
                                     f"{port})"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                base = f"http://127.0.0.1:{port}"
                _wait_up(base, proc)
                http, http_s, failures = _http_sales(base, deps, orders=orders, buyers=buyers)
            finally:
                proc.terminate()
                proc.wait(20)
            bare, bare_s = _bare_inserts(backend.libpq_url, deps, orders=orders, buyers=buyers)
            books = _books(backend.libpq_url)
    except Unavailable as e:
        console.print(f"[yellow]shop: skipped: {e}")
        return {}
    rate = {"http": round(len(http) / http_s, 1), "bare_insert": round(len(bare) / bare_s, 1)}
    timing = {"http_sale": summary_us(http), "bare_insert": summary_us(bare)}
    rows = [["http sale (order, notification, tickets)", f"{rate['http']:.1f}/s",
             fmt_us(timing["http_sale"]["p50_us"]), fmt_us(timing["http_sale"]["p99_us"])],
            ["bare INSERT of the same rows", f"{rate['bare_insert']:.1f}/s", fmt_us(timing["bare_insert"]["p50_us"]),
             fmt_us(timing["bare_insert"]["p99_us"])]]
    console.print(table(f"shop: ticket sales with {buyers} concurrent buyers on PostgreSQL",
                        ["what", "rate", "p50", "p99"], rows,
                        caption=f"{orders} orders each (a ride and a coach seat on one of {COACHES} departures); "
                                f"bare / http = {fmt_ratio(ratio(rate['bare_insert'], rate['http']))}; "
                                f"failed sales {failures}; books {books}"))
    doc = {"orders": orders, "buyers": buyers, "coaches": COACHES, "failed_sales": failures,
           "sales_per_s": rate, "timing": timing,
           "ratio_bare_to_http_rate": ratio(rate["bare_insert"], rate["http"]), "books": books}
    path = write_result("shop", doc, results_dir)
    console.print(f"JSON: {path}")
    return json.loads(json.dumps(doc))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(base: str, proc, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the bench server stopped: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(base + "/openapi.json", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the bench server did not come up")

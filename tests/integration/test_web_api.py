"""The API and pages against real databases (a SQLite file and PostgreSQL) holding a small city put in through the
real use cases (tests/web_city.py): every endpoint x every role, a clerk never seeing another company's data, and
the numbers people read (dashboard, settlement, card balance) against sums written here with plain loops."""

from __future__ import annotations

import os
import secrets
from collections import defaultdict
from datetime import date, datetime, timedelta
from unittest import mock

import pytest
from fastapi.testclient import TestClient
from web_city import A_NAME, B_NAME, CARDS, DEVICES, NOW, SHARED_CARD, A, B, seed

from backoffice.cards import topup
from backoffice.db import make_engine, upgrade
from backoffice.denylist_publish import build_version
from backoffice.keyservice import LocalKeyService
from backoffice.tickets import catalogue, orders
from backoffice.web.api.ota import TEST_PLATFORM_PUBLIC_KEY, configure_ota
from backoffice.web.app import create_app
from backoffice.web.auth import COOKIE, Principal, TokenStore, add_token, endpoints
from epurse.keys import TEST_ISSUER_KEYS
from wire.records import RecordKind

TODAY, YESTERDAY = date(2026, 3, 5), date(2026, 3, 4)
TOKENS = {"clerk": "t-clerk-a", "clerk_b": "t-clerk-b", "operator_staff": "t-staff", "operations": "t-ops",
          "admin": "t-admin", "partner": "t-partner"}
ROLES = ("clerk", "operator_staff", "operations", "admin", "partner")
NOBODY = "00000000000000000000"  # a card never issued
EDITABLE = {"routes": "c1", "vehicles": "cv1", "drivers": "cd1", "devices": "cb_001"}  # kind -> an entry of A's

# Every endpoint: a concrete URL (operator A's objects) and the roles that own it besides admin. A new endpoint fails
# test_every_endpoint_is_in_the_matrix until it is added here, so none escapes the matrix.
MATRIX = {
    ("GET", "/api/v1/operators"): ("/api/v1/operators", {"clerk", "operations"}),
    ("GET", "/api/v1/operators/{key}"): (f"/api/v1/operators/{A}", {"clerk", "operations"}),
    ("POST", "/api/v1/operators"): ("/api/v1/operators", set()),  # admin only: a new bus company
    ("POST", "/api/v1/operators/{operator}/commission-rates"): (f"/api/v1/operators/{A}/commission-rates", set()),
    ("GET", "/api/v1/operators/{operator}/commission-rates"): (f"/api/v1/operators/{A}/commission-rates",
                                                               {"clerk", "operations"}),
    ("POST", "/api/v1/fleets"): ("/api/v1/fleets", {"clerk", "operations"}),
    ("POST", "/api/v1/operators/{operator}/fare-rules"): (f"/api/v1/operators/{A}/fare-rules", {"clerk", "operations"}),
    ("GET", "/api/v1/routes"): ("/api/v1/routes", {"clerk", "operations"}),
    ("GET", "/api/v1/routes/{key}"): ("/api/v1/routes/c1", {"clerk", "operations"}),
    ("GET", "/api/v1/vehicles"): ("/api/v1/vehicles", {"clerk", "operations"}),
    ("GET", "/api/v1/vehicles/{key}"): ("/api/v1/vehicles/cv1", {"clerk", "operations"}),
    ("GET", "/api/v1/drivers"): ("/api/v1/drivers", {"clerk", "operations"}),
    ("GET", "/api/v1/drivers/{key}"): ("/api/v1/drivers/cd1", {"clerk", "operations"}),
    ("GET", "/api/v1/devices"): ("/api/v1/devices", {"clerk", "operations"}),
    ("GET", "/api/v1/devices/{key}"): ("/api/v1/devices/cb_001", {"clerk", "operations"}),
    ("GET", "/api/v1/operators/{operator}/days/{day}/taps"): (f"/api/v1/operators/{A}/days/{TODAY}/taps",
                                                              {"clerk"}),
    ("GET", "/api/v1/operators/{operator}/days/{day}/settlement"): (
        f"/api/v1/operators/{A}/days/{YESTERDAY}/settlement", {"clerk"}),
    ("GET", "/api/v1/operators/{operator}/days/{day}/settlement.pdf"): (
        f"/api/v1/operators/{A}/days/{YESTERDAY}/settlement.pdf", {"clerk"}),
    ("GET", "/api/v1/dashboard"): ("/api/v1/dashboard", {"clerk", "operations"}),
    ("GET", "/api/v1/fleet"): ("/api/v1/fleet", {"clerk", "operations"}),
    ("GET", "/api/v1/quarantine"): ("/api/v1/quarantine", {"clerk", "operations"}),
    ("GET", "/api/v1/quarantine/rows"): ("/api/v1/quarantine/rows?status=all", {"clerk", "operations"}),
    ("GET", "/api/v1/quarantine/{quarantine_id}"): ("/api/v1/quarantine/1", {"clerk", "operations"}),
    ("POST", "/api/v1/quarantine/{quarantine_id}/release"): ("/api/v1/quarantine/999999/release", {"operations"}),
    ("POST", "/api/v1/quarantine/{quarantine_id}/reject"): ("/api/v1/quarantine/999999/reject", {"operations"}),
    ("GET", "/api/v1/denylist/versions"): ("/api/v1/denylist/versions", {"operator_staff", "operations"}),
    ("GET", "/api/v1/cards/{asn}"): (f"/api/v1/cards/{SHARED_CARD}", {"operator_staff"}),
    ("GET", "/api/v1/me"): ("/api/v1/me", {"clerk", "operator_staff", "operations"}),
    ("GET", "/api/v1/cards/{asn}/ledger"): (f"/api/v1/cards/{SHARED_CARD}/ledger", {"operator_staff"}),
    ("POST", "/api/v1/cards/{asn}/lost"): (f"/api/v1/cards/{NOBODY}/lost", {"operator_staff"}),
    ("POST", "/api/v1/cards/{asn}/refund"): (f"/api/v1/cards/{NOBODY}/refund", {"operator_staff"}),
    ("POST", "/api/v1/cards/{asn}/adjustments"): (f"/api/v1/cards/{NOBODY}/adjustments", {"operator_staff"}),
    ("POST", "/api/v1/cases/{case_id}/close"): ("/api/v1/cases/999999/close", {"operator_staff"}),
    ("POST", "/api/v1/ota/orders"): ("/api/v1/ota/orders", {"operator_staff"}),
    ("GET", "/api/v1/ota/orders/{order_id}"): ("/api/v1/ota/orders/M1", {"operator_staff"}),
    ("POST", "/api/v1/ota/orders/{order_id}/load"): ("/api/v1/ota/orders/nope/load", {"operator_staff"}),
    ("POST", "/api/v1/ota/orders/{order_id}/tac"): ("/api/v1/ota/orders/nope/tac", {"operator_staff"}),
    ("POST", "/api/v1/ota/cards/{asn}/seen"): (f"/api/v1/ota/cards/{NOBODY}/seen", {"operator_staff"}),
    ("GET", "/api/v1/topups/orders"): ("/api/v1/topups/orders", {"operator_staff"}),
    # rider self-service: the mobile operator's gateway holds an operator_staff token (backoffice/web/api/rider.py)
    ("GET", "/api/v1/rider/cards/{asn}"): (f"/api/v1/rider/cards/{SHARED_CARD}", {"operator_staff"}),
    ("GET", "/api/v1/rider/cards/{asn}/rides"): (f"/api/v1/rider/cards/{SHARED_CARD}/rides", {"operator_staff"}),
    ("GET", "/api/v1/rider/cards/{asn}/topups"): (f"/api/v1/rider/cards/{SHARED_CARD}/topups", {"operator_staff"}),
    ("POST", "/api/v1/rider/cards/{asn}/lost"): (f"/api/v1/rider/cards/{NOBODY}/lost", {"operator_staff"}),
    ("POST", "/api/v1/topups/orders/{order_id}/retry"): ("/api/v1/topups/orders/nope/retry", {"operator_staff"}),
    ("POST", "/api/v1/topups/orders/{order_id}/refund"): ("/api/v1/topups/orders/nope/refund", {"operator_staff"}),
    ("POST", "/api/v1/topups/orders/{order_id}/confirm"): ("/api/v1/topups/orders/nope/confirm", {"operator_staff"}),
    ("GET", "/api/v1/operators/{operator}/reconciliation"): (f"/api/v1/operators/{A}/reconciliation?status=open",
                                                             {"clerk"}),
    ("POST", "/api/v1/operators/{operator}/reconciliation/items/{item_id}"): (
        f"/api/v1/operators/{A}/reconciliation/items/999999", {"clerk"}),
    ("POST", "/api/v1/operators/{operator}/reconciliation/issuer-file"): (
        f"/api/v1/operators/{A}/reconciliation/issuer-file?day={YESTERDAY}", {"clerk"}),
    # payment platform reconciliation: a write with no body is refused (422) before anything is stored
    ("GET", "/api/v1/payments/reconciliation"): ("/api/v1/payments/reconciliation?status=open", {"operator_staff"}),
    ("POST", "/api/v1/payments/reconciliation"): (
        f"/api/v1/payments/reconciliation?day={YESTERDAY}", {"operator_staff"}),
    ("POST", "/api/v1/payments/reconciliation/items/{item_id}"): (
        "/api/v1/payments/reconciliation/items/999999", {"operator_staff"}),
    # registry writes (aimed at entries that do not exist, or refused, so the shared city stays as it is) and history
    **{("POST", f"/api/v1/{k}"): (f"/api/v1/{k}", {"clerk", "operations"}) for k in EDITABLE},
    **{("PATCH", f"/api/v1/{k}/{{key}}"): (f"/api/v1/{k}/nope", {"clerk", "operations"}) for k in EDITABLE},
    **{("POST", f"/api/v1/{k}/{{key}}/retire"): (f"/api/v1/{k}/nope/retire", {"clerk", "operations"})
       for k in EDITABLE},
    **{("GET", f"/api/v1/{k}/{{key}}/history"): (f"/api/v1/{k}/{key}/history", {"clerk", "operations"})
       for k, key in EDITABLE.items()},
    # report downloads
    ("GET", "/api/v1/operators/{operator}/reports/days/{day}"): (f"/api/v1/operators/{A}/reports/days/{TODAY}",
                                                                 {"clerk"}),
    ("GET", "/api/v1/operators/{operator}/reports/days/{day}/settlement"): (
        f"/api/v1/operators/{A}/reports/days/{YESTERDAY}/settlement?format=xlsx", {"clerk"}),
    ("GET", "/api/v1/operators/{operator}/reports/months/{month}/settlement"): (
        f"/api/v1/operators/{A}/reports/months/2026-03/settlement?format=xlsx", {"clerk"}),
    ("GET", "/api/v1/operators/{operator}/reports/days/{day}/shifts/{device_id}/{shift_no}"): (
        f"/api/v1/operators/{A}/reports/days/{TODAY}/shifts/cb_001/1", {"clerk"}),
    ("GET", "/api/v1/operators/{operator}/reports/days/{day}/vehicles/{vehicle}"): (
        f"/api/v1/operators/{A}/reports/days/{TODAY}/vehicles/cv1", {"clerk"}),
    ("GET", "/"): ("/", {"clerk", "operator_staff", "operations"}),
    ("GET", "/manage/{kind}"): ("/manage/routes", {"clerk", "operations"}),
    ("POST", "/manage/{kind}"): ("/manage/routes", {"clerk", "operations"}),
    ("GET", "/manage/{kind}/{key}"): ("/manage/routes/c1", {"clerk", "operations"}),
    ("POST", "/manage/{kind}/{key}"): ("/manage/routes/nope", {"clerk", "operations"}),
    ("POST", "/manage/{kind}/{key}/retire"): ("/manage/routes/nope/retire", {"clerk", "operations"}),
    ("GET", "/reports"): (f"/reports?operator={A}&day={YESTERDAY}", {"clerk"}),
    ("GET", "/reports/day"): (f"/reports/day?operator={A}&day={YESTERDAY}&format=csv", {"clerk"}),
    ("GET", "/reports/month"): (f"/reports/month?operator={A}&month=2026-03&format=xlsx", {"clerk"}),
    ("GET", "/reports/shift"): (f"/reports/shift?operator={A}&day={TODAY}&device_id=cb_001&shift_no=1", {"clerk"}),
    ("GET", "/reports/vehicle"): (f"/reports/vehicle?operator={A}&day={TODAY}&vehicle=cv1", {"clerk"}),
    ("GET", "/dashboard"): ("/dashboard", {"clerk", "operations"}),
    ("GET", "/registry/{kind}"): ("/registry/routes", {"clerk", "operations"}),
    ("GET", "/devices"): ("/devices", {"clerk", "operations"}),
    ("GET", "/denylist"): ("/denylist", {"clerk", "operations", "operator_staff"}),
    ("GET", "/alarms"): ("/alarms", {"clerk", "operations"}),
    ("POST", "/alarms/{alarm_id}/ack"): ("/alarms/999999/ack", {"operations"}),
    ("GET", "/quarantine"): ("/quarantine", {"clerk", "operations"}),
    ("GET", "/quarantine/{quarantine_id}"): ("/quarantine/1", {"clerk", "operations"}),
    ("POST", "/quarantine/{quarantine_id}/release"): ("/quarantine/999999/release", {"operations"}),
    ("POST", "/quarantine/{quarantine_id}/reject"): ("/quarantine/999999/reject", {"operations"}),
    ("GET", "/cards"): (f"/cards?asn={SHARED_CARD}", {"operator_staff"}),
    ("GET", "/settlement"): (f"/settlement?operator={A}&day={YESTERDAY}", {"clerk"}),
    ("GET", "/settlement.pdf"): (f"/settlement.pdf?operator={A}&day={YESTERDAY}", {"clerk"}),
    ("POST", "/settlement/clear"): ("/settlement/clear", {"clerk"}),  # no day in the body: 422, nothing cleared
    ("POST", "/settlement/signoff"): ("/settlement/signoff", {"clerk"}),
    ("GET", "/taps"): (f"/taps?operator={A}", {"clerk", "operations"}),
    ("GET", "/taps.csv"): (f"/taps.csv?operator={A}", {"clerk", "operations"}),
    ("GET", "/taps.xlsx"): (f"/taps.xlsx?operator={A}", {"clerk", "operations"}),
    ("GET", "/tickets/report"): (f"/tickets/report?operator={A}", {"clerk"}),
    ("GET", "/tickets/report.csv"): (f"/tickets/report.csv?operator={A}", {"clerk"}),
    ("GET", "/tickets/report.xlsx"): (f"/tickets/report.xlsx?operator={A}", {"clerk"}),
    ("GET", "/cards/{asn}"): (f"/cards/{SHARED_CARD}", {"operator_staff"}),
    ("POST", "/cards/{asn}/lost"): (f"/cards/{NOBODY}/lost", {"operator_staff"}),
    ("POST", "/cards/{asn}/adjust"): (f"/cards/{NOBODY}/adjust", {"operator_staff"}),
    ("POST", "/cards/{asn}/refund"): (f"/cards/{NOBODY}/refund", {"operator_staff"}),
    ("GET", "/topups"): ("/topups", {"operator_staff"}),
    ("POST", "/topups/{order_id}/retry"): ("/topups/nope/retry", {"operator_staff"}),
    ("POST", "/topups/{order_id}/refund"): ("/topups/nope/refund", {"operator_staff"}),
    ("POST", "/topups/{order_id}/confirm"): ("/topups/nope/confirm", {"operator_staff"}),
    ("GET", "/topups/{order_id}"): ("/topups/M1", {"operator_staff"}),
    ("GET", "/cards/issue"): ("/cards/issue", {"operator_staff"}),
    ("POST", "/cards/issue"): ("/cards/issue", {"operator_staff"}),
    ("GET", "/cards/{asn}/lost"): (f"/cards/{SHARED_CARD}/lost", {"operator_staff"}),
    ("POST", "/cards/{asn}/counter-loads"): (f"/cards/{NOBODY}/counter-loads", {"operator_staff"}),
    ("POST", "/cards/counter-loads/{load_id}/tac"): ("/cards/counter-loads/999999/tac", {"operator_staff"}),
    ("POST", "/api/v1/cards/{asn}/counter-loads"): (f"/api/v1/cards/{NOBODY}/counter-loads", {"operator_staff"}),
    ("POST", "/api/v1/counter-loads/{load_id}/tac"): ("/api/v1/counter-loads/999999/tac", {"operator_staff"}),
    ("GET", "/reconciliation"): (f"/reconciliation?operator={A}", {"clerk"}),
    ("GET", "/admin/users"): ("/admin/users", set()),  # admins only; writes: this app's tokens are in memory (409)
    ("POST", "/admin/users"): ("/admin/users", set()),
    ("POST", "/admin/users/revoke"): ("/admin/users/revoke", set()),
    ("POST", "/admin/users/lang"): ("/admin/users/lang", set()),
    ("POST", "/reconciliation/{item_id}"): ("/reconciliation/999999", {"clerk"}),
    ("POST", "/reconciliation/upload"): ("/reconciliation/upload", {"clerk"}),
    # the partner API (operator A's app; order "matrix-1" is seeded unpaid): admins name the operator
    ("GET", "/api/v1/partner/products"): (f"/api/v1/partner/products?operator={A}", {"partner"}),
    ("GET", "/api/v1/partner/departures"): (f"/api/v1/partner/departures?operator={A}&day={TODAY}", {"partner"}),
    ("POST", "/api/v1/partner/orders"): (f"/api/v1/partner/orders?operator={A}", {"partner"}),
    ("GET", "/api/v1/partner/orders/{partner_order_no}"): (f"/api/v1/partner/orders/matrix-1?operator={A}",
                                                           {"partner"}),
    ("GET", "/api/v1/partner/orders/{partner_order_no}/tickets"): (
        f"/api/v1/partner/orders/matrix-1/tickets?operator={A}", {"partner"}),
    ("POST", "/api/v1/partner/orders/{partner_order_no}/refund"): (
        f"/api/v1/partner/orders/matrix-1/refund?operator={A}", {"partner"}),
    # the station counter redeems pickup codes (a code that is not 16 digits: 422, not counted as a guess)
    ("POST", "/api/v1/tickets/redeem"): ("/api/v1/tickets/redeem", {"operator_staff"}),
    ("GET", "/tickets/redeem"): ("/tickets/redeem", {"operator_staff"}),
    ("POST", "/tickets/redeem"): ("/tickets/redeem", {"operator_staff"}),
    # a ticket order's page (TKMATRIX1: order matrix-1) and its refund (order "nope": 404 past the door)
    ("GET", "/tickets/orders"): ("/tickets/orders", {"operator_staff"}),
    ("GET", "/tickets/orders/{order_id}"): ("/tickets/orders/TKMATRIX1", {"operator_staff"}),
    ("POST", "/tickets/orders/{order_id}/refund"): ("/tickets/orders/nope/refund", {"operator_staff"}),
    ("POST", "/tickets/orders/{order_id}/refunds/{refund_id}/send"): ("/tickets/orders/nope/refunds/nope/send",
                                                                      {"operator_staff"}),
}
# The payment platform's webhook has no bearer token: its Ed25519 signature is the authentication
# (tests/integration/test_web_cards.py refuses forged ones).
PUBLIC = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"),
          ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"), ("POST", "/lang"), ("POST", "/api/v1/ota/webhook"),
          ("POST", "/api/v1/sms/inbound"),  # the SMS gateway: HMAC-signed, backoffice.web.api.sms
          # the rider's web shop: no staff login (a one-time code to the rider's phone, backoffice.web.pages_shop)
          ("GET", "/shop"), ("GET", "/shop/{operator}"), ("GET", "/shop/{operator}/buy"),
          ("POST", "/shop/{operator}/code"), ("POST", "/shop/{operator}/order"),
          ("GET", "/shop/{operator}/orders/{order_id}"), ("GET", "/shop/{operator}/orders/{order_id}/qr/{ticket_id}.png")}
# What a write sends in the matrix: aimed at things that do not exist (an unissued card, order "nope", item
# 999999) or refused (an empty issuer file), so every role that gets past the door changes nothing.
BODIES = {
    "/api/v1/cards/{asn}/lost": {"json": {"why": "matrix"}},
    "/api/v1/tickets/redeem": {"json": {"operator": A, "code": "matrix"}},
    "/tickets/redeem": {"data": {"operator": A, "code": "matrix"}},
    "/tickets/orders/{order_id}/refund": {"data": {"why": "matrix"}},
    "/api/v1/partner/orders": {"json": {"partner_order_no": "matrix-2", "items": [{"product": "nope"}]}},
    "/api/v1/partner/orders/{partner_order_no}/refund": {"json": {"reason": "matrix"}},  # unpaid: 409
    "/api/v1/rider/cards/{asn}/lost": {"json": {"rider": "matrix"}},
    "/api/v1/quarantine/{quarantine_id}/release": {"json": {"why": "matrix"}},
    "/api/v1/quarantine/{quarantine_id}/reject": {"json": {"why": "matrix"}},
    "/api/v1/cards/{asn}/refund": {"json": {"amount": 1, "why": "matrix"}},
    "/api/v1/cards/{asn}/adjustments": {"json": {"amount": 1, "why": "matrix"}},
    "/api/v1/cases/{case_id}/close": {"json": {"resolution": "matrix"}},
    "/api/v1/ota/orders": {"json": {"asn": NOBODY, "rider": "matrix", "amount": 100}},
    "/api/v1/ota/orders/{order_id}/load": {"json": {"asn": NOBODY, "init_answer": "00" * 16,
                                                    "terminal_id": "00" * 6}},
    "/api/v1/ota/orders/{order_id}/tac": {"json": {"tac": "00" * 4}},
    "/api/v1/ota/cards/{asn}/seen": {"json": {"online_ttc": 0, "log": []}},
    "/api/v1/topups/orders/{order_id}/retry": {"json": {"card_online_ttc": 0, "why": "matrix"}},
    "/api/v1/topups/orders/{order_id}/refund": {"json": {"why": "matrix"}},
    "/api/v1/topups/orders/{order_id}/confirm": {"json": {"why": "matrix"}},
    "/api/v1/operators/{operator}/reconciliation/items/{item_id}": {"json": {"status": "accepted"}},
    "/api/v1/operators/{operator}/reconciliation/issuer-file": {"files": {"file": ("f.csv", "", "text/csv")}},
    # a route code of 33 characters is refused (422) before anything is written; the rest aim at entry "nope" (404)
    "/api/v1/routes": {"json": {"code": "x" * 33, "name": "matrix", "flat_fare": 1}},
    "/api/v1/vehicles": {"json": {"code": "x" * 33, "plate": "matrix"}},
    "/api/v1/drivers": {"json": {"staff_no": "x" * 33, "name": "matrix", "card_asn": "0" * 20}},
    "/api/v1/devices": {"json": {"device_id": "x" * 33, "terminal_id": "0" * 12}},
    **{f"/api/v1/{k}/{{key}}/retire": {"json": {"reason": "matrix"}} for k in EDITABLE},
    "/manage/{kind}": {"data": {"key": "x" * 33, "name": "matrix"}},  # refused by the body's rules: nothing written
    "/manage/{kind}/{key}": {"data": {"name": "matrix"}},
    "/manage/{kind}/{key}/retire": {"data": {"reason": "matrix"}},
    "/cards/{asn}/lost": {"data": {"why": "matrix"}},
    "/cards/{asn}/adjust": {"data": {"amount": "1.00", "why": "matrix"}},
    "/cards/{asn}/refund": {"data": {"amount": "1.00", "why": "matrix"}},
    "/topups/{order_id}/retry": {"data": {"card_online_ttc": "0", "why": "matrix"}},
    "/topups/{order_id}/refund": {"data": {"why": "matrix"}},
    "/topups/{order_id}/confirm": {"data": {"why": "matrix"}},
    "/cards/{asn}/counter-loads": {"json": {"amount": 100, "terminal_id": "0e0000000001",
                                            "init_answer": "00" * 16, "log": []}},
    "/api/v1/cards/{asn}/counter-loads": {"json": {"amount": 100, "terminal_id": "0e0000000001",
                                                   "init_answer": "00" * 16, "log": []}},
    "/cards/counter-loads/{load_id}/tac": {"json": {"tac": "00000000"}},
    "/api/v1/counter-loads/{load_id}/tac": {"json": {"tac": "00000000"}},
    "/reconciliation/{item_id}": {"data": {"decision": "accepted", "operator": A}},
    "/reconciliation/upload": {"data": {"day": str(YESTERDAY), "operator": A},
                               "files": {"file": ("f.csv", "", "text/csv")}},
}


def _pg_database(pg_url: str):
    """A database of its own for this module (pg_schema_url is per test; seeding once per backend is enough)."""
    import psycopg

    # named like tests/conftest.py's per-test databases, so a run killed halfway has its database dropped later
    name = f"farebox_t_{os.getpid()}_{secrets.token_hex(4)}"
    admin = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')

    def drop():
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return pg_url.rsplit("/", 1)[0] + "/" + name, drop


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def city(request, tmp_path_factory):
    drop = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('web')}/bo.db"
    else:
        url, drop = _pg_database(request.getfixturevalue("pg_url"))
    engine = make_engine(url)
    upgrade(engine)
    sent = seed(engine)
    with engine.begin() as conn:
        build_version(conn, NOW)  # CARDS[3] is lost: deny-list version 1 lists it
        topup.create_order(conn, asn=SHARED_CARD, rider="13800000000", amount=500, now=NOW, order_id="M1")
        catalogue.add_product(conn, operator=A, code="ride", kind="single", name="One ride", price_fen=200, by="t",
                              now=NOW)
        with mock.patch.object(orders, "_new_order_id", lambda now: "TKMATRIX1"):  # the ticket order page's URL
            orders.create_order(conn, operator=A, channel="partner", phone="", items=[orders.ItemRequest("ride")],
                                who="matrix", idempotency_key="matrix-1", now=NOW)
    store = TokenStore(tokens={
        TOKENS["clerk"]: Principal("alice", "clerk", A), TOKENS["clerk_b"]: Principal("bob", "clerk", B),
        TOKENS["operator_staff"]: Principal("carol", "operator_staff"),
        TOKENS["operations"]: Principal("dave", "operations"), TOKENS["admin"]: Principal("erin", "admin"),
        TOKENS["partner"]: Principal("pat", "partner", A)})
    app = create_app(engine, tokens=store, clock=lambda: NOW, migrate=False)
    # as farebox serve does at start: the OTA host's keys (the published test keys) and the test platform's key
    configure_ota(app, keys=LocalKeyService(TEST_ISSUER_KEYS, source="test keys"),
                  webhook_key=bytes.fromhex(TEST_PLATFORM_PUBLIC_KEY))
    with TestClient(app) as client:
        yield client, sent
    engine.dispose()
    if drop is not None:
        drop()


def get(client, url, who=None, **kw):
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
    return client.get(url, headers=headers, follow_redirects=False, **kw)


# ------------------------------------------------------------------------------------------------ the role matrix
def test_every_endpoint_is_in_the_matrix_with_the_roles_it_declares(city):
    client, _ = city
    seen = set()
    for path, methods, owners, _api in endpoints(client.app):
        if path == "/static":
            continue
        for method in methods:
            key = (method, path)
            seen.add(key)
            if key in PUBLIC:
                assert owners is None, f"{key} is meant to be public"
                continue
            assert key in MATRIX, f"{key} declares {owners} but is not in the test's matrix: add it"
            assert set(owners) == MATRIX[key][1] | {"admin"}, key
    assert seen == set(MATRIX) | PUBLIC


def test_every_endpoint_times_every_role(city):
    client, _ = city
    for (method, template), (url, owners) in MATRIX.items():
        if method in ("POST", "PATCH"):
            _writes_every_role(client, template, url, owners, method)
            continue
        assert method == "GET"
        assert get(client, url).status_code == 401, url
        bad = client.get(url, headers={"Authorization": "Bearer not-a-token"}, follow_redirects=False)
        assert bad.status_code == 401, url
        for role in ROLES:
            r = get(client, url, role)
            if role in owners or role == "admin":
                assert 200 <= r.status_code < 400, (url, role, r.status_code, r.text[:300])
            else:
                assert r.status_code == 403, (url, role, r.status_code)


def _writes_every_role(client, template, url, owners, method="POST"):
    """A write is let through to its use case for its owners (which then answer what the request deserves: here
    404 or 409/422, never a routing miss) and refused at the door (401/403) for everyone else."""
    body = BODIES.get(template, {"json": {}} if method == "PATCH" else {})
    send = getattr(client, method.lower())
    assert send(url, follow_redirects=False, **body).status_code == 401, url
    bad = send(url, headers={"Authorization": "Bearer not-a-token"}, follow_redirects=False, **body)
    assert bad.status_code == 401, url
    for role in ROLES:
        r = send(url, headers={"Authorization": f"Bearer {TOKENS[role]}"}, follow_redirects=False, **body)
        if role in owners or role == "admin":
            assert r.status_code not in (401, 403, 405) and r.status_code < 500, (url, role, r.status_code, r.text)
            if url.startswith("/api/"):
                assert r.json().get("detail") != "Not Found", (url, "no such route")
            else:
                assert '<p class="error">Not Found</p>' not in r.text, (url, "no such route")
        else:
            assert r.status_code == 403, (url, role, r.status_code)


def test_public_endpoints_answer_without_a_token(city):
    client, _ = city
    for url in ("/openapi.json", "/docs", "/redoc", "/login", "/static/farebox.css"):
        assert get(client, url).status_code == 200, url
    spec = get(client, "/openapi.json").json()
    api_paths = {p for (_m, p) in MATRIX if p.startswith("/api/")}
    assert api_paths <= set(spec["paths"])
    assert not any(p.startswith(("/dashboard", "/cards", "/login")) for p in spec["paths"])  # pages stay out
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_login_form_sets_an_httponly_cookie_that_pages_accept_and_the_api_does_not(city):
    client, _ = city
    client.cookies.clear()
    refused = client.post("/login", data={"token": "wrong", "next": "/dashboard"}, follow_redirects=False)
    assert refused.status_code == 401 and "令牌无效" in refused.text  # no Accept-Language: the Chinese page
    r = client.post("/login", data={"token": TOKENS["clerk"], "next": "/devices"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/devices"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/devices").status_code == 200
    assert client.get("/api/v1/me").status_code == 401  # the API takes bearer tokens only
    away = client.post("/login", data={"token": TOKENS["clerk"], "next": "//evil.example/x"},
                       follow_redirects=False)
    assert away.headers["location"] == "/"
    client.post("/logout", follow_redirects=False)
    client.cookies.clear()
    assert client.get("/devices").status_code == 401


def test_a_page_without_login_shows_the_login_form_and_a_wrong_role_the_reason(city):
    client, _ = city
    r = get(client, "/settlement")
    assert r.status_code == 401 and 'name="token"' in r.text and 'value="/settlement"' in r.text
    r = get(client, "/settlement", "operations")
    assert r.status_code == 403 and "您的角色（operations）不能使用此页" in r.text  # the Chinese page


# ------------------------------------------------------------------------------------------------ operator filter
def test_a_clerk_sees_only_their_operators_rows(city):
    client, _ = city
    for kind, column in (("operators", "code"), ("routes", "operator"), ("vehicles", "operator"),
                         ("drivers", "operator"), ("devices", "operator")):
        mine = get(client, f"/api/v1/{kind}", "clerk").json()
        assert mine and {row[column] for row in mine} == {A}, kind
        everyone = get(client, f"/api/v1/{kind}", "operations").json()
        assert {row[column] for row in everyone} == {A, B}, kind
        assert get(client, f"/api/v1/{kind}?operator={B}", "clerk").status_code == 404
    fleet = get(client, "/api/v1/fleet", "clerk").json()
    assert sorted(r["device_id"] for r in fleet) == sorted(d for d, v in DEVICES.items() if v[0] == A)
    quarantine = get(client, "/api/v1/quarantine", "clerk").json()
    assert {r["device_id"] for r in quarantine["items"]} == {"cb_001"}  # not mb_001, not the unregistered zz_999
    assert [r["operator"] for r in get(client, "/api/v1/dashboard", "clerk").json()] == [A]
    for url in ("/dashboard", "/registry/routes", "/registry/vehicles", "/devices", "/quarantine", "/settlement"):
        page = get(client, url, "clerk").text
        for foreign in (B_NAME, "9路 机场快线", "粤B·20001", "mb_001", "李娜"):
            assert foreign not in page, (url, foreign)


def test_a_clerk_asking_for_another_operators_objects_gets_404(city):
    client, _ = city
    for url in (f"/api/v1/operators/{B}", "/api/v1/routes/m9", "/api/v1/vehicles/mv1", "/api/v1/drivers/md1",
                "/api/v1/devices/mb_001", f"/api/v1/operators/{B}/days/{TODAY}/taps",
                f"/api/v1/operators/{B}/days/{TODAY}/settlement",
                f"/api/v1/operators/{B}/days/{TODAY}/settlement.pdf", f"/api/v1/fleet?operator={B}",
                f"/api/v1/dashboard?operator={B}", f"/settlement?operator={B}", f"/settlement.pdf?operator={B}",
                "/manage/routes/m9", f"/reports?operator={B}", f"/reports/day?operator={B}&day={YESTERDAY}",
                "/api/v1/routes/m9/history", "/api/v1/devices/mb_001/history",
                f"/api/v1/operators/{B}/reports/days/{TODAY}",
                f"/api/v1/operators/{B}/reports/days/{YESTERDAY}/settlement?format=csv",
                f"/api/v1/operators/{B}/reports/months/2026-03/settlement",
                f"/api/v1/operators/{B}/reports/days/{TODAY}/vehicles/mv1",
                f"/api/v1/operators/{B}/reports/days/{TODAY}/shifts/mb_001/1"):
        assert get(client, url, "clerk").status_code == 404, url
        assert get(client, url, "admin").status_code == 200, url
    # the same answer as for what does not exist at all, so codes cannot be probed
    assert get(client, "/api/v1/routes/nope", "clerk").status_code == 404
    assert get(client, "/api/v1/operators/nope/days/2026-03-05/taps", "clerk").status_code == 404
    # and the other way round
    assert get(client, "/api/v1/routes/c1", "clerk_b").status_code == 404
    assert get(client, "/api/v1/routes/m9", "clerk_b").json()["name"] == "9路 机场快线"


# ------------------------------------------------------------------------------------------------ the numbers
def _service_day(at: datetime) -> date:
    """Shanghai has no daylight saving: local = UTC + 8 h; the day starts at 03:00 local."""
    return (at + timedelta(hours=8) - timedelta(hours=3)).date()


def _stored_purchases(sent, quarantined_seqs):
    return [r for r in sent if r.kind == RecordKind.PURCHASE and (r.device_id, r.device_seq) not in quarantined_seqs]


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


def test_dashboard_numbers_equal_an_independent_sum(city):
    client, city_data = city
    bad = {(r.device_id, r.device_seq) for r in city_data.quarantined}
    fares, revenue = defaultdict(int), defaultdict(int)
    for r in _stored_purchases(city_data.sent, bad):
        if _service_day(r.occurred_at) == TODAY:
            fares[r.operator] += 1
            revenue[r.operator] += r.amount
    quarantined = defaultdict(int)
    for r in city_data.quarantined:
        quarantined[r.operator] += 1
    assert fares[A] and fares[B] and revenue[A] != revenue[B]
    rows = {row["operator"]: row for row in get(client, "/api/v1/dashboard", "operations").json()}
    for op in (A, B):
        row = rows[op]
        assert str(row["day"]) == str(TODAY)
        assert (row["fares"], row["revenue"], row["quarantined"]) == (fares[op], revenue[op], quarantined[op])
    # cb_002 never heard from, mb_001 silent for 20 minutes: one stale validator each; cb_001 heard a minute ago
    assert (rows[A]["stale"], rows[A]["online"], rows[A]["never_heard"]) == (1, 1, 1)
    assert (rows[B]["stale"], rows[B]["online"]) == (1, 1)
    page = get(client, "/dashboard", "clerk").text
    assert f'id="fares-{A}">{fares[A]}<' in page
    assert f'id="revenue-{A}">{_yuan(revenue[A])}<' in page
    assert f'id="quarantined-{A}">{quarantined[A]}<' in page and f'id="stale-{A}">1<' in page
    assert A_NAME in page


def test_settlement_and_its_pdf_agree_with_a_loop_over_the_taps(city):
    client, city_data = city
    bad = {(r.device_id, r.device_seq) for r in city_data.quarantined}
    for day in (YESTERDAY, TODAY):
        by_route, total = defaultdict(int), 0
        for r in _stored_purchases(city_data.sent, bad):
            if r.operator == A and _service_day(r.occurred_at) == day:
                by_route[r.route] += r.amount
                total += r.amount
        s = get(client, f"/api/v1/operators/{A}/days/{day}/settlement", "clerk").json()
        assert s["amount"] == total
        assert s["run"] is None and s["provisional"]  # reading never clears a day: no run stored by a GET
        assert {row["route"]: row["amount"] for row in s["by_route"]} == dict(by_route)
        assert sum(row["amount"] for row in s["by_driver"]) == total
        page = get(client, f"/settlement?operator={A}&day={day}", "clerk").text
        assert f'id="total-amount">{_yuan(total)}<' in page
    pdf = get(client, f"/api/v1/operators/{A}/days/{YESTERDAY}/settlement.pdf", "clerk")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    from io import BytesIO

    from pypdf import PdfReader

    text = "".join(p.extract_text() for p in PdfReader(BytesIO(pdf.content)).pages)
    assert "1路" in text
    page_pdf = get(client, f"/settlement.pdf?operator={A}&day={YESTERDAY}", "clerk")
    assert page_pdf.content.startswith(b"%PDF")


def test_taps_of_a_day_page_through_every_record_once(city):
    client, city_data = city
    bad = {(r.device_id, r.device_seq) for r in city_data.quarantined}
    expected = {(r.device_id, r.device_seq) for r in city_data.sent
                if r.operator == A and (r.device_id, r.device_seq) not in bad
                and _service_day(r.occurred_at) == TODAY}
    got, offset = [], 0
    while offset is not None:
        page = get(client, f"/api/v1/operators/{A}/days/{TODAY}/taps?limit=2&offset={offset}", "clerk").json()
        assert page["total"] == len(expected) and len(page["items"]) <= 2
        got += [(t["device_id"], t["device_seq"]) for t in page["items"]]
        offset = page["next_offset"]
    assert len(got) == len(set(got)) and set(got) == expected
    times = [t["occurred_at"] for t in get(client, f"/api/v1/operators/{A}/days/{TODAY}/taps", "clerk").json()["items"]]
    assert times == sorted(times)
    shifts = get(client, f"/api/v1/operators/{A}/days/{TODAY}/taps?kind=shift_open", "clerk").json()
    assert shifts["total"] == 1


def test_card_lookup_shows_the_latest_balance_and_every_record(city):
    client, city_data = city
    bad = {(r.device_id, r.device_seq) for r in city_data.quarantined}
    mine = [r for r in _stored_purchases(city_data.sent, bad) if r.card_asn == SHARED_CARD]
    latest = max(mine, key=lambda r: (r.occurred_at, r.card_ttc))
    card = get(client, f"/api/v1/cards/{SHARED_CARD}", "operator_staff").json()
    assert card["balance"] == latest.balance_after and card["records_total"] == len(mine)
    assert {r["operator"] for r in card["records"]} == {A, B}  # every company's, which is why clerks may not
    page = get(client, f"/cards?asn={SHARED_CARD}", "operator_staff").text
    assert _yuan(latest.balance_after) in page and "普通卡" in page
    lost = get(client, f"/cards?asn={CARDS[3]}", "operator_staff").text
    assert "挂失" in lost
    assert get(client, "/api/v1/cards/00000000000000000000", "operator_staff").status_code == 404
    assert get(client, "/cards?asn=00000000000000000000", "operator_staff").status_code == 404


def test_devices_quarantine_and_deny_list(city):
    client, city_data = city
    fleet = {r["device_id"]: r for r in get(client, "/api/v1/fleet", "operations").json()}
    assert {d: r["stale"] for d, r in fleet.items()} == {"cb_001": False, "cb_002": True, "mb_001": True}
    assert fleet["cb_001"]["software"] == "2.4.1" and fleet["cb_002"]["online"] is None
    page = get(client, "/devices", "operations").text
    assert page.count('<span class="badge">失联</span>') == 2
    q = get(client, "/api/v1/quarantine?limit=1", "operations").json()
    assert q["total"] == len(city_data.quarantined) + city_data.unknown_device_batches and len(q["items"]) == 1
    page = get(client, "/quarantine", "operations").text
    assert "TAC 用发卡方密钥验证不通过" in page and "zz_999" in page  # the reason in the page's language
    versions = get(client, "/api/v1/denylist/versions", "operator_staff").json()
    assert [(v["version"], v["count"]) for v in versions] == [(1, 1)]


def test_token_file_keeps_only_hashes_and_is_reread(tmp_path):
    path = tmp_path / "tokens.toml"
    store = TokenStore(path)
    assert store.lookup("anything") is None  # no file yet: nobody gets in
    token = add_token(path, role="clerk", name="王芳", operator=A)
    assert token not in path.read_text() and "王芳" in path.read_text()
    assert store.lookup(token) == Principal("王芳", "clerk", A)
    second = add_token(path, role="admin", name="root")
    assert store.lookup(second).role == "admin" and store.lookup(token).operator == A
    with pytest.raises(ValueError, match="clerk sees one operator"):
        add_token(path, role="clerk", name="x")
    with pytest.raises(ValueError, match="exists already"):
        add_token(path, role="admin", name="root")
    assert (path.stat().st_mode & 0o777) == 0o600

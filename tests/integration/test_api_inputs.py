"""Issue 9, the inputs, through HTTP on SQLite and PostgreSQL: every bad input named in the issue is a 4xx that says
what was wrong, and nothing is stored. Before, each of these answered 500 (or, for ``"amount": 30.00``, stored an
order of 30 fen), and a clerk could register validators named ``publisher``, ``Bad.Dev`` or ``_fleet`` that broke
``farebox broker config`` for everyone."""

from __future__ import annotations

import pytest
import web_city
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from backoffice.db import make_engine, upgrade
from backoffice.devices import registered_devices
from backoffice.keyservice import LocalKeyService
from backoffice.models import Device, PaymentReconItem, ReconItem, TopupOrder, Vehicle
from backoffice.web.api.ota import TEST_PLATFORM_PUBLIC_KEY, configure_ota
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from epurse.keys import TEST_ISSUER_KEYS
from farebox.broker_config import write_broker_config
from wire.devicekeys import TEST_DEVICE_MASTER

A = web_city.A
TOKENS = {"t-clerk": Principal("alice", "clerk", A), "t-staff": Principal("sam", "operator_staff"),
          "t-ops": Principal("dave", "operations"), "t-admin": Principal("ada", "admin")}
CLERK, STAFF, OPS, ADMIN = ({"Authorization": f"Bearer {t}"} for t in TOKENS)


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    web_city.seed(engine)
    app = create_app(engine, tokens=TokenStore(tokens=TOKENS), clock=lambda: web_city.NOW, migrate=False)
    configure_ota(app, keys=LocalKeyService(TEST_ISSUER_KEYS, source="test keys"),
                  webhook_key=bytes.fromhex(TEST_PLATFORM_PUBLIC_KEY))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine
    engine.dispose()


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def message(r) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    return r.text


@pytest.mark.parametrize("bad, words", [("publisher", "reserved for the back office"),
                                        ("farebox_ingest", "reserved for the back office"),
                                        ("status_7", "reserved for the back office"),
                                        ("Bad.Dev", "1-32 characters of a-z, 0-9 and _"),
                                        ("_fleet", "1-32 characters of a-z, 0-9 and _"),
                                        ("bus\x00", "1-32 characters of a-z, 0-9 and _")])
def test_a_device_id_that_cannot_be_a_broker_login_is_refused_422_and_broker_config_still_generates(
        api, bad, words, tmp_path):
    client, engine = api
    before = count(engine, Device)
    r = client.post("/api/v1/devices", headers=CLERK, json={"device_id": bad, "terminal_id": "0100000000ee"})
    assert r.status_code == 422 and words in message(r) and "device_id" in r.text
    assert count(engine, Device) == before
    with engine.connect() as conn:
        files = write_broker_config(devices=registered_devices(conn), master=TEST_DEVICE_MASTER,
                                    folder=tmp_path / "broker", run_as="root")
    assert files.devices == before and files.skipped == ()
    assert client.post("/api/v1/devices", headers=CLERK,
                       json={"device_id": "cb_009", "terminal_id": "0100000000ee"}).status_code == 201


@pytest.mark.parametrize("method, path, kw, words", [
    ("GET", "/api/v1/fleet", {"params": {"stale_after_minutes": "1e16"}}, "less than or equal to 525600"),
    ("GET", "/api/v1/cards/%00", {}, "pattern"),
    ("GET", "/api/v1/vehicles/cv1%00", {}, "pattern"),
    ("POST", f"/api/v1/cases/{2**70}/close", {"json": {"resolution": "x"}}, "9223372036854775807"),
    ("POST", f"/api/v1/operators/{A}/reconciliation/items/{2**64}", {"json": {"status": "accepted"}},
     "9223372036854775807"),
    ("GET", f"/api/v1/operators/{A}/days/2026-03-05/taps", {"params": {"offset": str(2**70)}}, "offset"),
    ("GET", f"/api/v1/operators/{A}/reports/days/2026-03-05/shifts/cb_001/{2**64}", {}, "shift_no"),
    ("GET", f"/api/v1/operators/{A}/reports/days/9999-12-31", {}, "2099-12-31"),  # its next day is no date
    ("GET", f"/api/v1/operators/{A}/days/0001-01-01/taps", {}, "2000-01-01"),
])
def test_nul_bytes_and_numbers_out_of_range_are_4xx(api, method, path, kw, words):
    client, _engine = api
    headers = STAFF if "/cards/" in path or "/cases/" in path else OPS if "fleet" in path else CLERK
    assert words in message(client.request(method, path, headers=headers, **kw))


def test_a_plate_longer_than_its_column_and_text_with_nul_are_refused_and_nothing_is_stored(api):
    client, engine = api
    before = count(engine, Vehicle)
    r = client.post("/api/v1/vehicles", headers=CLERK, json={"code": "cv9", "plate": "沪" * 33})
    assert r.status_code == 422 and "at most 32 characters" in r.text
    r = client.post("/api/v1/vehicles", headers=CLERK, json={"code": "cv9", "plate": "沪A\x00"})
    assert r.status_code == 422 and "NUL" in r.text
    r = client.post("/api/v1/drivers", headers=CLERK,
                    json={"staff_no": "cd9", "name": "x\x00", "card_asn": "44440000000000000009"})
    assert r.status_code == 422 and "NUL" in r.text
    assert count(engine, Vehicle) == before


@pytest.mark.parametrize("amount", [30.00, 30.5, "3000", True, 2**70])
def test_money_is_whole_fen_or_refused(api, amount):
    client, engine = api
    r = client.post("/api/v1/ota/orders", headers=STAFF,
                    json={"asn": web_city.SHARED_CARD, "rider": "13800000000", "amount": amount})
    assert r.status_code == 422 and ("amount is integer fen" in r.text or "less than or equal" in r.text)
    assert count(engine, TopupOrder) == 0
    r = client.post(f"/api/v1/cards/{web_city.SHARED_CARD}/adjustments", headers=STAFF,
                    json={"why": "test", "amount": amount})
    assert r.status_code == 422
    ok = client.post("/api/v1/ota/orders", headers=STAFF,
                     json={"asn": web_city.SHARED_CARD, "rider": "13800000000", "amount": 3000})
    assert ok.status_code == 201 and ok.json()["amount"] == 3000


@pytest.mark.parametrize("row, words", [
    ("M1,99999999999999999999999,paid,2026-03-05T01:00:00Z", "amount must be a positive whole number of fen"),
    ("M1,4294967296,paid,2026-03-05T01:00:00Z", "amount must be a positive whole number of fen"),
    ("M\x001,500,paid,2026-03-05T01:00:00Z", "printable ASCII"),
])
def test_payment_file_cells_out_of_bounds_are_refused_with_the_line(api, row, words):
    client, engine = api
    body = f"order_id,amount,status,paid_at\n{row}\n".encode()
    r = client.post("/api/v1/payments/reconciliation", headers=STAFF, params={"day": "2026-03-05"},
                    files={"file": ("day.csv", body, "text/csv")})
    assert r.status_code == 422 and "line 2" in r.text and words in r.text
    assert count(engine, PaymentReconItem) == 0


@pytest.mark.parametrize("cells, words", [
    (("99999999999999999999999", "200"), "card_ttc must be a whole number from 0 to 65535"),
    (("1", "99999999999999999999"), "amount must be a whole number"),
    (("70000", "200"), "card_ttc must be a whole number from 0 to 65535"),
])
def test_issuer_file_numbers_out_of_bounds_are_refused_with_the_line(api, cells, words):
    client, engine = api
    ttc, amount = cells
    body = ("card_asn,card_ttc,amount,terminal_id,terminal_seq,tac,occurred_at\n"
            f"{web_city.SHARED_CARD},{ttc},{amount},010000000001,1,0a0b0c0d,2026-03-05T01:00:00Z\n").encode()
    r = client.post(f"/api/v1/operators/{A}/reconciliation/issuer-file", headers=CLERK,
                    params={"day": "2026-03-05"}, files={"file": ("issuer.csv", body, "text/csv")})
    assert r.status_code == 422 and "line 2" in r.text and words in r.text
    assert count(engine, ReconItem) == 0


# ------------------------------------------------------------------------------------------------ issue 10: money
@pytest.mark.parametrize("bad", [2.5, 200.0, "200", True])
def test_a_fare_that_is_not_a_json_integer_is_refused_naming_the_field_and_integer_fen(api, bad):
    """The API takes and returns integer fen only: 2.5, 200.0, "200" and true are each a 422 that names the field
    and says "integer fen", and no route is stored (before issue 10 the message said "amount" for every field)."""
    from backoffice.models import Route

    client, engine = api
    before = count(engine, Route)
    r = client.post("/api/v1/routes", headers=CLERK, json={"code": "c90", "name": "90路", "flat_fare": bad})
    assert r.status_code == 422 and "flat_fare is integer fen" in message(r), r.text
    assert any(e["loc"][-1] == "flat_fare" for e in r.json()["detail"])
    r = client.post("/api/v1/routes", headers=CLERK, json={"code": "c90", "name": "90路", "stages": [[10, bad]]})
    assert r.status_code == 422 and "integer fen" in r.text
    assert count(engine, Route) == before
    ok = client.post("/api/v1/routes", headers=CLERK, json={"code": "c90", "name": "90路", "flat_fare": 200})
    assert ok.status_code == 201 and ok.json()["flat_fare"] == 200  # fen back, an integer


# ------------------------------------------------------------------------------------------------ a new company
def test_an_admin_adds_an_operator_and_its_commission_rate_over_http_and_nobody_else_can(api):
    from datetime import date

    client, engine = api
    new = {"code": "zhixing", "name": "智行公交 Zhixing Bus", "timezone": "Asia/Shanghai", "cutoff_hour": 3}
    for who in (CLERK, STAFF, OPS):
        assert client.post("/api/v1/operators", headers=who, json=new).status_code == 403
    for bad, words in [({**new, "code": "Zhi-Xing"}, "code"), ({**new, "cutoff_hour": "3"}, "cutoff_hour"),
                       ({**new, "cutoff_hour": 24}, "cutoff_hour"), ({**new, "name": "x\x00"}, "NUL")]:
        r = client.post("/api/v1/operators", headers=ADMIN, json=bad)
        assert r.status_code == 422 and words in r.text, (bad, r.text)
    r = client.post("/api/v1/operators", headers=ADMIN, json={**new, "timezone": "Mars/Olympus"})
    assert r.status_code == 409 and "IANA" in r.text
    r = client.post("/api/v1/operators", headers=ADMIN, json=new)
    assert r.status_code == 201 and r.json()["code"] == "zhixing" and r.json()["cutoff_hour"] == 3
    again = client.post("/api/v1/operators", headers=ADMIN, json=new)
    assert again.status_code == 409 and "registered already" in again.text

    url = "/api/v1/operators/zhixing/commission-rates"
    for bad in (0.6, 60.0, "60", True, -1, 10_001):
        r = client.post(url, headers=ADMIN, json={"rate_bp": bad, "valid_from": "2026-12-01"})
        assert r.status_code == 422 and "rate_bp" in r.text, (bad, r.text)
    assert client.post(url, headers=CLERK, json={"rate_bp": 60, "valid_from": "2026-12-01"}).status_code == 403
    assert client.post("/api/v1/operators/nobody/commission-rates", headers=ADMIN,
                       json={"rate_bp": 60, "valid_from": "2026-12-01"}).status_code == 404
    r = client.post(url, headers=ADMIN, json={"rate_bp": 60, "valid_from": "2026-12-01"})
    assert r.status_code == 201 and r.json()["rates"] == [{"valid_from": "2026-12-01", "rate_bp": 60}]
    with engine.connect() as conn:  # what clearing reads, by plain SQL
        rows = conn.exec_driver_sql("SELECT valid_from, rate_bp FROM commission_rate WHERE operator = 'zhixing'").all()
    assert [(str(d), int(b)) for d, b in rows] == [(str(date(2026, 12, 1)), 60)]
    assert client.get(url, headers=OPS).json()["rates"][0]["rate_bp"] == 60
    assert client.get(url, headers=CLERK).status_code == 404  # another company's, as if it did not exist
    assert client.get(f"/api/v1/operators/{A}/commission-rates", headers=CLERK).status_code == 200


def test_a_clerk_adds_a_fleet_and_sets_fare_rules_for_their_own_company_in_integer_fen(api):
    client, engine = api
    r = client.post("/api/v1/fleets", headers=CLERK, json={"code": "cf_north", "name": "北区车队"})
    assert r.status_code == 201 and r.json()["operator"] == A
    other = client.post("/api/v1/fleets", headers=CLERK, json={"operator": web_city.B, "code": "x", "name": "x"})
    assert other.status_code == 404
    url = f"/api/v1/operators/{A}/fare-rules"
    for bad in ({"transfer_discount": 1.5}, {"transfer_discount": "100"}, {"min_balance": True},
                {"discounts": {"2": 50.0}}, {"discounts": {"2": 101}}, {"transfer_window_minutes": "60"}):
        r = client.post(url, headers=CLERK, json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert "transfer_discount is integer fen" in client.post(url, headers=CLERK,
                                                             json={"transfer_discount": 1.5}).text
    from datetime import UTC, datetime

    at = datetime.now(UTC).isoformat()  # the city was registered at the real now, the app's clock is March
    r = client.post(url, headers=CLERK, json={"discounts": {"2": 50, "3": 0}, "transfer_window_minutes": 60,
                                              "transfer_discount": 100, "at": at})
    assert r.status_code == 200 and r.json()["changed"] is True
    assert r.json()["discounts"] == {"2": 50, "3": 0} and r.json()["transfer"] == {"window_minutes": 60,
                                                                                   "discount": 100}
    assert client.post(f"/api/v1/operators/{web_city.B}/fare-rules", headers=CLERK, json={}).status_code == 404
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT operator FROM fleet WHERE code = 'cf_north'").scalar() == A

"""The payment platform's daily file against over-the-air top-up orders, on SQLite and PostgreSQL. The orders are
made by the real top-up use cases (an order, a signed payment webhook, a simulated phone loading the simulated
card); the items expected are written out by hand below, not taken from the code under test."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import func, select
from test_topup import KEYS, OTA_TERMINAL, Clock, issued_card

from backoffice.cards import payments_recon, topup
from backoffice.cards.ota_host import OtaHost
from backoffice.db import make_engine, upgrade
from backoffice.models import PaymentReconItem
from hardware_sim.payment import PaymentPlatform
from hardware_sim.phone import Phone

DAY = date(2026, 11, 22)  # Asia/Shanghai: 2026-11-21T16:00Z .. 2026-11-22T16:00Z


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_schema_url"))
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def orders(engine, tmp_path):
    """Orders of the day in every state the file must be matched against, and two made the evening before."""
    clock = Clock()
    clock.now = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)  # 22:00 in Shanghai: the day before DAY
    platform = PaymentPlatform(clock=clock)
    host = OtaHost(engine, KEYS, webhook_key=platform.public_key, clock=clock)
    card = issued_card(engine, tmp_path, clock)
    phone = Phone(card, host, OTA_TERMINAL)

    def order(order_id, amount, *, pay=True, load=True):
        with engine.begin() as conn:
            topup.create_order(conn, asn=card.asn.hex(), rider="rider:13800000000", amount=amount, now=clock(),
                               order_id=order_id)
        if pay:
            hook = platform.pay(order_id, amount)
            assert host.payment_webhook(hook.body, hook.signature).startswith(f"order {order_id} paid")
        if load:
            assert phone.topup(order_id, amount).status == "loaded"
        clock.tick(60)

    order("T-EVE-LATE", 1500)  # created the day before, paid and loaded: the file names it, it matches
    order("T-EVE-OLD", 700, load=False)  # the day before, not in the file: none of this day's business
    clock.now = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)
    order("T-OK", 5000)
    order("T-AMOUNT", 3000)  # loaded 3000, the platform says it collected 3500
    order("T-NOT-LOADED", 2000, load=False)  # paid, the phone never came back to load it
    order("T-NOT-ON-PLATFORM", 1000)  # loaded, the platform has no record of it
    order("T-UNPAID", 800, pay=False, load=False)  # asked for, never paid: nothing to reconcile
    return engine, clock


FILE = """order_id,amount,status,paid_at
T-EVE-LATE,1500,paid,2026-11-21T14:00:05Z
T-OK,5000,paid,2026-11-22T01:00:03Z
T-AMOUNT,3500,paid,2026-11-22T01:01:03Z
T-NOT-LOADED,2000,paid,2026-11-22T01:02:03Z
T-STRANGER,1200,paid,2026-11-22T03:00:00Z
"""
# (order_id, problem, ours = fen loaded, theirs = fen collected), by order id
EXPECTED = [
    ("T-AMOUNT", "amount_differs", 3000, 3500),
    ("T-NOT-LOADED", "paid_not_loaded", None, 2000),
    ("T-NOT-ON-PLATFORM", "missing_on_platform", 1000, None),
    ("T-STRANGER", "paid_not_loaded", None, 1200),
]


def stored(engine):
    with engine.connect() as conn:
        return conn.execute(select(PaymentReconItem.order_id, PaymentReconItem.problem, PaymentReconItem.ours,
                                   PaymentReconItem.theirs, PaymentReconItem.status, PaymentReconItem.day)
                            .order_by(PaymentReconItem.order_id)).all()


def test_the_days_differences_are_stored_once(orders):
    engine, clock = orders
    with engine.begin() as conn:
        new = payments_recon.reconcile_payments_day(conn, day=DAY, platform_csv_text=FILE, now=clock())
    assert sorted((i.ref, i.problem, i.ours, i.theirs) for i in new) == EXPECTED
    assert [tuple(r) for r in stored(engine)] == [(*e, "open", DAY) for e in EXPECTED]
    with engine.begin() as conn:  # the same file again: nothing new
        assert payments_recon.reconcile_payments_day(conn, day=DAY, platform_csv_text=FILE, now=clock()) == []
    assert len(stored(engine)) == len(EXPECTED)


def test_staff_resolve_an_item_signed_and_a_decided_item_stays_decided(orders):
    engine, clock = orders
    with engine.begin() as conn:
        payments_recon.reconcile_payments_day(conn, day=DAY, platform_csv_text=FILE, now=clock())
        item = next(i for i in payments_recon.items(conn, status="open") if i["order_id"] == "T-NOT-LOADED")
    clock.tick(3600)
    with engine.begin() as conn:
        done = payments_recon.resolve_payment_item(conn, item_id=item["id"], status="refunded", by="staff:wang",
                                                   note="rider refunded at the counter", now=clock())
    assert (done["status"], done["resolved_by"], done["note"]) == ("refunded", "staff:wang",
                                                                   "rider refunded at the counter")
    assert done["resolved_at"].replace(tzinfo=UTC) == clock()
    with engine.begin() as conn:
        assert item["id"] not in [i["id"] for i in payments_recon.items(conn, status="open")]
        with pytest.raises(ValueError, match="refunded already"):
            payments_recon.resolve_payment_item(conn, item_id=item["id"], status="accepted", by="staff:li")
        with pytest.raises(ValueError, match="status must be"):
            payments_recon.resolve_payment_item(conn, item_id=item["id"], status="open", by="staff:li")
        with pytest.raises(LookupError):
            payments_recon.resolve_payment_item(conn, item_id=999999, status="accepted", by="staff:li")
        # a re-run keeps the decision: the same difference is not reopened
        assert payments_recon.reconcile_payments_day(conn, day=DAY, platform_csv_text=FILE, now=clock()) == []
    assert ("T-NOT-LOADED", "refunded") in [(r.order_id, r.status) for r in stored(engine)]


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("order_id,amount,status\nT-OK,5000,paid\n", "line 1: columns"),
    (FILE + "T-X,12.50,paid,2026-11-22T01:00:00Z\n", "line 7: amount"),
    (FILE + "T-X,100,pending,2026-11-22T01:00:00Z\n", "line 7: status"),
    (FILE + "T-X,100,paid,2026-11-22T09:00:00+08:00\n", "line 7: paid_at"),
    (FILE + "T-X,100,paid,yesterday\n", "line 7: paid_at"),
    (FILE + "T-X,100,paid\n", "line 7: 3 fields"),
])
def test_a_bad_file_names_its_line_and_stores_nothing(orders, text, words):
    engine, clock = orders
    with engine.begin() as conn, pytest.raises(payments_recon.PaymentFileError, match=words):
        payments_recon.reconcile_payments_day(conn, day=DAY, platform_csv_text=text, now=clock())
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PaymentReconItem)).scalar_one() == 0


def test_the_days_orders_are_those_created_that_local_day_plus_those_the_file_names(orders):
    engine, _clock = orders
    with engine.connect() as conn:
        got = payments_recon.load_day_orders(conn, day=DAY, order_ids=["T-EVE-LATE"])
    assert [(o["order_id"], o["amount"], o["state"]) for o in got] == [
        ("T-AMOUNT", 3000, "loaded"), ("T-EVE-LATE", 1500, "loaded"), ("T-NOT-LOADED", 2000, "paid"),
        ("T-NOT-ON-PLATFORM", 1000, "loaded"), ("T-OK", 5000, "loaded")]  # T-UNPAID: never paid, not named
    start, end = payments_recon.day_bounds(DAY)
    assert (start, end) == (datetime(2026, 11, 21, 16, tzinfo=UTC), datetime(2026, 11, 21, 16, tzinfo=UTC)
                            + timedelta(days=1))


def test_staff_upload_the_platforms_file_and_decide_over_http(orders):
    """The same day through the API as staff use it: multipart upload, the open list, a decision signed with the
    token's holder; a bad file is a 422 naming its line, and a clerk may not touch any of it."""
    from fastapi.testclient import TestClient

    from backoffice.web.app import create_app
    from backoffice.web.auth import Principal, TokenStore

    engine, clock = orders
    store = TokenStore(tokens={"fbx_staff": Principal("carol", "operator_staff"),
                               "fbx_clerk": Principal("王芳", "clerk", "citybus")})
    app = create_app(engine, tokens=store, clock=clock, migrate=False)
    staff, clerk = {"Authorization": "Bearer fbx_staff"}, {"Authorization": "Bearer fbx_clerk"}
    url = f"/api/v1/payments/reconciliation?day={DAY.isoformat()}"
    with TestClient(app) as client:
        bad = client.post(url, files={"file": ("pay.csv", FILE + "T-X,12.50,paid,2026-11-22T01:00:00Z\n")},
                          headers=staff)
        assert bad.status_code == 422 and "line 7" in bad.text and stored(engine) == []
        assert client.post(url, files={"file": ("pay.csv", FILE)}, headers=clerk).status_code == 403

        # a spreadsheet's UTF-8 BOM is fine
        up = client.post(url, files={"file": ("pay.csv", "\ufeff" + FILE)}, headers=staff)
        assert up.status_code == 200, up.text
        assert up.json()["uploaded_by"] == "carol"
        assert sorted((i["order_id"], i["problem"], i["ours"], i["theirs"]) for i in up.json()["new_items"]) == \
            EXPECTED
        assert client.post(url, files={"file": ("pay.csv", FILE)}, headers=staff).json()["new_items"] == []

        open_items = client.get("/api/v1/payments/reconciliation?status=open", headers=staff).json()
        assert {(i["order_id"], i["suggested"]) for i in open_items} == {
            (o, (theirs or 0) - (ours or 0)) for o, _, ours, theirs in EXPECTED}
        item = next(i for i in open_items if i["order_id"] == "T-AMOUNT")
        decided = client.post(f"/api/v1/payments/reconciliation/items/{item['id']}", headers=staff,
                              json={"status": "accepted", "note": "platform fee"})
        assert decided.status_code == 200, decided.text
        assert client.get("/api/v1/payments/reconciliation", headers=clerk).status_code == 403
    assert ("T-AMOUNT", "accepted") in [(r.order_id, r.status) for r in stored(engine)]
    with engine.connect() as conn:
        who = conn.execute(select(PaymentReconItem.resolved_by).where(PaymentReconItem.id == item["id"])).scalar()
    assert who == "carol"

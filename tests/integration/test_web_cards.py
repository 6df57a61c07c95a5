"""Cards, over-the-air top-ups and reconciliation through the HTTP API, on a SQLite file and on PostgreSQL.

The phone (hardware_sim.phone) and the payment platform (hardware_sim.payment) talk to the app over HTTP with
FastAPI's TestClient as the transport: the phone relays its SIM's answers through the OTA endpoints, the platform
posts signed webhooks (again and again, as platforms do). Each time the SimCard's balance, the load rows and the
ledger are checked against sums written here. Reconciliation: an issuer CSV with known differences uploaded, the
items resolved by a clerk, an adjustment carried into the next clearing run once.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_topup import KEYS, OPENING, OTA_TERMINAL, Clock, Direct

from backoffice import clearing_runs, registry
from backoffice.cards import audit, issuance
from backoffice.db import make_engine, upgrade
from backoffice.models import CardLoad
from backoffice.web.api.ota import SIGNATURE_HEADER, TEST_PLATFORM_PUBLIC_KEY, configure_ota
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from clearing.reconcile import ISSUER_COLUMNS, write_issuer_file
from epurse import apdu
from hardware_sim.card import SimCard
from hardware_sim.payment import PaymentPlatform
from hardware_sim.phone import HostTimeout, Phone, PhoneGone

TOKENS = {"clerk": "t-clerk", "clerk_b": "t-clerk-b", "operator_staff": "t-staff", "gateway": "t-gateway",
          "operations": "t-ops", "admin": "t-admin"}
OP, OTHER = "op_w", "op_x"
DAY = date(2026, 3, 5)
DAY_START = datetime(2026, 3, 4, 19, 0, tzinfo=UTC)  # 03:00 Asia/Shanghai on DAY


@pytest.fixture(params=["sqlite", "postgresql"])
def web(request, tmp_path):
    url = (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_schema_url"))
    engine = make_engine(url)
    upgrade(engine)
    clock = Clock(datetime(2026, 3, 6, 2, 0, tzinfo=UTC))
    store = TokenStore(tokens={
        TOKENS["clerk"]: Principal("王芳", "clerk", OP), TOKENS["clerk_b"]: Principal("bob", "clerk", OTHER),
        TOKENS["operator_staff"]: Principal("carol", "operator_staff"),
        TOKENS["gateway"]: Principal("ota-gateway", "operator_staff"),
        TOKENS["operations"]: Principal("dave", "operations"), TOKENS["admin"]: Principal("erin", "admin")})
    platform = PaymentPlatform(clock=clock)
    app = create_app(engine, tokens=store, clock=clock, migrate=False)
    configure_ota(app, keys=KEYS, webhook_key=platform.public_key)
    with TestClient(app) as client:
        yield engine, clock, platform, client, tmp_path
    engine.dispose()


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


class HttpHost:
    """The back office as the phone reaches it through the OTA gateway: the phone's host interface over HTTP."""

    def __init__(self, client):
        self.client = client

    def _post(self, url, body):
        r = self.client.post(url, json=body, headers=auth("gateway"))
        if r.status_code != 200:
            raise Refused(r.status_code, r.json()["detail"])
        return r.json()

    def authorize(self, *, order_id, asn, init_answer, terminal_id, log=None):
        answer = self._post(f"/api/v1/ota/orders/{order_id}/load", {
            "asn": asn, "init_answer": init_answer.hex(), "terminal_id": terminal_id.hex(),
            "log": None if log is None else [r.hex() for r in log]})
        return Grant(bytes.fromhex(answer["credit_apdu"]))

    def report(self, *, order_id, tac):
        return self._post(f"/api/v1/ota/orders/{order_id}/tac", {"tac": tac.hex()})

    def card_seen(self, *, asn, online_ttc, log, proofs=()):
        return self._post(f"/api/v1/ota/cards/{asn}/seen", {
            "online_ttc": online_ttc, "log": [r.hex() for r in log],
            "proofs": [{"online_ttc": ttc, "answer": answer.hex()} for ttc, answer in proofs]})


class Grant:
    def __init__(self, command: bytes):
        self.command = command

    def credit_apdu(self) -> bytes:
        return self.command


class Refused(Exception):
    def __init__(self, status, detail):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


def issued_card(engine, tmp_path, clock, asn="31000000000000000001") -> SimCard:
    card = SimCard(bytes.fromhex(asn), 1, OPENING, start=date(2026, 1, 1), end=date(2030, 12, 31),
                   state_file=tmp_path / f"{asn}.json")
    with engine.begin() as conn:
        issuance.issue_card(conn, card=issuance.read_card(Direct(card)), deposit=2000, who="staff:li", now=clock())
    return card


def deliver(client, hook) -> dict:
    r = client.post("/api/v1/ota/webhook", content=hook.body, headers={SIGNATURE_HEADER: hook.signature})
    assert r.status_code == 200, r.text
    return r.json()


def new_order(client, asn, amount) -> str:
    r = client.post("/api/v1/ota/orders", json={"asn": asn, "rider": "13800000000", "amount": amount},
                    headers=auth("gateway"))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "created"
    return r.json()["order_id"]


def loaded_rows(engine, asn):
    with engine.connect() as conn:
        return conn.execute(select(CardLoad.status, CardLoad.amount).where(CardLoad.asn == asn)
                            .order_by(CardLoad.id)).all()


def assert_books_agree(client, engine, card, loaded: int):
    """The SIM, the load rows and the ledger endpoint tell the same story: opening + what was loaded."""
    assert card.balance == OPENING + loaded
    total = 0
    for status, amount in loaded_rows(engine, card.asn.hex()):
        if status == "loaded":
            total += amount
    assert total == loaded
    book = client.get(f"/api/v1/cards/{card.asn.hex()}/ledger", headers=auth("operator_staff")).json()
    assert book["ledger"]["balance"] == card.balance and book["ledger"]["agrees"]
    assert book["ledger"]["loads"] == loaded


# ------------------------------------------------------------------------------------------------ OTA
def test_the_public_test_platform_key_is_the_simulators():
    assert bytes.fromhex(TEST_PLATFORM_PUBLIC_KEY) == PaymentPlatform().public_key


def test_ota_top_up_over_http_loads_once_under_duplicate_webhooks_and_retries(web):
    engine, clock, platform, client, tmp_path = web
    card = issued_card(engine, tmp_path, clock)
    asn = card.asn.hex()
    phone = Phone(card, HttpHost(client), OTA_TERMINAL)
    order = new_order(client, asn, 5000)
    with pytest.raises(Refused) as early:  # not paid yet: no MAC2
        phone.topup(order, 5000)
    assert early.value.status == 409 and early.value.detail["reason"] == "not_paid"

    hook = platform.pay(order, 5000)
    assert deliver(client, hook)["outcome"].startswith(f"order {order} paid")
    for _ in range(3):  # the platform did not hear our 200 and delivers again
        clock.tick()
        assert deliver(client, hook)["outcome"].startswith("seen:")

    phone.lose_answer = True  # the host's MAC2 is lost on the way back
    with pytest.raises(HostTimeout):
        phone.topup(order, 5000)
    clock.tick(5)
    assert phone.retry(order)["status"] == "loaded"  # asked again: the same MAC2, loaded once
    assert [s for s, _a in loaded_rows(engine, asn)] == ["loaded"]
    tac = card.log[0].tac
    assert HttpHost(client).report(order_id=order, tac=tac)["status"] == "loaded"  # reported twice: harmless
    with pytest.raises(Refused) as again:
        phone.topup(order, 5000)  # the menu offers the same paid order again
    assert again.value.detail["reason"] == "already_loaded"
    got = client.get(f"/api/v1/ota/orders/{order}", headers=auth("gateway")).json()
    assert got["status"] == "loaded" and got["amount"] == 5000
    assert_books_agree(client, engine, card, 5000)

    # a second order whose phone dies after CREDIT FOR LOAD: the card's log settles it when the phone is back
    second = new_order(client, asn, 1200)
    deliver(client, platform.pay(second, 1200))
    phone.vanish_after_credit = True
    with pytest.raises(PhoneGone):
        phone.topup(second, 1200)
    assert client.get(f"/api/v1/ota/orders/{second}", headers=auth("gateway")).json()["status"] == "authorized"
    settled = phone.show_card()["settled"]
    assert list(settled.values()) == ["loaded"]
    assert_books_agree(client, engine, card, 5000 + 1200)
    with engine.connect() as conn:
        actions = [a.action for a in audit.trail(conn, order_id=order)]
    assert actions.count("order_paid") == 1 and actions.count("load_confirmed") == 1


def test_a_forged_or_unsigned_webhook_is_refused_and_changes_nothing(web):
    engine, clock, platform, client, tmp_path = web
    card = issued_card(engine, tmp_path, clock)
    order = new_order(client, card.asn.hex(), 800)
    forger = PaymentPlatform(bytes(32), clock=clock)  # a key the back office does not trust
    forged = forger.pay(order, 800)
    r = client.post("/api/v1/ota/webhook", content=forged.body, headers={SIGNATURE_HEADER: forged.signature})
    assert r.status_code == 401 and r.json()["detail"]["reason"] == "bad_signature"
    genuine = platform.pay(order, 800)
    tampered = genuine.body.replace(b'"amount": 800', b'"amount": 8')
    assert tampered != genuine.body
    r = client.post("/api/v1/ota/webhook", content=tampered, headers={SIGNATURE_HEADER: genuine.signature})
    assert r.status_code == 401
    r = client.post("/api/v1/ota/webhook", content=genuine.body)  # no signature at all
    assert r.status_code == 401
    r = client.post("/api/v1/ota/webhook", content=genuine.body,  # a bearer token is no signature either
                    headers={"Authorization": f"Bearer {TOKENS['admin']}"})
    assert r.status_code == 401
    clock.tick(10 * 60)  # the genuine one, replayed long after it was signed
    r = client.post("/api/v1/ota/webhook", content=genuine.body, headers={SIGNATURE_HEADER: genuine.signature})
    assert r.status_code == 401 and r.json()["detail"]["reason"] == "stale"
    assert client.get(f"/api/v1/ota/orders/{order}", headers=auth("gateway")).json()["status"] == "created"
    phone = Phone(card, HttpHost(client), OTA_TERMINAL)
    with pytest.raises(Refused):
        phone.topup(order, 800)
    assert card.balance == OPENING and loaded_rows(engine, card.asn.hex()) == []


def test_staff_see_unconfirmed_orders_first_and_retry_or_refund_them(web):
    engine, clock, platform, client, tmp_path = web
    card = issued_card(engine, tmp_path, clock)
    asn = card.asn.hex()
    phone = Phone(card, HttpHost(client), OTA_TERMINAL)
    paid_only = new_order(client, asn, 700)
    deliver(client, platform.pay(paid_only, 700))
    clock.tick(60)
    stuck = new_order(client, asn, 900)
    deliver(client, platform.pay(stuck, 900))
    phone.lose_answer = True  # MAC2 given, the phone never got it and never came back
    with pytest.raises(HostTimeout):
        phone.topup(stuck, 900)
    phone._open = None
    clock.tick(10 * 60)  # past the grace: paid, load unconfirmed
    listed = client.get("/api/v1/topups/orders", headers=auth("operator_staff")).json()
    assert [(o["order_id"], o["needs_staff"]) for o in listed[:2]] == [(stuck, True), (paid_only, False)]

    # the card's online counter read at the desk proves the MAC2 was never used: staff let it load again
    init = apdu.parse_init_load(apdu.check(card.transmit(apdu.init_load(1, 0, OTA_TERMINAL)), "INIT"))
    card.transmit(apdu.get_balance())
    wrong = client.post(f"/api/v1/topups/orders/{stuck}/retry", headers=auth("operator_staff"),
                        json={"card_online_ttc": init.online_ttc + 1, "why": "rider at the desk"})
    assert wrong.status_code == 409 and wrong.json()["detail"]["reason"] == "may_be_loaded"
    r = client.post(f"/api/v1/topups/orders/{stuck}/retry", headers=auth("operator_staff"),
                    json={"card_online_ttc": init.online_ttc, "why": "rider at the desk"})
    assert r.status_code == 200 and r.json()["status"] == "paid"
    assert phone.topup(stuck, 900)["status"] == "loaded"
    # the other paid order is refunded instead; a loaded one cannot be
    r = client.post(f"/api/v1/topups/orders/{paid_only}/refund", headers=auth("operator_staff"),
                    json={"why": "rider changed their mind"})
    assert r.status_code == 200 and r.json()["status"] == "refunded"
    r = client.post(f"/api/v1/topups/orders/{stuck}/refund", headers=auth("operator_staff"), json={"why": "x"})
    assert r.status_code == 409
    assert_books_agree(client, engine, card, 900)
    with engine.connect() as conn:
        trail = audit.trail(conn, order_id=paid_only)
    assert [(a.action, a.who) for a in trail if a.action == "refund_order"] == [("refund_order", "carol")]


def test_lost_card_refund_and_adjustment_with_the_token_holder_in_the_audit(web):
    engine, clock, _platform, client, tmp_path = web
    card = issued_card(engine, tmp_path, clock)
    asn = card.asn.hex()
    staff = auth("operator_staff")
    r = client.post(f"/api/v1/cards/{asn}/adjustments", headers=staff, json={"amount": -120, "why": ""})
    assert r.status_code == 422  # a reason is required
    r = client.post(f"/api/v1/cards/{asn}/adjustments", headers=staff,
                    json={"amount": -120, "why": "tap record lost on bus 12"})
    assert r.status_code == 200 and r.json()["balance"] == OPENING - 120
    r = client.post(f"/api/v1/cards/{asn}/refund", headers=staff, json={"amount": 100, "why": "early"})
    assert r.status_code == 409  # not lost: nothing is frozen
    r = client.post(f"/api/v1/cards/{asn}/lost", headers=staff, json={"why": "rider called"})
    assert r.status_code == 200 and r.json()["frozen_balance"] == OPENING - 120
    r = client.post(f"/api/v1/cards/{asn}/refund", headers=staff, json={"amount": OPENING, "why": "too much"})
    assert r.status_code == 409
    r = client.post(f"/api/v1/cards/{asn}/refund", headers=staff, json={"amount": OPENING - 120, "why": "paid out"})
    assert r.status_code == 200 and r.json()["balance"] == 0
    book = client.get(f"/api/v1/cards/{asn}/ledger", headers=staff).json()
    assert book["status"] == "lost" and book["frozen_balance"] == 180
    assert (book["ledger"]["adjustments"], book["ledger"]["refunds"]) == (-120, 180)
    mine = [(a["action"], a["who"], a["amount"]) for a in book["trail"] if a["who"] == "carol"]
    assert mine == [("adjust", "carol", -120), ("report_lost", "carol", 180), ("refund_balance", "carol", 180)]
    assert client.get("/api/v1/cards/99999999999999999999/ledger", headers=staff).status_code == 404
    assert client.post("/api/v1/cards/99999999999999999999/lost", headers=staff,
                       json={"why": "x"}).status_code == 404


# ------------------------------------------------------------------------------------------------ reconciliation
def _tap(seq, *, minutes, amount, asn):
    at = DAY_START + timedelta(hours=2, minutes=minutes)
    return {"device_id": "W1", "device_seq": seq, "kind": "purchase", "occurred_at": at,
            "received_at": at + timedelta(minutes=2), "operator": OP, "route": "R1", "vehicle": "V1",
            "driver": "D1", "shift_no": 0, "card_asn": asn, "card_type": 1, "card_ttc": seq, "amount": amount,
            "balance_after": 1000, "terminal_id": "010000000001", "terminal_seq": 5000 + seq,
            "tac": f"{seq:08X}", "reason": ""}


def test_an_issuer_file_with_known_differences_becomes_items_and_an_adjustment_is_carried_once(web):
    engine, _clock, _platform, client, _tmp_path = web
    from backoffice.models import Tap

    rows = [_tap(i, minutes=i, amount=100 + 10 * i, asn=f"{i:020X}") for i in range(1, 7)]
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="西城公交 West Bus")
        registry.add_operator(conn, code=OTHER, name="Other Bus")
        registry.add_vehicle(conn, code="V1", operator=OP, plate="粤A·1")
        clearing_runs.set_commission_rate(conn, operator=OP, rate_bp=0, valid_from=date(2026, 1, 1))
        conn.execute(Tap.__table__.insert(), rows)
    file = pd.DataFrame([{c: r[c] for c in ISSUER_COLUMNS} for r in rows], columns=list(ISSUER_COLUMNS))
    file.loc[0, "amount"] += 30  # the issuer cleared 30 fen more on card 1
    file = file.drop(index=1)  # and never saw card 2's purchase
    csv = write_issuer_file(file)
    clerk = auth("clerk")
    url = f"/api/v1/operators/{OP}/reconciliation"
    r = client.post(f"{url}/issuer-file?day={DAY}", headers=clerk, files={"file": ("issuer.csv", csv, "text/csv")})
    assert r.status_code == 200, r.text
    assert r.json()["discrepancies"] == 2 and len(r.json()["new_items"]) == 2
    again = client.post(f"{url}/issuer-file?day={DAY}", headers=clerk, files={"file": ("i.csv", csv, "text/csv")})
    assert again.json()["new_items"] == []  # stored once
    bad = client.post(f"{url}/issuer-file?day={DAY}", headers=clerk,
                      files={"file": ("i.csv", "card_asn,amount\nx,1\n", "text/csv")})
    assert bad.status_code == 422 and "lacks column" in bad.text

    work = {i["problem"]: i for i in client.get(f"{url}?status=open", headers=clerk).json()}
    assert set(work) == {"amount_differs", "missing_in_file"}
    differs = work["amount_differs"]
    assert (differs["ours"], differs["theirs"], differs["suggested"]) == (110, 140, 30)
    assert work["missing_in_file"]["ours"] == 120 and work["missing_in_file"]["theirs"] is None

    # another operator's clerk cannot see or decide these
    assert client.get(url, headers=auth("clerk_b")).status_code == 404
    r = client.post(f"/api/v1/operators/{OTHER}/reconciliation/items/{differs['id']}", headers=auth("clerk_b"),
                    json={"status": "accepted"})
    assert r.status_code == 404

    r = client.post(f"{url}/items/{differs['id']}", headers=clerk,
                    json={"status": "adjusted", "adjustment": 30, "note": "issuer's figure"})
    assert r.status_code == 200 and r.json()["status"] == "adjusted" and r.json()["resolved_by"] == "王芳"
    r = client.post(f"{url}/items/{work['missing_in_file']['id']}", headers=clerk, json={"status": "disputed"})
    assert r.json()["status"] == "disputed"
    assert client.get(f"{url}?status=open", headers=clerk).json() == []

    with engine.begin() as conn:
        run = clearing_runs.clear_day(conn, operator=OP, day=DAY, now=DAY_START + timedelta(days=1, hours=1))
        nxt = clearing_runs.clear_day(conn, operator=OP, day=DAY + timedelta(days=1),
                                      now=DAY_START + timedelta(days=2, hours=1))
    day_gross = 0
    for row in rows:
        day_gross += row["amount"]
    assert run.totals["day_gross"] == day_gross
    assert run.totals["reconciliation_gross"] == 30  # the clerk's adjustment, once
    assert nxt.totals["reconciliation_gross"] == 0  # and not again
    done = {i["problem"]: i for i in client.get(url, headers=clerk).json()}
    assert done["amount_differs"]["carried_run_id"] == run.id
    assert done["missing_in_file"]["carried_run_id"] is None
    r = client.post(f"{url}/items/{differs['id']}", headers=clerk, json={"status": "accepted"})
    assert r.status_code == 422 and "closed" in r.text


# ------------------------------------------------------------------------------------------------ pages
def _login(client, who: str) -> None:
    client.cookies.clear()
    r = client.post("/login", data={"token": TOKENS[who], "next": "/"}, follow_redirects=False)
    assert r.status_code == 303


def _csrf(page: str) -> str:
    import re

    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def test_counter_pages_adjust_report_lost_refund_and_settle_orders(web):
    engine, clock, platform, client, tmp_path = web
    card = issued_card(engine, tmp_path, clock)
    asn = card.asn.hex()
    order = new_order(client, asn, 600)  # paid, then the card is reported lost: refunded at the counter
    deliver(client, platform.pay(order, 600))
    _login(client, "operator_staff")
    client.cookies.set("farebox_lang", "en")
    page = client.get(f"/cards/{asn}").text
    # one balance: the book, explained beside what the card last said (here: its reading at issue)
    assert 'id="balance" class="value">¥3.00<' in page and 'id="last-seen">¥3.00<' in page
    assert 'id="agrees"' in page and "Report lost" in page and "余额" not in page
    csrf = _csrf(page)
    # a form without the field (a page from elsewhere riding the cookie) does nothing
    r = client.post(f"/cards/{asn}/adjust", data={"amount": "-1.20", "why": "tap lost"}, follow_redirects=False)
    assert r.status_code == 400
    r = client.post(f"/cards/{asn}/adjust", data={"amount": "-1.2", "why": "tap lost", "csrf": csrf})
    assert r.status_code == 200 and 'id="ledger-balance"><strong>¥1.80<' in r.text
    assert 'id="differs"' in r.text and "adjustments: -¥1.20" in r.text  # the book moved, the card did not
    r = client.post(f"/cards/{asn}/adjust", data={"amount": "1.234", "why": "x", "csrf": csrf})
    assert r.status_code == 409 and "at most two decimals" in r.text  # three decimals: refused, shown
    # report lost: without the confirmation step, the post only leads to the confirmation page
    r = client.post(f"/cards/{asn}/lost", data={"why": "rider called", "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/cards/{asn}/lost"
    confirm = client.get(f"/cards/{asn}/lost").text
    assert asn in confirm and 'id="confirm-balance"><strong>¥1.80<' in confirm and "Yes, report it lost" in confirm
    with engine.connect() as conn:
        assert audit.trail(conn, asn=asn)[-1].action == "adjust"  # nothing reported yet
    r = client.post(f"/cards/{asn}/lost", data={"why": "rider called", "csrf": csrf, "confirmed": "yes"})
    assert 'id="frozen">¥1.80<' in r.text and "Refund" in r.text and 'value="1.80"' in r.text
    r = client.post(f"/cards/{asn}/refund", data={"amount": "1.80", "why": "paid out", "csrf": csrf})
    assert 'id="ledger-refunds">¥1.80<' in r.text and 'id="ledger-balance"><strong>¥0.00<' in r.text
    with engine.connect() as conn:
        who = [(a.action, a.who, a.amount) for a in audit.trail(conn, asn=asn) if a.who == "carol"]
    assert who == [("adjust", "carol", -120), ("report_lost", "carol", 180), ("refund_balance", "carol", 180)]

    page = client.get("/topups").text
    assert f'id="order-{order}"' in page and "¥6.00" in page and "Refund" in page
    assert "farebox topup" not in page  # the way to do things is the page, not a command line
    r = client.post(f"/topups/{order}/refund", data={"why": "card lost", "csrf": _csrf(page)})
    assert r.status_code == 200 and ">refunded<" in r.text
    r = client.post(f"/topups/{order}/refund", data={"why": "again", "csrf": _csrf(page)})
    assert r.status_code == 409 and "no refund" in r.text
    page = client.get(f"/topups/{order}").text  # the order's history, step by step
    assert [a in page for a in ("order created", "paid", "order refunded")] == [True] * 3
    assert client.get("/topups?state=refunded").text.count(f'id="order-{order}"') == 1
    assert client.get("/topups?state=paid").text.count(f'id="order-{order}"') == 0


def test_issue_a_card_in_the_page_then_top_up_through_the_desk_agent(web):
    """The desk agent (farebox.desk) over real HTTP on 127.0.0.1 with a simulated reader, relayed as the page's
    script relays it: issue with holder and proof, a counter top-up whose MAC2 comes from the back office, the
    card's own balance read back; the agent refuses other origins and unpaired callers."""
    import threading

    import httpx

    from farebox.broker import free_port
    from farebox.desk import Desk, make_server
    from validator.readers.sim import SimReader

    engine, clock, _platform, client, tmp_path = web
    card = SimCard(bytes.fromhex("31000000000000000777"), 2, 800, start=date(2026, 1, 1), end=date(2030, 12, 31))
    reader = SimReader()
    reader.present(card)
    port, origin = free_port(), "http://bo.example:8000"
    server = make_server(Desk(reader, terminal_id="0e0000000009", wait=0.1), origin=origin, pairing="s3cret",
                         port=port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    agent = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Origin": origin, "X-Desk-Pairing": "s3cret"})
    try:
        # the gate: another site's page, a caller without the code, a rebinding host name
        r = httpx.post(f"http://127.0.0.1:{port}/card/read", headers={"Origin": "https://evil.example",
                                                                        "X-Desk-Pairing": "s3cret"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        pre = httpx.options(f"http://127.0.0.1:{port}/card/read", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Private-Network": "true"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == origin
        assert pre.headers["access-control-allow-private-network"] == "true"
        assert httpx.post(f"http://127.0.0.1:{port}/card/read", headers={"Origin": origin}).status_code == 401
        assert httpx.post(f"http://127.0.0.1:{port}/card/read", headers={
            "Origin": origin, "X-Desk-Pairing": "s3cret", "Host": f"evil.example:{port}"}).status_code == 403

        read = agent.post("/card/read", json={}).json()
        assert (read["asn"], read["balance"], read["card_type"], read["load_ttc"]) == (card.asn.hex(), 800, 2, 0)
        _login(client, "operator_staff")
        client.cookies.set("farebox_lang", "en")
        csrf = _csrf(client.get("/cards/issue").text)
        form = {k: "" if read[k] is None else str(read[k]) for k in (
            "asn", "issuer", "card_type", "algorithm", "valid_from", "valid_to", "balance", "purchase_ttc",
            "load_ttc")}
        r = client.post("/cards/issue", data={**form, "csrf": csrf, "holder": "李雷", "deposit": "20"})
        assert r.status_code == 409 and "needs its proof" in r.text  # a student card without its proof
        r = client.post("/cards/issue", data={**form, "csrf": csrf, "holder": "李雷", "proof_kind": "student_id",
                                              "proof_no": "S2026-0042", "deposit": "20"})
        asn = card.asn.hex()
        assert r.status_code == 200 and 'id="holder">李雷<' in r.text and "student card S2026-0042" in r.text
        assert 'id="balance" class="value">¥8.00<' in r.text and "¥20.00" in r.text

        prepared = agent.post("/load/prepare", json={"amount": 5000}).json()
        assert agent.post("/card/read", json={}).status_code == 409  # the card is held for this load
        no_csrf = client.post(f"/cards/{asn}/counter-loads", json={**prepared, "log": prepared["log"]})
        assert no_csrf.status_code == 400
        grant = client.post(f"/cards/{asn}/counter-loads", headers={"X-CSRF": csrf}, json={
            "amount": 5000, "terminal_id": prepared["terminal_id"], "init_answer": prepared["init_answer"],
            "log": prepared["log"]})
        assert grant.status_code == 200, grant.text
        bad = agent.post("/load/credit", json={"credit_apdu": "00a4040008a000000632010105"})
        assert bad.status_code == 422  # the agent sends the card a CREDIT FOR LOAD and nothing else
        credited = agent.post("/load/credit", json={"credit_apdu": grant.json()["credit_apdu"]}).json()
        assert credited["balance"] == 800 + 5000 == card.balance
        done = client.post(f"/cards/counter-loads/{grant.json()['load_id']}/tac", headers={"X-CSRF": csrf},
                           json={"tac": credited["tac"]})
        assert done.status_code == 200 and done.json()["book_balance"] == 5800 and done.json()["card_balance"] == 5800
        assert loaded_rows(engine, asn) == [("loaded", 5000)]
        page = client.get(f"/cards/{asn}").text
        assert 'id="balance" class="value">¥58.00<' in page and 'id="agrees"' in page
        # a MAC1 that is not the card's: refused, nothing granted
        forged = prepared["init_answer"][:-8] + "00000000"
        r = client.post(f"/cards/{asn}/counter-loads", headers={"X-CSRF": csrf}, json={
            "amount": 5000, "terminal_id": prepared["terminal_id"], "init_answer": forged, "log": []})
        assert r.status_code == 409 and r.json()["detail"]["reason"] == "bad_mac1"
    finally:
        server.shutdown()
        server.server_close()
        agent.close()


def test_the_clerks_reconciliation_page_uploads_and_decides(web):
    engine, _clock, _platform, client, _tmp_path = web
    from backoffice.models import Tap

    rows = [_tap(i, minutes=i, amount=200, asn=f"{i:020X}") for i in range(1, 4)]
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="西城公交 West Bus")
        registry.add_operator(conn, code=OTHER, name="Other Bus")
        conn.execute(Tap.__table__.insert(), rows)
    file = pd.DataFrame([{c: r[c] for c in ISSUER_COLUMNS} for r in rows], columns=list(ISSUER_COLUMNS))
    file.loc[2, "amount"] = 150
    _login(client, "clerk")
    client.cookies.set("farebox_lang", "en")
    page = client.get("/reconciliation").text
    assert "Upload" in page and "Nothing to decide" in page and "上传" not in page
    csrf = _csrf(page)
    r = client.post("/reconciliation/upload", data={"day": str(DAY), "operator": OP, "csrf": csrf},
                    files={"file": ("issuer.csv", write_issuer_file(file), "text/csv")})
    assert r.status_code == 200 and "amount differs" in r.text
    assert "¥2.00" in r.text and "¥1.50" in r.text and "-¥0.50" in r.text
    item = client.get(f"/api/v1/operators/{OP}/reconciliation?status=open", headers=auth("clerk")).json()[0]
    r = client.post(f"/reconciliation/{item['id']}", data={"decision": "adjusted", "amount": "-0.40",
                                                           "operator": OP, "csrf": csrf})
    assert r.status_code == 200 and "Nothing to decide" in r.text
    done = client.get(f"/api/v1/operators/{OP}/reconciliation", headers=auth("clerk")).json()[0]
    assert (done["status"], done["adjustment"], done["resolved_by"]) == ("adjusted", -40, "王芳")
    r = client.post(f"/reconciliation/{item['id']}", data={"decision": "accepted", "operator": OTHER,
                                                           "csrf": csrf})
    assert r.status_code == 404  # another operator: as if it did not exist


def test_the_desk_agent_gives_up_a_held_load_and_the_card_keeps_its_money():
    """A top-up whose MAC2 never comes back (the page closed mid-way): after HOLD_SECONDS the reader is free
    again, a late CREDIT is refused, and the card was never credited (its INITIALIZE is dropped)."""
    from farebox.desk import HOLD_SECONDS, Desk, DeskError
    from validator.readers.sim import SimReader

    card = SimCard(bytes.fromhex("31000000000000000778"), 1, 500, start=date(2026, 1, 1), end=date(2030, 12, 31))
    reader = SimReader()
    reader.present(card)
    now = [1000.0]
    desk = Desk(reader, clock=lambda: now[0])
    prepared = desk.prepare_load(300)
    assert (prepared["asn"], prepared["balance"], prepared["online_ttc"]) == (card.asn.hex(), 500, 0)
    with pytest.raises(DeskError) as held:
        desk.read()
    assert held.value.status == 409 and desk.status()["holding"] == card.asn.hex()
    now[0] += HOLD_SECONDS + 1
    assert desk.status()["holding"] is None and desk.read()["balance"] == 500
    with pytest.raises(DeskError) as late:
        desk.credit("805200000b" + "00" * 11)
    assert late.value.status == 409 and card.balance == 500
    with pytest.raises(DeskError):
        desk.prepare_load(0)

"""The rider self-service API over real HTTP (uvicorn on a loopback port), against a SQLite file and PostgreSQL, as
the mobile operator's gateway calls it with its operator_staff token.

One rider's card lives a real life first: issued at the counter from a simulated card, topped up at the counter
and over the air (a simulated phone and payment platform, through the real issuer host), two more orders left
created and paid, three rides on two bus companies' validators (real Terminal, journal, PSAM; the records go
through the real ingest with the devices' MACs). Every figure the API returns is then checked against plain SQL
written here, and against the simulated card itself; the rider's phone menu (hardware_sim.phone.PhoneMenu) reads
the same card straight from the SIM and shows the same balance and the same rides and top-ups."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from sqlalchemy import text
from web_city import NOW, _send, seed

from backoffice.cards import issuance, topup
from backoffice.cards.ota_host import OtaHost
from backoffice.db import make_engine, upgrade
from backoffice.keyservice import LocalKeyService
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from blacklist.denylist import DenyList
from epurse import apdu
from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.payment import PaymentPlatform
from hardware_sim.phone import Phone, PhoneMenu
from hardware_sim.psam import SimPsam
from validator.fares import FareTable
from validator.journal import Journal
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig

KEYS = LocalKeyService(TEST_ISSUER_KEYS, source="test keys")
GATEWAY, STAFF, CLERK = "t-gateway", "t-counter", "t-clerk"
ASN = "33000000000000000007"
OPENING = 1000
DESK, OTA_TERMINAL = bytes.fromhex("0E0000000002"), bytes.fromhex("0F0000000001")
T0 = NOW - timedelta(days=2)  # the card is issued two days before web_city's "now"
SHANGHAI = ZoneInfo("Asia/Shanghai")


class Direct:
    def __init__(self, card):
        self.exchange = card.transmit


def bus(tmp_path, device: str, operator: str, route: str, vehicle: str, terminal: str, fare: int, clock):
    slot = SimReader()
    slot.present(SimPsam(bytes.fromhex(terminal), keys=TEST_ISSUER_KEYS, sequence=1))
    return Terminal(TerminalConfig(device_id=device, operator=operator, route=route, vehicle=vehicle),
                    journal=Journal(tmp_path / f"{device}.journal"), psam=slot.poll(),
                    fares=FareTable(version=1, flat={route: fare}), deny_list=DenyList.empty(), clock=clock)


def tap(terminal: Terminal, card: SimCard):
    reader = SimReader()
    reader.present(card)
    result = terminal.tap(reader.poll())
    assert result.outcome.name in ("SHIFT_OPENED", "PAID"), result
    return result


def live_card(engine, tmp_path) -> SimCard:
    """Issue, counter top-up, an over-the-air top-up loaded, one paid and one created, three rides."""
    card = SimCard(bytes.fromhex(ASN), int(CardType.ADULT), OPENING, start=date(2026, 1, 1), end=date(2030, 12, 31))
    with engine.begin() as conn:
        issuance.issue_card(conn, card=issuance.read_card(Direct(card)), deposit=2000, who="staff:li", now=T0,
                            holder="王芳")
    topup.counter_topup(engine, Direct(card), keys=KEYS, amount=500, terminal_id=DESK, staff="staff:li",
                        now=T0 + timedelta(hours=1))
    clock = [T0 + timedelta(hours=2)]
    platform = PaymentPlatform(clock=lambda: clock[0])
    host = OtaHost(engine, KEYS, webhook_key=platform.public_key, clock=lambda: clock[0])
    with engine.begin() as conn:
        for order, amount in (("R-loaded", 300), ("R-paid", 200), ("R-created", 100)):
            topup.create_order(conn, asn=ASN, rider="13800000007", amount=amount, now=clock[0], order_id=order)
            clock[0] += timedelta(minutes=1)
    for order, amount in (("R-loaded", 300), ("R-paid", 200)):
        hook = platform.pay(order, amount)
        host.payment_webhook(hook.body, hook.signature)
    assert Phone(card, host, OTA_TERMINAL).topup("R-loaded", 300).status == "loaded"

    now = [T0 + timedelta(hours=20)]  # 04:00 UTC the next day: noon in Shanghai
    city = bus(tmp_path, "cb_001", "citybus", "c1", "cv1", "010000000001", 200, lambda: now[0])
    metro = bus(tmp_path, "mb_001", "metrobus", "m9", "mv1", "010000000002", 300, lambda: now[0])
    for terminal, staff in ((city, "cd1"), (metro, "md1")):
        tap(terminal, SimCard(bytes.fromhex("99990000000000000%03d" % len(staff)), int(CardType.DRIVER), 0,
                              staff_no=staff, start=date(2026, 1, 1), end=date(2030, 12, 31)))
    for terminal in (city, metro, city):
        now[0] += timedelta(hours=3)  # far apart: no transfer discount, no double tap
        tap(terminal, card)
    with engine.begin() as conn:
        for terminal in (city, metro):
            result = _send(conn, terminal.config.device_id, terminal.journal.records_since(0))
            assert result.ack_seqs, result
            terminal.journal.close()
    return card


class Server:
    """The back office's web app in uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rider")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp}/bo.db"
    else:
        from test_web_api import _pg_database

        url, drop = _pg_database(request.getfixturevalue("pg_url"))
        request.addfinalizer(drop)
    engine = make_engine(url)
    upgrade(engine)
    seed(engine)
    card = live_card(engine, tmp)
    tokens = TokenStore(tokens={GATEWAY: Principal("rider-gateway", "operator_staff"),
                                STAFF: Principal("carol", "operator_staff"),
                                CLERK: Principal("alice", "clerk", "citybus")})
    server = Server(create_app(engine, tokens=tokens, clock=lambda: NOW, migrate=False))
    client = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {GATEWAY}"}, timeout=30)
    yield engine, card, client
    client.close()
    server.stop()
    engine.dispose()


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def utc(value) -> datetime:
    at = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def test_balance_is_the_book_beside_what_the_card_last_said(world):
    engine, card, client = world
    r = client.get(f"/api/v1/rider/cards/{ASN}")
    assert r.status_code == 200, r.text
    got = r.json()
    [(opening,)] = sql(engine, "SELECT opening_balance FROM card_account WHERE asn = :a", a=ASN)
    [(loads,)] = sql(engine, "SELECT coalesce(sum(amount), 0) FROM card_load WHERE asn = :a AND status = 'loaded'",
                     a=ASN)
    [(fares,)] = sql(engine, "SELECT coalesce(sum(amount), 0) FROM tap WHERE card_asn = :a AND kind = 'purchase'",
                     a=ASN)
    [(entries,)] = sql(engine, "SELECT count(*) FROM card_entry WHERE asn = :a", a=ASN)
    assert entries == 0
    assert (opening, loads, fares) == (OPENING, 800, 700)
    assert got["balance"]["book"] == opening + loads - fares == card.balance
    last = sql(engine, "SELECT balance_after, occurred_at FROM tap WHERE card_asn = :a AND kind = 'purchase' "
                       "ORDER BY occurred_at DESC LIMIT 1", a=ASN)[0]
    assert got["balance"]["card"] == last.balance_after == card.balance
    assert utc(got["balance"]["card_seen_at"]) == utc(last.occurred_at)
    assert got["balance"]["card_seen_local"] == utc(last.occurred_at).astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M")
    assert got["balance"]["agrees"] is True and got["status"] == "active" and got["card_type"] == 1


def test_rides_carry_route_names_and_local_times(world):
    engine, _card, client = world
    r = client.get(f"/api/v1/rider/cards/{ASN}/rides", params={"limit": 2})
    assert r.status_code == 200, r.text
    rides = r.json()["rides"]
    expected = sql(engine, "SELECT t.occurred_at, t.amount, t.balance_after, r.name AS route_name, o.name AS "
                           "operator_name, o.timezone FROM tap t JOIN route r ON r.code = t.route JOIN operator o "
                           "ON o.code = t.operator WHERE t.card_asn = :a AND t.kind = 'purchase' "
                           "ORDER BY t.occurred_at DESC", a=ASN)
    assert len(expected) == 3 and len(rides) == 2
    for got, row in zip(rides, expected, strict=False):
        at = utc(row.occurred_at)
        assert (got["fare"], got["balance_after"], got["route_name"], got["operator_name"]) == \
            (row.amount, row.balance_after, row.route_name, row.operator_name)
        assert utc(got["at"]) == at and datetime.fromisoformat(got["at"]).utcoffset() is not None
        assert got["local_time"] == at.astimezone(ZoneInfo(row.timezone)).strftime("%Y-%m-%d %H:%M")
    assert [ride["route_name"] for ride in rides] == ["1路 火车站—大学城", "9路 机场快线"]
    assert len(client.get(f"/api/v1/rider/cards/{ASN}/rides").json()["rides"]) == 3


def test_topups_and_their_status(world):
    engine, _card, client = world
    r = client.get(f"/api/v1/rider/cards/{ASN}/topups")
    assert r.status_code == 200, r.text
    got = {(t["channel"], t["order_id"], t["amount"], t["status"]) for t in r.json()["topups"]}
    orders = {("ota", o.order_id, o.amount, o.status)
              for o in sql(engine, "SELECT order_id, amount, status FROM topup_order WHERE asn = :a", a=ASN)}
    counter = {("counter", None, c.amount, c.status)
               for c in sql(engine, "SELECT amount, status FROM card_load WHERE asn = :a AND channel = 'counter'",
                            a=ASN)}
    assert got == orders | counter
    assert {(o, s) for _c, o, _a, s in got} == {("R-loaded", "loaded"), ("R-paid", "paid"),
                                                ("R-created", "created"), (None, "loaded")}
    times = [utc(t["at"]) for t in r.json()["topups"]]
    assert times == sorted(times, reverse=True)
    first = r.json()["topups"][0]
    assert first["local_time"] == utc(first["at"]).astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M")
    assert client.get(f"/api/v1/rider/cards/{ASN}/topups", params={"tz": "Mars/Base"}).status_code == 422


def test_the_phone_menu_reads_the_same_card_from_the_sim(world):
    engine, card, client = world
    balance = client.get(f"/api/v1/rider/cards/{ASN}").json()["balance"]
    zh = PhoneMenu(card, language="zh").lines()
    assert zh[0] == f"公交卡 …{ASN[-8:]}"
    assert zh[1] == f"余额 ¥{balance['card'] // 100}.{balance['card'] % 100:02d}"
    # the SIM's log: 3 rides and 2 loads, newest first, each matching a ride or a load the back office holds
    rows = [line.split() for line in zh[3:]]
    assert [r[2] for r in rows] == ["乘车", "乘车", "乘车", "充值", "充值"]
    rides = client.get(f"/api/v1/rider/cards/{ASN}/rides").json()["rides"]
    for row, ride in zip(rows, rides, strict=False):
        assert f"{row[0][:2]}-{row[0][3:]} {row[1]}" == f"{ride['local_time'][5:7]}-{ride['local_time'][8:]}"
        assert row[3] == f"-{ride['fare'] // 100}.{ride['fare'] % 100:02d}"
    loads = sql(engine, "SELECT amount, terminal_id FROM card_load WHERE asn = :a AND status = 'loaded' "
                        "ORDER BY online_ttc DESC", a=ASN)
    assert [(r[3], r[5]) for r in rows[3:]] == [(f"+{a // 100}.{a % 100:02d}", t.lower()) for a, t in loads]
    en = PhoneMenu(card, language="en").show()
    assert "Balance ¥" in en and en.count("Ride") == 3 and en.count("Top-up") == 2 and "乘车" not in en


def test_report_lost_deny_lists_and_freezes_once(world):
    engine, card, client = world
    assert client.post("/api/v1/rider/cards/00000000000000000000/lost", json={"rider": "x"}).status_code == 404
    assert client.post(f"/api/v1/rider/cards/{ASN}/lost", json={}).status_code == 422  # who reported it is kept
    refused = httpx.post(f"{client.base_url}/api/v1/rider/cards/{ASN}/lost", json={"rider": "x"},
                         headers={"Authorization": f"Bearer {CLERK}"})
    assert refused.status_code == 403
    r = client.post(f"/api/v1/rider/cards/{ASN}/lost", json={"rider": "13800000007", "why": "left on the bus"})
    assert r.status_code == 200, r.text
    [(status, frozen)] = sql(engine, "SELECT c.status, a.frozen_balance FROM card c JOIN card_account a "
                                     "ON a.asn = c.asn WHERE c.asn = :a", a=ASN)
    assert (status, frozen) == ("lost", card.balance) and r.json() == {"asn": ASN, "status": "lost",
                                                                       "frozen_balance": card.balance,
                                                                       "already": False}
    who = [w for (w,) in sql(engine, "SELECT who FROM card_audit WHERE asn = :a AND action = 'report_lost'", a=ASN)]
    assert who == ["rider-gateway for rider 13800000007"]
    again = client.post(f"/api/v1/rider/cards/{ASN}/lost", json={"rider": "13800000007"})
    assert again.json()["already"] is True and again.json()["frozen_balance"] == card.balance
    assert len(sql(engine, "SELECT 1 FROM card_audit WHERE asn = :a AND action = 'report_lost'", a=ASN)) == 1
    assert client.get(f"/api/v1/rider/cards/{ASN}").json()["status"] == "lost"

"""Ticket uses through a real Mosquitto and the real ingest worker, on SQLite and PostgreSQL: a single ride shown on
two offline buses (a QR scan on one, its pickup code keyed on the other) is one revenue use and one use stored
flagged as fraud, and the ticket is on the next deny list under both its keys; a day pass used on both buses is
two revenue uses; a batch sent again is stored once. Everything is checked with plain SQL."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.denylist_publish import build_version
from backoffice.ingest_consumer import IngestConsumer, end_session
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest
from blacklist.denylist import DenyList
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.records import PRESENTED_PICKUP, PRESENTED_QR, RecordKind, TapRecord

NOW = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai, service day 2026-12-03
KEYS = published_test_keys()
A, B = "tkt_bus_a", "tkt_bus_b"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
            else request.getfixturevalue("pg_schema_url"))


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(query), params).all()]


def as_utc(value) -> datetime:
    """A time read with plain SQL: SQLite hands back text, PostgreSQL an aware datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def issue(engine, operator: str, product: str) -> int:
    with engine.begin() as conn:
        order = orders.create_order(conn, operator=operator, channel="web", phone="13800138000",
                                    items=[ItemRequest(product)], who="rider", now=NOW)
        total = conn.execute(text("SELECT total_fen FROM ticket_order WHERE order_id = :o"), {"o": order}).scalar()
        orders.mark_paid(conn, order, amount_fen=total, payment_ref=f"pay-{order}", who="platform", now=NOW)
        (ticket,) = orders.issue_tickets(conn, order, keys=KEYS, who="platform", now=NOW)
        return ticket.ticket_id


def use(device: str, seq: int, operator: str, ticket_id: int, presented: str, minutes: int) -> TapRecord:
    return TapRecord(device_id=device, device_seq=seq, kind=RecordKind.TICKET_USE,
                     occurred_at=NOW + timedelta(minutes=minutes), operator=operator, route="T1",
                     vehicle=f"veh-{device}", driver=f"drv-{device}", shift_no=1, ticket_id=ticket_id, ticket_use=1,
                     presented=presented, epoch=77)


def test_a_ticket_on_two_offline_buses_is_one_use_and_one_fraud_and_goes_on_the_deny_list(url, mosquitto_url, uid):
    operator = f"op{uid}"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Ticket Bus", at=NOW - timedelta(days=30))
        registry.add_route(conn, code="T1", operator=operator, name="Town", flat_fare=200,
                           at=NOW - timedelta(days=30))
        for device, terminal in ((A, "010000000001"), (B, "010000000002")):
            registry.add_device(conn, device_id=device, operator=operator, vehicle=None, terminal_id=terminal)
        catalogue.add_product(conn, operator=operator, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=NOW)
        catalogue.add_product(conn, operator=operator, code="day", kind="day_pass", name="Day pass",
                              price_fen=1500, by="clerk", now=NOW)
    ride, day_pass = issue(engine, operator, "ride"), issue(engine, operator, "day")
    # Bus A scans the ride's QR code; bus B, offline too, has its pickup code keyed (it names only the serial).
    batch_a = [use(A, 1, operator, ride, PRESENTED_QR, 30), use(A, 2, operator, day_pass, PRESENTED_QR, 31)]
    batch_b = [use(B, 1, operator, ride % 10**10, PRESENTED_PICKUP, 45),
               use(B, 2, operator, day_pass, PRESENTED_QR, 50)]
    payload_a = codec.encode_batch(batch_a, key=mac_key(TEST_DEVICE_MASTER, A))
    payload_b = codec.encode_batch(batch_b, key=mac_key(TEST_DEVICE_MASTER, B))

    target = parse_mqtt_url(mosquitto_url)
    consumer = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                              client_id=f"ingest_{uid}", operator=operator)
    acks, lock = [], threading.Lock()
    bus = new_client(target, f"bus_{uid}", persistent=False)

    def on_ack(client, userdata, message):
        with lock:
            acks.append((message.topic, message.payload))

    bus.on_message = on_ack
    bus.connect(target.host, target.port)
    bus.subscribe(f"{topics.PREFIX}/{operator}/+/ack", qos=1)
    bus.loop_start()
    consumer.start()
    try:
        assert consumer.wait_subscribed(10)
        for topic, payload in [(topics.taps(operator, A), payload_a), (topics.taps(operator, B), payload_b),
                               (topics.taps(operator, A), payload_a)]:  # bus A sends its batch again
            bus.publish(topic, payload, qos=1).wait_for_publish(5)
        waiting = threading.Event()
        for _ in range(200):
            with lock:
                if consumer.counts["messages"] >= 3 and len(acks) >= 3:
                    break
            waiting.wait(0.1)
    finally:
        consumer.stop()
        bus.disconnect()
        bus.loop_stop()
        end_session(target, f"ingest_{uid}")
    counts = consumer.counts
    assert (counts["stored"], counts["duplicates"], counts["fraud"], counts["errors"]) == (4, 2, 1, 0)
    for topic, payload in acks:  # every record acknowledged, none as quarantined
        device = topic.split("/")[-2]
        ack = codec.decode_ack(payload, key=mac_key(TEST_DEVICE_MASTER, device))
        assert ack.seqs == (1, 2) and not ack.quarantined

    # plain SQL: each record once; the ride counted once (by bus A, first in), bus B's use kept as fraud
    assert sql(engine, "SELECT COUNT(*), COUNT(DISTINCT device_id || '/' || device_seq) FROM ticket_use") == [(4, 4)]
    assert sql(engine, "SELECT device_id, presented_by, use_no, revenue, flag FROM ticket_use WHERE ticket_id = :t "
                       "ORDER BY occurred_at", t=ride) == [(A, "qr", 1, True, None),
                                                           (B, "pickup", None, False, "second_use")]
    (reason,), = sql(engine, "SELECT reason FROM ticket_use WHERE ticket_id = :t AND flag IS NOT NULL", t=ride)
    assert "no use left" in reason
    assert sql(engine, "SELECT use_no, revenue FROM ticket_use WHERE ticket_id = :t ORDER BY use_no",
               t=day_pass) == [(1, True), (2, True)]
    assert sql(engine, "SELECT uses_made, state FROM ticket WHERE ticket_id = :t", t=ride) == [(1, "used")]
    assert sql(engine, "SELECT uses_made, state FROM ticket WHERE ticket_id = :t", t=day_pass) == [(2, "issued")]
    assert sql(engine, "SELECT service_day, route, vehicle, driver FROM ticket_use WHERE device_id = :d AND "
                       "device_seq = 1", d=A)[0][1:] == ("T1", f"veh-{A}", f"drv-{A}")
    assert str(sql(engine, "SELECT service_day FROM ticket_use WHERE device_id = :d AND device_seq = 1",
                   d=A)[0][0]) == "2026-12-03"
    assert sql(engine, "SELECT COUNT(*) FROM tap") == [(0,)] and sql(engine, "SELECT COUNT(*) FROM quarantine") == [(0,)]

    # the next deny list refuses the ride by QR (FE71 + id) and by pickup code (FE72 + serial); not the day pass
    with engine.begin() as conn:
        version = build_version(conn, NOW + timedelta(hours=1))
    listed = DenyList.from_bytes(version.body)
    assert bytes.fromhex("fe71") + ride.to_bytes(8, "big") in listed
    assert bytes.fromhex("fe72") + (ride % 10**10).to_bytes(8, "big") in listed
    assert bytes.fromhex("fe71") + day_pass.to_bytes(8, "big") not in listed
    # after the ride's validity is over, its token refuses itself: off the list
    (valid_to,), = sql(engine, "SELECT valid_to FROM ticket WHERE ticket_id = :t", t=ride)
    with engine.begin() as conn:
        later = build_version(conn, as_utc(valid_to) + timedelta(minutes=1))
    assert later is not None and bytes.fromhex("fe71") + ride.to_bytes(8, "big") not in DenyList.from_bytes(later.body)
    engine.dispose()


def test_what_ingest_holds_back_and_what_it_flags(url):
    """Straight through the ingest use case: a use of no ticket of the operator and a use resent with other content
    are quarantined with their reasons (and acknowledged as such); a use of a refunded ticket is stored flagged,
    not revenue, and lists the ticket; a use uploaded after the expiry job closed its ticket still counts when it
    was made within validity."""
    from backoffice.ingest import DeviceDirectory, Ingest

    operator = "opq"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Quarantine Bus", at=NOW - timedelta(days=30))
        registry.add_device(conn, device_id=A, operator=operator, vehicle=None, terminal_id="010000000001")
        catalogue.add_product(conn, operator=operator, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=NOW)
    refunded, late = issue(engine, operator, "ride"), issue(engine, operator, "ride")
    with engine.begin() as conn:
        (order,), = conn.execute(text("SELECT order_id FROM ticket WHERE ticket_id = :t"), {"t": refunded}).all()
        orders.refund(conn, order, who="desk", why="rider asked", now=NOW + timedelta(minutes=10))
        (valid_to,), = conn.execute(text("SELECT valid_to FROM ticket WHERE ticket_id = :t"), {"t": late}).all()
        orders.expire_tickets(conn, now=as_utc(valid_to) + timedelta(minutes=5))
    assert sql(engine, "SELECT state FROM ticket WHERE ticket_id = :t", t=late) == [("expired",)]
    ingest = Ingest(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER, devices=DeviceDirectory())

    def send(records):
        with engine.begin() as conn:
            return ingest.batch(conn, topics.taps(operator, A), codec.encode_batch(records, key=mac_key(
                TEST_DEVICE_MASTER, A)))

    first = send([use(A, 1, operator, 999, PRESENTED_QR, 30),  # no such ticket
                  use(A, 2, operator, refunded, PRESENTED_QR, 40),
                  use(A, 3, operator, late, PRESENTED_QR, 50)])
    assert (first.stored, first.fraud, first.quarantined_seqs, first.ack_seqs) == (2, 1, [1], [1, 2, 3])
    resent = send([dataclasses.replace(use(A, 3, operator, late, PRESENTED_QR, 50), route="T9")])
    assert (resent.stored, resent.duplicates, resent.quarantined_seqs) == (0, 0, [3])
    reasons = [r for (r,) in sql(engine, "SELECT reason FROM quarantine ORDER BY id")]
    assert "ticket 999 is no ticket of operator opq" in reasons[0] and "different route" in reasons[1]
    assert sql(engine, "SELECT ticket_id, use_no, revenue, flag FROM ticket_use ORDER BY device_seq") == [
        (refunded, None, False, "refunded"), (late, 1, True, None)]
    assert sql(engine, "SELECT uses_made, state FROM ticket WHERE ticket_id = :t", t=late) == [(1, "used")]
    with engine.begin() as conn:
        version = build_version(conn, NOW + timedelta(hours=1))
    assert bytes.fromhex("fe71") + refunded.to_bytes(8, "big") in DenyList.from_bytes(version.body)
    engine.dispose()

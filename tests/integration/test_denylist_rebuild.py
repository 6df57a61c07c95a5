"""The deny list follows the registry by itself (issue 9, hole 7).

- A withdrawn driver card (driver retired, card replaced) is denied like a lost rider card, from its withdrawal
  time on; a driver card number that is no ASN is left off without keeping the others off (SQLite and PostgreSQL).
- A running publisher (``rebuild_every``) builds and sends a new version when a card is lost or found, and writes
  nothing when nothing changed (embedded amqtt and Mosquitto).

The whole path as people use it (``farebox serve``, the counter page, a running ``farebox validator run``) is in
tests/integration/test_denylist_to_bus.py."""

from __future__ import annotations

import queue
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.denylist_publish import build_version, current_version, denied_asns, denylist_changed
from backoffice.models import Card, DenyListVersion
from backoffice.publisher import Publisher, parse_announcement
from blacklist.denylist import DenyList
from wire import topics
from wire.devicekeys import TEST_DEVICE_MASTER
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.packages import TEST_SIGNING_SEED, public_key

NOW = datetime.now(UTC).replace(microsecond=0)


def asn(n: int, prefix: str = "3100") -> str:
    return f"{prefix}{n:016x}"


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_withdrawn_driver_cards_are_denied_from_their_withdrawal_on(engine):
    before = NOW - timedelta(days=30)
    with engine.begin() as conn:
        registry.add_operator(conn, code="citybus", name="City Bus", at=before)
        for n in (1, 2, 3):
            registry.add_driver(conn, staff_no=f"D{n}", operator="citybus", name=f"driver {n}",
                                card_asn=asn(n, "d100"), at=before)
        registry.add_driver(conn, staff_no="D9", operator="citybus", name="typed by hand", card_asn="STAFF-9",
                            at=before)
        registry.add_cards(conn, [{"asn": asn(7), "card_type": 1, "status": "lost"}])
    with engine.begin() as conn:
        registry.retire_driver(conn, staff_no="D1", by="clerk", at=NOW - timedelta(minutes=5), reason="left")
        registry.edit_driver(conn, staff_no="D2", by="clerk", card_asn=asn(4, "d100"), at=NOW - timedelta(minutes=5))
        registry.retire_driver(conn, staff_no="D3", by="clerk", at=NOW + timedelta(days=1), reason="leaves tomorrow")
        registry.retire_driver(conn, staff_no="D9", by="clerk", at=NOW - timedelta(minutes=5))
    with engine.begin() as conn:
        # D1's card (retired), D2's old card (replaced); not D2's new card, not D3's until tomorrow, not "STAFF-9"
        assert denied_asns(conn, NOW) == sorted([asn(7), asn(1, "d100"), asn(2, "d100")])
        assert denylist_changed(conn, NOW)
        version = build_version(conn, NOW)
        assert version is not None and {a.hex() for a in version.load()} == {asn(7), asn(1, "d100"), asn(2, "d100")}
        assert not denylist_changed(conn, NOW)
        tomorrow = NOW + timedelta(days=1, minutes=1)
        assert denylist_changed(conn, tomorrow)
        later = build_version(conn, tomorrow)
    assert later is not None and asn(3, "d100") in later.load() and later.count == 4


class Bus:
    """A test client subscribed to one operator's fleet announcement and one device's deny-list topic."""

    def __init__(self, url: str, operator: str, device: str):
        self.inbox: queue.Queue = queue.Queue()
        target = parse_mqtt_url(url)
        self.client = new_client(target, f"t_{device}", persistent=False)
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))
        done: queue.Queue = queue.Queue()
        self.client.on_subscribe = lambda *a: done.put(True)
        self.client.connect(target.host, target.port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe([(topics.fleet_topic(operator, "denylist"), 1)])
        done.get(timeout=10)
        self.operator = operator

    def announcement(self, version: int, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                topic, payload = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no announcement of deny-list version {version} in {timeout} s") from None
            if payload:
                doc = parse_announcement(payload, public_key(TEST_SIGNING_SEED))
                if doc["version"] == version:
                    return doc

    def close(self) -> None:
        self.client.publish(topics.fleet_topic(self.operator, "denylist"), b"", qos=1,
                            retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


def test_a_running_publisher_sends_a_new_version_by_itself_and_nothing_when_nothing_changed(tmp_path, broker_url,
                                                                                             uid):
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    operator = f"op_{uid}"
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Rebuild Test Bus")
        registry.add_cards(conn, [{"asn": asn(n), "card_type": 1, "status": "active"} for n in range(10)])
        registry.add_driver(conn, staff_no=f"D{uid}", operator=operator, name="driver", card_asn=asn(1, "d100"))
    bus = Bus(broker_url, operator, f"v{uid}")
    publisher = Publisher(engine, parse_mqtt_url(broker_url), seed=TEST_SIGNING_SEED,
                          device_master=TEST_DEVICE_MASTER, operator=operator, client_id=f"pub_{uid}",
                          sweep_every=0, rebuild_every=0.3)
    publisher.start()
    try:
        def versions() -> int:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(DenyListVersion)).scalar()

        time.sleep(1.0)
        assert versions() == 0  # no card denied: no list at all

        started = time.monotonic()
        with engine.begin() as conn:  # as the counter page does (another process could do the same)
            conn.execute(update(Card).where(Card.asn == asn(3)).values(status="lost"))
        doc = bus.announcement(1)
        took = time.monotonic() - started
        with engine.connect() as conn:
            v1 = current_version(conn)
        assert doc["count"] == 1 and doc["checksum"] == v1.checksum and asn(3) in v1.load()
        assert took < 10, f"announced {took:.1f} s after the change"

        with engine.begin() as conn:
            registry.retire_driver(conn, staff_no=f"D{uid}", by="clerk")
        doc = bus.announcement(2)
        with engine.connect() as conn:
            v2 = current_version(conn)
        assert {a.hex() for a in v2.load()} == {asn(3), asn(1, "d100")} and doc["count"] == 2

        with engine.begin() as conn:  # the card is found again: it leaves the list
            conn.execute(update(Card).where(Card.asn == asn(3)).values(status="active"))
        bus.announcement(3)
        with engine.connect() as conn:
            assert set(current_version(conn).load()) == set(DenyList.from_asns([asn(1, "d100")]))

        time.sleep(1.5)  # five more looks, nothing changed: nothing written, nothing sent
        assert versions() == 3 and publisher.counts["errors"] == 0
    finally:
        publisher.stop()
        bus.close()
        engine.dispose()

"""Publishing to the fleet over a real broker and a real database (SQLite and PostgreSQL): test clients act as
buses (subscribed to their own and their fleet's downlink, reporting signed status, verifying every package with the
public key of TEST_SIGNING_SEED and applying deny-list deltas with blacklist.delta), and the lists they end up with
are compared with the card table."""

from __future__ import annotations

import queue
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.denylist_publish import get_version
from backoffice.ingest_consumer import end_session
from backoffice.models import Card, DeviceStatus, Tap
from backoffice.packages_publish import PublishError, publish, rollout
from backoffice.publisher import Publisher, parse_announcement
from backoffice.status_consumer import StatusConsumer
from blacklist.delta import DeltaRefused, apply_delta, decode_delta
from blacklist.denylist import DenyList
from wire import topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import parse_mqtt_url
from wire.packages import TEST_SIGNING_SEED, parse_params, public_key, verify_package
from wire.status import Status, encode_status

PUBLIC = public_key(TEST_SIGNING_SEED)
T0 = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)


def asn(n: int) -> str:
    return f"3100{n:016x}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/bo.db"
    return request.getfixturevalue("pg_schema_url")


class Bus:
    """A test client in a bus's place: its own and its fleet's downlink, its signed status, its deny list."""

    def __init__(self, url: str, operator: str, device_id: str):
        self.operator, self.device_id = operator, device_id
        self.inbox: queue.Queue = queue.Queue()
        self.deny: DenyList | None = None
        target = parse_mqtt_url(url)
        from wire.mqtt_url import new_client

        self.client = new_client(target, f"bus_{device_id}", persistent=False)
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload, m.retain))
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.connect(target.host, target.port, keepalive=30)
        self.client.loop_start()
        subscriptions = [(topics.device_topic(operator, device_id, m), 1) for m in ("denylist", "params", "software")]
        subscriptions += [(topics.fleet_topic(operator, m), 1) for m in ("denylist", "params", "software")]
        self.client.subscribe(subscriptions)
        subscribed.get(timeout=10)

    def report(self, kind: str = "heartbeat", *, denylist: int | None = None, key: bytes | None = None,
               software: str = "1.0", params: int = 0, alarms: tuple[str, ...] = ()) -> None:
        version = denylist if denylist is not None else (self.deny.version if self.deny else 0)
        status = Status(kind, self.device_id, datetime.now(UTC).replace(microsecond=0), software=software,
                        params_version=params, denylist_version=version, alarms=alarms)
        payload = encode_status(status, key=key or mac_key(TEST_DEVICE_MASTER, self.device_id))
        self.client.publish(topics.status(self.operator, self.device_id), payload, qos=1,
                            retain=True).wait_for_publish(10)

    def receive(self, message: str, *, fleet: bool = False, timeout: float = 15.0):
        """The next package on this bus's (or its fleet's) ``message`` topic, verified; other messages are kept."""
        want = topics.fleet_topic(self.operator, message) if fleet else \
            topics.device_topic(self.operator, self.device_id, message)
        deadline = time.monotonic() + timeout
        kept = []
        try:
            while True:
                try:
                    topic, payload, retain = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    raise AssertionError(f"{self.device_id}: nothing on {want} within {timeout} s") from None
                if topic == want:
                    return payload, retain
                kept.append((topic, payload, retain))
        finally:
            for item in kept:
                self.inbox.put(item)

    def nothing_on(self, message: str, wait: float = 1.0) -> bool:
        want = topics.device_topic(self.operator, self.device_id, message)
        time.sleep(wait)
        return all(t != want for t, _p, _r in list(self.inbox.queue))

    def take_denylist(self, expected) -> object:
        """Receive this bus's deny-list package, verify it, apply it the way a validator does, and check the result
        against ``expected`` (the version as stored in the database); the package."""
        payload, retain = self.receive("denylist")
        assert not retain
        self.last_payload = payload
        pkg = verify_package(payload, PUBLIC)
        assert pkg.kind == "denylist" and pkg.target == self.device_id and pkg.number == expected.version
        checksum = bytes.fromhex(expected.checksum)
        if pkg.base_version is None:
            self.deny = DenyList.from_bytes(pkg.body, expect_checksum=checksum)
        else:
            assert self.deny is not None and pkg.base_version == self.deny.version
            delta = decode_delta(pkg.body)
            assert delta.checksum == checksum
            self.deny = DenyList.from_bytes(apply_delta(self.deny, delta), expect_checksum=checksum)
        assert self.deny.version == expected.version
        return pkg

    def close(self) -> None:
        self.client.publish(topics.status(self.operator, self.device_id), b"", qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def world(request, db_url, uid):
    """An operator with two routes, four devices and 30 cards (two lost) in a fresh database, on the broker named
    by the test's ``url`` parameter (Mosquitto unless the test asks for ``broker_url``)."""
    url = request.getfixturevalue("broker_url") if "broker_url" in request.fixturenames \
        else request.getfixturevalue("mosquitto_url")
    operator = f"op_{uid}"
    devices = [f"v{uid}{c}" for c in "abcd"]
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=operator, name="Publishing Test Bus")
        for r in ("r1", "r2"):
            registry.add_route(conn, code=f"{r}{uid}", operator=operator, name=r, flat_fare=200)
        for i, d in enumerate(devices):
            registry.add_device(conn, device_id=d, operator=operator, vehicle=None, terminal_id=f"{i:012x}")
        registry.add_cards(conn, [{"asn": asn(i), "card_type": 1, "status": "lost" if i in (3, 7) else "active"}
                                  for i in range(30)])
    buses: list[Bus] = []

    def bus(device_id: str) -> Bus:
        b = Bus(url, operator, device_id)
        buses.append(b)
        return b

    publishers: list[Publisher] = []

    def publisher(**kw) -> Publisher:
        p = Publisher(engine, parse_mqtt_url(url), seed=TEST_SIGNING_SEED, device_master=TEST_DEVICE_MASTER,
                      operator=operator, client_id=f"pub_{uid}_{len(publishers)}", sweep_every=0, **kw)
        p.start()
        publishers.append(p)
        return p

    yield type("World", (), {"engine": engine, "operator": operator, "devices": devices, "bus": staticmethod(bus),
                             "publisher": staticmethod(publisher), "url": url, "uid": uid})
    for b in buses:
        b.close()
    # Retained messages outlive the test on the shared Mosquitto: clear them.
    cleaner = Bus(url, operator, f"x{uid}")
    for m in topics.FLEET_MESSAGES:
        cleaner.client.publish(topics.fleet_topic(operator, m), b"", qos=1, retain=True).wait_for_publish(5)
    cleaner.close()
    for p in publishers:
        p.stop()
    engine.dispose()


def set_status(engine, status: str, *numbers: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(Card).where(Card.asn.in_([asn(n) for n in numbers])).values(status=status))


def denied(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(Card.asn).where(Card.status != "active")).scalars())


def wait_heard(pub: Publisher, device: str, version: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pub.reported(device) != version:
        assert time.monotonic() < deadline, f"publisher never heard {device} report deny list {version}"
        time.sleep(0.02)


def test_a_lost_card_reaches_a_bus_as_an_announcement_then_a_delta(world):
    pub = world.publisher()
    v1 = pub.publish_denylist(T0, wait=10)
    assert v1.version == 1 and v1.count == 2
    bus = world.bus(world.devices[0])
    # A bus that connects after the announcement still gets it (retained), and signed.
    payload, retain = bus.receive("denylist", fleet=True)
    assert retain
    assert parse_announcement(payload, PUBLIC) == {"version": 1, "count": 2, "checksum": v1.checksum,
                                                   "created_at": "2026-11-22T06:00:00+00:00"}
    bus.report("birth", denylist=0)  # a new validator: no list yet
    assert bus.take_denylist(v1).base_version is None  # version 0 is no stored version: the full list
    assert {a.hex() for a in bus.deny} == denied(world.engine)
    bus.report("heartbeat")
    wait_heard(pub, bus.device_id, 1)

    set_status(world.engine, "lost", 11)  # the mobile-operator staff report card 11 lost
    set_status(world.engine, "fraud", 12)  # ingest flagged card 12
    v2 = pub.publish_denylist(T0 + timedelta(hours=1), wait=10)
    assert v2.version == 2 and v2.count == 4
    assert parse_announcement(bus.receive("denylist", fleet=True)[0], PUBLIC)["version"] == 2
    pkg = bus.take_denylist(v2)
    assert pkg.base_version == 1
    delta = decode_delta(pkg.body)
    assert {a.hex() for a in delta.adds} == {asn(11), asn(12)} and delta.removes == ()
    assert {a.hex() for a in bus.deny} == denied(world.engine)
    # The byte costs the publisher's docstring names: the announcement 275 bytes (142 of JSON), a delta 182 + n + d
    # + 10 per card.
    n, d = len("2"), len(bus.device_id)
    assert (len(payload), len(bus.last_payload)) == (275, 182 + n + d + 2 * 10)

    bus.report("heartbeat")  # now at version 2: nothing more is sent
    wait_heard(pub, bus.device_id, 2)
    assert bus.nothing_on("denylist", 0.5)


def test_a_bus_two_versions_behind_gets_one_delta_and_one_too_far_behind_the_full_list(world):
    pub = world.publisher(max_behind=2)
    made = [pub.publish_denylist(T0, wait=10)]
    for i, (card, status) in enumerate([(20, "lost"), (3, "active"), (21, "blocked")], start=1):
        set_status(world.engine, status, card)
        made.append(pub.publish_denylist(T0 + timedelta(hours=i), wait=10))
    assert [v.version for v in made] == [1, 2, 3, 4]
    v1, v2 = made[:2]
    with world.engine.connect() as conn:  # version 1 is too old for a delta: it is no longer kept
        assert get_version(conn, 1) is None and get_version(conn, 2) is not None
    two_behind, three_behind = world.bus(world.devices[0]), world.bus(world.devices[1])
    two_behind.deny, three_behind.deny = DenyList.from_bytes(v2.body), DenyList.from_bytes(v1.body)
    assert parse_announcement(two_behind.receive("denylist", fleet=True)[0], PUBLIC)["version"] == 4
    two_behind.report("birth")
    three_behind.report("birth")
    with world.engine.connect() as conn:
        v4 = get_version(conn, 4)
    assert two_behind.take_denylist(v4).base_version == 2
    assert three_behind.take_denylist(v4).base_version is None
    full = three_behind.last_payload  # 198 + n + d + 8 per card, one issuer prefix
    assert len(full) == 198 + 1 + len(three_behind.device_id) + 8 * v4.count
    assert {a.hex() for a in two_behind.deny} == {a.hex() for a in three_behind.deny} == denied(world.engine)
    assert pub.counts["deltas"] == 1 and pub.counts["full_lists"] == 1


def test_a_bus_that_refuses_a_delta_gets_the_full_list(world):
    """A bus whose version 1 holds other cards than ours (a list from another database) cannot apply our delta; it
    reports the refusal as an alarm, and the publisher sends the whole list."""
    pub = world.publisher()
    pub.publish_denylist(T0, wait=10)
    set_status(world.engine, "lost", 9)
    v2 = pub.publish_denylist(T0 + timedelta(hours=1), wait=10)
    bus = world.bus(world.devices[0])
    bus.deny = DenyList.from_asns([asn(9)], version=1)  # "version 1", other content: our delta adds card 9 again
    bus.report("birth")
    payload, _retain = bus.receive("denylist")
    pkg = verify_package(payload, PUBLIC)
    assert pkg.base_version == 1
    with pytest.raises(DeltaRefused):
        apply_delta(bus.deny, decode_delta(pkg.body))
    bus.report("heartbeat", alarms=("refused denylist 2: delta adds a listed card",))
    assert bus.take_denylist(v2).base_version is None
    assert {a.hex() for a in bus.deny} == denied(world.engine)


def test_a_package_for_one_device_is_sent_again_when_it_comes_back_without_it(world):
    """Per-device packages are not retained: a bus that was away (and whose session the broker dropped) is sent
    its package again when its birth shows it runs another version; before the package's activation time only
    once."""
    pub = world.publisher()
    device = world.devices[1]
    now = datetime.now(UTC)
    with world.engine.begin() as conn:
        out = publish(conn, "params", world.operator, device, 4, b'{"route":"r2"}', now - timedelta(minutes=1),
                      seed=TEST_SIGNING_SEED, now=now)
        out += publish(conn, "software", world.operator, device, "3.0", b"tar", now + timedelta(days=1),
                       seed=TEST_SIGNING_SEED, now=now)
    pub.send(out, wait=10)  # nobody listens: lost
    bus = world.bus(device)
    bus.report("birth", params=3, software="2.9")
    pkg = verify_package(bus.receive("params")[0], PUBLIC)
    assert (pkg.target, pkg.number, parse_params(pkg.body)) == (device, 4, {"route": "r2"})
    assert verify_package(bus.receive("software")[0], PUBLIC).version == "3.0"
    assert pub.counts["packages"] == 2
    bus.report("birth", params=3, software="2.9")  # reconnected, still without params 4: again; software waits
    assert verify_package(bus.receive("params")[0], PUBLIC).number == 4
    assert bus.nothing_on("software", 0.5)
    bus.report("birth", params=4, software="2.9")  # runs params 4 now: nothing more
    assert bus.nothing_on("params", 0.5) and pub.counts["packages"] == 3


def test_a_forged_status_gets_nothing(world):
    pub = world.publisher()
    pub.publish_denylist(T0, wait=10)
    bus = world.bus(world.devices[0])
    bus.report("birth", denylist=0, key=mac_key(b"not the fleet's device master!!!", bus.device_id))
    assert bus.nothing_on("denylist", 1.0)
    assert pub.counts["status_refused"] == 1 and pub.counts["full_lists"] == 0


def test_new_version_goes_to_online_devices_from_the_status_table_without_listening(world):
    """A one-shot `farebox denylist publish` hears no status: it sends from device_status alone."""
    pub = world.publisher(listen_status=False)
    pub.publish_denylist(T0, wait=10)
    online, offline = world.bus(world.devices[0]), world.bus(world.devices[1])
    with world.engine.connect() as conn:
        online.deny = DenyList.from_bytes(get_version(conn, 1).body)
    with world.engine.begin() as conn:
        conn.execute(DeviceStatus.__table__.insert(), [
            {"device_id": online.device_id, "online": True, "last_seen": T0, "denylist_version": 1},
            {"device_id": offline.device_id, "online": False, "last_seen": T0, "denylist_version": 1}])
    set_status(world.engine, "lost", 5)
    v2 = pub.publish_denylist(T0 + timedelta(minutes=5), wait=10)
    first = parse_announcement(online.receive("denylist", fleet=True)[0], PUBLIC)  # retained, when it subscribed
    then = parse_announcement(online.receive("denylist", fleet=True)[0], PUBLIC)
    assert (first["version"], then["version"]) == (1, 2)
    assert online.take_denylist(v2).base_version == 1
    assert offline.nothing_on("denylist", 0.5)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_fleet_params_package_is_retained_for_a_bus_that_connects_later(world, broker_url):
    pub = world.publisher()
    body = b'{"route":"r1","fares":{"adult":200}}'
    with world.engine.begin() as conn:
        out = publish(conn, "params", world.operator, "_fleet", 7, body, T0, seed=TEST_SIGNING_SEED, now=T0)
    pub.send(out, wait=10)
    assert [(m.topic, m.retain) for m in out] == [(topics.fleet_topic(world.operator, "params"), True)]
    late = world.bus(world.devices[2])  # connects after the package was sent
    payload, retain = late.receive("params", fleet=True)
    assert retain
    pkg = verify_package(payload, PUBLIC)
    assert (pkg.kind, pkg.version, pkg.target, pkg.activate_at) == ("params", "7", "_fleet", T0)
    assert parse_params(pkg.body) == {"route": "r1", "fares": {"adult": 200}}
    with world.engine.begin() as conn, pytest.raises(PublishError, match="not above"):
        publish(conn, "params", world.operator, "_fleet", 6, body, T0, seed=TEST_SIGNING_SEED)


def tap(device: str, route: str, at: datetime, seq: int) -> dict:
    return {"device_id": device, "device_seq": seq, "kind": "purchase", "occurred_at": at, "received_at": at,
            "operator": "", "route": route, "vehicle": "", "driver": "", "shift_no": 1, "card_asn": asn(1),
            "card_type": 1, "card_ttc": seq, "amount": 200, "balance_after": 0, "terminal_id": "", "terminal_seq": seq,
            "tac": "00000000", "reason": ""}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_software_package_for_a_route_goes_to_the_devices_on_it_only(world):
    pub = world.publisher()
    a, b, c, d = world.devices
    r1, r2 = f"r1{world.uid}", f"r2{world.uid}"
    now = datetime.now(UTC)
    rows = [tap(a, r1, now - timedelta(hours=2), 1), tap(b, r2, now - timedelta(hours=3), 1),
            tap(b, r1, now - timedelta(hours=1), 2),  # b moved to r1 an hour ago
            tap(c, r2, now - timedelta(hours=1), 1), tap(c, r1, now - timedelta(hours=2), 2),  # c left r1
            tap(d, r1, now - timedelta(days=9), 1)]  # d's last tap is too old to say where it is
    for r in rows:
        r["operator"] = world.operator
    with world.engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), rows)
    buses = {x: world.bus(x) for x in world.devices}
    with world.engine.begin() as conn:
        out = publish(conn, "software", world.operator, f"route:{r1}", "2.4.1", b"tarball bytes", now,
                      seed=TEST_SIGNING_SEED, now=now)
    pub.send(out, wait=10)
    assert sorted(m.target for m in out) == [a, b]
    for x in (a, b):
        pkg = verify_package(buses[x].receive("software")[0], PUBLIC)
        assert (pkg.target, pkg.version, pkg.body) == (x, "2.4.1", b"tarball bytes")
    assert buses[c].nothing_on("software", 0.3) and buses[d].nothing_on("software", 0.0)
    with world.engine.begin() as conn, pytest.raises(PublishError, match="not registered"):
        publish(conn, "software", world.operator, "nobus", "2.4.2", b"x", now, seed=TEST_SIGNING_SEED)


def test_rollout_counts_who_runs_which_version(world):
    """The versions come from the buses' own status messages, stored by the real status consumer."""
    a, b, c, d = world.devices
    consumer = StatusConsumer(world.engine, parse_mqtt_url(world.url), master=TEST_DEVICE_MASTER,
                              client_id=f"status_{world.uid}", operator=world.operator)
    consumer.start()
    assert consumer.wait_subscribed(10)
    try:
        with world.engine.begin() as conn:
            publish(conn, "software", world.operator, "_fleet", "2.0", b"two", T0, seed=TEST_SIGNING_SEED, now=T0)
            publish(conn, "software", world.operator, c, "2.1-hotfix", b"fix", T0, seed=TEST_SIGNING_SEED,
                    now=T0 + timedelta(minutes=1))
            publish(conn, "params", world.operator, "_fleet", 3, b'{"route":"x"}', T0, seed=TEST_SIGNING_SEED,
                    now=T0)
        reported = {a: ("2.0", 3), b: ("1.9", 2), c: ("2.0", 3)}  # d never reported
        for x, (sw, pv) in reported.items():
            world.bus(x).report("birth", software=sw, params=pv)
        deadline = time.monotonic() + 10
        while consumer.counts["applied"] < len(reported):
            assert time.monotonic() < deadline, f"status consumer: {dict(consumer.counts)} {consumer.refusals}"
            time.sleep(0.02)
    finally:
        consumer.stop()
        end_session(parse_mqtt_url(world.url), f"status_{world.uid}")
    with world.engine.connect() as conn:
        software = rollout(conn, world.operator, "software")
        params = rollout(conn, world.operator, "params")
    assert software.latest == "2.0"
    assert software.by_version == {"2.0": 2, "1.9": 1, None: 1}
    expected = {a: "2.0", b: "2.0", c: "2.1-hotfix", d: "2.0"}
    assert {p.device_id: p.expected for p in software.devices} == expected
    assert sorted(p.device_id for p in software.behind) == sorted(x for x in world.devices
                                                                 if reported.get(x, (None,))[0] != expected[x])
    assert software.done == 1
    assert params.by_version == {"3": 2, "2": 1, None: 1} and sorted(p.device_id for p in params.behind) == [b, d]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_commands(world, db_url, tmp_path, monkeypatch, capsys):
    from farebox.cli import main

    monkeypatch.setenv("FAREBOX_DATABASE_URL", db_url)
    monkeypatch.setenv("FAREBOX_MQTT_URL", world.url)
    monkeypatch.setenv("FAREBOX_VAR_DIR", str(tmp_path / "var"))
    bus = world.bus(world.devices[0])
    assert main(["denylist", "publish", "--operator", world.operator]) == 0
    assert "new version 1: 2 card(s)" in capsys.readouterr().out
    assert parse_announcement(bus.receive("denylist", fleet=True)[0], PUBLIC)["version"] == 1
    assert main(["denylist", "publish", "--operator", world.operator]) == 0  # nothing changed: announced again
    assert "unchanged, announced again: 1" in capsys.readouterr().out
    assert main(["denylist", "show"]) == 0
    shown = capsys.readouterr().out
    with world.engine.connect() as conn:
        assert get_version(conn, 1).checksum[:16] in shown

    params = tmp_path / "params.json"
    params.write_text('{"route": "r9"}')
    args = ["package", "publish", "--kind", "params", "--operator", world.operator, "--version", "4",
            "--file", str(params), "--activate-at", "2026-12-01T02:00:00+08:00"]
    assert main([*args, "--device", bus.device_id]) == 0
    pkg = verify_package(bus.receive("params")[0], PUBLIC)
    assert (pkg.target, pkg.number, pkg.activate_at) == (bus.device_id, 4, datetime(2026, 11, 30, 18, tzinfo=UTC))
    capsys.readouterr()
    params.write_text('{"rout": "r9"}')  # a typo: refused with the reason, nothing stored or sent
    assert main([*args[:7], "5", *args[8:], "--fleet"]) == 1
    assert "unknown key" in capsys.readouterr().err
    assert bus.nothing_on("params", 0.3)

    assert main(["package", "progress", "--operator", world.operator, "--kind", "params"]) == 0
    out = capsys.readouterr().out
    assert "never reported" in out and "0 of 4 device(s)" in out and "1 not yet" in out


def test_a_real_validator_follows_the_published_lists(world, tmp_path):
    """validator.downlink and validator.uplink on a simulated bus: the announcement makes it report its version,
    the publisher answers with the full list and later a delta, and a card reported lost is refused at the next
    tap."""
    from simbus import Bus as SimBus

    from validator.messages import Outcome

    device = world.devices[0]
    pub = world.publisher()
    sim = SimBus(tmp_path, parse_mqtt_url(world.url), world.operator, device, downlink=True, heartbeat_seconds=0.3)
    rider0, rider1, rider2 = sim.riders[:3]
    with world.engine.begin() as conn:
        registry.add_cards(conn, [{"asn": r.asn.hex(), "card_type": 1, "status": "active"} for r in sim.riders])
        conn.execute(update(Card).where(Card.asn == rider0.asn.hex()).values(status="lost"))
    v1 = pub.publish_denylist(sim.clock_now - timedelta(hours=1), wait=10)  # active by the bus's clock
    world.bus(device)  # its close() clears the validator's retained status from the shared broker
    sim.uplink.start()
    try:
        assert sim.tap(sim.driver) is Outcome.SHIFT_OPENED

        def applied(version: int) -> bool:
            sim.between_taps()
            return sim.terminal.deny_list.version == version

        deadline = time.monotonic() + 15
        while not applied(1):
            assert time.monotonic() < deadline, "the validator never got deny list 1"
            time.sleep(0.05)
        assert sim.terminal.deny_list.checksum.hex() == v1.checksum
        assert sim.tap(rider0) is Outcome.CARD_BLOCKED
        assert sim.tap(rider1) is Outcome.PAID
        wait_heard(pub, device, 1)

        set_status(world.engine, "active", 3, 7)  # the demo cards the world began with: found again
        with world.engine.begin() as conn:
            conn.execute(update(Card).where(Card.asn == rider1.asn.hex()).values(status="lost"))
        v2 = pub.publish_denylist(sim.clock_now, wait=10)
        deadline = time.monotonic() + 15
        while not applied(2):
            assert time.monotonic() < deadline, "the validator never got deny list 2"
            time.sleep(0.05)
        assert sim.terminal.deny_list.checksum.hex() == v2.checksum
        assert (pub.counts["full_lists"], pub.counts["deltas"]) == (1, 1)
        assert sim.tap(rider1) is Outcome.CARD_BLOCKED
        assert sim.tap(rider2) is Outcome.PAID
        wait_heard(pub, device, 2)  # the validator reports the new version in its heartbeat
    finally:
        sim.uplink.stop()
        sim.journal.close()

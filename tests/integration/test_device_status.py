"""Device status end to end: validators (paho clients logged in with their own derived passwords) publish birth,
heartbeats and, as their last will, death on a private Mosquitto loaded with `farebox broker config`'s files; the
status consumer (broker user `status`) keeps device_status in SQLite and PostgreSQL; fleet_status flags stale devices
against a clock the test passes in. The use case's ordering rules (late wills, replays, clocks ahead) are checked
directly against the database too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from test_broker_acl import OP, Client, PrivateMosquitto, kill_socket, register

from backoffice.db import make_engine
from backoffice.devices import StatusRefused, fleet_status, link_history, record_status, version_counts
from backoffice.models import DeviceStatus
from backoffice.status_consumer import StatusConsumer
from wire import topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.mqtt_url import parse_mqtt_url
from wire.status import Status, encode_status

A, B, C = "bus_a", "bus_b", "bus_c"
T0 = datetime(2026, 11, 20, 7, 0, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    register(url, A, B, C)
    return url


def signed(kind: str, device: str, at: datetime, **kw) -> bytes:
    return encode_status(Status(kind=kind, device_id=device, at=at, **kw), key=mac_key(TEST_DEVICE_MASTER, device))


def heartbeat(device: str, at: datetime, **kw) -> bytes:
    fields = {"software": "1.4.2", "params_version": 12, "denylist_version": 305, "backlog": 0,
              "psam": "010000000001"}
    return signed("heartbeat", device, at, **{**fields, **kw})


def rows_by_device(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r.device_id: r._asdict() for r in conn.execute(select(DeviceStatus.__table__))}


def wait_for(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def utc(value):
    return None if value is None else value.replace(tzinfo=UTC) if value.tzinfo is None else value


@pytest.fixture
def rig(tmp_path, db_url):
    broker = PrivateMosquitto(tmp_path, db_url).start()
    engine = make_engine(db_url)
    consumers: list[StatusConsumer] = []
    clients: list[Client] = []

    def consumer() -> StatusConsumer:
        # the consumer's clock only guards against device clocks far ahead; T0 + 1 day keeps every test time behind
        c = StatusConsumer(engine, parse_mqtt_url(broker.url("status")), master=TEST_DEVICE_MASTER,
                           client_id="t_status", clock=lambda: T0 + timedelta(days=1))
        c.start()
        assert c.wait_subscribed(), "status consumer did not subscribe"
        consumers.append(c)
        return c

    def device(device_id: str, connected_at: datetime) -> Client:
        """A validator's connection: its last will is its death, signed with the connection's time."""
        c = Client(broker.port, device_id, will=(topics.status(OP, device_id), signed("death", device_id,
                                                                                     connected_at)))
        assert c.connack.value == 0
        clients.append(c)
        return c

    class Rig:
        pass

    r = Rig()
    r.broker, r.engine, r.consumer, r.device = broker, engine, consumer, device
    yield r
    for c in consumers:
        c.stop()
    for c in clients:
        c.close()
    broker.stop()
    engine.dispose()


def test_birth_heartbeats_and_a_death_by_last_will(rig):
    consumer = rig.consumer()
    a = rig.device(A, T0)
    a.publish(topics.status(OP, A), signed("birth", A, T0, software="1.4.2"), retain=True)
    a.publish(topics.status(OP, A), heartbeat(A, T0 + MIN, backlog=7, oldest_unsent=T0 - 3 * MIN,
                                              last_tap=T0 + 30 * timedelta(seconds=1),
                                              alarms=("denylist stale", "journal 85% full")), retain=True)
    b = rig.device(B, T0)
    b.publish(topics.status(OP, B), signed("birth", B, T0), retain=True)
    b.publish(topics.status(OP, B), heartbeat(B, T0 + 2 * MIN, software="1.4.3", denylist_version=306),
              retain=True)
    wait_for(lambda: utc(rows_by_device(rig.engine).get(B, {}).get("last_seen")) == T0 + 2 * MIN, "B's heartbeat")
    kill_socket(b)  # the bus drops off without DISCONNECT: the broker publishes B's will
    wait_for(lambda: rows_by_device(rig.engine)[B]["online"] is False, "B's death")

    rows = rows_by_device(rig.engine)
    assert set(rows) == {A, B}  # C never said anything
    ra = rows[A]
    assert ra["online"] is True
    assert utc(ra["last_seen"]) == T0 + MIN and utc(ra["last_birth"]) == T0
    assert (ra["software"], ra["params_version"], ra["denylist_version"], ra["backlog"], ra["psam"]) == \
        ("1.4.2", 12, 305, 7, "010000000001")
    assert utc(ra["oldest_unsent"]) == T0 - 3 * MIN and utc(ra["last_tap"]) == T0 + timedelta(seconds=30)
    assert ra["alarms"] == "denylist stale; journal 85% full"
    rb = rows[B]
    assert rb["online"] is False
    assert utc(rb["last_seen"]) == T0 + 2 * MIN  # last heard from itself, not the will's connection time
    assert (rb["software"], rb["denylist_version"]) == ("1.4.3", 306)  # the death keeps the last versions
    assert consumer.counts["refused"] == 0 and consumer.counts["errors"] == 0

    with rig.engine.connect() as conn:
        fleet = {r.device_id: r for r in fleet_status(conn, OP, T0 + 5 * MIN, stale_after=5 * MIN)}
        assert (fleet[A].stale, fleet[B].stale, fleet[C].stale) == (False, False, True)
        assert fleet[A].silent_for == 4 * MIN and fleet[C].online is None and fleet[C].silent_for is None
        assert fleet[A].alarms == ("denylist stale", "journal 85% full")
        # a minute later A, still "online", has been silent for 6 minutes: stale; so is B, offline for as long
        later = {r.device_id: r for r in fleet_status(conn, OP, T0 + 7 * MIN, stale_after=5 * MIN)}
        assert (later[A].stale, later[A].online, later[B].stale, later[B].online) == (True, True, False, False)
        assert later[B].silent_for == 5 * MIN  # exactly stale_after: not stale yet
        counts = version_counts(list(fleet.values()))
        assert counts["software"] == {"1.4.2": 1, "1.4.3": 1, None: 1}
        assert counts["denylist"] == {305: 1, 306: 1, None: 1}
        assert fleet_status(conn, "another_op", T0) == []


def test_bad_messages_are_counted_and_kept_out_of_the_table(rig):
    consumer = rig.consumer()
    a = rig.device(A, T0)
    a.publish(topics.status(OP, A), b"not a status at all")
    # signed with B's key (as a stolen B could), on A's topic: the MAC under A's key fails
    a.publish(topics.status(OP, A), heartbeat(B, T0).replace(b'"bus_b"', b'"bus_a"'))
    a.publish(topics.status(OP, A), heartbeat(A, T0 + timedelta(days=2)))  # clock far ahead
    a.publish(topics.status(OP, A), heartbeat(A, T0, backlog=1))  # a good one, last
    wait_for(lambda: consumer.counts["applied"] == 1, "the good heartbeat")
    assert consumer.counts["refused"] == 3
    reasons = [why for _, why in consumer.refusals]
    assert "MAC does not match" in reasons[0] and "MAC does not match" in reasons[1]
    assert "ahead of the back office's clock" in reasons[2]
    rows = rows_by_device(rig.engine)
    assert list(rows) == [A] and rows[A]["backlog"] == 1 and utc(rows[A]["last_seen"]) == T0


def test_late_will_of_an_old_connection_does_not_knock_a_returned_bus_offline(rig):
    """The bus is back on a new link before the broker noticed the old one was gone: the old connection's will
    comes after the new birth, and changes nothing."""
    consumer = rig.consumer()
    old = rig.device(A, T0)
    old.publish(topics.status(OP, A), signed("birth", A, T0), retain=True)
    wait_for(lambda: A in rows_by_device(rig.engine), "the first birth")
    old.c.loop_stop()  # the old link is dead, and the broker has not noticed
    # The bus's session is its device id (use_username_as_clientid): the new link takes it over at once, and the
    # broker ends the old link then, publishing its will.
    back = rig.device(A, T0 + 10 * MIN)
    back.publish(topics.status(OP, A), signed("birth", A, T0 + 10 * MIN), retain=True)
    back.publish(topics.status(OP, A), heartbeat(A, T0 + 11 * MIN), retain=True)
    wait_for(lambda: utc(rows_by_device(rig.engine).get(A, {}).get("last_seen")) == T0 + 11 * MIN, "heartbeat")
    assert rows_by_device(rig.engine)[A]["online"] is True
    kill_socket(back)  # the current connection's will does count
    wait_for(lambda: rows_by_device(rig.engine)[A]["online"] is False, "the current will")


def test_status_sent_while_the_consumer_is_down_arrives_when_it_is_back(rig):
    consumer = rig.consumer()
    a = rig.device(A, T0)
    a.publish(topics.status(OP, A), signed("birth", A, T0), retain=True)
    wait_for(lambda: A in rows_by_device(rig.engine), "A's birth")
    consumer.stop()
    a.publish(topics.status(OP, A), heartbeat(A, T0 + MIN, backlog=3), retain=True)
    a.publish(topics.status(OP, A), heartbeat(A, T0 + 2 * MIN, backlog=4), retain=True)
    rig.consumer()  # same client id: the broker kept its session and queued both
    wait_for(lambda: utc(rows_by_device(rig.engine)[A]["last_seen"]) == T0 + 2 * MIN, "queued heartbeats")
    assert rows_by_device(rig.engine)[A]["backlog"] == 4


# ------------------------------------------------------------------------------------------- the use case alone
@pytest.fixture
def conn(db_url):
    engine = make_engine(db_url)
    with engine.begin() as c:
        yield c
    engine.dispose()


def put(conn, payload: bytes, device: str = A, operator: str = OP):
    return record_status(conn, topic=f"farebox/v1/{operator}/{device}/status", payload=payload,
                         master=TEST_DEVICE_MASTER, now=T0 + timedelta(days=1))


def test_older_copies_change_nothing(conn):
    assert put(conn, heartbeat(A, T0 + 2 * MIN, backlog=2)).applied
    replay = put(conn, heartbeat(A, T0 + MIN, backlog=9))
    assert not replay.applied and "older than the stored" in replay.why
    assert not put(conn, signed("birth", A, T0)).applied
    row = conn.execute(select(DeviceStatus.backlog, DeviceStatus.last_seen)).one()
    assert (row.backlog, utc(row.last_seen)) == (2, T0 + 2 * MIN)


def test_death_rules(conn):
    assert put(conn, signed("birth", A, T0 + 10 * MIN)).applied
    late = put(conn, signed("death", A, T0))  # will of the connection before this one
    assert not late.applied and "connected again" in late.why
    assert conn.execute(select(DeviceStatus.online)).scalar_one() is True
    assert put(conn, signed("death", A, T0 + 10 * MIN)).applied
    row = conn.execute(select(DeviceStatus.online, DeviceStatus.last_seen)).one()
    assert (row.online, utc(row.last_seen)) == (False, T0 + 10 * MIN)
    # a death first of all (the table is new, the broker still holds the retained will)
    assert put(conn, signed("death", B, T0), device=B).applied
    assert conn.execute(select(DeviceStatus.online).where(DeviceStatus.device_id == B)).scalar_one() is False


@pytest.mark.parametrize("topic_device, operator, payload, reason", [
    ("bus_zz", OP, None, "not registered: add it with `farebox device add`"),
    (A, "other_op", None, "belongs to operator citybus, not other_op"),
    (A, OP, b"{}" + bytes(16), "MAC does not match"),
])
def test_refusals_name_the_reason(conn, topic_device, operator, payload, reason):
    payload = payload if payload is not None else heartbeat(topic_device, T0)
    with pytest.raises(StatusRefused, match=reason.replace("(", r"\(").replace(")", r"\)").replace("`", ".")):
        put(conn, payload, device=topic_device, operator=operator)
    assert conn.execute(select(DeviceStatus.device_id)).all() == []


def test_refused_topics(conn):
    for topic in ("farebox/v1/citybus/_fleet/denylist", f"farebox/v1/citybus/{A}/taps", "other/topic"):
        with pytest.raises(StatusRefused):
            record_status(conn, topic=topic, payload=heartbeat(A, T0), master=TEST_DEVICE_MASTER, now=T0)


def test_farebox_devices_prints_the_fleet(tmp_path, sqlite_url):
    """The command as a person runs it: stale devices flagged, devices counted per version."""
    register(sqlite_url, A, B, C)
    now = datetime.now(UTC).replace(microsecond=0)
    engine = make_engine(sqlite_url)
    with engine.begin() as c:
        record_status(c, topic=topics.status(OP, A), payload=heartbeat(A, now - MIN, software="2.0.1"),
                      master=TEST_DEVICE_MASTER, now=now)
        record_status(c, topic=topics.status(OP, B), payload=heartbeat(B, now - 30 * MIN, software="2.0.0",
                                                                        alarms=("journal 90% full",)),
                      master=TEST_DEVICE_MASTER, now=now)
    engine.dispose()
    env = {**os.environ, "FAREBOX_DATABASE_URL": sqlite_url, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "farebox.cli", "devices", "--operator", OP], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # some are stale: 1, as --help says
    lines = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") > 5}
    assert "STALE" not in lines[A] and "online" in lines[A] and "2.0.1" in lines[A]
    assert "STALE" in lines[B] and "journal 90% full" in lines[B]
    assert "STALE never heard" in lines[C]
    assert "3 validator(s), 2 online, 2 stale" in done.stdout

    # 80 columns: whole device ids and operators, the alarm on its own line; then only fresh ones: exit 0
    narrow = subprocess.run([sys.executable, "-m", "farebox.cli", "devices", "--operator", OP],
                            env={**env, "COLUMNS": "80"}, check=False, capture_output=True, text=True, timeout=120)
    assert narrow.returncode == 1
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    rows = [line for line in narrow.stdout.splitlines() if line.count("│") > 5]
    assert {line.split("│")[1].strip() for line in rows} == {A, B, C} and "…" not in "".join(rows)
    assert f"validators of {OP} at" in narrow.stdout  # one operator: named once, in the title
    assert f"{B}: journal 90% full" in narrow.stdout
    help_text = subprocess.run([sys.executable, "-m", "farebox.cli", "devices", "--help"], env=env, check=True,
                               capture_output=True, text=True, timeout=120).stdout
    assert "Exit status: 0 when no validator is stale, 1 when at least one is" in " ".join(help_text.split())
    fresh = subprocess.run([sys.executable, "-m", "farebox.cli", "devices", "--operator", OP, "--stale-after",
                            "60"], env={**env, "COLUMNS": "80"}, check=False, capture_output=True, text=True,
                           timeout=120)
    assert "2 stale" not in fresh.stdout and fresh.returncode == 1  # C was never heard: still stale


# ------------------------------------------------------------------ issue 10: goodbyes and the link history
def test_a_goodbye_signs_the_device_off_with_its_final_backlog(conn):
    assert put(conn, signed("birth", A, T0)).applied
    assert put(conn, heartbeat(A, T0 + MIN, backlog=8)).applied
    bye = put(conn, signed("goodbye", A, T0 + 2 * MIN, backlog=0))
    assert bye.applied and bye.status.kind == "goodbye"
    # a heartbeat of the same second, delivered after the goodbye, is a copy from before it
    assert not put(conn, heartbeat(A, T0 + 2 * MIN, backlog=8)).applied
    row = conn.execute(select(DeviceStatus.online, DeviceStatus.backlog, DeviceStatus.last_seen)).one()
    assert (row.online, row.backlog, utc(row.last_seen)) == (False, 0, T0 + 2 * MIN)
    fleet = {r.device_id: r for r in fleet_status(conn, OP, T0 + timedelta(days=1), stale_after=5 * MIN)}
    assert fleet[A].signed_off and not fleet[A].stale  # parked in the depot after saying so: not stale
    assert fleet[B].stale  # never heard


def test_link_history_shows_the_gap_of_a_link_that_dropped(conn):
    """Birth 07:00, heartbeats to 09:00, then nothing (a dead zone: no will came, or came late) until a birth at
    13:00; a goodbye at 22:00. The history: online 07:00-09:00, off the air 09:00-13:00, online 13:00-22:00."""
    at = lambda hours: T0.replace(hour=0) + timedelta(hours=hours)  # noqa: E731
    put(conn, signed("birth", A, at(7)))
    put(conn, heartbeat(A, at(8)))
    put(conn, heartbeat(A, at(9)))
    put(conn, signed("birth", A, at(13)))
    put(conn, signed("birth", A, at(13)))  # the retained birth again: the same connection
    put(conn, signed("death", A, at(7)))  # the old connection's will, late: changes nothing
    put(conn, heartbeat(A, at(20)))
    put(conn, signed("goodbye", A, at(22)))
    periods = link_history(conn, [A])[A]
    assert [(p.online, p.since, p.until, p.how) for p in periods] == [
        (True, at(7), at(9), "lost"), (False, at(9), at(13), "lost"),
        (True, at(13), at(22), "goodbye"), (False, at(22), None, "goodbye")]
    # a will of the current connection closes it at the last thing heard
    put(conn, signed("birth", B, at(7)), device=B)
    put(conn, heartbeat(B, at(10)), device=B)
    put(conn, signed("death", B, at(7)), device=B)
    periods = link_history(conn, [B])[B]
    assert [(p.online, p.since, p.until) for p in periods] == [(True, at(7), at(10)), (False, at(10), None)]
    fleet = {r.device_id: r for r in fleet_status(conn, OP, at(23), stale_after=5 * MIN)}
    assert fleet[B].link_lost == at(10) and fleet[B].stale and not fleet[B].signed_off


def test_a_validator_stopped_after_its_backlog_drains_reads_offline_with_nothing_waiting(tmp_path, broker_url, uid):
    """The demo's end of service, with the real validator code: taps acknowledged after the last periodic
    heartbeat, then a clean stop. The back office must not keep "online, backlog N": the drained backlog is
    reported at once, and the stop says goodbye. A dead zone in between shows as a gap in the link history."""
    from simbus import TERMINAL, Bus

    from backoffice import registry
    from backoffice.db import upgrade
    from backoffice.ingest_consumer import IngestConsumer, end_session
    from epurse.keys import TEST_ISSUER_KEYS

    operator, device = f"op_{uid}", f"v_{uid}"
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    with engine.begin() as c:
        registry.add_operator(c, code=operator, name="Status Test Bus")
        registry.add_device(c, device_id=device, operator=operator, vehicle=None, terminal_id=TERMINAL.hex())
    target = parse_mqtt_url(broker_url)
    ingest = IngestConsumer(engine, target, keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER,
                            client_id=f"ingest_{uid}", operator=operator)
    status = StatusConsumer(engine, target, master=TEST_DEVICE_MASTER, client_id=f"status_{uid}", operator=operator)
    ingest.start()
    status.start()
    assert ingest.wait_subscribed(10) and status.wait_subscribed(10)
    bus = Bus(tmp_path, target, operator, device, heartbeat_seconds=3600)
    bus.uplink.clock = lambda: bus.clock_now  # one clock on the bus: its taps' and its statuses'

    def row():
        return rows_by_device(engine).get(device, {})

    try:
        bus.uplink.start()
        wait_for(lambda: row().get("online") is True, "the birth")
        bus.tap(bus.driver)
        bus.ride(12)
        assert bus.uplink.wait_drained(30)
        before = bus.clock_now
        bus.uplink.send_status_now()
        wait_for(lambda: utc(row().get("last_seen")) == before, "a heartbeat before the dead zone")
        bus.uplink.go_offline()
        bus.clock_now += timedelta(hours=4)  # four hours in a dead zone, taps kept in the journal
        bus.ride(3)
        back = bus.clock_now
        bus.uplink.go_online()  # its birth says "backlog 3"; the acks come after it
        assert bus.uplink.wait_drained(30)
        wait_for(lambda: row().get("backlog") == 0 and utc(row().get("last_seen")) == back,
                 "the heartbeat saying the backlog drained, without waiting for the periodic one")
        assert bus.uplink.stop() is True  # the broker took the goodbye
        assert status.wait_for_goodbyes([device], timeout=15) == []
    finally:
        bus.uplink.stop()
        ingest.stop()
        status.stop()
        end_session(target, f"ingest_{uid}")
        end_session(target, f"status_{uid}")
        bus.journal.close()
    final = row()
    assert (final["online"], final["backlog"]) == (False, 0)
    with engine.connect() as c:
        taps = c.execute(text("SELECT count(*) FROM tap WHERE device_id = :d"), {"d": device}).scalar_one()
        assert taps == 16  # the driver's shift and 15 rides, each once
        fleet = fleet_status(c, operator, back + timedelta(days=1), stale_after=5 * MIN)
        assert fleet[0].signed_off and not fleet[0].stale and fleet[0].backlog == 0
        periods = link_history(c, [device])[device]
    gaps = [p for p in periods if not p.online and p.until is not None]
    assert [(g.since, g.until) for g in gaps] == [(before, back)]
    assert periods[-1].online is False and periods[-1].how == "goodbye" and periods[-1].since == back
    engine.dispose()


def test_alarms_rise_grow_past_an_acknowledgement_and_clear(conn):
    """A validator's grey purchases become an alarm; acknowledged, it stays acknowledged while it does not grow;
    when it grows a new unacknowledged alarm takes its place; when the bus stops reporting it, it is cleared. The
    quarantine alarm counts the open rows, checked here with plain SQL."""
    from backoffice import alarms

    now = T0 + timedelta(days=1)

    def sync(*texts):
        alarms.sync_device(conn, operator=OP, device_id=A, alarms=texts, now=now)

    sync("1 grey purchase since 2026-11-20 06:40Z", "journal 86% full")
    (grey,) = alarms.listing(conn, operator=OP, kind="grey_purchases")
    assert (grey.measure, grey.state) == (1, "open")
    assert alarms.acknowledge(conn, alarm_id=grey.id, by="dave", now=now).acked_by == "dave"
    with pytest.raises(alarms.AlarmError, match="acknowledged by dave"):
        alarms.acknowledge(conn, alarm_id=grey.id, by="erin", now=now)
    with pytest.raises(alarms.NotFound):
        alarms.acknowledge(conn, alarm_id=grey.id, by="dave", now=now, operator="another_op")
    sync("1 grey purchase since 2026-11-20 06:40Z", "journal 86% full")  # the same: still acknowledged
    assert [a.state for a in alarms.listing(conn, kind="grey_purchases", state="all")] == ["acknowledged"]
    sync("2 grey purchases since 2026-11-20 06:40Z", "journal 86% full")  # grew: raised again
    states = sorted((a.measure, a.state) for a in alarms.listing(conn, kind="grey_purchases", state="all"))
    assert states == [(1, "cleared"), (2, "open")]
    sync()  # the bus reports nothing any more: both of its alarms clear
    assert alarms.listing(conn, operator=OP) == []
    assert {a.kind for a in alarms.listing(conn, operator=OP, state="cleared")} == {"grey_purchases",
                                                                                   "journal_filling"}

    conn.execute(text("INSERT INTO quarantine (received_at, topic, device_id, device_seq, reason, payload, status) "
                      "VALUES (:at, :topic, :d, 1, 'bad TAC', :p, 'open'), (:at, :topic, :d, 2, 'bad TAC', :p, "
                      "'open'), (:at, :topic, :d, 3, 'bad TAC', :p, 'released')"),
                 {"at": now, "topic": topics.taps(OP, A), "d": A, "p": b"x"})
    alarms.refresh(conn, now=now)
    expected = conn.execute(text("SELECT count(*) FROM quarantine WHERE status = 'open'")).scalar_one()
    (q,) = alarms.listing(conn, operator=OP, kind="quarantine_growing")
    assert q.measure == expected == 2 and q.text == "2 quarantined records await review"

"""The downlink over a real broker (embedded amqtt and Mosquitto): signed deny lists, parameters and software reach a
validator, are checked, staged and applied between taps; what fails is refused and reported; status birth, heartbeat
and death (the broker's last will) carry the versions. The back office's side is played by a plain paho client that
signs with the published TEST key and reads statuses with the device's MAC key."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from simbus import TERMINAL, Bus

from blacklist.delta import diff, encode_delta
from blacklist.denylist import DenyList, encode
from validator.app import ValidatorApp
from validator.downlink import Downlink
from validator.fares import FareTable
from validator.messages import Outcome
from wire import codec, status, topics
from wire.mqtt_url import new_client, parse_mqtt_url
from wire.packages import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, Package, params_body, sign_package

OTHER_SEED = bytes(range(32))


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class BackOffice:
    """Publishes packages to one device and collects its statuses (decoded with its key)."""

    def __init__(self, target, operator: str, device: str, key: bytes, uid: str):
        self.operator, self.device, self.key = operator, device, key
        self.statuses: list[status.Status] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = new_client(target, f"bo_{uid}", persistent=False)
        self.client.on_connect = lambda c, *a: c.subscribe(topics.status(operator, device), qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(target.host, target.port)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client, userdata, message):
        if not message.payload:
            return  # a retained status being cleared
        decoded = status.decode_status(message.payload, key=self.key)
        with self._lock:
            self.statuses.append(decoded)

    def seen(self, kind: str | None = None, pred=lambda s: True) -> list[status.Status]:
        with self._lock:
            return [s for s in self.statuses if (kind is None or s.kind == kind) and pred(s)]

    def wait_status(self, pred, kind: str | None = "heartbeat", what: str = "status") -> status.Status:
        return wait_for(lambda: (self.seen(kind, pred) or [None])[-1], what=what)

    def send(self, message: str, pkg: Package, *, seed: bytes = TEST_SIGNING_SEED, fleet: bool = False) -> None:
        self.publish(message, sign_package(pkg, seed), fleet=fleet)

    def publish(self, message: str, payload: bytes, *, fleet: bool = False) -> None:
        topic = (topics.fleet_topic(self.operator, message) if fleet
                 else topics.device_topic(self.operator, self.device, message))
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self):
        # statuses are retained: clear this test's from the shared broker
        self.client.publish(topics.status(self.operator, self.device), b"", qos=1, retain=True).wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def link(tmp_path, broker_url, uid):
    operator, device = f"op_{uid}", f"v_{uid}"
    target = parse_mqtt_url(broker_url)
    bus = Bus(tmp_path, target, operator, device, downlink=True, heartbeat_seconds=0.3,
              denylist_max_age=timedelta(days=2))
    office = BackOffice(target, operator, device, bus.mac_key, uid)
    bus.uplink.start()
    office.wait_status(lambda s: True, kind="birth", what="birth")
    yield bus, office
    bus.uplink.stop()
    office.close()
    bus.journal.close()


def rider_asn(bus, i: int) -> bytes:
    return bus.riders[i].asn


def deny_pkg(bus, deny: DenyList, *, base=None, body=None, target=None) -> Package:
    return Package("denylist", deny.version, target or bus.uplink.device_id, bus.clock_now,
                   body if body is not None else encode(list(deny), deny.version), base)


def test_full_list_then_signed_delta_applied_and_reported(link):
    bus, office = link
    bus.tap(bus.driver)
    v1 = DenyList.from_asns([rider_asn(bus, 0), rider_asn(bus, 1)], version=1)
    office.send("denylist", deny_pkg(bus, v1))
    wait_for(bus.downlink.pending, what="full list staged")
    bus.between_taps()
    assert bus.terminal.deny_list.version == 1
    v2 = DenyList.from_asns([rider_asn(bus, 1), rider_asn(bus, 2)], version=2)
    office.send("denylist", deny_pkg(bus, v2, base=1, body=encode_delta(diff(v1, v2))))
    wait_for(bus.downlink.pending, what="delta staged")
    assert bus.tap(bus.riders[0]) is Outcome.PAID  # the delta applied before this tap unlisted rider 0
    assert bus.terminal.deny_list.version == 2
    assert bus.tap(bus.riders[2]) is Outcome.CARD_BLOCKED
    on_disk = DenyList.load(bus.downlink.deny_file)
    assert (on_disk.version, on_disk.checksum) == (2, v2.checksum)
    beat = office.wait_status(lambda s: s.denylist_version == 2, what="heartbeat with deny list 2")
    assert beat.psam == TERMINAL.hex() and "denylist stale" not in beat.alarms
    assert not any(a.startswith("refused") for a in beat.alarms)
    assert list(bus.downlink.staging.glob("*.pkg")) == []


def test_forged_signature_refused_and_reported(link):
    bus, office = link
    listed = DenyList.from_asns([rider_asn(bus, 3)], version=4)
    office.send("denylist", deny_pkg(bus, listed), seed=OTHER_SEED)
    beat = office.wait_status(lambda s: any("refused" in a for a in s.alarms), what="refusal reported")
    assert "refused denylist: bad signature" in beat.alarms
    assert beat.denylist_version == 0
    assert bus.downlink.pending() == [] and list(bus.downlink.staging.glob("*.pkg")) == []
    bus.tap(bus.driver)
    assert bus.terminal.deny_list.version == 0
    assert bus.tap(bus.riders[3]) is Outcome.PAID  # the forged list never took effect


def test_delta_from_another_base_refused_then_full_list_accepted(link):
    bus, office = link
    v5 = DenyList.from_asns([rider_asn(bus, 4)], version=5)
    v6 = DenyList.from_asns([rider_asn(bus, 4), rider_asn(bus, 5)], version=6)
    office.send("denylist", deny_pkg(bus, v6, base=5, body=encode_delta(diff(v5, v6))))
    beat = office.wait_status(lambda s: any("delta from 5" in a for a in s.alarms), what="wrong base reported")
    assert beat.denylist_version == 0  # the version the back office must send a full list (or delta) from
    assert bus.downlink.pending() == []
    office.send("denylist", deny_pkg(bus, v6))
    wait_for(bus.downlink.pending, what="full list staged")
    bus.tap(bus.driver)
    assert bus.terminal.deny_list.version == 6
    assert bus.tap(bus.riders[5]) is Outcome.CARD_BLOCKED
    beat = office.wait_status(lambda s: s.denylist_version == 6, what="heartbeat with deny list 6")
    assert not any("refused" in a for a in beat.alarms)  # applied: the refusal alarm of the kind is cleared


def test_delta_with_wrong_checksum_refused_and_list_kept(link):
    bus, office = link
    v1 = DenyList.from_asns([rider_asn(bus, 6)], version=1)
    office.send("denylist", deny_pkg(bus, v1))
    wait_for(bus.downlink.pending)
    bus.between_taps()
    v2 = DenyList.from_asns([rider_asn(bus, 6), rider_asn(bus, 7)], version=2)
    other = DenyList.from_asns([rider_asn(bus, 8)], version=2)
    d = diff(v1, v2)
    lying = type(d)(d.base_version, d.new_version, d.adds, d.removes, other.checksum)
    office.send("denylist", deny_pkg(bus, v2, base=1, body=encode_delta(lying)))
    wait_for(bus.downlink.pending)
    bus.between_taps()
    assert bus.terminal.deny_list.version == 1
    assert DenyList.load(bus.downlink.deny_file).checksum == v1.checksum
    beat = office.wait_status(lambda s: any("refused denylist 2" in a for a in s.alarms), what="checksum refusal")
    assert beat.denylist_version == 1


def test_params_with_future_activation_staged_then_applied_between_taps(link, tmp_path):
    bus, office = link
    bus.tap(bus.driver)
    fares = FareTable(7, {"r1": 300, "r2": 250})
    later = bus.clock_now + timedelta(hours=1)
    office.send("params", Package("params", 3, "route:r1", later, params_body(fares=fares.to_dict(), route="r2")))
    wait_for(bus.downlink.pending, what="params staged")
    assert (tmp_path / "staging" / "params-3.pkg").exists()
    rider = bus.riders[0]
    assert bus.tap(rider) is Outcome.PAID and rider.balance == 1_000_000 - 200  # not yet active
    assert bus.terminal.fares.version == 1 and bus.terminal.config.route == "r1"
    bus.clock_now = later
    assert bus.tap(rider) is Outcome.PAID
    assert rider.balance == 1_000_000 - 200 - 250  # the r2 fare of the new table
    assert bus.terminal.fares.version == 7 and bus.terminal.config.route == "r2"
    assert FareTable.from_dict(json.loads((tmp_path / "fares.json").read_text())) == fares
    beat = office.wait_status(lambda s: s.params_version == 3, what="params version 3 reported")
    assert beat.alarms == ("denylist stale",)  # no deny list was ever sent in this test
    # a restart keeps the route and the params version (the terminal is re-made with the fares file)
    again = Downlink(bus.terminal, public_key=TEST_PUBLIC_KEY, staging_dir=tmp_path / "staging")
    assert again.params_version == 3


def test_params_applied_from_the_main_loop(link):
    bus, office = link
    app = ValidatorApp(bus.terminal, bus.reader, display=None, uplink=bus.uplink, downlink=bus.downlink)
    fares = FareTable(9, {"r1": 180})
    office.send("params", Package("params", 4, "_fleet", bus.clock_now, params_body(fares=fares.to_dict())),
                fleet=True)
    wait_for(bus.downlink.pending, what="fleet params staged")
    app.load_parameters()  # what the loop runs before waiting for the next card
    assert bus.terminal.fares == fares


def _tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"#!/bin/sh\necho farebox 1.1.0\n"
        info = tarfile.TarInfo("farebox-1.1.0/run.sh")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_software_staged_with_marker_and_reported(link, tmp_path):
    bus, office = link
    blob = _tarball()
    office.send("software", Package("software", "1.1.0", bus.uplink.device_id, bus.clock_now, blob))
    wait_for(bus.downlink.pending, what="software staged")
    bus.between_taps()
    folder = tmp_path / "staging" / "software"
    marker = json.loads((folder / "ACTIVATE").read_text())
    assert marker["version"] == "1.1.0" and marker["sha256"] == hashlib.sha256(blob).hexdigest()
    assert (folder / marker["file"]).read_bytes() == blob
    with tarfile.open(folder / marker["file"]) as tar:
        assert tar.getnames() == ["farebox-1.1.0/run.sh"]
    beat = office.wait_status(lambda s: "software 1.1.0 staged" in s.alarms, what="software staged reported")
    assert beat.software == "1.0.0"  # still running the old one until the boot script installs the new


def test_packages_for_another_device_or_on_the_wrong_topic_refused(link):
    bus, office = link
    office.send("software", Package("software", "2.0", "v_someone_else", bus.clock_now, b"x"))
    office.send("params", Package("software", "2.1", bus.uplink.device_id, bus.clock_now, b"x"))
    beat = office.wait_status(lambda s: "refused params 2.1: software package on params topic" in s.alarms
                              and "refused software 2.0: for v_someone_else" in s.alarms, what="both refusals")
    assert bus.downlink.pending() == [] and beat.software == "1.0.0"
    office.send("params", Package("params", 5, "route:r9", bus.clock_now, params_body(route="r9")), fleet=True)
    office.publish("params", b"not a package at all")
    office.wait_status(lambda s: any(a.startswith("refused params: not a farebox") for a in s.alarms),
                       what="garbage refused")
    assert bus.downlink.pending() == []  # another route's fleet package is not ours


def test_birth_heartbeat_and_death_by_last_will(link):
    bus, office = link
    birth = office.seen("birth")[0]
    assert (birth.software, birth.psam, birth.params_version, birth.denylist_version) == ("1.0.0", TERMINAL.hex(),
                                                                                          0, 0)
    assert birth.alarms == ("denylist stale",)  # no deny list ever received
    bus.tap(bus.driver)
    bus.uplink.go_offline()  # taps stay unsent while the link is down
    bus.ride(3)
    bus.uplink.go_online()
    # before the back office acknowledges anything (no ingest here), the heartbeat shows the backlog
    beat = office.wait_status(lambda s: s.backlog == 4, what="heartbeat with backlog 4")
    assert beat.last_tap == bus.clock_now and beat.oldest_unsent is not None
    births = len(office.seen("birth"))
    assert births >= 2  # the reconnect said birth again
    # the socket dies without a DISCONNECT: the broker publishes the will
    bus.uplink._stop.set()
    bus.uplink.client.loop_stop()
    bus.uplink.client.socket().shutdown(socket.SHUT_RDWR)
    death = office.wait_status(lambda s: True, kind="death", what="death by last will")
    last_birth = office.seen("birth")[-1]
    assert death.at == last_birth.at and death.denylist_version == 0 and death.psam == TERMINAL.hex()


def test_forged_ack_ignored_and_real_ack_believed(link):
    bus, office = link
    bus.tap(bus.driver)
    bus.ride(2)
    wait_for(lambda: bus.uplink.batches_sent >= 1, what="a batch sent")
    seqs = [r.device_seq for r in bus.journal.unsent(10)]
    assert len(seqs) == 3
    office.publish("ack", codec.encode_ack(bus.uplink.device_id, seqs, key=b"k" * 32))
    wait_for(lambda: bus.uplink.forged_acks == 1, what="forged ack seen")
    assert bus.journal.backlog() == 3
    # A real ack names this journal's epoch (issue 9): one for another journal would be ignored.
    office.publish("ack", codec.encode_ack(bus.uplink.device_id, seqs, key=bus.mac_key, epoch=bus.journal.epoch))
    wait_for(lambda: bus.journal.backlog() == 0, what="real ack applied")


def test_announcement_is_not_applied_and_a_bus_behind_reports_its_version(link):
    bus, office = link
    body = json.dumps({"version": 3, "count": 1, "checksum": "00" * 32,
                       "created_at": bus.clock_now.isoformat()}).encode()
    sent_before = bus.uplink.statuses_sent
    office.send("denylist", Package("denylist", 3, "_fleet", bus.clock_now, body), fleet=True)
    wait_for(lambda: bus.uplink.statuses_sent > sent_before, what="a heartbeat after the announcement")
    beat = office.wait_status(lambda s: s.denylist_version == 0, what="version 0 reported")
    assert not any("refused" in a for a in beat.alarms) and bus.downlink.pending() == []


def test_staged_package_survives_a_restart_and_is_applied_after(link, tmp_path):
    bus, office = link
    later = bus.clock_now + timedelta(days=1)
    office.send("params", Package("params", 8, bus.uplink.device_id, later, params_body(route="r7")))
    wait_for(bus.downlink.pending, what="params staged")
    # power cycle: a new Downlink over the same staging folder re-checks the staged package and keeps it
    again = Downlink(bus.terminal, public_key=TEST_PUBLIC_KEY, staging_dir=tmp_path / "staging",
                     clock=lambda: bus.clock_now)
    assert [p.version for p in again.pending()] == ["8"]
    assert again.apply_due() == [] and bus.terminal.config.route == "r1"
    bus.clock_now = later
    assert [p.version for p in again.apply_due()] == ["8"]
    assert bus.terminal.config.route == "r7" and again.params_version == 8
    # a staged file altered on disk is dropped at the next start, not applied
    (tmp_path / "staging" / "params-9.pkg").write_bytes(
        sign_package(Package("params", 9, "_fleet", later, params_body(route="r8")), TEST_SIGNING_SEED)[:-1] + b"!")
    third = Downlink(bus.terminal, public_key=TEST_PUBLIC_KEY, staging_dir=tmp_path / "staging")
    assert third.pending() == [] and not (tmp_path / "staging" / "params-9.pkg").exists()


def test_validator_process_applies_a_package_and_dies_by_last_will(tmp_path, mosquitto_url, uid):
    """`farebox validator` as a process with its link options: birth, a signed fare table applied by its main loop
    (no tap needed), the heartbeat reporting it, and a SIGKILL answered by the broker's death message."""
    import os
    import signal
    import subprocess
    import sys

    from wire.devicekeys import TEST_DEVICE_MASTER, mac_key

    operator, device = f"op_{uid}", f"p_{uid}"
    key = mac_key(TEST_DEVICE_MASTER, device)
    fares = tmp_path / "fares.json"
    fares.write_text(json.dumps({"version": 1, "flat": {"r1": 200}}))
    (tmp_path / "mac.key").write_text(key.hex())
    target = parse_mqtt_url(mosquitto_url)
    office = BackOffice(target, operator, device, key, uid)
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "validator", "run", "--device", device, "--operator", operator,
         "--route", "r1", "--vehicle", "b1", "--reader", "sim:", "--psam", "sim:010000000888",
         "--journal", str(tmp_path / "journal.db"), "--fares", str(fares), "--mqtt", mosquitto_url,
         "--mac-key", f"@{tmp_path / 'mac.key'}", "--signing-public-key", TEST_PUBLIC_KEY.hex(),
         "--software-version", "3.2.1", "--heartbeat-seconds", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        birth = office.wait_status(lambda s: True, kind="birth", what="the process's birth")
        assert (birth.software, birth.psam, birth.params_version) == ("3.2.1", "010000000888", 0)
        new = FareTable(5, {"r1": 220})
        office.send("params", Package("params", 1, device, datetime.now(UTC), params_body(fares=new.to_dict())))
        office.wait_status(lambda s: s.params_version == 1, what="params 1 applied by the process")
        assert FareTable.from_dict(json.loads(fares.read_text())) == new
        assert (tmp_path / "staging" / "state.json").exists()
        os.kill(proc.pid, signal.SIGKILL)
        death = office.wait_status(lambda s: True, kind="death", what="death by last will after SIGKILL")
        assert death.at == office.seen("birth")[-1].at and death.software == "3.2.1"
    finally:
        proc.kill()
        proc.wait(10)
        office.close()

"""What a validator's heartbeat says about grey purchases: a card pulled mid-purchase that has not come back for
GREY_ALARM_AFTER is an alarm operations sees; one that settles, or is still fresh, is not."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from test_journal import T0, rec

from validator.journal import Journal
from validator.uplink import GREY_ALARM_AFTER, Uplink
from wire import devicekeys
from wire.mqtt_url import parse_mqtt_url
from wire.records import RecordKind


@pytest.fixture
def bus(tmp_path):
    journal = Journal(tmp_path / "bus.journal")
    clock = {"now": T0}
    uplink = Uplink(journal, parse_mqtt_url("mqtt://127.0.0.1:1"), device_id="bus0042", operator="citybus",
                    mac_key=devicekeys.mac_key(b"k" * 32, "bus0042"), software="1.0",
                    clock=lambda: clock["now"])
    yield journal, uplink, clock
    journal.close()


def grey_alarms(uplink) -> list[str]:
    return [a for a in uplink.status("heartbeat").alarms if "grey" in a]


def test_a_fresh_grey_purchase_is_no_alarm(bus):
    journal, uplink, clock = bus
    journal.begin_purchase(rec(RecordKind.PURCHASE))
    clock["now"] = T0 + GREY_ALARM_AFTER - timedelta(seconds=1)
    assert grey_alarms(uplink) == []


def test_grey_purchases_left_behind_raise_an_alarm_with_count_and_time(bus):
    journal, uplink, clock = bus
    journal.begin_purchase(rec(RecordKind.PURCHASE))
    journal.begin_purchase(rec(RecordKind.PURCHASE, minutes=3, card_asn="31000000000000099999"))
    clock["now"] = T0 + GREY_ALARM_AFTER
    assert grey_alarms(uplink) == ["2 grey purchases since 2024-03-05 07:30Z"]


def test_the_alarm_clears_when_the_card_comes_back(bus):
    journal, uplink, clock = bus
    grey = journal.begin_purchase(rec(RecordKind.PURCHASE))
    clock["now"] = T0 + timedelta(hours=3)
    assert grey_alarms(uplink) == ["1 grey purchase since 2024-03-05 07:30Z"]
    journal.complete_purchase(dataclasses.replace(grey, tac="620098f7"))
    assert grey_alarms(uplink) == []


# ------------------------------------------------------------------ issue 9: acks name the journal's epoch


class _Message:
    def __init__(self, topic: str, payload: bytes):
        self.topic, self.payload = topic, payload


def test_an_ack_for_another_journal_is_ignored_and_one_for_this_journal_is_believed(bus):
    """A late ack meant for a replaced journal's records names sequences that are other records now."""
    from wire import codec, topics

    journal, uplink, _ = bus
    for i in range(3):
        journal.append(rec(minutes=i))
    topic = topics.ack("citybus", "bus0042")
    other = codec.encode_ack("bus0042", [1, 2, 3], key=uplink.mac_key, epoch=journal.epoch ^ 1)
    uplink._on_message(None, None, _Message(topic, other))
    assert journal.backlog() == 3
    old_form = codec.encode_ack("bus0042", [1, 2, 3], key=uplink.mac_key)  # epoch 0: not this journal's either
    uplink._on_message(None, None, _Message(topic, old_form))
    assert journal.backlog() == 3
    mine = codec.encode_ack("bus0042", [1, 2], key=uplink.mac_key, epoch=journal.epoch, quarantined=[2])
    uplink._on_message(None, None, _Message(topic, mine))
    assert journal.backlog() == 1 and uplink.quarantined == 1

"""One rule for device ids (wire.topics.check_device_id), used by every entry point."""

from __future__ import annotations

import pytest

from backoffice.devices import BACKOFFICE_USERS
from wire import topics


@pytest.mark.parametrize("good", ["bus1", "dev_r1", "cb_001", "0", "a" * 32, "statusboard", "v1_4f2a9c"])
def test_good_ids_pass(good):
    assert topics.check_device_id(good) == good


@pytest.mark.parametrize("bad", ["publisher", "ingest", "status", "farebox", "farebox_ingest", "ingest_0",
                                 "status_ab12", "publisher_x", "Bad.Dev", "_fleet", "", "a" * 33, "bus 1", "bus-1",
                                 "bus\x00", "BUS1", "bus/1", "+", "#", "bus\n", "é", None, 7, b"bus1"])
def test_bad_ids_are_refused_with_the_rule(bad):
    with pytest.raises(topics.DeviceIdError) as e:
        topics.check_device_id(bad)
    assert "device id" in str(e.value) and ("reserved" in str(e.value) or "1-32 characters" in str(e.value))


def test_a_pasted_page_is_not_echoed_whole():
    with pytest.raises(topics.DeviceIdError) as e:
        topics.check_device_id("x" * 100_000)
    assert len(str(e.value)) < 400 and "100000 characters" in str(e.value)


def test_the_back_office_users_and_client_ids_are_reserved():
    """Every broker user and client id the back office logs in with (serve, demo, ingest workers, publish)."""
    for name in (*BACKOFFICE_USERS, "farebox_ingest", "farebox_ingest_3", "farebox_status", "farebox_publisher",
                 "farebox_publish_4242", "farebox_package_77", "ingest_ab12cd", "status_ab12cd", "publisher_ab12cd"):
        with pytest.raises(topics.DeviceIdError):
            topics.check_device_id(name)


def test_topics_of_reserved_or_bad_devices_are_not_device_topics():
    for bad in ("publisher", "farebox_ingest"):
        with pytest.raises(topics.TopicError):
            topics.parse(f"farebox/v1/op/{bad}/taps")
        with pytest.raises(topics.TopicError):
            topics.taps("op", bad)
    assert topics.parse("farebox/v1/op/bus1/taps") == ("op", "bus1", "taps")

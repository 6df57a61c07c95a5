"""MQTT topic names: one scheme, ``farebox/v1/<operator>/<target>/<message>``, every segment in ``[0-9a-z_]``.

``v1`` is the topic scheme's version (a payload carries its own format version). ``<target>`` is a device id
(which never starts with ``_`` and is never one of the back office's own names:
``check_device_id``) or ``_fleet``, the operator's whole fleet. The messages:

| topic | direction | QoS / retained | payload |
|---|---|---|---|
| ``.../<device>/taps`` | bus -> back office | 1 | a batch of journal records (purchases, refusals, driver shift sign-in / sign-out), ``wire.codec`` |
| ``.../<device>/status`` | bus -> back office | 1, retained | birth, heartbeat and (as the MQTT last will) death, ``wire.status`` |
| ``.../<device>/ack`` | back office -> bus | 1 | the sequences now stored, ``wire.codec.encode_ack`` |
| ``.../<device>/denylist`` | back office -> bus | 1 | a deny-list delta from the device's version, or the full list, ``wire.packages`` |
| ``.../<device>/params`` | back office -> bus | 1 | a parameter package (fare table, route assignment) for this device, ``wire.packages`` |
| ``.../<device>/software`` | back office -> bus | 1 | a software package for this device, ``wire.packages`` |
| ``.../_fleet/denylist`` | back office -> every bus | 1, retained | the current deny-list version: a signed package whose JSON body is ``{version, count, checksum, created_at}`` (a bus behind reports its version in its status and gets a delta) |
| ``.../_fleet/params`` | back office -> every bus | 1, retained | the fleet's parameter package |
| ``.../_fleet/software`` | back office -> every bus | 1, retained | the fleet's software package |

Driver shift events travel in the taps stream (kinds ``shift_open`` / ``shift_close``): they need the same
exactly-once delivery and device sequence as fares, and a shift report must agree with the fares beside it.

A device may publish only ``.../<its id>/taps`` and ``.../<its id>/status`` and read only its own downlink and
``_fleet``; ``farebox broker config`` writes that as a Mosquitto ACL (the user name is the device id).
"""

from __future__ import annotations

import re

PREFIX = "farebox/v1"
FLEET = "_fleet"
_SEGMENT = re.compile(r"[0-9a-z][0-9a-z_]{0,31}")
UPLINK = ("taps", "status")
DOWNLINK = ("ack", "denylist", "params", "software")
FLEET_MESSAGES = ("denylist", "params", "software")
MESSAGES = UPLINK + DOWNLINK


class TopicError(ValueError):
    pass


def check_segment(name: str, what: str) -> str:
    if not isinstance(name, str) or not _SEGMENT.fullmatch(name):
        raise TopicError(f"{what} {name!r} cannot be a topic segment: use 1-32 characters of [0-9a-z_], "
                         "not starting with _")
    return name


# The back office's own names on the broker: its broker users (ingest, status, publisher) and the client ids its
# processes connect with (``farebox_ingest``, ``farebox_ingest_0``, ``ingest_<tag>``, ``farebox_publish_<pid>``...).
# A device id is the device's broker user name and, on the broker, its client id (Mosquitto's device listener has
# use_username_as_clientid; the embedded broker does the same), so a device named like one of these could log in
# as a service or knock a service's connection off. Refused: these names and any name starting with one + "_".
RESERVED_NAMES = ("farebox", "ingest", "status", "publisher")
DEVICE_ID_RULE = ("1-32 characters of a-z, 0-9 and _, starting with a letter or digit, and not one of the back "
                  f"office's names ({', '.join(RESERVED_NAMES)}, or one of them followed by _)")


class DeviceIdError(TopicError):
    """A device id farebox cannot register: the text says which rule it breaks."""


def check_device_id(device_id: object) -> str:
    """``device_id`` if it can be a validator's id, else DeviceIdError. The one rule every entry point uses (the
    registry, the API, the CLI, ingest and the broker files): the id is a topic segment, the device's broker user
    name and its client id, so it must be all three without meeting the back office's own names."""
    if not isinstance(device_id, str) or not _SEGMENT.fullmatch(device_id):
        shown = repr(device_id)
        if len(shown) > 50:  # a pasted page is not echoed back whole
            shown = f"{shown[:40]}... ({len(device_id) if isinstance(device_id, str) else len(shown)} characters)"
        raise DeviceIdError(f"device id {shown} is not allowed: use {DEVICE_ID_RULE}")
    for name in RESERVED_NAMES:
        if device_id == name or device_id.startswith(name + "_"):
            raise DeviceIdError(f"device id {device_id!r} is reserved for the back office's own broker login "
                                f"({name}): choose another name")
    return device_id


def device_topic(operator: str, device: str, message: str) -> str:
    if message not in MESSAGES:
        raise TopicError(f"unknown device message {message!r}; farebox v1 knows {', '.join(MESSAGES)}")
    return f"{PREFIX}/{check_segment(operator, 'operator')}/{check_device_id(device)}/{message}"


def fleet_topic(operator: str, message: str) -> str:
    if message not in FLEET_MESSAGES:
        raise TopicError(f"unknown fleet message {message!r}; farebox v1 knows {', '.join(FLEET_MESSAGES)}")
    return f"{PREFIX}/{check_segment(operator, 'operator')}/{FLEET}/{message}"


def taps(operator: str, device: str) -> str:
    return device_topic(operator, device, "taps")


def ack(operator: str, device: str) -> str:
    return device_topic(operator, device, "ack")


def status(operator: str, device: str) -> str:
    return device_topic(operator, device, "status")


# What the back office subscribes to: every device's tap batches, and every device's status.
ALL_TAPS = f"{PREFIX}/+/+/taps"
ALL_STATUS = f"{PREFIX}/+/+/status"


def operator_taps(operator: str | None) -> str:
    """The subscription for one operator's tap batches (all operators' when None)."""
    return ALL_TAPS if operator is None else f"{PREFIX}/{check_segment(operator, 'operator')}/+/taps"


def shared(group: str, subscription: str) -> str:
    """An MQTT 5 / Mosquitto shared subscription: the broker hands each message to one member of ``group``."""
    return f"$share/{check_segment(group, 'share group')}/{subscription}"


def parse(topic: str) -> tuple[str, str, str]:
    """``(operator, target, message)`` of a farebox topic (target a device id or ``_fleet``); TopicError if it is
    not one."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX:
        raise TopicError(f"not a farebox v1 topic: {topic!r}")
    operator, target, message = parts[2:]
    check_segment(operator, "operator")
    if target == FLEET:
        if message not in FLEET_MESSAGES:
            raise TopicError(f"unknown fleet message {message!r} in topic {topic!r}")
        return operator, target, message
    check_device_id(target)
    if message not in MESSAGES:
        raise TopicError(f"unknown message {message!r} in topic {topic!r}; farebox v1 knows {', '.join(MESSAGES)}")
    return operator, target, message

"""MQTT topic names. One scheme: ``farebox/v1/<operator>/<device>/<message>``, segments in ``[0-9a-z_]``.

Uplink (bus -> back office): ``taps``. Downlink (back office -> bus): ``ack``.
"""

from __future__ import annotations

import re

PREFIX = "farebox/v1"
_SEGMENT = re.compile(r"[0-9a-z_]{1,32}")
MESSAGES = ("taps", "ack")


class TopicError(ValueError):
    pass


def check_segment(name: str, what: str) -> str:
    if not isinstance(name, str) or not _SEGMENT.fullmatch(name):
        raise TopicError(f"{what} {name!r} cannot be a topic segment: use 1-32 characters of [0-9a-z_]")
    return name


def taps(operator: str, device: str) -> str:
    return f"{PREFIX}/{check_segment(operator, 'operator')}/{check_segment(device, 'device')}/taps"


def ack(operator: str, device: str) -> str:
    return f"{PREFIX}/{check_segment(operator, 'operator')}/{check_segment(device, 'device')}/ack"


# What the back office subscribes to: every device's tap batches.
ALL_TAPS = f"{PREFIX}/+/+/taps"


def operator_taps(operator: str | None) -> str:
    """The subscription for one operator's tap batches (all operators' when None)."""
    return ALL_TAPS if operator is None else f"{PREFIX}/{check_segment(operator, 'operator')}/+/taps"


def parse(topic: str) -> tuple[str, str, str]:
    """``(operator, device, message)`` of a farebox topic; TopicError if it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX:
        raise TopicError(f"not a farebox v1 topic: {topic!r}")
    operator, device, message = parts[2:]
    check_segment(operator, "operator")
    check_segment(device, "device")
    if message not in MESSAGES:
        raise TopicError(f"unknown message {message!r} in topic {topic!r}; farebox v1 knows {', '.join(MESSAGES)}")
    return operator, device, message

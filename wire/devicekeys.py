"""Per-device secrets, derived from one fleet master secret, so the back office stores none of them.

- ``mac_key(master, device_id)``: the 32-byte key a validator MACs its messages with (``wire.codec``) and the back
  office checks them with: HMAC-SHA256(master, ``"farebox mac v1|" + device_id``).
- ``mqtt_password(master, device_id)``: the device's broker password (``farebox broker config`` writes its hash for
  Mosquitto): the first 24 characters of the URL-safe base64 of HMAC-SHA256(master, ``"farebox mqtt v1|" +
  device_id``).

A validator is provisioned with its two derived values (``farebox device add`` prints them) and never sees the
master; a stolen validator gives away one device, not the fleet. ``TEST_DEVICE_MASTER`` is published here on purpose
for the demo and the tests, like the issuer test keys; a deployment sets its own (``FAREBOX_DEVICE_MASTER_KEY``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

TEST_DEVICE_MASTER = b"farebox test device-master key 1"  # 32 bytes, published: never for a real fleet


def _derive(master: bytes, label: str, device_id: str) -> bytes:
    if not isinstance(master, bytes) or len(master) < 16:
        raise ValueError("the device master secret must be at least 16 bytes")
    return hmac.new(master, f"{label}|{device_id}".encode(), hashlib.sha256).digest()


def mac_key(master: bytes, device_id: str) -> bytes:
    return _derive(master, "farebox mac v1", device_id)


def mqtt_password(master: bytes, device_id: str) -> str:
    return base64.urlsafe_b64encode(_derive(master, "farebox mqtt v1", device_id)).decode()[:24]

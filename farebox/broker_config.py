"""`farebox broker config`: the Mosquitto files that let every registered validator in, and only onto its own topics.

Three files in one folder:

- ``passwd``: a Mosquitto 2.0 password file, one line per registered device (user name = device id) and per back-office
  user (ingest, status, publisher), every password derived from the device master (wire.devicekeys.mqtt_password),
  hashed the way ``mosquitto_passwd`` does: ``$7$`` = PBKDF2-HMAC-SHA512, 101 iterations, a random 12-byte salt,
  ``user:$7$101$<base64 salt>$<base64 64-byte hash>``. Computed here so the files can be made on a machine without
  Mosquitto; tests log in to a real Mosquitto with them.
- ``acl``: a device may publish only ``farebox/v1/<op>/<id>/taps`` and ``.../status`` and read only its own ``ack``,
  ``denylist``, ``params``, ``software`` and its operator's ``_fleet/#``; the back-office users get what their job
  needs (table ``SERVICE_ACL``).
- ``mosquitto.conf``: listener, no anonymous clients, the two files above, persistence, and queue limits that do not
  silently drop QoS 1 messages (see each line's comment).

Regenerate after registering devices and have Mosquitto re-read them (``kill -HUP``: it reloads the password file
and the ACL without dropping connections).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

from wire import topics

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
SALT_LEN = 12
P = topics.PREFIX

# What each back-office user may do: (access, topic pattern). Subscribing through a shared subscription
# ($share/<group>/<filter>) is checked by Mosquitto against <filter>, so these lines cover $share too.
SERVICE_ACL: dict[str, tuple[tuple[str, str], ...]] = {
    # stores tap batches (alone or as one of several workers in $share/ingest/...), acknowledges them
    "ingest": (("read", f"{P}/+/+/taps"), ("write", f"{P}/+/+/ack")),
    # keeps device_status from every validator's birth, heartbeat and last will
    "status": (("read", f"{P}/+/+/status"),),
    # publishes deny lists, parameters and software, to one device or a fleet, and reads status for versions
    "publisher": (("read", f"{P}/+/+/status"), ("write", f"{P}/+/+/denylist"), ("write", f"{P}/+/+/params"),
                  ("write", f"{P}/+/+/software")),
}


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2.0's ``$7$`` hash of ``password`` (what follows ``user:`` in its password file)."""
    salt = os.urandom(SALT_LEN) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """Whether ``hashed`` (a ``$7$`` line's hash, ours or mosquitto_passwd's) is that of ``password``."""
    _, seven, iterations, salt, _digest = hashed.split("$")
    if seven != "7":
        raise ValueError("only Mosquitto 2.0's $7$ hashes are understood")
    return hash_password(password, salt=base64.b64decode(salt), iterations=int(iterations)) == hashed


def password_file(users: list[tuple[str, str]]) -> str:
    """The password file for (user name, password) pairs."""
    lines = []
    for user, password in users:
        if ":" in user or "\n" in user:
            raise ValueError(f"user name {user!r} cannot go in a Mosquitto password file")
        lines.append(f"{user}:{hash_password(password)}")
    return "\n".join(lines) + "\n"


def acl_file(devices: list[tuple[str, str]]) -> str:
    """The ACL for the back-office users and every (device id, operator)."""
    out = ["# farebox broker ACL, written by `farebox broker config`; regenerate after `farebox device add`.",
           "# No topic line stands before the first `user` line: nothing is granted to every client.", ""]
    for user, grants in SERVICE_ACL.items():
        out.append(f"user {user}")
        out.extend(f"topic {access} {pattern}" for access, pattern in grants)
        out.append("")
    for device_id, operator in devices:
        own = f"{P}/{topics.check_segment(operator, 'operator')}/{topics.check_segment(device_id, 'device')}"
        out.append(f"user {device_id}")
        out.extend(f"topic write {own}/{m}" for m in topics.UPLINK)
        out.extend(f"topic read {own}/{m}" for m in topics.DOWNLINK)
        out.append(f"topic read {P}/{operator}/{topics.FLEET}/#")
        out.append("")
    return "\n".join(out)


def mosquitto_conf(*, folder: Path, port: int = 1883, bind: str | None = None,
                   persistence_dir: Path | None = None, run_as: str | None = None) -> str:
    folder = folder.resolve()
    persistence_dir = (persistence_dir or folder / "data").resolve()
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    lines = [
        f"# farebox broker configuration, written by `farebox broker config` on {datetime.now(UTC):%Y-%m-%d %H:%M}Z.",
        "# Run: mosquitto -c THIS_FILE. After adding devices, regenerate and `kill -HUP` the broker: it re-reads the",
        "# password file and the ACL without dropping any connection.",
        "",
        "# One password file and one ACL for every listener (a TLS listener added below shares them).",
        "per_listener_settings false",
        *(["# Started as root, Mosquitto switches to this user: it must read passwd and acl, write persistence.",
           f"user {run_as}"] if run_as else
          ["# Started as root, Mosquitto switches to the user `mosquitto`: `farebox broker config` run as root",
           "# gives passwd and acl to its group, and the persistence folder to it."]),
        "# Where buses and the back office connect. Over the internet put TLS in front (a `listener 8883` with",
        "# cafile/certfile/keyfile here, or a TLS terminator): the passwords travel in the CONNECT packet.",
        listener,
        "# Every client logs in: a validator as its device id, the back office as ingest / status / publisher.",
        "allow_anonymous false",
        "# user:$7$ PBKDF2-SHA512 hashes of passwords derived from the device master (farebox broker config).",
        f"password_file {folder / 'passwd'}",
        "# Which topics each user may publish and read (a device: only its own, plus its operator's _fleet).",
        f"acl_file {folder / 'acl'}",
        "",
        "# Keep persistent sessions, their queued QoS 1 messages and retained status / fleet packages across a",
        "# restart: ingest's session holds the batches that arrived while it was down.",
        "persistence true",
        f"persistence_location {persistence_dir}/",
        "# Write the in-memory state to disk every 60 s (default 1800 s). A crash loses at most that much of the",
        "# broker's queue, which costs nothing but a resend: a validator keeps every tap until it is acknowledged.",
        "autosave_interval 60",
        "# A session unseen this long is dropped with its queue (a retired ingest worker stops piling up batches);",
        "# a bus offline longer than that resends its unacknowledged taps when it is back, so nothing is lost.",
        "persistent_client_expiration 30d",
        "",
        "# Mosquitto's default of 1000 queued messages per client SILENTLY DROPS QoS 1 messages for a slow or",
        "# stopped subscriber (PLATFORM.md). 1,000,000 holds a day of a city's tap batches for a stopped ingest;",
        "# past it Mosquitto drops, and the buses resend what was never acknowledged.",
        "max_queued_messages 1000000",
        "# No byte limit beside the count above (0 = none); memory is the bound.",
        "max_queued_bytes 0",
        "# QoS 1 messages in flight to one client before it acknowledges (default 20): lets one ingest worker keep",
        "# its database busy instead of waiting a round trip per batch.",
        "max_inflight_messages 100",
        "# Acks and deny-list announcements are small; send them at once rather than after Nagle's delay.",
        "set_tcp_nodelay true",
        "",
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BrokerFiles:
    folder: Path
    conf: Path
    passwd: Path
    acl: Path
    devices: int


def write_broker_config(*, devices: list[tuple[str, str]], master: bytes, folder: Path, port: int = 1883,
                        bind: str | None = None, persistence_dir: Path | None = None,
                        run_as: str | None = None) -> BrokerFiles:
    """Write passwd, acl and mosquitto.conf into ``folder`` for these (device id, operator) pairs."""
    from backoffice.devices import BACKOFFICE_USERS, service_password
    from wire.devicekeys import mqtt_password

    clash = sorted({d for d, _ in devices} & set(BACKOFFICE_USERS))
    if clash:
        raise ValueError(f"device ids {clash} are the back office's own broker users: rename those devices")
    folder.mkdir(parents=True, exist_ok=True)
    data = persistence_dir or folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    broker_user = _broker_account(run_as or "mosquitto")
    users = [(u, service_password(master, u)) for u in BACKOFFICE_USERS]
    users += [(d, mqtt_password(master, d)) for d, _ in devices]
    files = BrokerFiles(folder=folder.resolve(), conf=folder.resolve() / "mosquitto.conf",
                        passwd=folder.resolve() / "passwd", acl=folder.resolve() / "acl", devices=len(devices))
    # the hashes are not the passwords, but there is no reason to let other users try them offline
    gid = broker_user[1] if broker_user else None
    _write_private(files.passwd, password_file(users), gid)
    _write_private(files.acl, acl_file(devices), gid)
    files.conf.write_text(mosquitto_conf(folder=folder, port=port, bind=bind, persistence_dir=persistence_dir,
                                         run_as=run_as))
    if broker_user:
        os.chown(data, *broker_user)
    return files


def _broker_account(name: str) -> tuple[int, int] | None:
    """(uid, gid) of the account Mosquitto will run as, when we are root and can hand it its files."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _write_private(path: Path, text: str, gid: int | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if gid is not None:
        os.chown(tmp, -1, gid)  # the broker's group reads it, nobody else
    os.replace(tmp, path)  # a broker reloading on HUP never reads a half-written file

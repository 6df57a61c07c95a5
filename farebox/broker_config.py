"""`farebox broker config`: the Mosquitto files that let every registered validator in, and only onto its own topics.

Two listeners, each with its own logins, and five files in one folder:

- the **device listener** (``port``, every address unless ``bind``): the buses. ``passwd`` holds one line per
  registered device (user name = device id), ``acl`` what each may do: publish only ``farebox/v1/<op>/<id>/taps`` and
  ``.../status``, read only its own ``ack``, ``denylist``, ``params``, ``software`` and its operator's ``_fleet/#``.
  ``use_username_as_clientid true``: whatever client id a device sends, its session is its device id, so a device
  can neither take over the back office's client id (``farebox_ingest``: knocking ingest off its session) nor
  another device's.
- the **back-office listener** (``service_port``, default ``port + 1``, on 127.0.0.1 unless ``service_bind``):
  ``backoffice.passwd`` and ``backoffice.acl`` for the users ingest, status and publisher (table ``SERVICE_ACL``).
  Here client ids stay free, because several ingest workers log in as the one user ``ingest`` with their own ids
  (``farebox_ingest_0``, ``_1``...; ``$share/ingest/...``), and one-shot commands publish beside the running
  publisher (``farebox_publish_<pid>``). Device ids never look like those (wire.topics.check_device_id), and a device
  password does not open this listener. Why two listeners: Mosquitto 2.0.11 ties a client id to a login only with
  ``use_username_as_clientid`` (a per-listener switch, which on one shared listener would make the ingest workers
  knock each other off) or with the dynamic-security plugin (its own JSON store, changed over $CONTROL, not re-read
  on HUP: a second way to provision everything). Two listeners keep the files ``kill -HUP`` re-reads.
- ``mosquitto.conf``: the two listeners, no anonymous clients, persistence, queue limits that do not silently drop
  QoS 1 messages, and a message size limit (see each line's comment).

Passwords derive from the device master (wire.devicekeys.mqtt_password) and are hashed the way ``mosquitto_passwd``
does: ``$7$`` = PBKDF2-HMAC-SHA512, 101 iterations, a random 12-byte salt, ``user:$7$101$<base64 salt>$<base64
64-byte hash>``. Computed here so the files can be made on a machine without Mosquitto; tests log in to a real
Mosquitto with them.

A device registered before ids were checked (wire.topics.check_device_id) is left out of the files and named in
``BrokerFiles.skipped``: one bad row never stops the files being written for every other bus.

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
# The largest message the broker passes on. The largest a farebox part sends is a software package (a tap batch is
# at most wire.codec.MAX_PAYLOAD, 4 MiB; a status 2 KiB): 16 MiB leaves room for one and stops a bus, or anyone with
# its password, from pushing tens of megabytes at ingest and at every subscriber's memory.
MESSAGE_SIZE_LIMIT = 16 * 1024 * 1024

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


def service_acl_file() -> str:
    """The ACL of the back-office listener: what each back-office user's job needs."""
    out = ["# farebox back-office ACL, written by `farebox broker config`.",
           "# No topic line stands before the first `user` line: nothing is granted to every client.", ""]
    for user, grants in SERVICE_ACL.items():
        out.append(f"user {user}")
        out.extend(f"topic {access} {pattern}" for access, pattern in grants)
        out.append("")
    return "\n".join(out)


def acl_file(devices: list[tuple[str, str]]) -> str:
    """The ACL of the device listener: every (device id, operator) on its own topics."""
    out = ["# farebox device ACL, written by `farebox broker config`; regenerate after `farebox device add`.",
           "# No topic line stands before the first `user` line: nothing is granted to every client.", ""]
    for device_id, operator in devices:
        own = f"{P}/{topics.check_segment(operator, 'operator')}/{topics.check_device_id(device_id)}"
        out.append(f"user {device_id}")
        out.extend(f"topic write {own}/{m}" for m in topics.UPLINK)
        out.extend(f"topic read {own}/{m}" for m in topics.DOWNLINK)
        out.append(f"topic read {P}/{operator}/{topics.FLEET}/#")
        out.append("")
    return "\n".join(out)


def mosquitto_conf(*, folder: Path, port: int = 1883, bind: str | None = None,
                   persistence_dir: Path | None = None, run_as: str | None = None, service_port: int | None = None,
                   service_bind: str = "127.0.0.1", message_size_limit: int = MESSAGE_SIZE_LIMIT) -> str:
    folder = folder.resolve()
    persistence_dir = (persistence_dir or folder / "data").resolve()
    service_port = port + 1 if service_port is None else service_port
    if service_port == port:
        raise ValueError(f"the back office's listener needs a port of its own, not the devices' {port}")
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    lines = [
        f"# farebox broker configuration, written by `farebox broker config` on {datetime.now(UTC):%Y-%m-%d %H:%M}Z.",
        "# Run: mosquitto -c THIS_FILE. After adding devices, regenerate and `kill -HUP` the broker: it re-reads the",
        "# password files and the ACLs without dropping any connection.",
        "",
        "# Each listener has its own logins: the buses' on one, the back office's on the other.",
        "per_listener_settings true",
        *(["# Started as root, Mosquitto switches to this user: it must read passwd and acl, write persistence.",
           f"user {run_as}"] if run_as else
          ["# Started as root, Mosquitto switches to the user `mosquitto`: `farebox broker config` run as root",
           "# gives passwd and acl to its group, and the persistence folder to it."]),
        "",
        "# --- the buses. Over the internet put TLS in front (a `listener 8883` with cafile/certfile/keyfile and the",
        "# same four lines below, or a TLS terminator): the passwords travel in the CONNECT packet.",
        listener,
        "# Every bus logs in as its device id.",
        "allow_anonymous false",
        "# user:$7$ PBKDF2-SHA512 hashes of passwords derived from the device master (farebox broker config).",
        f"password_file {folder / 'passwd'}",
        "# Which topics each device may publish and read: only its own, plus its operator's _fleet.",
        f"acl_file {folder / 'acl'}",
        "# A device's session is its device id whatever client id it sends: it cannot take over the back office's",
        "# client id (knocking ingest off) nor another bus's.",
        "use_username_as_clientid true",
        "",
        "# --- the back office: ingest, status and publisher. Several ingest workers share the user `ingest` with",
        "# client ids of their own, so client ids stay free here; no device password opens this listener.",
        f"listener {service_port} {service_bind}",
        "allow_anonymous false",
        f"password_file {folder / 'backoffice.passwd'}",
        f"acl_file {folder / 'backoffice.acl'}",
        "",
        "# A publish bigger than this is not passed on (a QoS 1 sender still gets its PUBACK; MQTT 5 senders are",
        "# told). The largest message farebox sends is a software package; a tap batch is at most 4 MiB. (Mosquitto",
        "# 2.0 marks this option deprecated in favour of max_packet_size, which disconnects the sender instead: a bus",
        "# would reconnect and send the same message again.)",
        f"message_size_limit {message_size_limit}",
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
    passwd: Path  # the devices' logins (device listener)
    acl: Path
    service_passwd: Path  # the back office's logins (back-office listener)
    service_acl: Path
    devices: int
    port: int  # where the buses connect
    service_port: int  # where the back office connects
    skipped: tuple[tuple[str, str], ...] = ()  # (device id, why) of registered devices left out


def write_broker_config(*, devices: list[tuple[str, str]], master: bytes, folder: Path, port: int = 1883,
                        bind: str | None = None, persistence_dir: Path | None = None,
                        run_as: str | None = None, service_port: int | None = None, service_bind: str = "127.0.0.1",
                        message_size_limit: int = MESSAGE_SIZE_LIMIT) -> BrokerFiles:
    """Write the two listeners' password files and ACLs and mosquitto.conf into ``folder`` for these (device id,
    operator) pairs. A pair whose device id or operator cannot be a broker login is left out and reported in
    ``skipped``."""
    from backoffice.devices import BACKOFFICE_USERS, service_password
    from wire.devicekeys import mqtt_password

    good, skipped = [], []
    for device_id, operator in devices:
        try:
            topics.check_device_id(device_id)
            topics.check_segment(operator, "operator")
        except topics.TopicError as e:
            skipped.append((device_id, str(e)))
        else:
            good.append((device_id, operator))
    service_port = port + 1 if service_port is None else service_port
    conf = mosquitto_conf(folder=folder, port=port, bind=bind, persistence_dir=persistence_dir, run_as=run_as,
                          service_port=service_port, service_bind=service_bind, message_size_limit=message_size_limit)
    folder.mkdir(parents=True, exist_ok=True)
    data = persistence_dir or folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    broker_user = _broker_account(run_as or "mosquitto")
    root = folder.resolve()
    files = BrokerFiles(folder=root, conf=root / "mosquitto.conf", passwd=root / "passwd", acl=root / "acl",
                        service_passwd=root / "backoffice.passwd", service_acl=root / "backoffice.acl",
                        devices=len(good), port=port, service_port=service_port, skipped=tuple(skipped))
    # the hashes are not the passwords, but there is no reason to let other users try them offline
    gid = broker_user[1] if broker_user else None
    _write_private(files.passwd, password_file([(d, mqtt_password(master, d)) for d, _ in good]), gid)
    _write_private(files.acl, acl_file(good), gid)
    _write_private(files.service_passwd, password_file([(u, service_password(master, u)) for u in BACKOFFICE_USERS]),
                   gid)
    _write_private(files.service_acl, service_acl_file(), gid)
    files.conf.write_text(conf)
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


# ---------------------------------------------------------------------- NATS: the broker as a cluster

# NATS subjects for the topics above: MQTT ``a/b/c`` is NATS ``a.b.c`` (``+`` -> ``*``, ``#`` -> ``>``).
N = P.replace("/", ".")
TAPS_STREAM = "FAREBOX_TAPS"  # the JetStream work queue the ingest workers consume (backoffice.ingest_jetstream)
# Copies of each MQTT subscription's JetStream consumer (nats_conf's comment says what R1 keeps and gives up).
MQTT_CONSUMER_REPLICAS = 1
NATS_MAX_PAYLOAD = 8 * 1024 * 1024  # a tap batch is at most 4 MiB; NATS refuses to start with more than 64 MiB
# nats-server delivers an MQTT session's QoS 1 messages from a JetStream consumer to "$MQTT.sub.<id>": every MQTT
# login (the buses, status, publisher) needs to subscribe to that, or its SUBSCRIBE fails ("Subscription Violation").
MQTT_DELIVERY = "$MQTT.sub.>"
# What the back office's NATS/MQTT logins may do, as NATS subjects.
NATS_SERVICE_PERMISSIONS: dict[str, dict[str, list[str]]] = {
    # consumes the taps work queue (JetStream API, its acks), publishes each device's ack (core and the MQTT
    # sessions' JetStream store), replies on inboxes
    "ingest": {"publish": ["$JS.API.>", "$JS.ACK.>", f"{N}.*.*.ack", f"$MQTT.msgs.{N}.*.*.ack"],
               "subscribe": ["_INBOX.>", f"{N}.*.*.taps"]},
    "status": {"publish": [], "subscribe": [f"{N}.*.*.status", MQTT_DELIVERY]},
    "publisher": {"publish": [f"{N}.*.*.denylist", f"{N}.*.*.params", f"{N}.*.*.software"],
                  "subscribe": [f"{N}.*.*.status", MQTT_DELIVERY]},
}


def nats_device_permissions(device_id: str, operator: str) -> dict[str, list[str]]:
    """The device's NATS permissions: the Mosquitto ACL's lines (acl_file) as subjects."""
    own = f"{N}.{topics.check_segment(operator, 'operator')}.{topics.check_device_id(device_id)}"
    return {"publish": [f"{own}.{m}" for m in topics.UPLINK],
            "subscribe": [f"{own}.{m}" for m in topics.DOWNLINK] + [
                f"{N}.{operator}.{topics.FLEET}", f"{N}.{operator}.{topics.FLEET}.>",  # MQTT's "/#" is both
                MQTT_DELIVERY]}


def _q(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a valid NATS config string


def _perm_block(perms: dict[str, list[str]]) -> str:
    def one(subjects: list[str]) -> str:  # an empty allow list would allow everything: deny it all instead
        return f"{{ allow: [{', '.join(_q(s) for s in subjects)}] }}" if subjects else '{ deny: [">"] }'

    return f"permissions: {{ publish: {one(perms['publish'])}, subscribe: {one(perms['subscribe'])} }}"


@dataclasses.dataclass(frozen=True)
class NatsNode:
    name: str
    host: str
    client_port: int  # NATS clients (the ingest workers)
    mqtt_port: int  # the buses, status, publisher
    cluster_port: int  # routes between the nodes
    store_dir: Path


def nats_nodes(n: int, folder: Path, *, host: str = "127.0.0.1", client_port: int = 4222, mqtt_port: int = 1883,
               cluster_port: int = 6222, hosts: list[str] | None = None) -> list[NatsNode]:
    """N nodes: on one host (ports counting up from the given ones: a test or a demo) or one per host in ``hosts``
    (the same ports on each machine)."""
    if hosts:
        return [NatsNode(f"n{i + 1}", h, client_port, mqtt_port, cluster_port, (folder / f"n{i + 1}").resolve())
                for i, h in enumerate(hosts)]
    return [NatsNode(f"n{i + 1}", host, client_port + i, mqtt_port + i, cluster_port + i,
                     (folder / f"n{i + 1}").resolve()) for i in range(n)]


def nats_conf(node: NatsNode, nodes: list[NatsNode], *, users: list[tuple[str, str, dict]],
              cluster_name: str = "farebox", max_payload: int = NATS_MAX_PAYLOAD,
              consumer_replicas: int = MQTT_CONSUMER_REPLICAS) -> str:
    """One node's nats-server configuration. ``users``: (user, password, permissions); ``consumer_replicas``: copies
    of each MQTT subscription's JetStream consumer (see MQTT_CONSUMER_REPLICAS)."""
    routes = ", ".join(_q(f"nats-route://{n.host}:{n.cluster_port}") for n in nodes)
    user_lines = [f"      {{ user: {_q(u)}, password: {_q(pw)}, {_perm_block(perms)} }}" for u, pw, perms in users]
    replicas = min(3, len(nodes))
    return "\n".join([
        f"# farebox NATS node {node.name}, written by `farebox broker config --engine nats` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M}Z.",
        f"# Run: nats-server -c THIS_FILE (one per node). Regenerate after `farebox device add` and reload each node",
        "# (nats-server --signal reload=PID, or kill -HUP): users and permissions change without dropping connections.",
        f"server_name: {_q(node.name)}",
        f"listen: {_q(f'{node.host}:{node.client_port}')}",
        "# A batch is at most 4 MiB (wire.codec.MAX_PAYLOAD); a bigger publish is refused, not passed on.",
        f"max_payload: {max_payload}",
        "# Keep a slow consumer's queue bounded instead of the server's memory.",
        "max_pending: 67108864",
        "",
        "# JetStream: the MQTT sessions, their queued QoS 1 messages and retained messages, and the taps work queue,",
        f"# each kept on {replicas} nodes (RAFT): a node can die without losing a session or an acknowledged message.",
        "jetstream {",
        f"  store_dir: {_q(str(node.store_dir))}",
        "  max_memory_store: 268435456",
        "  max_file_store: 21474836480",
        "}",
        "",
        "cluster {",
        f"  name: {_q(cluster_name)}",
        f"  listen: {_q(f'{node.host}:{node.cluster_port}')}",
        f"  routes: [{routes}]",
        "}",
        "",
        "# MQTT 3.1.1 for the buses (and the back office's status and publisher). nats-server keeps a persistent",
        "# session in JetStream: a bus whose node dies reconnects to another with the same client id and finds its",
        "# subscriptions and queued messages there.",
        "mqtt {",
        f"  listen: {_q(f'{node.host}:{node.mqtt_port}')}",
        f"  stream_replicas: {replicas}",
        "  # Each QoS 1 subscription of a session is a JetStream consumer (a bus has five). Kept on ONE node (no RAFT",
        "  # group of its own): 500 buses with R3 consumers (3,500 RAFT groups) timed out at connect on a 2-core",
        "  # machine; with R1 they connect (2,000 did not there: session, retained and consumer requests to",
        "  # JetStream timed out, nats-server 2.9 waits 4 s for each). What it gives up: while the node holding a",
        "  # bus's consumer is down, QoS 1 messages queued for that subscription (a per-device package) wait until",
        "  # the node is back (the messages themselves are in the R3 stream). Tap acks do not use it: ingest",
        "  # publishes them as core NATS, delivered at once to a connected bus; a missed ack costs a resend that",
        "  # ingest turns away.",
        f"  consumer_replicas: {min(consumer_replicas, replicas)}",
        "  # QoS 1 messages sent to one client and not yet PUBACKed: lets the status consumer keep up with a city.",
        "  max_ack_pending: 1024",
        "  ack_wait: \"30s\"",
        "}",
        "",
        "# One account for the fleet and the back office: no anonymous login; each device only on its own subjects",
        "# (the Mosquitto ACL of `farebox broker config` as NATS permissions); MQTT user name = device id.",
        "accounts {",
        "  FAREBOX: {",
        "    jetstream: enabled",
        "    users: [",
        ",\n".join(user_lines),
        "    ]",
        "  }",
        "}",
        "",
    ])


@dataclasses.dataclass(frozen=True)
class NatsFiles:
    folder: Path
    confs: tuple[Path, ...]
    nodes: tuple[NatsNode, ...]
    devices: int
    skipped: tuple[tuple[str, str], ...] = ()


def write_nats_config(*, devices: list[tuple[str, str]], master: bytes, folder: Path, nodes: int = 3,
                      host: str = "127.0.0.1", hosts: list[str] | None = None, client_port: int = 4222,
                      mqtt_port: int = 1883, cluster_port: int = 6222) -> NatsFiles:
    """``nodes`` nats-server configurations (``<folder>/<name>.conf``, mode 640: they hold the passwords, which
    nats-server takes as text or bcrypt only) with the same users and permissions."""
    from backoffice.devices import BACKOFFICE_USERS, service_password
    from wire.devicekeys import mqtt_password

    good, skipped = [], []
    for device_id, operator in devices:
        try:
            topics.check_device_id(device_id)
            topics.check_segment(operator, "operator")
        except topics.TopicError as e:
            skipped.append((device_id, str(e)))
        else:
            good.append((device_id, operator))
    users = [(u, service_password(master, u), NATS_SERVICE_PERMISSIONS[u]) for u in BACKOFFICE_USERS]
    users += [(d, mqtt_password(master, d), nats_device_permissions(d, op)) for d, op in good]
    folder.mkdir(parents=True, exist_ok=True)
    node_list = nats_nodes(len(hosts) if hosts else nodes, folder, host=host, client_port=client_port,
                           mqtt_port=mqtt_port, cluster_port=cluster_port, hosts=hosts)
    confs = []
    for node in node_list:
        node.store_dir.mkdir(parents=True, exist_ok=True)
        path = folder.resolve() / f"{node.name}.conf"
        _write_private(path, nats_conf(node, node_list, users=users), None)
        confs.append(path)
    return NatsFiles(folder=folder.resolve(), confs=tuple(confs), nodes=tuple(node_list), devices=len(good),
                     skipped=tuple(skipped))

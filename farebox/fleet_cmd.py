"""``farebox device add|monitor``, ``farebox devices`` and ``farebox broker config``: validators, their status, and
the Mosquitto files that let them in. Registered in farebox/cli.py by ``register(sub)``."""

from __future__ import annotations

import sys
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import terminal_id


def register(sub) -> None:
    p = sub.add_parser("device", help="validators")
    device = p.add_subparsers(dest="action", required=True)
    p = device.add_parser("add", help="register a validator so ingest accepts its taps")
    p.add_argument("--device-id", required=True)
    p.add_argument("--operator", required=True)
    p.add_argument("--terminal-id", required=True, type=terminal_id, help="its PSAM's terminal number (hex)")
    p.add_argument("--vehicle", default=None)
    p.add_argument("--write-to", type=Path, default=None, metavar="DIR",
                   help="also write the bus's secrets as provisioning files (mode 600) in this new folder: "
                        "mqtt.pass and mac.key, for validator run --mqtt-password-file and --mac-key @FILE")
    p.set_defaults(func=_device_add)
    p = device.add_parser("monitor", help="keep device_status from every validator's birth, heartbeat and last will "
                                          "(FAREBOX_MQTT_URL, as the broker user `status`)")
    p.add_argument("--client-id", default="farebox_status", help="MQTT client id (the persistent session's name)")
    p.add_argument("--operator", default=None, help="only this operator's buses (default: every operator's)")
    p.add_argument("--ready-file", default=None, help="touch this file once subscribed")
    p.set_defaults(func=_device_monitor)

    p = sub.add_parser("devices", help="the fleet: last seen, versions, backlog, alarms; stale devices flagged",
                       description="The fleet as the back office last heard it. Exit status: 0 when no validator "
                                   "is stale, 1 when at least one is (never heard, or silent longer than "
                                   "--stale-after without switching off cleanly), so a monitor can run it.")
    p.add_argument("--operator", default=None, help="only this operator's validators")
    p.add_argument("--stale-after", type=float, default=5.0, metavar="MINUTES",
                   help="flag a validator silent for longer than this (default 5 minutes)")
    p.set_defaults(func=_devices)

    p = sub.add_parser("broker", help="the Mosquitto broker's files")
    broker = p.add_subparsers(dest="action", required=True)
    p = broker.add_parser("config", help="write passwd, acl and mosquitto.conf for every registered validator")
    p.add_argument("--out", type=Path, required=True, help="folder for the three files")
    p.add_argument("--port", type=int, default=1883, help="where the buses connect (default 1883)")
    p.add_argument("--bind", default=None, help="listen on this address only (default: every address)")
    p.add_argument("--service-port", type=int, default=None,
                   help="where the back office connects (its own logins; default: --port + 1)")
    p.add_argument("--service-bind", default="127.0.0.1",
                   help="the back office's listener address (default 127.0.0.1: back office on the broker's host)")
    p.add_argument("--persistence-dir", type=Path, default=None, help="Mosquitto's database (default: OUT/data)")
    p.add_argument("--run-as", default=None, metavar="USER",
                   help="the user Mosquitto switches to when started as root (default: mosquitto)")
    p.add_argument("--engine", choices=("mosquitto", "nats"), default="mosquitto",
                   help="mosquitto (default, one machine) or nats: one nats-server configuration per node of a "
                        "cluster (MQTT listener on each, JetStream with 3 replicas, per-device permissions)")
    p.add_argument("--nodes", type=int, default=3, help="with --engine nats: nodes on this host (ports count up)")
    p.add_argument("--hosts", default=None,
                   help="with --engine nats: one node per host, comma-separated (the same ports on each)")
    p.add_argument("--client-port", type=int, default=4222, help="with --engine nats: NATS clients (ingest)")
    p.add_argument("--cluster-port", type=int, default=6222, help="with --engine nats: routes between the nodes")
    p.set_defaults(func=_broker_config)


def _device_add(args, settings) -> int:
    from sqlalchemy.exc import IntegrityError

    from backoffice.devices import DeviceError, register_device
    from backoffice.registry import RegistryError
    from wire import topics

    if args.write_to is not None and any((args.write_to / n).exists() for n in ("mqtt.pass", "mac.key")):
        print(f"farebox: {args.write_to} holds a bus's secrets already: give a new folder (nothing is overwritten)",
              file=sys.stderr)
        return 2
    root = bootstrap.start(settings, "device_master")
    engine = root.engine()
    try:
        with engine.begin() as conn:
            creds = register_device(conn, device_id=args.device_id, operator=args.operator, vehicle=args.vehicle,
                                    terminal_id=args.terminal_id.lower(), master=root.device_master)
    except (DeviceError, RegistryError) as e:  # e.g. a retired vehicle, or another operator's
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    except IntegrityError:
        print(f"farebox: device {args.device_id} is registered already, or operator {args.operator!r} / vehicle "
              f"{args.vehicle!r} is not", file=sys.stderr)
        return 1
    print(f"device {args.device_id} registered for {args.operator} (PSAM terminal {args.terminal_id.lower()})")
    print()
    print("Provision the validator with these. They are SECRET: shown now, stored nowhere (anyone holding the")
    print("device master can derive them again); keep them off tickets, chats and logs.")
    print(f"  MQTT user name   {creds.mqtt_username}")
    print(f"  MQTT password    {creds.mqtt_password}")
    print(f"  MAC key (hex)    {creds.mac_key.hex()}")
    print(f"  publishes on     {topics.taps(args.operator, args.device_id)}, "
          f"{topics.status(args.operator, args.device_id)}")
    if args.write_to is not None:
        written = _write_secret_files(args.write_to, {"mqtt.pass": creds.mqtt_password,
                                                      "mac.key": creds.mac_key.hex()})
        print(f"  written to       {', '.join(str(p) for p in written)} (mode 600: copy them to the bus)")
    print()
    print("Then let it into the broker: farebox broker config --out DIR, and reload Mosquitto (kill -HUP).")
    return 0


def _write_secret_files(folder: Path, files: dict[str, str]) -> list[Path]:
    """Each text in its own file, readable by its owner only; an existing file is never overwritten."""
    import os

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text + "\n")
        written.append(path)
    return written


def _device_monitor(args, settings) -> int:
    from backoffice.status_consumer import StatusConsumer

    if not settings.mqtt_url:
        print("farebox device monitor needs a broker: set FAREBOX_MQTT_URL (e.g. "
              "mqtt://status:PASSWORD@127.0.0.1:1883)", file=sys.stderr)
        return 2
    root = bootstrap.start(settings, "device_master")
    consumer = StatusConsumer(root.engine(), root.broker_target(), master=root.device_master,
                              client_id=args.client_id, operator=args.operator)
    if args.ready_file:
        consumer.on_ready = lambda: Path(args.ready_file).touch()
    consumer.run_forever()
    return 0


def _devices(args, settings) -> int:
    from datetime import UTC, datetime, timedelta

    from backoffice.devices import fleet_status

    engine = bootstrap.start(settings).read_engine()  # reading only: never migrates
    now = datetime.now(UTC)
    with engine.connect() as conn:
        rows = fleet_status(conn, args.operator, now, stale_after=timedelta(minutes=args.stale_after))
    _print_fleet(rows, now=now, stale_after=timedelta(minutes=args.stale_after))
    return 1 if any(r.stale for r in rows) else 0


def _ago(delta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _print_fleet(rows, *, now, stale_after) -> None:
    from rich.console import Console
    from rich.table import Table

    from backoffice.devices import version_counts

    console = Console()
    # Narrow terminals (80 columns) get the columns a person acts on, ids never cut; every column from 180 up.
    wide = console.width >= 180
    operators = sorted({r.operator for r in rows})
    one = operators[0] if len(operators) == 1 else None  # then it is named in the title, not in every row
    console.print(f"validators{' of ' + one if one else ''} at {now:%Y-%m-%d %H:%M}Z; stale: silent > "
                  f"{int(stale_after.total_seconds() // 60)} min", highlight=False)
    table = Table()
    id_width = max([len("device"), *(len(r.device_id) for r in rows)])
    columns = ["device", "operator", "vehicle", "state", "last seen", "backlog", "deny list"]
    if one and not wide:
        columns.remove("operator")
    if wide:
        columns += ["software", "params", "oldest unsent", "PSAM", "last tap", "alarms"]
    for col in columns:
        table.add_column(col, justify="right" if col in ("params", "deny list", "backlog") else "left",
                         no_wrap=col in ("device", "operator", "state", "last seen", "backlog", "deny list"),
                         min_width=id_width if col == "device" else None)
    for r in rows:
        state = "never heard" if r.online is None else "online" if r.online else (
            "switched off" if r.signed_off else "link lost" if r.link_lost else "offline")
        if r.stale:
            state = f"[bold red]STALE[/] {state}" if wide else "[bold red]STALE[/]" + (
                "" if r.online is None else f" {state.split()[0]}")
        seen = "-" if r.last_seen is None else (f"{r.last_seen:%m-%d %H:%M:%S} ({_ago(now - r.last_seen)})" if wide
                                                 else _ago(now - r.last_seen))
        cells = [r.device_id, *([] if "operator" not in columns else [r.operator]), r.plate or r.vehicle or "-",
                 state, seen,
                 "-" if r.backlog is None else str(r.backlog),
                 "-" if r.denylist_version is None else str(r.denylist_version)]
        if wide:
            cells += [r.software or "-", "-" if r.params_version is None else str(r.params_version),
                      "-" if r.oldest_unsent is None else _ago(now - r.oldest_unsent),
                      r.psam or "-", "-" if r.last_tap is None else _ago(now - r.last_tap),
                      "[yellow]" + "; ".join(r.alarms) + "[/]" if r.alarms else ""]
        table.add_row(*cells)
    console.print(table)
    if not wide:  # alarms under the table, one line each, not squeezed into a column
        for r in rows:
            for alarm in r.alarms:
                console.print(f"  [yellow]{r.device_id}: {alarm}[/]", highlight=False)
    stale = sum(r.stale for r in rows)
    console.print(f"{len(rows)} validator(s), {sum(bool(r.online) for r in rows)} online, "
                  f"{'[bold red]' if stale else ''}{stale} stale{'[/]' if stale else ''}")
    versions = Table(title="devices per version (rollout progress)")
    for col in ("of", "version", "devices"):
        versions.add_column(col, justify="right" if col == "devices" else "left")
    for what, counts in version_counts(rows).items():
        for version, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, str(kv[0]))):
            versions.add_row(what, "not reported" if version is None else str(version), str(n))
    console.print(versions)


def _broker_config(args, settings) -> int:
    import os

    from backoffice.devices import BACKOFFICE_USERS, registered_devices, service_password
    from farebox.broker_config import write_broker_config

    root = bootstrap.start(settings, "device_master")
    engine = root.engine()
    with engine.connect() as conn:
        devices = registered_devices(conn)
    master = root.device_master
    if args.engine == "nats":
        return _nats_config(args, devices, master)
    try:
        files = write_broker_config(devices=devices, master=master, folder=args.out, port=args.port, bind=args.bind,
                                    persistence_dir=args.persistence_dir, run_as=args.run_as,
                                    service_port=args.service_port, service_bind=args.service_bind)
    except ValueError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    for device_id, why in files.skipped:
        print(f"farebox: left out {device_id!r}: {why}. Retire it and register the bus under a valid id.",
              file=sys.stderr)
    print(f"Mosquitto files for {files.devices} device(s) and the back office's {', '.join(BACKOFFICE_USERS)}:")
    print(f"  {files.conf}\n  {files.passwd}\n  {files.acl}\n  {files.service_passwd}\n  {files.service_acl}")
    print(f"Start:  mosquitto -c {files.conf}")
    print("Reload after `farebox device add`: run this command again, then kill -HUP the running mosquitto.")
    print(f"Buses connect on port {files.port}; the back office logs in on its own listener, port "
          f"{files.service_port}, with these URLs (SECRET; each process's FAREBOX_MQTT_URL):")
    urls = {user: f"mqtt://{user}:{service_password(master, user)}@{args.service_bind}:{files.service_port}"
            for user in BACKOFFICE_USERS}
    for user, url in urls.items():
        print(f"  {user:<10} {url}")
    for user, url in urls.items():  # the same, one file each (mode 600): FAREBOX_MQTT_URL=$(cat DIR/ingest.url)
        path = Path(args.out) / f"{user}.url"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(url + "\n")
    print(f"  (also in {Path(args.out) / '<user>.url'}, mode 600: FAREBOX_MQTT_URL=$(cat {Path(args.out)}/ingest.url))")
    return 0


def _nats_config(args, devices, master) -> int:
    from backoffice.devices import BACKOFFICE_USERS, service_password
    from farebox.broker_config import write_nats_config

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else None
    host = args.bind or "127.0.0.1"
    try:
        files = write_nats_config(devices=devices, master=master, folder=args.out, nodes=args.nodes, host=host,
                                  hosts=hosts, client_port=args.client_port, mqtt_port=args.port,
                                  cluster_port=args.cluster_port)
    except ValueError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    for device_id, why in files.skipped:
        print(f"farebox: left out {device_id!r}: {why}. Retire it and register the bus under a valid id.",
              file=sys.stderr)
    print(f"nats-server configurations for {len(files.nodes)} nodes, {files.devices} device(s) and the back "
          f"office's {', '.join(BACKOFFICE_USERS)} (mode 640: they hold the passwords):")
    for conf in files.confs:
        print(f"  nats-server -c {conf}")
    mqtt = ",".join(f"mqtt://<device>:<password>@{n.host}:{n.mqtt_port}" for n in files.nodes)
    nats = ",".join(f"nats://{n.host}:{n.client_port}" for n in files.nodes)
    print(f"Buses:   farebox validator run --mqtt {mqtt} ...")
    print(f"Ingest:  farebox ingest --engine nats --nats {nats} (as many as you like, on any machine)")
    print("Status and publisher log in over MQTT on any node, e.g. (SECRET):")
    first = files.nodes[0]
    for user in ("status", "publisher"):
        print(f"  {user:<10} mqtt://{user}:{service_password(master, user)}@{first.host}:{first.mqtt_port}")
    print("Reload after `farebox device add`: run this command again, then kill -HUP each nats-server.")
    return 0

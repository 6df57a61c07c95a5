"""The `farebox` command. Each subcommand turns its arguments into one call; the wiring lives in farebox/."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import date
from pathlib import Path

from farebox.config import load_settings


def _demo(args, settings) -> int:
    from farebox.demo import run_demo

    result = run_demo(settings, seed=args.seed, day=args.day, riders=args.riders, kill_ingest_at=args.kill_ingest_at)
    return 0 if result.consistent else 1


def _ingest(args, settings) -> int:
    from backoffice.db import make_engine, upgrade
    from backoffice.ingest_consumer import IngestConsumer, IngestPool, WorkerSpec, worker_client_ids
    from farebox.keys import device_master, issuer_keys
    from wire.mqtt_url import parse_mqtt_url

    if not settings.mqtt_url:
        print("farebox ingest needs a broker: set FAREBOX_MQTT_URL (e.g. mqtt://127.0.0.1:1883)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("farebox ingest: --workers must be at least 1", file=sys.stderr)
        return 2
    # Several workers split the batches only through a shared subscription; without one each would get them all.
    group = args.share_group or ("ingest" if args.workers > 1 else None)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    target, keys, master = parse_mqtt_url(settings.mqtt_url), issuer_keys(settings), device_master(settings)
    if args.workers == 1:
        consumer = IngestConsumer(engine, target, keys=keys, master=master, client_id=args.client_id,
                                  operator=args.operator, share_group=group, accept_unsigned=args.accept_unsigned)
        if args.ready_file:
            consumer.on_ready = lambda: Path(args.ready_file).touch()
        consumer.run_forever()
        return 0
    engine.dispose()
    specs = [WorkerSpec(settings.effective_database_url, target, keys, master, client_id, operator=args.operator,
                        share_group=group, accept_unsigned=args.accept_unsigned)
             for client_id in worker_client_ids(args.client_id, args.workers)]
    IngestPool(specs, ready_file=args.ready_file).run_forever()
    return 0


def _db_upgrade(args, settings) -> int:
    from backoffice.db import make_engine, upgrade

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    print(f"schema is current on {engine.url.render_as_string(hide_password=True)}")
    return 0


def _settle(args, settings) -> int:
    from backoffice.db import make_engine, upgrade
    from backoffice.settle import settle, settle_month
    from reports.pdf import yuan

    if (args.day is None) == (args.month is None):
        print("farebox settle: give --day YYYY-MM-DD (a service day) or --month YYYY-MM", file=sys.stderr)
        return 2
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    try:
        with engine.begin() as conn:  # a day that has ended is cleared and its run stored: committed here
            if args.month is not None:
                m = settle_month(conn, operator=args.operator, year=args.month[0], month=args.month[1],
                                 reports_dir=args.out)
            else:
                d = settle(conn, operator=args.operator, day=args.day, reports_dir=args.out)
    except (LookupError, ValueError) as e:
        print(f"farebox settle: {e}", file=sys.stderr)
        return 2
    if args.month is not None:
        gross = sum(int(r.totals["day_gross"]) for r in m.runs)
        net = sum(int(r.totals["day_net"]) for r in m.runs)
        payable = sum(int(r.totals["payable_net"]) for r in m.runs)
        print(f"{args.operator} {m.first_day:%Y-%m}: {len(m.runs)} day(s) cleared, gross {yuan(gross)} yuan, net "
              f"{yuan(net)} yuan; payable with late taps and adjustments {yuan(payable)} yuan; "
              f"{len(m.missing)} day(s) without a clearing run left out")
        print(f"reports: {', '.join(str(f) for f in m.files)}")
        return 0
    s, run = d.settlement, d.run
    if run is None:
        print(f"{args.operator} {args.day}: PROVISIONAL, {d.provisional}")
        print(f"  {s.taps} fares, gross {yuan(s.amount)} yuan")
    else:
        t = run.totals
        print(f"{args.operator} {args.day}: clearing run {run.id}{' (stored already, checked)' if run.recleared else ''}"
              f": {t['day_taps']} fares, gross {yuan(t['day_gross'])}, issuer commission {yuan(t['day_commission'])},"
              f" net {yuan(t['day_net'])} yuan; payable with late taps and adjustments {yuan(t['payable_net'])}")
        if d.shift_items:
            print(f"  {len(d.shift_items)} shift(s) out of balance: see the reconciliation work list")
    print(f"reports: {', '.join(str(f) for f in d.files)}")
    return 0


def _jobs_list(args, settings) -> int:
    from sqlalchemy import func, select

    from backoffice.db import make_engine, upgrade
    from backoffice.models import ClearingRun, Operator
    from backoffice.scheduler import clearing_job_id, stored_jobs

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    found = {job_id: (name, at, trigger) for job_id, name, at, trigger in stored_jobs(engine)}
    with engine.connect() as conn:
        ops = conn.execute(select(Operator.code, Operator.timezone).where(Operator.retired_at.is_(None))
                           .order_by(Operator.code)).all()
        last = dict(conn.execute(select(ClearingRun.operator, func.max(ClearingRun.service_day))
                                 .group_by(ClearingRun.operator)).all())
    for job_id, (name, at, trigger) in sorted(found.items()):
        when = f"{at:%Y-%m-%d %H:%M} UTC" if at else "paused"
        print(f"{job_id:24} next {when:20} {trigger:32} {name}")
    for op in ops:
        if clearing_job_id(op.code) not in found:
            print(f"{clearing_job_id(op.code):24} not stored yet: added when the scheduler starts (farebox serve, "
                  "farebox jobs serve)")
        print(f"  {op.code}: last cleared service day {last.get(op.code) or 'none'}")
    return 0


def _jobs_run(args, settings) -> int:
    from backoffice.db import make_engine, upgrade
    from backoffice.jobs import clear_operator

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    try:
        done = clear_operator(engine, operator=args.operator, day=args.day,
                              reports_dir=Path(settings.var_dir) / "reports" if args.out is None else args.out)
    except (LookupError, ValueError) as e:
        print(f"farebox jobs run: {e}", file=sys.stderr)
        return 2
    if not done:
        print(f"{args.operator}: nothing to clear (the last service day that has ended is cleared)")
    for d in done:
        what = "cleared" if d.cleared else "cleared before; checked again"
        print(f"{args.operator} {d.day}: clearing run {d.run_id} {what}"
              + (f"; {d.shift_items} shift(s) out of balance" if d.shift_items else ""))
        if d.reports:
            print(f"  reports: {', '.join(str(p) for p in d.reports)}")
    return 0


def _jobs_serve(args, settings) -> int:
    from backoffice.db import make_engine, upgrade
    from backoffice.scheduler import start_scheduler, stop_scheduler
    from backoffice.signals import stop_requested

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    scheduler = start_scheduler(engine, settings)
    done = stop_requested()
    if args.ready_file:
        Path(args.ready_file).touch()
    done.wait()
    stop_scheduler(scheduler)
    return 0


def _year_month(text: str) -> tuple[int, int]:
    year, _, month = text.partition("-")
    if not (year.isdigit() and month.isdigit() and 1 <= int(month) <= 12):
        raise argparse.ArgumentTypeError(f"{text!r} is not a month: give YYYY-MM")
    return int(year), int(month)


def _device_add(args, settings) -> int:
    from sqlalchemy.exc import IntegrityError

    from backoffice.db import make_engine, upgrade
    from backoffice.devices import DeviceError, register_device
    from backoffice.registry import RegistryError
    from farebox.keys import device_master
    from wire import topics

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    try:
        with engine.begin() as conn:
            creds = register_device(conn, device_id=args.device_id, operator=args.operator, vehicle=args.vehicle,
                                    terminal_id=args.terminal_id.lower(), master=device_master(settings))
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
    print()
    print("Then let it into the broker: farebox broker config --out DIR, and reload Mosquitto (kill -HUP).")
    return 0


def _device_monitor(args, settings) -> int:
    from backoffice.db import make_engine, upgrade
    from backoffice.status_consumer import StatusConsumer
    from farebox.keys import device_master
    from wire.mqtt_url import parse_mqtt_url

    if not settings.mqtt_url:
        print("farebox device monitor needs a broker: set FAREBOX_MQTT_URL (e.g. "
              "mqtt://status:PASSWORD@127.0.0.1:1883)", file=sys.stderr)
        return 2
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    consumer = StatusConsumer(engine, parse_mqtt_url(settings.mqtt_url), master=device_master(settings),
                              client_id=args.client_id, operator=args.operator)
    if args.ready_file:
        consumer.on_ready = lambda: Path(args.ready_file).touch()
    consumer.run_forever()
    return 0


def _devices(args, settings) -> int:
    from datetime import UTC, datetime, timedelta

    from backoffice.db import make_engine, upgrade
    from backoffice.devices import fleet_status

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.connect() as conn:
        rows = fleet_status(conn, args.operator, now, stale_after=timedelta(minutes=args.stale_after))
    _print_fleet(rows, now=now, stale_after=timedelta(minutes=args.stale_after))
    return 0


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
    table = Table(title=f"validators at {now:%Y-%m-%d %H:%M:%S}Z (stale: silent > {stale_after})")
    for col in ("device", "vehicle", "state", "last seen", "software", "params", "deny list", "backlog",
                "oldest unsent", "PSAM", "last tap", "alarms"):
        table.add_column(col, justify="right" if col in ("params", "deny list", "backlog") else "left")
    for r in rows:
        state = "never heard" if r.online is None else "online" if r.online else "offline"
        if r.stale:
            state = f"[bold red]STALE[/] ({state})"
        table.add_row(
            r.device_id, r.plate or r.vehicle or "-", state,
            "-" if r.last_seen is None else f"{r.last_seen:%m-%d %H:%M:%S} ({_ago(now - r.last_seen)})",
            r.software or "-", "-" if r.params_version is None else str(r.params_version),
            "-" if r.denylist_version is None else str(r.denylist_version),
            "-" if r.backlog is None else str(r.backlog),
            "-" if r.oldest_unsent is None else _ago(now - r.oldest_unsent),
            r.psam or "-", "-" if r.last_tap is None else _ago(now - r.last_tap),
            "[yellow]" + "; ".join(r.alarms) + "[/]" if r.alarms else "")
    console.print(table)
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
    from backoffice.db import make_engine, upgrade
    from backoffice.devices import BACKOFFICE_USERS, registered_devices, service_password
    from farebox.broker_config import write_broker_config
    from farebox.keys import device_master

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    with engine.connect() as conn:
        devices = registered_devices(conn)
    master = device_master(settings)
    try:
        files = write_broker_config(devices=devices, master=master, folder=args.out, port=args.port, bind=args.bind,
                                    persistence_dir=args.persistence_dir, run_as=args.run_as)
    except ValueError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    print(f"Mosquitto files for {files.devices} device(s) and the back office's {', '.join(BACKOFFICE_USERS)}:")
    print(f"  {files.conf}\n  {files.passwd}\n  {files.acl}")
    print(f"Start:  mosquitto -c {files.conf}")
    print("Reload after `farebox device add`: run this command again, then kill -HUP the running mosquitto.")
    host = args.bind or "BROKER_HOST"
    print("The back office logs in with these URLs (SECRET; each process's FAREBOX_MQTT_URL):")
    for user in BACKOFFICE_USERS:
        print(f"  {user:<10} mqtt://{user}:{service_password(master, user)}@{host}:{args.port}")
    return 0


def _publisher(settings, args, *, listen_status: bool, client_id: str):
    """A started Publisher for the configured broker and database (None and a message when no broker is set)."""
    from backoffice.db import make_engine, upgrade
    from backoffice.publisher import Publisher
    from farebox.keys import device_master, signing_seed
    from wire.mqtt_url import parse_mqtt_url

    if not settings.mqtt_url:
        print("farebox: publishing needs a broker: set FAREBOX_MQTT_URL (e.g. "
              "mqtt://publisher:PASSWORD@127.0.0.1:1883)", file=sys.stderr)
        return None, None
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    kwargs = {"max_behind": args.max_behind} if getattr(args, "max_behind", None) is not None else {}
    publisher = Publisher(engine, parse_mqtt_url(settings.mqtt_url), seed=signing_seed(settings),
                          device_master=device_master(settings), operator=getattr(args, "operator", None),
                          client_id=client_id, listen_status=listen_status,
                          sweep_every=60.0 if listen_status else 0, **kwargs)
    return engine, publisher


def _denylist_publish(args, settings) -> int:
    import os

    _engine, publisher = _publisher(settings, args, listen_status=False, client_id=f"farebox_publish_{os.getpid()}")
    if publisher is None:
        return 2
    try:
        publisher.start()
        new = publisher.publish_denylist(wait=30)
    except (TimeoutError, ValueError) as e:
        print(f"farebox denylist publish: {e}", file=sys.stderr)
        return 1
    finally:
        publisher.stop()
    current = publisher.current
    if current is None:
        print("no deny list yet: no card has ever been listed")
        return 0
    what = "new version" if new is not None else "unchanged, announced again:"
    print(f"deny list {what} {current.version}: {current.count} card(s), {len(current.body)} bytes, "
          f"sha256 {current.checksum[:16]}…")
    c = publisher.counts
    print(f"announced to {c['announcements']} fleet(s); sent {c['deltas']} delta(s) and {c['full_lists']} full "
          f"list(s) to online devices behind; {c['bytes']} bytes in all")
    return 0


def _denylist_serve(args, settings) -> int:
    _engine, publisher = _publisher(settings, args, listen_status=True, client_id=args.client_id)
    if publisher is None:
        return 2
    if args.ready_file:
        publisher.on_ready = lambda: Path(args.ready_file).touch()
    publisher.run_forever()
    return 0


def _denylist_show(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from backoffice.db import make_engine, upgrade
    from backoffice.denylist_publish import denied_asns, versions

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    with engine.connect() as conn:
        rows = versions(conn, args.limit)
        pending = len(denied_asns(conn))
    console = Console()
    if not rows:
        console.print(f"no deny-list version yet; {pending} card(s) are lost, blocked or fraud: "
                      "farebox denylist publish")
        return 0
    table = Table(title="deny-list versions, newest first")
    for col in ("version", "created (UTC)", "cards", "bytes", "sha256 (first 16)"):
        table.add_column(col, justify="right" if col in ("version", "cards", "bytes") else "left")
    for version, created_at, count, checksum, size in rows:
        table.add_row(str(version), f"{created_at:%Y-%m-%d %H:%M:%S}", str(count), str(size), checksum[:16])
    console.print(table)
    if pending != rows[0][2]:
        console.print(f"[yellow]{pending} card(s) are denied now, version {rows[0][0]} lists {rows[0][2]}: "
                      "farebox denylist publish[/]")
    return 0


def _package_publish(args, settings) -> int:
    import os
    from datetime import UTC, datetime

    from backoffice.packages_publish import ROUTE_PREFIX, PublishError, publish
    from wire.packages import PackageError

    target = "_fleet" if args.fleet else args.device if args.device else ROUTE_PREFIX + args.route
    try:
        body = Path(args.file).read_bytes()
    except OSError as e:
        print(f"farebox package publish: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    activate_at = args.activate_at
    if activate_at is not None and activate_at.tzinfo is None:
        activate_at = activate_at.replace(tzinfo=UTC)  # an activation time without a zone is UTC, as on the wire
    engine, publisher = _publisher(settings, args, listen_status=False, client_id=f"farebox_package_{os.getpid()}")
    if publisher is None:
        return 2
    from farebox.keys import signing_seed

    try:
        publisher.start()
        with engine.begin() as conn:
            out = publish(conn, args.kind, args.operator, target, args.version, body, activate_at,
                          seed=signing_seed(settings), now=datetime.now(UTC))
        publisher.send(out, wait=30)
    except (PublishError, PackageError, TimeoutError) as e:
        print(f"farebox package publish: {e}", file=sys.stderr)
        return 1
    finally:
        publisher.stop()
    where = "retained on the fleet topic" if target == "_fleet" else f"to {len(out)} device(s)"
    print(f"{args.kind} {args.version} ({len(body)} bytes, signed) sent {where}: "
          + ", ".join(m.target for m in out[:20]) + (" …" if len(out) > 20 else ""))
    return 0


def _package_progress(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from backoffice.db import make_engine, upgrade
    from backoffice.packages_publish import PublishError, rollout

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    try:
        with engine.connect() as conn:
            r = rollout(conn, args.operator, args.kind)
    except PublishError as e:
        print(f"farebox package progress: {e}", file=sys.stderr)
        return 1
    console = Console()
    table = Table(title=f"{args.operator} {args.kind}: devices per running version (latest {r.latest or '-'})")
    table.add_column("version")
    table.add_column("devices", justify="right")
    table.add_column("share", justify="right")
    total = len(r.devices) or 1
    for version, n in sorted(r.by_version.items(), key=lambda kv: (kv[0] is None, str(kv[0]))):
        label = "never reported" if version is None else version
        if version is not None and version == r.latest:
            label = f"[green]{label}[/] (latest)"
        table.add_row(label, str(n), f"{100 * n / total:.0f}%")
    console.print(table)
    behind = r.behind
    console.print(f"{r.done} of {len(r.devices)} device(s) report the version they were sent; {len(behind)} not yet")
    if behind:
        late = Table(title="not yet on the version they were sent")
        for col in ("device", "runs", "should run", "state", "last seen (UTC)"):
            late.add_column(col)
        for d in behind[:args.limit]:
            late.add_row(d.device_id, d.running or "-", d.expected or "-",
                         "never heard" if d.last_seen is None else "online" if d.online else "offline",
                         "-" if d.last_seen is None else f"{d.last_seen:%Y-%m-%d %H:%M:%S}")
        console.print(late)
        if len(behind) > args.limit:
            console.print(f"... and {len(behind) - args.limit} more (--limit)")
    return 0


def _iso_time(text: str):
    from datetime import datetime

    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time, e.g. 2026-12-01T02:00:00+08:00") from None


def _quarantine(args, settings) -> int:
    from sqlalchemy import select

    from backoffice.db import make_engine
    from backoffice.models import Quarantine

    engine = make_engine(settings.effective_database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(Quarantine.received_at, Quarantine.device_id, Quarantine.device_seq,
                                   Quarantine.reason).order_by(Quarantine.id.desc()).limit(args.limit)).all()
    for r in rows:
        seq = "-" if r.device_seq is None else r.device_seq
        print(f"{r.received_at:%Y-%m-%d %H:%M:%S}  {r.device_id:<20} {seq:>8}  {r.reason}")
    print(f"{len(rows)} most recent quarantined record(s) shown")
    return 0


def _serve(args, settings) -> int:
    from farebox.serve import ServeOptions, serve

    web_only = args.web_only
    options = ServeOptions(host=args.host, port=args.port, ingest=not (args.no_ingest or web_only),
                           status=not (args.no_status or web_only), publisher=not (args.no_publisher or web_only),
                           scheduler=not (args.no_scheduler or web_only), web=not args.no_web,
                           operator=args.operator, ready_file=args.ready_file)
    return serve(settings, options)


def _token_add(args, settings) -> int:
    from backoffice.web.auth import TokenFileError, add_token

    path = args.file or settings.tokens_path
    try:
        token = add_token(path, role=args.role, name=args.name, operator=args.operator)
    except TokenFileError as e:
        print(f"farebox token add: {e}", file=sys.stderr)
        return 2
    print(token)
    print(f"token for {args.name} ({args.role}{', ' + args.operator if args.operator else ''}); only its SHA-256 is "
          f"kept, in {path}: this is the one time it is shown", file=sys.stderr)
    return 0


def _token_list(args, settings) -> int:
    from backoffice.web.auth import TokenFileError, TokenStore

    path = args.file or settings.tokens_path
    try:
        principals = TokenStore(path).principals()
    except TokenFileError as e:
        print(f"farebox token list: {e}", file=sys.stderr)
        return 2
    for p in principals:
        print(f"{p.name:<24} {p.role:<15} {p.operator or ''}")
    print(f"{len(principals)} token(s) in {path}")
    return 0


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = (-1.0,)
    if any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError("give fractions of the day from 0 to 1, e.g. 0.3,0.6")
    return values


def _terminal_id(text: str) -> str:
    if len(text) != 12 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError("a PSAM terminal number is 12 hex digits, e.g. 010000000042")
    return text


def _registry_engine(settings):
    from backoffice.db import make_engine, upgrade

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    return engine


def _registry_import_gtfs(args, settings) -> int:
    from backoffice.gtfs import GtfsError, import_gtfs
    from backoffice.registry import RegistryError

    engine = _registry_engine(settings)
    try:
        with engine.begin() as conn:
            report = import_gtfs(conn, operator=args.operator, folder_or_zip=args.feed, by=args.by,
                                 default_fare=args.default_fare)
    except (GtfsError, RegistryError) as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0


def _registry_names(args, settings) -> int:
    from backoffice.registry import names

    with _registry_engine(settings).connect() as conn:
        found = names(conn, args.operator, at=args.at)
    for kind, table in found.items():
        for key, name in sorted(table.items()):
            print(f"{kind:8} {key:16} {name}")
    return 0


def _registry_fare_table(args, settings) -> int:
    import json

    from backoffice.registry import RegistryError, fare_table

    try:
        with _registry_engine(settings).connect() as conn:
            doc = fare_table(conn, args.operator, args.version, at=args.at)
    except RegistryError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, ensure_ascii=False, indent=2))
    return 0


def _registry_audit(args, settings) -> int:
    from backoffice.registry import audit_lines

    with _registry_engine(settings).connect() as conn:
        lines = audit_lines(conn, operator=args.operator, kind=args.kind, key=args.key)
    for a in lines:
        print(f"{a['recorded_at']:%Y-%m-%d %H:%M:%S}Z  {a['by']:12} {a['action']:7} {a['kind']:8} {a['key']:16} "
              f"{a['detail']}  (from {a['effective_at']:%Y-%m-%d %H:%M}Z)")
    return 0


# ------------------------------------------------------------------------------------------------ registry writes
# kind -> (key option, key argument of the use cases); the add / edit / retire commands are made in a loop so that
# every kind takes the same shape: farebox registry add-<kind> | edit-<kind> | retire-<kind>.
_REGISTRY_KINDS = {"route": ("code", "code"), "vehicle": ("code", "code"), "driver": ("staff-no", "staff_no"),
                   "device": ("device-id", "device_id")}


def _stage_list(text: str):
    """'10:200,20:300' -> [(10, 200), (20, 300)]: up to that many stops, the fare in fen."""
    try:
        return [(int(u), int(f)) for u, f in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are 'up to stops:fare fen,...', e.g. 10:200,20:300") \
            from None


def _stop_lists(args):
    lists = {d: getattr(args, f"stops{d}").split() for d in (0, 1) if getattr(args, f"stops{d}", None)}
    return lists or None


def _registry_write(args, settings) -> int:
    from sqlalchemy.exc import IntegrityError

    from backoffice import registry

    kind, action = args.kind, args.write
    key = getattr(args, _REGISTRY_KINDS[kind][1])
    keyarg = {_REGISTRY_KINDS[kind][1]: key}
    when = {"by": args.by, "at": args.at}
    engine = _registry_engine(settings)
    try:
        with engine.begin() as conn:
            if action == "retire":
                getattr(registry, f"retire_{kind}")(conn, **keyarg, **when, reason=args.reason)
                changed = True
            elif kind == "route":
                fields = {"name": args.name, "flat_fare": args.fare, "stages": args.stages, "stops": _stop_lists(args)}
                if action == "add":
                    registry.add_route(conn, **keyarg, operator=args.operator, **fields, **when)
                    changed = True
                else:
                    changed = registry.edit_route(conn, **keyarg, **fields, **when)
            elif kind == "vehicle":
                if action == "add":
                    registry.add_vehicle(conn, **keyarg, operator=args.operator, plate=args.plate, **when)
                    changed = True
                else:
                    changed = registry.edit_vehicle(conn, **keyarg, plate=args.plate, **when)
                if args.fleet:
                    if args.fleet_from is None:
                        print("farebox: give --fleet-from (the first service day in the fleet) with --fleet",
                              file=sys.stderr)
                        raise _Abort
                    registry.assign_fleet(conn, vehicle=key, fleet=args.fleet, valid_from=args.fleet_from,
                                          by=args.by)
                    changed = True
            elif kind == "driver":
                if action == "add":
                    registry.add_driver(conn, **keyarg, operator=args.operator, name=args.name,
                                        card_asn=args.card_asn, **when)
                    changed = True
                else:
                    changed = registry.edit_driver(conn, **keyarg, name=args.name, card_asn=args.card_asn, **when)
            elif action == "add":
                registry.add_device(conn, **keyarg, operator=args.operator, vehicle=args.vehicle,
                                    terminal_id=args.terminal_id, **when)
                changed = True
            else:
                changed = False
                if args.vehicle or args.no_vehicle:
                    changed = registry.move_device(conn, **keyarg, vehicle=None if args.no_vehicle else args.vehicle,
                                                   **when)
                if args.terminal_id:
                    changed = registry.edit_device(conn, **keyarg, terminal_id=args.terminal_id, **when) or changed
    except _Abort:
        return 2
    except registry.RegistryError as e:
        print(f"farebox: {e}", file=sys.stderr)
        return 2
    except IntegrityError:
        print(f"farebox: {kind} {key!r}: refused by the database: the code is taken already or names something "
              "that is not registered", file=sys.stderr)
        return 2
    verb = {"add": "added", "edit": "changed" if changed else "unchanged (nothing differs)", "retire": "retired"}
    print(f"{kind} {key} {verb[action]}")
    return 0


class _Abort(Exception):
    """A command refused before it changed anything (the message is printed already)."""


def _add_registry_writes(reg) -> None:
    from datetime import date

    for kind, (option, dest) in _REGISTRY_KINDS.items():
        for action in ("add", "edit", "retire"):
            p = reg.add_parser(f"{action}-{kind}", help=f"{action} a {kind} (history kept, an audit line signed --by)")
            p.set_defaults(func=_registry_write, kind=kind, write=action)
            p.add_argument(f"--{option}", dest=dest, required=True)
            p.add_argument("--by", required=True, help="who makes the change, for the audit line")
            p.add_argument("--at", type=_iso_time, default=None, help="effective from, ISO time with zone "
                                                                        "(default now)")
            if action == "retire":
                p.add_argument("--reason", default="")
                continue
            adding = action == "add"
            if adding:
                p.add_argument("--operator", required=True)
            if kind == "route":
                p.add_argument("--name", required=adding)
                fare = p.add_mutually_exclusive_group()
                fare.add_argument("--fare", type=int, default=None, help="flat fare in fen")
                fare.add_argument("--stages", type=_stage_list, default=None,
                                  help="distance fares 'up to stops:fen,...', e.g. 10:200,20:300")
                p.add_argument("--stops0", default=None, help="stop codes outbound, in order, space separated")
                p.add_argument("--stops1", default=None, help="stop codes inbound")
            elif kind == "vehicle":
                p.add_argument("--plate", required=adding)
                p.add_argument("--fleet", default=None, help="put it in this fleet from --fleet-from")
                p.add_argument("--fleet-from", type=date.fromisoformat, default=None, help="service day YYYY-MM-DD")
            elif kind == "driver":
                p.add_argument("--name", required=adding)
                p.add_argument("--card-asn", default=None, required=adding, help="the driver card's ASN (20 hex)")
            else:
                p.add_argument("--terminal-id", type=_terminal_id, required=adding, default=None)
                p.add_argument("--vehicle", default=None, help="the vehicle it is mounted in")
                if not adding:
                    p.add_argument("--no-vehicle", action="store_true", help="taken out of its vehicle")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farebox", description="An open bus smartcard system.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="one service day of a simulated city, from card to settlement PDF")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--day", type=date.fromisoformat, default=None, help="service day (default: yesterday)")
    p.add_argument("--riders", type=int, default=200)
    p.add_argument("--kill-ingest-at", type=_fractions, default=(),
                   help="fractions of the day (e.g. 0.3,0.6) at which ingest is killed with SIGKILL and restarted")
    p.set_defaults(func=_demo)

    p = sub.add_parser("ingest", help="store validators' tap batches from the broker (FAREBOX_MQTT_URL)")
    p.add_argument("--client-id", default="farebox_ingest", help="MQTT client id (the persistent session's name)")
    p.add_argument("--operator", default=None, help="only this operator's buses (default: every operator's)")
    p.add_argument("--ready-file", default=None, help="touch this file once subscribed")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes sharing the load through a shared subscription (client ids "
                        "<client-id>_0 .. _N-1; needs Mosquitto or a cluster broker, not the embedded amqtt)")
    p.add_argument("--share-group", default=None, metavar="NAME",
                   help="subscribe as a member of this $share group, so ingest on several machines splits the "
                        "batches (default with --workers > 1: ingest)")
    p.add_argument("--accept-unsigned", action="store_true",
                   help="also store unsigned v1 JSON batches, from validators not yet upgraded (migration window); "
                        "without it they are quarantined and not acknowledged")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=_db_upgrade)

    p = sub.add_parser("device", help="validators")
    device = p.add_subparsers(dest="action", required=True)
    p = device.add_parser("add", help="register a validator so ingest accepts its taps")
    p.add_argument("--device-id", required=True)
    p.add_argument("--operator", required=True)
    p.add_argument("--terminal-id", required=True, type=_terminal_id, help="its PSAM's terminal number (hex)")
    p.add_argument("--vehicle", default=None)
    p.set_defaults(func=_device_add)
    p = device.add_parser("monitor", help="keep device_status from every validator's birth, heartbeat and last will "
                                          "(FAREBOX_MQTT_URL, as the broker user `status`)")
    p.add_argument("--client-id", default="farebox_status", help="MQTT client id (the persistent session's name)")
    p.add_argument("--operator", default=None, help="only this operator's buses (default: every operator's)")
    p.add_argument("--ready-file", default=None, help="touch this file once subscribed")
    p.set_defaults(func=_device_monitor)

    p = sub.add_parser("devices", help="the fleet: last seen, versions, backlog, alarms; stale devices flagged")
    p.add_argument("--operator", default=None, help="only this operator's validators")
    p.add_argument("--stale-after", type=float, default=5.0, metavar="MINUTES",
                   help="flag a validator silent for longer than this (default 5 minutes)")
    p.set_defaults(func=_devices)

    p = sub.add_parser("broker", help="the Mosquitto broker's files")
    broker = p.add_subparsers(dest="action", required=True)
    p = broker.add_parser("config", help="write passwd, acl and mosquitto.conf for every registered validator")
    p.add_argument("--out", type=Path, required=True, help="folder for the three files")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--bind", default=None, help="listen on this address only (default: every address)")
    p.add_argument("--persistence-dir", type=Path, default=None, help="Mosquitto's database (default: OUT/data)")
    p.add_argument("--run-as", default=None, metavar="USER",
                   help="the user Mosquitto switches to when started as root (default: mosquitto)")
    p.set_defaults(func=_broker_config)

    p = sub.add_parser("quarantine", help="what ingest could not accept, newest first, with the reason")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_quarantine)

    p = sub.add_parser("denylist", help="deny lists: build versions from lost, blocked and fraud cards; send them")
    denylist = p.add_subparsers(dest="action", required=True)
    p = denylist.add_parser("publish", help="build a new version if cards changed, announce it to every fleet, "
                                            "send deltas to online validators behind (FAREBOX_MQTT_URL)")
    p.add_argument("--operator", default=None, help="only this operator's fleet (default: every operator's)")
    p.add_argument("--max-behind", type=int, default=None, help="versions behind beyond which a bus gets the "
                                                                "full list (default 50)")
    p.set_defaults(func=_denylist_publish)
    p = denylist.add_parser("show", help="the stored versions, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_denylist_show)
    p = denylist.add_parser("serve", help="keep answering validators that report an old deny list (and re-send "
                                          "their own packages), until stopped")
    p.add_argument("--operator", default=None)
    p.add_argument("--max-behind", type=int, default=None)
    p.add_argument("--client-id", default="farebox_publisher")
    p.add_argument("--ready-file", default=None, help="touch this file once subscribed")
    p.set_defaults(func=_denylist_serve)

    p = sub.add_parser("package", help="parameter and software packages for a fleet, a route or a validator")
    package = p.add_subparsers(dest="action", required=True)
    p = package.add_parser("publish", help="sign, store and send a package (FAREBOX_MQTT_URL)")
    p.add_argument("--kind", required=True, choices=["params", "software"])
    p.add_argument("--operator", required=True)
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--fleet", action="store_true", help="the operator's whole fleet (retained)")
    to.add_argument("--device", help="one validator")
    to.add_argument("--route", help="every validator on this route")
    p.add_argument("--version", required=True, help="params: a number above the last; software: e.g. 2.4.1")
    p.add_argument("--file", required=True, help="the body: params JSON ({\"fares\": ..., \"route\": ...}) "
                                                 "or the software tarball")
    p.add_argument("--activate-at", type=_iso_time, default=None,
                   help="ISO time from which buses apply it (default now; without a zone: UTC)")
    p.set_defaults(func=_package_publish)
    p = package.add_parser("progress", help="how many validators run which version")
    p.add_argument("--operator", required=True)
    p.add_argument("--kind", required=True, choices=["params", "software", "denylist"])
    p.add_argument("--limit", type=int, default=50, help="devices listed as not yet updated")
    p.set_defaults(func=_package_progress)

    p = sub.add_parser("serve", help="the back office in one process: API and web pages, and (embedded default) "
                                     "ingest, the status consumer, the deny-list publisher and the scheduler")
    p.add_argument("--host", default="127.0.0.1", help="address the pages and API listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--web-only", action="store_true", help="only the API and pages")
    p.add_argument("--no-web", action="store_true", help="no API and pages (the MQTT parts and scheduler only)")
    p.add_argument("--no-ingest", action="store_true", help="no ingest (run it alone: farebox ingest)")
    p.add_argument("--no-status", action="store_true", help="no status consumer (alone: farebox device monitor)")
    p.add_argument("--no-publisher", action="store_true", help="no deny-list publisher (alone: farebox denylist serve)")
    p.add_argument("--no-scheduler", action="store_true", help="no scheduled jobs")
    p.add_argument("--operator", default=None, help="MQTT parts: only this operator's buses")
    p.add_argument("--ready-file", type=Path, default=None, help="touch this file once every part is up")
    p.set_defaults(func=_serve)

    p = sub.add_parser("token", help="API and web-page tokens (kept hashed in the token file: setting "
                                     "api_tokens_file or FAREBOX_API_TOKENS, default var/api-tokens.toml)")
    token = p.add_subparsers(dest="action", required=True)
    p = token.add_parser("add", help="make a token, print it once, keep its SHA-256")
    p.add_argument("--role", required=True, choices=["clerk", "operator_staff", "operations", "admin"])
    p.add_argument("--name", required=True, help="who holds it")
    p.add_argument("--operator", default=None, help="a clerk's bus company (clerks only)")
    p.add_argument("--file", type=Path, default=None, help="the token file (default: the api_tokens_file setting)")
    p.set_defaults(func=_token_add)
    p = token.add_parser("list", help="names, roles and operators of the tokens")
    p.add_argument("--file", type=Path, default=None)
    p.set_defaults(func=_token_list)

    p = sub.add_parser("registry", help="operators, routes, vehicles, drivers, validators: GTFS import, names, "
                                        "fare tables, audit")
    reg = p.add_subparsers(dest="action", required=True)
    p = reg.add_parser("import-gtfs", help="create or update routes and stops from a GTFS folder or zip "
                                           "(all or nothing)")
    p.add_argument("--operator", required=True)
    p.add_argument("feed", type=Path, help="a GTFS folder or .zip (routes, stops, trips, stop_times)")
    p.add_argument("--by", default="gtfs import", help="who imports, for the audit lines")
    p.add_argument("--default-fare", type=int, default=None, help="flat fare in fen for new routes (default: none; "
                                                                  "they stay out of the fare table until set)")
    p.set_defaults(func=_registry_import_gtfs)
    p = reg.add_parser("names", help="route names, vehicle plates, driver names (as they were at --at)")
    p.add_argument("--operator", required=True)
    p.add_argument("--at", type=_iso_time, default=None, help="ISO time with zone (default now)")
    p.set_defaults(func=_registry_names)
    p = reg.add_parser("fare-table", help="the operator's fare table (JSON parameter file) from the registry")
    p.add_argument("--operator", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--at", type=_iso_time, default=None, help="ISO time with zone (default now)")
    p.set_defaults(func=_registry_fare_table)
    p = reg.add_parser("audit", help="who changed what in the registry, and when")
    p.add_argument("--operator", required=True)
    p.add_argument("--kind", default=None, choices=["operator", "route", "vehicle", "driver", "device", "fleet",
                                                    "stop"])
    p.add_argument("--key", default=None)
    p.set_defaults(func=_registry_audit)
    _add_registry_writes(reg)

    p = sub.add_parser("settle", help="clear a service day (stored run, commission, net) and write its PDF, CSV "
                                      "and XLSX; or a month's report from the stored runs")
    p.add_argument("--operator", required=True)
    p.add_argument("--day", type=date.fromisoformat, default=None, help="service day YYYY-MM-DD")
    p.add_argument("--month", type=_year_month, default=None, help="YYYY-MM: the month's report")
    p.add_argument("--out", type=Path, default=Path("var/reports"))
    p.set_defaults(func=_settle)

    p = sub.add_parser("jobs", help="scheduled jobs (stored in the database): list them, run one now, or run the "
                                    "scheduler alone")
    jobs_sub = p.add_subparsers(dest="action", required=True)
    p = jobs_sub.add_parser("list", help="the stored jobs with their next run, and each operator's last cleared day")
    p.set_defaults(func=_jobs_list)
    p = jobs_sub.add_parser("run", help="run a job now, in this process")
    p.add_argument("job", choices=["clearing"])
    p.add_argument("--operator", required=True)
    p.add_argument("--day", type=date.fromisoformat, default=None,
                   help="service day (default: the last one that has ended, and any skipped before it)")
    p.add_argument("--out", type=Path, default=None, help="reports folder (default <var_dir>/reports)")
    p.set_defaults(func=_jobs_run)
    p = jobs_sub.add_parser("serve", help="the scheduler alone, until SIGTERM / SIGINT")
    p.add_argument("--ready-file", type=Path, default=None, help="touched once the scheduler runs")
    p.set_defaults(func=_jobs_serve)

    from farebox.cards_cmd import add_parser as add_cards_parser
    from farebox.simcard import add_parser as add_sim_parser
    from farebox.validator_cmd import add_parser as add_validator_parser

    add_sim_parser(sub)
    add_validator_parser(sub)
    add_cards_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_log = logging.StreamHandler()
    # The level sits on the handler, so a command may log more to its own files than to the console.
    console_log.setLevel(logging.INFO if args.verbose or args.command in ("ingest", "validator", "serve") else logging.WARNING)
    console_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=console_log.level, handlers=[console_log])
    try:
        settings = load_settings()
    except (OSError, ValueError) as e:
        print(f"farebox: bad configuration: {e}", file=sys.stderr)
        return 2
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())

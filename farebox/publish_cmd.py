"""``farebox denylist publish|show|serve`` and ``farebox package publish|progress``: what the back office sends
down to the buses. Registered in farebox/cli.py by ``register(sub)``."""

from __future__ import annotations

import sys
from pathlib import Path

from farebox import bootstrap
from farebox.cli_types import iso_time


def register(sub) -> None:
    p = sub.add_parser("denylist", help="deny lists: build versions from lost, blocked and fraud cards and "
                                                 "withdrawn driver cards; send them")
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
    p.add_argument("--activate-at", type=iso_time, default=None,
                   help="ISO time from which buses apply it (default now; without a zone: UTC)")
    p.set_defaults(func=_package_publish)
    p = package.add_parser("progress", help="how many validators run which version")
    p.add_argument("--operator", required=True)
    p.add_argument("--kind", required=True, choices=["params", "software", "denylist"])
    p.add_argument("--limit", type=int, default=50, help="devices listed as not yet updated")
    p.set_defaults(func=_package_progress)


def _publisher(settings, args, *, listen_status: bool, client_id: str):
    """The composition root and a Publisher for the configured broker and database (None and a message when no
    broker is set)."""
    from backoffice.publisher import Publisher

    if not settings.mqtt_url:
        print("farebox: publishing needs a broker: set FAREBOX_MQTT_URL (e.g. "
              "mqtt://publisher:PASSWORD@127.0.0.1:1883)", file=sys.stderr)
        return None, None
    root = bootstrap.start(settings, "signing", "device_master")
    kwargs = {"max_behind": args.max_behind} if getattr(args, "max_behind", None) is not None else {}
    publisher = Publisher(root.engine(), root.broker_target(), seed=root.signing_seed,
                          device_master=root.device_master, operator=getattr(args, "operator", None),
                          client_id=client_id, listen_status=listen_status,
                          sweep_every=60.0 if listen_status else 0,
                          rebuild_every=settings.denylist_rebuild_seconds if listen_status else 0, **kwargs)
    return root, publisher


def _denylist_publish(args, settings) -> int:
    import os

    if not settings.mqtt_url:
        return _denylist_store_only(settings)
    _root, publisher = _publisher(settings, args, listen_status=False, client_id=f"farebox_publish_{os.getpid()}")
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


def _denylist_store_only(settings) -> int:
    """No broker configured (the embedded default, e.g. after `farebox demo`): build and store the new version, and
    say who sends it. Refusing, as before, left a lost card off the list until someone found a broker URL."""
    from datetime import UTC, datetime

    from backoffice.denylist_publish import build_version, current_version

    engine = bootstrap.start(settings).engine()
    with engine.begin() as conn:
        new = build_version(conn, datetime.now(UTC))
        current = new or current_version(conn)
    if current is None:
        print("no deny list yet: no card has ever been listed")
        return 0
    what = "new version" if new is not None else "unchanged: version"
    print(f"deny list {what} {current.version}: {current.count} card(s), {len(current.body)} bytes, "
          f"sha256 {current.checksum[:16]}…, stored")
    print("not sent: no broker is configured (FAREBOX_MQTT_URL). `farebox serve` (its publisher) or `farebox "
          "denylist serve` sends it to each bus that reports an older version; give FAREBOX_MQTT_URL to send it now")
    return 0


def _denylist_serve(args, settings) -> int:
    _root, publisher = _publisher(settings, args, listen_status=True, client_id=args.client_id)
    if publisher is None:
        return 2
    if args.ready_file:
        publisher.on_ready = lambda: Path(args.ready_file).touch()
    publisher.run_forever()
    return 0


def _denylist_show(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from backoffice.denylist_publish import denied_asns, versions

    engine = bootstrap.start(settings).read_engine()  # reading only: never migrates
    with engine.connect() as conn:
        rows = versions(conn, args.limit)
        pending = len(denied_asns(conn))
    console = Console()
    if not rows:
        console.print(f"no deny-list version yet; {pending} card(s) are denied (lost, blocked, fraud, "
                      "withdrawn driver cards): "
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
    root, publisher = _publisher(settings, args, listen_status=False, client_id=f"farebox_package_{os.getpid()}")
    if publisher is None:
        return 2
    try:
        publisher.start()
        with root.engine().begin() as conn:
            out = publish(conn, args.kind, args.operator, target, args.version, body, activate_at,
                          seed=root.signing_seed, now=datetime.now(UTC), ticket_keys=lambda: root.ticket_keys)
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

    from backoffice.packages_publish import PublishError, rollout

    engine = bootstrap.start(settings).read_engine()  # reading only: never migrates
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

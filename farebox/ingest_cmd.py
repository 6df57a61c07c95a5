"""``farebox ingest`` (store validators' tap batches from the broker) and, from farebox/quarantine_cmd.py,
``farebox quarantine`` (what ingest could not accept, and its review). Registered in farebox/cli.py by
``register(sub)``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from farebox import bootstrap
from farebox import keys as farebox_keys


def register(sub) -> None:
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
    p.add_argument("--engine", choices=("mqtt", "nats"), default="mqtt",
                   help="mqtt (default): subscribe on the broker of FAREBOX_MQTT_URL (Mosquitto); nats: pull from "
                        "the durable JetStream work queue of a NATS cluster (farebox broker config --engine nats)")
    p.add_argument("--nats", action="append", default=None, metavar="URLS",
                   help="with --engine nats: the cluster's NATS URLs, comma-separated or repeated (nats://host:4222;"
                        " without user:password@ the back office's `ingest` login is used)")
    p.add_argument("--durable", default="ingest",
                   help="with --engine nats: the durable consumer's name (every worker of one ingest shares it)")
    p.set_defaults(func=_ingest)

    from farebox import quarantine_cmd

    quarantine_cmd.register(sub)  # quarantine: list, show, release, reject (its own module)


def _ingest(args, settings) -> int:
    from backoffice.ingest_consumer import IngestConsumer, IngestPool, WorkerSpec, worker_client_ids

    if args.engine == "nats":
        return _ingest_nats(args, settings)
    if not settings.mqtt_url:
        print("farebox ingest needs a broker: set FAREBOX_MQTT_URL (e.g. mqtt://127.0.0.1:1883)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("farebox ingest: --workers must be at least 1", file=sys.stderr)
        return 2
    # Several workers split the batches only through a shared subscription; without one each would get them all.
    group = args.share_group or ("ingest" if args.workers > 1 else None)
    root = bootstrap.start(settings, "issuer", "device_master")
    engine = root.engine()
    target, keys, master = root.broker_target(), root.key_service, root.device_master
    if args.workers == 1:
        consumer = IngestConsumer(engine, target, keys=keys, master=master, client_id=args.client_id,
                                  operator=args.operator, share_group=group, accept_unsigned=args.accept_unsigned)
        if args.ready_file:
            consumer.on_ready = lambda: Path(args.ready_file).touch()
        consumer.run_forever()
        return 0
    engine.dispose()
    # Each worker opens the key service itself (the key file, unlocked from its own environment): no key is sent.
    opener = functools.partial(farebox_keys.key_service, settings)
    specs = [WorkerSpec(settings.effective_database_url, target, opener, master, client_id, operator=args.operator,
                        share_group=group, accept_unsigned=args.accept_unsigned)
             for client_id in worker_client_ids(args.client_id, args.workers)]
    IngestPool(specs, ready_file=args.ready_file).run_forever()
    return 0


def _ingest_nats(args, settings) -> int:
    """Workers on the durable JetStream consumer (backoffice.ingest_jetstream)."""
    import os

    from backoffice.devices import service_password
    from backoffice.ingest_jetstream import (JetStreamIngest, JetStreamWorkerSpec, nats_urls, run_forever,
                                             run_pool)

    if not args.nats:
        print("farebox ingest --engine nats needs --nats nats://host:4222[,nats://host2:4222...]", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("farebox ingest: --workers must be at least 1", file=sys.stderr)
        return 2
    root = bootstrap.start(settings, "issuer", "device_master")
    master = root.device_master
    try:
        servers = nats_urls(args.nats, user="ingest", password=service_password(master, "ingest"))
    except ValueError as e:
        print(f"farebox ingest: {e}", file=sys.stderr)
        return 2
    if args.workers == 1:
        worker = JetStreamIngest(root.engine(), servers, keys=root.key_service, master=master,
                                 name=f"{args.client_id}_{os.getpid()}", operator=args.operator,
                                 accept_unsigned=args.accept_unsigned, durable=args.durable)
        if args.ready_file:
            worker.on_ready = lambda: Path(args.ready_file).touch()
        run_forever(worker)
        return 0
    opener = functools.partial(farebox_keys.key_service, settings)
    specs = [JetStreamWorkerSpec(settings.effective_database_url, tuple(servers), opener, master,
                                 f"{args.client_id}_{i}", operator=args.operator,
                                 accept_unsigned=args.accept_unsigned, durable=args.durable)
             for i in range(args.workers)]
    run_pool(specs, ready_file=args.ready_file)
    return 0

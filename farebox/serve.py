"""``farebox serve``: the back office in one process for the embedded default. The API and pages (uvicorn in the
main thread) and, each in its own threads, ingest, the status consumer, the deny-list publisher and the scheduler.

Each part can be turned off (``--no-ingest`` ...) and runs alone with its own command (``farebox ingest``,
``farebox device monitor``, ``farebox denylist serve``; the web alone is ``farebox serve --web-only``). With no
``FAREBOX_MQTT_URL`` the embedded amqtt broker is started under ``<var_dir>/broker``, as the demo does. With a URL,
the three MQTT parts log in with the same user: in production run them as separate commands, each with its own
broker user (ingest, status, publisher; see ``farebox broker config``).

Before any part starts, the secrets the parts that run will use are loaded and checked once (farebox.bootstrap):
a published test key stops ``farebox serve`` with the settings to give, unless ``--insecure-test-keys``.

Scheduled jobs: a module that has a nightly job registers a function with ``scheduled_job``; ``farebox serve`` calls
each with the APScheduler BackgroundScheduler and the app's Services before starting the scheduler::

    @scheduled_job
    def nightly_clearing(scheduler, services):
        scheduler.add_job(run_clearing, "cron", hour=4, kwargs={"engine": services.engine}, id="clearing")

(the job store in the database, missed-run catch-up and no double run belong to that work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SCHEDULED_JOBS: list[Callable] = []


def scheduled_job(register: Callable) -> Callable:
    """Register ``register(scheduler, services)``, called once when ``farebox serve`` starts its scheduler."""
    SCHEDULED_JOBS.append(register)
    return register


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    web: bool = True
    ingest: bool = True
    status: bool = True
    publisher: bool = True
    scheduler: bool = True
    operator: str | None = None  # MQTT parts: one operator's buses only
    ready_file: Path | None = None  # touched once every part that runs is up


def secrets_needed(options: ServeOptions) -> list[str]:
    """The secrets (farebox.keys.SECRETS) the parts that run use: all are checked before any part starts."""
    from farebox.keys import SECRETS

    needs = {"issuer", "payment"} if options.web else set()  # the over-the-air top-up host and its webhooks
    if options.web:
        needs |= {"ticket", "pickup"}  # the web shop and partner API issue tickets; the counter checks pickup codes
    if options.web:
        needs.add("device_master")  # quarantine release puts records through ingest again (MAC'd per device)
    if options.ingest:
        needs |= {"issuer", "device_master"}
    if options.status:
        needs.add("device_master")
    if options.publisher:
        needs |= {"signing", "device_master"}
    return [kind for kind in SECRETS if kind in needs]


def serve(settings, options: ServeOptions) -> int:
    from backoffice.web.app import create_app, web_options
    from farebox import bootstrap

    root = bootstrap.start(settings, *secrets_needed(options))  # refuses published test keys before anything
    engine = root.engine()
    tokens = settings.tokens_path
    app = create_app(engine, tokens=tokens, migrate=False, **web_options(settings))
    if options.web:
        _configure_ota(app, root)
        _configure_quarantine(app, root, accept_unsigned=False)
    if options.web and not tokens.exists():
        log.warning("serve: no token file at %s yet: nobody can log in until `farebox token add` makes one", tokens)
    stops: list[tuple[str, Callable[[], None]]] = []
    try:
        _start_mqtt_parts(root, options, engine, stops)
        if options.scheduler:
            _start_scheduler(app.state.services, settings, stops,
                             sms_channel=getattr(app.state, "sms_channel", None) if options.web else None)
        if not options.web:
            _ready(options)
            _wait_for_signal()
            return 0
        return _run_web(app, options)
    finally:
        for name, stop in reversed(stops):
            try:
                stop()
            except Exception:  # stopping the others matters more than this one's error
                log.exception("serve: stopping %s failed", name)


def _configure_ota(app, root) -> None:
    """The over-the-air top-up host: the issuer's key service and the payment platform's webhook key."""
    from backoffice.web.api.ota import configure_ota

    configure_ota(app, keys=root.key_service, webhook_key=root.payment_public_key)
    from backoffice.payments.platform import configure as configure_payments

    configure_payments(app, root.payment_public_key)  # the platform adapter when FAREBOX_PAYMENT_URL is set
    _configure_sms_and_shop(app, root)


def _configure_sms_and_shop(app, root) -> None:
    """One SMS gateway from the settings (``sms_url``, ``sms_account``, ``sms_secret``: TOML or FAREBOX_SMS_*)
    for the SMS dialogue (its inbound webhook and answers) and the web shop's one-time codes; both get the ticket
    keys and the payment platform ``configure_payments`` made. The dialogue is swept by serve's scheduler
    (farebox.sms_cmd), not by a thread of its own."""
    import os

    from backoffice.payments.platform import NOTIFY_URL_ENV
    from backoffice.sms.gateway import configure_sms, gateway_from_settings, secret_from_settings
    from backoffice.web.api.sms import configure_sms_channel
    from backoffice.web.shop_service import configure_shop

    settings = root.settings
    gateway, secret = gateway_from_settings(settings), secret_from_settings(settings)
    configure_sms(app, gateway=gateway, secret=secret)
    platform = app.state.payment_platform
    notify_url = os.environ.get(NOTIFY_URL_ENV, "").strip()
    configure_shop(app, ticket_keys=root.ticket_keys, platform=platform, notify_url=notify_url,
                   otp_sender=gateway)  # web shop, partner API
    configure_sms_channel(app, gateway=gateway, secret=secret, ticket_keys=root.ticket_keys, platform=platform,
                          notify_url=notify_url, sweep_every=None)
    log.info("serve: SMS gateway %s (dialogue and shop codes)", gateway.__class__.__name__)


def _configure_quarantine(app, root, *, accept_unsigned: bool) -> None:
    """Quarantine release: records go through an ingest configured as the one serve runs."""
    from backoffice.ingest import Ingest
    from backoffice.web.api.quarantine import configure_quarantine

    configure_quarantine(app, ingest=Ingest(keys=root.key_service, master=root.device_master,
                                            accept_unsigned=accept_unsigned, write="insert"))


def _start_mqtt_parts(root, options: ServeOptions, engine, stops: list) -> None:
    if not (options.ingest or options.status or options.publisher):
        return
    from backoffice.ingest_consumer import IngestConsumer
    from backoffice.publisher import Publisher
    from backoffice.status_consumer import StatusConsumer
    from wire.mqtt_url import parse_mqtt_url

    settings = root.settings
    url = settings.mqtt_url
    if url is None:
        from farebox.broker import EmbeddedBroker

        broker = EmbeddedBroker(Path(settings.var_dir) / "broker")
        url = broker.start()
        stops.append(("broker", broker.stop))
        log.info("serve: embedded broker on %s", parse_mqtt_url(url).url(with_password=False))
    target, master = parse_mqtt_url(url), root.device_master
    if options.ingest:
        ingest = IngestConsumer(engine, target, keys=root.key_service, master=master,
                                client_id="farebox_ingest", operator=options.operator)
        ingest.start()
        stops.append(("ingest", ingest.stop))
        if not ingest.wait_subscribed(30):
            raise RuntimeError(f"ingest did not subscribe on {target.url(with_password=False)} within 30 s")
    if options.status:
        status = StatusConsumer(engine, target, master=master, client_id="farebox_status",
                                operator=options.operator)
        status.start()
        stops.append(("status", status.stop))
        if not status.wait_subscribed(30):
            raise RuntimeError(f"the status consumer did not subscribe on {target.url(with_password=False)}")
    if options.publisher:
        publisher = Publisher(engine, target, seed=root.signing_seed, device_master=master,
                              operator=options.operator, client_id="farebox_publisher", listen_status=True,
                              rebuild_every=settings.denylist_rebuild_seconds)
        publisher.start(timeout=30)
        stops.append(("publisher", publisher.stop))


def _start_scheduler(services, settings, stops: list, *, sms_channel=None) -> None:
    from backoffice.scheduler import start_scheduler, stop_scheduler

    # The nightly clearing jobs live in the database's job store (backoffice.scheduler); jobs registered here
    # must use jobstore="memory" unless they are module-level functions with picklable arguments.
    scheduler = start_scheduler(services.engine, settings)
    for register in SCHEDULED_JOBS:
        register(scheduler, services)
    if sms_channel is not None and scheduler.get_job("sms-sweep", jobstore="memory") is not None:
        # the sweep texts through the web app's own SMS channel: one gateway for webhook answers, sweep and shop
        scheduler.modify_job("sms-sweep", jobstore="memory", args=(sms_channel,))
    stops.append(("scheduler", lambda: stop_scheduler(scheduler, wait=False)))
    log.info("serve: scheduler started with %d job(s)", len(scheduler.get_jobs()))


def _run_web(app, options: ServeOptions) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # As uvicorn: SIGINT / SIGTERM end the server gracefully. Unlike uvicorn, the signal is not raised again
            # afterwards: that would kill the process before ingest has stored what it holds and the broker stopped.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server = Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                                           access_log=False))

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            log.info("serve: pages and API on http://%s:%d/ (OpenAPI /docs)", options.host, options.port)
            _ready(options)

    threading.Thread(target=announce, name="serve-ready", daemon=True).start()
    server.run()  # until SIGINT / SIGTERM (uvicorn handles both)
    return 0 if server.started else 1


def _ready(options: ServeOptions) -> None:
    if options.ready_file is not None:
        Path(options.ready_file).touch()


def _wait_for_signal() -> None:
    from backoffice.signals import stop_requested

    stop_requested().wait()

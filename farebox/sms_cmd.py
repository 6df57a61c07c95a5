"""``farebox sms``: the SMS channel (backoffice.sms) from the command line, and its job in ``farebox serve``.

- ``farebox sms send PHONE TEXT``: one text through the configured gateway (``FAREBOX_SMS_URL``, account, secret):
  checks the gateway works.
- ``farebox sms log [--phone P] [--limit N]``: the texts in and out, newest first (what the rider was told; did the
  pickup code go out).

``farebox serve`` sweeps the dialogue every few seconds (``sms_sweep_job``): pickup codes after payments land,
lapsed quotes give their seats back, texts the gateway could not take are sent again.
"""

from __future__ import annotations

from farebox.serve import scheduled_job

SWEEP_SECONDS = 5


@scheduled_job
def sms_sweep_job(scheduler, services) -> None:
    """``farebox serve``: backoffice.sms.dialogue.sweep every SWEEP_SECONDS with the configured gateway, ticket keys
    and payment platform (in memory: it holds the engine)."""
    import logging
    import os

    from backoffice.payments.platform import NOTIFY_URL_ENV, platform_from_env
    from backoffice.sms.dialogue import Channel, sweep
    from backoffice.sms.gateway import gateway_from_settings
    from backoffice.tickets.keys import TicketKeysRefused, ticket_keys

    from farebox import bootstrap
    from farebox.config import load_settings

    log = logging.getLogger(__name__)
    settings = load_settings()
    try:
        keys = ticket_keys(settings)
        platform = platform_from_env(bootstrap.start(settings, "payment", announce=False).payment_public_key)
        gateway = gateway_from_settings(settings)
    except (TicketKeysRefused, bootstrap.StartRefused, ValueError) as e:
        log.error("sms: the SMS channel's settings are refused (%s): no pickup codes are texted", e)
        return
    ch = Channel(services.engine, gateway, ticket_keys=keys, platform=platform,
                 notify_url=os.environ.get(NOTIFY_URL_ENV, ""), clock=services.clock)
    scheduler.add_job(sweep, "interval", seconds=SWEEP_SECONDS, args=(ch,), id="sms-sweep", jobstore="memory",
                      replace_existing=True, name="SMS dialogue: pickup codes, lapsed quotes, texts to resend")


def register(sub) -> None:
    p = sub.add_parser("sms", help="the SMS channel: send a text, read the message log")
    act = p.add_subparsers(dest="action", required=True)
    s = act.add_parser("send", help="one text through the configured SMS gateway (FAREBOX_SMS_URL)")
    s.add_argument("phone")
    s.add_argument("text")
    s.set_defaults(func=_send)
    g = act.add_parser("log", help="texts in and out, newest first")
    g.add_argument("--phone", help="only this number")
    g.add_argument("--limit", type=int, default=50)
    g.set_defaults(func=_log)


def _send(args, settings) -> int:
    from backoffice.sms.gateway import NullGateway, SmsError, gateway_from_settings

    try:
        gateway = gateway_from_settings(settings)
        if isinstance(gateway, NullGateway):
            print("farebox sms send: FAREBOX_SMS_URL is not set: no gateway to send through")
            return 2
        sent = gateway.send(args.phone, args.text)
    except (SmsError, ValueError) as e:
        print(f"farebox sms send: {e}")
        return 1
    print(f"sent to {sent.to}: gateway message {sent.message_id}")
    return 0


def _log(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import select

    from backoffice.sms.tables import message as m
    from clearing.service_day import local_time
    from farebox import bootstrap

    engine = bootstrap.start(settings, announce=False).engine()
    q = select(m.c.at, m.c.direction, m.c.phone, m.c.state, m.c.text, m.c.outcome).order_by(m.c.id.desc())
    if args.phone:
        q = q.where(m.c.phone == args.phone)
    with engine.connect() as conn:
        rows = conn.execute(q.limit(max(1, min(args.limit, 1000)))).all()
    table = Table("时间 At", "方向 Way", "号码 Phone", "状态 State", "短信 Text", "结果 Outcome")
    for r in rows:
        table.add_row(local_time(r.at, "Asia/Shanghai", "%Y-%m-%d %H:%M:%S"), r.direction, r.phone, r.state,
                      r.text, r.outcome)
    Console().print(table)
    return 0

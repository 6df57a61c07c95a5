"""The alarms operations work through: what a validator reports about itself (grey purchases left behind, its
journal filling, its deny list out of date, records it set aside) and what the back office sees across the fleet (a
bus running an old deny list long after a new one went out, quarantined records waiting for review and growing).

Each alarm is one row of table ``alarm`` (revision 2026_12_03_0018) per (operator, device or none, kind): raised
the first time the condition is seen, its text and ``measure`` (how many records, what percentage) kept current while
it holds, ``cleared_at`` set when it no longer does. A person acknowledges an open alarm (who, when); an acknowledged
alarm whose measure grows (more grey purchases, a fuller journal, more quarantined records) is closed and raised
again as a new, unacknowledged row, so growth is never hidden behind an old acknowledgement.

- ``sync_device(conn, ...)``: the alarms a status message carries (called by the status consumer per message).
- ``refresh(conn, now=...)``: the back office's own conditions (the alarms page and the status consumer call it).
- ``listing`` / ``acknowledge``: the page's reads and its one write.

Use cases run in the caller's transaction, like backoffice.registry.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Connection, func, select

from backoffice.models import Base, DenyListVersion, Device, DeviceStatus, Quarantine
from wire import topics

alarm = sa.Table(
    "alarm", Base.metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("operator", sa.String(32), nullable=False),
    sa.Column("device_id", sa.String(32), nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("text", sa.String(500), nullable=False),
    sa.Column("measure", sa.Integer, nullable=False, server_default="0"),
    sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("acked_by", sa.String(100), nullable=True),
    sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_alarm_open", "operator", "cleared_at"),
)

# kind -> (Chinese, English) for people; the device's own alarm texts are classified into these
KINDS = {
    "grey_purchases": ("未完成扣款", "Grey purchases"),
    "journal_filling": ("日志将满", "Journal filling"),
    "denylist_stale": ("黑名单过期", "Deny list stale"),
    "denylist_behind": ("黑名单未更新", "Deny list behind"),
    "quarantine_growing": ("隔离记录增加", "Quarantine growing"),
    "set_aside": ("记录无法上传", "Records set aside"),
    "device": ("车载机告警", "Validator alarm"),
}
# kind -> what it means and what to do, (Chinese, English)
HELP = {
    "grey_purchases": ("乘客扣款中途拿走卡：卡上可能已扣款，待该卡再次刷卡时自动补全或撤销",
                       "a card left mid-purchase: the fare may be off the card; settled when it taps again"),
    "journal_filling": ("车载机存储将满：检查其通信，尽快上传", "the validator's store is filling: check its link"),
    "denylist_stale": ("车载机上的黑名单太旧", "the deny list on the bus is too old"),
    "denylist_behind": ("在线但未收到最新黑名单：检查下发", "online, yet without the latest deny list"),
    "quarantine_growing": ("有入库被拒的记录待运维审核（隔离记录页）", "records ingest refused await review (Quarantine)"),
    "set_aside": ("车载机有无法编码的记录，已送隔离", "records the bus could not encode, sent to quarantine"),
    "device": ("车载机报告的其他告警", "another alarm the validator reported"),
}
DEVICE_KINDS = ("grey_purchases", "journal_filling", "denylist_stale", "set_aside", "device")
# A bus still on an older deny list this long after the newer one was made is an alarm (it had time to get it).
DENYLIST_GRACE = timedelta(minutes=30)
_NUMBER = re.compile(r"\d+")


class AlarmError(ValueError):
    """An alarm cannot be acknowledged as asked; the text says why."""


class NotFound(AlarmError):
    pass


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def classify(text: str) -> tuple[str, int]:
    """(kind, measure) of an alarm text a validator sent (validator.uplink / validator.downlink word them)."""
    number = _NUMBER.search(text)
    n = int(number.group()) if number else 0
    if "grey purchase" in text:
        return "grey_purchases", n
    if text.startswith("journal"):
        return "journal_filling", 100 if text == "journal full" else n
    if text == "denylist stale":
        return "denylist_stale", 0
    if "set aside" in text:
        return "set_aside", n
    return "device", 0


def _raise(conn: Connection, *, operator: str, device_id: str | None, kind: str, text: str, measure: int,
           now: datetime) -> None:
    c = alarm.c
    query = select(alarm).where(c.operator == operator, c.kind == kind, c.cleared_at.is_(None),
                                c.device_id.is_(None) if device_id is None else c.device_id == device_id)
    if kind == "device":
        query = query.where(c.text == text[:500])
    row = conn.execute(query.order_by(c.id.desc()).limit(1)).first()
    if row is not None and not (row.acked_at is not None and measure > row.measure):
        conn.execute(alarm.update().where(c.id == row.id).values(text=text[:500], measure=measure, last_seen=now))
        return
    if row is not None:  # acknowledged, and it grew since: a new alarm for the person on duty
        conn.execute(alarm.update().where(c.id == row.id).values(cleared_at=now, last_seen=now))
    conn.execute(alarm.insert().values(operator=operator, device_id=device_id, kind=kind, text=text[:500],
                                       measure=measure, raised_at=now, last_seen=now))


def _clear(conn: Connection, ids: list[int], now: datetime) -> None:
    if ids:
        conn.execute(alarm.update().where(alarm.c.id.in_(ids)).values(cleared_at=now))


def sync_device(conn: Connection, *, operator: str, device_id: str, alarms: tuple[str, ...], now: datetime) -> None:
    """The alarms a validator's latest status carries: raise or update each, clear those it no longer reports."""
    wanted: set[tuple[str, str]] = set()
    for text in alarms:
        kind, measure = classify(text)
        _raise(conn, operator=operator, device_id=device_id, kind=kind, text=text, measure=measure, now=now)
        wanted.add((kind, text if kind == "device" else ""))
    c = alarm.c
    stale = [r.id for r in conn.execute(select(c.id, c.kind, c.text).where(
        c.device_id == device_id, c.kind.in_(DEVICE_KINDS), c.cleared_at.is_(None)))
        if (r.kind, r.text if r.kind == "device" else "") not in wanted]
    _clear(conn, stale, now)


def refresh(conn: Connection, *, now: datetime, grace: timedelta = DENYLIST_GRACE) -> None:
    """The back office's own alarms, for every operator: quarantined records awaiting review, and online buses
    still on an older deny list ``grace`` after the newer one was made."""
    c = alarm.c
    open_rows = {(r.operator, r.device_id, r.kind): r.id for r in conn.execute(
        select(c.id, c.operator, c.device_id, c.kind)
        .where(c.kind.in_(("quarantine_growing", "denylist_behind")), c.cleared_at.is_(None)))}
    holding: set[tuple[str, str | None, str]] = set()

    q = Quarantine.__table__.c
    owner = dict(conn.execute(select(Device.device_id, Device.operator)).all())
    waiting: dict[str, int] = {}
    for r in conn.execute(select(q.device_id, q.topic, func.count().label("n")).where(q.status == "open")
                          .group_by(q.device_id, q.topic)):
        operator = owner.get(r.device_id)
        if operator is None:  # a device nobody registered: the operator its topic names
            try:
                operator = topics.parse(r.topic)[0]
            except topics.TopicError:
                continue
        waiting[operator] = waiting.get(operator, 0) + r.n
    for operator, n in waiting.items():
        _raise(conn, operator=operator, device_id=None, kind="quarantine_growing", measure=n, now=now,
               text=f"{n} quarantined record{'s await' if n != 1 else ' awaits'} review")
        holding.add((operator, None, "quarantine_growing"))

    d = DenyListVersion.__table__.c
    current = conn.execute(select(d.version, d.created_at).order_by(d.version.desc()).limit(1)).first()
    if current is not None and now - _utc(current.created_at) > grace:
        s = DeviceStatus.__table__.c
        for r in conn.execute(select(Device.device_id, Device.operator, s.denylist_version)
                              .join(DeviceStatus, DeviceStatus.device_id == Device.device_id)
                              .where(s.online.is_(True), s.denylist_version < current.version)):
            _raise(conn, operator=r.operator, device_id=r.device_id, kind="denylist_behind",
                   measure=current.version - r.denylist_version, now=now,
                   text=f"deny list v{r.denylist_version}; v{current.version} out since "
                        f"{_utc(current.created_at):%Y-%m-%d %H:%M}Z")
            holding.add((r.operator, r.device_id, "denylist_behind"))
    _clear(conn, [i for key, i in open_rows.items() if key not in holding], now)


@dataclasses.dataclass(frozen=True)
class Alarm:
    id: int
    operator: str
    device_id: str | None
    kind: str
    text: str
    measure: int
    raised_at: datetime
    last_seen: datetime
    cleared_at: datetime | None
    acked_by: str | None
    acked_at: datetime | None

    @property
    def label(self) -> tuple[str, str]:
        return KINDS.get(self.kind, (self.kind, self.kind))

    @property
    def help(self) -> tuple[str, str]:
        return HELP.get(self.kind, ("", ""))

    @property
    def state(self) -> str:
        return "cleared" if self.cleared_at else "acknowledged" if self.acked_at else "open"


def _alarm(r) -> Alarm:
    return Alarm(id=r.id, operator=r.operator, device_id=r.device_id, kind=r.kind, text=r.text, measure=r.measure,
                 raised_at=_utc(r.raised_at), last_seen=_utc(r.last_seen), cleared_at=_utc(r.cleared_at),
                 acked_by=r.acked_by, acked_at=_utc(r.acked_at))


def listing(conn: Connection, *, operator: str | None = None, state: str = "active", kind: str | None = None,
            limit: int = 500) -> list[Alarm]:
    """Alarms newest first. ``state``: ``active`` (not cleared: open and acknowledged), ``open`` (not yet
    acknowledged), ``cleared``, or ``all``."""
    c = alarm.c
    query = select(alarm)
    if operator is not None:
        query = query.where(c.operator == operator)
    if kind is not None:
        query = query.where(c.kind == kind)
    if state == "active":
        query = query.where(c.cleared_at.is_(None))
    elif state == "open":
        query = query.where(c.cleared_at.is_(None), c.acked_at.is_(None))
    elif state == "cleared":
        query = query.where(c.cleared_at.is_not(None))
    elif state != "all":
        raise AlarmError(f"state {state!r} is not one of active, open, cleared, all")
    return [_alarm(r) for r in conn.execute(query.order_by(c.raised_at.desc(), c.id.desc()).limit(limit))]


def acknowledge(conn: Connection, *, alarm_id: int, by: str, now: datetime, operator: str | None = None) -> Alarm:
    """Mark an alarm seen by ``by`` at ``now``. NotFound for an alarm that is not there (or another operator's);
    AlarmError when it was acknowledged already (by whom, when)."""
    c = alarm.c
    query = select(alarm).where(c.id == alarm_id)
    if operator is not None:
        query = query.where(c.operator == operator)
    row = conn.execute(query.with_for_update()).first()
    if row is None:
        raise NotFound(f"alarm {alarm_id} not found")
    if row.acked_at is not None:
        raise AlarmError(f"alarm {alarm_id} was acknowledged by {row.acked_by} at "
                         f"{_utc(row.acked_at):%Y-%m-%d %H:%M}Z")
    if not by.strip():
        raise AlarmError("an acknowledgement names who made it")
    conn.execute(alarm.update().where(c.id == alarm_id).values(acked_by=by.strip()[:100], acked_at=now))
    return _alarm(conn.execute(select(alarm).where(c.id == alarm_id)).one())

"""Deny-list versions and deltas, in the back office.

A version is the whole list of every card whose status is ``lost``, ``blocked`` or ``fraud`` (ingest sets
``fraud``), of every driver card withdrawn (its driver retired, or the card replaced; ``driver_card``), and of every
ticket whose use ingest flagged as fraud (``ticket_deny_keys``), written in the validator's own file format (``blacklist.denylist``) and stored in ``denylist_version``
with its number, creation time, card count and SHA-256 content checksum. Storing whole files, not deltas, means
any two stored versions give a delta (``blacklist.delta.diff``), so a bus that missed ten versions gets one delta,
not ten.

- ``build_version(conn, now)`` stores the next version only when the set of cards changed: the content checksum
  covers the cards alone (not the version number), so an unchanged list compares equal to the current version.
  Two back offices building at the same moment collide on the version's primary key; the loser's transaction fails
  and nothing half-written remains.
- ``delta_for(conn, from_version)`` is the delta from a stored version to the current one, or None when the
  version is unknown (never stored, e.g. 0, a fresh validator) or more than ``max_behind`` versions behind: then
  the device gets the full list.
- ``denylist_changed(conn)`` says whether the cards to deny differ from the newest stored version (the publisher
  asks it every ``rebuild_every`` seconds and builds a version when it does; see backoffice.publisher).
- ``prune_versions(conn)`` deletes the versions too old to make a delta from (each holds a whole list).
- ``update_for(conn, device_version)`` is what a device that reports ``device_version`` should receive: nothing
  (it is current), a delta, or the full list; also the full list when the delta would not be smaller than the
  list itself (a delta costs 10 bytes per changed card, the list about 8 bytes per card).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from datetime import UTC, datetime

from sqlalchemy import Connection, func, select

from backoffice import models
from blacklist.delta import Delta, diff
from blacklist.denylist import DenyList, encode, file_checksum

log = logging.getLogger(__name__)

DENIED_STATUSES = ("lost", "blocked", "fraud")
_ASN = re.compile(r"[0-9a-f]{20}")  # what a deny list can carry: the card's 10-byte ASN
DEFAULT_MAX_BEHIND = 50  # versions; a bus further behind than this gets the full list


@dataclasses.dataclass(frozen=True)
class DenyListVersion:
    version: int
    created_at: datetime
    count: int
    checksum: str  # SHA-256 of the list content (blacklist.denylist.DenyList.checksum), hex
    body: bytes  # the list file, blacklist.denylist format 2

    def load(self) -> DenyList:
        return _load(self.body)

    def __repr__(self) -> str:
        return (f"DenyListVersion(version={self.version}, created_at={self.created_at.isoformat()}, "
                f"count={self.count}, checksum={self.checksum[:12]}…, {len(self.body)} bytes)")


@dataclasses.dataclass(frozen=True)
class Update:
    """What one device gets: ``kind`` ``'delta'`` (``delta`` set) or ``'full'`` (``version.body`` is the file)."""

    kind: str
    version: DenyListVersion
    delta: Delta | None = None


@functools.lru_cache(maxsize=8)
def _load(body: bytes) -> DenyList:
    # Deltas for a whole fleet are made from the same few versions: load (and check) each file once.
    return DenyList.from_bytes(body)


def utc(at: datetime) -> datetime:
    """A time read back from the database as aware UTC (SQLite hands back naive datetimes)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _row(row) -> DenyListVersion:
    return DenyListVersion(version=row.version, created_at=utc(row.created_at), count=row.count,
                           checksum=row.checksum, body=bytes(row.body))


def denied_asns(conn: Connection, now: datetime | None = None) -> list[str]:
    """Every card that must be refused at ``now`` (default: now), ascending: rider cards lost, blocked or fraud, and
    driver cards withdrawn by then (a driver retired from tomorrow keeps their card until then)."""
    table, drivers = models.Card.__table__, models.DriverCard.__table__
    now = now or datetime.now(UTC)
    cards = set(conn.execute(select(table.c.asn).where(table.c.status.in_(DENIED_STATUSES))).scalars())
    for asn in conn.execute(select(drivers.c.asn).where(drivers.c.withdrawn_at.is_not(None),
                                                        drivers.c.withdrawn_at <= now)).scalars():
        # The registry takes a driver card number as typed; one that is no card's ASN cannot open a shift on a
        # bus either, and must not keep every other card off the list (encode refuses the whole list for it).
        if _ASN.fullmatch(asn.strip().lower()):
            cards.add(asn.strip().lower())
        else:
            log.warning("deny list: withdrawn driver card %r is not a 20-hex-digit ASN; left off the list", asn)
    cards.update(ticket_deny_keys(conn, now))
    return sorted(cards)


def ticket_deny_keys(conn: Connection, now: datetime) -> set[str]:
    """Tickets every bus must refuse, as deny-list keys (``wire.ticket.deny_keys``: FE71 + ticket id for a QR scan,
    FE72 + pickup serial for a keyed code; prefixes no card ASN has): a ticket whose use was flagged at ingest
    (shown on a second bus, or after a refund; backoffice.tickets.uses.flagged_tickets) until its validity is over."""
    from backoffice.tickets.uses import flagged_tickets
    from wire.ticket import deny_keys

    return {key.hex() for ticket_id in flagged_tickets(conn, now=now) for key in deny_keys(ticket_id)}


def denylist_changed(conn: Connection, now: datetime | None = None) -> bool:
    """True when the cards to deny at ``now`` are not those of the newest stored version (or there is none and
    some card is denied). One query per table and one SHA-256 over the sorted list: ~0.1 s for 100,000 cards."""
    table = models.DenyListVersion.__table__
    current = conn.execute(select(table.c.version, table.c.count, table.c.checksum)
                           .order_by(table.c.version.desc()).limit(1)).first()
    asns = denied_asns(conn, now)
    if current is None:
        return bool(asns)
    return current.count != len(asns) or current.checksum != file_checksum(encode(asns, current.version)).hex()


def current_version(conn: Connection) -> DenyListVersion | None:
    table = models.DenyListVersion.__table__
    row = conn.execute(select(table).order_by(table.c.version.desc()).limit(1)).first()
    return None if row is None else _row(row)


def get_version(conn: Connection, version: int) -> DenyListVersion | None:
    table = models.DenyListVersion.__table__
    row = conn.execute(select(table).where(table.c.version == version)).first()
    return None if row is None else _row(row)


def versions(conn: Connection, limit: int = 20) -> list[tuple[int, datetime, int, str, int]]:
    """The newest versions as (version, created_at, count, checksum, body bytes), newest first."""
    table = models.DenyListVersion.__table__
    return [tuple(r) for r in conn.execute(
        select(table.c.version, table.c.created_at, table.c.count, table.c.checksum, func.length(table.c.body))
        .order_by(table.c.version.desc()).limit(limit))]


def build_version(conn: Connection, now: datetime) -> DenyListVersion | None:
    """Store the list of denied cards as the next version and return it; None (nothing stored) when it holds the
    same cards as the current version. Runs in the caller's transaction."""
    if now.tzinfo is None:
        raise ValueError("build_version needs an aware UTC time (times in the database are UTC)")
    current = current_version(conn)
    asns = denied_asns(conn, now)
    try:
        body = encode(asns, (current.version + 1) if current else 1)
    except ValueError as e:  # an ASN that is not 20 hex digits: say which, store nothing
        raise ValueError(f"the card table holds an ASN the deny list cannot carry: {e}") from None
    checksum = file_checksum(body).hex()
    if current is not None and current.checksum == checksum:
        return None
    new = DenyListVersion(version=(current.version + 1) if current else 1, created_at=now,
                          count=_load(body).count, checksum=checksum, body=body)
    conn.execute(models.DenyListVersion.__table__.insert().values(
        version=new.version, created_at=new.created_at, count=new.count, checksum=new.checksum, body=new.body))
    return new


def prune_versions(conn: Connection, *, keep_behind: int = DEFAULT_MAX_BEHIND) -> int:
    """Delete the versions more than ``keep_behind`` below the current one: no delta is made from them any more (a
    bus that far behind gets the full list), and each holds a whole list. Returns how many went."""
    current = current_version(conn)
    if current is None:
        return 0
    table = models.DenyListVersion.__table__
    return conn.execute(table.delete().where(table.c.version < current.version - keep_behind)).rowcount


def delta_for(conn: Connection, from_version: int, *, max_behind: int = DEFAULT_MAX_BEHIND,
              to: DenyListVersion | None = None) -> Delta | None:
    """The delta from stored version ``from_version`` to the current one (or ``to``); None when ``from_version`` is
    not stored, not below the target, or more than ``max_behind`` versions behind it: send the full list."""
    target = to if to is not None else current_version(conn)
    if target is None or not 0 < target.version - from_version <= max_behind:
        return None
    base = get_version(conn, from_version)
    if base is None:
        return None
    return diff(base.load(), target.load())


def update_for(conn: Connection, device_version: int, *, max_behind: int = DEFAULT_MAX_BEHIND,
               current: DenyListVersion | None = None) -> Update | None:
    """What a device running ``device_version`` should receive to reach the current version; None when it is
    current (or there is no list yet). A device reporting a version above the current one (a database restored
    from backup) gets the full list: its version number means other content than ours."""
    current = current if current is not None else current_version(conn)
    if current is None or device_version == current.version:
        return None
    delta = delta_for(conn, device_version, max_behind=max_behind, to=current)
    if delta is not None and delta_bytes(delta) < len(current.body):
        return Update("delta", current, delta)
    return Update("full", current)


def delta_bytes(delta: Delta) -> int:
    """The size of the encoded delta (what a bus pays to receive it, before the package's signature)."""
    from blacklist.delta import encode_delta

    return len(encode_delta(delta))

"""Quarantine review: what operations do with a record ingest would not store.

A quarantined record stays until a person decides (DESIGN: "never cleared"). Operations look at it
(:func:`items`, :func:`item`) and then either

- **release** it (:func:`release`): the record goes through *every* ingest check again, by the same code the
  running ingest uses (:meth:`backoffice.ingest.Ingest.messages`): message (topic, device key, unsigned policy,
  device registered to that operator), record (the PSAM registered at the record's time, type, algorithm, TAC),
  the card-counter fraud check and the dedupe key. A record that now passes is stored and the row marked
  ``released`` with who, when, why and the tap's id; one that still fails stays ``open`` with the reason found now
  (``recheck_reason``); or
- **rejects** it (:func:`reject`): ``rejected``, with who, when and why. Nothing is stored.

Each decision writes an audit line (``backoffice.cards.audit``: who, action, the card and amount, why) in the same
transaction. Exactly once: a release or reject first takes the row (an UPDATE of it, so a second reviewer waits for
the first one's commit) and then reads its status, so two releases of one row store it once and the second is told
it was released already.

How a release rebuilds the message: a row naming a record keeps the decoded record (v1 JSON) and whether the message
that carried it verified with its device's MAC key (``signed``); the record is put in a one-record batch for the
same topic, MAC'd with that topic's device key when the original was, plain v1 JSON when it was not (so the
unsigned policy applies again), and handed to ingest. A row keeping a whole message (no seq: a forged MAC, an
undecodable batch) is handed to ingest as it came, MAC and all.

Use cases run in the caller's transaction; the caller commits once (the CLI and the API views do).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from sqlalchemy import Connection, func, or_, select, update

from backoffice.cards import audit
from backoffice.ingest import Ingest, _insert_ignoring_duplicates  # the same ON CONFLICT DO NOTHING as ingest
from backoffice.models import Device, DeviceVersion, Quarantine, Tap
from wire import codec, topics
from wire.records import RecordKind, TapRecord, to_plain

STATUSES = ("open", "released", "rejected")
_Q = Quarantine


class QuarantineError(ValueError):
    """A review that cannot be done; the message says why and what to do."""


class NotFound(QuarantineError):
    """No such quarantine row (or not one of the asking clerk's operator)."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: int
    received_at: datetime
    topic: str
    device_id: str
    device_seq: int | None
    reason: str
    status: str
    signed: bool | None
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str
    tap_id: int | None
    rechecked_at: datetime | None
    recheck_reason: str | None
    payload_bytes: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Released:
    """What a release found: ``status`` after it (released, or still open), the tap stored or found, and the
    counts ingest gave (a whole message may hold many records)."""

    item: Item
    stored: int
    duplicates: int
    still_failing: str | None  # the reason found now, when the record still does not pass

    @property
    def released(self) -> bool:
        return self.item.status == "released"


# ------------------------------------------------------------------------------------------------ reading
_COLUMNS = (_Q.id, _Q.received_at, _Q.topic, _Q.device_id, _Q.device_seq, _Q.reason, _Q.status, _Q.signed,
            _Q.resolved_at, _Q.resolved_by, _Q.resolution, _Q.tap_id, _Q.rechecked_at, _Q.recheck_reason,
            func.length(_Q.payload).label("payload_bytes"))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _item(row) -> Item:
    m = dict(row._mapping)
    for name in ("received_at", "resolved_at", "rechecked_at"):
        m[name] = _utc(m[name])
    m["resolution"] = m["resolution"] or ""
    return Item(**m)


def _scope(operator: str | None) -> list:
    """A clerk sees the rows of their operator's validators only (as backoffice.web.reads.quarantine)."""
    if operator is None:
        return []
    return [_Q.device_id.in_(select(Device.device_id).where(Device.operator == operator))]


def items(conn: Connection, *, status: str | None = "open", operator: str | None = None, device: str | None = None,
          matching: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[Item], int]:
    """Quarantine rows, newest first, with their total: ``status`` open / released / rejected (None: all),
    ``device`` one validator's, ``matching`` a piece of the reason (as typed, case-insensitive)."""
    if status is not None and status not in STATUSES:
        raise QuarantineError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    where = _scope(operator)
    if status is not None:
        where.append(_Q.status == status)
    if device is not None:
        where.append(_Q.device_id == device)
    if matching:
        pattern = f"%{matching.lower()}%"
        where.append(or_(func.lower(_Q.reason).like(pattern), func.lower(_Q.recheck_reason).like(pattern)))
    total = conn.execute(select(func.count()).select_from(_Q).where(*where)).scalar_one()
    rows = conn.execute(select(*_COLUMNS).where(*where).order_by(_Q.id.desc()).limit(limit).offset(offset))
    return [_item(r) for r in rows], total


def item(conn: Connection, quarantine_id: int, *, operator: str | None = None) -> Item:
    row = conn.execute(select(*_COLUMNS).where(_Q.id == quarantine_id, *_scope(operator))).first()
    if row is None:
        raise NotFound(f"quarantine row {quarantine_id} not found")
    return _item(row)


def details(conn: Connection, quarantine_id: int, *, operator: str | None = None) -> dict:
    """One row for a reviewer: the row, the record it keeps (decoded, or why it cannot be), and the validator's
    PSAMs over time from the registry, so a PSAM swap can be told from a forgery."""
    found = item(conn, quarantine_id, operator=operator)
    payload = conn.execute(select(_Q.payload).where(_Q.id == quarantine_id)).scalar_one()
    record, problem = _kept_record(found, payload)
    psams = [{"valid_from": _utc(v.valid_from), "valid_to": _utc(v.valid_to), "terminal_id": v.terminal_id}
             for v in conn.execute(select(DeviceVersion.valid_from, DeviceVersion.valid_to, DeviceVersion.terminal_id)
                                   .where(DeviceVersion.device_id == found.device_id)
                                   .order_by(DeviceVersion.valid_from, DeviceVersion.id))]
    plain = None
    if record is not None:
        plain = to_plain(record)
        plain["occurred_at"] = record.occurred_at
    return {**found.as_dict(), "record": plain, "record_problem": problem, "psams": psams}


def _kept_record(found: Item, payload: bytes) -> tuple[TapRecord | None, str | None]:
    if found.device_seq is None:
        return None, "the row keeps the whole message as it came (a release checks its MAC again)"
    try:
        batch = codec.decode_batch_json(payload)
    except codec.WireError as e:
        return None, f"the row keeps no record ingest can read again ({e})"
    if len(batch.records) != 1:
        return None, f"the row keeps {len(batch.records)} records, not one"
    return batch.records[0], None


# ------------------------------------------------------------------------------------------------ deciding
def _take(conn: Connection, quarantine_id: int, operator: str | None) -> tuple[Item, bytes]:
    """Lock the row for this transaction (a second reviewer waits here until the first commits), then read it."""
    taken = conn.execute(update(_Q).where(_Q.id == quarantine_id, *_scope(operator)).values(status=_Q.status))
    if taken.rowcount == 0:
        raise NotFound(f"quarantine row {quarantine_id} not found")
    found = item(conn, quarantine_id)
    if found.status != "open":
        raise QuarantineError(f"quarantine row {quarantine_id} was {found.status} already, by {found.resolved_by} "
                              f"at {found.resolved_at:%Y-%m-%d %H:%M:%S}Z: nothing to do")
    payload = conn.execute(select(_Q.payload).where(_Q.id == quarantine_id)).scalar_one()
    return found, payload


def _who_why(by: str, why: str) -> tuple[str, str]:
    if not by or not by.strip():
        raise QuarantineError("say who decides: by=<user name>")
    if not why or not why.strip():
        raise QuarantineError("say why (e.g. 'PSAM swapped on 3 Dec, registry corrected'): it goes to the audit "
                              "trail")
    return by.strip()[:64], why.strip()


def _message(found: Item, payload: bytes, ingest: Ingest) -> tuple[bytes, TapRecord | None]:
    if found.device_seq is None:
        return payload, None
    record, problem = _kept_record(found, payload)
    if record is None:
        raise QuarantineError(f"quarantine row {found.id} cannot be released: {problem}; reject it instead")
    try:
        _, topic_device, _ = topics.parse(found.topic)
    except topics.TopicError as e:
        raise QuarantineError(f"quarantine row {found.id} cannot be released: its topic is not a device's ({e}); "
                              "reject it instead") from None
    if found.signed:
        return codec.encode_batch([record], key=ingest.mac_key(topic_device)), record
    return codec.encode_batch_json([record]), record


def _tap_id(conn: Connection, record: TapRecord) -> int | None:
    where = [Tap.device_id == record.device_id, Tap.device_seq == record.device_seq]
    if hasattr(Tap, "epoch"):  # the journal's identity, part of the key since revision 0011
        where.append(Tap.epoch == getattr(record, "epoch", 0))
    return conn.execute(select(Tap.id).where(*where)).scalar()


def _audit(conn, *, by, action, why, now, found: Item, record: TapRecord | None, **detail) -> None:
    purchase = record is not None and record.kind is RecordKind.PURCHASE
    audit.record(conn, who=by, action=action, why=why, now=now, asn=record.card_asn if purchase else None,
                 amount=record.amount if purchase else None, quarantine_id=found.id, device=found.device_id,
                 seq=found.device_seq, reason=found.reason, **detail)


def release(conn: Connection, quarantine_id: int, *, by: str, why: str, ingest: Ingest,
            now: datetime | None = None, operator: str | None = None) -> Released:
    """Put a quarantined record through every ingest check again; stored once if it passes, else left open with
    the reason found now. ``ingest`` is configured as the running one (issuer keys, device master, unsigned
    policy); ``operator`` limits a clerk to their own validators' rows."""
    by, why = _who_why(by, why)
    now = now or datetime.now(UTC)
    found, payload = _take(conn, quarantine_id, operator)
    message, record = _message(found, payload, ingest)
    again: list[dict] = []
    result = ingest.messages(conn, [(found.topic, message)], now=now, quarantined=again)[0]
    mine = [q for q in again if record is None or q["device_seq"] == found.device_seq]
    failing = result.refused or (mine[0]["reason"] if record is not None and mine else None)
    if failing:
        conn.execute(update(_Q).where(_Q.id == found.id).values(rechecked_at=now, recheck_reason=failing[:500]))
        _audit(conn, by=by, action="quarantine_recheck", why=why, now=now, found=found, record=record,
               outcome=f"still quarantined: {failing}")
        return Released(item(conn, found.id), 0, 0, failing)
    if record is None and again:
        # a whole message that now opens: its records with problems of their own become rows of their own
        _insert_ignoring_duplicates(conn, _Q.__table__, again)
    tap_id = _tap_id(conn, record) if record is not None else None
    outcome = (f"stored (tap {tap_id})" if result.stored else f"already stored (tap {tap_id})") \
        if record is not None else (f"message accepted: {result.stored} stored, {result.duplicates} already stored, "
                                    f"{len(again)} quarantined on their own")
    conn.execute(update(_Q).where(_Q.id == found.id).values(
        status="released", resolved_at=now, resolved_by=by, resolution=f"{why} — {outcome}"[:500], tap_id=tap_id,
        rechecked_at=now, recheck_reason=None))
    _audit(conn, by=by, action="quarantine_release", why=why, now=now, found=found, record=record,
           outcome=outcome, tap_id=tap_id)
    return Released(item(conn, found.id), result.stored, result.duplicates, None)


def reject(conn: Connection, quarantine_id: int, *, by: str, why: str, now: datetime | None = None,
           operator: str | None = None) -> Item:
    """Close a quarantined record for good: nothing is stored; who, when and why are kept."""
    by, why = _who_why(by, why)
    now = now or datetime.now(UTC)
    found, payload = _take(conn, quarantine_id, operator)
    record, _ = _kept_record(found, payload)
    conn.execute(update(_Q).where(_Q.id == found.id).values(status="rejected", resolved_at=now, resolved_by=by,
                                                            resolution=why[:500]))
    _audit(conn, by=by, action="quarantine_reject", why=why, now=now, found=found, record=record)
    return item(conn, found.id)

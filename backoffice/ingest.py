"""Ingest: one batch from one validator in, stored exactly once, and the sequences to acknowledge out.

The use case is :func:`ingest_batch`: it decodes, checks the device and every purchase's TAC with the issuer's TAC
key, writes the good records with one multi-row insert that skips keys already stored ((device_id, device_seq)),
writes everything else to quarantine with its reason, and returns what to acknowledge. The caller commits, and only
then publishes the acknowledgement: a crash in between makes the validator send the batch again, and the
duplicates are dropped here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from datetime import UTC, datetime

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from backoffice.models import Device, Quarantine, Tap
from epurse.apdu import TX_PURCHASE
from epurse.crypto import bcd_date, bcd_time, diversify, purchase_tac
from epurse.keys import IssuerKeys
from wire import codec, topics
from wire.records import RecordKind, TapRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass
class IngestResult:
    device_id: str
    operator: str
    ack_seqs: list[int]  # the device's records now safe in the database (stored, already stored, or quarantined)
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0


def tac_ok(record: TapRecord, keys: IssuerKeys) -> bool:
    """Recompute the purchase TAC with the card's diversified TAC key; the record's own fields are the input."""
    dtk = diversify(keys.tac, bytes.fromhex(record.card_asn))
    expected = purchase_tac(dtk, record.amount, TX_PURCHASE, bytes.fromhex(record.terminal_id),
                            record.terminal_seq, bcd_date(record.occurred_at), bcd_time(record.occurred_at))
    return expected.hex() == record.tac


class DeviceDirectory:
    """Registered validators (device_id -> (operator, terminal_id)), read once and re-read on a miss, so a device
    registered while ingest runs is found without a restart."""

    def __init__(self):
        self._known: dict[str, tuple[str, str]] = {}

    def get(self, conn: Connection, device_id: str) -> tuple[str, str] | None:
        if device_id not in self._known:
            row = conn.execute(select(Device.operator, Device.terminal_id)
                               .where(Device.device_id == device_id)).first()
            if row is None:
                return None
            self._known[device_id] = (row.operator, row.terminal_id)
        return self._known[device_id]


def _insert_ignoring_duplicates(conn: Connection, table, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING for all rows.

    One small statement, compiled once, executed for every row in one go (psycopg pipelines them, sqlite3 loops in
    C). Building ``.values(rows)`` instead recompiled 1,000 bind parameters per batch, and a multi-row VALUES made
    psycopg re-parse a 20 kB query each time: either cost more than the database itself."""
    if rows:
        conn.execute(_insert_statement(conn.dialect.name, table), rows)


@functools.cache
def _insert_statement(dialect_name: str, table):
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def _already_stored(conn: Connection, device_id: str, seqs: list[int]) -> set[int]:
    """Which of these sequences the device already has stored. A batch is a run of consecutive sequences, so one
    range scan of the (device_id, device_seq) index answers it; an IN list of 50 parameters took 20 times longer."""
    if not seqs:
        return set()
    query = select(Tap.device_seq).where(Tap.device_id == device_id, Tap.device_seq.between(min(seqs), max(seqs)))
    return set(conn.execute(query).scalars()) & set(seqs)


def _quarantine_row(now, topic, device_id, seq, reason, payload) -> dict:
    return {"received_at": now, "topic": topic[:200], "device_id": device_id[:32], "device_seq": seq,
            "reason": reason[:500], "payload": payload}


def ingest_batch(conn: Connection, topic: str, payload: bytes, *, keys: IssuerKeys, devices: DeviceDirectory,
                 now: datetime | None = None) -> IngestResult:
    """Store one batch inside the caller's transaction; the caller commits, then acknowledges ``ack_seqs``."""
    now = now or datetime.now(UTC)
    try:
        operator, device_id, _ = topics.parse(topic)
    except topics.TopicError as e:
        _insert_ignoring_duplicates(conn, Quarantine.__table__, [_quarantine_row(now, topic, "?", None, str(e),
                                                                                  payload)])
        return IngestResult("?", "?", [], quarantined=1)
    result = IngestResult(device_id, operator, [])
    try:
        batch = codec.decode_batch(payload)
    except codec.WireError as e:
        # Not decodable, so no sequence can be acknowledged; the payload is kept whole for operations.
        _insert_ignoring_duplicates(conn, Quarantine.__table__, [_quarantine_row(
            now, topic, device_id, None, f"undecodable batch: {e}", payload)])
        result.quarantined = 1
        return result

    problem = None
    if batch.device_id != device_id or batch.operator != operator:
        problem = (f"batch says device {batch.device_id!r} of {batch.operator!r} but came on the topic of "
                   f"{device_id!r} of {operator!r}")
    registered = devices.get(conn, device_id)
    if problem is None and registered is None:
        problem = f"device {device_id} is not registered: add it with `farebox device add` and re-send"
    elif problem is None and registered[0] != operator:
        problem = f"device {device_id} belongs to operator {registered[0]!r}, not {operator!r}"

    if problem:
        # Nothing is acknowledged: a batch that is not what its topic says, or from a device this back office does
        # not know, must not make any validator forget records. The bus keeps them and sends them again; once the
        # device is registered they are stored. Quarantine keeps one copy per record meanwhile, for operations.
        _insert_ignoring_duplicates(conn, Quarantine.__table__, [
            _quarantine_row(now, topic, device_id, r.device_seq, problem, codec.encode_batch([r]))
            for r in batch.records])
        result.quarantined = len(batch.records)
        log.warning("batch on %s not accepted: %s", topic, problem)
        return result

    taps, bad = [], []
    for record in batch.records:
        reason = _record_problem(record, registered[1], keys)
        if reason:
            bad.append(_quarantine_row(now, topic, device_id, record.device_seq, reason,
                                       codec.encode_batch([record])))
        else:
            row = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
            row["kind"] = record.kind.value
            row["received_at"] = now
            taps.append(row)
    # Known duplicates (a batch sent again) are counted and skipped; ON CONFLICT still guards against a second
    # ingest worker storing the same record between this look-up and the insert.
    stored = _already_stored(conn, device_id, [row["device_seq"] for row in taps])
    new = [row for row in taps if row["device_seq"] not in stored]
    _insert_ignoring_duplicates(conn, Tap.__table__, new)
    _insert_ignoring_duplicates(conn, Quarantine.__table__, bad)
    result.stored, result.duplicates, result.quarantined = len(new), len(taps) - len(new), len(bad)
    result.ack_seqs = [r.device_seq for r in batch.records]
    if bad:
        log.warning("device %s: %d record(s) quarantined, first reason: %s", device_id, len(bad), bad[0]["reason"])
    return result


def _record_problem(record: TapRecord, terminal_id: str, keys: IssuerKeys) -> str | None:
    if record.kind is not RecordKind.PURCHASE:
        return None
    if record.terminal_id != terminal_id:
        return f"terminal {record.terminal_id} is not the PSAM registered for this device ({terminal_id})"
    if record.amount <= 0:
        return f"purchase amount {record.amount} fen is not positive"
    if not tac_ok(record, keys):
        return "TAC does not verify with the issuer's key: record altered or not from a genuine card"
    return None

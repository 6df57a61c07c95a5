"""The validator's own disk: every tap it saw, kept in SQLite until the back office has acknowledged it.

Durability beats speed here: WAL with synchronous=FULL (checked at open, not assumed), ``integrity_check`` at
open, a schema version in ``user_version`` with all-or-nothing migrations. A purchase is written twice: as a
pending ("grey") record before the DEBIT goes to the card, and completed with its TAC before the rider is told
"OK", so a crash or a pulled card can never lose a debit. The device sequence is kept in the journal itself
and only ever grows, across restarts.

The journal is also the uplink's outbox: completed records stay until their batch is acknowledged.

Identity (epoch): each journal file gets a random 63-bit number when it is created (``meta`` key ``epoch``), written
into every record it assigns and sent with every batch; the back office keys taps by (device, epoch, sequence). A bus
whose storage is replaced starts again at sequence 1 under a new epoch, so its new taps are new records, not
"duplicates" of old ones. A journal made before epochs (schema 3 or older, with records) keeps epoch 0: the back
office already holds its records under that key.

Always sendable: every record is cut to the wire's limits as it is written (``wire.codec.sendable``: texts at most
``MAX_TEXT`` characters), so nothing the terminal writes can stop the uplink. Should a record still not encode (a
bug, a damaged body), the uplink sets it aside (:meth:`Journal.set_aside`): it leaves the outbox, is sent in a form the
back office quarantines with the reason, and is kept until that is acknowledged; the status carries an alarm
meanwhile. The records behind it go on as usual.

Disk budget (``budget_bytes``; offline for days is normal, so the journal must not grow without bound). "Used"
is the pages that hold data, ``(page_count - freelist_count) * page_size``: two header reads (about 10 us,
against the milliseconds of the fsync), so it is checked before every new record. The WAL comes on top and is
bounded by SQLite's checkpoints (``wal_autocheckpoint``, 1000 pages, about 4 MB), not by the budget. The
policy, exactly:

- At :data:`PRUNE_AT` of the budget, acknowledged records (and cancelled grey records, which never leave the
  bus and moved no money) are deleted oldest first until use is under :data:`PRUNE_TO`, together with the
  summaries of shifts older than the newest ``keep_shifts``. Deleted pages are reused by SQLite; the file does
  not shrink.
- Pending (grey) records and completed records not yet acknowledged are NEVER deleted, whatever the budget.
- When, after pruning, use is still at :data:`REFUSE_AT` of the budget (unsent and grey records fill it), a
  new purchase (``begin_purchase``), a driver sign-in and a deny-list refusal are refused with
  :class:`JournalFull`, whose message says how many taps wait and what to do. The last ``1 - REFUSE_AT`` of
  the budget is kept for what must always be written: completing or cancelling a purchase already begun (never
  lose a debit), a driver's sign-out or hand-over (``SHIFT_CLOSE``), acknowledgements and small state. Those
  are never refused by the budget; only the disk itself (an ``sqlite3`` error) can stop them.
- Fares resume by themselves once the back office acknowledges records and pruning can make room.

Shift summaries: one row per shift (``shift``) and per shift and card type (``shift_fare``), updated in the
same transaction as each record that changes them (sign-in, sign-out or hand-over, deny-list refusal, and a
purchase when it is completed, never when it is begun). So a shift report, or its reprint, does not need the
shift's records, which the budget may have pruned, and a grey purchase settled hours later still lands in its
own shift.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import threading
from datetime import datetime
from pathlib import Path

from validator.shift_report import FareRow, ShiftReport
from wire.codec import sendable
from wire.records import RecordKind, TapRecord, from_plain, to_plain, utc

SCHEMA_VERSION = 5

# Fractions of the budget: start pruning acknowledged records, prune down to, refuse new fares from.
PRUNE_AT = 0.80
PRUNE_TO = 0.60
REFUSE_AT = 0.90
DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024  # a fraction of a validator's flash; months of offline taps
MIN_BUDGET_BYTES = 64 * 1024  # below this the empty journal's own tables would not leave room for a tap

_MIGRATIONS = {
    1: """
        CREATE TABLE record (
            device_seq INTEGER PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'cancelled')),
            acked INTEGER NOT NULL DEFAULT 0,
            body TEXT NOT NULL
        );
        CREATE INDEX record_unsent ON record (device_seq) WHERE state = 'done' AND acked = 0;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('last_seq', '0');
    """,
    # Every tap looks for the card's grey records: keep that lookup from scanning the whole journal.
    2: """
        CREATE INDEX record_pending ON record (device_seq) WHERE state = 'pending';
    """,
    # Shift summaries that outlive the records the budget prunes, and a shift column to find a shift's
    # records. Filled from what a schema-2 journal still holds. No semicolons in comments: statements split.
    3: """
        ALTER TABLE record ADD COLUMN shift_no INTEGER NOT NULL DEFAULT 0;
        UPDATE record SET shift_no = coalesce(json_extract(body, '$.shift_no'), 0);
        CREATE INDEX record_shift ON record (shift_no, device_seq);
        CREATE TABLE shift (
            shift_no INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            driver TEXT NOT NULL,
            route TEXT NOT NULL,
            vehicle TEXT NOT NULL,
            opened_at INTEGER,
            closed_at INTEGER,
            close_reason TEXT NOT NULL DEFAULT '',
            denied INTEGER NOT NULL DEFAULT 0,
            first_tap INTEGER,
            last_tap INTEGER
        );
        CREATE TABLE shift_fare (
            shift_no INTEGER NOT NULL,
            card_type INTEGER NOT NULL,
            taps INTEGER NOT NULL,
            amount INTEGER NOT NULL,
            PRIMARY KEY (shift_no, card_type)
        ) WITHOUT ROWID;
        INSERT INTO shift (shift_no, device_id, driver, route, vehicle)
            SELECT shift_no, json_extract(body, '$.device_id'), json_extract(body, '$.driver'),
                   json_extract(body, '$.route'), json_extract(body, '$.vehicle')
            FROM (SELECT shift_no, body, min(device_seq) FROM record
                  WHERE shift_no > 0 AND state = 'done' GROUP BY shift_no);
        UPDATE shift SET
            opened_at = (SELECT min(json_extract(body, '$.occurred_at')) FROM record r
                         WHERE r.shift_no = shift.shift_no AND r.state = 'done'
                           AND json_extract(body, '$.kind') = 'shift_open'),
            closed_at = (SELECT max(json_extract(body, '$.occurred_at')) FROM record r
                         WHERE r.shift_no = shift.shift_no AND r.state = 'done'
                           AND json_extract(body, '$.kind') = 'shift_close'),
            close_reason = coalesce((SELECT json_extract(body, '$.reason') FROM record r
                                     WHERE r.shift_no = shift.shift_no AND r.state = 'done'
                                       AND json_extract(body, '$.kind') = 'shift_close'
                                     ORDER BY device_seq DESC LIMIT 1), ''),
            denied = (SELECT count(*) FROM record r
                      WHERE r.shift_no = shift.shift_no AND r.state = 'done'
                        AND json_extract(body, '$.kind') = 'denied'),
            first_tap = (SELECT min(json_extract(body, '$.occurred_at')) FROM record r
                         WHERE r.shift_no = shift.shift_no AND r.state = 'done'
                           AND json_extract(body, '$.kind') = 'purchase'),
            last_tap = (SELECT max(json_extract(body, '$.occurred_at')) FROM record r
                        WHERE r.shift_no = shift.shift_no AND r.state = 'done'
                          AND json_extract(body, '$.kind') = 'purchase');
        UPDATE shift SET driver = coalesce((SELECT json_extract(body, '$.driver') FROM record r
                                           WHERE r.shift_no = shift.shift_no AND r.state = 'done'
                                             AND json_extract(body, '$.kind') = 'shift_open'
                                           ORDER BY device_seq LIMIT 1), driver);
        INSERT INTO shift_fare (shift_no, card_type, taps, amount)
            SELECT shift_no, json_extract(body, '$.card_type'), count(*), sum(json_extract(body, '$.amount'))
            FROM record WHERE shift_no > 0 AND state = 'done' AND json_extract(body, '$.kind') = 'purchase'
            GROUP BY 1, 2;
    """,
    # The journal's identity, and records set aside because they could not be encoded (the reason, NULL for
    # none). A journal that already assigned sequences keeps epoch 0 (the back office holds its records so), a new
    # one gets a random 63-bit number (never 0). No semicolons in comments: statements split.
    4: """
        ALTER TABLE record ADD COLUMN set_aside TEXT;
        INSERT INTO meta (key, value)
            SELECT 'epoch', CASE WHEN CAST(value AS INTEGER) > 0 THEN '0'
                                 ELSE CAST((random() & 9223372036854775807) | 1 AS TEXT) END
            FROM meta WHERE key = 'last_seq'
    """,
    # Cardless tickets used on this bus (validator.tickets), keyed by serial (ticket id mod 10^10), so that a
    # ticket's QR code and its pickup code count as one ticket. ticket_id is decimal text: a u64 may not fit
    # SQLite's signed integer. valid_to is NULL for a pickup code (the bus does not know its validity).
    5: """
        CREATE TABLE ticket_used (
            serial INTEGER PRIMARY KEY,
            ticket_id TEXT NOT NULL,
            uses INTEGER NOT NULL,
            first_seq INTEGER NOT NULL,
            last_at INTEGER NOT NULL,
            valid_to INTEGER
        )
    """,
}


# An upper bound of what one record adds to the file (its JSON body, index entries, page slack), for deciding
# when the budget needs measuring again; a real record is about half of it.
RECORD_BYTES = 2048

# How long a used-ticket row outlives what it guards (pruning, :meth:`Journal._forget_old_tickets`).
TICKET_GRACE_SECONDS = 86400
KEEP_PICKUP_SECONDS = 180 * 86400


class JournalError(RuntimeError):
    """The journal cannot be trusted or written; the validator must stop taking fares and say why."""


class JournalFull(JournalError):
    """Unsent and grey records fill the disk budget: no new fares until the back office acknowledges some.
    Nothing unsent is ever deleted to make room."""


@dataclasses.dataclass(frozen=True)
class JournalUsage:
    """What the status screen shows about the journal's disk."""

    used_bytes: int  # pages holding data
    budget_bytes: int | None  # None: no budget
    wal_bytes: int  # the write-ahead log on top (bounded by checkpoints, not by the budget)
    unsent: int  # completed records waiting for the back office's acknowledgement
    pending: int  # grey purchases waiting for their card to come back
    oldest_unsent: datetime | None
    refusing: bool  # new records are refused (JournalFull); rechecked here, so it clears after acks
    oldest_pending: datetime | None = None  # when the oldest grey purchase was tapped
    set_aside: int = 0  # records that could not be encoded, waiting for the back office to quarantine them

    @property
    def fraction(self) -> float | None:
        return self.used_bytes / self.budget_bytes if self.budget_bytes else None


class Journal:
    """``budget_bytes``: the disk budget (see the module docstring for the policy), ``None`` for none.
    ``keep_shifts``: how many shift summaries pruning keeps (the open and the last shift among them)."""

    def __init__(self, path: str | Path, *, budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
                 keep_shifts: int = 1000):
        if budget_bytes is not None and budget_bytes < MIN_BUDGET_BYTES:
            raise ValueError(f"journal budget {budget_bytes} bytes is below the minimum {MIN_BUDGET_BYTES}")
        if keep_shifts < 2:
            raise ValueError("keep_shifts must keep at least the open and the last shift")
        self.budget_bytes = budget_bytes
        self.keep_shifts = keep_shifts
        self._refusing = False
        self._used: int | None = None  # bytes in use when last measured ...
        self._grown = 0  # ... and records written since
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the tap path and the uplink thread, serialised by a lock.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        try:
            self._open()
        except sqlite3.DatabaseError as e:  # damage bad enough that SQLite cannot even check the file
            self._db.close()
            raise JournalError(f"journal {self.path} is unreadable: {e}; keep the file for recovery") from e
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        db = self._db
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise JournalError(f"journal {self.path} failed its integrity check: {ok}; "
                               f"keep the file for recovery")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        db.execute("PRAGMA synchronous=FULL")
        sync = db.execute("PRAGMA synchronous").fetchone()[0]
        if mode.lower() != "wal" or sync != 2:
            raise JournalError(f"journal {self.path}: wanted WAL and synchronous=FULL, got {mode} and {sync}")
        self._migrate()
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        # This journal is the file's only writer: the last sequence is read once and kept in step with each
        # commit (never ahead of the disk: a transaction that fails leaves it where it was).
        self._last_seq = int(self._get("last_seq"))
        self.epoch = int(self._get("epoch"))  # this journal's identity, sent with every record (module docstring)

    def _migrate(self) -> None:
        current = self._db.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise JournalError(f"journal {self.path} has schema {current}, newer than this software "
                               f"({SCHEMA_VERSION}): install the newer validator software")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            # executescript would commit on its own; run each statement inside one explicit transaction.
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _MIGRATIONS[version].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={version}")
                    self._db.execute("COMMIT")
                except BaseException as e:
                    _rollback(self._db)
                    if isinstance(e, sqlite3.Error):
                        raise JournalError(
                            f"journal {self.path}: upgrading to schema {version} failed ({e}); it is left "
                            f"unchanged at schema {version - 1}: keep the file and report this") from e
                    raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- device sequence and small state ------------------------------------------------------------------

    def _get(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _put(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, value))

    def get_state(self, key: str) -> dict | None:
        with self._lock:
            value = self._get(f"state:{key}")
        return json.loads(value) if value is not None else None

    def put_state(self, key: str, value: dict | None) -> None:
        with self._lock, self._tx():
            self._set_state(key, value)

    def _set_state(self, key: str, value: dict | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM meta WHERE key = ?", (f"state:{key}",))
        else:
            self._put(f"state:{key}", json.dumps(value))

    # -- records ---------------------------------------------------------------------------------------------

    def _tx(self):
        return _Transaction(self._db)

    def _write(self, record: TapRecord, state: str) -> None:
        body = json.dumps(to_plain(record), separators=(",", ":"))
        self._db.execute(
            "INSERT INTO record (device_seq, state, shift_no, body) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(device_seq) DO UPDATE SET state = excluded.state, shift_no = excluded.shift_no, "
            "body = excluded.body",
            (record.device_seq, state, record.shift_no, body))

    def _assign(self, record: TapRecord) -> TapRecord:
        """The next device sequence and this journal's epoch, written in the caller's transaction, with texts cut
        to the wire's limits; call :meth:`_assigned` after COMMIT."""
        seq = self._last_seq + 1
        self._put("last_seq", str(seq))
        return sendable(dataclasses.replace(record, device_seq=seq, epoch=self.epoch))

    def _assigned(self, record: TapRecord) -> TapRecord:
        self._last_seq = record.device_seq
        self._grown += 1
        return record

    def append(self, record: TapRecord, *, state: dict[str, dict | None] | None = None) -> TapRecord:
        """A finished record (shift event, refusal), given the next device sequence; on disk on return.
        ``state`` (key -> value, None to delete) is saved in the same transaction, so a shift and its record
        never disagree."""
        with self._lock:
            if record.kind is not RecordKind.SHIFT_CLOSE:  # a sign-out is always written (from the reserve)
                self._make_room()
            with self._tx():
                record = self._assign(record)
                self._write(record, "done")
                self._summarise(record)
                for key, value in (state or {}).items():
                    self._set_state(key, value)
            return self._assigned(record)

    def begin_purchase(self, record: TapRecord) -> TapRecord:
        """The grey record, given the next device sequence; on disk before the DEBIT is sent to the card.
        Raises :class:`JournalFull` when unsent records fill the budget (no DEBIT may follow then)."""
        with self._lock:
            self._make_room()
            with self._tx():
                record = self._assign(record)
                self._write(record, "pending")
            return self._assigned(record)

    def complete_purchase(self, record: TapRecord) -> TapRecord:
        """The purchase with its TAC, on disk before the rider is told "OK". Never refused by the budget: the
        card has been debited. Counted in its shift's summary once, however often it is completed. Returns the
        record as written (texts cut to the wire's limits)."""
        record = sendable(dataclasses.replace(record, epoch=self.epoch))
        body = json.dumps(to_plain(record), separators=(",", ":"))
        with self._lock, self._tx():
            # The usual case, the grey record turned done, is one statement; anything else takes the long way.
            cur = self._db.execute("UPDATE record SET state = 'done', shift_no = ?, body = ? "
                                   "WHERE device_seq = ? AND state = 'pending'",
                                   (record.shift_no, body, record.device_seq))
            if cur.rowcount == 1:
                self._summarise(record)
                return record
            row = self._db.execute("SELECT state FROM record WHERE device_seq = ?",
                                   (record.device_seq,)).fetchone()
            self._write(record, "done")
            if row is None or row[0] != "done":
                self._summarise(record)
        return record

    def use_ticket(self, record: TapRecord, *, serial: int, max_uses: int,
                   valid_to: datetime | None = None) -> TapRecord | None:
        """A ``ticket_use`` record, given the next device sequence and the ticket's next use number, written in
        one transaction with the ticket's use count here; on disk on return. None, and nothing written, when the
        ticket (by ``serial``) has had ``max_uses`` uses on this validator already (0: unlimited). Raises
        :class:`JournalFull` as a new purchase would."""
        with self._lock:
            self._make_room()
            with self._tx():
                row = self._db.execute("SELECT uses FROM ticket_used WHERE serial = ?", (serial,)).fetchone()
                used = row[0] if row else 0
                if max_uses and used >= max_uses:
                    return None
                record = self._assign(dataclasses.replace(record, ticket_use=used + 1))
                self._write(record, "done")
                at = int(record.occurred_at.timestamp())
                until = int(valid_to.timestamp()) if valid_to is not None else None
                self._db.execute(
                    "INSERT INTO ticket_used (serial, ticket_id, uses, first_seq, last_at, valid_to) "
                    "VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT(serial) DO UPDATE SET uses = uses + 1, "
                    "last_at = excluded.last_at, valid_to = coalesce(excluded.valid_to, valid_to)",
                    (serial, str(record.ticket_id), record.device_seq, at, until))
            return self._assigned(record)

    def _forget_old_tickets(self) -> None:
        """Used-ticket rows no check needs any more, in the caller's transaction: a QR ticket a day after its
        validity ended (validity refuses it by itself from then on), a pickup serial (whose validity the bus
        does not know) :data:`KEEP_PICKUP_SECONDS` after its last use; "now" is the newest use here (the journal
        has no clock of its own)."""
        self._db.execute("DELETE FROM ticket_used WHERE coalesce(valid_to + ?, last_at + ?) < "
                         "(SELECT max(last_at) FROM ticket_used)", (TICKET_GRACE_SECONDS, KEEP_PICKUP_SECONDS))

    def ticket_used(self, serial: int) -> tuple[int, datetime] | None:
        """How many times the ticket with this serial was used here, and when last; None if never."""
        with self._lock:
            row = self._db.execute("SELECT uses, last_at FROM ticket_used WHERE serial = ?", (serial,)).fetchone()
        return None if row is None else (row[0], utc(row[1]))

    def cancel(self, device_seq: int) -> None:
        with self._lock, self._tx():
            self._db.execute("UPDATE record SET state = 'cancelled' "
                             "WHERE device_seq = ? AND state = 'pending'",
                             (device_seq,))

    def pending(self) -> list[TapRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM record WHERE state = 'pending' ORDER BY device_seq").fetchall()
        return [from_plain(json.loads(b)) for (b,) in rows]

    def unsent(self, limit: int) -> list[TapRecord]:
        """Completed records not yet acknowledged, oldest first (those set aside are not among them)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM record WHERE state = 'done' AND acked = 0 AND set_aside IS NULL "
                "ORDER BY device_seq LIMIT ?", (limit,)).fetchall()
        return [from_plain(json.loads(b)) for (b,) in rows]

    def set_aside(self, reasons: dict[int, str]) -> int:
        """Take records that cannot be encoded out of the outbox (device_seq -> why): they are kept, sent as
        "set aside" for the back office to quarantine (:meth:`set_aside_unsent`), and pruned only once that is
        acknowledged, like any record. Returns how many were set aside."""
        with self._lock, self._tx():
            cur = self._db.executemany("UPDATE record SET set_aside = ? WHERE device_seq = ? AND state = 'done' "
                                       "AND acked = 0", [(why or "?", seq) for seq, why in reasons.items()])
            return cur.rowcount

    def set_aside_unsent(self, limit: int) -> list[tuple[int, str, bytes]]:
        """Set-aside records not yet acknowledged: (device_seq, reason, the body the journal holds), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_seq, set_aside, body FROM record WHERE state = 'done' AND acked = 0 "
                "AND set_aside IS NOT NULL ORDER BY device_seq LIMIT ?", (limit,)).fetchall()
        return [(seq, why, body.encode("utf-8", "replace")) for seq, why, body in rows]

    def mark_acked(self, seqs) -> int:
        seqs = list(seqs)
        with self._lock, self._tx():
            cur = self._db.executemany("UPDATE record SET acked = 1 WHERE device_seq = ? AND state = 'done'",
                                       [(s,) for s in seqs])
            return cur.rowcount

    def backlog(self) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT count(*) FROM record WHERE state = 'done' AND acked = 0").fetchone()[0]

    def oldest_unsent(self) -> datetime | None:
        rows = self.unsent(1)
        return rows[0].occurred_at if rows else None

    def records_since(self, device_seq: int) -> list[TapRecord]:
        """Completed records from a sequence on, as far as the budget has kept them."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM record WHERE state = 'done' AND device_seq >= ? "
                                    "ORDER BY device_seq", (device_seq,)).fetchall()
        return [from_plain(json.loads(b)) for (b,) in rows]

    def record(self, device_seq: int) -> tuple[TapRecord, str] | None:
        """One record by its sequence and its state (pending, done, cancelled); None if never written or pruned."""
        with self._lock:
            row = self._db.execute("SELECT body, state FROM record WHERE device_seq = ?", (device_seq,)).fetchone()
        return None if row is None else (from_plain(json.loads(row[0])), row[1])

    # -- shifts ----------------------------------------------------------------------------------------------

    def _summarise(self, record: TapRecord) -> None:
        """Fold one completed record into its shift's summary, inside the caller's transaction."""
        if record.shift_no <= 0:  # e.g. a deny-listed card with nobody signed in
            return
        no, at = record.shift_no, int(record.occurred_at.timestamp())
        if record.kind is RecordKind.SHIFT_OPEN:
            update = (("UPDATE shift SET opened_at = ?, driver = ?, device_id = ?, route = ?, vehicle = ? "
                       "WHERE shift_no = ?"),
                      (at, record.driver, record.device_id, record.route, record.vehicle, no))
        elif record.kind is RecordKind.SHIFT_CLOSE:
            update = ("UPDATE shift SET closed_at = ?, close_reason = ? WHERE shift_no = ?",
                      (at, record.reason, no))
        elif record.kind is RecordKind.DENIED:
            update = ("UPDATE shift SET denied = denied + 1 WHERE shift_no = ?", (no,))
        elif record.kind is RecordKind.PURCHASE:
            self._db.execute("INSERT INTO shift_fare VALUES (?, ?, 1, ?) ON CONFLICT(shift_no, card_type) "
                             "DO UPDATE SET taps = taps + 1, amount = amount + excluded.amount",
                             (no, int(record.card_type), record.amount))
            update = (("UPDATE shift SET first_tap = min(coalesce(first_tap, ?1), ?1), "
                       "last_tap = max(coalesce(last_tap, ?1), ?1) WHERE shift_no = ?2"), (at, no))
        else:
            return
        # The shift's row is made by its sign-in; a record of a shift without one (a journal from older software,
        # a shift pruned long ago) makes it here.
        if self._db.execute(*update).rowcount == 0:
            self._db.execute("INSERT INTO shift (shift_no, device_id, driver, route, vehicle) "
                             "VALUES (?, ?, ?, ?, ?) ON CONFLICT(shift_no) DO NOTHING",
                             (no, record.device_id, record.driver, record.route, record.vehicle))
            self._db.execute(*update)

    def last_shift_no(self) -> int | None:
        """The newest shift this validator has had (open or closed), None before the first sign-in."""
        with self._lock:
            (no,) = self._db.execute("SELECT max(shift_no) FROM shift").fetchone()
        last = (self.get_state("last_shift") or {}).get("shift_no")
        known = [n for n in (no, last) if n]
        return max(known) if known else None

    def records_of_shift(self, shift_no: int) -> list[TapRecord]:
        """The shift's completed records that the budget has not pruned, in order (pending and cancelled left
        out). For totals use :meth:`shift_report`, which does not depend on them."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM record WHERE shift_no = ? AND state = 'done' "
                                    "ORDER BY device_seq", (shift_no,)).fetchall()
        return [from_plain(json.loads(b)) for (b,) in rows]

    def shift_report(self, shift_no: int) -> ShiftReport | None:
        """The shift's totals from its summary (complete even after pruning); None for a shift never seen."""
        with self._lock:
            row = self._db.execute(
                "SELECT device_id, driver, route, vehicle, opened_at, closed_at, close_reason, denied, "
                "first_tap, last_tap FROM shift WHERE shift_no = ?", (shift_no,)).fetchone()
            if row is None:
                return None
            fares = self._db.execute("SELECT card_type, taps, amount FROM shift_fare WHERE shift_no = ? "
                                     "ORDER BY card_type", (shift_no,)).fetchall()
            (unsettled,) = self._db.execute(
                "SELECT count(*) FROM record WHERE state = 'pending' AND shift_no = ?",
                (shift_no,)).fetchone()
        device_id, driver, route, vehicle, opened, closed, reason, denied, first, last = row

        def when(ts):
            return utc(ts) if ts is not None else None

        return ShiftReport(device_id=device_id, shift_no=shift_no, driver=driver, route=route,
                           vehicle=vehicle, opened_at=when(opened), closed_at=when(closed),
                           close_reason=reason,
                           rows=tuple(FareRow(*f) for f in fares), denied=denied, first_tap=when(first),
                           last_tap=when(last), unsettled=unsettled)

    # -- disk budget -----------------------------------------------------------------------------------------

    def _used_bytes(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        self._used, self._grown = (pages - free) * self._page_size, 0
        return self._used

    def _make_room(self) -> None:
        """Before a record that may be refused: prune if near the budget, refuse if unsent records fill it."""
        if self.budget_bytes is None:
            return
        # Far from the line, the file is measured again only once the records written since could have crossed
        # it (a generous RECORD_BYTES each), not on every tap.
        if (self._used is not None and not self._refusing
                and self._used + self._grown * RECORD_BYTES < PRUNE_AT * self.budget_bytes):
            return
        used = self._used_bytes()
        if used >= PRUNE_AT * self.budget_bytes:
            self._prune(int(PRUNE_TO * self.budget_bytes))
            used = self._used_bytes()
        self._refusing = used >= REFUSE_AT * self.budget_bytes
        if self._refusing:
            unsent, oldest, pending, _ = self._outbox()
            since = f" (the oldest from {oldest:%Y-%m-%d %H:%M} UTC)" if oldest else ""
            grey = f" and {pending} unsettled purchases" if pending else ""
            raise JournalFull(
                f"journal full: {unsent} unsent taps{since}{grey} use {used} of its {self.budget_bytes} "
                f"bytes; restore the link so the back office can acknowledge them, and fares resume by "
                f"themselves; nothing unsent is deleted")

    def _outbox(self) -> tuple[int, datetime | None, int, datetime | None]:
        """Unsent records and the oldest one's time; grey records and the oldest one's time."""
        (unsent,) = self._db.execute(
            "SELECT count(*) FROM record WHERE state = 'done' AND acked = 0").fetchone()
        (pending,) = self._db.execute("SELECT count(*) FROM record WHERE state = 'pending'").fetchone()
        return unsent, self._oldest("state = 'done' AND acked = 0"), pending, self._oldest("state = 'pending'")

    def _oldest(self, where: str) -> datetime | None:
        row = self._db.execute(f"SELECT body FROM record WHERE {where} ORDER BY device_seq LIMIT 1").fetchone()
        return from_plain(json.loads(row[0])).occurred_at if row else None

    def prune(self) -> int:
        """Delete acknowledged (and cancelled) records oldest first down to the budget's low-water mark, if
        use is past its high-water mark; returns how many records went. Unsent and pending records are never
        touched. Writes call this themselves; a housekeeping timer may call it when acknowledgements come."""
        with self._lock:
            if self.budget_bytes is None or self._used_bytes() < PRUNE_AT * self.budget_bytes:
                return 0
            return self._prune(int(PRUNE_TO * self.budget_bytes))

    def _prune(self, target: int) -> int:
        deleted = 0
        # Deleting a run of the oldest rows frees whole pages; estimate how many rows the excess holds and go
        # round again if freed pages fall short (indexes, partly filled pages).
        for _ in range(8):
            used = self._used_bytes()
            if used <= target:
                break
            (rows,) = self._db.execute("SELECT count(*) FROM record").fetchone()
            if rows == 0:
                break
            batch = max(16, math.ceil((used - target) / (used / rows) * 1.2))
            with self._tx():
                cur = self._db.execute(
                    "DELETE FROM record WHERE device_seq IN (SELECT device_seq FROM record "
                    "WHERE (state = 'done' AND acked = 1) OR state = 'cancelled' "
                    "ORDER BY device_seq LIMIT ?)",
                    (batch,))
                self._db.execute(
                    "DELETE FROM shift_fare WHERE shift_no <= (SELECT max(shift_no) FROM shift) - ?",
                    (self.keep_shifts,))
                self._db.execute("DELETE FROM shift WHERE shift_no <= (SELECT max(shift_no) FROM shift) - ?",
                                 (self.keep_shifts,))
                self._forget_old_tickets()
            if cur.rowcount <= 0:
                break
            deleted += cur.rowcount
        return deleted

    def usage(self) -> JournalUsage:
        with self._lock:
            if self._refusing:
                # Acknowledgements may have come since the last refusal: let the status screen see fares
                # resume without waiting for the next rider.
                try:
                    self._make_room()
                except JournalFull:
                    pass
            used = self._used_bytes()
            unsent, oldest, pending, oldest_pending = self._outbox()
            (aside,) = self._db.execute("SELECT count(*) FROM record WHERE state = 'done' AND acked = 0 "
                                        "AND set_aside IS NOT NULL").fetchone()
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            wal = 0
        return JournalUsage(used_bytes=used, budget_bytes=self.budget_bytes, wal_bytes=wal, unsent=unsent,
                            pending=pending, oldest_unsent=oldest, refusing=self._refusing,
                            oldest_pending=oldest_pending, set_aside=aside)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; with synchronous=FULL the COMMIT is the fsync."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        if exc_type:
            _rollback(self._db)
        else:
            self._db.execute("COMMIT")
        return False


def _rollback(db: sqlite3.Connection) -> None:
    # On SQLITE_FULL or an I/O error SQLite may already have rolled the transaction back itself; a second
    # ROLLBACK would raise "no transaction is active" and hide the error that says what happened (disk full).
    if db.in_transaction:
        db.execute("ROLLBACK")

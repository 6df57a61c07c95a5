"""The validator's own disk: every tap it saw, kept in SQLite until the back office has acknowledged it.

Durability beats speed here: WAL with synchronous=FULL (checked at open, not assumed), ``integrity_check`` at open,
a schema version in ``user_version`` with all-or-nothing migrations. A purchase is written twice: as a pending
("grey") record before the DEBIT goes to the card, and completed with its TAC before the rider is told "OK", so a
crash or a pulled card can never lose a debit. The device sequence is kept in the journal itself and only ever
grows, across restarts.

The journal is also the uplink's outbox: completed records stay until their batch is acknowledged.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from datetime import datetime
from pathlib import Path

from wire.records import TapRecord, from_plain, to_plain

SCHEMA_VERSION = 2

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
}


class JournalError(RuntimeError):
    """The journal cannot be trusted or written; the validator must stop taking fares and say why."""


class Journal:
    def __init__(self, path: str | Path):
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
            raise JournalError(f"journal {self.path} failed its integrity check: {ok}; keep the file for recovery")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        db.execute("PRAGMA synchronous=FULL")
        sync = db.execute("PRAGMA synchronous").fetchone()[0]
        if mode.lower() != "wal" or sync != 2:
            raise JournalError(f"journal {self.path}: wanted WAL and synchronous=FULL, got {mode} and {sync}")
        self._migrate()

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
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- device sequence and small state ------------------------------------------------------------------

    def _get(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _put(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
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
            "INSERT INTO record (device_seq, state, body) VALUES (?, ?, ?) "
            "ON CONFLICT(device_seq) DO UPDATE SET state = excluded.state, body = excluded.body",
            (record.device_seq, state, body))

    def _assign(self, record: TapRecord) -> TapRecord:
        seq = int(self._get("last_seq")) + 1
        self._put("last_seq", str(seq))
        return dataclasses.replace(record, device_seq=seq)

    def append(self, record: TapRecord, *, state: dict[str, dict | None] | None = None) -> TapRecord:
        """A finished record (shift event, refusal), given the next device sequence; on disk when this returns.
        ``state`` (key -> value, None to delete) is saved in the same transaction, so a shift and its record
        never disagree."""
        with self._lock, self._tx():
            record = self._assign(record)
            self._write(record, "done")
            for key, value in (state or {}).items():
                self._set_state(key, value)
        return record

    def begin_purchase(self, record: TapRecord) -> TapRecord:
        """The grey record, given the next device sequence; on disk before the DEBIT is sent to the card."""
        with self._lock, self._tx():
            record = self._assign(record)
            self._write(record, "pending")
        return record

    def complete_purchase(self, record: TapRecord) -> None:
        """The purchase with its TAC, on disk before the rider is told "OK"."""
        with self._lock, self._tx():
            self._write(record, "done")

    def cancel(self, device_seq: int) -> None:
        with self._lock, self._tx():
            self._db.execute("UPDATE record SET state = 'cancelled' WHERE device_seq = ? AND state = 'pending'",
                             (device_seq,))

    def pending(self) -> list[TapRecord]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM record WHERE state = 'pending' ORDER BY device_seq").fetchall()
        return [from_plain(json.loads(b)) for (b,) in rows]

    def unsent(self, limit: int) -> list[TapRecord]:
        """Completed records not yet acknowledged, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM record WHERE state = 'done' AND acked = 0 ORDER BY device_seq LIMIT ?",
                (limit,)).fetchall()
        return [from_plain(json.loads(b)) for (b,) in rows]

    def mark_acked(self, seqs) -> int:
        seqs = list(seqs)
        with self._lock, self._tx():
            cur = self._db.executemany("UPDATE record SET acked = 1 WHERE device_seq = ? AND state = 'done'",
                                       [(s,) for s in seqs])
            return cur.rowcount

    def backlog(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM record WHERE state = 'done' AND acked = 0").fetchone()[0]

    def oldest_unsent(self) -> datetime | None:
        rows = self.unsent(1)
        return rows[0].occurred_at if rows else None

    def records_since(self, device_seq: int) -> list[TapRecord]:
        """Completed records from a sequence on (the driver's shift report reads these)."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM record WHERE state = 'done' AND device_seq >= ? "
                                    "ORDER BY device_seq", (device_seq,)).fetchall()
        return [from_plain(json.loads(b)) for (b,) in rows]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; with synchronous=FULL the COMMIT is the fsync."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False

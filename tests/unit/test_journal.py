"""validator.journal: durability settings read back, integrity check on open, schema version, the device
sequence across restarts, the grey-record flow, the uplink outbox, small state, and a record that survives
its process being killed right after append() returned."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import pytest

from validator.journal import SCHEMA_VERSION, Journal, JournalError
from wire.records import RecordKind, TapRecord

T0 = datetime(2024, 3, 5, 7, 30, 0, tzinfo=UTC)


def rec(kind: RecordKind = RecordKind.SHIFT_OPEN, *, minutes: int = 0, **kw) -> TapRecord:
    base = {
        "device_id": "bus0042",
        "device_seq": 0,
        "kind": kind,
        "occurred_at": T0 + timedelta(minutes=minutes),
        "operator": "citybus",
        "route": "r12",
        "vehicle": "v7",
        "driver": "D1001",
        "shift_no": 1,
    }
    if kind is RecordKind.PURCHASE:
        base.update(
            card_asn="31000000000000012345",
            card_type=1,
            card_ttc=4,
            amount=200,
            balance_after=800,
            terminal_id="010000000042",
            terminal_seq=9,
        )
    base.update(kw)
    return TapRecord(**base)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "bus.journal")
    yield j
    j.close()


# --------------------------------------------------------------------------------------- opening


def test_opens_with_wal_and_synchronous_full(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path)
    try:
        # synchronous is per connection: read it on the journal's own connection
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        # journal_mode=WAL is stored in the file: a separate connection sees it
        other = sqlite3.connect(path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        finally:
            other.close()
    finally:
        j.close()


def test_creates_its_folder(tmp_path):
    j = Journal(tmp_path / "a" / "b" / "bus.journal")
    j.close()
    assert (tmp_path / "a" / "b" / "bus.journal").is_file()


def _real_journal_copy(tmp_path, n: int = 400):
    """A real journal with enough records to span many pages, closed (checkpointed), and its page size."""
    path = tmp_path / "real.journal"
    j = Journal(path)
    for i in range(n):
        j.append(rec(minutes=i, reason="x" * 200))
    j.close()
    con = sqlite3.connect(path)
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    copy = tmp_path / "copy.journal"
    shutil.copy(path, copy)
    return copy, page_size, pages


def test_corrupted_record_pages_fail_the_integrity_check(tmp_path):
    copy, page_size, pages = _real_journal_copy(tmp_path)
    assert pages > 10
    data = bytearray(copy.read_bytes())
    # Leaf pages of the record table: overwrite the cell area of the last few pages with a fixed pattern
    # (headers kept, so SQLite reads the page and the check, not the parser, finds the damage).
    for page in range(pages - 4, pages):
        start = page * page_size + 200
        data[start : start + page_size - 400] = bytes([0xA5]) * (page_size - 400)
    copy.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="integrity"):
        Journal(copy)


@pytest.mark.parametrize("damage", ["file header", "all page headers"])
def test_a_journal_too_damaged_to_check_raises_journal_error(tmp_path, damage):
    copy, page_size, pages = _real_journal_copy(tmp_path)
    data = bytearray(copy.read_bytes())
    if damage == "file header":
        data[0:16] = b"not a journal!!\x00"
    else:
        for page in range(1, pages):
            data[page * page_size : page * page_size + 12] = bytes([0xA5]) * 12
    copy.write_bytes(bytes(data))
    with pytest.raises(JournalError):
        Journal(copy)


def test_a_file_that_is_not_a_database_at_all_is_not_opened_silently(tmp_path):
    path = tmp_path / "bus.journal"
    path.write_bytes(b"hello, I am a text file and not a journal" * 100)
    with pytest.raises((JournalError, sqlite3.DatabaseError)):  # the JournalError part is the xfail above
        Journal(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "bus.journal"
    Journal(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match="newer"):
        Journal(path)


def test_reopening_does_not_migrate_again_or_lose_records(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path)
    j.append(rec())
    j.close()
    j = Journal(path)
    try:
        assert [r.device_seq for r in j.unsent(10)] == [1]
    finally:
        j.close()


# --------------------------------------------------------------------------------------- device sequence


def test_device_sequence_strictly_increases_across_reopen(tmp_path):
    path = tmp_path / "bus.journal"
    seen = []
    for _ in range(3):
        j = Journal(path)
        seen.append(j.append(rec()).device_seq)
        grey = j.begin_purchase(rec(RecordKind.PURCHASE))
        seen.append(grey.device_seq)
        j.cancel(grey.device_seq)
        seen.append(j.append(rec(RecordKind.SHIFT_CLOSE)).device_seq)
        j.mark_acked(seen)
        j.close()
    assert seen == list(range(1, 10))  # acked and cancelled records never give their numbers back


def test_append_ignores_the_sequence_the_caller_put_in(journal):
    assert journal.append(rec(device_seq=777)).device_seq == 1
    assert journal.append(rec(device_seq=1)).device_seq == 2


# --------------------------------------------------------------------------------------- purchases


def test_pending_then_complete(journal):
    grey = journal.begin_purchase(rec(RecordKind.PURCHASE))
    assert grey.device_seq == 1 and grey.tac == ""
    assert journal.pending() == [grey]
    assert journal.unsent(10) == [] and journal.backlog() == 0
    done = dataclasses.replace(grey, tac="620098f7")
    journal.complete_purchase(done)
    assert journal.pending() == []
    assert journal.unsent(10) == [done] and journal.backlog() == 1


def test_pending_then_cancel(journal):
    grey = journal.begin_purchase(rec(RecordKind.PURCHASE))
    journal.cancel(grey.device_seq)
    assert journal.pending() == [] and journal.unsent(10) == [] and journal.backlog() == 0
    assert journal.records_since(0) == []


def test_cancel_does_not_touch_a_completed_record(journal):
    grey = journal.begin_purchase(rec(RecordKind.PURCHASE))
    done = dataclasses.replace(grey, tac="620098f7")
    journal.complete_purchase(done)
    journal.cancel(grey.device_seq)
    assert journal.unsent(10) == [done]


def test_pending_survives_reopen(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path)
    grey = j.begin_purchase(rec(RecordKind.PURCHASE))
    j.close()
    j = Journal(path)
    try:
        assert j.pending() == [grey] and j.unsent(5) == []
    finally:
        j.close()


# --------------------------------------------------------------------------------------- outbox


def test_unsent_is_oldest_first_and_limited(journal):
    written = [journal.append(rec(minutes=i)) for i in range(7)]
    grey = journal.begin_purchase(rec(RecordKind.PURCHASE, minutes=8))  # pending: never in the outbox
    assert journal.unsent(3) == written[:3]
    assert journal.unsent(100) == written
    assert grey not in journal.unsent(100)
    assert journal.backlog() == 7
    assert journal.oldest_unsent() == T0


def test_mark_acked_removes_from_the_backlog(journal):
    written = [journal.append(rec(minutes=i)) for i in range(5)]
    assert journal.mark_acked([written[0].device_seq, written[2].device_seq]) == 2
    assert [r.device_seq for r in journal.unsent(10)] == [2, 4, 5]
    assert journal.backlog() == 3
    assert journal.oldest_unsent() == T0 + timedelta(minutes=1)
    # acked records still count for the shift report
    assert len(journal.records_since(1)) == 5


def test_mark_acked_of_unknown_or_pending_sequences_changes_nothing(journal):
    journal.append(rec())
    grey = journal.begin_purchase(rec(RecordKind.PURCHASE))
    assert journal.mark_acked([999, grey.device_seq]) == 0
    assert journal.backlog() == 1 and journal.pending() == [grey]


def test_empty_outbox(journal):
    assert journal.unsent(10) == [] and journal.backlog() == 0 and journal.oldest_unsent() is None


def test_records_since(journal):
    for i in range(4):
        journal.append(rec(minutes=i))
    assert [r.device_seq for r in journal.records_since(3)] == [3, 4]


# --------------------------------------------------------------------------------------- state


def test_state_get_put(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path)
    assert j.get_state("shift") is None
    j.put_state("shift", {"driver": "D1001", "shift_no": 4})
    j.close()
    j = Journal(path)
    try:
        assert j.get_state("shift") == {"driver": "D1001", "shift_no": 4}
        j.put_state("shift", None)
        assert j.get_state("shift") is None
        j.put_state("shift", None)  # clearing twice is fine
    finally:
        j.close()


def test_append_with_state_saves_both(journal):
    r = journal.append(rec(), state={"shift": {"driver": "D1001", "shift_no": 1}})
    assert journal.get_state("shift") == {"driver": "D1001", "shift_no": 1}
    assert journal.unsent(10) == [r]
    journal.append(rec(RecordKind.SHIFT_CLOSE), state={"shift": None})
    assert journal.get_state("shift") is None


def test_append_with_state_is_all_or_nothing(journal):
    journal.put_state("shift", {"driver": "D1001"})
    with pytest.raises(TypeError):  # a set cannot be written as JSON: fails after the record was written
        journal.append(rec(), state={"shift": {"bad": {1, 2}}})
    assert journal.unsent(10) == [] and journal.backlog() == 0
    assert journal.get_state("shift") == {"driver": "D1001"}
    # the sequence number was not used up either
    assert journal.append(rec()).device_seq == 1


# --------------------------------------------------------------------------------------- killed process

CHILD = textwrap.dedent("""
    import os, sys
    from datetime import datetime, timezone
    from validator.journal import Journal
    from wire.records import RecordKind, TapRecord

    j = Journal(sys.argv[1])
    r = j.append(TapRecord(device_id="bus0042", device_seq=0, kind=RecordKind.SHIFT_OPEN,
                           occurred_at=datetime(2024, 3, 5, 7, 30, tzinfo=timezone.utc), operator="citybus",
                           route="r12", vehicle="v7", driver="D1001", shift_no=1),
                 state={"shift": {"driver": "D1001", "shift_no": 1}})
    g = j.begin_purchase(TapRecord(device_id="bus0042", device_seq=0, kind=RecordKind.PURCHASE,
                                   occurred_at=datetime(2024, 3, 5, 7, 31, tzinfo=timezone.utc),
                                   operator="citybus", route="r12", vehicle="v7", driver="D1001", shift_no=1,
                                   card_asn="31000000000000012345", amount=200))
    os.write(1, f"{r.device_seq} {g.device_seq}".encode())
    os._exit(0)  # no close(), no checkpoint, no atexit: as if the power went
""")


def test_a_record_survives_its_process_dying_right_after_append(tmp_path):
    path = tmp_path / "bus.journal"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, timeout=60, check=True
    )
    seq, grey_seq = map(int, out.stdout.split())
    assert (seq, grey_seq) == (1, 2)
    assert (tmp_path / "bus.journal-wal").exists()  # the records were still only in the WAL
    j = Journal(path)
    try:
        [record] = j.unsent(10)
        assert record.device_seq == 1 and record.kind is RecordKind.SHIFT_OPEN and record.driver == "D1001"
        assert record.occurred_at == datetime(2024, 3, 5, 7, 30, tzinfo=UTC)
        assert j.get_state("shift") == {"driver": "D1001", "shift_no": 1}
        [grey] = j.pending()
        assert grey.device_seq == 2 and grey.amount == 200
        assert j.append(rec()).device_seq == 3
    finally:
        j.close()


def _v1_journal(path):
    """A journal as the first validator software left it: schema 1, one unsent record."""
    from validator import journal as journal_module

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in journal_module._MIGRATIONS[1].split(";"):
        if statement.strip():
            db.execute(statement)
    body = ('{"device_id":"bus1","device_seq":1,"kind":"shift_open","occurred_at":1709623800,'
            '"operator":"op","route":"r","vehicle":"v","driver":"d","shift_no":1}')
    db.execute("INSERT INTO record (device_seq, state, body) VALUES (1, 'done', ?)", (body,))
    db.execute("UPDATE meta SET value = '1' WHERE key = 'last_seq'")
    db.execute("PRAGMA user_version=1")
    db.close()


def test_a_schema_1_journal_is_migrated_keeping_its_records(tmp_path):
    path = tmp_path / "old.journal"
    _v1_journal(path)
    journal = Journal(path)
    assert [r.device_seq for r in journal.unsent(10)] == [1]
    journal.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'record_pending'").fetchone()
    db.close()


def test_a_migration_that_breaks_halfway_changes_nothing(tmp_path, monkeypatch):
    from validator import journal as journal_module

    path = tmp_path / "old.journal"
    _v1_journal(path)
    broken = "CREATE INDEX record_pending ON record (device_seq) WHERE state = 'pending'; THIS IS NOT SQL"
    monkeypatch.setitem(journal_module._MIGRATIONS, 2, broken)
    with pytest.raises(JournalError):
        Journal(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'record_pending'").fetchone() is None
    db.close()
    monkeypatch.undo()
    journal = Journal(path)  # the real migration still applies afterwards
    assert journal.backlog() == 1
    journal.close()

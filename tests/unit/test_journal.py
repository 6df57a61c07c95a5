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

from validator.journal import (
    DEFAULT_BUDGET_BYTES,
    REFUSE_AT,
    SCHEMA_VERSION,
    Journal,
    JournalError,
    JournalFull,
)
from validator.shift_report import ShiftReport
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
            assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
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
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
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


# --------------------------------------------------------------------------------------- schema 2 -> 3


def _v2_journal(path, records):
    """A journal as schema-2 software left it, holding ``records`` as (record, state, acked)."""
    import json

    from validator import journal as journal_module
    from wire.records import to_plain

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for version in (1, 2):
        for statement in journal_module._MIGRATIONS[version].split(";"):
            if statement.strip():
                db.execute(statement)
    for record, state, acked in records:
        db.execute("INSERT INTO record (device_seq, state, acked, body) VALUES (?, ?, ?, ?)",
                   (record.device_seq, state, acked, json.dumps(to_plain(record))))
    db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(len(records)),))
    db.execute("INSERT INTO meta VALUES ('state:last_shift', '{\"shift_no\": 2}')")
    db.execute("PRAGMA user_version=2")
    db.close()


def _v2_records():
    """Two shifts ended by a hand-over; fares of four card types, one still grey, one cancelled, a denial."""
    seq = iter(range(1, 100))
    out = [(rec(RecordKind.SHIFT_OPEN, device_seq=next(seq)), "done", 1)]
    for i, (card_type, amount) in enumerate([(1, 200), (2, 100), (1, 200), (3, 0), (2, 100), (1, 150)]):
        out.append((rec(RecordKind.PURCHASE, device_seq=next(seq), minutes=i + 1, card_type=card_type,
                        amount=amount), "done", i % 2))
    out.append((rec(RecordKind.PURCHASE, device_seq=next(seq), minutes=10, amount=200), "pending", 0))
    out.append((rec(RecordKind.PURCHASE, device_seq=next(seq), minutes=11, amount=200), "cancelled", 0))
    out.append((rec(RecordKind.DENIED, device_seq=next(seq), minutes=12, reason="on deny list"), "done", 0))
    out.append((rec(RecordKind.SHIFT_CLOSE, device_seq=next(seq), minutes=20, reason="handed over to D2002"),
                "done", 0))
    out.append((rec(RecordKind.SHIFT_OPEN, device_seq=next(seq), minutes=20, driver="D2002", shift_no=2),
                "done", 0))
    out.append((rec(RecordKind.PURCHASE, device_seq=next(seq), minutes=21, driver="D2002", shift_no=2,
                    card_type=4, amount=0), "done", 0))
    return out


def _expected(records, shift_no):
    """Totals of one shift computed here, independently of the journal and of ShiftReport."""
    rows: dict[int, list[int]] = {}
    taps = amount = denied = 0
    for record, state, _acked in records:
        if record.shift_no != shift_no or state != "done":
            continue
        if record.kind is RecordKind.PURCHASE:
            rows.setdefault(record.card_type, [0, 0])
            rows[record.card_type][0] += 1
            rows[record.card_type][1] += record.amount
            taps += 1
            amount += record.amount
        denied += record.kind is RecordKind.DENIED
    return {t: tuple(v) for t, v in rows.items()}, taps, amount, denied


def _totals(report):
    return {r.card_type: (r.taps, r.amount) for r in report.rows}, report.taps, report.amount, report.denied


def test_a_schema_2_journal_is_migrated_with_its_shift_summaries(tmp_path):
    path = tmp_path / "v2.journal"
    records = _v2_records()
    _v2_journal(path, records)
    j = Journal(path)
    try:
        assert j._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        for shift_no in (1, 2):
            assert _totals(j.shift_report(shift_no)) == _expected(records, shift_no)
        first = j.shift_report(1)
        assert (first.driver, first.opened_at, first.closed_at) == ("D1001", T0, T0 + timedelta(minutes=20))
        assert first.close_reason == "handed over to D2002" and first.unsettled == 1
        assert (first.first_tap, first.last_tap) == (T0 + timedelta(minutes=1), T0 + timedelta(minutes=6))
        second = j.shift_report(2)
        assert second.driver == "D2002" and second.closed_at is None and second.unsettled == 0
        assert j.last_shift_no() == 2
        assert [r.device_seq for r in j.records_of_shift(2)] == [12, 13]
        # the records themselves are as they were
        assert [r.device_seq for r in j.pending()] == [8]
        assert j.backlog() == sum(1 for _r, state, acked in records if state == "done" and not acked)
        # and the journal goes on counting from there
        j.complete_purchase(dataclasses.replace(records[7][0], tac="0badcafe"))
        assert j.shift_report(1).taps == _expected(records, 1)[1] + 1
    finally:
        j.close()


def test_a_schema_3_migration_that_breaks_halfway_changes_nothing(tmp_path, monkeypatch):
    from validator import journal as journal_module

    path = tmp_path / "v2.journal"
    records = _v2_records()
    _v2_journal(path, records)
    real = journal_module._MIGRATIONS[3]
    monkeypatch.setitem(journal_module._MIGRATIONS, 3, real + "; INSERT INTO no_such_table VALUES (1)")
    with pytest.raises(JournalError, match="upgrading to schema 3 failed .*unchanged at schema 2"):
        Journal(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("SELECT name FROM sqlite_master WHERE name IN ('shift', 'shift_fare')").fetchall() == []
    assert "shift_no" not in [c[1] for c in db.execute("PRAGMA table_info(record)")]
    db.close()
    monkeypatch.undo()
    j = Journal(path)
    try:
        assert _totals(j.shift_report(1)) == _expected(records, 1)
    finally:
        j.close()


# --------------------------------------------------------------------------------------- shift summaries


def test_shift_summaries_count_only_completed_purchases(journal):
    written = []  # (record, state, acked) as the test intends them, for the independent totals

    def done(record):
        written.append((record, "done", 0))
        return record

    done(journal.append(rec(RecordKind.SHIFT_OPEN)))
    for i, (card_type, amount) in enumerate([(1, 200), (2, 100), (1, 200), (3, 0), (4, 150)]):
        grey = journal.begin_purchase(rec(RecordKind.PURCHASE, minutes=i + 1, card_type=card_type,
                                          amount=amount))
        assert journal.shift_report(1).taps == i  # a grey record is not a fare yet
        journal.complete_purchase(done(dataclasses.replace(grey, tac="11223344")))
    cancelled = journal.begin_purchase(rec(RecordKind.PURCHASE, minutes=7, amount=200))
    journal.cancel(cancelled.device_seq)
    still_grey = journal.begin_purchase(rec(RecordKind.PURCHASE, minutes=8, amount=200))
    # completing the same purchase twice (a retry after a crash) counts it once
    journal.complete_purchase(written[1][0])
    done(journal.append(rec(RecordKind.DENIED, minutes=9, reason="on deny list")))
    # with nobody signed in: counted nowhere
    journal.append(rec(RecordKind.DENIED, minutes=9, driver="", shift_no=0, reason="on deny list"))
    report = journal.shift_report(1)
    assert _totals(report) == _expected(written, 1)
    assert report.unsettled == 1 and report.is_open
    # nothing pruned yet: the summary and the records tell the same story
    assert report == ShiftReport.from_records(journal.records_of_shift(1), unsettled=1)
    assert journal.shift_report(0) is None and journal.shift_report(99) is None
    # the grey purchase is settled after its shift was handed over: it still counts in shift 1
    done(journal.append(rec(RecordKind.SHIFT_CLOSE, minutes=30, reason="handed over to D2002")))
    journal.append(rec(RecordKind.SHIFT_OPEN, minutes=30, driver="D2002", shift_no=2))
    journal.complete_purchase(done(dataclasses.replace(still_grey, tac="55667788")))
    report = journal.shift_report(1)
    assert _totals(report) == _expected(written, 1)
    assert report.closed_at == T0 + timedelta(minutes=30) and report.close_reason == "handed over to D2002"
    assert report.unsettled == 0 and journal.last_shift_no() == 2
    assert journal.shift_report(2).taps == 0 and journal.shift_report(2).driver == "D2002"


def test_last_shift_no_before_any_shift(journal):
    assert journal.last_shift_no() is None


# --------------------------------------------------------------------------------------- disk budget


def _unsent_seqs(path) -> set[int]:
    """Read with a connection of its own, not through the journal under test."""
    db = sqlite3.connect(path)
    try:
        return {s for (s,) in db.execute("SELECT device_seq FROM record WHERE state = 'done' AND acked = 0")}
    finally:
        db.close()


def _pending_seqs(path) -> set[int]:
    db = sqlite3.connect(path)
    try:
        return {s for (s,) in db.execute("SELECT device_seq FROM record WHERE state = 'pending'")}
    finally:
        db.close()


def _fill(j, start_minute, limit=5000, shift_no=1):
    """Completed purchases until the budget refuses one; returns (their records, the JournalFull raised).
    The last purchase begun is left grey, as if its card had just been pulled away."""
    done, grey = [], None
    for i in range(limit):
        try:
            new = j.begin_purchase(rec(RecordKind.PURCHASE, minutes=start_minute + i, card_ttc=i,
                                       shift_no=shift_no))
        except JournalFull as e:
            return done, grey, e
        if grey is not None:
            done.append(dataclasses.replace(grey, tac="a1b2c3d4"))
            j.complete_purchase(done[-1])
        grey = new
    raise AssertionError(f"{limit} purchases fit in a budget of {j.budget_bytes} bytes")


BUDGET = 96 * 1024


def test_budget_refuses_new_fares_keeps_every_unsent_tap_and_resumes_after_acks(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path, budget_bytes=BUDGET)
    try:
        j.append(rec(RecordKind.SHIFT_OPEN), state={"shift": {"driver": "D1001", "shift_no": 1}})
        done, grey, full = _fill(j, 1)
        assert len(done) > 50
        assert isinstance(full, JournalError)  # the terminal already turns JournalError into "out of service"
        unsent = _unsent_seqs(path)
        assert len(unsent) == len(done) + 1  # every purchase, and the shift opening
        message = str(full)
        assert f"{len(unsent)} unsent taps (the oldest from 2024-03-05 07:30 UTC) and 1 unsettled" in message
        assert "restore the link" in message and "nothing unsent is deleted" in message
        usage = j.usage()
        assert usage.refusing and usage.unsent == len(unsent) and usage.pending == 1
        assert usage.budget_bytes == BUDGET and usage.oldest_unsent == T0
        assert REFUSE_AT * BUDGET <= usage.used_bytes <= BUDGET
        # refused too: a driver signing in, a deny-listed card's record
        with pytest.raises(JournalFull):
            j.append(rec(RecordKind.SHIFT_OPEN, shift_no=2))
        with pytest.raises(JournalFull):
            j.append(rec(RecordKind.DENIED, reason="on deny list"))
        # never refused: completing the purchase already begun (the card was debited), and the sign-out
        j.complete_purchase(dataclasses.replace(grey, tac="a1b2c3d4"))
        j.append(rec(RecordKind.SHIFT_CLOSE, minutes=9000), state={"shift": None})
        assert _unsent_seqs(path) == unsent | {grey.device_seq, grey.device_seq + 1}
        assert j.shift_report(1).taps == len(done) + 1 and j.shift_report(1).closed_at is not None

        # The link comes back and the back office acknowledges everything: pruning makes room, fares resume.
        acked = _unsent_seqs(path)
        assert j.mark_acked(acked) == len(acked)
        assert not j.usage().refusing  # the status screen sees room again before the next rider taps
        j.append(rec(RecordKind.SHIFT_OPEN, minutes=9001, shift_no=2))
        more, grey2, _ = _fill(j, 10000, shift_no=2)
        assert len(more) > 20
        assert j.usage().used_bytes <= BUDGET
        # pruning went oldest first: none of the new, unsent taps went, and the oldest acknowledged ones did
        assert {r.device_seq for r in more} <= _unsent_seqs(path)
        assert _pending_seqs(path) == {grey2.device_seq}
        assert len(j.records_since(0)) < len(acked) + len(more)
        # shift 1's report no longer needs its records
        assert len(j.records_of_shift(1)) < len(done) + 1
        assert j.shift_report(1).taps == len(done) + 1
        assert j.shift_report(1).amount == sum(r.amount for r in done) + grey.amount
    finally:
        j.close()


def test_with_nothing_acknowledged_nothing_is_ever_deleted(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path, budget_bytes=BUDGET)
    try:
        done, grey, _ = _fill(j, 0)
        before = _unsent_seqs(path)
        for _ in range(3):  # refused again and again, never by deleting
            with pytest.raises(JournalFull):
                j.begin_purchase(rec(RecordKind.PURCHASE))
            assert j.prune() == 0
        assert _unsent_seqs(path) == before == {r.device_seq for r in done}
        assert _pending_seqs(path) == {grey.device_seq}
    finally:
        j.close()


def test_acknowledgements_in_halves_prune_only_acknowledged_records(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path, budget_bytes=BUDGET)
    acked: set[int] = set()
    try:
        for round_no in range(4):
            _done, grey, _ = _fill(j, round_no * 1000)
            j.complete_purchase(dataclasses.replace(grey, tac="a1b2c3d4"))
            unsent = sorted(_unsent_seqs(path))
            half = set(unsent[: len(unsent) // 2])  # the back office answered for the older half only
            j.mark_acked(half)
            acked |= half
            everything_unsent = _unsent_seqs(path)
            j.prune()
            assert _unsent_seqs(path) == everything_unsent
        db = sqlite3.connect(path)
        left = {s for (s,) in db.execute("SELECT device_seq FROM record")}
        db.close()
        assert (set(range(1, max(left) + 1)) - left) <= acked  # only acknowledged records ever went
        assert (set(range(1, max(left) + 1)) - left)  # and some did
    finally:
        j.close()


def test_pruning_keeps_the_newest_shift_summaries(tmp_path):
    path = tmp_path / "bus.journal"
    j = Journal(path, budget_bytes=BUDGET, keep_shifts=2)
    try:
        for n in range(1, 6):
            j.append(rec(RecordKind.SHIFT_OPEN, shift_no=n))
            j.append(rec(RecordKind.SHIFT_CLOSE, shift_no=n))
        j.mark_acked(range(1, 11))
        for i in range(5000):
            grey = j.begin_purchase(rec(RecordKind.PURCHASE, minutes=i, shift_no=5))
            j.complete_purchase(grey)
            j.mark_acked([grey.device_seq])
            if not j.records_of_shift(1):
                break
        assert not j.records_of_shift(1)
        assert [n for n in range(1, 6) if j.shift_report(n)] == [4, 5]
        assert j.shift_report(5).taps == i + 1 and j.last_shift_no() == 5
    finally:
        j.close()


def test_no_budget_never_refuses(tmp_path):
    j = Journal(tmp_path / "bus.journal", budget_bytes=None)
    try:
        for i in range(300):
            j.append(rec(minutes=i, reason="x" * 400))
        assert j.prune() == 0 and j.backlog() == 300
        usage = j.usage()
        assert usage.budget_bytes is None and usage.fraction is None and not usage.refusing
    finally:
        j.close()


def test_a_budget_too_small_to_hold_the_journal_is_refused(tmp_path):
    with pytest.raises(ValueError, match="minimum"):
        Journal(tmp_path / "bus.journal", budget_bytes=4096)


def test_usage_of_an_empty_journal(journal):
    usage = journal.usage()
    assert usage.unsent == usage.pending == 0 and usage.oldest_unsent is None and not usage.refusing
    assert 0 < usage.used_bytes < 64 * 1024 and usage.budget_bytes == DEFAULT_BUDGET_BYTES


def test_a_disk_that_fills_before_the_budget_is_an_sqlite_error_and_loses_nothing(tmp_path):
    """A real SQLITE_FULL: the file may not grow past max_page_count, as on a full flash."""
    path = tmp_path / "bus.journal"
    j = Journal(path)
    try:
        pages = j._db.execute("PRAGMA page_count").fetchone()[0]
        j._db.execute(f"PRAGMA max_page_count={pages + 3}")
        written = []
        with pytest.raises(sqlite3.OperationalError, match="full"):
            for i in range(1000):
                grey = j.begin_purchase(rec(RecordKind.PURCHASE, minutes=i, reason="x" * 300))
                written.append(dataclasses.replace(grey, tac="a1b2c3d4"))
                j.complete_purchase(written[-1])
        assert len(written) > 3
        # every purchase begun is there, completed or still grey; nothing half written
        assert sorted(r.device_seq for r in j.unsent(10_000) + j.pending()) == [r.device_seq for r in written]
    finally:
        j.close()
    j = Journal(path)
    try:
        assert [r.device_seq for r in j.unsent(10_000) + j.pending()] == list(range(1, len(written) + 1))
    finally:
        j.close()


# --------------------------------------------------------------------------------------- issue 9: epoch, set aside


def test_a_new_journal_has_a_random_epoch_that_it_keeps_and_writes_into_every_record(tmp_path):
    first = Journal(tmp_path / "a.journal", budget_bytes=None)
    other = Journal(tmp_path / "b.journal", budget_bytes=None)
    epoch = first.epoch
    assert 0 < epoch < 2**63 and epoch != other.epoch
    record = first.append(rec())
    assert record.epoch == epoch and first.unsent(10)[0].epoch == epoch
    first.close()
    again = Journal(tmp_path / "a.journal", budget_bytes=None)
    assert again.epoch == epoch
    for j in (again, other):
        j.close()


def test_a_journal_from_before_epochs_keeps_epoch_0_so_its_records_keep_their_keys(tmp_path):
    path = tmp_path / "old.journal"
    _v2_journal(path, _v2_records())
    j = Journal(path, budget_bytes=None)
    try:
        assert j.epoch == 0
        assert {r.epoch for r in j.unsent(100)} == {0}
        assert j.append(rec(RecordKind.SHIFT_CLOSE)).epoch == 0
    finally:
        j.close()


def test_texts_are_cut_to_the_wire_limit_when_written(journal):
    from wire import codec

    long = "on deny list; could not block the application: card left the field before APPLICATION BLOCK"
    denied = journal.append(rec(RecordKind.DENIED, reason=long))
    grey = journal.begin_purchase(rec(RecordKind.PURCHASE, amount=200))
    done = journal.complete_purchase(dataclasses.replace(grey, tac="620098f7",
                                                         reason="MAC2 did not verify: " + "x" * 60))
    assert len(denied.reason) == len(done.reason) == codec.MAX_TEXT
    on_disk = journal.unsent(10)
    assert [r.reason for r in on_disk] == [denied.reason, done.reason]
    codec.encode_batch(on_disk, key=b"k" * 32)  # whatever the journal holds can be sent


def test_records_set_aside_leave_the_outbox_but_stay_until_acknowledged(journal):
    records = [journal.append(rec(minutes=i)) for i in range(4)]
    assert journal.set_aside({records[1].device_seq: "amount out of range"}) == 1
    assert [r.device_seq for r in journal.unsent(10)] == [1, 3, 4]
    aside = journal.set_aside_unsent(10)
    assert [(seq, why) for seq, why, _ in aside] == [(2, "amount out of range")]
    assert b'"device_seq":2' in aside[0][2]
    assert journal.usage().set_aside == 1 and journal.backlog() == 4
    journal.mark_acked([2])
    assert journal.set_aside_unsent(10) == [] and journal.usage().set_aside == 0

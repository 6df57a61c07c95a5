"""Tables that stay small: ``tap`` and ``quarantine`` partitioned by day on PostgreSQL (revision 2026_12_03_0026).

``tap`` is ``PARTITION BY RANGE (service_day)``: one partition a day (``tap_2026_11_02``) and ``tap_default`` for
a day without one. ``quarantine`` likewise by ``received_day``, the UTC date a record arrived (a refused record has
no operator day one could trust). SQLite, the embedded default, keeps one table each with the same columns.

What this module does (``farebox partitions list|make|detach|attach``, and the daily job ``scheduled_make``):

- **make**: a partition for each day from yesterday to ``ahead`` days ahead, and for each day that has rows in the
  DEFAULT partition (late taps of a day nobody made, a bus with a wrong clock), within ``MAX_BACK`` days back;
  the rows are moved out of DEFAULT into the new table in the same transaction, before it is attached (PostgreSQL
  refuses to attach a range the DEFAULT partition has rows of). Days the DEFAULT partition holds that are not made
  (archived days, days too far off) are named in a warning: they are the operator's to look at.
- **detach**: a day (or a range) leaves the table for the ``archive`` schema (``archive.tap_2026_11_02``), as a
  table of its own that can be read, dumped, or dropped. Refused while its taps are not cleared (``clearing_run_id``
  NULL) or its quarantine rows are open, unless forced. ``DETACH ... CONCURRENTLY`` is not used: PostgreSQL refuses
  it on a table that has a DEFAULT partition, and the DEFAULT partition is what keeps a tap of a day without a
  partition from being lost. The plain DETACH holds an ACCESS EXCLUSIVE lock on ``tap`` for a moment (catalogue
  work only); every statement here runs under ``lock_timeout`` so a waiting detach never holds ingest up for long.
- **attach**: the archived table comes back; rows of that day that arrived meanwhile (in DEFAULT) are moved into it.

**Exactly once, with the day in the key.** PostgreSQL needs every unique key of a partitioned table to contain the
partition column, so the dedupe key is (device_id, epoch, device_seq, service_day). It still stores a record once
because the day is a function of the record alone: ``service_day`` is computed by ingest from the record's
``occurred_at`` and ``operator``, both inside the device's MAC (a resend carries the same bytes, a changed one fails
the MAC), under the operator's day rule (time zone, cut-off hour). The rule cannot change under stored taps:
``day_rule_change_problem`` makes the registry refuse to change the time zone or cut-off hour of an operator that has
taps (attached or archived), and ingest reads the rules under a shared advisory lock the registry takes exclusively
to check and change them, so the rule used for a batch is the rule in force when it commits. So a resend gets the
same day, lands in the same partition (or in DEFAULT when that day has none, where the same unique key applies), and
``ON CONFLICT DO NOTHING`` finds it. Rows move between DEFAULT and a day's partition only inside one transaction that
holds the partition locks. A day detached to the archive is no longer in ``tap``: ingest looks a batch's keys up in
``archive.tap_<day>`` for records of an archived day (after locking ``tap``, so a detach is either wholly before or
wholly after that look) and counts the ones found as duplicates; a first-time late record of an archived day is
stored in DEFAULT, listed here, and merged into the day's table when it is attached again.

What the day in the key changes, and how ingest makes up for it: a record with the same device key but *other*
content (another time, so possibly another day: a journal replaced without a new epoch, or a forgery made with the
device's key) would not meet ``ON CONFLICT`` on another day. Ingest looks for the batch's keys under other days
within ``backoffice.ingest.CARD_WINDOW_DAYS`` of the batch's days (one index range scan per device journal and day)
and holds such a record as a conflict, as before. Further apart than that it is stored as a tap of its own day. The
card counter look-up (fraud, copies) reads the same window of days (bench/ingest.py measures why).

Quarantine's key (device_id, device_seq, reason, received_day): ingest looks for the same record and reason on any
day before it adds a row (backoffice.ingest._not_yet_quarantined), under the device's advisory lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

ARCHIVE = "archive"  # the schema detached days go to
TABLES = {"tap": "service_day", "quarantine": "received_day"}
AHEAD = 7  # days made ahead of today by the job
MAX_BACK = 400  # days in DEFAULT further back than this are left there, named in the warning (a bus's wrong clock)
LOCK_TIMEOUT = "5s"
_NAME = re.compile(r"^(tap|quarantine)_(\d{4})_(\d{2})_(\d{2})$")


class PartitionError(Exception):
    """A request this module refuses, with what to do instead."""


def partition_name(table: str, day: date) -> str:
    return f"{table}_{day:%Y_%m_%d}"


def _day_of(name: str) -> date | None:
    m = _NAME.match(name)
    return date(int(m[2]), int(m[3]), int(m[4])) if m else None


# ---------------------------------------------------------------------- the day rule is frozen under stored taps


def day_rule_lock_key(operator: str) -> int:
    """The advisory lock ingest takes shared and the registry exclusively around an operator's day rule."""
    return int.from_bytes(hashlib.blake2b(f"day-rule|{operator}".encode(), digest_size=8).digest(), "big",
                          signed=True)


def day_rule_change_problem(conn: Connection, operator: str, timezone: str | None,
                            cutoff_hour: int | None) -> str | None:
    """Why the operator's time zone or cut-off hour may not change now (None: it may, or it does not change).

    The service day is part of the dedupe key, so it must stay the day it was for every stored tap: an operator
    with taps keeps its rule. Called by backoffice.registry.edit_operator inside its transaction."""
    row = conn.execute(text("SELECT timezone, cutoff_hour FROM operator WHERE code = :c"), {"c": operator}).first()
    if row is None or ((timezone is None or timezone == row.timezone)
                       and (cutoff_hour is None or cutoff_hour == row.cutoff_hour)):
        return None
    if conn.dialect.name == "postgresql":
        # Waits for ingest transactions that read the rule; new ones wait for this transaction.
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": day_rule_lock_key(operator)})
    has_taps = conn.execute(text("SELECT EXISTS (SELECT 1 FROM tap WHERE operator = :c)"), {"c": operator}).scalar()
    if not has_taps and conn.dialect.name == "postgresql":
        for table in archived_tables(conn, "tap"):
            if conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {ARCHIVE}.{table} WHERE operator = :c)"),
                            {"c": operator}).scalar():
                has_taps = True
                break
    if not has_taps:
        return None
    return (f"operator {operator} has stored taps: its time zone ({row.timezone}) and cut-off hour "
            f"({row.cutoff_hour}) decide the service day each tap is stored and deduplicated under, so they cannot "
            "change now (a resent batch would map to another day and be stored twice). Register a new operator "
            "code with the new service day for the buses from a given date instead.")


# ---------------------------------------------------------------------- reading the catalogue


def is_partitioned(conn: Connection, table: str = "tap") -> bool:
    if conn.dialect.name != "postgresql":
        return False
    return bool(conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON "
                                  "c.oid = p.partrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                                  "WHERE c.relname = :t AND n.nspname = current_schema())"), {"t": table}).scalar())


def attached(conn: Connection, table: str = "tap") -> dict[date, str]:
    """The table's day partitions (day -> name); the DEFAULT partition is not among them."""
    rows = conn.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
        "WHERE p.relname = :t AND n.nspname = current_schema()"), {"t": table})
    out = {}
    for (name,) in rows:
        day = _day_of(name)
        if day is not None:
            out[day] = name
    return out


def archived_tables(conn: Connection, table: str = "tap") -> list[str]:
    return [r[0] for r in conn.execute(text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :s AND c.relkind = 'r' AND c.relname LIKE :p ORDER BY c.relname"),
        {"s": ARCHIVE, "p": f"{table}\\_%"}) if _day_of(r[0]) is not None]


def archived(conn: Connection, table: str = "tap") -> dict[date, str]:
    return {_day_of(name): name for name in archived_tables(conn, table)}


def default_days(conn: Connection, table: str = "tap") -> dict[date | None, int]:
    """Rows per day in the DEFAULT partition (a NULL day shows as None)."""
    col = TABLES[table]
    return {r[0]: r[1] for r in conn.execute(text(
        f"SELECT {col}, count(*) FROM {table}_default GROUP BY 1 ORDER BY 1"))}


@dataclasses.dataclass(frozen=True)
class DayRow:
    day: date | None
    where: str  # the table holding it: tap_2026_11_02, archive.tap_2026_11_02, tap_default
    state: str  # attached | archived | default
    rows: int
    exact: bool  # False: the planner's estimate (pg_class.reltuples)
    amount: int | None = None  # tap: sum(amount), fen (exact only)
    open: int | None = None  # tap: taps not cleared (clearing_run_id NULL); quarantine: open rows (exact only)


def listing(conn: Connection, table: str = "tap", *, exact: bool = False, days: Iterable[date] | None = None,
            ) -> list[DayRow]:
    """Every day the table has, attached, archived, or in DEFAULT. Estimated row counts (instant) unless ``exact``
    (count(*), sum(amount) and the open count per day: a scan of each day listed). DEFAULT is always counted."""
    _need_partitioned(conn, table)
    wanted = set(days) if days is not None else None
    out: list[DayRow] = []
    places = [(d, n, "attached", n) for d, n in attached(conn, table).items()]
    places += [(d, n, "archived", f"{ARCHIVE}.{n}") for d, n in archived(conn, table).items()]
    for day, name, state, qualified in sorted(places, key=lambda p: (p[0], p[2])):
        if wanted is not None and day not in wanted:
            continue
        if exact:
            rows, amount, open_ = _exact(conn, table, qualified)
            out.append(DayRow(day, qualified, state, rows, True, amount, open_))
        else:
            est = conn.execute(text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:n)"),
                               {"n": qualified}).scalar()
            out.append(DayRow(day, qualified, state, max(int(est or 0), 0), False))
    col = TABLES[table]
    for r in conn.execute(text(f"SELECT {col}, count(*), {_sums(table)} FROM {table}_default GROUP BY 1 ORDER BY 1")):
        if wanted is None or r[0] in wanted:
            out.append(DayRow(r[0], f"{table}_default", "default", r[1], True, r[2], r[3]))
    return out


def _sums(table: str) -> str:
    if table == "tap":
        return "coalesce(sum(amount), 0), count(*) FILTER (WHERE clearing_run_id IS NULL)"
    return "NULL::bigint, count(*) FILTER (WHERE status = 'open')"


def _has_watermark(conn: Connection) -> bool:
    return bool(conn.execute(text("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
                                  "current_schema() AND table_name = 'clearing_run' AND column_name = "
                                  "'claim_watermark')")).scalar())


def _exact(conn: Connection, table: str, qualified: str) -> tuple[int, int | None, int]:
    """Rows, sum(amount) (tap) and the open ones: taps no run took, quarantine rows not reviewed."""
    if table == "tap" and _has_watermark(conn):
        # From revision 0027 a run takes its day's taps up to its claim_watermark without writing its id into
        # them (backoffice.clearing_runs; the view tap_claimed): those are cleared too.
        return tuple(conn.execute(text(
            f"SELECT count(*), coalesce(sum(t.amount), 0), count(*) FILTER (WHERE t.clearing_run_id IS NULL AND "
            f"r.id IS NULL) FROM {qualified} t LEFT JOIN clearing_run r ON t.clearing_run_id IS NULL AND "
            "r.operator = t.operator AND r.service_day = t.service_day AND r.claim_watermark IS NOT NULL "
            "AND t.id <= r.claim_watermark")).one())
    return tuple(conn.execute(text(f"SELECT count(*), {_sums(table)} FROM {qualified}")).one())


def _need_partitioned(conn: Connection, table: str) -> None:
    if table not in TABLES:
        raise PartitionError(f"only {', '.join(TABLES)} are partitioned, not {table!r}")
    if not is_partitioned(conn, table):
        raise PartitionError(f"{table} is not partitioned here ({conn.dialect.name}): partitions are a PostgreSQL "
                             "feature; SQLite keeps one table (run `farebox db upgrade` on PostgreSQL first)")


# ---------------------------------------------------------------------- make, detach, attach


def _lock_timeout(conn: Connection) -> None:
    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))


def _bounds(day: date) -> str:
    return f"FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"


def _attach_with_rows_from_default(conn: Connection, table: str, name: str, day: date) -> int:
    """Attach table ``name`` (public schema, the parent's columns) as ``day``'s partition, after moving that day's
    rows out of DEFAULT into it. Returns the rows moved. The caller's transaction holds it all."""
    col = TABLES[table]
    # PostgreSQL skips the scan of the new table when a CHECK proves the range; dropped again after.
    conn.execute(text(f"ALTER TABLE {name} ADD CONSTRAINT {name}_range CHECK ({col} >= '{day}' AND "
                      f"{col} < '{day + timedelta(days=1)}')"))
    cols = ", ".join(_columns(conn, table))
    moved = conn.execute(text(
        f"WITH moved AS (DELETE FROM {table}_default WHERE {col} = :d RETURNING {cols}) "
        f"INSERT INTO {name} ({cols}) SELECT {cols} FROM moved"), {"d": day}).rowcount
    conn.execute(text(f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES {_bounds(day)}"))
    conn.execute(text(f"ALTER TABLE {name} DROP CONSTRAINT {name}_range"))
    return moved


def _columns(conn: Connection, table: str) -> list[str]:
    return [r[0] for r in conn.execute(text(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = :t ORDER BY ordinal_position"), {"t": table})]


@dataclasses.dataclass(frozen=True)
class Made:
    table: str
    day: date
    name: str
    moved: int  # rows moved out of DEFAULT into it


def make_day(conn: Connection, table: str, day: date) -> Made | None:
    """``day``'s partition, with that day's rows moved out of DEFAULT; None when it exists already. Refused for an
    archived day (attach it instead)."""
    if day in attached(conn, table):
        return None
    if day in archived(conn, table):
        raise PartitionError(f"{table} day {day} is archived ({ARCHIVE}.{partition_name(table, day)}): attach it "
                             f"(`farebox partitions attach {day}`) rather than making a new, empty one")
    name = partition_name(table, day)
    _lock_timeout(conn)
    conn.execute(text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS)"))
    moved = _attach_with_rows_from_default(conn, table, name, day)
    if moved:
        log.info("%s: partition %s made; %d row(s) moved out of %s_default", table, name, moved, table)
    return Made(table, day, name, moved)


def make(engine: Engine, *, ahead: int = AHEAD, today: date | None = None, tables: Iterable[str] = tuple(TABLES),
         ) -> list[Made]:
    """Partitions from yesterday to ``ahead`` days ahead, and for the days found in DEFAULT (within ``MAX_BACK``
    days); each day in its own transaction. Days left in DEFAULT are named in a warning."""
    today = today or datetime.now(UTC).date()
    made: list[Made] = []
    for table in tables:
        with engine.begin() as conn:
            _need_partitioned(conn, table)
            have, gone = attached(conn, table), archived(conn, table)
            in_default = default_days(conn, table)
        wanted = {today + timedelta(days=n) for n in range(-1, ahead + 1)}
        wanted |= {d for d in in_default if d is not None and today - timedelta(days=MAX_BACK) <= d <= today
                   + timedelta(days=ahead)}
        for day in sorted(wanted - set(have) - set(gone)):
            with engine.begin() as conn:
                done = make_day(conn, table, day)
            if done:
                made.append(done)
        with engine.begin() as conn:
            left = default_days(conn, table)
        if left:
            why = {d: ("archived: attach it to merge them" if d in gone else "no partition made (too far off)")
                   for d in left}
            log.warning("%s_default holds rows of days without a partition: %s", table,
                        "; ".join(f"{d}: {n} row(s), {why[d]}" for d, n in left.items()))
    return made


def scheduled_make(engine: Engine) -> list[Made]:
    """The daily job (backoffice.scheduler): partitions made ahead, DEFAULT emptied where it can be."""
    made = make(engine)
    if made:
        log.info("partitions: made %s", ", ".join(m.name for m in made))
    return made


def detach(conn: Connection, table: str, day: date, *, force: bool = False) -> DayRow:
    """Detach ``day``'s partition and move it to the ``archive`` schema; refused while it holds taps not cleared or
    quarantine rows still open, unless ``force``. Returns the day's figures as they were detached."""
    _need_partitioned(conn, table)
    name = attached(conn, table).get(day)
    if name is None:
        where = "archived already" if day in archived(conn, table) else "has no partition"
        raise PartitionError(f"{table} day {day} {where}: nothing to detach (`farebox partitions list`)")
    _lock_timeout(conn)
    rows, amount, open_ = _exact(conn, table, name)
    if open_ and not force:
        if table == "tap":
            ops = [r[0] for r in conn.execute(text(
                f"SELECT DISTINCT operator FROM {name} WHERE clearing_run_id IS NULL ORDER BY 1"))]
            raise PartitionError(
                f"{open_} of the {rows} taps of {day} are not cleared yet (no clearing run took them; operator(s) "
                f"{', '.join(ops)}): clear the day first ("
                + "; ".join(f"`farebox settle --operator {op} --day {day}`" for op in ops)
                + ") and detach it then, or pass --force to archive them uncleared (attach the day again before "
                "clearing it)")
        raise PartitionError(f"{open_} of the {rows} quarantine rows received on {day} are still open: review them "
                             "first (`farebox quarantine list`), or pass --force to archive them open")
    conn.execute(text(f"ALTER TABLE {table} DETACH PARTITION {name}"))
    conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {ARCHIVE}"))
    conn.execute(text(f"ALTER TABLE {name} SET SCHEMA {ARCHIVE}"))
    log.info("%s: day %s detached to %s.%s (%d rows)", table, day, ARCHIVE, name, rows)
    return DayRow(day, f"{ARCHIVE}.{name}", "archived", rows, True, amount, open_)


def attach(conn: Connection, table: str, day: date) -> tuple[DayRow, int]:
    """Bring an archived day back into the table, with the rows of that day that arrived meanwhile (they were in
    DEFAULT). Returns the day's figures and how many rows came from DEFAULT."""
    _need_partitioned(conn, table)
    name = archived(conn, table).get(day)
    if name is None:
        where = "is attached" if day in attached(conn, table) else "is not in the archive"
        raise PartitionError(f"{table} day {day} {where}: nothing to attach (`farebox partitions list`)")
    if conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None:
        raise PartitionError(f"a table {name} exists outside the archive: rename or drop it before attaching")
    _lock_timeout(conn)
    conn.execute(text(f"ALTER TABLE {ARCHIVE}.{name} SET SCHEMA public"))
    moved = _attach_with_rows_from_default(conn, table, name, day)
    rows, amount, open_ = _exact(conn, table, name)
    log.info("%s: day %s attached again (%d rows, %d of them from DEFAULT)", table, day, rows, moved)
    return DayRow(day, name, "attached", rows, True, amount, open_), moved


def days_between(first: date, last: date) -> list[date]:
    if last < first:
        raise PartitionError(f"the range {first}..{last} runs backwards")
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]

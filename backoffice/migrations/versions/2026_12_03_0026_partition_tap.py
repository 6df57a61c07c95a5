"""Tables that stay small: ``tap`` gets its service day (``service_day``) and ``quarantine`` the UTC date it arrived
(``received_day``); on PostgreSQL both become range-partitioned by that day, one partition a day (``tap_2026_11_02``,
``quarantine_2026_11_02``) and a DEFAULT partition (``tap_default``) for days without one. backoffice.partitions
makes the days ahead, detaches old days to the ``archive`` schema and attaches them again.

The dedupe keys include the partition column, as PostgreSQL requires of a unique key on a partitioned table:
tap (device_id, epoch, device_seq, service_day), primary key (id, service_day); quarantine (device_id, device_seq,
reason, received_day), primary key (id, received_day). Why that still means exactly once: backoffice.partitions.

PostgreSQL: the existing table is moved without losing a row, in this one transaction: a partitioned twin is made
with the same columns and defaults (so ``tap_id_seq`` goes on giving ids, and every id is kept), a partition for
every day present (and for yesterday to a week ahead), the rows copied in id chunks with their day computed in SQL
from the operator's time zone and cut-off hour (as clearing.service_day computes it), the row count, the sum of
amounts (payload bytes for quarantine) and the sum of ids compared, and only then the old table dropped, the twin
renamed and its keys and indexes made under the old names. Any difference raises, and the whole transaction rolls
back. Downgrade does the reverse (refused while detached days sit in the ``archive`` schema: attach them first).

SQLite (the embedded default) stays one table: the columns are added and filled, and the keys include them.

Revision ID: 2026_12_03_0026
Revises: 2026_12_03_0025
Create Date: 2026-12-03
"""

import dataclasses
import logging
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from backoffice.models import tap_service_day

revision = "2026_12_03_0026"
down_revision = "2026_12_03_0025"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

CHUNK = 500_000  # ids per INSERT ... SELECT
AHEAD = 7  # days made ahead of today (the scheduled job keeps it so: backoffice.partitions)


@dataclasses.dataclass(frozen=True)
class _Spec:
    table: str
    day: str  # the partition column
    day_sql: str  # its value from the old row ``t`` (and the joined operator ``o`` for tap)
    join_sql: str
    check_sum: str  # a second figure compared beside count and sum(id)
    key: tuple[str, ...]  # the dedupe key without the day
    key_name: str
    indexes: tuple[tuple[str, tuple[str, ...]], ...]
    fks: tuple[tuple[str, str, str, str], ...] = ()  # (name, column, referred table, referred column)
    day_default: str = ""  # the day column's default (SQL), for a row inserted without it


TAP = _Spec(
    table="tap", day="service_day",
    # The wall clock in the operator's zone, cut-off hours back, its date: clearing.service_day.service_day.
    day_sql="((t.occurred_at AT TIME ZONE coalesce(o.timezone, 'Asia/Shanghai')) "
            "- make_interval(hours => coalesce(o.cutoff_hour, 3)))::date",
    join_sql="LEFT JOIN operator o ON o.code = t.operator",
    check_sum="coalesce(sum(amount), 0)",
    key=("device_id", "epoch", "device_seq"), key_name="uq_tap_device_epoch_seq",
    indexes=(("ix_tap_card_ttc", ("card_asn", "card_ttc")), ("ix_tap_occurred_at", ("occurred_at",)),
             ("ix_tap_clearing_run_id", ("clearing_run_id",))),
    fks=(("fk_tap_clearing_run", "clearing_run_id", "clearing_run", "id"),),
)
QUARANTINE = _Spec(
    table="quarantine", day="received_day",
    day_sql="(t.received_at AT TIME ZONE 'UTC')::date", join_sql="",
    check_sum="coalesce(sum(length(payload)), 0)",
    key=("device_id", "device_seq", "reason"), key_name="uq_quarantine_record_reason",
    indexes=(("ix_quarantine_received_at", ("received_at",)), ("ix_quarantine_status", ("status", "id"))),
    day_default="((now() AT TIME ZONE 'UTC')::date)",  # the UTC date it is inserted on
)


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        _sqlite_upgrade(conn)
        return
    for spec in (TAP, QUARANTINE):
        _partition(conn, spec)


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        _sqlite_downgrade()
        return
    archived = conn.execute(sa.text(
        "SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'archive' AND c.relkind IN ('r', 'p') "
        "AND (c.relname LIKE 'tap\\_%' OR c.relname LIKE 'quarantine\\_%')")).scalar()
    if archived:
        raise RuntimeError(f"detached days are in the archive schema ({archived}): attach them first "
                           "(`farebox partitions attach DAY`), or their rows would not be in the unpartitioned table")
    for spec in (TAP, QUARANTINE):
        _unpartition(conn, spec)


# ---------------------------------------------------------------------- PostgreSQL


def _q(conn, sql: str, **params):
    return conn.execute(sa.text(sql), params)


def _columns(conn, table: str) -> list[str]:
    return [r[0] for r in _q(conn, "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                   "current_schema() AND table_name = :t ORDER BY ordinal_position", t=table)]


def _figures(conn, table: str, spec: _Spec) -> tuple:
    return tuple(_q(conn, f"SELECT count(*), {spec.check_sum}, coalesce(sum(id), 0) FROM {table}").one())


def _copy_in_chunks(conn, source: str, target: str, columns: list[str], select_sql: str, join_sql: str = "") -> None:
    low, high = _q(conn, f"SELECT min(id), max(id) FROM {source}").one()
    if low is None:
        return
    listed = ", ".join(columns)
    for start in range(low - 1, high, CHUNK):
        _q(conn, f"INSERT INTO {target} ({listed}) SELECT {select_sql} FROM {source} t {join_sql} "
                 "WHERE t.id > :a AND t.id <= :b", a=start, b=start + CHUNK)


def _partition(conn, spec: _Spec) -> None:
    t, new, old = spec.table, f"{spec.table}_partitioned", f"{spec.table}_pre0026"
    columns = _columns(conn, t)
    _q(conn, f"ALTER TABLE {t} RENAME TO {old}")
    # The same columns, types, NOT NULLs and defaults (the id default is nextval of the same sequence).
    _q(conn, f"CREATE TABLE {new} (LIKE {old} INCLUDING DEFAULTS, {spec.day} date NOT NULL) "
             f"PARTITION BY RANGE ({spec.day})")
    days = [r[0] for r in _q(conn, f"SELECT DISTINCT {spec.day_sql} FROM {old} t {spec.join_sql}")]
    today = datetime.now(UTC).date()
    days = sorted(set(days) | {today + timedelta(days=n) for n in range(-1, AHEAD + 1)})
    for day in days:
        _q(conn, f"CREATE TABLE {t}_{day:%Y_%m_%d} PARTITION OF {new} "
                 f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')")
    _q(conn, f"CREATE TABLE {t}_default PARTITION OF {new} DEFAULT")
    if spec.day_default:
        _q(conn, f"ALTER TABLE {new} ALTER COLUMN {spec.day} SET DEFAULT {spec.day_default}")
    _copy_in_chunks(conn, old, new, [*columns, spec.day],
                    ", ".join([*(f"t.{c}" for c in columns), spec.day_sql]), spec.join_sql)
    before, after = _figures(conn, old, spec), _figures(conn, new, spec)
    if before != after:
        raise RuntimeError(f"{t}: the partitioned copy has (rows, {spec.check_sum}, sum(id)) = {after}, the table "
                           f"{before}: nothing changed (rolled back)")
    log.info("%s: %d rows moved into %d day partitions (%s)", t, after[0], len(days), spec.check_sum)
    seq = f"{t}_id_seq"
    _q(conn, f"ALTER SEQUENCE {seq} OWNED BY NONE")  # or dropping the old table would drop the ids' sequence
    _q(conn, f"DROP TABLE {old}")
    _q(conn, f"ALTER TABLE {new} RENAME TO {t}")
    _q(conn, f"ALTER SEQUENCE {seq} OWNED BY {t}.id")
    _q(conn, f"ALTER TABLE {t} ADD CONSTRAINT {t}_pkey PRIMARY KEY (id, {spec.day})")
    _q(conn, f"ALTER TABLE {t} ADD CONSTRAINT {spec.key_name} UNIQUE ({', '.join(spec.key)}, {spec.day})")
    for name, cols in spec.indexes:
        _q(conn, f"CREATE INDEX {name} ON {t} ({', '.join(cols)})")
    for name, col, ref, ref_col in spec.fks:
        _q(conn, f"ALTER TABLE {t} ADD CONSTRAINT {name} FOREIGN KEY ({col}) REFERENCES {ref} ({ref_col})")
    _q(conn, f"ANALYZE {t}")


def _unpartition(conn, spec: _Spec) -> None:
    t, flat = spec.table, f"{spec.table}_flat0026"
    columns = [c for c in _columns(conn, t) if c != spec.day]
    _q(conn, f"CREATE TABLE {flat} (LIKE {t} INCLUDING DEFAULTS)")
    _q(conn, f"ALTER TABLE {flat} DROP COLUMN {spec.day}")
    _copy_in_chunks(conn, t, flat, columns, ", ".join(f"t.{c}" for c in columns))
    before, after = _figures(conn, t, spec), _figures(conn, flat, spec)
    if before != after:
        raise RuntimeError(f"{t}: the unpartitioned copy has (rows, {spec.check_sum}, sum(id)) = {after}, the "
                           f"table {before}: nothing changed (rolled back)")
    seq = f"{t}_id_seq"
    _q(conn, f"ALTER SEQUENCE {seq} OWNED BY NONE")
    _q(conn, f"DROP TABLE {t}")  # with its partitions
    _q(conn, f"ALTER TABLE {flat} RENAME TO {t}")
    _q(conn, f"ALTER SEQUENCE {seq} OWNED BY {t}.id")
    _q(conn, f"ALTER TABLE {t} ADD CONSTRAINT {t}_pkey PRIMARY KEY (id)")
    # Fails (and rolls back) if one key is stored under two days, which the frozen day rule never lets happen.
    _q(conn, f"ALTER TABLE {t} ADD CONSTRAINT {spec.key_name} UNIQUE ({', '.join(spec.key)})")
    for name, cols in spec.indexes:
        _q(conn, f"CREATE INDEX {name} ON {t} ({', '.join(cols)})")
    for name, col, ref, ref_col in spec.fks:
        _q(conn, f"ALTER TABLE {t} ADD CONSTRAINT {name} FOREIGN KEY ({col}) REFERENCES {ref} ({ref_col})")
    _q(conn, f"ANALYZE {t}")


# ---------------------------------------------------------------------- SQLite


def _sqlite_upgrade(conn) -> None:
    # The column first (in place), filled in Python (SQLite has no time zones), then batch mode copies the table
    # once to make it NOT NULL and put it in the key.
    op.execute("ALTER TABLE tap ADD COLUMN service_day DATE")
    rules = {r.code: (r.timezone, r.cutoff_hour) for r in _q(conn, "SELECT code, timezone, cutoff_hour FROM operator")}
    rows = _q(conn, "SELECT id, occurred_at, operator FROM tap").all()
    updates = []
    for row in rows:
        at = row.occurred_at if isinstance(row.occurred_at, datetime) else datetime.fromisoformat(row.occurred_at)
        day: date = tap_service_day(at, *rules.get(row.operator, ("Asia/Shanghai", 3)))
        updates.append({"i": row.id, "d": day.isoformat()})
    if updates:
        conn.execute(sa.text("UPDATE tap SET service_day = :d WHERE id = :i"), updates)
    with op.batch_alter_table("tap") as batch:
        batch.alter_column("service_day", existing_type=sa.Date, nullable=False)
        batch.drop_constraint(TAP.key_name, type_="unique")
        batch.create_unique_constraint(TAP.key_name, [*TAP.key, TAP.day])
    op.execute("ALTER TABLE quarantine ADD COLUMN received_day DATE")
    op.execute("UPDATE quarantine SET received_day = date(received_at)")  # stored as UTC text
    with op.batch_alter_table("quarantine") as batch:  # SQLite's CURRENT_DATE is UTC
        batch.alter_column("received_day", existing_type=sa.Date, nullable=False,
                           server_default=sa.text("CURRENT_DATE"))
        batch.drop_constraint(QUARANTINE.key_name, type_="unique")
        batch.create_unique_constraint(QUARANTINE.key_name, [*QUARANTINE.key, QUARANTINE.day])


def _sqlite_downgrade() -> None:
    for spec in (TAP, QUARANTINE):
        with op.batch_alter_table(spec.table) as batch:
            batch.drop_constraint(spec.key_name, type_="unique")
            batch.create_unique_constraint(spec.key_name, list(spec.key))
            batch.drop_column(spec.day)

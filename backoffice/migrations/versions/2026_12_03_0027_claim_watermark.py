"""Clearing runs claim their day's taps at once: ``clearing_run.claim_watermark`` (backoffice.clearing_runs).

Until this revision a run wrote its id into every tap it took (``tap.clearing_run_id``): at 10 M taps a day that
UPDATE was 93% of the nightly path (812 s of 869 s). From this revision a run takes the taps of its own service day
that were committed when it started (id <= its watermark, received before its ``as_of``) as a block: they keep
``clearing_run_id`` NULL, and the run stores the watermark. Only the others (late taps of earlier days, a day's
taps committed after its run started or received after its ``as_of``) are still claimed one by one. The run that
took a tap is therefore ``COALESCE(tap.clearing_run_id, <the run of the tap's service day, when tap.id <= its
claim_watermark>)``; the view ``tap_claimed`` (tap's columns, ``clearing_run_id`` as that) answers it in plain SQL.

PostgreSQL: the watermark needs every tap with a smaller id committed when it is read. A statement trigger on
``tap`` takes a shared advisory lock (transaction-long) before any INSERT or COPY into it; the claim takes the same
lock exclusively for the moment it reads ``max(tap.id)`` and lets it go at once, so it waits only for inserts in
flight, and inserts wait only for that moment. (SQLite: one writer at a time.) Runs stored before this revision keep
a NULL watermark: every tap they took carries their id, as before.

Revision ID: 2026_12_03_0027
Revises: 2026_12_03_0026
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "2026_12_03_0027"
down_revision = "2026_12_03_0026"
branch_labels = None
depends_on = None

# pg_advisory_*lock key of the tap insert gate; backoffice.clearing_runs.TAP_GATE is the same number.
TAP_GATE = 0x66617265_0027
VIEW = "tap_claimed"


def _tap_columns(conn) -> list[str]:
    return [c["name"] for c in sa.inspect(conn).get_columns("tap")]


def create_view(conn) -> None:
    """``tap_claimed``: every tap with the run that took it as ``clearing_run_id`` (NULL: no run yet)."""
    cols = ", ".join(f"t.{c}" for c in _tap_columns(conn) if c != "clearing_run_id")
    conn.execute(sa.text(
        f"CREATE VIEW {VIEW} AS SELECT {cols}, COALESCE(t.clearing_run_id, r.id) AS clearing_run_id FROM tap t "
        "LEFT JOIN clearing_run r ON t.clearing_run_id IS NULL AND r.operator = t.operator "
        "AND r.service_day = t.service_day AND r.claim_watermark IS NOT NULL AND t.id <= r.claim_watermark"))


def upgrade() -> None:
    conn = op.get_bind()
    op.add_column("clearing_run", sa.Column("claim_watermark", sa.BigInteger, nullable=True))
    if conn.dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION tap_insert_gate() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_advisory_xact_lock_shared({TAP_GATE});
                RETURN NULL;
            END $$""")
        op.execute("CREATE TRIGGER tap_insert_gate BEFORE INSERT ON tap FOR EACH STATEMENT "
                   "EXECUTE FUNCTION tap_insert_gate()")
        # The claim looks for the day's taps received at or after the run's moment: a few pages at the end of
        # each partition, found through a BRIN index (a few pages itself, next to nothing for ingest to keep).
        op.execute("CREATE INDEX ix_tap_received_at_brin ON tap USING brin (received_at)")
    create_view(conn)


def downgrade() -> None:
    conn = op.get_bind()
    # Runs that took a block of taps by watermark give each of them its id, as runs before this revision did.
    conn.execute(sa.text(
        "UPDATE tap SET clearing_run_id = (SELECT r.id FROM clearing_run r WHERE r.operator = tap.operator AND "
        "r.service_day = tap.service_day AND r.claim_watermark IS NOT NULL AND tap.id <= r.claim_watermark) "
        "WHERE clearing_run_id IS NULL AND EXISTS (SELECT 1 FROM clearing_run r WHERE r.operator = tap.operator "
        "AND r.service_day = tap.service_day AND r.claim_watermark IS NOT NULL AND tap.id <= r.claim_watermark)"))
    op.execute(f"DROP VIEW {VIEW}")
    if conn.dialect.name == "postgresql":
        op.execute("DROP INDEX ix_tap_received_at_brin")
        op.execute("DROP TRIGGER tap_insert_gate ON tap")
        op.execute("DROP FUNCTION tap_insert_gate()")
    # In place on both (SQLite 3.35+ drops a plain column itself; batch mode would copy clearing_run, which the taps'
    # foreign key does not let it drop).
    op.execute("ALTER TABLE clearing_run DROP COLUMN claim_watermark")

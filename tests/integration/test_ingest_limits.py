"""Ingest and a message far bigger than any batch (issue 9), on SQLite and PostgreSQL: before, a 20 MB message on a
device's own topic was stored whole in quarantine. Now it is refused unread: quarantine keeps its first 4 KiB, its
size and the reason, and nothing is acknowledged."""

from __future__ import annotations

from sqlalchemy import func, select
from test_ingest_security import A, OP, engine, one, purchase, signed  # noqa: F401 (engine is a fixture)

from backoffice.ingest import OVERSIZE_KEPT
from backoffice.models import Quarantine, Tap
from wire import codec, topics


def quarantined(engine):
    with engine.connect() as conn:
        return conn.execute(select(Quarantine.reason, func.length(Quarantine.payload), Quarantine.payload)).all()


def test_a_20_mb_message_is_refused_and_only_its_head_kept(engine):
    payload = b"\x02" + b"A" * 20_000_000
    result = one(engine, topics.taps(OP, A), payload)
    assert result.refused and result.ack_seqs == [] and result.stored == 0 and result.quarantined == 1
    [(reason, size, kept)] = quarantined(engine)
    assert size == OVERSIZE_KEPT == 4096 and kept == payload[:4096]
    assert "20,000,001 bytes" in reason and f"{codec.MAX_PAYLOAD:,}" in reason


def test_a_huge_message_on_a_topic_ingest_does_not_read_is_bounded_too(engine):
    one(engine, f"farebox/v1/{OP}/{A}/status", b"S" * 5_000_000)
    [(_reason, size, _kept)] = quarantined(engine)
    assert size == OVERSIZE_KEPT


def test_a_batch_at_the_limit_is_still_read(engine):
    """The limit is the codec's own: an ordinary batch is stored as before."""
    result = one(engine, topics.taps(OP, A), signed([purchase(1)]))
    assert result.stored == 1 and result.ack_seqs == [1]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Tap)).scalar_one() == 1

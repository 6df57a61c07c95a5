"""backoffice.denylist_publish against a SQLite file: versions hold exactly the lost, blocked and fraud cards of the
card table (checked against sets and a SHA-256 computed here from the documented file layout), an unchanged list
is no new version, deltas between stored versions rebuild the newer file byte for byte, and a device too far
behind, unknown or with a delta no smaller than the list gets the full list."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.denylist_publish import (
    build_version,
    current_version,
    delta_for,
    get_version,
    prune_versions,
    update_for,
)
from backoffice.models import Card, DenyListVersion
from blacklist.delta import apply_delta
from blacklist.denylist import DenyList

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


def asn(n: int, prefix: int = 0x3100) -> str:
    return f"{prefix:04x}{n:016x}"


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/bo.db")
    upgrade(engine)
    return engine


def set_status(engine, status: str, *asns: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Card).where(Card.asn.in_(asns)).values(status=status))


def build(engine, minutes: int = 0):
    with engine.begin() as conn:
        return build_version(conn, T0 + timedelta(minutes=minutes))


def listed(body: bytes) -> set[str]:
    return {a.hex() for a in DenyList.from_bytes(body)}


def header(body: bytes) -> tuple[int, int]:
    """(version, count) as the blacklist.denylist docstring lays the header out (read here with struct)."""
    return struct.unpack_from(">II", body, 8)


@pytest.fixture
def cards(engine):
    """Ten cards in two issuer prefixes: 0 active, 1 lost, 2 blocked, 3 fraud, the rest active."""
    numbers = [asn(i) for i in range(6)] + [asn(i, 0x4200) for i in range(4)]
    statuses = {numbers[1]: "lost", numbers[2]: "blocked", numbers[3]: "fraud"}
    with engine.begin() as conn:
        registry.add_cards(conn, [{"asn": a, "card_type": 1, "status": statuses.get(a, "active")} for a in numbers])
    return numbers


def test_a_version_lists_exactly_the_lost_blocked_and_fraud_cards(engine, cards):
    v = build(engine)
    assert v.version == 1 and v.created_at == T0
    assert listed(v.body) == {cards[1], cards[2], cards[3]}
    assert v.count == 3 and header(v.body) == (1, 3)
    assert v.checksum == hashlib.sha256(v.body[56:]).hexdigest()
    with engine.connect() as conn:
        stored = get_version(conn, 1)
    assert stored == v


def test_the_same_cards_are_no_new_version(engine, cards):
    assert build(engine).version == 1
    assert build(engine, 1) is None
    set_status(engine, "blocked", cards[1])  # lost -> blocked: still refused, the list is the same
    assert build(engine, 2) is None
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DenyListVersion)).scalar() == 1


def test_a_card_reported_lost_or_found_makes_the_next_version(engine, cards):
    build(engine)
    set_status(engine, "lost", cards[6])
    set_status(engine, "active", cards[1])
    v2 = build(engine, 5)
    assert v2.version == 2 and header(v2.body) == (2, 3)
    assert listed(v2.body) == {cards[2], cards[3], cards[6]}
    with engine.connect() as conn:
        assert current_version(conn) == v2


def test_the_delta_takes_a_stored_version_to_the_current_one_byte_for_byte(engine, cards):
    v1 = build(engine)
    set_status(engine, "lost", cards[6], cards[7])
    v2 = build(engine, 1)
    set_status(engine, "active", cards[2])
    set_status(engine, "fraud", cards[0])
    v3 = build(engine, 2)
    with engine.connect() as conn:
        one = delta_for(conn, 2)
        two = delta_for(conn, 1)
    assert (one.base_version, one.new_version) == (2, 3)
    assert {a.hex() for a in one.adds} == {cards[0]} and {a.hex() for a in one.removes} == {cards[2]}
    assert (two.base_version, two.new_version) == (1, 3)
    assert {a.hex() for a in two.adds} == {cards[0], cards[6], cards[7]}
    assert {a.hex() for a in two.removes} == {cards[2]}
    assert two.checksum.hex() == v3.checksum
    assert apply_delta(DenyList.from_bytes(v2.body), one) == v3.body
    assert apply_delta(DenyList.from_bytes(v1.body), two) == v3.body


def test_no_delta_from_an_unknown_current_or_too_old_version(engine, cards):
    build(engine)
    for i in range(4, 6):
        set_status(engine, "lost", cards[i])
        build(engine, i)
    with engine.connect() as conn:
        assert current_version(conn).version == 3
        assert delta_for(conn, 0) is None  # a fresh validator: no stored version 0
        assert delta_for(conn, 3) is None  # already current
        assert delta_for(conn, 7) is None  # ahead of us: a version from another database
        assert delta_for(conn, 1, max_behind=1) is None
        assert delta_for(conn, 1, max_behind=2).base_version == 1
        assert delta_for(conn, 2, max_behind=1).base_version == 2


def test_what_a_device_gets(engine, cards):
    build(engine)
    set_status(engine, "lost", cards[4])
    v2 = build(engine, 1)
    with engine.connect() as conn:
        assert update_for(conn, 2) is None
        fresh = update_for(conn, 0)
        behind = update_for(conn, 1)
        far = update_for(conn, 1, max_behind=0)
    assert fresh.kind == "full" and fresh.version == v2 and fresh.delta is None
    assert behind.kind == "delta" and behind.delta.base_version == 1 and behind.version == v2
    assert far.kind == "full"


def test_a_delta_no_smaller_than_the_list_is_sent_as_the_list(engine):
    """Version 1 holds one card, version 2 a hundred others: the delta (101 cards named, 10 bytes each) is bigger
    than version 2's file (8 bytes a card), so the device gets the file."""
    with engine.begin() as conn:
        registry.add_cards(conn, [{"asn": asn(i), "card_type": 1, "status": "lost" if i == 0 else "active"}
                                  for i in range(101)])
    build(engine)
    with engine.begin() as conn:
        conn.execute(update(Card).values(status="lost"))
        conn.execute(update(Card).where(Card.asn == asn(0)).values(status="active"))
    v2 = build(engine, 1)
    assert v2.count == 100
    with engine.connect() as conn:
        got = update_for(conn, 1)
    assert got.kind == "full"
    assert 100 * 8 < len(v2.body) < 101 * 10


def test_a_malformed_asn_in_the_card_table_is_a_clear_error_and_stores_nothing(engine):
    with engine.begin() as conn:
        registry.add_cards(conn, [{"asn": "31000000000000000001", "card_type": 1, "status": "lost"},
                                  {"asn": "31zz", "card_type": 1, "status": "lost"}])
    with pytest.raises(ValueError, match="ASN"):
        build(engine)
    with engine.connect() as conn:
        assert current_version(conn) is None


def test_a_naive_time_is_refused(engine, cards):
    with engine.begin() as conn, pytest.raises(ValueError, match="UTC"):
        build_version(conn, datetime(2026, 11, 22, 8, 0))


def test_versions_too_old_for_a_delta_are_pruned(engine, cards):
    build(engine)
    for i in range(4, 9):
        set_status(engine, "lost", cards[i])
        build(engine, i)  # versions 2..6
    with engine.begin() as conn:
        assert prune_versions(conn, keep_behind=2) == 3  # 1, 2, 3 are more than 2 below 6
        left = sorted(conn.execute(select(DenyListVersion.version)).scalars())
        assert left == [4, 5, 6]
        assert delta_for(conn, 4, max_behind=2).base_version == 4
        assert update_for(conn, 3, max_behind=2).kind == "full"

"""Cards and money stored in SQLite and PostgreSQL: revision 2026_11_22_0005 builds what the models describe and
upgrades from 0004; issuance with proof; loss reporting freezes the balance; refunds never beyond it; adjustments;
ledger anomalies from real tap rows raise cases once; closing a case can put the card on the deny list; every
change has its audit record."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import MetaData, insert, select

from backoffice import models
from backoffice.cards import audit, cases, issuance, ledger
from backoffice.db import alembic_config, make_engine, upgrade
from backoffice.denylist_publish import denied_asns

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
MY_TABLES = ("card_account", "topup_order", "payment_event", "card_load", "card_entry", "card_case", "card_audit")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
            else request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def engine(url):
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def facts(asn="41000000000000000001", card_type=1, balance=1000) -> issuance.CardFacts:
    return issuance.CardFacts(asn, "4650425800000001", card_type, 0, date(2026, 1, 1), date(2030, 1, 1), balance)


def test_the_revision_builds_what_the_models_describe(engine):
    reflected = MetaData()
    reflected.reflect(engine)
    for name in MY_TABLES:
        table, got = models.Base.metadata.tables[name], reflected.tables[name]
        assert set(got.columns.keys()) == set(table.columns.keys()), name
        for column in table.columns:
            assert got.columns[column.name].nullable == column.nullable, f"{name}.{column.name}"


def test_upgrade_from_0004_keeps_cards_and_downgrades_back(url):
    engine = make_engine(url)
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "2026_11_22_0004")
        conn.execute(insert(models.Card.__table__).values(asn="41000000000000000009", card_type=1, status="active"))
    upgrade(engine)
    with engine.begin() as conn:
        issuance.issue_card(conn, card=facts("41000000000000000009"), deposit=0, who="staff:li", now=NOW)
        assert conn.execute(select(models.CardAccount.asn)).scalars().all() == ["41000000000000000009"]
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "2026_11_22_0005-1")
    reflected = MetaData()
    reflected.reflect(engine)
    assert not set(MY_TABLES) & set(reflected.tables) and "card" in reflected.tables
    engine.dispose()


def test_issue_lose_refund_and_adjust_with_an_audit_trail(engine):
    asn = "41000000000000000001"
    with engine.begin() as conn, pytest.raises(issuance.IssueError, match="proof"):
        issuance.issue_card(conn, card=facts(card_type=2), deposit=2000, who="staff:li", now=NOW)
    with engine.begin() as conn:
        issuance.issue_card(conn, card=facts(card_type=2), deposit=2000, who="staff:li", now=NOW,
                            proof="student id 2026-0042")
        with pytest.raises(issuance.IssueError, match="issued already"):
            issuance.issue_card(conn, card=facts(card_type=2), deposit=2000, who="staff:li", now=NOW,
                                proof="again")
    with engine.begin() as conn:
        with pytest.raises(ledger.RefundRefused, match="report it lost"):
            ledger.refund_balance(conn, asn=asn, amount=100, who="staff:li", why="asks", now=NOW)
        book = ledger.adjust(conn, asn=asn, amount=-150, who="staff:zhao", why="tap record lost on bus 7",
                             now=NOW + timedelta(minutes=1))
        assert book.balance == 850
        frozen = issuance.report_lost(conn, asn=asn, who="staff:li", why="rider reports the card lost",
                                      now=NOW + timedelta(minutes=2))
        assert frozen == 850
        assert asn in denied_asns(conn)
        ledger.refund_balance(conn, asn=asn, amount=800, who="staff:li", why="refund to rider",
                              now=NOW + timedelta(minutes=3))
        with pytest.raises(ledger.RefundRefused, match="too much"):
            ledger.refund_balance(conn, asn=asn, amount=51, who="staff:li", why="again", now=NOW)
        ledger.refund_balance(conn, asn=asn, amount=50, who="staff:li", why="the rest", now=NOW)
        book = ledger.card_ledger(conn, asn=asn)
        assert (book.balance, book.refunds, book.adjustments) == (0, 850, -150)
        trail = audit.trail(conn, asn=asn)
    assert [(a.who, a.action, a.amount) for a in trail] == [
        ("staff:li", "issue", 2000), ("staff:zhao", "adjust", -150), ("staff:li", "report_lost", 850),
        ("staff:li", "refund_balance", 800), ("staff:li", "refund_balance", 50)]
    assert trail[1].why == "tap record lost on bus 7"


def _tap(seq, ttc, amount, balance_after, minute, asn="41000000000000000002"):
    return {"device_id": "bus7", "device_seq": seq, "kind": "purchase", "occurred_at": NOW + timedelta(minutes=minute),
            "received_at": NOW + timedelta(hours=1), "operator": "op", "route": "r1", "vehicle": "v1",
            "driver": "d1", "shift_no": 1, "card_asn": asn, "card_type": 1, "card_ttc": ttc, "amount": amount,
            "balance_after": balance_after, "terminal_id": "010000000007", "terminal_seq": 100 + seq,
            "tac": f"{seq:08x}", "reason": ""}


def test_ledger_anomalies_raise_cases_once_and_a_case_can_deny_the_card(engine):
    asn = "41000000000000000002"
    with engine.begin() as conn:
        issuance.issue_card(conn, card=facts(asn, balance=1000), deposit=0, who="staff:li", now=NOW)
        # Taps at card counters 0, 1 and 3: counter 2 never arrived, and the balance does not follow.
        conn.execute(insert(models.Tap.__table__), [_tap(1, 0, 200, 800, 1), _tap(2, 1, 200, 600, 2),
                                                    _tap(3, 3, 200, 200, 4)])
        book = ledger.review_card(conn, asn=asn, now=NOW)
        assert (book.balance, book.card_balance, book.agrees) == (400, 200, False)
        ledger.review_card(conn, asn=asn, now=NOW)  # reviewed again: no second set of cases
        opened = cases.open_cases(conn, asn=asn)
    assert sorted(c.kind for c in opened) == [cases.BALANCE_MISMATCH, cases.BALANCE_MISMATCH, cases.COUNTER_JUMP]
    with engine.begin() as conn:
        jump = next(c for c in opened if c.kind == cases.COUNTER_JUMP)
        cases.close_case(conn, case_id=jump.id, who="staff:zhao", resolution="cloned card suspected",
                         block_card=True, now=NOW)
        assert asn in denied_asns(conn)
        assert [a.action for a in audit.trail(conn, asn=asn)] == ["issue", "close_case"]
        with pytest.raises(ValueError, match="closed already"):
            cases.close_case(conn, case_id=jump.id, who="x", resolution="y", block_card=False, now=NOW)
